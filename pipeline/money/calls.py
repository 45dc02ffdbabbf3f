"""Provider calls that may have been billed: on record before they are sent, spent if unanswered.

A provider bills a generation whether or not its answer reaches us. So a call is
written to ``provider_calls`` (sql/012_unconfirmed_spend.sql) before it leaves
the worker, and its fate decides what it costs:

1. ``record_sent``: the row, state 'sent', in the transaction that also checks the
   job is not cancelled (workers/gate.py ``Gate``): one coalesced round trip for
   every call that starts meanwhile, not one write per call;
2. answered (success, or an error status the provider does not bill): the row is
   removed in the outcome's own write (``resolve``); the cost is in ``results``;
3. no answer (a timeout, a dropped connection): the row becomes 'unconfirmed' at the
   call's maximum cost (``resolve``), and the budget counts that maximum for good
   (``pipeline.money.ledger`` counts ``CALL_SPEND`` in the ledger; the worker settles its
   hold at the maximum after the write);
4. its worker died mid-call: whoever takes the batch back makes its 'sent' rows
   'unconfirmed' in the claim's transaction (``take_over``); the counters' rebuild does
   the same for the calls of holds that lapsed (``unconfirm_held``) before it lets them go,
   and the budget reconcile for rows older than any call can run (``unconfirm_stale``).

Nothing lowers that maximum yet: neither provider reports usage per call in a form that
names the call. The state 'confirmed' (with ``confirmed_usd``) is where such a report
would put it; the ledger already counts it so. Without one, the call stays spent.
This module must never let an unanswered call's spend leave the ledger.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from decimal import Decimal

import sqlalchemy as sa

from pipeline.money import budget, caps, scripts, units as units_mod

log = logging.getLogger(__name__)

_COLUMNS = "call_id, hold_id, job_id, custom_id, tier, batch_id, owner, max_cost_usd"


def record_sent(conn, rows: list[dict]) -> None:
    """Calls about to be sent (``call_id``, ``hold_id``, ``job_id``, ``custom_id``, ``tier``,
    ``batch_id``, ``owner``, ``max_cost_usd``): durable before any of them leaves."""
    if not rows:
        return
    from pipeline.stores.db import dumps
    conn.execute(sa.text(
        f"INSERT INTO provider_calls ({_COLUMNS})"
        f" SELECT {_COLUMNS} FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(call_id text, hold_id text,"
        " job_id text, custom_id text, tier text, batch_id text, owner text, max_cost_usd numeric)"
        " ON CONFLICT (call_id) DO NOTHING"), {"rows": dumps(rows)})


def resolve(conn, unconfirmed: list[dict], answered: list[str]) -> None:
    """Answered calls leave the table; unanswered ones become unconfirmed spend at their maximum
    (written whole, so a call whose 'sent' row is missing is on record all the same)."""
    if answered:
        conn.execute(sa.text("DELETE FROM provider_calls WHERE call_id = ANY(:ids) AND state = 'sent'"),
                     {"ids": list(answered)})
    if unconfirmed:
        from pipeline.stores.db import dumps
        conn.execute(sa.text(
            f"INSERT INTO provider_calls ({_COLUMNS}, state, reason, resolved_at)"
            f" SELECT {_COLUMNS}, 'unconfirmed', reason, now()"
            " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(call_id text, hold_id text, job_id text,"
            " custom_id text, tier text, batch_id text, owner text, max_cost_usd numeric, reason text)"
            " ON CONFLICT (call_id) DO UPDATE SET state = 'unconfirmed', reason = excluded.reason,"
            " resolved_at = now() WHERE provider_calls.state = 'sent'"), {"rows": dumps(unconfirmed)})


def _unconfirm(conn, where: str, params: dict, reason: str) -> tuple[list[dict], str]:
    rows = conn.execute(sa.text(
        "UPDATE provider_calls SET state = 'unconfirmed', reason = :why, resolved_at = now()"
        f" WHERE state = 'sent' AND {where}"
        " RETURNING call_id, hold_id, job_id, custom_id, tier, max_cost_usd, created_at,"
        " (SELECT j.project_id FROM jobs j WHERE j.job_id = provider_calls.job_id) AS project_id"),
        {**params, "why": reason}).mappings().all()
    return [dict(r) for r in rows], (budget.commit_xid(conn) if rows else "")


def take_over(conn, batch_id: str) -> tuple[list[dict], str]:
    """In the transaction that takes ``batch_id`` back: its calls still 'sent' were cut off with
    their worker, and may have been billed. Returns them and the transaction's id (for the settle)."""
    rows, xid = _unconfirm(conn, "batch_id = :b", {"b": batch_id},
                           "its worker stopped mid-call; the batch was taken back")
    if rows:
        log.warning("batch %s: %d calls were in flight when its worker stopped: counted as unconfirmed"
                    " spend of $%s", batch_id, len(rows), sum((r["max_cost_usd"] for r in rows), Decimal(0)))
    return rows, xid


def unconfirm_held(conn, hold_ids: list[str]) -> tuple[list[dict], str]:
    """Calls whose budget hold lapsed (its holder stopped renewing it: dead, or stalled past the
    longest a call can run), counted before the hold is let go (``ledger.rebuild``)."""
    return _unconfirm(conn, "hold_id = ANY(:ids)", {"ids": list(hold_ids)},
                      "its worker stopped renewing its budget hold mid-call")


def unconfirm_stale(conn, older_than_s: float) -> tuple[list[dict], str]:
    """Calls 'sent' longer ago than any call can run (a dead worker's, whose batch nobody took back)."""
    return _unconfirm(conn, "created_at < now() - make_interval(secs => :age)", {"age": older_than_s},
                      "no answer recorded within the longest a call can run")


def holds(rows: list[dict], xid: str, gen: str = "") -> list[budget.Reservation]:
    """The budget holds of unconfirmed calls, to settle at their maximum once ``xid`` committed."""
    out = []
    for r in rows:
        created = r.get("created_at") or datetime.now(timezone.utc)
        period = caps.day(created)
        units = units_mod.reservation_units(r["max_cost_usd"])
        out.append(budget.Reservation(r["hold_id"], gen, caps.fields_for(r["job_id"], r["tier"], period,
                                                                            r.get("project_id")),
                                      units, period, written=True, xid=xid))
    return out


def settle_sync(redis_sync, rows: list[dict], xid: str) -> None:
    """Count unconfirmed calls found by a process without a ``Budget`` (the reconcile): each dead
    hold is released and its maximum counted, unless the counters' rebuild already read it."""
    for res in holds(rows, xid):
        args = [res.rid, res.gen, res.units, res.xid, len(res.fields)] + [x for f in res.fields for x in f]
        redis_sync.eval(scripts.SETTLE, len(scripts.KEYS), *scripts.KEYS, *args)
