"""Upkeep the scheduler runs every ``upkeep_every_s``.

- **Retention**: request bodies (``requests.body``, ``metadata``) and response
  bodies (``results.response``, ``error``, and embedding vectors) of requests finished more than
  ``retention_days`` ago (on the scheduler's clock) are set to NULL and marked
  ``purged_at``. Costs, token counts, statuses and attempts stay, so every
  cost and count query gives the same answer after a purge. Done in chunks,
  so no statement holds many row locks for long.
- **Stuck batches**: batches ``queued`` but never dispatched, or ``running``
  with an expired lease (``batches.undispatched_batches``, the batcher's sweep), and
  batches ``dispatched`` longer than ``stuck_dispatched_s`` with no worker
  taking them (their Celery message was lost, e.g. Redis flushed) are
  dispatched again. A second message for a batch is harmless: ``claim_batch``
  lets one worker take it.
- **Budget periods**: daily caps roll over by day key in ``pipeline.money.caps``;
  batches deferred to the next period are resumed by its
  ``resume_due_batches`` hook, called here as well as from the batcher's sweep.
  Alerts at 80 % / 100 % are raised by ``pipeline.money.admin`` when spend is
  settled, not here.
- **Abandoned submits** (``close_abandoned_submits``): a job still
  ``submitting`` whose submit process is gone (same host, pid not alive) or
  has recorded no progress for ``SUBMIT_STALE_S`` is closed with what it
  published: its line count, the requests that reached Postgres as accepted,
  its rejections. Then it runs and completes like any other job.
- **Budget reconcile** (every ``budget_reconcile_every_s``, its own job in
  schedules/service.py): the Redis counters are compared with the Postgres
  ledger and rebuilt from it when they drifted (a settlement lost with its
  process, Redis restarted from an old file); the drift found is the metric
  ``llmbatch_budget_drift_usd``. Before it, calls still on record as sent
  for longer than any call can run (their worker died and nobody took their
  batch back) become unconfirmed spend (pipeline/money/calls.py).
"""

from __future__ import annotations

import logging
from datetime import timedelta

import sqlalchemy as sa

from pipeline.paths.registry import scheduler_paths
from pipeline.config import Settings, get_settings
from pipeline.intake.batcher import dispatch
from pipeline.stores import batches, db, jobs
from schedules.clock import Clock, get_clock

log = logging.getLogger(__name__)

PURGE_CHUNK = 5000


def purge_bodies(*, settings: Settings | None = None, engine=None, clock: Clock | None = None) -> dict:
    """Null request/response bodies past retention; returns rows purged per table."""
    settings = settings or get_settings()
    engine = engine or db.get_engine()
    if settings.retention_days <= 0:
        return {"requests": 0, "results": 0}
    cutoff = (clock or get_clock(settings, engine)).now() - timedelta(days=settings.retention_days)
    purged = {"requests": 0, "results": 0}
    while True:
        with engine.begin() as conn:
            keys = conn.execute(sa.text(
                "SELECT job_id, custom_id FROM requests WHERE purged_at IS NULL AND finished_at < :cut"
                " AND status = ANY(llmbatch_states('request_terminal')) LIMIT :n FOR UPDATE SKIP LOCKED"),
                {"cut": cutoff, "n": PURGE_CHUNK}).all()
            if not keys:
                break
            rows = db.dumps([{"job_id": j, "custom_id": c} for j, c in keys])
            purged["requests"] += conn.execute(sa.text(
                "UPDATE requests r SET body = NULL, metadata = NULL, purged_at = now()"
                " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(job_id text, custom_id text)"
                " WHERE r.job_id = x.job_id AND r.custom_id = x.custom_id"), {"rows": rows}).rowcount
            conn.execute(sa.text(   # an answer's vectors are its body too
                "DELETE FROM embeddings e USING jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(job_id text,"
                " custom_id text) WHERE e.job_id = x.job_id AND e.custom_id = x.custom_id"), {"rows": rows})
            purged["results"] += conn.execute(sa.text(
                "UPDATE results r SET response = NULL, error = NULL, purged_at = now()"
                " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(job_id text, custom_id text)"
                " WHERE r.job_id = x.job_id AND r.custom_id = x.custom_id AND r.purged_at IS NULL"),
                {"rows": rows}).rowcount
        if len(keys) < PURGE_CHUNK:
            break
    if purged["requests"]:
        log.info("retention: purged bodies of %d requests and %d results finished before %s",
                 purged["requests"], purged["results"], cutoff.isoformat())
    return purged


