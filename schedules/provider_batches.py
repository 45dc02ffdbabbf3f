"""Jobs in ``provider_batch`` mode, through the providers' Batch APIs at half price.

The batcher writes such requests as ``held`` batches with ``mode =
'provider_batch'``. Every scheduler tick:

1. **reserve** — before anything is sent, each held request's maximum cost at
   the batch price is reserved against its job, tier and global caps
   (``holds.reserve_now``, held for the batch's whole window). What fits is
   sent; a request a cap refuses is moved to a deferred batch with the reason
   in words (``requests.deferred_reason``); one only other live holds stand in
   front of stays held for the next tick; one whose maximum is above a cap
   itself (or is no amount) fails at once. Budget store down: nothing is sent.
2. **submit** — held provider-batch batches are packed by (provider, model)
   into provider batches within the provider's limits (requests and bytes per
   batch; a batch of ours that does not fit is split). One transaction records
   the provider batch (``creating``: the *intent*) and marks its batches
   ``submitted`` and their requests ``running``; then each attempt is counted
   and timed on the row (``create_attempts``, ``create_started_at``) before
   the JSONL is uploaded and the batch created (OpenAI Files + Batches,
   Anthropic Message Batches), without the SDK's hidden retries (a retried
   create is a second batch, billed twice). A creation the provider refused
   (a 4xx answer) puts everything back to ``held`` and frees the holds; one
   whose outcome is unknown (timeout, dropped connection, 5xx, or a scheduler
   that died) stays ``creating`` with its holds: its lines count as spent at
   their maximum until the provider says what it did.
2b. **recover** — every tick, before submitting, each ``creating`` row is
   looked for at the provider: OpenAI by the batch's metadata
   (``llmbatch_id``); Anthropic (no metadata) by the request count and the
   creation window (first attempt − clock skew .. last attempt +
   ``provider_batch_create_timeout_s`` + skew), among batches no row of ours
   owns, and once results exist by their custom_ids. One found is adopted
   (``submitted``); it is sent again only when the provider lists none and
   the last attempt is older than ``provider_batch_create_timeout_s``.
2c. **cancel** — ``cancel_job`` (pipeline/stores/jobs.py) sets ``cancel_requested`` on the job's
   provider batches whatever their state; the scheduler carries it out each
   tick until the provider confirms (``cancel_confirmed_at``): a batch created
   after the cancel is cancelled the moment its id is known, a ``creating``
   row the provider never created is closed without sending, one still being
   looked for waits. What the provider ran before the cancel took effect is
   ingested and billed; the rest is ``cancelled``, never re-queued.
3. **poll** — open provider batches are retrieved; one that ended is ingested:
   answers and errors land in ``results`` / ``attempts`` / ``requests`` through
   ``outcomes.write_outcomes``, exactly like realtime results, with cost at the batch
   discount (``pricing.cost(..., batch=True)``). Requests the provider did not
   run (expired, cancelled, batch failed) are re-queued to realtime or marked
   failed, as the job's ``batch_fallback`` says; those of a cancelled job are
   ``cancelled``. Ingestion is idempotent: a crash mid-way redoes it harmlessly.
   After the commit each hold is settled to the actual cost (the difference is
   freed, the spend enters the Redis counters that realtime jobs see); holds of
   requests not run are released.

Provider custom_ids are ``q`` + a hash of (job, custom_id): unique across the
jobs that share a provider batch and valid for Anthropic's pattern.

It must never hold a Postgres transaction open across a provider call.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from decimal import Decimal

import sqlalchemy as sa

from pipeline import errors
from pipeline.money import budget, caps, holds, scripts, units
from pipeline.stores import batches as batch_store, db, jobs as job_store, outcomes as outcome_store
from pipeline.intake.batcher import dispatch
from pipeline.config import Settings, get_settings
from pipeline.constants import DISPATCHED_TIERS
from pipeline.ids import request_key
from pipeline.money.pricing import cost, get_price_book, usage_from_anthropic, usage_from_openai
from pipeline.providers import batch_api

log = logging.getLogger(__name__)

_TERMINAL = ("succeeded", "failed", "cancelled")


def provider_custom_id(job_id: str, custom_id: str) -> str:
    return "q" + hashlib.blake2b(f"{job_id}\x00{custom_id}".encode(), digest_size=16).hexdigest()


def request_line(provider: str, pid: str, body: dict) -> bytes:
    if provider == "openai":
        line = {"custom_id": pid, "method": "POST", "url": batch_api.OPENAI_ENDPOINT, "body": body}
    else:
        line = {"custom_id": pid, "params": body}
    return json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def pack(sizes: list[int], max_requests: int, max_bytes: int) -> list[tuple[int, int]]:
    """Split items of the given byte sizes into consecutive chunks ``[start, end)`` within both limits."""
    chunks, start, used = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_requests or used + size > max_bytes):
            chunks.append((start, i))
            start, used = i, 0
        used += size
    if start < len(sizes):
        chunks.append((start, len(sizes)))
    return chunks


# ------------------------------------------------------------------ submit

_redis_by_url: dict[str, object] = {}


def _budget_redis(settings: Settings):
    """The scheduler's synchronous Redis client for the budget (one per URL)."""
    r = _redis_by_url.get(settings.redis_url)
    if r is None:
        r = _redis_by_url[settings.redis_url] = scripts.redis_clients(settings)[1]
    return r


