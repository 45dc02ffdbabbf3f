"""Release held batches to their Celery queues, highest priority first, then oldest.

Off-peak and background batches are written ``held`` by the batcher. Releasing
one flips it to ``queued`` in the same statement that picks it, so two
releasers never hand out the same batch, then dispatches it; a crash between
the two is repaired by the batcher's sweep, which dispatches ``queued`` batches.

Only the batches of paths our workers run are released here (pipeline/paths/registry.py
``worker_paths``: realtime, flex); a provider-batch path's batches go to a provider
Batch API (schedules/pb_submit.py, schedules/pb_ingest.py).

A batch whose earliest open deadline is near is released whatever the window
(``release_for_deadlines``, called by schedules/deadlines.py) and lifted to the
tier that runs it at once (peak, or immediate), so ``hold_unstarted`` leaves it
alone: it must not wait for the next window.

When the off-peak window closes, ``hold_unstarted`` puts batches released but
not yet claimed by a worker (``queued`` / ``dispatched``) back to ``held``.
Their Celery messages may still be delivered: ``batches.claim_batch`` only claims
``queued`` / ``dispatched`` batches, so such a task finds the batch held and
does nothing; the next window dispatches it again. Batches a worker already
started (``running``) finish.
"""

from __future__ import annotations

import sqlalchemy as sa

from pipeline.intake.dispatch import enqueue_batch as dispatch
from pipeline.paths.registry import worker_paths
from pipeline.stores import batches, db


#: The held-batch selection, spelled here only: held batches of the paths our workers run
#: (``:modes``, pipeline/paths/registry.py ``worker_paths``), as ``b``, for a caller to narrow.
HELD = "SELECT b.batch_id, b.tier FROM batches b WHERE b.status = 'held' AND b.mode = ANY(:modes)"
#: narrows ``HELD`` to the batches holding a held request due by ``:before`` (deadline at or before it)
DUE = (" AND b.batch_id IN (SELECT r.batch_id FROM requests r WHERE r.status = 'held'"
       " AND r.deadline IS NOT NULL AND r.deadline <= :before)")


def release_held(tiers: tuple[str, ...], limit: int = 1000, *, engine=None, dispatcher=dispatch) -> list[str]:
    rows = _release(HELD + " AND b.tier = ANY(:tiers)"
                    " ORDER BY (SELECT max(priority) FROM requests r WHERE r.batch_id = b.batch_id) DESC,"
                    " b.created_at", {"tiers": list(tiers)}, limit, engine=engine, dispatcher=dispatcher)
    return [r.batch_id for r in rows]


def release_for_deadlines(before, tier: str, limit: int = 1000, *, engine=None,
                          dispatcher=dispatch) -> list[tuple[str, str]]:
    """Release held realtime batches holding a request whose deadline is at or before ``before``,
    as ``tier``; earliest deadline first. Returns ``(batch_id, tier it was held in)``."""
    rows = _release(HELD + DUE + " ORDER BY (SELECT min(r.deadline) FROM requests r"
                    " WHERE r.batch_id = b.batch_id AND r.status = 'held')", {"before": before}, limit,
                    tier=tier, why=f", released to {tier} for its deadline", engine=engine, dispatcher=dispatcher)
    return [(r.batch_id, r.held_tier) for r in rows]


def _release(picked: str, params: dict, limit: int, *, tier: str | None = None, why: str | None = None,
             engine=None, dispatcher=dispatch) -> list:
    """Flip the first ``limit`` batches ``picked`` selects (``HELD`` narrowed and ordered) to
    ``queued``, their held requests with them (to ``tier`` with ``why`` added to their reason, when
    given), then dispatch them. Returns rows of ``batch_id``, ``held_tier``."""
    if limit <= 0:
        return []
    engine = engine or db.get_engine()
    with engine.begin() as conn:
        rows = conn.execute(sa.text(
            f"WITH picked AS ({picked} LIMIT :limit FOR UPDATE SKIP LOCKED)"
            " UPDATE batches b SET status = 'queued', tier = coalesce(CAST(:tier AS text), b.tier)"
            " FROM picked WHERE b.batch_id = picked.batch_id"
            " RETURNING b.batch_id, b.tier, picked.tier AS held_tier,"
            "  ARRAY(SELECT DISTINCT r.job_id FROM requests r WHERE r.batch_id = b.batch_id) AS jobs"),
            {**params, "limit": limit, "tier": tier, "modes": worker_paths()}).all()
        conn.execute(sa.text(
            "UPDATE requests SET status = 'queued', tier = coalesce(CAST(:tier AS text), tier),"
            " tier_reason = tier_reason || coalesce(CAST(:why AS text), '')"
            " WHERE batch_id = ANY(:ids) AND status = 'held'"),
            {"ids": [r.batch_id for r in rows], "tier": tier, "why": why})
    for r in rows:
        dispatcher(r.batch_id, r.tier, r.jobs)
    with engine.begin() as conn:
        batches.mark_dispatched(conn, [r.batch_id for r in rows])
    return rows


def waiting(tier: str, *, engine=None) -> int:
    """Batches of ``tier`` released but not yet taken by a worker."""
    engine = engine or db.get_engine()
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT count(*) FROM batches WHERE tier = :t AND mode = ANY(:modes)"
            " AND status = ANY(llmbatch_states('batch_released'))"), {"t": tier, "modes": worker_paths()}).scalar()


def held_count(tier: str, *, engine=None) -> int:
    engine = engine or db.get_engine()
    with engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM ({HELD} AND b.tier = :t) held"),
                            {"t": tier, "modes": worker_paths()}).scalar()


def hold_unstarted(tiers: tuple[str, ...], *, engine=None) -> list[str]:
    """Put released batches no worker has started back to ``held`` (the window closed)."""
    engine = engine or db.get_engine()
    with engine.begin() as conn:
        ids = conn.execute(sa.text(
            "UPDATE batches SET status = 'held', dispatched_at = NULL"
            " WHERE tier = ANY(:tiers) AND mode = ANY(:modes) AND status = ANY(llmbatch_states('batch_released'))"
            " RETURNING batch_id"), {"tiers": list(tiers), "modes": worker_paths()}).scalars().all()
        if ids:
            conn.execute(sa.text(
                "UPDATE requests SET status = 'held' WHERE batch_id = ANY(:ids) AND status = 'queued'"),
                {"ids": ids})
    return ids
