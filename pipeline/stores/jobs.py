"""Jobs in Postgres: their rows, rejected lines, their end, their status, and what an operator
does to one (``cancel_job``, ``set_batch_fallback``).

Functions take a connection so callers compose transactions; ``cancel_job`` and
``set_batch_fallback`` open their own. Lock order (pipeline/stores/batches.py): a job's
batches, then its requests, then the job. ``cancel_job`` asks the provider to cancel a
submitted provider batch through pipeline/providers/batch_api.py, never inside a transaction.
"""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.config import Settings, get_settings
from pipeline.providers import batch_api
from pipeline.stores.db import dumps, get_engine, retrying

log = logging.getLogger(__name__)


def create_job(conn: Connection, job_id: str, *, name: str | None, source: str | None,
               priority: int | None, tier: str | None, budget_usd: Decimal | None,
               on_budget: str, mode: str, simulated: bool, fallback_model: str | None = None,
               producer: str | None = None, project: str | None = None) -> None:
    """A job row; ``producer`` is the Kafka user whose messages it takes (sql/013_job_producer.sql),
    ``project`` the API project whose cap it counts against (sql/030_api.sql)."""
    conn.execute(sa.text(
        "INSERT INTO jobs (job_id, name, source, priority, tier, budget_usd, on_budget, mode, simulated,"
        " fallback_model, producer, project_id)"
        " VALUES (:job_id, :name, :source, :priority, :tier, :budget_usd, :on_budget, :mode, :simulated,"
        " :fallback_model, :producer, :project) ON CONFLICT (job_id) DO NOTHING"),
        dict(job_id=job_id, name=name, source=source, priority=priority, tier=tier,
             budget_usd=budget_usd, on_budget=on_budget, mode=mode, simulated=simulated,
             fallback_model=fallback_model, producer=producer, project=project))


def record_rejections(conn: Connection, job_id: str, rejections: list[dict]) -> None:
    """Store rejected lines (``line``, ``custom_id``, ``reason``); idempotent."""
    if not rejections:
        return
    conn.execute(sa.text(
        "INSERT INTO rejections (job_id, line, custom_id, reason)"
        " SELECT :job_id, x.line, x.custom_id, x.reason"
        " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(line int, custom_id text, reason text)"
        " ON CONFLICT DO NOTHING"), {"job_id": job_id, "rows": dumps(rejections)})


def list_rejections(conn: Connection, job_id: str, *, limit: int | None = None) -> list[dict]:
    """Rejected lines of a job in line order (``llmbatch rejections``, the jobs page)."""
    rows = conn.execute(sa.text(
        "SELECT line, custom_id, reason, created_at FROM rejections WHERE job_id = :j"
        " ORDER BY line NULLS LAST LIMIT :n"), {"j": job_id, "n": limit}).mappings().all()
    return [dict(r) for r in rows]


def finish_submit(conn: Connection, job_id: str, *, lines_read: int, accepted: int, rejected: int) -> None:
    """Submit is over: the job's counts are final and it can complete."""
    conn.execute(sa.text(
        "UPDATE jobs SET lines_read = :lines_read, accepted = :accepted, rejected = :rejected,"
        " status = CASE WHEN status = 'submitting' THEN 'running' ELSE status END,"
        " submitted_at = now() WHERE job_id = :job_id"),
        dict(job_id=job_id, lines_read=lines_read, accepted=accepted, rejected=rejected))
    refresh_jobs(conn, [job_id])


