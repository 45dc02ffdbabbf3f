"""Provider rate limits and per-tier in-flight caps, shared by every worker through Redis.

Rates are per key (pipeline/providers/keys.py chooses the key): a key's own ``rpm``/``tpm``
(pipeline/providers/registry.py), else ``settings.rate_limits`` (model -> ``"rpm:tpm"``, either
part may be empty), applied to each key of the provider; no limit: no Redis call. One Lua script
per admission keeps a sliding 60 s window (plus a 0.5 s guard) per provider+key+model: a sorted set of admitted
calls scored by their Redis-clock time (member ``<id>|<tokens>``) and a
counter of the tokens in it. A call of N tokens (input tokens + maximum output
tokens, as providers count) is admitted when the window holds fewer than the
tier's effective request limit and at most its effective token limit - N;
otherwise the script answers how long until enough of the window expires.

Tier shares (docs/USAGE.md "Tiers and windows"), decided inside the same script:

* ``immediate`` may use the whole limit. An immediate call told to wait marks
  the model "immediate waiting" (a key with a TTL of about 2.5 s, refreshed at least every
  second while it waits);
* ``peak`` never fills more than ``rate_peak_share`` of the window (0.7 by
  default; docs/USAGE.md "Tiers and windows"): the rest stays free for immediate work, which
  then never waits behind a window peak has filled;
* ``offpeak`` may use the whole limit (its window is open: nothing else runs in
  bulk), except while immediate work waits: then only ``rate_peak_share``;
* ``background`` is admitted only while no other tier waits on the model
  (every waiting non-background call sets an "others waiting" key), and then
  never above ``rate_peak_share`` while immediate work waits.

Adapting: a 429 from the provider pushes a shared "blocked until" time
(``retry-after``, else 1 s) that every worker's next admission honours; a
``x-ratelimit-remaining-requests: 0`` header on a success does the same for
its ``x-ratelimit-reset-requests`` (capped at 60 s).

In-flight caps (``settings.inflight_per_tier[tier]``, 0 = none): a Redis
semaphore of expiring leases (sorted set of lease ids scored by expiry);
expired leases — a dead worker's — are dropped atomically by the next acquire.
A live holder renews its lease while the call runs.

Fail closed: if Redis cannot be reached, the caller waits and retries; a call
never goes ahead unlimited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import secrets
import time
from dataclasses import dataclass

from pipeline.aio import checkpoint
from pipeline.config import Settings
from pipeline.constants import REDIS_PREFIX
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

K = REDIS_PREFIX + "rl:"
WINDOW_MS = 60_000
#: an admission is stamped a little before the provider sees the call (and counts it): entries
#: stay this much longer in our window, so the provider's window never holds more than ours
WINDOW_GUARD_MS = 500
#: how long an "immediate waiting" / "others waiting" mark outlives its last refresh
WAITING_TTL_MS = 1_500
#: a 429 without retry-after blocks the model this long
DEFAULT_BLOCK_S = 1.0
REDIS_RETRY_MAX_S = 5.0


@dataclass(frozen=True)
class Limit:
    rpm: int | None
    tpm: int | None


def parse_limit(value, name: str = "rate_limits") -> Limit:
    """``"rpm:tpm"`` (either part empty) → Limit; also accepts a bare rpm number."""
    text = str(value).strip()
    rpm_s, _, tpm_s = text.partition(":")

    def part(s: str) -> int | None:
        s = s.strip().replace("_", "")
        if not s:
            return None
        try:
            n = int(s)
        except ValueError:
            raise ConfigError(f"{name}: {value!r} is not 'rpm:tpm' (integers, either may be empty)") from None
        if n <= 0:
            raise ConfigError(f"{name}: {value!r}: limits must be positive")
        return n

    return Limit(part(rpm_s), part(tpm_s))


def limit_for(settings: Settings, provider: str, model: str, key=None) -> Limit | None:
    """The limit of one key (a registry ``KeySpec``) on ``model``: the key's own rpm/tpm, else the
    configured limit of ``provider:model`` (or just ``model``); None: unlimited."""
    if key is not None and (key.rpm or key.tpm):
        return Limit(key.rpm, key.tpm)
    limits = settings.rate_limits or {}
    value = limits.get(f"{provider}:{model}", limits.get(model))
    if value is None or str(value).strip() in ("", ":"):
        return None
    lim = parse_limit(value, f"rate_limits[{model}]")
    return lim if (lim.rpm or lim.tpm) else None


def effective_limit(limit: int | None, tier: str, share: float, immediate_waiting: bool) -> int | None:
    """The part of ``limit`` a tier may fill (mirrors the Lua script, for tests and docs)."""
    if limit is None:
        return None
    if tier == "peak" or (tier != "immediate" and immediate_waiting):
        return max(1, int(limit * share))
    return limit


def request_tokens(req: dict) -> int:
    """Tokens a provider counts against TPM: input + maximum output."""
    body = req.get("body") or {}
    out = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens") or 0
    try:
        return max(0, int(req.get("input_tokens") or 0)) + max(0, int(out))
    except (TypeError, ValueError):
        return int(req.get("input_tokens") or 0)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_reset(value: str | None) -> float | None:
    """OpenAI's ``x-ratelimit-reset-requests`` (``"1s"``, ``"6m0s"``, ``"120ms"``) → seconds."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    total, found = 0.0, False
    for n, unit in _DURATION.findall(value):
        found = True
        total += float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total if found else None


