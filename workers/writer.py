"""Outcomes of a batch's requests, written to Postgres in bulk (step 4 of workers/execute.py).

``OutcomeWriter`` buffers ``Outcome``s and attempts and writes them off the event loop, a
group commit at a time, retried until durable (the sequence's write step,
pipeline/paths/base.py); after the commit the reservations are settled (its settle step).
``internal_error`` is the failed outcome of a request the worker could not run or store. It
must never empty its buffers before the commit.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from pipeline import metrics
from pipeline.config import get_settings
from pipeline.ids import request_key
from pipeline.money import budget, calls, deferral
from pipeline.paths import base as sequence
from pipeline.request import Outcome, Request
from pipeline.stores import batches, db, jobs as job_store
from pipeline.stores.cache import ResponseCache

log = logging.getLogger(__name__)

@functools.cache
def _response_cache() -> ResponseCache:
    settings = get_settings()
    return ResponseCache(settings.redis_url, settings.cache_ttl_s)


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]



class OutcomeWriter:
    """Buffers outcomes and attempts and writes them in bulk, off the event loop.

    A write is retried until it is durable: the buffers are emptied only after
    the commit, so a failed write loses nothing (outcomes that finish meanwhile
    wait in the buffers for the next one). A transient error (Postgres down,
    connection dropped, deadlock) is waited out with backoff; a row Postgres
    refuses outright is isolated and its request failed with the reason.
    """

    def __init__(self, engine, batch_id: str | None = None, *, sleep=time.sleep):
        self.engine = engine
        self.batch_id = batch_id
        self.sleep = sleep                        # between retries (in the writer's thread)
        self.outcomes: list[Outcome] = []
        self.attempts: list[dict] = []
        self.deferred: list[dict] = []            # requests a cap refused (pipeline/money/deferral.py)
        self.deferred_kinds: set[str] = set()     # 'job' | 'global' | 'tier' | 'unavailable', whole batch
        self.settles: list[tuple] = []            # (reservation, actual cost) to settle after the write
        self.unconfirmed: list[dict] = []         # calls that may have been billed (pipeline/money/calls.py)
        self.answered: list[str] = []             # calls answered: off the record of calls in flight
        self.budget: budget.Budget | None = None
        self.lock = asyncio.Lock()
        self.wake = asyncio.Event()               # an outcome waits to be written
        self.settling: set[asyncio.Task] = set()  # settlements of written outcomes, still running

    @property
    def unwritten(self) -> int:
        return len(self.outcomes) + len(self.attempts) + len(self.deferred) + len(self.unconfirmed)

    async def flush(self) -> None:
        """Write what has finished; settle its reservations and cache its answers after,
        in the background, so the next write need not wait for Redis."""
        async with self.lock:
            n_o, n_a, n_d, n_s = len(self.outcomes), len(self.attempts), len(self.deferred), len(self.settles)
            n_u, n_c = len(self.unconfirmed), len(self.answered)
            outcomes, attempts, deferred = self.outcomes[:n_o], self.attempts[:n_a], self.deferred[:n_d]
            settles = self.settles[:n_s]
            unconfirmed, answered = self.unconfirmed[:n_u], self.answered[:n_c]
            if outcomes or attempts or deferred or unconfirmed or answered:
                xids = await asyncio.to_thread(self._write_durably, outcomes, attempts, deferred,
                                               unconfirmed, answered)
                for res, _ in settles:   # a settle retried from an earlier write keeps that write's xid
                    res.written, res.xid = True, xids.get(res.rid.rsplit("~", 1)[0], res.xid)
            # only now, with the rows committed, leave the buffers (appends went on behind them)
            del self.outcomes[:n_o], self.attempts[:n_a], self.deferred[:n_d], self.settles[:n_s]
            del self.unconfirmed[:n_u], self.answered[:n_c]
        # an answer taken without a call (the cache, single flight) is in the cache already
        answers = {o.cache_key: o.response for o in outcomes
                   if o.cache_key and o.status == "succeeded" and not o.from_cache}
        if settles or answers:   # only once the ledger holds the cost: a rebuild from it then misses nothing
            task = asyncio.create_task(self._after_write(settles, answers))
            self.settling.add(task)
            task.add_done_callback(self.settling.discard)

    async def drain(self) -> None:
        """The last write, and every settlement: the batch is over only when its spend is settled."""
        await self.flush()
        await asyncio.gather(*self.settling, return_exceptions=True)
        if self.settles or self.unwritten:   # failed settlements: one more try, then they expire
            await self.flush()
            await asyncio.gather(*self.settling, return_exceptions=True)

    async def _after_write(self, settles, answers) -> None:
        if settles:
            await self._settle(settles)
        if answers:
            try:
                await asyncio.to_thread(_response_cache().put_many, answers)
            except Exception as e:   # a cache miss later costs a call, nothing else
                log.warning("response cache: storing %d answers failed: %s", len(answers), e)

    async def _settle(self, settles) -> None:
        results = await asyncio.gather(*(self.budget.settle(r, spent) for r, spent in settles),
                                       return_exceptions=True)
        failed = [s for s, r in zip(settles, results) if isinstance(r, BaseException)]
        if failed:   # kept for the next flush; an expired reservation still settles ('late')
            log.warning("budget: %d settlements failed, retried at the next flush: %s", len(failed),
                        next(r for r in results if isinstance(r, BaseException)))
            self.settles.extend(failed)

    def _write_durably(self, outcomes, attempts, deferred, unconfirmed=(), answered=()) -> dict[str, str]:
        """One transaction, retried until it commits; a refused row is isolated.
        Returns the id of the transaction that committed each outcome and each unconfirmed call
        (``budget.commit_xid``), by request."""
        what = f"writing {len(outcomes)} outcomes of batch {self.batch_id}"
        try:
            xid = db.retrying(self.engine, lambda conn: self._write(conn, outcomes, attempts, deferred,
                                                                    unconfirmed, answered),
                              what=what, sleep=self.sleep)
            xids = {_rid(u): xid for u in unconfirmed} | {o.key: xid for o in outcomes}
        except Exception as e:
            log.error("%s: Postgres refused the write (%s); writing row by row to isolate it", what, describe_error(e))
            xids = self._write_one_by_one(outcomes, attempts, deferred)
            xid = db.retrying(self.engine, lambda conn: self._write(conn, [], [], [], unconfirmed, answered),
                              what="recording calls that may have been billed", sleep=self.sleep)
            xids.update({_rid(u): xid for u in unconfirmed})
        # the one metrics hook for request outcomes: counted once the rows are durable
        metrics.record_outcomes([o.to_row() for o in outcomes], attempts)
        return xids

    def _write_one_by_one(self, outcomes, attempts, deferred) -> dict[str, str]:
        xids: dict[str, str] = {}

        def each(rows, write, what):
            for row in rows:
                try:
                    key = row.key if isinstance(row, Outcome) else _rid(row)
                    xids[key] = db.retrying(self.engine, lambda conn: write(conn, row), what=what, sleep=self.sleep)
                except Exception as e:
                    yield row, e
        for o, e in list(each(outcomes, lambda c, o: self._write(c, [o], [], []), "writing an outcome")):
            log.error("request %s: its outcome cannot be stored (%s); recorded as failed", o.key, describe_error(e))
            bad = Outcome(o.job_id, o.custom_id, o.model, "failed", attempts=o.attempts, cost=o.cost,
                          list_cost=o.list_cost, path=o.path, usage=o.usage, budget_period=o.budget_period,
                          error={"code": "internal_error",
                                 "message": f"the outcome could not be stored: {describe_error(e)}"})
            xids[o.key] = db.retrying(self.engine, lambda conn: self._write(conn, [bad], [], []),
                                      what="writing an outcome", sleep=self.sleep)
        for a, e in list(each(attempts, lambda c, a: self._write(c, [], [a], []), "writing an attempt")):
            log.error("attempt %s of %s cannot be stored (%s): dropped", a.get("attempt"), _rid(a), describe_error(e))
        db.retrying(self.engine, lambda conn: self._write(conn, [], [], deferred), what="writing deferrals",
                    sleep=self.sleep)
        return xids

    def _write(self, conn, outcomes, attempts, deferred=(), unconfirmed=(), answered=()) -> str:
        if self.batch_id is not None:
            batches.lock_batch(conn, self.batch_id)   # lock order: batch, requests, jobs (pipeline/stores/batches.py)
        sequence.write(conn, outcomes, attempts)
        deferral.write_deferred(conn, list(deferred))
        calls.resolve(conn, list(unconfirmed), list(answered))
        job_store.refresh_jobs(conn, {o.job_id for o in outcomes})
        return budget.commit_xid(conn) if outcomes or unconfirmed else ""


def _rid(row: dict) -> str:
    """The request key of an attempt or unconfirmed-call row (their hold ids carry a suffix:
    workers/limited.py)."""
    return request_key(row["job_id"], row["custom_id"])


def internal_error(req: Request, message: str, code: str = "internal_error") -> Outcome:
    """The failed outcome of a request the worker could not run as it should."""
    return Outcome.failed(req, code, message)
