"""Asked before every provider call of a batch: may it go out now? (step 3 of workers/execute.py)

``Gate`` says no once the batch's lease is lost (``LeaseLost``) or the request's job is
cancelled (``RequestCancelled``), and writes the call's record in the same round trip when
it may go; ``CallRecord`` is that record for ``Limited``; ``Gated`` wraps a provider so
every call asks first. No call leaves without asking.
"""

from __future__ import annotations

import asyncio
import logging

from pipeline.errors import LLMBatchError
from pipeline.money import budget, calls
from pipeline.money.units import from_units
from pipeline.request import Request
from pipeline.stores import db, jobs as job_store
from workers.writer import OutcomeWriter, describe_error

log = logging.getLogger(__name__)

class WorkStopped(LLMBatchError):
    """A request's call was not sent: see the subclasses."""


class RequestCancelled(WorkStopped):
    """Its job was cancelled."""


class LeaseLost(WorkStopped):
    """The batch's lease is no longer ours: its new holder runs the request."""



class Gate:
    """Asked before every provider call: may this request's call go out now?

    No, once the batch's lease is lost (``lost``), or when the request's job is
    cancelled. The job check reads Postgres, coalesced: the requests asking
    while one query runs share the next, so each answer is read after its
    question was asked. Postgres unreachable: the call waits (fail closed).

    A call that asks with its record (``call``, pipeline/money/calls.py) is written in
    the same transaction when it may go: durable before it is sent, at no round
    trip of its own. Once on record it goes, even if the lease is lost meanwhile.
    """

    def __init__(self, engine, lost: asyncio.Event):
        self.engine, self.lost = engine, lost
        self.cancelled: set[str] = set()
        self._waiting: list[tuple[str, asyncio.Future, dict | None]] = []
        self._wake = asyncio.Event()

    async def check(self, job_id: str, call: dict | None = None) -> None:
        if self.lost.is_set():
            raise LeaseLost("the batch's lease is lost: left to its new holder")
        if job_id not in self.cancelled:
            fut = asyncio.get_running_loop().create_future()
            self._waiting.append((job_id, fut, call))
            self._wake.set()
            if await fut:   # on record: it goes
                return
        if job_id in self.cancelled:
            raise RequestCancelled(f"job {job_id} was cancelled")
        if self.lost.is_set():
            raise LeaseLost("the batch's lease is lost: left to its new holder")

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            waiting, self._waiting = self._waiting, []
            jobs = {j for j, _, _ in waiting}

            def ask(conn):
                found = job_store.cancelled_jobs(conn, jobs)
                going = [] if self.lost.is_set() else [
                    c for j, _, c in waiting if c is not None and j not in found and j not in self.cancelled]
                calls.record_sent(conn, going)
                return found, {c["call_id"] for c in going}
            try:
                # each statement alone: under READ COMMITTED one transaction saw no more (a cancel
                # after the read goes unseen either way), and the insert is durable when it returns
                found, recorded = await asyncio.to_thread(
                    db.retrying, self.engine, ask, what="checking for cancelled jobs", each_statement=True)
                self.cancelled |= found
            except Exception as e:   # not transient (a bug): the calls wait for the next round
                log.error("cancel check failed: %s", describe_error(e))
                self._waiting[:0] = waiting
                self._wake.set()
                await asyncio.sleep(1.0)
                continue
            for _, fut, call in waiting:
                if not fut.done():
                    fut.set_result(call is not None and call["call_id"] in recorded)


class CallRecord:
    """The batch's record of provider calls that may be billed (pipeline/money/calls.py), for ``Limited``.

    ``sending``: on record (with the ``Gate``'s check) before the call leaves; ``answered``:
    off the record at the next write; ``unconfirmed``: no answer, so the call is spend at its
    maximum: its hold moves aside and stays until the write is durable, then is settled at
    the maximum. Nothing returns to the caps when a hold would have expired.
    """

    def __init__(self, gate: Gate, writer: OutcomeWriter, batch_id: str | None, owner: str | None):
        self.gate, self.writer, self.batch_id, self.owner = gate, writer, batch_id, owner

    def _row(self, req: Request, res: budget.Reservation, call_id: str) -> dict:
        return {"call_id": call_id, "hold_id": res.rid, "job_id": req.job_id, "custom_id": req.custom_id,
                "tier": req.tier, "batch_id": self.batch_id, "owner": self.owner,
                "max_cost_usd": str(from_units(res.units))}

    async def sending(self, req: Request, res: budget.Reservation, call_id: str) -> None:
        await self.gate.check(req.job_id, self._row(req, res, call_id))

    def answered(self, call_id: str | None) -> None:
        if call_id:
            self.writer.answered.append(call_id)

    async def unconfirmed(self, req: Request, res: budget.Reservation, call_id: str | None, why: str) -> None:
        log.warning("request %s: the call may have been billed (%s): $%s counted as unconfirmed spend",
                    req.key, why, from_units(res.units), extra=req.log_context())
        try:
            held = await self.writer.budget.detach(res)
        except Exception as e:   # Redis away: the ledger has it, and the reconcile brings the counters to it
            log.warning("budget: the hold of %s could not be kept (%s); the reconcile counts it", res.rid, e)
            held = None
        # the row and its settle in the same write: the settle then carries that write's xid
        self.writer.unconfirmed.append(dict(self._row(req, res, call_id or f"{res.rid}.?"), reason=why[:500]))
        if held is not None:
            self.writer.settles.append((held, from_units(held.units)))
        self.writer.wake.set()


class Gated:
    """A provider whose every call first asks the batch's ``Gate``."""

    def __init__(self, provider, gate: Gate, job_id: str):
        self.provider, self.gate, self.job_id = provider, gate, job_id
        self.name = provider.name

    def __getattr__(self, name):
        return getattr(self.provider, name)

    async def call(self, body: dict, *, headers: dict, **kw):
        await self.gate.check(self.job_id)
        return await self.provider.call(body, headers=headers, **kw)