def refresh_jobs(conn: Connection, job_ids) -> None:
    """End running jobs once every accepted request is terminal, with their outcome:

    * ``completed``: every request succeeded (and, if lines were rejected, at least one ran),
      and no accepted line was refused by the batcher (``jobs.refused``, schedules/upkeep.py);
    * ``failed``: none succeeded;
    * ``completed_with_errors``: some succeeded, some failed or were cancelled.

    Cheap when work remains: the partial index on open requests answers the
    NOT EXISTS; the counts run only when nothing is open.
    """
    ids = sorted(set(job_ids))
    if not ids:
        return
    completed = conn.execute(sa.text(
        "WITH ended AS (SELECT j.job_id FROM jobs j WHERE j.job_id = ANY(:ids) AND j.status = 'running'"
        "   AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.job_id = j.job_id"
        "                   AND r.status <> ALL(llmbatch_states('request_terminal')))),"
        " c AS (SELECT r.job_id, count(*) AS n, count(*) FILTER (WHERE r.status = 'succeeded') AS ok,"
        "   count(*) FILTER (WHERE r.status <> 'succeeded') AS bad"
        "   FROM requests r WHERE r.job_id IN (SELECT job_id FROM ended) GROUP BY r.job_id)"
        " UPDATE jobs j SET finished_at = now(), status = CASE"
        "   WHEN coalesce(c.bad, 0) = 0 AND j.refused = 0 AND (coalesce(c.ok, 0) > 0 OR j.rejected = 0)"
        "     THEN 'completed'"
        "   WHEN coalesce(c.ok, 0) = 0 THEN 'failed' ELSE 'completed_with_errors' END"
        " FROM ended e LEFT JOIN c ON c.job_id = e.job_id"
        " WHERE j.job_id = e.job_id AND j.status = 'running' AND coalesce(c.n, 0) + j.refused >= j.accepted"
        " RETURNING j.job_id"), {"ids": ids}).scalars().all()
    if completed:
        # A worker killed after its last result but before closing its batch leaves the
        # batch 'running' until its lease runs out; with nothing open in it, close it now.
        # SKIP LOCKED: a batch another transaction holds is theirs to close (lock order: pipeline/stores/batches.py).
        conn.execute(sa.text(
            "UPDATE batches b SET status = 'done', finished_at = now(), lease_until = NULL"
            " WHERE b.batch_id IN (SELECT x.batch_id FROM batches x WHERE x.batch_id IN"
            "   (SELECT DISTINCT batch_id FROM requests WHERE job_id = ANY(:ids))"
            "   AND x.status = ANY(llmbatch_states('batch_worker'))"
            "   FOR UPDATE SKIP LOCKED)"
            " AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.batch_id = b.batch_id"
            "                 AND r.status <> ALL(llmbatch_states('request_terminal')))"), {"ids": completed})
    # stopped by its own cap: nothing left but requests deferred by it (pipeline/money/deferral.py);
    # ``budget set --job`` puts it back to running
    conn.execute(sa.text(
        "UPDATE jobs j SET status = 'paused_budget'"
        " WHERE j.job_id = ANY(:ids) AND j.status = 'running'"
        " AND EXISTS (SELECT 1 FROM requests r WHERE r.job_id = j.job_id AND r.status = 'deferred'"
        "             AND r.deferred_scope = 'job')"
        " AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.job_id = j.job_id"
        "                 AND r.status <> ALL(llmbatch_states('request_terminal')) AND r.status <> 'deferred')"
        " AND (SELECT count(*) FROM requests r WHERE r.job_id = j.job_id) + j.refused >= j.accepted"),
        {"ids": ids})


