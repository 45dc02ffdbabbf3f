"""Release held batches to their Celery queues, highest priority first, then oldest.

Off-peak and background batches are written ``held`` by the batcher. Releasing
one flips it to ``queued`` in the same statement that picks it, so two
releasers never hand out the same batch, then dispatches it; a crash between
the two is repaired by the batcher's sweep, which dispatches ``queued`` batches.
"""

from __future__ import annotations

import sqlalchemy as sa

from pipeline import db
from pipeline.batcher import dispatch


def release_held(tiers: tuple[str, ...], limit: int = 1000, *, engine=None, dispatcher=dispatch) -> list[str]:
    engine = engine or db.get_engine()
    with engine.begin() as conn:
        rows = conn.execute(sa.text(
            "WITH picked AS ("
            "  SELECT b.batch_id, b.tier FROM batches b"
            "  WHERE b.status = 'held' AND b.tier = ANY(:tiers)"
            "  ORDER BY (SELECT max(priority) FROM requests r WHERE r.batch_id = b.batch_id) DESC,"
            "           b.created_at"
            "  LIMIT :limit FOR UPDATE SKIP LOCKED)"
            " UPDATE batches b SET status = 'queued' FROM picked WHERE b.batch_id = picked.batch_id"
            " RETURNING b.batch_id, b.tier"), {"tiers": list(tiers), "limit": limit}).all()
        conn.execute(sa.text(
            "UPDATE requests SET status = 'queued' WHERE batch_id = ANY(:ids) AND status = 'held'"),
            {"ids": [r.batch_id for r in rows]})
    for batch_id, tier in rows:
        dispatcher(batch_id, tier)
    with engine.begin() as conn:
        db.mark_dispatched(conn, [r.batch_id for r in rows])
    return [r.batch_id for r in rows]