def redispatch_stuck(*, settings: Settings | None = None, engine=None, dispatcher=dispatch) -> list[str]:
    settings = settings or get_settings()
    engine = engine or db.get_engine()
    with engine.begin() as conn:
        stuck = list(batches.undispatched_batches(conn, settings.sweep_after_s))
        stuck += conn.execute(sa.text(
            "SELECT batch_id, tier FROM batches WHERE status = 'dispatched'"
            " AND dispatched_at < now() - make_interval(secs => :s) ORDER BY dispatched_at LIMIT 1000"),
            {"s": settings.stuck_dispatched_s}).all()
    for batch_id, tier in stuck:
        log.warning("upkeep: batch %s (%s) stuck, dispatching it again", batch_id, tier)
        dispatcher(batch_id, tier)
    if stuck:
        with engine.begin() as conn:
            batches.mark_dispatched(conn, [b for b, _ in stuck])
            # mark_dispatched only moves 'queued'; a re-sent 'dispatched' batch restarts its timeout
            conn.execute(sa.text(
                "UPDATE batches SET dispatched_at = now() WHERE batch_id = ANY(:ids) AND status = 'dispatched'"),
                {"ids": [b for b, _ in stuck]})
    return [b for b, _ in stuck]


def budget_rollover(*, engine=None, dispatcher=dispatch) -> int:
    try:
        from pipeline.money.deferral import resume_due_batches
    except ImportError:   # pragma: no cover - budgets not installed
        return 0
    return resume_due_batches(engine or db.get_engine(), dispatcher, scheduler_paths())


#: a submit records progress every couple of seconds (pipeline/intake/producer.py); this much silence means it died
SUBMIT_STALE_S = 120.0
#: a job with every request finished but lines missing is ended after this long with nothing new
SHORT_JOB_QUIET_S = 600.0
#: a submit whose process is gone is closed once its last progress is this old (the batcher has caught up)
SUBMIT_GONE_GRACE_S = 10.0


def _process_gone(host: str | None, pid: int | None) -> bool:
    """True only when the submit ran on this host and its pid is not alive."""
    import os
    import socket
    if not pid or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def close_abandoned_submits(*, engine=None, stale_s: float = SUBMIT_STALE_S) -> list[str]:
    """Close jobs left ``submitting`` by a submit that died; returns their ids."""
    engine = engine or db.get_engine()
    with engine.connect() as conn:
        candidates = conn.execute(sa.text(
            "SELECT job_id, submit_host, submit_pid,"
            " coalesce(submit_progress_at, created_at) < now() - make_interval(secs => :s) AS stale,"
            # what the dead submit published may still be on its way through the batcher
            " coalesce(submit_progress_at, created_at) < now() - make_interval(secs => :grace) AS settled"
            " FROM jobs WHERE status = 'submitting'"), {"s": stale_s, "grace": SUBMIT_GONE_GRACE_S}).all()
    dead = [j for j, host, pid, stale, settled in candidates if stale or (settled and _process_gone(host, pid))]
    closed = []
    for job_id in dead:
        with engine.begin() as conn:
            row = conn.execute(sa.text(
                "UPDATE jobs j SET status = 'running', submitted_at = now(),"
                " accepted = (SELECT count(*) FROM requests r WHERE r.job_id = j.job_id),"
                " rejected = (SELECT count(*) FROM rejections x WHERE x.job_id = j.job_id),"
                " lines_read = greatest(coalesce(j.lines_read, 0),"
                "   (SELECT count(*) FROM requests r WHERE r.job_id = j.job_id)"
                "   + (SELECT count(*) FROM rejections x WHERE x.job_id = j.job_id))"
                " WHERE j.job_id = :j AND j.status = 'submitting'"
                " RETURNING lines_read, accepted, rejected"), {"j": job_id}).first()
            if row is None:
                continue
            if row.accepted == 0:
                conn.execute(sa.text("UPDATE jobs SET status = 'failed', finished_at = now() WHERE job_id = :j"),
                             {"j": job_id})
            else:
                jobs.refresh_jobs(conn, [job_id])
        log.warning("upkeep: job %s was left submitting by a submit that is gone: closed with %d lines, "
                    "%d accepted, %d rejected", job_id, row.lines_read, row.accepted, row.rejected,
                    extra={"job": job_id})
        closed.append(job_id)
    return closed
