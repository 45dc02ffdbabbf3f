"""Many keys per provider: which key a call goes out on, and which keys are out of the rotation.

Every key of a provider (pipeline/providers/registry.py ``KeySpec``) has its own rate
windows per model in the shared limiter (pipeline/providers/ratelimit.py). ``Keys.admit``
takes the live key with the most headroom — the largest share of its limit still free,
read from Redis in one round trip — and admits the call on that key's window; when that
key's window was taken meanwhile (another worker), the next best is tried, and when none
admits now, it waits for the soonest. Not round robin: a key of 300 rpm beside one of 150
takes about two calls in three, whatever the load.

``Keys.best`` is the same choice read without admitting anything: the key a provider batch
goes out on (pipeline/providers/batch_api.py; the scheduler chooses it).

A key the provider answered 401 or 403 leaves the rotation for every worker: ``revoke``
sets a mark in Redis (no expiry; ``restore`` takes it away). The first worker to mark it
is told so (``True``), and raises the alert (a row, a metric: the caller's business,
since this module writes no Postgres). With no live key left, ``NoUsableKey``: the request
fails with that reason and is not retried.

Only aliases reach Redis, logs and metrics; a secret never leaves the SDK client.
"""

from __future__ import annotations

import random
import secrets
import time
from typing import Sequence

from pipeline.aio import checkpoint
from pipeline.constants import REDIS_PREFIX
from pipeline.errors import PermanentProviderError
from pipeline.providers import ratelimit
from pipeline.providers.registry import KeySpec

DEAD = REDIS_PREFIX + "keys:dead:"
#: the statuses that take a key out of the rotation
REVOKING_STATUS = (401, 403)
#: a process reads the revocation marks again after this long (a revoked key may take
#: this long to leave another worker's rotation; its 401s there retry on another key)
LIVE_TTL_S = 0.25


class NoUsableKey(PermanentProviderError):
    """Every key of the provider is out of the rotation (answered 401/403): the request fails."""

    code = "no_usable_key"


def dead_key(provider: str, alias: str) -> str:
    return f"{DEAD}{provider}:{alias}"


class Keys:
    """Key choice and revocation for one process, on the limiter's Redis client."""

    def __init__(self, limiter: ratelimit.Limiter, *, clock=time.monotonic):
        self.limiter = limiter
        self.clock = clock
        self._seen: dict[str, tuple[float, frozenset]] = {}   # provider -> (read at, dead aliases)

    async def live(self, provider: str, keys: Sequence[KeySpec]) -> list[KeySpec]:
        """The keys of ``provider`` not out of the rotation (read at most every ``LIVE_TTL_S``)."""
        seen = self._seen.get(provider)
        if seen is None or self.clock() - seen[0] > LIVE_TTL_S:
            marks = await self.limiter.eval("return redis.call('MGET', unpack(KEYS))",
                                             [dead_key(provider, k.alias) for k in keys])
            seen = self._seen[provider] = (self.clock(), frozenset(k.alias for k, m in zip(keys, marks) if m))
        return [k for k in keys if k.alias not in seen[1]]

    async def revoke(self, provider: str, alias: str, why: str) -> bool:
        """Take the key out of the rotation for every worker; True for the one that did it first."""
        script = "return redis.call('SET', KEYS[1], ARGV[1], 'NX') and 1 or 0"
        first = bool(int(await self.limiter.eval(script, [dead_key(provider, alias)], why[:200])))
        self._seen.pop(provider, None)
        return first

    async def restore(self, provider: str, alias: str) -> None:
        await self.limiter.eval("return redis.call('DEL', KEYS[1])", [dead_key(provider, alias)])
        self._seen.pop(provider, None)

    async def _usable(self, provider: str, keys: Sequence[KeySpec]) -> list[KeySpec]:
        """The live keys; ``NoUsableKey`` when there is none."""
        live = await self.live(provider, keys)
        if not live:
            raise NoUsableKey(f"every key of provider {provider!r} is out of the rotation "
                              f"(answered 401/403): {', '.join(k.alias for k in keys)}")
        return live

    async def _ranked(self, provider: str, live: list[KeySpec], model: str) -> tuple[list[KeySpec], dict]:
        """``live`` by headroom on ``model``, the most first (ties broken at random), and each alias's limit."""
        limits = [(k.alias, ratelimit.limit_for(self.limiter.settings, provider, model, k)) for k in live]
        room = await self.limiter.headroom(provider, model, limits)
        ranked = sorted(zip(room, [random.random() for _ in live], live), key=lambda t: t[:2], reverse=True)
        return [k for _, _, k in ranked], dict(limits)

    async def best(self, provider: str, keys: Sequence[KeySpec], model: str) -> KeySpec:
        """The live key with the most headroom on ``model``, read but not taken: the key a provider
        batch goes out on (its lines are not realtime calls, so they take no place in a window).
        ``NoUsableKey`` when every key is out."""
        live = await self._usable(provider, keys)
        return live[0] if len(live) == 1 else (await self._ranked(provider, live, model))[0][0]

    async def admit(self, provider: str, keys: Sequence[KeySpec], model: str, tier: str, tokens: int,
                    max_wait_s: float | None = None, rid: str | None = None) -> KeySpec | None:
        """The live key with the most headroom, once its window admitted the call (as ``rid``:
        the limiter's ``stamp`` counts it from its send).

        None when ``max_wait_s`` would be exceeded; ``NoUsableKey`` when every key is out."""
        started = time.monotonic()
        rid = rid or secrets.token_hex(6)
        while True:
            live = await self._usable(provider, keys)
            if len(live) == 1:   # one key: its window alone, as one key always was
                limit = ratelimit.limit_for(self.limiter.settings, provider, model, live[0])
                waited = await self.limiter.admit(provider, model, tier, tokens, max_wait_s, key=live[0].alias,
                                                  limit=limit, rid=rid)
                return live[0] if waited is not None else None
            order, by_alias = await self._ranked(provider, live, model)
            soonest = None
            for key in order:
                wait = await self.limiter.try_admit(provider, model, tier, tokens, rid, key=key.alias,
                                                    limit=by_alias[key.alias])
                if not wait:
                    return key
                soonest = wait if soonest is None else min(soonest, wait)
            if max_wait_s is not None and time.monotonic() - started + soonest > max_wait_s:
                return None
            # re-ask at least every second: the waiting marks stay fresh, a revoked key is seen
            await self.limiter.sleep(min(soonest, 1.0) + random.random() * 0.01)
            checkpoint()
