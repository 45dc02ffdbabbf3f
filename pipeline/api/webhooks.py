"""Webhooks of ``llmbatch api``: one signed POST per batch end, opt-in per project.

A project registers a URL (``llmbatch webhooks set --project P --url URL``) and is given a
signing secret (``whsec_`` + base64 of 32 random bytes), shown once. When one of its batches ends
(OpenAI's or Anthropic's), the trigger of sql/032_webhooks.sql makes its event in the transaction
that ends it: one event per batch end, whatever path ended it. ``deliver_forever`` (a task of the
service) POSTs each event in OpenAI's shape (``{"id": "evt_…", "object": "event", "type":
"batch.completed|failed|expired|cancelled", "created_at", "data": {"id": BATCH}}``) with the
Standard Webhooks headers ``webhook-id`` (the event's id, the same on every attempt, so a
receiver can drop a repeat), ``webhook-timestamp`` and ``webhook-signature``, signed by the
``standardwebhooks`` library: the openai SDK's ``client.webhooks.unwrap`` verifies them.

Every attempt is recorded (``api_webhook_attempts``: status code or error, time taken); an answer
other than 2xx, or none, is tried again after ``api_webhook_retry_s`` doubling up to
``api_webhook_retry_max_s`` (with jitter), until ``api_webhook_give_up_h`` after the event. An
event is leased before it is sent (``claim``), so two rounds or services never send it at once; a
service killed after the receiver answered and before the record committed sends it again once the
lease is over (same id).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import secrets
import time
from datetime import datetime, timezone
from urllib.parse import urlsplit

import aiohttp
import sqlalchemy as sa
from standardwebhooks.webhooks import Webhook

from pipeline import jsontext
from pipeline.api import keys
from pipeline.api.shapes import ts
from pipeline.config import Settings
from pipeline.errors import InputError

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
#: how often the service looks for events due
DELIVER_EVERY_S = 1.0
#: at most this many events sent in one round (the next round goes on)
ROUND = 50


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"webhook url {url!r}: an http:// or https:// URL")
    return url


def register(conn, project_id: str, url: str) -> str:
    """Set ``project_id``'s webhook URL (made if the project is new); returns its new signing
    secret. Setting it again replaces the URL and the secret: events still pending go to the new
    URL, signed with the new secret."""
    keys.ensure_project(conn, project_id)
    secret = new_secret()
    conn.execute(sa.text(
        "INSERT INTO api_webhooks (project_id, url, secret) VALUES (:p, :u, :s)"
        " ON CONFLICT (project_id) DO UPDATE SET url = EXCLUDED.url, secret = EXCLUDED.secret, created_at = now()"),
        {"p": project_id, "u": check_url(url), "s": secret})
    return secret


def remove(conn, project_id: str) -> bool:
    """No more events for ``project_id``; pending ones are given up at their next attempt."""
    return bool(conn.execute(sa.text("DELETE FROM api_webhooks WHERE project_id = :p"), {"p": project_id}).rowcount)


def status(conn, project_id: str) -> dict | None:
    """The project's webhook (never its secret) and its events by outcome; None if it has none."""
    row = conn.execute(sa.text("SELECT url, created_at FROM api_webhooks WHERE project_id = :p"),
                       {"p": project_id}).mappings().first()
    if row is None:
        return None
    counts = conn.execute(sa.text(
        "SELECT count(*) FILTER (WHERE delivered_at IS NOT NULL) AS delivered,"
        " count(*) FILTER (WHERE delivered_at IS NULL AND gave_up_at IS NULL) AS pending,"
        " count(*) FILTER (WHERE gave_up_at IS NOT NULL) AS given_up,"
        " coalesce(sum(attempts), 0) AS attempts FROM api_webhook_events WHERE project_id = :p"),
        {"p": project_id}).mappings().one()
    return {"url": row["url"], "since": row["created_at"], **{k: int(v) for k, v in counts.items()}}


def event_body(row: dict) -> str:
    """The event in OpenAI's batch webhook shape, as sent (and signed)."""
    return jsontext.dumps({"id": row["event_id"], "object": "event", "type": row["type"],
                           "created_at": ts(row["created_at"]), "data": {"id": row["batch_id"]}})


def signed_headers(secret: str, event_id: str, body: str, when: datetime) -> dict:
    """Standard Webhooks' headers: the signature covers ``id.timestamp.body``."""
    return {"webhook-id": event_id, "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": Webhook(secret).sign(event_id, when, body),
            "content-type": "application/json", "user-agent": "llmbatch-webhooks"}


def backoff_s(attempt: int, settings: Settings) -> float:
    """The wait after failed attempt number ``attempt`` (1, 2, …): doubling, capped, ±20 %."""
    return min(settings.api_webhook_retry_s * 2 ** (attempt - 1), settings.api_webhook_retry_max_s) \
        * random.uniform(0.8, 1.2)