def job_status(conn: Connection, job_id: str) -> dict | None:
    """The object ``status --json`` prints."""
    row = conn.execute(sa.text(
        "SELECT job_id, status, simulated, lines_read, accepted, rejected,"
        " succeeded, failed, cancelled, pending, cost_usd, created_at, finished_at, refused"
        " FROM job_summary WHERE job_id = :j"), {"j": job_id}).mappings().first()
    if row is None:
        return None
    tiers = dict(conn.execute(sa.text(
        "SELECT tier, count(*) FROM requests WHERE job_id = :j GROUP BY tier"), {"j": job_id}).all())
    cached, saved = conn.execute(sa.text(
        "SELECT count(*), coalesce(sum(saved_usd), 0) FROM results WHERE job_id = :j AND from_cache"),
        {"j": job_id}).one()
    savings = job_savings(conn, job_id)
    cap, on_budget, fallback, deferred = conn.execute(sa.text(
        "SELECT budget_usd, on_budget, fallback_model, (SELECT count(*) FROM requests r"
        " WHERE r.job_id = j.job_id AND r.status = 'deferred') FROM jobs j WHERE job_id = :j"),
        {"j": job_id}).one()
    # calls that got no answer and may have been billed: spent at their maximum, apart from cost_usd
    unconfirmed_calls, unconfirmed = conn.execute(sa.text(
        "SELECT count(*), coalesce(sum(max_cost_usd), 0) FROM provider_calls"
        " WHERE job_id = :j AND state = 'unconfirmed'"), {"j": job_id}).one()
    by_fallback = conn.execute(sa.text(
        "SELECT count(*) FROM results x JOIN requests r USING (job_id, custom_id)"
        " WHERE x.job_id = :j AND x.model <> r.model"), {"j": job_id}).scalar() if fallback else 0
    return {
        "job_id": row["job_id"],
        "status": row["status"],
        "provider": "simulator" if row["simulated"] else "live",
        "counts": {
            "total": row["lines_read"], "accepted": row["accepted"], "rejected": row["rejected"],
            "succeeded": row["succeeded"], "failed": row["failed"], "cancelled": row["cancelled"],
            "pending": row["pending"], "cached": cached,
            # accepted lines whose messages the batcher refused (llm.requests.dlq)
            "refused": row["refused"],
        },
        "tiers": tiers,
        "cost_usd": str(row["cost_usd"]),
        "unconfirmed_usd": str(unconfirmed), "unconfirmed_calls": unconfirmed_calls,
        "cache_saved_usd": str(saved),
        # the savings ledger (pipeline/money/savings.py): spent against list price, by lever
        "savings": savings,
        # deferred requests are also counted in pending (pipeline/money/deferral.py)
        "budget": {"cap_usd": str(cap) if cap is not None else None, "on_budget": on_budget,
                   "deferred": deferred, "fallback_model": fallback, "answered_by_fallback": by_fallback},
        "created_at": row["created_at"].isoformat(),
        "finished_at": row["finished_at"].isoformat() if row["finished_at"] else None,
    }


def tier_breakdown(conn: Connection, job_id: str) -> tuple[dict[str, dict[str, int]], dict[str, Decimal]]:
    """A job's requests per tier and state (``{tier: {state: n}}``) and its spend per tier."""
    states: dict[str, dict[str, int]] = {}
    for tier, status, n in conn.execute(sa.text(
            "SELECT tier, status, count(*) FROM requests WHERE job_id = :j GROUP BY 1, 2"), {"j": job_id}):
        states.setdefault(tier, {})[status] = n
    cost = dict(conn.execute(sa.text(
        "SELECT q.tier, sum(x.cost_usd) FROM results x JOIN requests q USING (job_id, custom_id)"
        " WHERE x.job_id = :j GROUP BY 1"), {"j": job_id}).all())
    return states, cost


def job_savings(conn: Connection, job_id: str) -> dict:
    """The job's list price (its usage realtime, no cache), what it spent, and what each lever
    saved (``results.savings``, sql/029_savings.sql), as exact decimal strings."""
    listed, spent = conn.execute(sa.text(
        "SELECT coalesce(sum(coalesce(list_cost_usd, cost_usd)), 0), coalesce(sum(cost_usd), 0)"
        " FROM results WHERE job_id = :j"), {"j": job_id}).one()
    by_lever = dict(conn.execute(sa.text(
        "SELECT s.lever, sum(s.usd::numeric) FROM results x, jsonb_each_text(x.savings) AS s(lever, usd)"
        " WHERE x.job_id = :j GROUP BY 1 ORDER BY 1"), {"j": job_id}).all())
    return {"list_cost_usd": str(listed), "cost_usd": str(spent), "saved_usd": str(listed - spent),
            "by_lever": {k: str(v) for k, v in by_lever.items()}}


