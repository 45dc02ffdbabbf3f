"""One request's provider behind its limits: budget reservation, tier lease, key and rate window.

``Limited`` wraps a provider for one request: every attempt reserves its
maximum cost first (pipeline/money/budget.py), then takes the tier's in-flight lease
and a key's rate admission (pipeline/providers/keys.py: the live key with the most
headroom; pipeline/providers/ratelimit.py: its window), and only then calls, on that key.
A key answered 401/403 leaves the rotation for every worker (with an alert row and a
metric, by the worker that saw it first) and the attempt is retried at once on another
key; with none left the request fails ``no_usable_key``.
The hold is renewed by the budget's heartbeat through both waits and the call,
so it lives as long as the call can still be billed. An attempt the provider
answered with an error (never billed) releases its hold. With a ``calls`` record
(workers/gate.py ``CallRecord``) each call is on record in Postgres before it
is sent, and one that may have been billed (timeout, connection lost, cancelled
mid-call) becomes unconfirmed spend at its maximum, for good (pipeline/money/calls.py);
without one its hold stays until it expires.
It must never let a call go out without a reservation.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from pipeline import metrics
from pipeline.config import Settings
from pipeline.errors import BudgetExceeded, PermanentProviderError, ProviderError, RetryableProviderError
from pipeline.money import budget, scripts
from pipeline.paths import base as sequence
from pipeline.paths.registry import path_for
from pipeline.providers import ratelimit
from pipeline.providers.keys import REVOKING_STATUS, Keys
from pipeline.providers.registry import KeySpec
from pipeline.request import Request
from pipeline.stores import alerts, db
from workers.fallback import Fallback

log = logging.getLogger(__name__)
#: how long a recount after the answer may wait for Redis before the answer goes on without it
RESTAMP_WAIT_S = 5.0


_budgets: dict[int, budget.Budget] = {}


def budget_for(settings: Settings, engine) -> budget.Budget:
    """One Budget (and Redis client) per process and event loop."""
    loop = asyncio.get_running_loop()
    b = _budgets.get(id(loop))
    if b is None:
        b = _budgets[id(loop)] = budget.Budget(settings, engine, *scripts.redis_clients(settings))
    return b


_limiters: dict[int, ratelimit.Limiter] = {}


def limiter_for(settings: Settings, budget_: budget.Budget) -> ratelimit.Limiter:
    """One Limiter per process and event loop, on the budget's Redis client."""
    loop = asyncio.get_running_loop()
    lim = _limiters.get(id(loop))
    if lim is None:
        lim = _limiters[id(loop)] = ratelimit.Limiter(settings, budget_.redis)
    return lim


_keyrings: dict[int, Keys] = {}


def keys_for(limiter) -> Keys:
    """One key chooser per limiter (its revocation marks are read at most every 0.25 s)."""
    ring = _keyrings.get(id(limiter))
    if ring is None or ring.limiter is not limiter:
        ring = _keyrings[id(limiter)] = Keys(limiter)
    return ring


