"""Execution of one batch: its requests run concurrently, results land in Postgres.

1. take the batch's lease (a second delivery of the same batch while the first
   is alive does nothing; a redelivery after a crash takes it back, and counts
   the crash: a batch whose runs keep ending unfinished is failed as poison);
2. load the requests not yet finished: a redelivered batch redoes only those
   (requests of a cancelled job become ``cancelled`` here);
3. run them on the event loop inside an ``asyncio.TaskGroup``, at most the
   tier's in-flight cap at once, each with bounded retries. A deterministic request
   first takes its single-flight turn (workers/coalesce.py), outside the cap: a repeat
   of a request in flight, here or in any process, takes its answer without a call. A request that
   raises unexpectedly fails alone (``internal_error``); if the batch itself is
   abandoned, nothing of it is left running. Before every provider call the
   request asks the ``Gate``: a cancelled job's request, or any request once the
   lease is lost, is not sent;
   the first request of a prompt-cache prefix group (``group_key``) runs before
   the rest of its group, which read the cache it writes (they wait at most
   ``prompt_cache_warm_s``; a call reads only what finished before it started);
4. write outcomes and attempts in bulk as they finish (group commit: the
   outcomes that finish during one write share the next), so a crash loses
   at most a write's worth of finished work; each write is idempotent and is
   retried until it is durable (a Postgres outage is waited out);
5. mark the batch done and end the jobs whose requests are all finished; never
   while an outcome of the batch is unwritten, and never once the lease is lost.

The lease is renewed in the background; a renewal that fails is retried with
backoff until the lease would run out. Lost (another owner took it, or it
could not be renewed in time): no new provider call starts, calls in flight
finish and are written, and the batch is left to its new holder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import timedelta

from pipeline.clock import budget_now
from pipeline.config import Settings
from pipeline.constants import IMMEDIATE_TIER
from pipeline.endpoints.prompt_cache import group_key
from pipeline.errors import (
    BudgetExceeded, BudgetScriptError, BudgetUnavailable, InvalidAmount, PermanentProviderError, ProviderError,
)
from pipeline.money import calls, deferral
from pipeline.money.pricing import get_price_book
from pipeline.money.units import from_units
from pipeline.paths import base as sequence
from pipeline.paths.registry import path_for
from pipeline.providers.base import at_url, get_provider
from pipeline.providers.registry import get_registry
from pipeline.providers.retries import AttemptRecord, call_with_retries
from pipeline.request import Outcome, Request
from pipeline.stores import batches, db, jobs as job_store
from workers.coalesce import coalescer_for
from workers.fallback import fallback_for
from workers.gate import CallRecord, Gate, Gated, LeaseLost, RequestCancelled
from workers.limited import Limited, budget_for, limiter_for
from workers.writer import OutcomeWriter, describe_error, internal_error

log = logging.getLogger(__name__)

#: a batch whose runs ended this many times without finishing it is failed as poison
MAX_CRASHES = 5
#: a write starts this long after the first outcome that waits for it, so outcomes
#: finishing together share one transaction
FLUSH_COALESCE_S = 0.02
#: a task stops taking further batches of its tier after this long (far below the
#: broker's visibility timeout, so the broker never hands its first batch out again)
CHAIN_MAX_S = 600.0
#: lease renewal: retry a failed renewal after this long, doubling up to the cap
RENEW_RETRY_S, RENEW_RETRY_MAX_S = 0.5, 5.0


async def prepare(settings: Settings) -> None:
    """Make this process's SDK clients, budget and limiter now (a new pool process), so
    its first batch does not pay for them."""
    get_price_book()
    for spec in get_registry():
        get_provider(spec.name, settings)
    limiter_for(settings, budget_for(settings, db.get_engine()))


async def run_request(req: Request, settings: Settings, writer: OutcomeWriter, gate: Gate | None = None,
                      owner: str | None = None, on_answer=None) -> str:
    """Run one request on its path (pipeline/paths/): reserve (in ``Limited``), call, price; its
    outcome goes to ``writer``, which writes it and then settles, and to ``on_answer`` (the single
    flight's ``Turn.publish``: identical requests waiting for it take it). Returns 'succeeded',
    'failed', 'deferred', 'cancelled' or 'abandoned' (lease lost before its call: no outcome)."""
    path = path_for(req.path)
    prices = get_price_book()
    prices.resolve(req.model, req.provider)   # a model this worker cannot price fails here, before any call
    # the request's endpoint url goes with every call (at_url), under the path's caller
    caller = path.caller(at_url(get_provider(req.provider, settings), req.endpoint), settings)
    provider = caller
    if writer.budget is not None:
        # the gate is asked by the call's record, right before it is sent (CallRecord)
        record = CallRecord(gate, writer, writer.batch_id, owner) if gate is not None else None
        provider = Limited(caller, req, writer.budget, limiter_for(settings, writer.budget),
                           fallback_for(req, prices), settings.fallback_rate_wait_s, calls=record)
    elif gate is not None:
        provider = Gated(caller, gate, req.job_id)
    ctx = req.log_context()   # log correlation
    headers = {"Idempotency-Key": req.key, "X-LLMBatch-Tier": req.tier}

    last = {"attempt": req.attempts, "row": None}

    def on_attempt(a: AttemptRecord) -> None:
        row = {"job_id": req.job_id, "custom_id": req.custom_id, "attempt": a.attempt,
               "status_code": a.status_code, "error": a.error, "latency_ms": a.latency_ms,
               "provider_request_id": a.request_id, "cost_usd": "0", "provider": req.provider,
               "key_alias": getattr(provider, "key_alias", None)}   # the key's alias, never the key
        last.update(attempt=a.attempt, row=row)
        writer.attempts.append(row)
        writer.wake.set()   # a refused attempt is on record even while its retry waits

    try:
        answer = await call_with_retries(provider, req.body, headers=headers, settings=settings,
                                         first_attempt=req.attempts + 1, on_attempt=on_attempt)
    except RequestCancelled as e:
        writer.outcomes.append(Outcome.cancelled(req, str(e), attempts=last["attempt"]))
        return "cancelled"
    except LeaseLost:
        return "abandoned"
    except (BudgetExceeded, InvalidAmount) as e:
        # a maximum above the cap itself, or no valid amount, can never be reserved: fail now, alone
        if req.on_budget == "fail" or e.permanent:
            writer.outcomes.append(Outcome.failed(req, e.code, str(e), attempts=last["attempt"]))
            return "failed"
        writer.deferred.append({"job_id": req.job_id, "custom_id": req.custom_id, "scope": e.kind,
                                "reason": str(e)})
        writer.deferred_kinds.add(e.kind)
        return "deferred"
    except BudgetUnavailable as e:   # fail closed: no call without a reservation
        # a script's refusal is a bug to fix, not an outage to wait out: say so at error level
        (log.error if isinstance(e, BudgetScriptError) else log.warning)(
            "request %s deferred: %s", req.key, e, extra=ctx)
        writer.deferred.append({"job_id": req.job_id, "custom_id": req.custom_id, "scope": "unavailable"})
        writer.deferred_kinds.add("unavailable")
        return "deferred"
    except ProviderError as e:
        code = getattr(e, "code", None) or (
            "provider_error" if isinstance(e, PermanentProviderError) else "attempts_exhausted")
        writer.outcomes.append(Outcome.failed(req, code, str(e), attempts=last["attempt"],
                                              status_code=e.status_code, provider_request_id=e.request_id,
                                              key_alias=getattr(provider, "key_alias", None)))
        return "failed"
    reservation = provider.reservation if isinstance(provider, Limited) else None
    # the call was sent its latency before now, by the caps' one clock (tests move it): the price
    # window in force then prices it (pipeline/money/price_windows.py)
    sent_at = budget_now(settings, db.get_engine()) - timedelta(milliseconds=answer.latency_ms or 0)
    outcome = sequence.answered(
        path, req, answer.body, prices, model=getattr(provider, "model", req.model),   # the fallback's, when it answered
        served=getattr(caller, "served", None), attempts=last["attempt"], status_code=answer.status_code,
        provider_request_id=answer.request_id, latency_ms=answer.latency_ms,
        key_alias=getattr(provider, "key_alias", None),   # the key's alias, never the key
        # its spend is the period of its hold, in the ledger too
        budget_period=reservation.period if reservation is not None else None, at=sent_at)
    last["row"]["cost_usd"] = str(outcome.cost)
    if outcome.usage_missing:
        log.warning("request %s answered without usage: recorded as usage_missing, cost unknown", req.key,
                    extra=ctx)
    writer.outcomes.append(outcome)
    if reservation is not None:
        # no usage: the cost is unknown, so the maximum stays spent
        writer.settles.append((reservation, sequence.settle_amount(outcome, reservation.units)))
    if on_answer is not None:
        await on_answer(outcome)
    return "succeeded"


async def _flusher(writer: OutcomeWriter, done: asyncio.Event) -> None:
    """Group commit: write as soon as an outcome waits and the previous write is over. The
    coalescing wait ends early when the batch's last request is over: nothing else can join
    (a batch of one immediate request used to wait the whole of it for nobody)."""
    while not done.is_set():
        await writer.wake.wait()
        if done.is_set():
            return
        try:
            await asyncio.wait_for(done.wait(), FLUSH_COALESCE_S)
        except TimeoutError:
            pass
        if done.is_set():   # the drain writes what waits, now
            return
        writer.wake.clear()
        try:
            await writer.flush()
        except Exception as e:   # the outcomes stay buffered: the next flush (or the drain) writes them
            log.error("batch %s: a write failed: %s", writer.batch_id, describe_error(e))
            await asyncio.sleep(1.0)
            writer.wake.set()


async def _keep_lease(engine, batch_id: str, owner: str, lease_s: float, lost: asyncio.Event, *,
                      clock=time.monotonic, sleep=asyncio.sleep) -> None:
    """Renew the lease every third of its length until cancelled.

    A renewal that fails is retried with backoff (one log line when renewals
    start failing, one when they work again). The lease is lost when a renewal
    finds it is not ours any more, or when it could not be renewed before it
    runs out: then ``lost`` is set and this returns.
    """
    expires = clock() + lease_s   # by our clock; Postgres set it a little later, never earlier
    margin = lease_s / 10         # give up this long before it runs out: no call may outlive our lease
    failing_since = None
    delay = RENEW_RETRY_S

    def renew() -> bool:
        with engine.begin() as conn:
            return batches.renew_lease(conn, batch_id, owner, lease_s)

    while True:
        await sleep(lease_s / 3 if failing_since is None else delay)
        asked = clock()
        if asked >= expires - margin:
            log.error("batch %s: lease expired before it could be renewed (failing since %.1f s): "
                      "no new provider calls; calls in flight finish", batch_id, asked - (failing_since or asked))
            lost.set()
            return
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for returns a result that arrives with a
            # cancellation and swallows it, and a keeper that outlives its batch keeps it open
            async with asyncio.timeout(max(0.1, expires - margin - asked)):
                ours = await asyncio.to_thread(renew)
        except Exception as e:   # Postgres down, a dropped connection, a slow statement: try again
            if failing_since is None:
                failing_since = asked
                log.warning("batch %s: lease renewal failed (%s); retrying with backoff", batch_id, describe_error(e))
            delay = min(delay * 2, RENEW_RETRY_MAX_S, max(0.05, (expires - margin - clock()) / 2))
            continue
        if not ours:
            log.error("batch %s: lease taken by another owner (or the batch ended): no new provider calls; "
                      "calls in flight finish", batch_id)
            lost.set()
            return
        expires = asked + lease_s
        if failing_since is not None:
            log.warning("batch %s: lease renewed again after %.1f s of failures", batch_id, asked - failing_since)
            failing_since, delay = None, RENEW_RETRY_S


async def run_batch(batch_id: str, *, owner: str, settings: Settings, engine=None) -> dict:
    """Run the batch; once all of its requests have started, take the tier's next
    dispatched batch too (``batches.claim_next_batch``) and feed it through the same
    in-flight slots. A process so never idles at a batch's tail, and in-flight work
    stays level across batch boundaries. The stolen batch's own Celery task finds its
    lease held (or the batch done) and does nothing.

    The batches run in one TaskGroup: if this task is abandoned, none of them is
    left running. A batch that fails does not stop the others; the first failure
    is raised once all are over.
    """
    engine = engine or db.get_engine()
    started = time.monotonic()
    lease_s = settings.batch_lease_s
    claimed = await _claim(engine, lambda conn: batches.claim_batch(conn, batch_id, owner, lease_s), batch_id)
    if claimed is None:
        return {"skipped": "done or leased by a live worker"}
    tier = claimed[0]["tier"]
    sem = asyncio.Semaphore(settings.inflight_per_batch[tier])
    runs, holder = [], owner

    async def guarded(batch, requests, holder, drained):
        try:
            return await _run_claimed(batch, requests, owner=holder, settings=settings, engine=engine,
                                      sem=sem, drained=drained)
        except Exception as e:   # reported below, after the other batches are over
            log.error("batch %s failed: %s", batch["batch_id"], describe_error(e), exc_info=True)
            return e

    async with asyncio.TaskGroup() as tg:
        while claimed is not None:
            drained = asyncio.Event()
            run = tg.create_task(guarded(*claimed, holder, drained))
            runs.append(run)
            waiter = tg.create_task(drained.wait())
            await asyncio.wait([run, waiter], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if (run.done() and isinstance(run.result(), BaseException)) or time.monotonic() - started > CHAIN_MAX_S:
                break
            holder = f"{owner}/{len(runs)}"   # a lease of its own: the batch's Celery task is another owner
            claimed = await _claim(engine, lambda conn, h=holder: batches.claim_next_batch(conn, tier, h, lease_s),
                                   f"next {tier} batch")
    outcomes = [r.result() for r in runs]
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    if failed:
        raise failed[0]
    keys = ("succeeded", "failed", "deferred", "cancelled", "abandoned", "requests")
    totals = {k: sum(o.get(k, 0) for o in outcomes) for k in keys}
    return dict(totals, batches=len(runs), seconds=round(time.monotonic() - started, 3))


async def _claim(engine, take, what: str) -> tuple[dict, list[dict]] | None:
    """In one transaction: lease a batch with ``take(conn)`` and mark its open requests running.

    Waits out a Postgres outage (the batch is not taken meanwhile, so nothing is lost)."""
    def work(conn):
        batch = take(conn)
        if not batch:
            return None
        # calls still on record as sent were cut off with the batch's last worker: spent, unconfirmed
        batch["calls_cut_off"] = calls.take_over(conn, batch["batch_id"])
        return batch, [Request.from_row(r) for r in batches.open_requests(conn, batch["batch_id"])]
    return await asyncio.to_thread(db.retrying, engine, work, what=f"claiming {what}")


async def _run_claimed(batch: dict, requests: list[dict], *, owner: str, settings: Settings, engine,
                       sem: asyncio.Semaphore, drained: asyncio.Event) -> dict:
    try:
        return await _execute(batch, requests, owner=owner, settings=settings, engine=engine, sem=sem,
                              drained=drained)
    except BaseException as e:
        # Give the lease back so the sweep re-dispatches the batch (a crash: bounded by MAX_CRASHES).
        reason = describe_error(e) if isinstance(e, Exception) else "its worker task was stopped"
        try:
            await asyncio.shield(asyncio.to_thread(
                db.retrying, engine, lambda conn: batches.release_lease(conn, batch["batch_id"], owner, reason),
                what=f"releasing batch {batch['batch_id']}", patience_s=30.0))
        except Exception as release_error:   # the lease runs out by itself
            log.warning("batch %s: could not release its lease: %s", batch["batch_id"], describe_error(release_error))
        raise


def _poison(batch: dict, requests: list[dict]) -> list[dict]:
    why = batch.get("last_failure") or "each time its worker died or lost the lease mid-batch"
    message = (f"batch {batch['batch_id']} was left unfinished {batch['crashes']} times ({why}); "
               f"its open requests are failed so that it stops being retried")
    log.error("%s: failing %d requests", message, len(requests), extra={"batch": batch["batch_id"], "tier": batch["tier"]})
    return [internal_error(r, message, "batch_poison") for r in requests]


class PrefixGroups:
    """The requests of one prompt-cache prefix group run after their group's first one is done:
    a provider call reads only the cache entries written before it started, so a group sent all at
    once would write the prefix once per request and read it never."""

    def __init__(self, wait_s: float):
        self.wait_s = wait_s
        self.leads: dict[str, asyncio.Event] = {}   # group -> set when its first request is done

    @contextlib.asynccontextmanager
    async def turn(self, body: dict):
        group, lead = (group_key(body) if self.wait_s > 0 else None), None
        if group is not None and group in self.leads:
            try:
                await asyncio.wait_for(self.leads[group].wait(), self.wait_s)
            except TimeoutError:
                pass   # the first is slow (retries, a deferral): the rest go on without its cache
        elif group is not None:
            lead = self.leads[group] = asyncio.Event()
        try:
            yield
        finally:
            if lead is not None:
                lead.set()


async def _execute(batch: dict, requests: list[dict], *, owner: str, settings: Settings, engine,
                   sem: asyncio.Semaphore, drained: asyncio.Event) -> dict:
    batch_id = batch["batch_id"]
    writer = OutcomeWriter(engine, batch_id)
    writer.budget = budget_for(settings, engine)
    cut_off, xid = batch.get("calls_cut_off") or ([], "")
    for res in calls.holds(cut_off, xid):   # their dead holds become spend at their maximum
        await writer.budget.settle(res, from_units(res.units))
    jobs = {r.job_id for r in requests}
    if batch.get("crashes", 0) >= MAX_CRASHES and requests:
        writer.outcomes.extend(_poison(batch, requests))
        requests = []
    counts = {"succeeded": 0, "failed": 0, "deferred": 0, "cancelled": 0, "abandoned": 0}
    waiting = len(requests)
    if not waiting:
        drained.set()
    lost = asyncio.Event()
    gate = Gate(engine, lost)
    coalescer = coalescer_for(settings)

    # the immediate tier never waits for a group's first request: its latency comes first
    groups = PrefixGroups(0 if batch.get("tier") == IMMEDIATE_TIER else settings.prompt_cache_warm_s)

    def started(flag: list):
        nonlocal waiting
        if not flag:
            flag.append(True)
            waiting -= 1
            if not waiting:   # every request has started: the chain may take the next batch
                drained.set()

    async def one(req):
        # a prompt-cache group's later requests wait for its first (then single flight, then a slot)
        async with groups.turn(req.body):
            await _one(req)

    async def _one(req):
        begun: list = []
        try:
            # single flight first, outside the slots: a repeat of a request in flight takes its answer
            async with coalescer.turn(req, on_wait=lambda: started(begun)) as turn:
                if turn.outcome is not None:   # answered without a call: cost 0, a cache hit
                    started(begun)
                    writer.outcomes.append(turn.outcome)
                    counts["succeeded"] += 1
                else:
                    async with sem:
                        started(begun)
                        counts[await run_request(req, settings, writer, gate, owner, turn.publish)] += 1
        except Exception as e:   # fails alone, on record; its siblings go on
            log.error("request %s failed unexpectedly: %s", req.key, describe_error(e),
                      exc_info=True, extra={"batch": batch_id, "job": req.job_id})
            writer.outcomes.append(internal_error(req, f"the worker could not run it: {describe_error(e)}"))
            counts["failed"] += 1
        started(begun)
        writer.wake.set()

    done = asyncio.Event()
    async with asyncio.TaskGroup() as helpers:
        flusher = helpers.create_task(_flusher(writer, done))
        keeper = helpers.create_task(_keep_lease(engine, batch_id, owner, settings.batch_lease_s, lost))
        checker = helpers.create_task(gate.run())
        try:
            async with asyncio.TaskGroup() as tg:
                for r in requests:
                    tg.create_task(one(r))
        finally:
            done.set()
            writer.wake.set()
            keeper.cancel()
            checker.cancel()
        await flusher
    await writer.drain()   # retried until durable: nothing below runs while an outcome is unwritten

    def settle_state(conn):
        if lost.is_set():   # the new holder finishes it
            return "lost"
        if writer.deferred_kinds:   # parked until a period rolls or a cap is raised
            batches.lock_batch(conn, batch_id)
            deferral.defer_batch(conn, batch_id, writer.deferred_kinds)
            return "deferred"
        if batches.finish_batch(conn, batch_id, owner):
            return "done"
        return "open" if batches.renew_lease(conn, batch_id, owner, settings.batch_lease_s) else "lost"

    def finish(conn):   # one transaction: the batch, then its jobs (the lock order of every write)
        state = settle_state(conn)
        job_store.refresh_jobs(conn, jobs)
        return state

    if writer.unwritten:   # pragma: no cover - drain returns only once written
        raise RuntimeError(f"batch {batch_id}: {writer.unwritten} outcomes unwritten")
    state = await asyncio.to_thread(db.retrying, engine, finish, what=f"finishing batch {batch_id}")
    if state == "open":
        raise RuntimeError(f"batch {batch_id}: requests still open after its run; left for a re-run")
    return dict(counts, requests=len(requests))