def submit_held(*, settings: Settings | None = None, engine=None, limit_batches: int = 2000) -> list[str]:
    """Send held provider-batch work to the providers, only what its caps can hold; returns our
    provider batch ids."""
    settings = settings or get_settings()
    engine = engine or db.get_engine()
    redis = _budget_redis(settings)
    created = []
    held: list[str] = []   # reservations taken this tick: given back if the transaction does not commit
    try:
        with engine.begin() as conn:
            batches = conn.execute(sa.text(
                "SELECT batch_id, provider, model, tier FROM batches"
                " WHERE status = 'held' AND mode = 'provider_batch' ORDER BY created_at"
                " LIMIT :n FOR UPDATE SKIP LOCKED"), {"n": limit_batches}).mappings().all()
            if not batches:
                return []
            groups: dict[tuple[str, str], list] = {}
            for b in batches:
                groups.setdefault((b["provider"], b["model"]), []).append(b)
            store_down = False
            for (provider, model), group in groups.items():
                ids = [b["batch_id"] for b in group]
                # a deferred batch whose time came (resume_due_batches) is held again: its requests too
                conn.execute(sa.text(
                    "UPDATE requests SET status = 'held', deferred_scope = NULL, deferred_reason = NULL"
                    " WHERE batch_id = ANY(:ids) AND status = 'deferred'"), {"ids": ids})
                reqs = conn.execute(sa.text(
                    "SELECT job_id, custom_id, batch_id, body, tier, model, max_cost_usd, attempts FROM requests"
                    " WHERE batch_id = ANY(:ids) AND status = 'held' ORDER BY batch_id, line, custom_id"),
                    {"ids": ids}).mappings().all()
                if reqs and not store_down:
                    reqs, store_down = _reserve(conn, reqs, settings, engine, redis, held)
                else:
                    reqs = []
                # batches left with nothing to send (their job was cancelled, or the caps moved it) are done
                conn.execute(sa.text(
                    "UPDATE batches b SET status = 'done', finished_at = now() WHERE b.batch_id = ANY(:ids)"
                    " AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.batch_id = b.batch_id"
                    "                 AND r.status NOT IN ('succeeded', 'failed', 'cancelled'))"), {"ids": ids})
                if not reqs:
                    continue
                sizes = [len(request_line(provider, provider_custom_id(r["job_id"], r["custom_id"]), r["body"]))
                         for r in reqs]
                for start, end in pack(sizes, settings.provider_batch_max_requests[provider],
                                       settings.provider_batch_max_bytes[provider]):
                    pb_id = "pb_" + uuid.uuid4().hex[:20]
                    chunk = reqs[start:end]
                    conn.execute(sa.text(
                        "INSERT INTO provider_batches (id, provider, model, status, requests, bytes)"
                        " VALUES (:id, :p, :m, 'creating', :n, :bytes)"),
                        {"id": pb_id, "p": provider, "m": model, "n": len(chunk), "bytes": sum(sizes[start:end])})
                    _assign(conn, pb_id, chunk)
                    created.append(pb_id)
    except BaseException:
        holds.release_held(redis, held)
        raise
    for pb_id in created:
        _create_at_provider(pb_id, settings, engine)
    return created


def _hold_amount(req, prices) -> Decimal:
    """The most a request can cost through a Batch API: its maximum at the batch price."""
    price = prices.resolve(req["model"])
    return Decimal(str(req["max_cost_usd"])) * (1 - price.batch_discount)


def _reserve(conn, reqs, settings: Settings, engine, redis, held: list[str]) -> tuple[list, bool]:
    """Reserve each request's maximum; returns (the requests that fit, whether the store is down).

    Refused ones move to a deferred batch with the reason; never-fitting or
    invalid ones fail now; those only live holds stand in front of stay held.
    """
    prices = get_price_book()
    fit, defer, fail, waiting = [], {}, [], 0
    # one period for the tick: each hold is taken in it and its request records it, so the spend
    # lands in that period when the batch is ingested, however many days later (one period per spend)
    today = caps.period(settings, engine)
    for i, r in enumerate(reqs):
        rid = request_key(r["job_id"], r["custom_id"])
        try:
            amount = _hold_amount(r, prices)
            in_the_way = holds.reserve_now(engine, redis, settings, rid, r["job_id"], r["tier"], amount,
                                            ttl_s=scripts.PROVIDER_BATCH_HOLD_S, today=today)
        except errors.BudgetUnavailable as e:
            log.warning("provider batches: budget store unreachable, %d requests stay held: %s", len(reqs) - i, e)
            _record_period(conn, fit, today)
            return _apply_budget_outcomes(conn, fit, defer, fail), True
        except (errors.InvalidAmount, errors.BudgetNeverFits) as e:
            fail.append((r, e))
            continue
        except errors.BudgetExceeded as e:
            reason = (f"deferred: the {e.scope} cap ${e.cap} has ${e.spent} spent and cannot hold this"
                      f" request's maximum of ${amount.quantize(units.UNIT)} at the batch price")
            defer.setdefault((r["batch_id"], e.kind), []).append((r, e.kind, reason))
            continue
        except Exception as e:   # an unknown model, a broken row: that request fails, alone
            fail.append((r, errors.InvalidAmount(f"cannot price this request for its reservation: {e}")))
            continue
        if in_the_way is not None:
            waiting += 1         # other live holds may settle below their maximum: try next tick
            continue
        held.append(rid)
        fit.append(r)
    if waiting:
        log.info("provider batches: %d requests wait for live holds under their caps; next tick", waiting)
    _record_period(conn, fit, today)
    return _apply_budget_outcomes(conn, fit, defer, fail), False