class Limited:
    """The provider behind the limits: every attempt first reserves its maximum cost,
    then takes a tier in-flight lease and the model's rate admission (pipeline/providers/ratelimit.py).

    A failed attempt releases its reservation at once; a successful one keeps
    it in ``reservation`` until the writer settles it after the result is written.
    With a job's fallback model (workers/fallback.py) an attempt the primary's
    cap or rate cannot take goes to the fallback; ``model`` is the one that answered.
    """

    def __init__(self, provider, req: Request, budget_: budget.Budget, limiter: ratelimit.Limiter | None = None,
                 fallback: Fallback | None = None, fallback_wait_s: float = 0.0, calls=None):
        self.provider, self.req, self.budget, self.limiter = provider, req, budget_, limiter
        self.fallback, self.fallback_wait_s = fallback, fallback_wait_s
        self.name = provider.name
        self.model = req.model
        self.path = path_for(req.path)    # what it reserves (pipeline/paths/base.py reserve)
        spec = getattr(provider, "spec", None)
        #: the provider's keys (a provider without a registry entry, e.g. a test's: one default key)
        self.keys: tuple[KeySpec, ...] = spec.keys if spec is not None else (KeySpec(ratelimit.DEFAULT_KEY),)
        self._keyed = spec is not None    # a registry entry's client is told which key to call on
        self.key: KeySpec | None = None   # the key of the attempt under way (its alias is stored, never it)
        #: the request's tokens as the rate windows count them
        self.tokens = ratelimit.request_tokens({"input_tokens": req.bound.input_tokens, "body": req.body})
        self.reservation: budget.Reservation | None = None
        self._primary_throttled = False   # a 429 on the primary: later attempts go to the fallback
        self._sent = False                # this attempt's request has gone out
        self.calls = calls                # the batch's record of calls that may be billed, if any
        self._n = 0                       # calls sent by this execution: each has an id of its own
        self.call_id: str | None = None   # this attempt's call, once on record
        # one hold id per execution of the request: a second execution of it (a batch delivered
        # again while the first still runs) holds beside it instead of replacing its hold
        self.rid = f'{req.key}~{secrets.token_hex(4)}'

    @property
    def key_alias(self) -> str | None:
        return self.key.alias if self.key is not None else None

    def _limit(self, model: str) -> ratelimit.Limit | None:
        return ratelimit.limit_for(self.limiter.settings, self.req.provider, model, self.key)

    async def _admit(self, model: str) -> str:
        """Wait for a key's rate window on the model (the key with the most headroom); the
        fallback's when the primary's is too far off. Sets ``self.key``."""
        req, ring = self.req, keys_for(self.limiter)
        self.key = None   # no key yet: an attempt refused before its call is on no key's record
        self._admitted = secrets.token_hex(6)   # the call's entry in its key's window (stamped at its send)
        tokens = self.tokens
        if self.fallback is not None and model != self.fallback.model:
            if not self._primary_throttled:
                key = await ring.admit(req.provider, self.keys, model, req.tier, tokens, self.fallback_wait_s,
                                       rid=self._admitted)
                if key is not None:
                    self.key = key
                    return model
            model = self.fallback.model
        self.key = await ring.admit(req.provider, self.keys, model, req.tier, tokens, rid=self._admitted)
        return model

    async def _call_limited(self, body: dict, headers: dict, model: str):
        req, lim = self.req, self.limiter
        if lim is None:
            return await self._send(body, headers, model)
        # lease first, admission last: the window counts the call when it is really sent
        async with lim.lease(req.tier) as lease_wait:
            started = time.monotonic()
            model = await self._admit(model)
            metrics.LIMITER_WAIT.labels(req.tier, model).observe(lease_wait + time.monotonic() - started)
            try:
                answer = await self._send(body, headers, model)
            except RetryableProviderError as e:
                if e.status_code == 429:   # every worker backs off together, on this key
                    await lim.block(req.provider, model, e.retry_after or ratelimit.DEFAULT_BLOCK_S,
                                    key=self.key_alias or ratelimit.DEFAULT_KEY, limit=self._limit(model))
                    if self.fallback is not None and model != self.fallback.model:
                        # the next attempt goes to the fallback: the primary's retry-after is not its wait
                        self._primary_throttled, e.retry_after = True, None
                raise
            except PermanentProviderError as e:
                if e.status_code in REVOKING_STATUS and self.key is not None:
                    raise await self._revoke(e) from e
                raise
        await lim.observe_headers(req.provider, model, answer.headers,
                                  key=self.key_alias or ratelimit.DEFAULT_KEY, limit=self._limit(model))
        return answer

    async def _revoke(self, e: PermanentProviderError) -> RetryableProviderError:
        """The key was refused: out of the rotation for every worker; the attempt is retried at
        once on another key. The provider's message is not kept: it may quote part of the key."""
        provider, alias = self.req.provider, self.key.alias
        why = f"HTTP {e.status_code}: provider {provider} refused key {alias}"
        if await keys_for(self.limiter).revoke(provider, alias, why):   # the first worker to see it
            log.error("key %s of provider %s answered %s: it leaves the rotation", alias, provider, e.status_code,
                      extra={"job": self.req.job_id, "request": self.req.custom_id})
            metrics.KEY_REVOKED.labels(provider, alias).inc()
            engine = getattr(self.budget, "engine", None)
            if engine is not None:
                try:
                    await asyncio.to_thread(db.retrying, engine, lambda conn: alerts.key_revoked(
                        conn, provider, alias, e.status_code, why), what="recording a key revocation",
                        patience_s=30.0)
                except Exception as err:   # the key is out all the same; the log line says so
                    log.error("the alert row for key %s of %s could not be written: %s", alias, provider, err)
        return RetryableProviderError(f"{why}; it left the rotation, the request goes on on another key",
                                      e.status_code, e.request_id, retry_after=0.0)

    async def _send(self, body: dict, headers: dict, model: str):
        self.model = model
        if self.calls is not None:   # on record before it leaves (and refused if the job was cancelled)
            self._n += 1
            self.call_id = f"{self.rid}.{self._n}"
            await self.calls.sending(self.req, self.reservation, self.call_id)
        stamped = time.monotonic()   # before the stamp: the delay to the provider is measured from it
        if self.key is not None:   # the window counts it from now: its record may have taken a while
            await self._stamp(model)
        self._sent = True   # from here on the provider may bill, whatever we hear back
        body = body if model == self.req.model else {**body, "model": model}
        try:
            if self.key is None or not self._keyed:   # no limiter (the provider's first key), or no registry entry
                answer = await self.provider.call(body, headers=headers)
            else:
                answer = await self.provider.call(body, headers=headers, key=self.key)
        except asyncio.CancelledError:
            raise
        except BaseException:
            await self._restamp(model, stamped)
            raise
        await self._restamp(model, stamped)
        return answer

    async def _stamp(self, model: str) -> None:
        await self.limiter.stamp(self.req.provider, model, self.tokens, self._admitted,
                                 key=self.key.alias, limit=self._limit(model))

    async def _restamp(self, model: str, stamped: float) -> None:
        """The provider counted the call when it arrived, somewhere between our stamp and its
        answer. Past the window's guard (a starved worker's send can reach the provider seconds
        after its stamp: the simulator saw 101 calls in 60 s against a share of 84 at load average
        20+), the call is counted again from its answer, so our window holds it at least as long
        as the provider's can."""
        if self.key is None or time.monotonic() - stamped <= ratelimit.WINDOW_GUARD_MS / 1000:
            return
        try:
            await asyncio.wait_for(self._stamp(model), RESTAMP_WAIT_S)
        except Exception as e:   # the answer is in hand: it is not held for the window's sake
            log.warning("request %s: its call could not be counted again from its answer (%s)", self.rid, e)

    async def call(self, body: dict, *, headers: dict):
        req = self.req
        rid, model = self.rid, req.model
        try:
            self.reservation = await sequence.reserve(self.budget, self.path, req, rid)
        except BudgetExceeded as e:
            if self.fallback is None:
                raise
            log.info("request %s: %s; trying fallback model %s", rid, e, self.fallback.model)
            self.reservation = await sequence.reserve(self.budget, self.path, req, rid,
                                                      amount=self.fallback.max_cost_usd)
            model = self.fallback.model
        self._sent, self.call_id = False, None
        try:
            answer = await self._call_limited(body, headers, model)
        except BaseException as e:
            res, self.reservation = self.reservation, None
            answered = isinstance(e, ProviderError) and e.status_code is not None
            try:
                if self._sent and not answered:   # timeout, connection lost, cancelled mid-call
                    why = type(e).__name__ + ": " + str(e)[:200]
                    if self.calls is not None:
                        await self.calls.unconfirmed(self.req, res, self.call_id, why)
                    else:
                        await self.budget.keep(res, why)
                else:
                    if self._sent and self.calls is not None:
                        self.calls.answered(self.call_id)
                    await self.budget.release(res)
            except Exception as err:  # the reservation expires by itself
                log.warning("budget: release of %s failed (%s); it expires", res.rid, err)
            raise
        if self.calls is not None:
            self.calls.answered(self.call_id)
        return answer
