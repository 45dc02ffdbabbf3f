"""Batches written straight into Postgres and run in this process (``workers.execute.run_batch``),
against the real Postgres, Redis and simulator of the local stack."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import urllib.parse
import urllib.request
import uuid

import sqlalchemy as sa

from pipeline.money import budget
from pipeline.stores import db
from tests.integration.conftest import simulator_call


#: one event loop for every in-process batch of the test session, as a worker process has one:
#: its SDK clients (one per process, pipeline/providers) live on it
LOOP = asyncio.new_event_loop()


#: the tier of the tests' hand-made batches. Not off-peak: while the off-peak window is closed the
#: scheduler holds every 'queued' off-peak batch again at each tick (schedules/service.py), and a
#: test's batch made there could be taken from under it before the test claims it (CI run 8 of
#: session 7: run_batch found the batch 'held' and returned "skipped"). Nothing of the live stack
#: moves a 'queued' background batch but the sweep, after ``sweep_after_s``.
TEST_TIER = "background"


def make_batch(engine, n: int, *, tier: str = TEST_TIER, model: str = "gpt-4o-mini", overrides=None,
               batch_status: str = "queued") -> tuple[str, str]:
    """A job with one batch of ``n`` requests ``r0``..; ``overrides``: custom_id -> column values.

    The batch is 'queued' (the sweep dispatches queued batches only after ``sweep_after_s``, long
    after the test has claimed it; no stack worker chains into a batch that is not 'dispatched')
    in ``TEST_TIER``.
    """
    job, batch = f"exec-{uuid.uuid4().hex[:10]}", f"b-{uuid.uuid4().hex[:12]}"
    overrides = overrides or {}
    rows = []
    for i in range(n):
        cid = f"r{i}"
        row = {"job_id": job, "custom_id": cid, "line": i + 1, "batch_id": batch, "provider": "openai",
               "model": model, "tier": tier, "tier_reason": "test", "priority": 3,
               "body": {"model": model, "max_tokens": 16,
                        "messages": [{"role": "user", "content": f"execution test {job} {i}"}]},
               "input_tokens": 20, "max_cost_usd": "0.0001", "status": "queued"}
        row.update(overrides.get(cid, {}))
        rows.append(row)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO jobs (job_id, status, accepted, lines_read) VALUES (:j, 'running', :n, :n)"),
                     {"j": job, "n": n})
        conn.execute(sa.text("INSERT INTO batches (batch_id, tier, provider, model, size, status)"
                             " VALUES (:b, :t, 'openai', :m, :n, :s)"),
                     {"b": batch, "t": tier, "m": model, "n": n, "s": batch_status})
        insert_requests(conn, rows)
    return job, batch


def insert_requests(conn, rows: list[dict]) -> None:
    """Request rows as the batcher writes them, in one statement (each row a dict of the columns)."""
    conn.execute(sa.text(
        "INSERT INTO requests (job_id, custom_id, line, batch_id, provider, model, tier, tier_reason, priority,"
        " body, input_tokens, max_cost_usd, status)"
        " SELECT x.job_id, x.custom_id, x.line, x.batch_id, x.provider, x.model, x.tier, x.tier_reason,"
        " x.priority, x.body, x.input_tokens, CAST(x.max_cost_usd AS numeric), x.status"
        " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(job_id text, custom_id text, line int,"
        " batch_id text, provider text, model text, tier text, tier_reason text, priority smallint,"
        " body jsonb, input_tokens int, max_cost_usd text, status text)"), {"rows": json.dumps(rows)})


def requests_of(engine, job: str) -> dict[str, dict]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT q.custom_id, q.status, r.error, r.response IS NOT NULL AS answered"
            " FROM requests q LEFT JOIN results r USING (job_id, custom_id) WHERE q.job_id = :j"),
            {"j": job}).mappings().all()
    return {r["custom_id"]: dict(r) for r in rows}


def scalar(engine, sql: str, **params):
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar()


def sim_stats(settings) -> dict:
    return json.load(urllib.request.urlopen(f"{settings.simulator_url}/_stats", timeout=10))


def calls_of(settings, job: str) -> int:
    """Provider calls the simulator received for ``job`` (its idempotency keys are ``job:<hash of custom_id>``):
    the stack's own workers may be running other tests' work at the same time."""
    url = f"{settings.simulator_url}/_stats?" + urllib.parse.urlencode({"key_prefix": f"{job}:"})
    return json.load(urllib.request.urlopen(url, timeout=10))["keys"]["calls"]


def keys_seen(settings, job: str) -> dict[str, int]:
    """Idempotency keys of ``job`` the simulator saw more than once (key -> extra sightings)."""
    return {k: v for k, v in sim_stats(settings)["duplicate_keys"].items() if k.startswith(f"{job}:")}


@contextlib.contextmanager
def simulator_config(settings, **changes):
    def call(method, body=None):
        return simulator_call(f"{settings.simulator_url}/_config", method, body)
    call("POST", changes)
    try:
        yield
    finally:
        call("DELETE")


def engine_for_tests():
    return db.get_engine()


def budget_settings(settings, **changes):
    """The budget's keys in Redis database 15, of their own: the stack's workers never see them."""
    url = settings.redis_url.rsplit("/", 1)[0] + "/15"
    return dataclasses.replace(settings, redis_url=url, **changes)


def commit_result(engine, job: str, cid: str, spent) -> str:
    """What the OutcomeWriter does before settling: the result row and the request's new status in
    one transaction. Returns that transaction's id, for the settle (``budget.commit_xid``)."""
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO results (job_id, custom_id, model, cost_usd) VALUES (:j, :c, 'gpt-4o-mini', :x)"),
            {"j": job, "c": cid, "x": spent})
        conn.execute(sa.text("UPDATE requests SET status = 'succeeded' WHERE job_id = :j AND custom_id = :c"),
                     {"j": job, "c": cid})
        return budget.commit_xid(conn)


def insert_job(engine, cap, n: int, amount, prefix: str = "job_caps_") -> tuple[str, list[str]]:
    """A running job capped at ``cap`` (None: no cap) with ``n`` queued background requests
    ``r0``.. of ``amount`` each, written straight into Postgres (no batch yet)."""
    job = prefix + uuid.uuid4().hex[:10]
    ids = [f"r{i}" for i in range(n)]
    rows = [{"job_id": job, "custom_id": c, "provider": "openai", "model": "gpt-4o-mini", "tier": "background",
             "tier_reason": "test", "priority": 0, "input_tokens": 1, "max_cost_usd": str(amount),
             "status": "queued"} for c in ids]
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO jobs (job_id, status, budget_usd, accepted) VALUES (:j, 'running', :c, :n)"),
                     {"j": job, "c": cap, "n": n})
        conn.execute(sa.text(
            "INSERT INTO requests (job_id, custom_id, provider, model, tier, tier_reason, priority, input_tokens,"
            " max_cost_usd, status) SELECT x.* FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(job_id text,"
            " custom_id text, provider text, model text, tier text, tier_reason text, priority smallint,"
            " input_tokens int, max_cost_usd numeric, status text)"), {"rows": json.dumps(rows)})
    return job, ids
