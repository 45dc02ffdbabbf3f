"""Release held batches to their Celery queues, highest priority first, then oldest.

Off-peak and background batches are written ``held`` by the batcher. Releasing
one flips it to ``queued`` in the same statement that picks it, so two
releasers never hand out the same batch, then dispatches it; a crash between
the two is repaired by the batcher's sweep, which dispatches ``queued`` batches.

Only the batches of paths our workers run are released here (pipeline/paths/registry.py
``worker_paths``: realtime, flex, window); a provider-batch path's batches go to a provider
Batch API (schedules/pb_submit.py, schedules/pb_ingest.py). The off-peak window releases
those that wait for it (``tier_window_paths``); a price-window path's batches wait for their
model's price window instead (``release_price_windows``), whatever their tier.

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
from pipeline.errors import LLMBatchError
from pipeline.money.pricing import get_price_book
from pipeline.paths.registry import price_window_paths, tier_window_paths, worker_paths
from pipeline.stores import batches, db


#: The held-batch selection, spelled here only: held batches of the paths ``:modes`` names
#: (pipeline/paths/registry.py: ``worker_paths`` unless a caller narrows it, e.g. to
#: ``tier_window_paths`` or ``price_window_paths``), as ``b``, for a caller to narrow.
HELD = "SELECT b.batch_id, b.tier FROM batches b WHERE b.status = 'held' AND b.mode = ANY(:modes)"
#: narrows ``HELD`` to the batches holding a held request due by ``:before`` (deadline at or before it)
DUE = (" AND b.batch_id IN (SELECT r.batch_id FROM requests r WHERE r.status = 'held'"
       " AND r.deadline IS NOT NULL AND r.deadline <= :before)")
#: highest priority first, then oldest
BY_PRIORITY = (" ORDER BY (SELECT max(priority) FROM requests r WHERE r.batch_id = b.batch_id) DESC,"
               " b.created_at")


def release_held(tiers: tuple[str, ...], limit: int = 1000, *, engine=None, dispatcher=dispatch) -> list[str]:
    """Release the held batches of ``tiers`` that wait for the off-peak window (``tier_window_paths``)."""
    rows = _release(HELD + " AND b.tier = ANY(:tiers)" + BY_PRIORITY,
                    {"tiers": list(tiers), "modes": tier_window_paths()}, limit,
                    engine=engine, dispatcher=dispatcher)
    return [r.batch_id for r in rows]


def release_price_windows(now, limit: int = 1000, *, engine=None, dispatcher=dispatch, prices=None) -> list[str]:
    """Release held batches of a price-window path whose model's price window is open at ``now``
    (pipeline/money/price_windows.py), highest priority first, to their tier's queue."""
    if limit <= 0:
        return []
    engine = engine or db.get_engine()
    prices = prices or get_price_book()
    with engine.connect() as conn:
        held = conn.execute(sa.text(
            f"SELECT DISTINCT x.provider, x.model FROM batches x JOIN ({HELD}) held ON held.batch_id = x.batch_id"),
            {"modes": price_window_paths()}).all()
    open_now = []
    for provider, model in held:
        try:
            if prices.resolve(model, provider).multiplier_at(now) < 1:
                open_now.append(f"{provider}/{model}")
        except LLMBatchError:   # a model this scheduler cannot price waits for its deadline release
            continue
    if not open_now:
        return []
    rows = _release(HELD + " AND (b.provider || '/' || b.model) = ANY(:open)" + BY_PRIORITY,
                    {"modes": price_window_paths(), "open": open_now}, limit,
                    engine=engine, dispatcher=dispatcher)
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
            {"modes": worker_paths(), **params, "limit": limit, "tier": tier}).all()
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
            " AND status = ANY(llmbatch_states('batch_released'))"), {"t": tier, "modes": tier_window_paths()}).scalar()


def held_count(tier: str, *, engine=None) -> int:
    engine = engine or db.get_engine()
    with engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM ({HELD} AND b.tier = :t) held"),
                            {"t": tier, "modes": tier_window_paths()}).scalar()


def hold_unstarted(tiers: tuple[str, ...], *, engine=None) -> list[str]:
    """Put released batches no worker has started back to ``held`` (the window closed)."""
    engine = engine or db.get_engine()
    with engine.begin() as conn:
        ids = conn.execute(sa.text(
            "UPDATE batches SET status = 'held', dispatched_at = NULL"
            " WHERE tier = ANY(:tiers) AND mode = ANY(:modes) AND status = ANY(llmbatch_states('batch_released'))"
            " RETURNING batch_id"), {"tiers": list(tiers), "modes": tier_window_paths()}).scalars().all()
        if ids:
            conn.execute(sa.text(
                "UPDATE requests SET status = 'held' WHERE batch_id = ANY(:ids) AND status = 'queued'"),
                {"ids": ids})
    return ids
