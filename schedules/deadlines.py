"""Deadlines kept or reported: the scheduler reads deadlines and the window together.

Every tick, before the window's own release (schedules/service.py ``Ticker``):

1. **Missed**: a request still ``held`` at its deadline (on the scheduler's
   clock) is failed with error code ``deadline_missed`` and never sent, as a
   provider's batch API expires the lines it did not run (OpenAI
   ``batch_expired``, Anthropic ``expired``): running it late would spend money
   on an answer its caller stopped waiting for. A held batch left with nothing
   open is closed; the job ends as usual. Counted in
   ``llmbatch_deadlines_missed_total{tier}``, shown by ``llmbatch status`` and
   the views ``request_deadlines`` / ``job_deadlines`` (sql/017_deadlines.sql).
   Requests already queued or running are not stopped: they finish, and if
   after their deadline the views call them ``late``.
2. **Due**: a held batch whose earliest deadline leaves no more than
   ``deadline_margin_s`` (its *latest start*, pipeline/intake/tiers.py) is released
   now, window or not, lifted to peak (immediate when the deadline is closer
   than the immediate threshold), so it is never held past its latest start.

Never touches the batches of a path the scheduler sends (provider batch): their lines
are with the provider, whose own completion window applies.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import sqlalchemy as sa

from pipeline import metrics
from pipeline.intake.dispatch import enqueue_batch as dispatch
from pipeline.intake.tiers import TierRules
from pipeline.paths import base as sequence
from pipeline.paths.registry import worker_paths
from pipeline.request import Outcome, Request
from pipeline.stores import db, jobs
from schedules import release

log = logging.getLogger(__name__)

MISSED_CODE = "deadline_missed"


def expire_missed(now: datetime, *, engine=None, limit: int = 5000) -> dict[str, int]:
    """Fail held requests whose deadline is at or before ``now``; returns counts per tier."""
    engine = engine or db.get_engine()
    with engine.begin() as conn:
        # batches first, then their requests: the lock order of release_held and the workers
        rows = conn.execute(sa.text(
            f"WITH b AS ({release.HELD}{release.DUE} FOR UPDATE SKIP LOCKED)"
            " SELECT r.* FROM requests r JOIN b ON b.batch_id = r.batch_id"
            " WHERE r.status = 'held' AND r.deadline <= :before"
            "   AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = r.job_id AND j.status = 'cancelled')"
            " ORDER BY r.deadline LIMIT :limit FOR UPDATE OF r"),
            {"before": now, "limit": limit, "modes": worker_paths()}).mappings().all()
        if not rows:
            return {}
        sequence.write(conn, [Outcome.failed(Request.from_row(r), MISSED_CODE,
                                             f"not started by its deadline {r['deadline'].isoformat()}: expired"
                                             f" unsent, as a batch API expires lines it did not run")
                              for r in rows], [])
        batches = sorted({r["batch_id"] for r in rows})
        conn.execute(sa.text(
            "UPDATE batches b SET status = 'done', finished_at = now()"
            " WHERE b.batch_id = ANY(:ids) AND b.status = 'held' AND NOT EXISTS (SELECT 1 FROM requests r"
            "   WHERE r.batch_id = b.batch_id AND r.status <> ALL(llmbatch_states('request_terminal')))"),
            {"ids": batches})
        jobs.refresh_jobs(conn, {r["job_id"] for r in rows})
    by_tier: dict[str, int] = {}
    by_job: dict[str, int] = {}
    for r in rows:
        by_tier[r["tier"]] = by_tier.get(r["tier"], 0) + 1
        by_job[r["job_id"]] = by_job.get(r["job_id"], 0) + 1
    for tier, n in by_tier.items():
        metrics.deadlines_missed(tier, n)
    for job, n in sorted(by_job.items()):
        log.warning("job %s: %d held requests missed their deadline: failed %s, not sent",
                    job, n, MISSED_CODE, extra={"job": job})
    return by_tier


def release_due(now: datetime, rules: TierRules, *, engine=None, dispatcher=dispatch) -> dict[str, int]:
    """Release held batches at their latest start; returns batches released per new tier."""
    out = {}
    kw = {"engine": engine, "dispatcher": dispatcher}
    # the closest first, to immediate; then whatever is within the margin, to peak
    for tier, within in (("immediate", rules.immediate_within_s), ("peak", rules.deadline_margin_s)):
        released = release.release_for_deadlines(now + timedelta(seconds=within), tier, **kw)
        if released:
            out[tier] = len(released)
            for held_tier in {t for _, t in released}:
                metrics.deadline_released(held_tier, sum(1 for _, t in released if t == held_tier))
            log.info("deadlines: released %d held batches to %s to meet their deadlines", len(released), tier)
    return out