def _record_period(conn, reqs, today: str) -> None:
    """The period the requests' holds were taken in (``requests.budget_period``), in the transaction
    that sends them: ingestion writes their spend there, a rebuild re-holds them there."""
    if reqs:
        conn.execute(sa.text(
            "UPDATE requests r SET budget_period = CAST(:p AS date)"
            " FROM jsonb_to_recordset(CAST(:k AS jsonb)) AS x(job_id text, custom_id text)"
            " WHERE r.job_id = x.job_id AND r.custom_id = x.custom_id"),
            {"p": today, "k": db.dumps([{"job_id": r["job_id"], "custom_id": r["custom_id"]} for r in reqs])})


def _apply_budget_outcomes(conn, fit, defer, fail) -> list:
    for (batch_id, kind), items in defer.items():
        target = "b_" + uuid.uuid4().hex
        until = caps.next_day() if kind in ("global", "tier") else None
        conn.execute(sa.text(
            "INSERT INTO batches (batch_id, tier, provider, model, size, status, mode, deferred_until)"
            " SELECT :new, tier, provider, model, :n, 'deferred', mode, :u FROM batches WHERE batch_id = :b"),
            {"new": target, "n": len(items), "b": batch_id, "u": until})
        conn.execute(sa.text(
            "UPDATE requests r SET batch_id = :new, status = 'deferred', deferred_scope = x.scope,"
            " deferred_reason = x.reason FROM jsonb_to_recordset(CAST(:rows AS jsonb))"
            " AS x(job_id text, custom_id text, scope text, reason text)"
            " WHERE r.job_id = x.job_id AND r.custom_id = x.custom_id AND r.batch_id = :b"),
            {"new": target, "b": batch_id, "rows": db.dumps(
                [{"job_id": r["job_id"], "custom_id": r["custom_id"], "scope": k, "reason": why}
                 for r, k, why in items])})
        conn.execute(sa.text("UPDATE batches SET size = size - :n WHERE batch_id = :b"),
                     {"n": len(items), "b": batch_id})
        log.info("provider batches: %d requests of batch %s deferred (%s): %s", len(items), batch_id, kind,
                 items[0][2])
    if fail:
        outcome_store.write_outcomes(conn, [{
            "job_id": r["job_id"], "custom_id": r["custom_id"], "model": r["model"], "status": "failed",
            "attempts": r["attempts"] or 0, "cost_usd": "0",
            "error": {"code": e.code, "message": str(e)}} for r, e in fail], [])
        log.warning("provider batches: %d requests failed before sending: %s", len(fail), fail[0][1])
    jobs = {r["job_id"] for r, _ in fail} | {r["job_id"] for items in defer.values() for r, _, _ in items}
    if jobs:
        job_store.refresh_jobs(conn, jobs)
    return fit


def _assign(conn, pb_id: str, chunk: list) -> None:
    """Put ``chunk``'s requests in provider batch ``pb_id``; a batch of ours only partly in it is split."""
    by_batch: dict[str, list] = {}
    for r in chunk:
        by_batch.setdefault(r["batch_id"], []).append((r["job_id"], r["custom_id"]))
    for batch_id, keys in by_batch.items():
        remaining = conn.execute(sa.text(
            "SELECT count(*) FROM requests WHERE batch_id = :b AND status = 'held'"), {"b": batch_id}).scalar()
        target = batch_id
        if remaining > len(keys):   # split: the chunk's part becomes a batch of its own
            target = "b_" + uuid.uuid4().hex
            conn.execute(sa.text(
                "INSERT INTO batches (batch_id, tier, provider, model, size, status, mode)"
                " SELECT :new, tier, provider, model, :n, 'held', mode FROM batches WHERE batch_id = :b"),
                {"new": target, "n": len(keys), "b": batch_id})
            conn.execute(sa.text(
                "UPDATE requests r SET batch_id = :new FROM jsonb_to_recordset(CAST(:keys AS jsonb))"
                " AS x(job_id text, custom_id text)"
                " WHERE r.job_id = x.job_id AND r.custom_id = x.custom_id AND r.batch_id = :b"),
                {"new": target, "b": batch_id,
                 "keys": db.dumps([{"job_id": j, "custom_id": c} for j, c in keys])})
            conn.execute(sa.text("UPDATE batches SET size = size - :n WHERE batch_id = :b"),
                         {"n": len(keys), "b": batch_id})
        conn.execute(sa.text(
            "UPDATE batches SET status = 'submitted', provider_batch = :pb, dispatched_at = now(),"
            " started_at = now() WHERE batch_id = :b"), {"pb": pb_id, "b": target})
        conn.execute(sa.text(
            "UPDATE requests SET status = 'running', started_at = coalesce(started_at, now())"
            " WHERE batch_id = :b AND status = 'held'"), {"b": target})


