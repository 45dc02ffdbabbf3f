"""Execution of one batch: its requests run concurrently, results land in Postgres.

1. take the batch's lease (a second delivery of the same batch while the first
   is alive does nothing; a redelivery after a crash takes it back);
2. load the requests not yet finished: a redelivered batch redoes only those;
3. run them on the event loop, at most the tier's in-flight cap at once, each
   with bounded retries;
4. write outcomes and attempts in bulk as they finish (group commit: the
   outcomes that finish during one write share the next), so a crash loses
   at most a write's worth of finished work; each write is idempotent;
5. mark the batch done and complete the jobs whose requests are all finished.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from decimal import Decimal

from pipeline import budget, db, metrics
from pipeline.cache import ResponseCache
from pipeline.config import Settings, get_settings
from pipeline.budget import BudgetExceeded, BudgetUnavailable, InvalidAmount, from_units
from pipeline.errors import PermanentProviderError, ProviderError
from pipeline.pricing import Usage, cost, get_price_book, usage_from_anthropic, usage_from_openai
from pipeline.providers import AttemptRecord, call_with_retries, get_provider
from workers.fallback import fallback_for
from workers.limited import Limited, budget_for, limiter_for

log = logging.getLogger(__name__)

MAX_DELIVERIES = 5
#: a write starts this long after the first outcome that waits for it, so outcomes
#: finishing together share one transaction
FLUSH_COALESCE_S = 0.02
#: a task stops taking further batches of its tier after this long (far below the
#: broker's visibility timeout, so the broker never hands its first batch out again)
CHAIN_MAX_S = 600.0


@functools.cache
def _response_cache() -> ResponseCache:
    settings = get_settings()
    return ResponseCache(settings.redis_url, settings.cache_ttl_s)


class OutcomeWriter:
    """Buffers outcomes and attempts and writes them in bulk, off the event loop."""

    def __init__(self, engine):
        self.engine = engine
        self.outcomes: list[dict] = []
        self.attempts: list[dict] = []
        self.deferred: list[dict] = []            # requests a cap refused (pipeline/budget.py)
        self.deferred_kinds: set[str] = set()     # 'job' | 'global' | 'tier' | 'unavailable', whole batch
        self.settles: list[tuple] = []            # (reservation, actual cost) to settle after the write
        self.budget: budget.Budget | None = None
        self.lock = asyncio.Lock()
        self.wake = asyncio.Event()               # an outcome waits to be written
        self.settling: set[asyncio.Task] = set()  # settlements of written outcomes, still running

    async def flush(self) -> None:
        """Write what has finished; settle its reservations and cache its answers after,
        in the background, so the next write need not wait for Redis."""
        async with self.lock:
            outcomes, attempts, deferred, settles = self.outcomes, self.attempts, self.deferred, self.settles
            self.outcomes, self.attempts, self.deferred, self.settles = [], [], [], []
            if outcomes or attempts or deferred:
                def write():
                    self._write(outcomes, attempts, deferred)
                    for res, _ in settles:
                        res.written = True
                await asyncio.to_thread(write)
        answers = {o["cache_key"]: o["response"] for o in outcomes
                   if o.get("cache_key") and o["status"] == "succeeded"}
        if settles or answers:   # only once the ledger holds the cost: a rebuild from it then misses nothing
            task = asyncio.create_task(self._after_write(settles, answers))
            self.settling.add(task)
            task.add_done_callback(self.settling.discard)

    async def drain(self) -> None:
        """The last write, and every settlement: the batch is over only when its spend is settled."""
        await self.flush()
        await asyncio.gather(*self.settling)
        if self.settles:   # failed ones: one more try, then their reservations expire by themselves
            await self.flush()
            await asyncio.gather(*self.settling)

    async def _after_write(self, settles, answers) -> None:
        if settles:
            await self._settle(settles)
        if answers:
            await asyncio.to_thread(_response_cache().put_many, answers)

    async def _settle(self, settles) -> None:
        results = await asyncio.gather(*(self.budget.settle(r, spent) for r, spent in settles),
                                       return_exceptions=True)
        failed = [s for s, r in zip(settles, results) if isinstance(r, BaseException)]
        if failed:   # kept for the next flush; an expired reservation still settles ('late')
            log.warning("budget: %d settlements failed, retried at the next flush: %s", len(failed),
                        next(r for r in results if isinstance(r, BaseException)))
            self.settles.extend(failed)

    def _write(self, outcomes, attempts, deferred=()) -> None:
        with self.engine.begin() as conn:
            db.write_outcomes(conn, outcomes, attempts)
            budget.write_deferred(conn, list(deferred))
            db.refresh_jobs(conn, {o["job_id"] for o in outcomes})
        # the one metrics hook for request outcomes: counted once the rows are durable
        metrics.record_outcomes(outcomes, attempts)


def _usage(provider: str, body: dict) -> Usage | None:
    raw = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(raw, dict):
        return None
    return usage_from_openai(raw) if provider == "openai" else usage_from_anthropic(raw)


async def prepare(settings: Settings) -> None:
    """Make this process's SDK clients, budget and limiter now (a new pool process), so
    its first batch does not pay for them."""
    get_price_book()
    for name in ("openai", "anthropic"):
        get_provider(name, settings)
    limiter_for(settings, budget_for(settings, db.get_engine()))


async def run_request(req: dict, settings: Settings, writer: OutcomeWriter) -> str:
    provider = get_provider(req["provider"], settings)
    prices = get_price_book()
    if writer.budget is not None:
        provider = Limited(provider, req, writer.budget, limiter_for(settings, writer.budget),
                            fallback_for(req, prices), settings.fallback_rate_wait_s)
    key = f'{req["job_id"]}:{req["custom_id"]}'
    ctx = {"job": req["job_id"], "request": req["custom_id"], "tier": req["tier"]}  # log correlation
    headers = {"Idempotency-Key": key, "X-LLMBatch-Tier": req["tier"]}

    last = {"attempt": req["attempts"], "row": None}

    def on_attempt(a: AttemptRecord) -> None:
        row = {"job_id": req["job_id"], "custom_id": req["custom_id"], "attempt": a.attempt,
               "status_code": a.status_code, "error": a.error, "latency_ms": a.latency_ms,
               "provider_request_id": a.request_id, "cost_usd": "0"}
        last.update(attempt=a.attempt, row=row)
        writer.attempts.append(row)
        writer.wake.set()   # a refused attempt is on record even while its retry waits

    outcome = {"job_id": req["job_id"], "custom_id": req["custom_id"], "model": req["model"],
               "cache_key": req.get("cache_key"), "response": None, "error": None, "input_tokens": None, "cached_input_tokens": None,
               "output_tokens": None, "usage_missing": False, "cost_usd": "0",
               "provider_request_id": None, "latency_ms": None, "status_code": None}
    try:
        answer = await call_with_retries(provider, req["body"], headers=headers, settings=settings,
                                         first_attempt=req["attempts"] + 1, on_attempt=on_attempt)
    except (BudgetExceeded, InvalidAmount) as e:
        # a maximum above the cap itself, or no valid amount, can never be reserved: fail now, alone
        if req.get("on_budget") == "fail" or e.permanent:
            outcome.update(status="failed", error={"code": e.code, "message": str(e)},
                           attempts=last["attempt"])
            writer.outcomes.append(outcome)
            return "failed"
        writer.deferred.append({"job_id": req["job_id"], "custom_id": req["custom_id"], "scope": e.kind})
        writer.deferred_kinds.add(e.kind)
        return "deferred"
    except BudgetUnavailable as e:   # fail closed: no call without a reservation
        log.warning("request %s deferred: %s", key, e, extra=ctx)
        writer.deferred.append({"job_id": req["job_id"], "custom_id": req["custom_id"], "scope": "unavailable"})
        writer.deferred_kinds.add("unavailable")
        return "deferred"
    except ProviderError as e:
        code = "provider_error" if isinstance(e, PermanentProviderError) else "attempts_exhausted"
        outcome.update(status="failed", status_code=e.status_code, provider_request_id=e.request_id,
                       error={"code": code, "message": str(e)}, attempts=last["attempt"])
        writer.outcomes.append(outcome)
        return "failed"
    model = getattr(provider, "model", req["model"])   # the fallback's, when it answered
    usage = _usage(req["provider"], answer.body)
    spent = cost(prices.resolve(model), usage) if usage else Decimal(0)
    last["row"]["cost_usd"] = str(spent)
    outcome.update(
        status="succeeded", model=model, status_code=answer.status_code, response=answer.body,
        provider_request_id=answer.request_id, latency_ms=answer.latency_ms, cost_usd=str(spent),
        usage_missing=usage is None, attempts=last["attempt"],
        input_tokens=usage.input_tokens if usage else None,
        cached_input_tokens=usage.cached_input_tokens if usage else None,
        output_tokens=usage.output_tokens if usage else None)
    if usage is None:
        log.warning("request %s answered without usage: recorded as usage_missing, cost unknown", key,
                    extra=ctx)
    writer.outcomes.append(outcome)
    if isinstance(provider, Limited) and provider.reservation is not None:
        # no usage: the cost is unknown, so the maximum stays spent
        writer.settles.append((provider.reservation, spent if usage else from_units(provider.reservation.units)))
    return "succeeded"


async def _flusher(writer: OutcomeWriter, done: asyncio.Event) -> None:
    """Group commit: write as soon as an outcome waits and the previous write is over."""
    while not done.is_set():
        await writer.wake.wait()
        if done.is_set():
            return
        await asyncio.sleep(FLUSH_COALESCE_S)
        writer.wake.clear()
        await writer.flush()


async def _keep_lease(engine, batch_id: str, owner: str, lease_s: float, done: asyncio.Event) -> None:
    while not done.is_set():
        try:
            await asyncio.wait_for(done.wait(), lease_s / 3)
        except asyncio.TimeoutError:
            def renew():
                with engine.begin() as conn:
                    db.renew_lease(conn, batch_id, owner, lease_s)
            await asyncio.to_thread(renew)


async def run_batch(batch_id: str, *, owner: str, settings: Settings, engine=None) -> dict:
    """Run the batch; once all of its requests have started, take the tier's next
    dispatched batch too (``db.claim_next_batch``) and feed it through the same
    in-flight slots. A process so never idles at a batch's tail, and in-flight work
    stays level across batch boundaries. The stolen batch's own Celery task finds its
    lease held (or the batch done) and does nothing.
    """
    engine = engine or db.get_engine()
    started = time.monotonic()
    lease_s = settings.batch_lease_s
    claimed = await _claim(engine, lambda conn: db.claim_batch(conn, batch_id, owner, lease_s))
    if claimed is None:
        return {"skipped": "done or leased by a live worker"}
    tier = claimed[0]["tier"]
    sem = asyncio.Semaphore(settings.inflight_per_batch[tier])
    runs, holder = [], owner
    while claimed is not None:
        drained = asyncio.Event()
        run = asyncio.create_task(_run_claimed(*claimed, owner=holder, settings=settings, engine=engine,
                                               sem=sem, drained=drained))
        runs.append(run)
        waiter = asyncio.create_task(drained.wait())
        await asyncio.wait([run, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if (run.done() and run.exception()) or time.monotonic() - started > CHAIN_MAX_S:
            break

        holder = f"{owner}/{len(runs)}"   # a lease of its own: the batch's Celery task is another owner
        claimed = await _claim(engine, lambda conn, h=holder: db.claim_next_batch(conn, tier, h, lease_s))
    outcomes = await asyncio.gather(*runs, return_exceptions=True)
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    if failed:
        raise failed[0]
    totals = {k: sum(o[k] for o in outcomes) for k in ("succeeded", "failed", "deferred", "requests")}
    return dict(totals, batches=len(runs), seconds=round(time.monotonic() - started, 3))


async def _claim(engine, take) -> tuple[dict, list[dict]] | None:
    """In one transaction: lease a batch with ``take(conn)`` and mark its open requests running."""
    def run():
        with engine.begin() as conn:
            batch = take(conn)
            return (batch, db.open_requests(conn, batch["batch_id"])) if batch else None
    return await asyncio.to_thread(run)


async def _run_claimed(batch: dict, requests: list[dict], *, owner: str, settings: Settings, engine,
                       sem: asyncio.Semaphore, drained: asyncio.Event) -> dict:
    try:
        return await _execute(batch, requests, owner=owner, settings=settings, engine=engine, sem=sem,
                              drained=drained)
    except BaseException:
        # Give the lease back so the sweep re-dispatches the batch (bounded by MAX_DELIVERIES).
        def release():
            with engine.begin() as conn:
                db.release_lease(conn, batch["batch_id"], owner)
        await asyncio.to_thread(release)
        raise


async def _execute(batch: dict, requests: list[dict], *, owner: str, settings: Settings, engine,
                   sem: asyncio.Semaphore, drained: asyncio.Event) -> dict:
    batch_id = batch["batch_id"]
    writer = OutcomeWriter(engine)
    writer.budget = budget_for(settings, engine)
    if batch["deliveries"] > MAX_DELIVERIES:
        log.error("batch %s delivered %d times: failing its %d open requests as poison",
                  batch_id, batch["deliveries"], len(requests), extra={"batch": batch_id, "tier": batch["tier"]})
        for r in requests:
            writer.outcomes.append({"job_id": r["job_id"], "custom_id": r["custom_id"], "model": r["model"],
                                    "status": "failed", "attempts": r["attempts"], "cost_usd": "0",
                                    "error": {"code": "batch_poison",
                                              "message": f"batch killed its worker {batch['deliveries'] - 1} times"}})
        requests = []
    counts = {"succeeded": 0, "failed": 0, "deferred": 0}
    waiting = len(requests)
    if not waiting:
        drained.set()

    async def one(req):
        nonlocal waiting
        async with sem:
            waiting -= 1
            if not waiting:   # every request has started: the chain may take the next batch
                drained.set()
            counts[await run_request(req, settings, writer)] += 1
        writer.wake.set()

    done = asyncio.Event()
    helpers = [asyncio.create_task(_flusher(writer, done)),
               asyncio.create_task(_keep_lease(engine, batch_id, owner, settings.batch_lease_s, done))]
    try:
        await asyncio.gather(*(one(r) for r in requests))
    finally:
        done.set()
        writer.wake.set()
        await asyncio.gather(*helpers, return_exceptions=True)
        await writer.drain()

    def finish():
        with engine.begin() as conn:
            if writer.deferred_kinds:   # parked until a period rolls or a cap is raised
                budget.defer_batch(conn, batch_id, writer.deferred_kinds)
            else:
                db.finish_batch(conn, batch_id)
            db.refresh_jobs(conn, {r["job_id"] for r in requests})
    await asyncio.to_thread(finish)
    return dict(counts, requests=len(requests))