def lock_job_batches(conn: Connection, job_id: str) -> list[str]:
    """Lock every batch holding a request of the job, in batch_id order (lock order: pipeline/stores/batches.py)."""
    return conn.execute(sa.text(
        "SELECT batch_id FROM batches WHERE batch_id IN"
        " (SELECT DISTINCT batch_id FROM requests WHERE job_id = :j AND batch_id IS NOT NULL)"
        " ORDER BY batch_id FOR UPDATE"), {"j": job_id}).scalars().all()


def cancelled_jobs(conn: Connection, job_ids) -> set[str]:
    """Which of these jobs are cancelled (a worker asks before each provider call)."""
    ids = sorted(set(job_ids))
    if not ids:
        return set()
    return set(conn.execute(sa.text(
        "SELECT job_id FROM jobs WHERE job_id = ANY(:ids) AND status = 'cancelled'"), {"ids": ids}).scalars())


def send_cancel(engine, pb_id: str, provider: str, provider_batch_id: str, settings: Settings, *,
                run=asyncio.run, key_alias: str | None = None) -> dict:
    """Ask the provider to cancel, on the batch's key (``key_alias``); confirmed once it says
    cancelling or ended (an ended batch has nothing left to cancel). Unconfirmed, the scheduler asks
    again next tick. ``run`` runs the provider call (the scheduler's: on its one event loop)."""
    confirmed = batch_api.cancel_confirmed(provider)
    error = None
    try:
        state = run(batch_api.cancel(settings, provider, provider_batch_id, key_alias=key_alias))
    except Exception as e:   # e.g. "cannot cancel a completed batch": ask what it is
        error = str(e)
        try:
            state = run(batch_api.status(settings, provider, provider_batch_id, key_alias=key_alias))
        except Exception:
            state = None
    ok = state in confirmed
    if state is not None:
        confirm_cancel(engine, pb_id, state, ok)
    if not ok:
        log.warning("provider batch %s (%s): cancel not confirmed yet (%s); the scheduler asks again",
                    pb_id, provider_batch_id, error or state)
        return {"id": pb_id, "provider_batch": provider_batch_id, "error": error or f"status {state}"}
    return {"id": pb_id, "provider_batch": provider_batch_id, "status": state}


def confirm_cancel(engine, pb_id: str, state: str, ok: bool) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(
            "UPDATE provider_batches SET provider_status = :st, cancel_confirmed_at = CASE WHEN :ok"
            " THEN coalesce(cancel_confirmed_at, now()) ELSE cancel_confirmed_at END WHERE id = :id"),
            {"id": pb_id, "st": state, "ok": ok})
    if ok:
        log.info("provider batch %s: cancel confirmed by the provider (%s)", pb_id, state)