def _pb_requests(conn, pb_id: str) -> list[dict]:
    return [dict(r) for r in conn.execute(sa.text(
        "SELECT r.job_id, r.custom_id, r.model, r.tier, r.body, r.status, r.attempts, r.batch_id,"
        " r.budget_period::text AS budget_period, j.batch_fallback, j.status AS job_status"
        " FROM batches b JOIN requests r ON r.batch_id = b.batch_id JOIN jobs j ON j.job_id = r.job_id"
        " WHERE b.provider_batch = :pb ORDER BY r.batch_id, r.line, r.custom_id"), {"pb": pb_id}).mappings()]


def _create_at_provider(pb_id: str, settings: Settings, engine, *, attempts: int = 0) -> str:
    """One attempt to create ``pb_id`` at the provider, made only if the row is still ``creating``,
    not cancelled, with ``attempts`` attempts so far (compare-and-set: two schedulers never both
    send it). The attempt is recorded before anything is sent. Returns ``created``, ``refused``
    (held again, holds freed), ``unknown`` (left for ``recover_creating``, holds kept) or ``skipped``."""
    with engine.begin() as conn:
        pb = conn.execute(sa.text(
            "UPDATE provider_batches SET create_attempts = create_attempts + 1, create_started_at = now(),"
            " first_create_at = coalesce(first_create_at, now())"
            " WHERE id = :id AND status = 'creating' AND create_attempts = :n AND NOT cancel_requested"
            " RETURNING provider"), {"id": pb_id, "n": attempts}).scalar()
        if pb is None:
            return "skipped"
        reqs = _pb_requests(conn, pb_id)
    lines = [{"custom_id": provider_custom_id(r["job_id"], r["custom_id"]), "params": r["body"]} for r in reqs]
    content = b"".join(request_line(pb, provider_custom_id(r["job_id"], r["custom_id"]), r["body"]) for r in reqs)
    def cancelled() -> bool:
        with engine.connect() as conn:
            return bool(conn.execute(sa.text("SELECT cancel_requested FROM provider_batches WHERE id = :id"),
                                     {"id": pb_id}).scalar())
    try:
        info = asyncio.run(batch_api.create(settings, pb_id, pb, content, lines, cancelled))
    except batch_api.NotCreated as e:   # the provider said no: nothing to bill, back to held, next tick retries
        log.warning("provider batch %s (%s, %d requests): creation refused, held again: %s",
                    pb_id, pb, len(reqs), e)
        _abandon(engine, pb_id, f"create refused: {e}", settings)
        return "refused"
    except Exception as e:    # the provider may have created it: never send again before asking it
        log.warning("provider batch %s (%s, %d requests): creation not confirmed (%s: %s); its lines stay held"
                    " at their maximum until the provider is asked what it created", pb_id, pb, len(reqs),
                    type(e).__name__, e)
        return "unknown"
    _record_created(engine, pb_id, info, settings)
    log.info("provider batch %s: %s batch %s created, %d requests, %d bytes",
             pb_id, pb, info["provider_batch_id"], len(reqs), len(content))
    return "created"


def _record_created(engine, pb_id: str, info: dict, settings: Settings) -> bool:
    """The provider's batch is ours: ``submitted``. A cancel asked for meanwhile is sent at once."""
    with engine.begin() as conn:
        row = conn.execute(sa.text(
            "UPDATE provider_batches SET status = 'submitted', provider_batch_id = :pbid,"
            " input_file_id = :fid, provider_status = :st, submitted_at = now() WHERE id = :id"
            " AND status = 'creating' RETURNING provider, cancel_requested"),
            {"id": pb_id, "pbid": info["provider_batch_id"], "fid": info["input_file_id"],
             "st": info["provider_status"]}).first()
    if row is None:
        return False
    if row.cancel_requested:
        confirmed = batch_api.OPENAI_CANCEL_CONFIRMED if row.provider == "openai" else batch_api.ANTHROPIC_CANCEL_CONFIRMED
        if info.get("cancel_status") in confirmed:
            job_store.confirm_cancel(engine, pb_id, info["cancel_status"], True)
        else:
            job_store.send_cancel(engine, pb_id, row.provider, info["provider_batch_id"], settings)
    return True


