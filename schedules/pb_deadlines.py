"""Provider-batch requests go back to realtime before their deadline (issue 21: the fallback of a
path that cannot finish in time).

Every tick, before the cancels are carried out (schedules/service.py ``Ticker.provider``), with
``lead`` = ``provider_batch_deadline_lead_s``:

1. a **held** provider-batch batch holding a request whose deadline is within ``lead`` is moved to
   the realtime path unsent (``batches.mode``), so the deadline release (schedules/deadlines.py)
   sends it at its latest start;
2. a **submitted** provider batch holding an open request whose deadline is within ``lead`` is
   marked ``cancel_requested``: ``carry_out_cancels`` sends the cancel, the provider bills only what
   it ran before it, and the ingest (schedules/pb_ingest.py) re-queues every line it did not run to
   realtime, where the deadline release sends it at once. A request it did run is never sent again.

A provider batch still ``creating`` is left alone: its creation resolves first (a cancel marked then
would hand its requests back to the provider-batch path).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import sqlalchemy as sa

from pipeline.config import Settings
from pipeline.paths.realtime import REALTIME
from pipeline.paths.registry import scheduler_paths

log = logging.getLogger(__name__)

_OPEN = "r.status <> ALL(llmbatch_states('request_terminal'))"


def to_realtime_for_deadlines(now: datetime, settings: Settings, engine) -> dict[str, int]:
    """Steps 1 and 2; returns ``{"moved": held batches moved, "cancelled": provider batches marked}``."""
    cut = now + timedelta(seconds=settings.provider_batch_deadline_lead_s)
    with engine.begin() as conn:
        moved = conn.execute(sa.text(
            "UPDATE batches b SET mode = :realtime WHERE b.status = 'held' AND b.mode = ANY(:sent)"
            f" AND EXISTS (SELECT 1 FROM requests r WHERE r.batch_id = b.batch_id AND {_OPEN}"
            "              AND r.deadline IS NOT NULL AND r.deadline <= :cut)"
            " RETURNING b.batch_id"), {"realtime": REALTIME.name, "sent": scheduler_paths(), "cut": cut}).scalars().all()
        if moved:
            conn.execute(sa.text(
                "UPDATE requests SET path_reason = coalesce(path_reason, '') || :why"
                " WHERE batch_id = ANY(:ids) AND status <> ALL(llmbatch_states('request_terminal'))"),
                {"ids": moved, "why": "; its deadline came before a provider batch could end: realtime"})
        marked = conn.execute(sa.text(
            "UPDATE provider_batches pb SET cancel_requested = true, cancel_requested_at = now()"
            " WHERE pb.status = 'submitted' AND NOT pb.cancel_requested"
            " AND EXISTS (SELECT 1 FROM batches b JOIN requests r ON r.batch_id = b.batch_id"
            f"            WHERE b.provider_batch = pb.id AND {_OPEN}"
            "             AND r.deadline IS NOT NULL AND r.deadline <= :cut)"
            " RETURNING pb.id"), {"cut": cut}).scalars().all()
    if moved:
        log.info("deadlines: %d held provider-batch batches go to realtime unsent", len(moved))
    if marked:
        log.warning("deadlines: provider batches %s still open near a deadline: cancelled, and what they did"
                    " not run goes to realtime", marked)
    return {"moved": len(moved), "cancelled": len(marked)}
