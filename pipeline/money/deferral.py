"""Requests a cap refused wait, they are not dropped: they are marked deferred with the reason
(``write_deferred``), their batch is parked until the earliest moment one may fit
(``defer_batch``), and the batcher's sweep hands the due ones back (``resume_due_batches``).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from pipeline.constants import HELD_TIERS
from pipeline.money.caps import next_day
from pipeline.stores.batches import mark_dispatched
from pipeline.stores.db import dumps

log = logging.getLogger(__name__)


def write_deferred(conn, rows: list[dict]) -> None:
    """Mark requests deferred (``job_id``, ``custom_id``, ``scope``, optional ``reason`` in words);
    terminal ones stay as they are."""
    if not rows:
        return
    conn.execute(sa.text(
        "UPDATE requests r SET status = 'deferred', deferred_scope = x.scope, deferred_reason = x.reason"
        " FROM jsonb_to_recordset(CAST(:rows AS jsonb))"
        " AS x(job_id text, custom_id text, scope text, reason text)"
        " WHERE r.job_id = x.job_id AND r.custom_id = x.custom_id"
        " AND r.status <> ALL(llmbatch_states('request_terminal'))"), {"rows": dumps(rows)})


def defer_batch(conn, batch_id: str, kinds: set[str], now: datetime | None = None) -> None:
    """Park a batch with deferred requests until the earliest moment one of them may fit.

    Daily caps: the next UTC day. Budget store down, or a wait on live holds that ran out
    (``wait``): a minute. Job cap only: until the cap is raised (``budget set`` re-dispatches it).
    """
    now = now or datetime.now(timezone.utc)
    until = None
    if kinds & {"unavailable", "wait"}:
        until = now + timedelta(seconds=60)
    elif kinds & {"global", "tier"}:
        until = next_day(now)
    conn.execute(sa.text(
        "UPDATE batches SET status = 'deferred', deferred_until = :u, lease_until = NULL"
        " WHERE batch_id = :b"), {"b": batch_id, "u": until})


def resume_due_batches(engine, dispatch, held_modes) -> int:
    """Hand deferred batches whose time has come back to their queues (the batcher's sweep calls this).

    ``held_modes``: the paths whose batches the scheduler sends (pipeline/paths/registry.py
    ``scheduler_paths``): they go back to ``held``, for it. A crash after the UPDATE leaves them
    ``queued``: the ordinary sweep sends them.
    """
    with engine.begin() as conn:
        # off-peak and background batches go back to 'held': the scheduler releases them in their window
        # so do provider-batch batches: the scheduler reserves and submits them (schedules/pb_submit.py)
        due = conn.execute(sa.text(
            "UPDATE batches SET deferred_until = NULL,"
            " status = CASE WHEN tier = ANY(:held) OR mode = ANY(:modes) THEN 'held' ELSE 'queued' END"
            " WHERE batch_id IN (SELECT batch_id FROM batches WHERE status = 'deferred'"
            "  AND deferred_until <= now() ORDER BY batch_id FOR UPDATE)"   # lock order: batch_id
            " RETURNING batch_id, tier, status"),
            {"held": list(HELD_TIERS), "modes": list(held_modes)}).all()
        due = [(b, t) for b, t, st in due if st == "queued"]
    for batch_id, tier in due:
        log.info("budget: resuming deferred batch %s (%s)", batch_id, tier)
        dispatch(batch_id, tier)
    if due:
        with engine.begin() as conn:
            mark_dispatched(conn, [b for b, _ in due])
    return len(due)