def _abandon(engine, pb_id: str, reason: str, settings: Settings | None = None) -> None:
    """A provider batch the provider never created: its requests are held again (those of a
    cancelled job are cancelled), and their holds freed (the next tick reserves again)."""
    with engine.begin() as conn:
        conn.execute(sa.text(
            "UPDATE provider_batches SET status = 'abandoned', error = :e, ended_at = now() WHERE id = :id"),
            {"id": pb_id, "e": reason[:2000]})
        ids = conn.execute(sa.text(
            "UPDATE batches SET status = 'held', provider_batch = NULL, dispatched_at = NULL, started_at = NULL"
            " WHERE provider_batch = :id AND status = 'submitted' RETURNING batch_id"), {"id": pb_id}).scalars().all()
        keys = conn.execute(sa.text(
            "UPDATE requests r SET status = CASE WHEN j.status = 'cancelled' THEN 'cancelled' ELSE 'held' END,"
            " finished_at = CASE WHEN j.status = 'cancelled' THEN now() ELSE r.finished_at END"
            " FROM jobs j WHERE j.job_id = r.job_id AND r.batch_id = ANY(:ids) AND r.status = 'running'"
            " RETURNING r.job_id, r.custom_id, r.status"), {"ids": ids}).all()
        conn.execute(sa.text(
            "UPDATE batches b SET status = 'done', finished_at = now() WHERE b.batch_id = ANY(:ids)"
            " AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.batch_id = b.batch_id"
            "                 AND r.status NOT IN ('succeeded', 'failed', 'cancelled'))"), {"ids": ids})
        cancelled = {j for j, _, st in keys if st == "cancelled"}
        if cancelled:
            job_store.refresh_jobs(conn, cancelled)
    holds.release_held(_budget_redis(settings or get_settings()), [request_key(j, c) for j, c, _ in keys])


def _known_ids(engine):
    def known(ids: list[str]) -> set[str]:
        with engine.connect() as conn:
            return set(conn.execute(sa.text(
                "SELECT provider_batch_id FROM provider_batches WHERE provider_batch_id = ANY(:ids)"),
                {"ids": ids}).scalars())
    return known


def recover_creating(*, settings: Settings | None = None, engine=None) -> int:
    """Carry every ``creating`` row (the intent) to a decision the provider backs, once per tick.

    Never attempted (the scheduler died between the intent and the call): sent now, or closed
    if its job was cancelled. Attempted: looked for at the provider (OpenAI by metadata,
    Anthropic by count, window and custom_ids); found, it is adopted (and cancelled, if that
    was asked); sent again, or closed when cancelled, only when the provider lists none and the
    last attempt is older than ``provider_batch_create_timeout_s``. Until then its requests stay
    ``running`` and their holds stay: spent at their maximum, under the caps. Returns the rows seen.
    """
    settings = settings or get_settings()
    engine = engine or db.get_engine()
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.text(
            "SELECT id, provider, requests, create_attempts, cancel_requested,"
            " extract(epoch FROM first_create_at)::float8 AS first_at,"
            " extract(epoch FROM create_started_at)::float8 AS last_at,"
            " coalesce(create_started_at < now() - make_interval(secs => :t), true) AS window_closed"
            " FROM provider_batches WHERE status = 'creating'"
            # the provider is asked at most once per poll interval per row
            " AND (create_attempts = 0 OR polled_at IS NULL OR polled_at < now() - make_interval(secs => :p))"
            " ORDER BY created_at"),
            {"t": settings.provider_batch_create_timeout_s, "p": settings.provider_batch_poll_s}).mappings()]
        for r in rows:
            if r["provider"] == "anthropic" and r["create_attempts"]:
                r["pids"] = {provider_custom_id(q["job_id"], q["custom_id"]) for q in _pb_requests(conn, r["id"])}
    found: dict[str, tuple] = {}
    tried = [r for r in rows if r["create_attempts"]]
    intents = [{"id": r["id"], "requests": r["requests"], "pids": r["pids"],
                "start": r["first_at"] - batch_api.CLOCK_SKEW_S,
                "end": r["last_at"] + settings.provider_batch_create_timeout_s + batch_api.CLOCK_SKEW_S}
               for r in tried if r["provider"] == "anthropic"]
    try:
        if intents:
            found.update(asyncio.run(batch_api.find_anthropic(settings, intents, _known_ids(engine))))
    except Exception as e:
        log.warning("provider batches: cannot list Anthropic batches to find %d unconfirmed creations: %s",
                    len(intents), e)
    for r in tried:
        if r["provider"] != "openai":
            continue
        try:
            hit = asyncio.run(batch_api.find_openai(settings, r["id"], r["first_at"]))
            found[r["id"]] = ("found", hit) if hit else ("none",)
        except Exception as e:
            log.warning("provider batch %s: cannot list OpenAI batches to find it: %s", r["id"], e)
    if found:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE provider_batches SET polled_at = now() WHERE id = ANY(:ids)"),
                         {"ids": list(found)})
    for r in rows:
        pb_id = r["id"]
        try:
            if not r["create_attempts"]:
                if r["cancel_requested"]:
                    _abandon(engine, pb_id, "cancelled before it was sent", settings)
                else:
                    _create_at_provider(pb_id, settings, engine, attempts=0)
                continue
            verdict = found.get(pb_id, ("unsure", "the provider could not be asked"))
            if verdict[0] == "found":
                if _record_created(engine, pb_id, verdict[1], settings):
                    log.warning("provider batch %s: adopted %s batch %s, created by an attempt whose answer"
                                " was lost", pb_id, r["provider"], verdict[1]["provider_batch_id"])
            elif verdict[0] == "none" and r["window_closed"]:
                if r["cancel_requested"]:
                    _abandon(engine, pb_id, "cancelled; the provider never created it", settings)
                    log.info("provider batch %s: cancelled, and the provider has no batch for it", pb_id)
                else:
                    log.warning("provider batch %s: the provider has no batch for it %d attempt(s) on; sending"
                                " it again", pb_id, r["create_attempts"])
                    _create_at_provider(pb_id, settings, engine, attempts=r["create_attempts"])
            else:
                log.info("provider batch %s: creation unconfirmed, its lines held at their maximum (%s)", pb_id,
                         verdict[1] if len(verdict) > 1 else "within its creation window")
        except Exception:
            log.exception("provider batch %s: recovery failed; the next tick tries again", pb_id)
    return len(rows)