# ---------------------------------------------------------------- Lua

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: window zset, token counter, blocked-until, immediate-waiting, others-waiting
# ARGV: id, tokens, rpm (-1 none), tpm (-1 none), tier, share, window_ms, waiting_ttl_ms
# → {1, 0} admitted | {0, wait_ms}
ADMIT = _NOW + """
local id, n = ARGV[1], tonumber(ARGV[2])
local rpm, tpm, tier, share = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local window, wttl = tonumber(ARGV[7]), tonumber(ARGV[8])
-- expire the window's old entries, and their tokens
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - window)
if #old > 0 then
  local freed = 0
  for _, m in ipairs(old) do freed = freed + tonumber(string.match(m, '|(%d+)$')) end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  if freed > 0 then redis.call('DECRBY', KEYS[2], freed) end
end
local function waiting(ms)
  ms = math.max(1, math.ceil(ms))
  if tier == 'immediate' then
    redis.call('SET', KEYS[4], '1', 'PX', math.min(ms, 1000) + wttl)
  elseif tier ~= 'background' then
    redis.call('SET', KEYS[5], '1', 'PX', math.min(ms, 1000) + wttl)
  end
  return {0, ms}
end
local blocked = tonumber(redis.call('GET', KEYS[3]) or '0')
if blocked > now then return waiting(blocked - now) end
local imm = tier ~= 'immediate' and redis.call('EXISTS', KEYS[4]) == 1
if tier == 'background' and (imm or redis.call('EXISTS', KEYS[5]) == 1) then
  return {0, 100 + math.random(0, 100)}
end
local function eff(limit)
  if limit < 0 then return -1 end
  if imm or tier == 'peak' then return math.max(1, math.floor(limit * share)) end
  return limit
end
local erpm, etpm = eff(rpm), eff(tpm)
local count = redis.call('ZCARD', KEYS[1])
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
if count == 0 and used ~= 0 then used = 0; redis.call('DEL', KEYS[2]) end
local wait = 0
if erpm >= 0 and count + 1 > erpm then
  local e = redis.call('ZRANGE', KEYS[1], count - erpm, count - erpm, 'WITHSCORES')
  wait = math.max(wait, tonumber(e[2]) + window - now)
end
if etpm >= 0 and used + n > etpm then
  if n > etpm then
    -- larger than the whole limit: admitted alone into an empty window
    if count > 0 then
      local e = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
      wait = math.max(wait, tonumber(e[2]) + window - now)
    end
  else
    local need, freed, start = used + n - etpm, 0, 0
    while freed < need do
      local e = redis.call('ZRANGE', KEYS[1], start, start + 99, 'WITHSCORES')
      if #e == 0 then break end
      for i = 1, #e, 2 do
        freed = freed + tonumber(string.match(e[i], '|(%d+)$'))
        if freed >= need then
          wait = math.max(wait, tonumber(e[i + 1]) + window - now)
          break
        end
      end
      start = start + 100
    end
  end
end
if wait > 0 then return waiting(wait) end
redis.call('ZADD', KEYS[1], now, id .. '|' .. ARGV[2])
redis.call('INCRBY', KEYS[2], n)
redis.call('PEXPIRE', KEYS[1], window + 1000)
redis.call('PEXPIRE', KEYS[2], window + 1000)
return {1, 0}
"""

# KEYS: window zset, token counter; ARGV: member (id|tokens), window_ms → 1 stamped now | 0 counted
# again: its entry had left the window (a send that waited past the window for its record, or an
# answer that came after it), and the provider counts the call all the same
STAMP = _NOW + """
local window = tonumber(ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], 'XX', now, ARGV[1])
  return 1
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('INCRBY', KEYS[2], tonumber(string.match(ARGV[1], '|(%d+)$')))
redis.call('PEXPIRE', KEYS[1], window + 1000)
redis.call('PEXPIRE', KEYS[2], window + 1000)
return 0
"""

