"""Retention of ended jobs' rows: what bounds Postgres' growth (``llmbatch purge``).

The scheduler's upkeep already empties old bodies (``retention_days``: request and
response bodies set to NULL, schedules/upkeep.py); the rows stay, a few hundred
bytes each with their indexes. This deletes them: for every job that ended (not
``submitting``, ``running`` or ``paused_budget``) more than
``purge_jobs_after_days`` ago, with no request still open and no provider call
still out, its requests, results (and their embeddings), attempts, rejections,
answered provider calls, and the batches its requests leave empty.

The job's row stays, with ``purged_totals`` (succeeded, failed, cancelled, cost
and list cost), counted before the first row goes; ``rows_purged_at`` says it is
done. A purge stopped halfway is finished by the next one, from the same totals.
Rows go in chunks of ``chunk`` requests, each chunk its own transaction, so no
statement holds many row locks for long.

Never: a job that may still spend or take requests, a call on record as sent
(its spend is not settled), or a job younger than a day (today's budget period
counts its results: ``MIN_DAYS``).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import sqlalchemy as sa

from pipeline.errors import ConfigError
from pipeline.stores import db

log = logging.getLogger(__name__)

#: the daily caps count the results of today's period: younger jobs are never purged
MIN_DAYS = 1.0
CHUNK = 5000

_TOTALS = sa.text("""
UPDATE jobs j SET purged_totals = coalesce(j.purged_totals, (
    SELECT jsonb_build_object(
        'succeeded', count(*) FILTER (WHERE q.status = 'succeeded'),
        'failed', count(*) FILTER (WHERE q.status = 'failed'),
        'cancelled', count(*) FILTER (WHERE q.status = 'cancelled'),
        'cost_usd', coalesce(sum(x.cost_usd), 0)::text,
        'list_cost_usd', coalesce(sum(coalesce(x.list_cost_usd, x.cost_usd)), 0)::text)
      FROM requests q LEFT JOIN results x USING (job_id, custom_id) WHERE q.job_id = j.job_id))
 WHERE j.job_id = :j""")

_CHUNK = sa.text("""
WITH keys AS (SELECT job_id, custom_id FROM requests WHERE job_id = :j LIMIT :n),
     a AS (DELETE FROM attempts t USING keys k WHERE t.job_id = k.job_id AND t.custom_id = k.custom_id)
DELETE FROM requests r USING keys k WHERE r.job_id = k.job_id AND r.custom_id = k.custom_id
RETURNING r.batch_id""")


def due_jobs(conn, cutoff: datetime, limit: int = 1000) -> list[str]:
    """Ended jobs, ended before ``cutoff``, not purged, with nothing open or out."""
    return list(conn.execute(sa.text(
        "SELECT j.job_id FROM jobs j"
        " WHERE j.rows_purged_at IS NULL AND j.finished_at < :cut"
        "   AND j.status <> ALL(llmbatch_states('job_open'))"
        "   AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.job_id = j.job_id"
        "                   AND r.status <> ALL(llmbatch_states('request_terminal')))"
        "   AND NOT EXISTS (SELECT 1 FROM provider_calls p WHERE p.job_id = j.job_id AND p.state = 'sent')"
        " ORDER BY j.finished_at LIMIT :n"), {"cut": cutoff, "n": limit}).scalars())


def purge_job(engine, job_id: str, chunk: int = CHUNK) -> int:
    """Delete one ended job's rows (see the module's docstring); returns the requests deleted."""
    with db.transaction(engine) as conn:
        conn.execute(_TOTALS, {"j": job_id})
    deleted = 0
    while True:
        with db.transaction(engine) as conn:
            # results (with their embeddings) go with their requests: ON DELETE CASCADE
            gone = conn.execute(_CHUNK, {"j": job_id, "n": chunk}).scalars().all()
            batch_ids = sorted({b for b in gone if b})
            if batch_ids:
                conn.execute(sa.text(
                    "DELETE FROM batches b WHERE b.batch_id = ANY(:ids)"
                    " AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.batch_id = b.batch_id)"), {"ids": batch_ids})
        deleted += len(gone)
        if len(gone) < chunk:
            break
    with db.transaction(engine) as conn:
        conn.execute(sa.text("DELETE FROM rejections WHERE job_id = :j"), {"j": job_id})
        conn.execute(sa.text("DELETE FROM provider_calls WHERE job_id = :j AND state <> 'sent'"), {"j": job_id})
        conn.execute(sa.text("UPDATE jobs SET rows_purged_at = now() WHERE job_id = :j"), {"j": job_id})
    return deleted


def purge(engine=None, *, older_than_days: float, now: datetime | None = None, chunk: int = CHUNK,
          dry_run: bool = False) -> dict:
    """Purge the rows of every job that ended more than ``older_than_days`` ago (Postgres' clock,
    or ``now``). Returns the jobs and requests purged (with ``dry_run``: the jobs that would be)."""
    if older_than_days < MIN_DAYS:
        raise ConfigError(f"purge: {older_than_days:g} days is too young: jobs that ended less than {MIN_DAYS:g}"
                          " day ago still count in today's budget period")
    engine = engine or db.get_engine()
    with engine.connect() as conn:
        now = now or conn.execute(sa.text("SELECT now()")).scalar()
        cutoff = now - timedelta(days=older_than_days)
    out = {"cutoff": cutoff.isoformat(), "jobs": 0, "requests": 0}
    while True:
        with engine.connect() as conn:
            jobs = due_jobs(conn, cutoff)
        if dry_run:
            return {**out, "jobs": len(jobs), "job_ids": jobs}
        for job_id in jobs:
            out["requests"] += purge_job(engine, job_id, chunk)
            out["jobs"] += 1
        if len(jobs) < 1000:
            break
    if out["jobs"]:
        log.info("retention: deleted the rows of %d jobs (%d requests) that ended before %s",
                 out["jobs"], out["requests"], cutoff.isoformat())
    return out