def budget_reconcile(*, settings: Settings | None = None, engine=None) -> dict:
    """Redis counters against the ledger (``pipeline.money.ledger.reconcile``); the caps mirrored from Postgres."""
    from pipeline.money import calls, caps, ledger
    settings = settings or get_settings()
    redis = _budget_redis(settings)
    engine = engine or db.get_engine()
    # calls on record as sent for longer than any call can run, whose batch nobody took back: spent
    with engine.begin() as conn:
        stale, xid = calls.unconfirm_stale(conn, caps.reservation_ttl_s(settings))
    if stale:
        log.warning("upkeep: %d calls sent by workers that stopped mid-call counted as unconfirmed spend",
                    len(stale))
        calls.settle_sync(redis, stale, xid)
    out = ledger.reconcile(engine, redis, settings)
    if out["rebuilt"]:
        log.warning("upkeep: budget counters rebuilt (%s)", out.get("reason"))
    return out


_redis_by_url: dict = {}


def _budget_redis(settings: Settings):
    from pipeline.money import scripts
    r = _redis_by_url.get(settings.redis_url)
    if r is None:
        r = _redis_by_url[settings.redis_url] = scripts.redis_clients(settings)[1]
    return r


def close_short_jobs(*, engine=None, quiet_s: float = SHORT_JOB_QUIET_S) -> list[str]:
    """End jobs that wait for lines which will never come; returns their ids.

    The producer counts a line accepted once Kafka has it; the batcher may still
    refuse its message (to llm.requests.dlq: a field the schema forbids, a bad
    date, a model the batcher's price book lacks). Such a job has every request
    terminal and fewer requests than accepted lines. Once it has been quiet for
    ``quiet_s`` (no new request row, long after its submit finished) the missing
    lines are counted in ``jobs.refused`` and the job ends (``completed_with_errors``
    or ``failed``, never ``completed``). The quiet time is far above a healthy
    batcher's lag, so a batcher catching up after an outage is not mistaken for it.
    """
    engine = engine or db.get_engine()
    with engine.begin() as conn:
        rows = conn.execute(sa.text(
            "WITH c AS (SELECT j.job_id, count(r.custom_id) AS n, max(r.created_at) AS last,"
            "   count(r.custom_id) FILTER (WHERE r.status <> ALL(llmbatch_states('request_terminal'))) AS open"
            "   FROM jobs j LEFT JOIN requests r ON r.job_id = j.job_id"
            "   WHERE j.status = 'running' AND coalesce(j.submitted_at, j.created_at)"
            "         < now() - make_interval(secs => :q)"
            "   GROUP BY j.job_id)"
            " UPDATE jobs j SET refused = j.accepted - c.n FROM c"
            " WHERE j.job_id = c.job_id AND j.status = 'running' AND c.open = 0 AND c.n + j.refused < j.accepted"
            " AND coalesce(c.last, j.created_at) < now() - make_interval(secs => :q)"
            " RETURNING j.job_id, j.refused"), {"q": quiet_s}).all()
        jobs.refresh_jobs(conn, [j for j, _ in rows])
    for job_id, refused in rows:
        log.warning("upkeep: job %s waited %d s for %d accepted lines that never became requests"
                    " (refused by the batcher: see llm.requests.dlq); ended without them",
                    job_id, quiet_s, refused, extra={"job": job_id})
    return [j for j, _ in rows]


def run_upkeep(*, settings: Settings | None = None, engine=None, clock: Clock | None = None,
               dispatcher=dispatch) -> dict:
    out = {"purged": purge_bodies(settings=settings, engine=engine, clock=clock),
           "redispatched": len(redispatch_stuck(settings=settings, engine=engine, dispatcher=dispatcher)),
           "budget_resumed": budget_rollover(engine=engine, dispatcher=dispatcher),
           "submits_closed": len(close_abandoned_submits(engine=engine)),
           "short_jobs_closed": len(close_short_jobs(engine=engine))}
    return out

