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


def _release(where: str, params: dict, limit: int, engine, dispatcher) -> list[str]:
    """Flip the held batches ``where`` picks to ``queued`` (highest priority first, then oldest) in
    the statement that picks them, their requests with them; then dispatch them."""
    with engine.begin() as conn:
        rows = conn.execute(sa.text(
            "WITH picked AS ("
            f"  SELECT b.batch_id, b.tier FROM batches b WHERE b.status = 'held' AND {where}"
            "  ORDER BY (SELECT max(priority) FROM requests r WHERE r.batch_id = b.batch_id) DESC,"
            "           b.created_at"
            "  LIMIT :limit FOR UPDATE SKIP LOCKED)"
            " UPDATE batches b SET status = 'queued' FROM picked WHERE b.batch_id = picked.batch_id"
            " RETURNING b.batch_id, b.tier,"
            "  ARRAY(SELECT DISTINCT r.job_id FROM requests r WHERE r.batch_id = b.batch_id) AS jobs"),
            {**params, "limit": limit}).all()
        conn.execute(sa.text(
            "UPDATE requests SET status = 'queued' WHERE batch_id = ANY(:ids) AND status = 'held'"),
            {"ids": [r.batch_id for r in rows]})
    for batch_id, tier, jobs in rows:
        dispatcher(batch_id, tier, jobs)
    with engine.begin() as conn:
        batches.mark_dispatched(conn, [r.batch_id for r in rows])
    return [r.batch_id for r in rows]


def release_held(tiers: tuple[str, ...], limit: int = 1000, *, engine=None, dispatcher=dispatch) -> list[str]:
    if limit <= 0:
        return []
    return _release("b.tier = ANY(:tiers) AND b.mode = ANY(:modes)",
                    {"tiers": list(tiers), "modes": tier_window_paths()}, limit, engine or db.get_engine(), dispatcher)


def release_price_windows(now, limit: int = 1000, *, engine=None, dispatcher=dispatch, prices=None) -> list[str]:
    """Release held batches of a price-window path whose model's price window is open at ``now``
    (pipeline/money/price_windows.py), highest priority first, to their tier's queue."""
    if limit <= 0:
        return []
    engine = engine or db.get_engine()
    prices = prices or get_price_book()
    with engine.connect() as conn:
        held = conn.execute(sa.text(
            "SELECT DISTINCT provider, model FROM batches WHERE status = 'held' AND mode = ANY(:modes)"),
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
    return _release("b.mode = ANY(:modes) AND (b.provider || '/' || b.model) = ANY(:open)",
                    {"modes": price_window_paths(), "open": open_now}, limit, engine, dispatcher)


def release_for_deadlines(before, tier: str, limit: int = 1000, *, engine=None,
                          dispatcher=dispatch) -> list[tuple[str, str]]:
    """Release held realtime batches holding a request whose deadline is at or before ``before``,
    as ``tier``; earliest deadline first. Returns ``(batch_id, tier it was held in)``."""
    if limit <= 0:
        return []
    engine = engine or db.get_engine()
    with engine.begin() as conn:
        rows = conn.execute(sa.text(
            "WITH due AS ("
            "  SELECT r.batch_id, min(r.deadline) AS first FROM requests r"
            "  WHERE r.status = 'held' AND r.deadline IS NOT NULL AND r.deadline <= :before"
            "  GROUP BY r.batch_id),"
            " picked AS ("
            "  SELECT b.batch_id, b.tier FROM batches b JOIN due ON due.batch_id = b.batch_id"
            "  WHERE b.status = 'held' AND b.mode = ANY(:modes)"
            "  ORDER BY due.first LIMIT :limit FOR UPDATE OF b SKIP LOCKED)"
            " UPDATE batches b SET status = 'queued', tier = :tier FROM picked"
            " WHERE b.batch_id = picked.batch_id"
            " RETURNING b.batch_id, picked.tier AS held_tier,"
            "  ARRAY(SELECT DISTINCT r.job_id FROM requests r WHERE r.batch_id = b.batch_id) AS jobs"),
            {"before": before, "tier": tier, "limit": limit, "modes": worker_paths()}).all()
        conn.execute(sa.text(
            "UPDATE requests SET status = 'queued', tier = :tier,"
            " tier_reason = tier_reason || ', released to ' || :tier || ' for its deadline'"
            " WHERE batch_id = ANY(:ids) AND status = 'held'"),
            {"ids": [r.batch_id for r in rows], "tier": tier})
    for batch_id, _, jobs in rows:
        dispatcher(batch_id, tier, jobs)
    with engine.begin() as conn:
        batches.mark_dispatched(conn, [r.batch_id for r in rows])
    return [(r.batch_id, r.held_tier) for r in rows]


def waiting(tier: str, *, engine=None) -> int:
    """Batches of ``tier`` released but not yet taken by a worker."""
    engine = engine or db.get_engine()
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT count(*) FROM batches WHERE tier = :t AND mode = ANY(:modes)"
            " AND status IN ('queued', 'dispatched')"), {"t": tier, "modes": tier_window_paths()}).scalar()


def held_count(tier: str, *, engine=None) -> int:
    engine = engine or db.get_engine()
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT count(*) FROM batches WHERE tier = :t AND mode = ANY(:modes) AND status = 'held'"),
            {"t": tier, "modes": tier_window_paths()}).scalar()


def hold_unstarted(tiers: tuple[str, ...], *, engine=None) -> list[str]:
    """Put released batches no worker has started back to ``held`` (the window closed)."""
    engine = engine or db.get_engine()
    with engine.begin() as conn:
        ids = conn.execute(sa.text(
            "UPDATE batches SET status = 'held', dispatched_at = NULL"
            " WHERE tier = ANY(:tiers) AND mode = ANY(:modes) AND status IN ('queued', 'dispatched')"
            " RETURNING batch_id"), {"tiers": list(tiers), "modes": tier_window_paths()}).scalars().all()
        if ids:
            conn.execute(sa.text(
                "UPDATE requests SET status = 'held' WHERE batch_id = ANY(:ids) AND status = 'queued'"),
                {"ids": ids})
    return ids
