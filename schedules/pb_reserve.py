"""Step 1 of provider batches (schedules/pb_submit.py): reserve each held request's maximum at the
batch price, and record what the caps said.

The reservations are made through the same async ``Budget`` the workers use (pipeline/paths/base.py
``reserve``) on the scheduler's one event loop (schedules/loop.py), outside any transaction; what
they came to (``Reserved``) is recorded afterwards in the send's transaction, for the requests still
held then: the period the holds were taken in, a deferred batch with the reason in words for what
a cap refused, a failure for what can never fit.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

import sqlalchemy as sa

from pipeline import errors
from pipeline.money import caps, units
from pipeline.paths import base as sequence
from pipeline.paths.provider_batch import PROVIDER_BATCH
from pipeline.request import Outcome, Request
from pipeline.stores import db, jobs as job_store
from schedules import loop

log = logging.getLogger(__name__)


async def reserve_all(budget, reqs: list[Request], today: str) -> list[tuple[Request, object]]:
    """Step 1 of the sequence for each request, in order, on the scheduler's loop: ``(req, result)``,
    the result a ``Reservation``, None (only live holds in the way) or the exception; the first
    ``BudgetUnavailable`` ends the pass (what follows it stays held)."""
    out = []
    for req in reqs:
        try:
            res = await sequence.reserve(budget, PROVIDER_BATCH, req, wait=False, period=today, track=False)
        except errors.BudgetUnavailable as e:
            out.append((req, e))
            break
        except Exception as e:   # refused, never fits, no amount, an unknown model: that request alone
            res = e
        out.append((req, res))
    return out


@dataclass
class Reserved:
    """What the reservations of one (provider, model) group came to."""
    fit: list = field(default_factory=list)      # (request, Reservation): to send
    defer: list = field(default_factory=list)    # (request, BudgetExceeded): a cap refused it for now
    fail: list = field(default_factory=list)     # (request, error): fails at once
    waiting: int = 0                             # only other live holds stood in front: next tick
    store_down: bool = False                     # the budget store was unreachable: the rest stays held


def reserve(budget, reqs: list[Request], today: str) -> Reserved:
    """Reserve each request's maximum at the batch price, in ``today``'s period, outside any
    transaction; classify the outcomes (``Reserved``) for the send to record (schedules/pb_submit.py)."""
    got = Reserved()
    for r, res in loop.run(reserve_all(budget, reqs, today)):
        if isinstance(res, errors.BudgetUnavailable):
            log.warning("provider batches: budget store unreachable, %d requests stay held: %s",
                        len(reqs) - len(got.fit) - len(got.defer) - len(got.fail) - got.waiting, res)
            got.store_down = True
            break
        if isinstance(res, (errors.InvalidAmount, errors.BudgetNeverFits)) or (
                isinstance(res, errors.BudgetExceeded) and r.on_budget == "fail"):   # as the workers do
            got.fail.append((r, res))
        elif isinstance(res, errors.BudgetExceeded):
            got.defer.append((r, res))
        elif isinstance(res, Exception):   # an unknown model, a broken row: that request fails, alone
            got.fail.append((r, errors.InvalidAmount(f"cannot price this request for its reservation: {res}")))
        elif res is None:
            got.waiting += 1         # other live holds may settle below their maximum: try next tick
        else:
            got.fit.append((r, res))
    if got.waiting:
        log.info("provider batches: %d requests wait for live holds under their caps; next tick", got.waiting)
    return got


def record_period(conn, reqs, today: str) -> None:
    """The period the requests' holds were taken in (``requests.budget_period``), in the transaction
    that sends them: ingestion writes their spend there, a rebuild re-holds them there."""
    if reqs:
        conn.execute(sa.text(
            "UPDATE requests r SET budget_period = CAST(:p AS date)"
            " FROM jsonb_to_recordset(CAST(:k AS jsonb)) AS x(job_id text, custom_id text)"
            " WHERE r.job_id = x.job_id AND r.custom_id = x.custom_id"),
            {"p": today, "k": db.dumps([{"job_id": r.job_id, "custom_id": r.custom_id} for r in reqs])})


def apply_budget_outcomes(conn, fit, defer, fail) -> list:
    for (batch_id, kind), items in defer.items():
        target = "b_" + uuid.uuid4().hex
        until = caps.next_day() if kind in ("global", "tier") else None
        conn.execute(sa.text(
            "INSERT INTO batches (batch_id, tier, provider, model, size, status, mode, deferred_until)"
            " SELECT :new, tier, provider, model, :n, 'deferred', mode, :u FROM batches WHERE batch_id = :b"),
            {"new": target, "n": len(items), "b": batch_id, "u": until})
        conn.execute(sa.text(
            "UPDATE requests r SET batch_id = :new, status = 'deferred', deferred_scope = x.scope,"
            " deferred_reason = x.reason FROM jsonb_to_recordset(CAST(:rows AS jsonb))"
            " AS x(job_id text, custom_id text, scope text, reason text)"
            " WHERE r.job_id = x.job_id AND r.custom_id = x.custom_id AND r.batch_id = :b"),
            {"new": target, "b": batch_id, "rows": db.dumps(
                [{"job_id": r.job_id, "custom_id": r.custom_id, "scope": k, "reason": why}
                 for r, k, why in items])})
        conn.execute(sa.text("UPDATE batches SET size = size - :n WHERE batch_id = :b"),
                     {"n": len(items), "b": batch_id})
        log.info("provider batches: %d requests of batch %s deferred (%s): %s", len(items), batch_id, kind,
                 items[0][2])
    if fail:
        sequence.write(conn, [Outcome.failed(r, e.code, str(e)) for r, e in fail], [])
        log.warning("provider batches: %d requests failed before sending: %s", len(fail), fail[0][1])
    jobs = {r.job_id for r, _ in fail} | {r.job_id for items in defer.values() for r, _, _ in items}
    if jobs:
        job_store.refresh_jobs(conn, jobs)
    return fit


def defer_reason(r: Request, e: errors.BudgetExceeded) -> str:
    amount = PROVIDER_BATCH.reservation(r)
    return (f"deferred: the {e.scope} cap ${e.cap} has ${e.spent} spent and cannot hold this"
            f" request's maximum of ${amount.quantize(units.UNIT)} at the batch price")