def claim(engine, lease_s: float) -> dict | None:
    """The event most overdue, with its project's URL and secret, leased for ``lease_s`` (its next
    attempt moved that far on, so no other round or service takes it meanwhile, and a service that
    dies while it sends leaves it to be sent again); None if none is due."""
    with engine.begin() as conn:
        row = conn.execute(sa.text(
            "UPDATE api_webhook_events e SET next_attempt_at = now() + make_interval(secs => :lease)"
            " FROM (SELECT event_id FROM api_webhook_events WHERE delivered_at IS NULL AND gave_up_at IS NULL"
            "       AND next_attempt_at <= now() ORDER BY next_attempt_at LIMIT 1 FOR UPDATE SKIP LOCKED) due"
            " WHERE e.event_id = due.event_id"
            " RETURNING e.event_id, e.project_id, e.batch_id, e.type, e.created_at, e.attempts"),
            {"lease": lease_s}).mappings().first()
        if row is None:
            return None
        hook = conn.execute(sa.text("SELECT url, secret FROM api_webhooks WHERE project_id = :p"),
                            {"p": row["project_id"]}).mappings().first()
        if hook is None:   # the project removed its webhook
            conn.execute(sa.text("UPDATE api_webhook_events SET gave_up_at = now() WHERE event_id = :e"),
                         {"e": row["event_id"]})
        return {**row, "url": hook and hook["url"], "secret": hook and hook["secret"]}


def record(engine, settings: Settings, event: dict, when: datetime, code: int | None, error: str | None,
           ms: int) -> str:
    """Record an attempt and what follows it: delivered (2xx), tried again later, or given up."""
    attempt = event["attempts"] + 1
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO api_webhook_attempts (event_id, attempt, url, at, status_code, error, ms)"
            " VALUES (:e, :n, :u, :t, :c, :x, :ms)"),
            {"e": event["event_id"], "n": attempt, "u": event["url"], "t": when, "c": code, "x": error, "ms": ms})
        if code is not None and 200 <= code < 300:
            conn.execute(sa.text("UPDATE api_webhook_events SET attempts = :n, delivered_at = now()"
                                 " WHERE event_id = :e"), {"n": attempt, "e": event["event_id"]})
            return "delivered"
        give_up = (when - event["created_at"]).total_seconds() > settings.api_webhook_give_up_h * 3600
        wait = backoff_s(attempt, settings)
        conn.execute(sa.text(
            "UPDATE api_webhook_events SET attempts = :n, next_attempt_at = now() + make_interval(secs => :w),"
            " gave_up_at = CASE WHEN :g THEN now() END WHERE event_id = :e"),
            {"n": attempt, "w": wait, "g": give_up, "e": event["event_id"]})
    return "given up" if give_up else f"again in {wait:.1f} s"


async def send(session: aiohttp.ClientSession, event: dict, timeout_s: float) -> tuple[datetime, int | None,
                                                                                          str | None, int]:
    """POST the event, signed; (when, status code or None, error or None, milliseconds)."""
    body, when = event_body(event), datetime.now(timezone.utc)
    code, error, t0 = None, None, time.monotonic()
    try:
        async with session.post(event["url"], data=body.encode(), allow_redirects=False,
                                headers=signed_headers(event["secret"], event["event_id"], body, when),
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            code = r.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        error = f"{type(e).__name__}: {e}"[:500]
    return when, code, error, int((time.monotonic() - t0) * 1000)


async def deliver_due(engine, settings: Settings, session: aiohttp.ClientSession, limit: int = ROUND) -> int:
    """Send the events due, one after another, up to ``limit``; returns how many were tried."""
    n = 0
    while n < limit:
        event = await asyncio.to_thread(claim, engine, settings.api_webhook_timeout_s + 30)
        if event is None:
            return n
        if event["url"] is None:
            continue
        when, code, error, ms = await send(session, event, settings.api_webhook_timeout_s)
        outcome = await asyncio.to_thread(record, engine, settings, event, when, code, error, ms)
        log.info("webhook %s (%s of batch %s), attempt %d: %s; %s", event["event_id"], event["type"],
                 event["batch_id"], event["attempts"] + 1, code if code is not None else error, outcome)
        n += 1
    return n


async def deliver_forever(engine, settings: Settings, every_s: float = DELIVER_EVERY_S) -> None:
    """The service's sender: the events due, every ``every_s``."""
    async with aiohttp.ClientSession() as session:
        while True:
            await asyncio.sleep(every_s)
            try:
                await deliver_due(engine, settings, session)
            except Exception as e:   # the next round tries again
                log.warning("sending webhooks: %s", e)