# KEYS: per key, its window zset, token counter and blocked-until (3 each); ARGV: window_ms
# → per key {requests in the window, tokens in the window, ms until unblocked}; read-only
HEADROOM = _NOW + """
local window, out = tonumber(ARGV[1]), {}
for i = 1, #KEYS, 3 do
  local count = redis.call('ZCOUNT', KEYS[i], now - window + 1, '+inf')
  local used = 0
  if count > 0 then
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[i], now - window + 1, '+inf')) do
      used = used + tonumber(string.match(m, '|(%d+)$'))
    end
  end
  local blocked = tonumber(redis.call('GET', KEYS[i + 2]) or '0') - now
  table.insert(out, {count, used, math.max(0, blocked)})
end
return out
"""

# KEYS: blocked-until; ARGV: block_ms → new blocked-until (ms, Redis clock); only ever pushed later
BLOCK = _NOW + """
local upto = now + tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if upto > cur then
  redis.call('SET', KEYS[1], string.format('%d', upto), 'PX', tonumber(ARGV[1]) + 1000)
  return upto
end
return cur
"""

# KEYS: lease zset; ARGV: lease id, cap, ttl_ms → 1 acquired | 0 full
ACQUIRE = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + 1000)
  return 1
end
return 0
"""

# KEYS: lease zset; ARGV: lease id, ttl_ms → 1 renewed | 0 lost
RENEW = _NOW + """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + 1000)
return 1
"""


#: the alias of a provider's only key when none is named (the default providers' key)
DEFAULT_KEY = "default"


def rate_keys(provider: str, model: str, key: str = DEFAULT_KEY) -> list[str]:
    """The Redis keys of one key's window on one model (``key``: the key's alias, never its secret)."""
    base = f"{K}{provider}:{key}:{model}:"
    return [base + "w", base + "tok", base + "blocked", base + "imm", base + "others"]


def lease_key(tier: str) -> str:
    return f"{K}inflight:{tier}"


# ---------------------------------------------------------------- worker side

def _unavailable_errors() -> tuple:
    from redis.exceptions import (BusyLoadingError, ConnectionError as RConnectionError, OutOfMemoryError,
                                  TimeoutError as RTimeout)
    # a Redis at maxmemory (noeviction) refuses the scripts' writes: an outage to wait out, like a stopped one
    return (OSError, asyncio.TimeoutError, RConnectionError, RTimeout, BusyLoadingError, OutOfMemoryError)


_UNAVAILABLE = _unavailable_errors()


class Limiter:
    """Rate admission and in-flight leases for one worker process (async Redis)."""

    def __init__(self, settings: Settings, redis_async, *, lease_ttl_s: float | None = None,
                 sleep=asyncio.sleep):
        self.settings = settings
        self.redis = redis_async
        self.sleep = sleep
        #: a lease outlives its holder by at most this; renewed every third of it while held
        self.lease_ttl_s = lease_ttl_s or max(10.0, settings.provider_timeout_s / 4)

    async def _eval(self, script: str, keys: list[str], *args):
        """Run a script; on a Redis error wait and retry (fail closed, never unlimited)."""
        delay = 0.1
        while True:
            try:
                return await self.redis.eval(script, len(keys), *keys, *args)
            except _UNAVAILABLE as e:  # the store is unreachable: no call goes ahead
                log.warning("rate limiter: Redis unavailable (%s); waiting %.1fs", e, delay)
                await self.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, REDIS_RETRY_MAX_S)

    async def eval(self, script: str, keys: list[str], *args):
        """Run a Lua script on the limiter's Redis, failing closed (waits out an outage)."""
        return await self._eval(script, keys, *args)

    async def try_admit(self, provider: str, model: str, tier: str, tokens: int, rid: str, *,
                        key: str = DEFAULT_KEY, limit: Limit | None = None) -> float:
        """One admission attempt on one key's window: 0.0 admitted, else seconds to wait."""
        if limit is None:
            return 0.0
        ok, wait_ms = await self._eval(
            ADMIT, rate_keys(provider, model, key), rid, int(tokens), limit.rpm or -1, limit.tpm or -1, tier,
            repr(float(self.settings.rate_peak_share)), WINDOW_MS + WINDOW_GUARD_MS, WAITING_TTL_MS)
        return 0.0 if int(ok) == 1 else max(0.001, int(wait_ms) / 1000.0)

    async def admit(self, provider: str, model: str, tier: str, tokens: int,
                    max_wait_s: float | None = None, *, key: str = DEFAULT_KEY,
                    limit: Limit | None = None, rid: str | None = None) -> float | None:
        """Wait until the window of ``key`` on ``model`` admits ``tokens`` for ``tier``. Returns seconds waited.

        ``limit``: the key's (``limit_for``); by default the configured one of the model.
        With ``max_wait_s``: None, at once, when the window would keep the call
        waiting longer than that in all (the caller has somewhere else to go).
        """
        lim = limit if limit is not None else limit_for(self.settings, provider, model)
        if lim is None:
            return 0.0
        started = time.monotonic()
        rid = rid or secrets.token_hex(6)
        while True:
            wait = await self.try_admit(provider, model, tier, tokens, rid, key=key, limit=lim)
            if not wait:
                return time.monotonic() - started
            if max_wait_s is not None and time.monotonic() - started + wait > max_wait_s:
                return None
            # re-ask at least every second so the waiting marks stay fresh; a little jitter
            await self.sleep(min(wait, 1.0) + random.random() * 0.01)
            checkpoint()

    async def stamp(self, provider: str, model: str, tokens: int, rid: str, *, key: str = DEFAULT_KEY,
                    limit: Limit | None = None) -> None:
        """Count an admitted call from now, as it is sent: it may have waited since its admission
        (its record in Postgres), and the provider counts it when it arrives."""
        if limit is None:
            return
        await self._eval(STAMP, rate_keys(provider, model, key)[:2], f"{rid}|{int(tokens)}",
                         WINDOW_MS + WINDOW_GUARD_MS)

    async def headroom(self, provider: str, model: str, keys: list[tuple[str, Limit | None]]) -> list[float]:
        """Per (alias, limit): the share of its limit still free now (the lower of requests and
        tokens; 1.0 without a limit; 0.0 while blocked). One Redis round trip, no change."""
        limited = [(alias, lim) for alias, lim in keys if lim is not None]
        found = {}
        if limited:
            redis_keys = [k for alias, _ in limited for k in rate_keys(provider, model, alias)[:3]]
            rows = await self._eval(HEADROOM, redis_keys, WINDOW_MS + WINDOW_GUARD_MS)
            found = {alias: tuple(int(x) for x in row) for (alias, _), row in zip(limited, rows)}
        out = []
        for alias, lim in keys:
            if lim is None:
                out.append(1.0)
                continue
            count, used, blocked = found[alias]
            shares = [1 - count / lim.rpm if lim.rpm else 1.0, 1 - used / lim.tpm if lim.tpm else 1.0]
            out.append(0.0 if blocked else max(0.0, min(shares)))
        return out

    async def block(self, provider: str, model: str, seconds: float, *, key: str = DEFAULT_KEY,
                    limit: Limit | None = None) -> None:
        """Push the window of ``key`` on ``model`` back: every worker waits ``seconds`` from now."""
        lim = limit if limit is not None else limit_for(self.settings, provider, model)
        if lim is None or seconds <= 0:
            return
        await self._eval(BLOCK, [rate_keys(provider, model, key)[2]], int(seconds * 1000))

    async def observe_headers(self, provider: str, model: str, headers, *, key: str = DEFAULT_KEY,
                              limit: Limit | None = None) -> None:
        """A success that says no requests remain on this key: wait for the provider's reset, all of us."""
        lim = limit if limit is not None else limit_for(self.settings, provider, model)
        if not headers or lim is None:
            return
        remaining = headers.get("x-ratelimit-remaining-requests")
        if remaining is not None and str(remaining).strip() == "0":
            reset = parse_reset(headers.get("x-ratelimit-reset-requests")) or DEFAULT_BLOCK_S
            await self.block(provider, model, min(reset, 60.0), key=key, limit=lim)

    @contextlib.asynccontextmanager
    async def lease(self, tier: str):
        """Hold one of the tier's in-flight slots across every process (no cap: a no-op)."""
        cap = int((self.settings.inflight_per_tier or {}).get(tier) or 0)
        if cap <= 0:
            yield 0.0
            return
        key, lid = lease_key(tier), secrets.token_hex(8)
        ttl_ms = int(self.lease_ttl_s * 1000)
        started = time.monotonic()
        delay = 0.005
        while int(await self._eval(ACQUIRE, [key], lid, cap, ttl_ms)) != 1:
            await self.sleep(delay * (0.5 + random.random()))
            checkpoint()
            delay = min(delay * 1.5, 0.05)
        waited = time.monotonic() - started
        renewer = asyncio.create_task(self._renew(key, lid, ttl_ms))
        try:
            yield waited
        finally:
            renewer.cancel()
            try:
                await self.redis.zrem(key, lid)
            except Exception as e:  # the lease expires by itself
                log.warning("rate limiter: release of lease %s failed (%s); it expires", lid, e)

    async def _renew(self, key: str, lid: str, ttl_ms: int) -> None:
        while True:
            await asyncio.sleep(ttl_ms / 3000.0)
            checkpoint()   # the last renewal may have swallowed our cancellation: the slot is free
            try:
                if not int(await self.redis.eval(RENEW, 1, key, lid, ttl_ms)):
                    log.warning("rate limiter: lease %s expired while held", lid)
                    return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("rate limiter: renewing lease %s failed (%s)", lid, e)