def carry_out_cancels(*, settings: Settings | None = None, engine=None) -> int:
    """Send the cancels the provider has not confirmed yet (rows ``creating`` wait for
    ``recover_creating``: a batch is cancelled the moment its id is known). Returns those sent."""
    settings = settings or get_settings()
    engine = engine or db.get_engine()
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT id, provider, provider_batch_id FROM provider_batches WHERE status = 'submitted'"
            " AND cancel_requested AND cancel_confirmed_at IS NULL ORDER BY cancel_requested_at")).all()
    for pb_id, provider, pbid in rows:
        job_store.send_cancel(engine, pb_id, provider, pbid, settings)
    return len(rows)


# ------------------------------------------------------------------ poll and ingest

def poll_open(*, settings: Settings | None = None, engine=None, dispatcher=dispatch) -> list[str]:
    """Poll submitted provider batches due for a poll; ingest those that ended. Returns ended ids."""
    settings = settings or get_settings()
    engine = engine or db.get_engine()
    with engine.connect() as conn:
        due = conn.execute(sa.text(
            "SELECT id, provider, provider_batch_id FROM provider_batches WHERE status = 'submitted'"
            " AND (polled_at IS NULL OR polled_at < now() - make_interval(secs => :s)) ORDER BY submitted_at"),
            {"s": settings.provider_batch_poll_s}).all()
    ended = []
    for pb_id, provider, pbid in due:
        try:
            status, done, lines = asyncio.run(batch_api.poll(settings, provider, pbid))
        except Exception as e:
            log.warning("provider batch %s (%s): poll failed, will retry: %s", pb_id, pbid, e)
            continue
        if not done:
            with engine.begin() as conn:
                conn.execute(sa.text(
                    "UPDATE provider_batches SET provider_status = :st, polled_at = now() WHERE id = :id"),
                    {"id": pb_id, "st": status})
            continue
        ingest(pb_id, provider, status, lines, settings=settings, engine=engine, dispatcher=dispatcher)
        ended.append(pb_id)
    return ended


def _outcome(req: dict, provider: str, line: dict, prices) -> tuple[dict | None, dict | None, str | None]:
    """``(outcome, attempt, not_run_reason)`` for one result line."""
    attempt_no = (req["attempts"] or 0) + 1
    base = {"job_id": req["job_id"], "custom_id": req["custom_id"], "model": req["model"],
            "response": None, "error": None, "input_tokens": None, "cached_input_tokens": None,
            "output_tokens": None, "usage_missing": False, "cost_usd": "0", "provider_request_id": None,
            "latency_ms": None, "status_code": None, "attempts": attempt_no}
    attempt = {"job_id": req["job_id"], "custom_id": req["custom_id"], "attempt": attempt_no,
               "status_code": None, "error": None, "latency_ms": None, "provider_request_id": None,
               "cost_usd": "0"}
    if provider == "openai":
        resp, err = line.get("response"), line.get("error")
        if resp is None:
            return None, None, (err or {}).get("code") or "not_run"
        code, body = resp.get("status_code"), resp.get("body") or {}
        base.update(status_code=code, provider_request_id=resp.get("request_id"))
        attempt.update(status_code=code, provider_request_id=resp.get("request_id"))
        raw_usage = body.get("usage") if code == 200 else None
        usage = usage_from_openai(raw_usage) if isinstance(raw_usage, dict) else None
        ok = code == 200
        error = None if ok else (body.get("error") or {"code": "provider_error", "message": f"status {code}"})
    else:
        result = line.get("result") or {}
        kind = result.get("type")
        if kind in ("canceled", "expired"):
            return None, None, kind
        if kind == "succeeded":
            body = result.get("message") or {}
            ok, code, error = True, 200, None
            base.update(provider_request_id=body.get("id"))
            raw_usage = body.get("usage")
            usage = usage_from_anthropic(raw_usage) if isinstance(raw_usage, dict) else None
        else:
            body, ok, usage = None, False, None
            error = (result.get("error") or {}).get("error") or {"type": "errored"}
            code = {"invalid_request_error": 400, "not_found_error": 404, "authentication_error": 401,
                    "permission_error": 403, "overloaded_error": 529}.get(error.get("type"), 500)
        base["status_code"] = attempt["status_code"] = code
    if not ok:
        message = error.get("message") if isinstance(error, dict) else str(error)
        base.update(status="failed", error={"code": "provider_error", "message": message,
                                            "provider_error": error})
        attempt["error"] = (message or "")[:500]
        return base, attempt, None
    spent = cost(prices.resolve(req["model"]), usage, batch=True) if usage else Decimal(0)
    base.update(status="succeeded", response=body, cost_usd=str(spent), usage_missing=usage is None,
                input_tokens=usage.input_tokens if usage else None,
                cached_input_tokens=usage.cached_input_tokens if usage else None,
                output_tokens=usage.output_tokens if usage else None)
    attempt["cost_usd"] = str(spent)
    return base, attempt, None


