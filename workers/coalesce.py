"""Single flight in a worker: one provider call per distinct cache key in flight, in this process
and across every process and host (step 3 of workers/execute.py).

A request with a cache key (deterministic and cacheable) takes a ``Turn`` before it asks for one
of its batch's slots:

1. **in this process** the first request of a key leads; the others (a repeat in the same batch,
   or in another batch this process runs at the same time) wait for the leader's answer and take
   no slot, no hold and no call;
2. **across processes** the leader looks at the key in Redis (pipeline/stores/flight.py): the
   answer is cached (``cache``), or it takes the claim and calls (``own``: the answer is published
   the moment it arrives), or another owner calls and it waits for that answer (``coalesce``);
3. a request answered without a call costs 0 and is a cache hit on record, with its list price
   saved (pipeline/paths/base.py ``without_call``).

A leader that gets no answer (its call failed, its job was cancelled, its budget deferred it) tells
its followers to call by themselves, without a flight: a failure never spreads and never chains.
Redis failing means no flight: each request calls. A claim is renewed while its owner lives; an
owner that dies leaves a claim that expires, and its waiters take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from pipeline.config import Settings
from pipeline.money.pricing import get_price_book
from pipeline.paths.base import without_call
from pipeline.request import Outcome, Request
from pipeline.stores.flight import Flights, Seen, Waiting

log = logging.getLogger(__name__)


class Turn:
    """One request's passage through single flight. ``outcome``: answered without a call (then
    it takes no slot and no call); otherwise the request calls, and ``publish`` hands its answer
    to whoever waits for it (a leader's followers; an owner's waiters in other processes)."""

    def __init__(self, req: Request, lever: str | None = None):
        self.req = req
        self.outcome: Outcome | None = None
        self.token: str | None = None          # our claim, when we own the key
        self.answer: dict | None = None        # what we got: handed to our followers
        self.lever = lever                     # how we got it without a call: cache | coalesce

    async def publish(self, outcome: Outcome) -> None:   # replaced for leaders: see Coalescer.turn
        return None


class Coalescer:
    """Single flight for one process (one per event loop, like the budget and the limiter)."""

    def __init__(self, settings: Settings, flights: Flights | None, *, clock=time.monotonic, sleep=asyncio.sleep):
        self.settings, self.flights = settings, flights
        self.clock, self.sleep = clock, sleep
        #: cache key -> the leader's answer (None: call by yourself), while the leader is in flight
        self.leaders: dict[str, asyncio.Future] = {}
        #: cache key -> our token, for the claims this process owns (renewed together: ``_renew_all``)
        self.owned: dict[str, str] = {}
        self.renewer: asyncio.Task | None = None
        self.stats = {"cache": 0, "coalesce": 0, "owner": 0, "alone": 0}

    @contextlib.asynccontextmanager
    async def turn(self, req: Request, on_wait=None):
        """The request's turn: ``turn.outcome`` set means answered; else call, then ``publish``.
        ``on_wait()`` is called when it starts waiting for another request's answer (it holds no
        slot meanwhile: its batch may count it as started)."""
        key = req.cache_key if self.settings.coalesce else None
        if key is None:
            yield Turn(req)
            return
        leader = self.leaders.get(key)
        if leader is not None:   # a repeat in this process: wait for the leader's answer
            if on_wait is not None:
                on_wait()
            answer, lever = await asyncio.shield(leader)
            yield self._answered(req, answer, lever or "coalesce")
            return
        mine = self.leaders[key] = asyncio.get_running_loop().create_future()
        turn = Turn(req)
        try:
            async with self._flight(turn, key, on_wait):
                yield turn
        finally:
            del self.leaders[key]
            if not mine.done():
                mine.set_result((turn.answer, turn.lever))

    def _answered(self, req: Request, answer: dict | None, lever: str) -> Turn:
        turn = Turn(req, lever)
        if answer is not None:
            turn.outcome = without_call(req, answer, get_price_book(), lever)
        self.stats[lever if turn.outcome is not None else "alone"] += 1
        return turn

    @contextlib.asynccontextmanager
    async def _flight(self, turn: Turn, key: str, on_wait=None):
        """Across processes: the cached answer, our own claim, or another owner's answer."""
        seen, lever = await self._look(key), "cache"
        if seen is not None and seen.kind == "wait":
            if on_wait is not None:
                on_wait()
            seen, lever = await self._wait(key, str(seen.value)), "coalesce"
        if seen is not None and seen.kind == "answer":   # cached already, or another owner's answer
            done = self._answered(turn.req, seen.value, lever)
            if done.outcome is not None:
                turn.outcome, turn.answer, turn.lever = done.outcome, seen.value, lever
                yield turn
                return
            seen = None                      # an answer we cannot price: we call by ourselves
        if seen is None:                     # Redis failed, or we call by ourselves: no claim
            yield self._publishing(turn, key, None)
            return
        token = str(seen.value)              # ours: call, renewed meanwhile, then answer or fail
        self.stats["owner"] += 1
        self.owned[key] = token
        self._keep_renewing()
        try:
            yield self._publishing(turn, key, token)
        finally:
            self.owned.pop(key, None)
            if turn.answer is None:          # no answer: our waiters call by themselves
                await self._quietly(asyncio.shield(self.flights.failed(key, token)), "marking a failed flight")

    def _publishing(self, turn: Turn, key: str, token: str | None) -> Turn:
        async def publish(outcome: Outcome) -> None:
            if (outcome.status != "succeeded" or outcome.usage_missing or not isinstance(outcome.response, dict)
                    or outcome.model != turn.req.model):   # a fallback model's answer is not this key's
                return
            turn.answer = outcome.response   # our followers in this process take it at once
            leader = self.leaders.get(key)
            if leader is not None and not leader.done():
                leader.set_result((turn.answer, "coalesce"))
            if token is not None:
                self.owned.pop(key, None)   # no renewal from here on: the answer drops the claim
                await self._quietly(self.flights.answered(key, token, outcome.response), "publishing an answer")
        turn.publish = publish
        return turn

    async def _look(self, key: str, holder: str | None = None) -> Seen | None:
        if self.flights is None:
            return None
        try:
            return await self.flights.look(key, holder)
        except Exception as e:   # no flight: the request calls by itself
            log.warning("single flight unavailable (%s): calling without it", e)
            return None

    async def _wait(self, key: str, holder: str) -> Seen | None:
        """Wait for another owner's answer; None: call by ourselves."""
        waiting = Waiting(holder, self.clock(), self.settings.coalesce_wait_max_s)
        while True:
            await self.sleep(waiting.delay(self.clock()))
            seen = await self._look(key, waiting.holder)
            if seen is None:
                return None
            step = waiting.after(seen, self.clock())
            if step == "answer":
                return Seen("answer", seen.value) if seen.value is not None else None
            if step == "own":
                return seen
            if step == "alone":
                log.info("single flight: owner %s of a key gave up or is gone (%d handovers, %.1f s):"
                         " calling by ourselves", waiting.holder, waiting.handovers,
                         self.clock() - waiting.started)
                self.stats["alone"] += 1
                return None

    def _keep_renewing(self) -> None:
        if self.renewer is None or self.renewer.done():
            self.renewer = asyncio.create_task(self._renew_all())

    async def _renew_all(self) -> None:
        """Every third of a claim's life, renew all the claims this process owns in one round trip,
        until it owns none."""
        every = self.flights.claim_ms / 3000
        while self.owned:
            await self.sleep(every)
            claims = dict(self.owned)
            try:
                ours = await self.flights.renew_many(claims)
            except Exception as e:   # the claims may expire: then a waiter calls too, no harm beyond a call
                log.info("single flight: renewing %d claims failed (%s)", len(claims), e)
                continue
            for key in set(claims) - ours:
                if self.owned.get(key) == claims[key]:
                    del self.owned[key]
                    log.info("single flight: a claim of ours ran out before it was renewed: its waiters may call too")

    async def _quietly(self, aw, what: str) -> None:
        try:
            await aw
        except Exception as e:
            log.warning("single flight: %s failed (%s)", what, e)


_coalescers: dict[int, Coalescer] = {}


#: the single flight's own Redis connections per process: its looks never wait behind the budget's
#: and the rate limiter's calls (measured: on their shared pool, renewals queued past a claim's life)
FLIGHT_CONNECTIONS = 16


def coalescer_for(settings: Settings) -> Coalescer:
    """One Coalescer per process and event loop, with a Redis connection pool of its own."""
    loop = asyncio.get_running_loop()
    c = _coalescers.get(id(loop))
    if c is None:
        flights = None
        if settings.coalesce:
            import redis.asyncio as aredis
            pool = aredis.BlockingConnectionPool.from_url(
                settings.redis_url, max_connections=FLIGHT_CONNECTIONS, timeout=30, socket_timeout=5,
                socket_connect_timeout=2, health_check_interval=10)
            flights = Flights(aredis.Redis(connection_pool=pool), claim_ms=int(settings.coalesce_claim_s * 1000),
                              answer_ttl_s=settings.cache_ttl_s)
        c = _coalescers[id(loop)] = Coalescer(settings, flights)
    return c
