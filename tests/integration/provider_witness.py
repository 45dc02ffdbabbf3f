"""The provider's side of a provider batch, read from the simulator as a provider's bill would be.

``provider_lines`` lists the simulator's batches (OpenAI and Anthropic) created since a moment,
reads the results of those that ended, and counts, per provider custom_id, how many times the
provider ran and billed it. Tests compare that with the ledger (``results``): a line billed twice,
or billed and missing from the ledger, is money the caps never saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.parse
import urllib.request
import uuid
from datetime import datetime

import sqlalchemy as sa

from pipeline.paths.provider_batch import provider_custom_id
from pipeline.request import Request
from tests.integration.execution_helpers import insert_requests

ANTHROPIC_MODEL = "claude-3-5-haiku-latest"
OPENAI_MODEL = "gpt-4o-mini"
MODEL = {"openai": OPENAI_MODEL, "anthropic": ANTHROPIC_MODEL}
OPENAI_ENDED = ("completed", "failed", "expired", "cancelled")


def _get(settings, path: str, **query) -> bytes:
    url = f"{settings.simulator_url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    return urllib.request.urlopen(url, timeout=10).read()


def _ts(value) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _listing(settings, provider: str, since: float) -> list[dict]:
    """Batches created at or after ``since`` (unix time), newest first."""
    path, after_key = ("/v1/batches", "after") if provider == "openai" else ("/v1/messages/batches", "after_id")
    out, after = [], None
    while True:
        page = json.loads(_get(settings, path, limit=100, **({after_key: after} if after else {})))
        for b in page["data"]:
            if _ts(b["created_at"]) < since - 1:
                return out
            out.append(b)
        if not page["has_more"]:
            return out
        after = page["last_id"]


def _ended(provider: str, b: dict) -> bool:
    return b["status"] in OPENAI_ENDED if provider == "openai" else b["processing_status"] == "ended"


def _results(settings, provider: str, b: dict) -> list[tuple[str, bool]]:
    """``(custom_id, billed)`` for every result line of an ended batch."""
    if provider == "openai":
        lines = []
        for fid in (b.get("output_file_id"), b.get("error_file_id")):
            if fid:
                lines += [json.loads(x) for x in _get(settings, f"/v1/files/{fid}/content").splitlines() if x.strip()]
        return [(x["custom_id"], (x.get("response") or {}).get("status_code") == 200) for x in lines]
    lines = [json.loads(x) for x in _get(settings, f"/v1/messages/batches/{b['id']}/results").splitlines()
             if x.strip()]
    return [(x["custom_id"], x["result"]["type"] == "succeeded") for x in lines]


def provider_lines(settings, provider: str, pids: set[str], since: float, *, timeout: float = 90) -> dict:
    """What the provider ran and billed of ``pids``: waits until every batch created since ``since``
    ended. ``{"batches": [batch ids holding any of pids], "billed": {pid: times billed}}``."""
    deadline = time.monotonic() + timeout
    while True:
        listed = _listing(settings, provider, since)
        if all(_ended(provider, b) for b in listed):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"provider batches still open after {timeout} s: "
                                 f"{[b['id'] for b in listed if not _ended(provider, b)]}")
        time.sleep(0.3)
    batches, billed = [], {}
    for b in listed:
        mine = [(pid, paid) for pid, paid in _results(settings, provider, b) if pid in pids]
        if mine:
            batches.append(b["id"])
        for pid, paid in mine:
            if paid:
                billed[pid] = billed.get(pid, 0) + 1
    return {"batches": batches, "billed": billed}


def provider_counts(settings, provider: str, since: float) -> dict[str, int]:
    """Lines each batch created since ``since`` has run so far (succeeded or errored), by batch id."""
    out = {}
    for b in _listing(settings, provider, since):
        c = b["request_counts"]
        out[b["id"]] = c["completed"] + c["failed"] if provider == "openai" else c["succeeded"] + c["errored"]
    return out


def pids_of(job: str, n: int, prefix: str = "r") -> set[str]:
    return {provider_custom_id(Request.probe(job, f"{prefix}{i}", "openai", {}, "provider_batch")) for i in range(n)}


def ledger_lines(engine, job: str) -> int:
    """Lines of ``job`` the ledger holds as answered and billed."""
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT count(*) FROM results WHERE job_id = :j AND status_code = 200"), {"j": job}).scalar()


def counts(engine, job: str) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM requests WHERE job_id = :j GROUP BY status"), {"j": job}).all())


def held_job(engine, provider: str, n: int, *, tag: str = "pbx") -> str:
    """A running provider-batch job with one held batch of ``n`` requests ``r0``.., written straight
    into Postgres as the batcher writes it (no Kafka round trip: the kill matrix runs 30 of them)."""
    job, batch = f"{tag}-{uuid.uuid4().hex[:10]}", f"b-{uuid.uuid4().hex[:12]}"
    model = MODEL[provider]
    rows = [{"job_id": job, "custom_id": f"r{i}", "line": i + 1, "batch_id": batch, "provider": provider,
             "model": model, "tier": "background", "tier_reason": "test", "priority": 0,
             "body": {"model": model, "max_tokens": 16,
                      "messages": [{"role": "user", "content": f"provider batch test {job} {i}"}]},
             "input_tokens": 20, "max_cost_usd": "0.0001", "status": "held"} for i in range(n)]
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO jobs (job_id, status, mode, accepted, lines_read)"
                             " VALUES (:j, 'running', 'provider_batch', :n, :n)"), {"j": job, "n": n})
        conn.execute(sa.text("INSERT INTO batches (batch_id, tier, provider, model, size, status, mode)"
                             " VALUES (:b, 'background', :p, :m, :n, 'held', 'provider_batch')"),
                     {"b": batch, "p": provider, "m": model, "n": n})
        insert_requests(conn, rows)
    return job


def pb_rows(engine, job: str) -> list[dict]:
    """The provider_batches rows holding ``job``'s requests."""
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(
            "SELECT DISTINCT pb.* FROM provider_batches pb JOIN batches b ON b.provider_batch = pb.id"
            " JOIN requests r ON r.batch_id = b.batch_id WHERE r.job_id = :j"), {"j": job}).mappings()]


@contextlib.contextmanager
def paused(pid: int):
    """The process stopped (SIGSTOP) as a hung provider or scheduler would be; resumed on exit."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def stack_pid(settings, name: str) -> int:
    return int((settings.var_dir / "run" / f"{name}.pid").read_text().strip())


def bytes_waiting(settings) -> int:
    """Bytes received by the kernel for the simulator's connections and not yet read by it: while
    the simulator is stopped, a request sent to it (a creation) waits there."""
    port = urllib.parse.urlsplit(settings.simulator_url).port
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "01":   # ESTABLISHED, server side
                total += int(f[4].split(":")[1], 16)
    return total