def cancel_job(job_id: str, *, settings: Settings | None = None, engine=None) -> dict | None:
    """Cancel a job: held and queued work stops, calls in flight finish, provider batches are cancelled.

    Returns what was done, or None when there is no such job. Costs already
    incurred stay in ``results``. Each provider batch of the job, whatever its
    state (``creating`` included), is marked ``cancel_requested``: the
    scheduler carries that out until the provider confirms (a submitted one is
    also cancelled here at once). A provider batch shared with another job's
    requests is not cancelled (that would cancel the other job's work too).
    """
    settings = settings or get_settings()
    engine = engine or get_engine()

    def work(conn):
        # lock order (pipeline/stores/batches.py): the job's batches, then its requests, then the job;
        # a worker's claim takes the batch before its requests too, so the two never deadlock.
        # The batches are locked in one ordered step and no batch lock is waited for after it: the
        # batcher may commit more of the job's batches meanwhile, which another cancel of the job
        # (the API cancels again at each move of a 'cancelling' batch) can have locked in its own step
        job = conn.execute(sa.text("SELECT status FROM jobs WHERE job_id = :j"), {"j": job_id}).first()
        if job is None:
            return None
        lock_job_batches(conn, job_id)
        # requests a worker holds ('running') are skipped by its check before each call
        stopped = conn.execute(sa.text(
            "UPDATE requests SET status = 'cancelled', finished_at = now()"
            " WHERE job_id = :j AND status = ANY(llmbatch_states('request_cancellable'))"), {"j": job_id}).rowcount
        conn.execute(sa.text(
            "UPDATE jobs SET status = 'cancelled', cancelled_at = now(), finished_at = coalesce(finished_at, now())"
            " WHERE job_id = :j AND status = ANY(llmbatch_states('job_open'))"),
            {"j": job_id})
        # SKIP LOCKED: a batch committed after the lock step and locked by another transaction (a
        # second cancel, a worker's claim) is theirs to close; waiting for it here would deadlock
        done = conn.execute(sa.text(
            "UPDATE batches b SET status = 'done', finished_at = now()"
            " WHERE b.status = ANY(llmbatch_states('batch_unstarted'))"
            " AND b.batch_id IN (SELECT x.batch_id FROM batches x WHERE x.batch_id IN"
            "   (SELECT batch_id FROM requests WHERE job_id = :j)"
            "   AND x.status = ANY(llmbatch_states('batch_unstarted'))"
            "   ORDER BY x.batch_id FOR UPDATE SKIP LOCKED)"
            " AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.batch_id = b.batch_id"
            "                 AND r.status <> ALL(llmbatch_states('request_terminal')))"), {"j": job_id}).rowcount
        pbs = conn.execute(sa.text(
            "SELECT pb.id, pb.provider, pb.provider_batch_id, pb.status, pb.counts->>'key_alias'"
            " FROM provider_batches pb"
            " WHERE pb.status = ANY(llmbatch_states('provider_batch_open'))"
            " AND EXISTS (SELECT 1 FROM batches b JOIN requests r ON r.batch_id = b.batch_id"
            "             WHERE b.provider_batch = pb.id AND r.job_id = :j)"
            " AND NOT EXISTS (SELECT 1 FROM batches b JOIN requests r ON r.batch_id = b.batch_id"
            "             WHERE b.provider_batch = pb.id AND r.job_id <> :j"
            "             AND r.status <> ALL(llmbatch_states('request_terminal')))"), {"j": job_id}).all()
        running = conn.execute(sa.text(
            "SELECT count(*) FROM requests WHERE job_id = :j AND status = 'running'"), {"j": job_id}).scalar()
        if pbs:
            conn.execute(sa.text(
                "UPDATE provider_batches SET cancel_requested = true,"
                " cancel_requested_at = coalesce(cancel_requested_at, now()) WHERE id = ANY(:ids)"),
                {"ids": [p.id for p in pbs]})
        return job, stopped, done, pbs, running

    # a deadlock or serialization victim, or a Postgres restart, is tried again, never a traceback
    out = retrying(engine, work, what=f"cancelling job {job_id}", patience_s=120.0)
    if out is None:
        return None
    job, stopped, done, pbs, running = out
    cancelled_at_provider = []
    for pb_id, provider, pbid, status, key in pbs:
        if status == "submitted":
            cancelled_at_provider.append(send_cancel(engine, pb_id, provider, pbid, settings, key_alias=key))
        else:   # its creation is under way or unconfirmed: cancelled the moment the provider names it
            cancelled_at_provider.append({"id": pb_id, "provider_batch": None, "status": "cancel_requested"})
    return {"job_id": job_id, "previous_status": job.status, "requests_cancelled": stopped,
            "batches_done": done, "still_running": running, "provider_batches": cancelled_at_provider}


def set_batch_fallback(job_id: str, fallback: str, *, engine=None) -> None:
    """``submit --batch-fallback``: 'realtime' (the default) or 'fail'. Read when a provider batch ends."""
    if fallback not in ("realtime", "fail"):
        raise ValueError(f"batch fallback must be 'realtime' or 'fail', got {fallback!r}")
    with (engine or get_engine()).begin() as conn:
        conn.execute(sa.text("UPDATE jobs SET batch_fallback = :f WHERE job_id = :j"), {"f": fallback, "j": job_id})
