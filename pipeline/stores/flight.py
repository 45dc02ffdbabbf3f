"""Single flight in Redis: identical deterministic requests in flight at once are sent once,
across worker processes and hosts.

A request with a cache key (pipeline/endpoints/caching.py: deterministic, cacheable) looks
at its key before its call (``Flights.look``, one atomic script), and finds one of:

* ``answer``: the answer is in the response cache (pipeline/stores/cache.py): take it;
* ``owner``: nobody holds the key's claim, and now this request does, under a fencing
  token (``INCR`` of one counter: tokens only grow). It calls, renewing the claim
  (``renew_many``: every claim of a process in one round trip, compare-and-``PEXPIRE``) while
  the call runs, then stores the answer in
  the cache and drops the claim in one step (``answered``), or, when it got no answer,
  drops the claim and leaves a failure mark for its token (``failed``);
* ``wait``: another owner (its token) holds the claim: wait for the answer key,
  looking again with backoff (``Waiting``).

A waiter looks again until it finds the answer, or:

* the failure mark of the owner it waits for: it calls by itself, without a claim,
  so a request that fails for everyone is never retried owner after owner (a chain);
* no claim and no mark: its owner died (the claim expired unrenewed). It takes the
  claim in the same step and becomes the caller;
* a new owner: the claim changed hands (another waiter took over). It waits for that
  one, at most ``MAX_HANDOVERS`` times, then calls by itself;
* ``max_wait_s`` gone by: it calls by itself.

So no waiter is ever left behind: every wait ends with an answer or a call of its own,
within a bounded time. A stale owner (its claim expired and was taken) cannot renew or
drop the new owner's claim: both compare the token first. A Redis that fails is no
flight at all: the caller calls (the cache was always expendable).

Keys (prefix ``llmbatch:flight:``): ``claim:{cache key}`` the owner's token, ``fence`` the
token counter, ``failed:{token}`` an owner's failure mark; the answer key is the cache's.
It must never make a request wait without bound, nor answer a request with another
request's answer (the keys are the cache's: the whole request).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pipeline.constants import REDIS_PREFIX
from pipeline.stores.cache import PREFIX as ANSWER_PREFIX

PREFIX = REDIS_PREFIX + "flight:"
CLAIM_PREFIX = PREFIX + "claim:"
FAILED_PREFIX = PREFIX + "failed:"
FENCE_KEY = PREFIX + "fence"

#: a waiter follows the claim to a new owner at most this often, then calls by itself
MAX_HANDOVERS = 3
#: a waiter looks again after this long, growing by POLL_GROWTH up to POLL_MAX_S
POLL_FIRST_S, POLL_GROWTH, POLL_MAX_S = 0.02, 1.5, 0.5

# One look. KEYS: answer, claim, fence, failure mark of the holder waited for ('' when none).
# ARGV: claim ms, the holder waited for ('' when none).
_LOOK = """
local a = redis.call('GET', KEYS[1])
if a then return {'answer', a} end
if ARGV[2] ~= '' and redis.call('EXISTS', KEYS[4]) == 1 then return {'failed', ARGV[2]} end
local h = redis.call('GET', KEYS[2])
if h then return {'wait', h} end
local t = tostring(redis.call('INCR', KEYS[3]))
redis.call('SET', KEYS[2], t, 'PX', tonumber(ARGV[1]))
return {'owner', t}
"""
# KEYS: claims. ARGV: claim ms, then each claim's token. Returns 1 (renewed) or 0 (not ours) per claim.
_RENEW = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, tonumber(ARGV[1]))
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
# KEYS: answer, claim. ARGV: token, answer, answer ttl s.
_ANSWERED = """
redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""
# KEYS: claim, failure mark. ARGV: token, mark ms.
_FAILED = """
redis.call('SET', KEYS[2], '1', 'PX', tonumber(ARGV[2]))
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


@dataclass(frozen=True)
class Seen:
    """What one look found: ``kind`` answer | owner | wait | failed, and its ``value``: the answer
    (a dict), our new token (owner), the holder's token (wait), or the failed holder's token."""
    kind: str
    value: object = None


class Flights:
    """The protocol's four atomic steps on a Redis client (``redis.asyncio``). Each raises the
    client's error when Redis fails: the caller then calls without a flight."""

    def __init__(self, redis, *, claim_ms: int, answer_ttl_s: int):
        if claim_ms <= 0:
            raise ValueError("claim_ms must be positive")
        self.redis = redis
        self.claim_ms, self.answer_ttl_s = int(claim_ms), int(answer_ttl_s)
        self._look = redis.register_script(_LOOK)
        self._renew = redis.register_script(_RENEW)
        self._answered = redis.register_script(_ANSWERED)
        self._failed = redis.register_script(_FAILED)

    async def look(self, key: str, holder: str | None = None) -> Seen:
        """The answer, or the claim (ours now, or whose); ``holder``: the owner waited for."""
        kind, value = await self._look(
            keys=[ANSWER_PREFIX + key, CLAIM_PREFIX + key, FENCE_KEY, FAILED_PREFIX + holder if holder else ""],
            args=[self.claim_ms, holder or ""])
        kind, value = _text(kind), _text(value)
        if kind == "answer":
            try:
                answer = json.loads(value)
            except ValueError:
                answer = None
            return Seen("answer", answer)
        return Seen(kind, value)

    async def renew(self, key: str, token: str) -> bool:
        """Extend our claim; False when it is not ours any more."""
        return key in await self.renew_many({key: token})

    async def renew_many(self, claims: dict[str, str]) -> set[str]:
        """Extend every claim of ``claims`` (key -> our token) in one round trip; returns the keys
        still ours (one process renews all of its claims at once, so renewals never queue behind
        its requests' looks)."""
        if not claims:
            return set()
        keys = list(claims)
        ours = await self._renew(keys=[CLAIM_PREFIX + k for k in keys], args=[self.claim_ms, *claims.values()])
        return {k for k, ok in zip(keys, ours) if int(ok)}

    async def answered(self, key: str, token: str, answer: dict) -> None:
        """Store the answer where waiters look, and drop our claim (if still ours)."""
        text = json.dumps(answer, separators=(",", ":"))
        await self._answered(keys=[ANSWER_PREFIX + key, CLAIM_PREFIX + key], args=[token, text, self.answer_ttl_s])

    async def failed(self, key: str, token: str) -> None:
        """No answer from our call: mark it, so our waiters call by themselves, and drop our claim.
        The mark outlives any waiter's next look (it lives as long as a claim)."""
        await self._failed(keys=[CLAIM_PREFIX + key, FAILED_PREFIX + token], args=[token, self.claim_ms])


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class Waiting:
    """A waiter's decisions, with no I/O: after each look, ``after`` says what to do next:
    ``answer`` (take it), ``own`` (we hold the claim now: call and publish), ``alone`` (call
    by ourselves, no claim) or ``wait`` (look again after ``delay()``)."""

    holder: str
    started: float
    max_wait_s: float
    handovers: int = 0
    looks: int = 0

    def after(self, seen: Seen, now: float) -> str:
        self.looks += 1
        if seen.kind == "answer":
            return "answer" if isinstance(seen.value, dict) else "alone"
        if seen.kind == "owner":
            return "own"
        if seen.kind == "failed":
            return "alone"
        if seen.value != self.holder:   # our owner is gone, and another took the claim
            self.handovers += 1
            self.holder = str(seen.value)
            if self.handovers > MAX_HANDOVERS:
                return "alone"
        if now - self.started >= self.max_wait_s:
            return "alone"
        return "wait"

    def delay(self, now: float) -> float:
        """How long until the next look: growing, and never past the end of the wait."""
        step = min(POLL_MAX_S, POLL_FIRST_S * POLL_GROWTH ** max(0, self.looks - 1))
        return max(0.0, min(step, self.started + self.max_wait_s - now))