def ingest(pb_id: str, provider: str, status: str, lines: list[dict], *, settings: Settings, engine,
           dispatcher=dispatch) -> dict:
    prices = get_price_book()
    requeue: list[tuple[str, str]] = []
    with engine.begin() as conn:
        reqs = _pb_requests(conn, pb_id)
        by_pid = {provider_custom_id(r["job_id"], r["custom_id"]): r for r in reqs}
        outcomes, attempts, seen = [], [], set()
        counts = {"succeeded": 0, "failed": 0, "requeued": 0, "cancelled": 0, "unknown_lines": 0}
        for line in lines:
            req = by_pid.get(line.get("custom_id"))
            if req is None:
                counts["unknown_lines"] += 1
                continue
            outcome, attempt, not_run = _outcome(req, provider, line, prices)
            if outcome is not None:
                if req.get("budget_period"):   # its spend is the period of its hold (one period per spend)
                    outcome["budget_period"] = req["budget_period"]
                seen.add(line["custom_id"])
                outcomes.append(outcome)
                attempts.append(attempt)
                counts[outcome["status"]] += 1
            else:
                req["not_run"] = not_run
        outcome_store.write_outcomes(conn, outcomes, attempts)
        # requests the provider never ran (expired, cancelled, batch failed): fallback per job
        cancel, fail = [], []
        for pid, r in by_pid.items():
            if pid in seen or r["status"] in _TERMINAL:
                continue
            reason = r.get("not_run") or f"batch_{status}"
            if r["job_status"] == "cancelled":
                cancel.append(r)
            elif r["batch_fallback"] == "fail":
                fail.append({"job_id": r["job_id"], "custom_id": r["custom_id"], "model": r["model"],
                             "status": "failed", "attempts": r["attempts"] or 0, "cost_usd": "0",
                             "error": {"code": reason, "message": f"the provider batch ended ({status})"
                                                                  f" without running this request"}})
            else:
                requeue.append((r["job_id"], r["custom_id"]))
        if cancel:
            conn.execute(sa.text(
                "UPDATE requests r SET status = 'cancelled', finished_at = now()"
                " FROM jsonb_to_recordset(CAST(:k AS jsonb)) AS x(job_id text, custom_id text)"
                " WHERE r.job_id = x.job_id AND r.custom_id = x.custom_id AND r.status NOT IN"
                " ('succeeded', 'failed', 'cancelled')"),
                {"k": db.dumps([{"job_id": r["job_id"], "custom_id": r["custom_id"]} for r in cancel])})
        outcome_store.write_outcomes(conn, fail, [])
        counts.update(cancelled=len(cancel), failed=counts["failed"] + len(fail), requeued=len(requeue))
        new_batches = _requeue(conn, requeue, reqs) if requeue else []
        conn.execute(sa.text(
            "UPDATE batches SET status = 'done', finished_at = now() WHERE provider_batch = :pb"
            " AND status = 'submitted'"), {"pb": pb_id})
        conn.execute(sa.text(
            "UPDATE provider_batches SET status = 'ended', provider_status = :st, ended_at = now(),"
            " polled_at = now(), counts = CAST(:c AS jsonb) WHERE id = :id"),
            {"id": pb_id, "st": status, "c": db.dumps(counts)})
        job_store.refresh_jobs(conn, {r["job_id"] for r in reqs})
        xid = budget.commit_xid(conn)
        # settled_at stays NULL until the holds are settled: whatever stops that (Redis refusing
        # writes, a scheduler killed right after this commit), settle_unsettled finishes it
        conn.execute(sa.text("UPDATE provider_batches SET settle_xid = :x, settled_at = NULL WHERE id = :id"),
                     {"id": pb_id, "x": xid})
    _settle(pb_id, reqs, outcomes + fail, settings, engine, xid)
    for batch_id, tier, state in new_batches:
        if state == "queued":
            dispatcher(batch_id, tier)
    if new_batches:
        with engine.begin() as conn:
            batch_store.mark_dispatched(conn, [b for b, _, s in new_batches if s == "queued"])
    log.info("provider batch %s (%s) ended %s: %s", pb_id, provider, status, counts)
    return counts


def _settle(pb_id: str, reqs: list[dict], outcomes: list[dict], settings: Settings, engine, xid: str) -> bool:
    """After the results are committed: each hold becomes the request's actual cost (the rest of
    its maximum is freed); holds of requests the provider did not run are released (a re-queued
    request reserves again on its realtime path). True once every hold is settled or released
    (``provider_batches.settled_at``); else ``settle_unsettled`` tries again, next tick."""
    cost_of = {(o["job_id"], o["custom_id"]): Decimal(str(o.get("cost_usd") or 0)) for o in outcomes}
    spent = {request_key(j, c): x for (j, c), x in cost_of.items()}
    others = [request_key(r["job_id"], r["custom_id"]) for r in reqs
              if (r["job_id"], r["custom_id"]) not in cost_of and r["status"] not in _TERMINAL]
    redis = _budget_redis(settings)
    try:
        # a few quick tries: settle_unsettled tries again every tick, so no tick waits long on Redis
        holds.settle_held(engine, redis, settings, spent, xid, attempts=4)
        holds.release_held(redis, others, strict=True)
    except errors.BudgetError as e:   # the results are in the ledger: settled again next tick
        log.warning("provider batch %s: settling %d holds failed (%s); tried again every tick until counted",
                    pb_id, len(spent), e)
        return False
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE provider_batches SET settled_at = now() WHERE id = :id"), {"id": pb_id})
    return True


def settle_unsettled(*, settings: Settings | None = None, engine=None) -> int:
    """Settle the holds of ended provider batches whose settle failed or never ran (the scheduler
    died after the ingest commit). Idempotent: a hold already settled or dropped by a rebuild adds
    nothing, and one the rebuild behind the counters already counted is only released
    (``settle_xid``). Re-queued requests are left alone: their realtime reservation replaces
    their hold under the same id. Returns how many provider batches it settled."""
    settings = settings or get_settings()
    engine = engine or db.get_engine()
    with engine.connect() as conn:
        due = conn.execute(sa.text(
            "SELECT id, settle_xid FROM provider_batches WHERE status = 'ended' AND settled_at IS NULL"
            " ORDER BY ended_at")).all()
    done = 0
    for pb_id, xid in due:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT r.job_id, r.custom_id, r.status, x.cost_usd FROM batches b"
                " JOIN requests r ON r.batch_id = b.batch_id"
                " LEFT JOIN results x ON x.job_id = r.job_id AND x.custom_id = r.custom_id"
                " WHERE b.provider_batch = :pb"), {"pb": pb_id}).mappings().all()
        outcomes = [{"job_id": r["job_id"], "custom_id": r["custom_id"], "cost_usd": r["cost_usd"]}
                    for r in rows if r["cost_usd"] is not None]
        # requests of the batch without a result that no one will reserve again (cancelled)
        reqs = [{"job_id": r["job_id"], "custom_id": r["custom_id"], "status": "running"}
                for r in rows if r["cost_usd"] is None and r["status"] == "cancelled"]
        if _settle(pb_id, reqs, outcomes, settings, engine, xid or ""):
            done += 1
            log.info("provider batch %s: holds settled after the ingest (%d results)", pb_id, len(outcomes))
    return done


def _requeue(conn, keys: list[tuple[str, str]], reqs: list[dict]) -> list[tuple[str, str, str]]:
    """Move requests to new realtime batches (per tier): held tiers wait for release, others dispatch."""
    tiers = {(r["job_id"], r["custom_id"]): r for r in reqs}
    by_tier: dict[str, list] = {}
    for k in keys:
        by_tier.setdefault(tiers[k]["tier"], []).append(k)
    out = []
    model = reqs[0]["model"]   # a provider batch holds one model
    provider = _provider_of(model)
    for tier, ks in by_tier.items():
        batch_id = "b_" + uuid.uuid4().hex
        state = "queued" if tier in DISPATCHED_TIERS else "held"
        conn.execute(sa.text(
            "INSERT INTO batches (batch_id, tier, provider, model, size, status, mode)"
            " VALUES (:b, :t, :p, :m, :n, :s, 'realtime')"),
            {"b": batch_id, "t": tier, "p": provider, "m": model, "n": len(ks), "s": state})
        conn.execute(sa.text(
            "UPDATE requests r SET batch_id = :b, status = :s"
            " FROM jsonb_to_recordset(CAST(:k AS jsonb)) AS x(job_id text, custom_id text)"
            " WHERE r.job_id = x.job_id AND r.custom_id = x.custom_id"),
            {"b": batch_id, "s": state, "k": db.dumps([{"job_id": j, "custom_id": c} for j, c in ks])})
        out.append((batch_id, tier, state))
    log.info("re-queued %d requests the provider batch did not run to realtime batches %s",
             len(keys), [b for b, _, _ in out])
    return out


def _provider_of(model: str) -> str:
    return get_price_book().resolve(model).provider
