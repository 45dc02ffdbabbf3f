"""Hard cost caps: reserve before a call, settle after, never overspend.

Scopes: ``global`` per UTC day, ``tier:<tier>`` per UTC day, ``job:<job_id>``
for the job's life. Before each provider call (each attempt) the worker
reserves the request's maximum cost against every scope that applies, in one
Lua script, so spend never exceeds a cap under any concurrency:

1. ``reserve``: refused (``BudgetExceeded``) when settled spend + this amount
   is over a cap; told to *wait* when only other live reservations stand in
   the way (they settle below their maximum, so the cap gets used to the full);
   otherwise the amount is held under a reservation id with an expiry;
2. the call; a failed call ``release``-s its reservation at once;
3. ``settle`` to the actual cost, run only after the result row is committed
   in Postgres (so a rebuild from the ledger never misses a settled call).

Money is integer *units* of 10^-8 USD (the scale of the ``numeric(18, 8)``
columns), rounded up, never a float. Redis holds the live counters; Postgres
holds the truth: a marker key carries a generation id, and when it is missing
(FLUSHALL, first start) every reservation and settlement waits while one
process rebuilds the counters from the ledger (``results.cost_usd``, and the
calls that got no answer at their maximum: ``CALL_SPEND``, pipeline/calls.py) and
re-holds the maximum cost of every request still ``running``, under a lock.
Redis unreachable means no call: ``BudgetUnavailable`` (fail closed).

A reservation that outlives ``budget_reservation_ttl_s`` (its worker died)
expires, and its amount is released by the next reserve.

**One period per spend.** A daily scope's period is the UTC day, by the caps' one clock
(``period``, pipeline/clock.py: setting ``clock``; tests move it). A spend belongs to the period
of its reservation: the counters settle it there, its ledger row records it
(``results.budget_period``), and the views and every rebuild count it there. A provider batch
reserved on day D and ingested on D+1 is D's spend, never D+1's.

**A wait says why, and ends.** A reservation that only other live holds stand in front of waits
(they settle below their maximum); ``llmbatch status`` shows which cap, how much is held and by
which jobs (``wait_status``), and after ``budget_wait_max_s`` it gives up (``BudgetWaitedOut``):
its request is deferred a minute, with that reason, like a refusal, never dropped.

Public: ``Budget`` (worker side), ``to_units``/``from_units``, ``caps_for``,
``set_cap``, ``show``, ``rebuild``, ``resume_due_batches``, the errors.
This module must never let a call go ahead without a reservation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import ROUND_CEILING, Decimal
from urllib.parse import unquote

import sqlalchemy as sa
from redis import exceptions as redis_exceptions

from pipeline.aio import checkpoint
from pipeline.clock import budget_now
from pipeline.config import Settings
from pipeline.constants import HELD_TIERS, REDIS_PREFIX, TIERS
from pipeline.errors import BudgetError, ConfigError, InfrastructureError
from pipeline.ids import request_key
from pipeline.stores.db import get_engine

log = logging.getLogger(__name__)

UNIT = Decimal("0.00000001")          # 10^-8 USD, the scale of the ledger columns
#: Lua compares amounts as doubles: exact below 2^53 units (about 90 million USD).
MAX_CAP_USD = Decimal(50_000_000)
NO_CAP = "-1"

K = REDIS_PREFIX + "budget:"
#: per job: why its reservations wait (``note_wait``), read by ``llmbatch status``
WAIT_KEY = K + "wait:"
#: a wait note outlives its last renewal this long
WAIT_NOTE_TTL_S = 15
#: KEYS[7]: the Postgres snapshot the counters were rebuilt from (SETTLE)
KEYS = [K + "gen", K + "caps", K + "spent", K + "held", K + "res", K + "res:exp", K + "snapshot"]
LOCK_KEY = K + "rebuild-lock"
#: how long a rebuild re-holds the maximum cost of a 'running' request nobody has re-asserted
REHOLD_GRACE_S = 10.0
#: a provider batch's holds: its completion window (24 h) and a margin; settled when it is ingested
PROVIDER_BATCH_HOLD_S = 25 * 3600.0
#: Redis's run id when the counters were built: a restart (even one restoring the marker) is noticed
RUN_ID_KEY = K + "redis-run-id"


class BudgetExceeded(BudgetError):
    """A cap cannot take this request's maximum cost (now: deferred, or failed if the job says so)."""

    #: never fits, whatever is spent: the request fails at once instead of waiting forever
    permanent = False
    code = "budget_exceeded"

    def __init__(self, scope: str, spent: Decimal, cap: Decimal, message: str | None = None):
        self.scope = scope            # 'global' | 'tier:peak' | 'job:…'
        self.kind = scope.split(":", 1)[0]
        self.spent, self.cap = spent, cap
        super().__init__(message or f"budget {scope}: ${spent} spent of ${cap}")


class BudgetNeverFits(BudgetExceeded):
    """The request's maximum cost is above the cap itself: no period and no settlement makes room."""

    permanent = True

    def __init__(self, scope: str, amount: Decimal, cap: Decimal):
        self.amount = amount
        super().__init__(scope, Decimal(0), cap,
                         f"budget {scope}: this request's maximum cost ${amount} is above the cap ${cap},"
                         f" so it can never fit")


class BudgetWaitedOut(BudgetExceeded):
    """Only other live holds stood in the way, for longer than ``budget_wait_max_s``: the request
    is deferred for a minute (kind ``wait``) with the cap, what it holds and by whom in words."""

    def __init__(self, scope: str, spent: Decimal, cap: Decimal, message: str):
        super().__init__(scope, spent, cap, message)
        self.kind = "wait"


class InvalidAmount(BudgetError):
    """An amount that cannot be reserved (not a number, not finite, ≤ 0, absurd): that request fails."""

    permanent = True
    code = "invalid_max_cost"


class BudgetUnavailable(BudgetError, InfrastructureError):
    """The budget store (Redis) cannot be reached: no call goes ahead."""


class BudgetScriptError(BudgetUnavailable):
    """Redis answered, but a budget script refused its arguments: a bug, not an outage.

    It still fails closed (no call without a reservation), but it is named for what it is, so an
    operator does not go looking for a Redis outage that is not there.
    """


def store_error(e: Exception, what: str = "budget store unreachable") -> BudgetUnavailable:
    """The budget error for a failed Redis call: a script's refusal, or the store out of reach
    (a Redis out of memory, at maxmemory with noeviction, is an outage too, not a script's fault)."""
    if isinstance(e, redis_exceptions.OutOfMemoryError):
        return BudgetUnavailable(f"budget store out of memory (Redis at maxmemory refuses writes): {e}")
    if isinstance(e, redis_exceptions.ResponseError):
        return BudgetScriptError(f"budget script error (Redis answered): {e}")
    return BudgetUnavailable(f"{what}: {e}")


# ---------------------------------------------------------------- money

def to_units(usd: Decimal | str) -> int:
    """USD → integer 10^-8 units, rounded up (a reservation never under-holds)."""
    return int(Decimal(str(usd)).quantize(UNIT, rounding=ROUND_CEILING) / UNIT)


def from_units(units: int | str) -> Decimal:
    return (Decimal(int(units)) * UNIT).normalize() if int(units) else Decimal(0)


def day(now: datetime | None = None) -> str:
    return (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y-%m-%d")


def next_day(now: datetime | None = None) -> datetime:
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return datetime(now.year, now.month, now.day, tzinfo=timezone.utc) + timedelta(days=1)


def period(settings: Settings, engine=None) -> str:
    """Today's budget period (a UTC day) by the caps' one clock (pipeline/clock.py); the ``db``
    clock reads its row through ``engine``, by default this process's engine."""
    if engine is None and settings.clock == "db":
        engine = get_engine()
    return day(budget_now(settings, engine))


def fields_for(job_id: str, tier: str, today: str) -> list[tuple[str, str]]:
    """(spent field, cap field) of every scope a request of ``job_id`` in ``tier`` counts against."""
    return [(f"global@{today}", "global"), (f"tier:{tier}@{today}", f"tier:{tier}"),
            (f"job:{job_id}", f"job:{job_id}")]


def parse_cap(value, name: str = "cap") -> Decimal | None:
    """A cap in USD: finite, 0 … ``MAX_CAP_USD``; ``None``/``""`` is no cap. ``ConfigError`` names the problem."""
    if value is None or value == "":
        return None
    try:
        cap = Decimal(str(value).strip())
    except ArithmeticError as e:
        raise ConfigError(f"{name}: not a decimal amount: {value!r}") from e
    if not cap.is_finite():
        raise ConfigError(f"{name}: {value!r} is not a finite amount")
    if cap < 0 or cap > MAX_CAP_USD:
        raise ConfigError(f"{name}: ${cap} is outside 0 … {MAX_CAP_USD}")
    return cap


_parse_cap = parse_cap


def reservation_units(amount) -> int:
    """The units to hold for ``amount`` USD; ``InvalidAmount`` unless it is finite, > 0 and ≤ ``MAX_CAP_USD``.

    A zero or negative reservation would hold nothing (a call outside every cap),
    and a malformed one must fail only its own request, never reach Redis.
    """
    try:
        d = Decimal(str(amount).strip())
    except ArithmeticError as e:
        raise InvalidAmount(f"maximum cost {amount!r} is not an amount: the request cannot be reserved") from e
    if not d.is_finite() or d <= 0 or d > MAX_CAP_USD:
        raise InvalidAmount(f"maximum cost {amount!r} is not a positive finite amount up to ${MAX_CAP_USD}:"
                            f" the request cannot be reserved")
    return to_units(d)


def config_caps(settings: Settings) -> dict[str, Decimal]:
    """Daily caps written in the settings: ``{'global': …, 'tier:peak': …}``.

    Read only by ``apply_config`` (``llmbatch budget apply-config``): a process's
    environment never changes the caps in force.
    """
    caps = {}
    g = parse_cap(settings.budget_global_daily_usd, "budget_global_daily_usd")
    if g is not None:
        caps["global"] = g
    for tier, value in (settings.budget_tier_daily_usd or {}).items():
        if tier not in TIERS:
            raise ConfigError(f"budget_tier_daily_usd: unknown tier {tier!r}")
        c = parse_cap(value, f"budget_tier_daily_usd[{tier}]")
        if c is not None:
            caps[f"tier:{tier}"] = c
    return caps


def caps_for(conn, settings: Settings | None = None) -> dict[str, Decimal]:
    """The daily caps in force: the ``budget_caps`` table, the one source of truth (Redis mirrors it).

    ``settings`` is not read: a worker started without the config, or with
    another, must not be able to lower, raise or remove a cap.
    """
    return {scope: usd for scope, usd in conn.execute(sa.text("SELECT scope, usd FROM budget_caps")).all()}


def job_cap_units(cap) -> str:
    """A job's cap as stored (``jobs.budget_usd``) → counter units; NULL is no cap.

    Defensive: a negative or non-finite cap written by an older version, or by
    hand, holds everything (cap 0) instead of meaning "no cap".
    """
    if cap is None:
        return NO_CAP
    try:
        return str(to_units(parse_cap(cap, "job cap")))
    except (ConfigError, ArithmeticError, TypeError):
        log.error("job cap %r is not a valid amount: treated as $0 (nothing runs until it is set again)", cap)
        return "0"


def reservation_ttl_s(settings: Settings) -> float:
    """How long a hold outlives its last renewal: at least the provider timeout plus a margin.

    A live process renews its holds (``Budget._heartbeat``) while they wait for a
    lease or a rate window and while their call is in flight, so only a dead
    worker's hold expires, and only after its call can no longer be answered
    (``provider_timeout_s`` + ``budget_reservation_margin_s``).
    """
    return max(settings.budget_reservation_ttl_s,
               settings.provider_timeout_s + settings.budget_reservation_margin_s)


# ---------------------------------------------------------------- Lua
#
# The scripts never trust a stored value: a reservation record or counter that
# does not parse (written by hand, or by an older version) drops the marker, so
# the next call rebuilds every counter from the ledger, instead of a Lua error
# that would defer every request of every job.

_RELEASE_FN = """
local function num(v)
  -- an integer count of units, as written by this module, below 2^53: anything else is nil
  if type(v) ~= 'string' or #v > 16 or not string.match(v, '^%-?%d+$') then return nil end
  return tonumber(v)
end
local function release(id)
  local rec = redis.call('HGET', KEYS[5], id)
  if rec then
    local amount, gen, fields = string.match(rec, '^(%d+)|([^|]*)|(.*)$')
    if amount then
      for f in string.gmatch(fields, '[^\\t]+') do redis.call('HINCRBY', KEYS[4], f, '-' .. amount) end
    else
      redis.call('DEL', KEYS[1])                 -- unreadable record: the counters are rebuilt
    end
    redis.call('HDEL', KEYS[5], id)
  end
  redis.call('ZREM', KEYS[6], id)
  return rec
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# counted(xid): the rebuild behind these counters counted the results that transaction committed,
# because its ledger snapshot (KEYS[7], 'xmin:xmax:in-progress,…' as pg_current_snapshot prints
# it) saw the commit. No snapshot or no xid: false.
_COUNTED_FN = """
local function counted(xid)
  local snap = redis.call('GET', KEYS[7])
  if not snap or not string.match(xid or '', '^%d+$') then return false end
  local xmin, xmax, xip = string.match(snap, '^(%d+):(%d+):([%d,]*)$')
  if not xmin then return false end
  local x = tonumber(xid)
  if x < tonumber(xmin) then return true end
  if x >= tonumber(xmax) then return false end
  for v in string.gmatch(xip, '%d+') do if tonumber(v) == x then return false end end
  return true
end
"""

# ARGV: ttl_ms, rid, amount, n, then n × (spent field, cap field)
RESERVE = _RELEASE_FN + """
local gen = redis.call('GET', KEYS[1])
if not gen then return {'rebuild'} end
local amount = num(ARGV[3])
if not amount or amount <= 0 then return {'invalid', tostring(ARGV[3])} end
local now = now_ms()
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now, 'LIMIT', 0, 200)) do release(id) end
release(ARGV[2])                                 -- a retry re-reserves under the same id
local n = tonumber(ARGV[4])
local wait = false
local sfields = {}
for i = 0, n - 1 do
  local sf, cf = ARGV[5 + 2 * i], ARGV[6 + 2 * i]
  local rawcap = redis.call('HGET', KEYS[2], cf)
  local rawspent = redis.call('HGET', KEYS[3], sf)
  if not rawcap or (not rawspent and string.sub(sf, 1, 4) == 'job:') then return {'load', cf, sf} end
  local cap, spent = num(rawcap), num(rawspent or '0')
  local held = num(redis.call('HGET', KEYS[4], sf) or '0')
  if cap == nil or spent == nil or held == nil then
    redis.call('DEL', KEYS[1])
    return {'rebuild'}
  end
  if cap >= 0 then
    if amount > cap then return {'never', cf, tostring(amount), tostring(cap)} end
    if spent + amount > cap then return {'refuse', cf, tostring(spent), tostring(cap)} end
    if spent + held + amount > cap then wait = cf end
  end
  sfields[#sfields + 1] = sf
end
if wait then return {'wait', wait} end
for _, sf in ipairs(sfields) do redis.call('HINCRBY', KEYS[4], sf, ARGV[3]) end
redis.call('HSET', KEYS[5], ARGV[2], ARGV[3] .. '|' .. gen .. '|' .. table.concat(sfields, '\\t'))
redis.call('ZADD', KEYS[6], now + tonumber(ARGV[1]), ARGV[2])
return {'ok', gen}
"""

# ARGV: rid, gen, actual, xid, n, then n × (spent field, cap field). Returns spent and cap per pair.
# The spend is counted unless the rebuild behind these counters already counted it (counted(xid)).
# Whether the hold is still there says nothing: a rebuild keeps live holds and re-holds running
# requests, result or not, and a hold that expired was never counted. No xid: counted, since
# counting twice only refuses early until the next reconcile, while not counting lets spend pass a cap.
SETTLE = _RELEASE_FN + _COUNTED_FN + """
local cur = redis.call('GET', KEYS[1])
if not cur then return {'rebuild'} end
local actual = num(ARGV[3])
if not actual or actual < 0 then return {'invalid', tostring(ARGV[3])} end
local rec = release(ARGV[1])
local status = 'ok'
if counted(ARGV[4]) then
  status = 'counted'
elseif not rec and cur == ARGV[2] then
  status = 'late'                               -- expired before settling: never counted
end
local out = {status}
local n = tonumber(ARGV[5])
for i = 0, n - 1 do
  local sf, cf = ARGV[6 + 2 * i], ARGV[7 + 2 * i]
  if status ~= 'counted' then redis.call('HINCRBY', KEYS[3], sf, ARGV[3]) end
  out[#out + 1] = redis.call('HGET', KEYS[3], sf) or '0'
  out[#out + 1] = redis.call('HGET', KEYS[2], cf) or '-1'
end
return out
"""

RELEASE = _RELEASE_FN + "release(ARGV[1]) return 1"

# ARGV: ttl_ms, rid… — renew the expiry of this process's live reservations (the heartbeat)
RENEW = _RELEASE_FN + """
local exp = now_ms() + tonumber(ARGV[1])
local n = 0
for i = 2, #ARGV do
  if redis.call('HEXISTS', KEYS[5], ARGV[i]) == 1 then
    redis.call('ZADD', KEYS[6], exp, ARGV[i])
    n = n + 1
  end
end
return n
"""

# ARGV: rid, new rid, ttl_ms — a call that may have been billed keeps its hold under a name of
# its own (a retry re-reserves under the request's id) until it expires
DETACH = _RELEASE_FN + """
local rec = redis.call('HGET', KEYS[5], ARGV[1])
if not rec then return 0 end
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('HSET', KEYS[5], ARGV[2], rec)
redis.call('ZADD', KEYS[6], now_ms() + tonumber(ARGV[3]), ARGV[2])
return 1
"""

# ARGV: cap field, cap, spent field, spent — first load of a job's scope
LOAD = """
if not redis.call('GET', KEYS[1]) then return 0 end
redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSETNX', KEYS[3], ARGV[3], ARGV[4])
return 1
"""

# ARGV: gen, ttl_ms, json {caps: {f: units}, spent: {f: units}, res: [[rid, units, fields, ttl_ms?]],
# snapshot: the ledger's Postgres snapshot}
# Spent is rebuilt from the ledger; live holds are kept as they are (held is summed from them
# again), because a hold may exist nowhere but here: the scheduler holds a provider batch's
# requests while they are still 'held' in Postgres, a worker holds before its claim is durable.
# Dropping them would free room already promised. 'running' requests not held are re-held.
# Except data.drop: holds of requests whose result the ledger snapshot already counts (a settle
# that failed or never ran): kept, they would count the spend twice and stall the cap.
# Returns {holds kept, requests re-held, holds dropped}.
INSTALL = """
local data = cjson.decode(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local drop = {}
for _, id in ipairs(data.drop or {}) do drop[id] = true end
local keep = {}
local dropped = 0
local recs = redis.call('HGETALL', KEYS[5])
for i = 1, #recs, 2 do
  local id, rec = recs[i], recs[i + 1]
  local exp = tonumber(redis.call('ZSCORE', KEYS[6], id) or '0')
  local amount, fields = string.match(rec, '^(%d+)|[^|]*|(.*)$')
  if drop[id] then
    dropped = dropped + 1
  elseif amount and #amount <= 16 and exp and exp > now then
    keep[#keep + 1] = {id, amount, fields, exp, rec}
  end
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
for f, v in pairs(data.caps) do redis.call('HSET', KEYS[2], f, v) end
for f, v in pairs(data.spent) do redis.call('HSET', KEYS[3], f, v) end
local function hold(id, amount, fields, exp, rec)
  for f in string.gmatch(fields, '[^\\t]+') do redis.call('HINCRBY', KEYS[4], f, amount) end
  redis.call('HSET', KEYS[5], id, rec)
  redis.call('ZADD', KEYS[6], exp, id)
end
for _, k in ipairs(keep) do hold(k[1], k[2], k[3], k[4], k[5]) end
redis.call('SET', KEYS[7], data.snapshot)
local reheld = 0
for _, r in ipairs(data.res) do
  if redis.call('HEXISTS', KEYS[5], r[1]) == 0 then
    hold(r[1], r[2], r[3], now + tonumber(r[4] or ARGV[2]), r[2] .. '|' .. ARGV[1] .. '|' .. r[3])
    reheld = reheld + 1
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return {#keep, reheld, dropped}
"""

# ARGV: ttl_ms, then (rid, units, fields, written) × n: a live worker's own reservations in a
# new generation: kept (expiry renewed) if the rebuild re-held them, else held again, unless
# the result is already written (then the ledger the rebuild read has counted it)
REASSERT = """
local gen = redis.call('GET', KEYS[1])
if not gen then return {'rebuild'} end
local t = redis.call('TIME')
local exp = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV, 4 do
  local rid, amount, fields = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local exists = redis.call('HEXISTS', KEYS[5], rid) == 1
  if exists or ARGV[i + 3] == '0' then
    if not exists then
      for f in string.gmatch(fields, '[^\\t]+') do redis.call('HINCRBY', KEYS[4], f, amount) end
    end
    redis.call('HSET', KEYS[5], rid, amount .. '|' .. gen .. '|' .. fields)
    redis.call('ZADD', KEYS[6], exp, rid)
  end
end
return {'ok', gen}
"""

# ARGV: rid, actual, xid — settle a hold by the fields it recorded; a hold that is gone (a rebuild after
# the result was committed counted it from the ledger) adds nothing, nor does one a rebuild kept
# although its ledger counted the result (counted(xid)). Used for provider batches.
SETTLE_HELD = _RELEASE_FN + _COUNTED_FN + """
if not redis.call('GET', KEYS[1]) then return {'rebuild'} end
local actual = num(ARGV[2])
if not actual or actual < 0 then return {'invalid', tostring(ARGV[2])} end
local rec = redis.call('HGET', KEYS[5], ARGV[1])
if not rec then return {'gone'} end
local amount, gen, fields = string.match(rec, '^(%d+)|([^|]*)|(.*)$')
release(ARGV[1])
if counted(ARGV[3]) then return {'counted'} end
if amount then
  for f in string.gmatch(fields, '[^\\t]+') do redis.call('HINCRBY', KEYS[3], f, ARGV[2]) end
end
return {'ok'}
"""

# ARGV: cap field, cap units — set a cap only when the counters are live (else the rebuild reads Postgres)
SET_CAP = """
if not redis.call('GET', KEYS[1]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# ARGV: cap field, cap units — fill a missing cap from Postgres, never overwrite one ``budget set`` wrote since
FILL_CAP = """
if not redis.call('GET', KEYS[1]) then return 0 end
redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# ARGV: gen — drop the counters of generation ``gen`` (the reconcile found them wrong): the next
# call rebuilds them from the ledger
INVALIDATE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""


# ---------------------------------------------------------------- rebuild from the ledger

#: what a provider call that got no answer costs in the ledger (sql/012_unconfirmed_spend.sql):
#: its maximum while unconfirmed, the provider's figure once a report confirms it
CALL_SPEND = ("CASE p.state WHEN 'unconfirmed' THEN p.max_cost_usd"
              " WHEN 'confirmed' THEN coalesce(p.confirmed_usd, 0) ELSE 0 END")
#: a job's spend in the ledger: its results, and its calls that may have been billed (alias ``j``)
JOB_SPENT_SQL = ("((SELECT coalesce(sum(cost_usd), 0) FROM results r WHERE r.job_id = j.job_id)"
                 f" + (SELECT coalesce(sum({CALL_SPEND}), 0) FROM provider_calls p"
                 "    WHERE p.job_id = j.job_id AND p.state <> 'sent'))")

def ledger_snapshot(engine, settings: Settings, now: datetime | None = None, held_ids=()) -> dict:
    """Caps, spend per scope and period, the running requests, from one consistent snapshot.

    Spend is counted in the period of its reservation (``results.budget_period``): today's, and
    that of every provider batch still open (reserved on an earlier day, settled into it).
    ``held_ids``: the holds in Redis; ``drop`` names those whose request's result this snapshot
    already counts (``INSTALL`` drops them).
    """
    today = day(now) if now is not None else period(settings, engine)
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            # first, so it is the snapshot every query below reads: a settle asks it (SETTLE)
            snapshot = conn.execute(sa.text("SELECT pg_current_snapshot()::text")).scalar()
            caps = {k: str(to_units(v)) for k, v in caps_for(conn, settings).items()}
            for scope in ["global", *(f"tier:{t}" for t in TIERS)]:
                caps.setdefault(scope, NO_CAP)
            spent: dict[str, str] = {}
            for job_id, cap, s in conn.execute(sa.text(
                    f"SELECT j.job_id, j.budget_usd, {JOB_SPENT_SQL}"
                    " FROM jobs j WHERE j.status IN ('submitting', 'running', 'paused_budget')")).all():
                caps[f"job:{job_id}"] = job_cap_units(cap)
                spent[f"job:{job_id}"] = str(to_units(s))
            res, periods = [], {today}
            for job_id, cid, tier, max_cost, in_pb, held_in in conn.execute(sa.text(
                    "SELECT q.job_id, q.custom_id, q.tier, q.max_cost_usd, b.provider_batch IS NOT NULL,"
                    " q.budget_period"
                    " FROM requests q LEFT JOIN batches b ON b.batch_id = q.batch_id"
                    " WHERE q.status = 'running'")).all():
                # a provider batch's hold stays in the period it was taken in; a worker's is re-asserted
                when = held_in.isoformat() if in_pb and held_in is not None else today
                periods.add(when)
                fields = [sf for sf, _ in fields_for(job_id, tier, when)]
                try:
                    units = reservation_units(max_cost)
                except InvalidAmount:   # never reserved, so never called: nothing to hold
                    continue
                entry = [request_key(job_id, cid), str(units), "\t".join(fields)]
                if in_pb:   # nobody re-asserts a provider batch's holds: they last its whole window
                    entry.append(int(PROVIDER_BATCH_HOLD_S * 1000))
                res.append(entry)
            ps = sorted(periods)
            for p in ps:
                spent[f"global@{p}"] = "0"
            for p, tier, s in conn.execute(sa.text(
                    "SELECT p, tier, sum(c) FROM (SELECT r.budget_period::text AS p, q.tier, r.cost_usd AS c"
                    "  FROM results r JOIN requests q USING (job_id, custom_id)"
                    "  WHERE r.budget_period = ANY(CAST(:ps AS date[]))"
                    f" UNION ALL SELECT p.budget_period::text, p.tier, {CALL_SPEND} FROM provider_calls p"
                    "  WHERE p.state <> 'sent' AND p.budget_period = ANY(CAST(:ps AS date[]))) x"
                    " GROUP BY 1, 2"), {"ps": ps}).all():
                spent[f"global@{p}"] = str(int(spent[f"global@{p}"]) + to_units(s))
                spent[f"tier:{tier}@{p}"] = str(to_units(s))
            drop = _counted_holds(conn, held_ids)
    return {"caps": caps, "spent": spent, "res": res, "snapshot": snapshot, "drop": drop}


def _counted_holds(conn, held_ids) -> list[str]:
    """The hold ids (``request_key``) whose request already has its result in the ledger.

    A detached hold (``…~xxxx``, a call that may have been billed) is never among them.
    """
    wanted = {i for i in held_ids if "~" not in i and ":" in i}
    if not wanted:
        return []
    # a key hashes its custom_id (pipeline/ids.py): compare keys of the jobs' results
    jobs = sorted({unquote(i.split(":", 1)[0]) for i in wanted})
    return [k for k in (request_key(j, c) for j, c in conn.execute(sa.text(
        "SELECT job_id, custom_id FROM results WHERE job_id = ANY(:jobs)"), {"jobs": jobs}).all())
        if k in wanted]


def new_generation() -> str:
    """A generation id that sorts by time: a marker older than one a process has seen means Redis
    went back in time (an old file restored, marker and all), and its counters are wrong."""
    return f"{time.time_ns() // 1_000_000:013d}{secrets.token_hex(4)}"


def _older(gen: str, than: str | None) -> bool:
    return bool(than) and len(gen) == len(than) == 21 and gen[:13].isdigit() and gen < than


def rebuild(engine, redis_sync, settings: Settings, *, wait_s: float = 60.0) -> bool:
    """Rebuild the counters from Postgres if the marker is missing. True if this call rebuilt.

    One process rebuilds under a lock; the others wait for the marker.
    """
    deadline = time.monotonic() + wait_s
    while redis_sync.get(KEYS[0]) is None:
        token = secrets.token_hex(8)
        if redis_sync.set(LOCK_KEY, token, nx=True, px=int(wait_s * 1000)):
            try:
                if redis_sync.get(KEYS[0]) is not None:
                    return False
                held_ids = [k.decode() for k in redis_sync.hkeys(KEYS[4])]
                snap = ledger_snapshot(engine, settings, held_ids=held_ids)
                gen = new_generation()
                # re-held for a short grace only: most 'running' requests are queued in their batch,
                # not in a call; the live workers re-assert theirs within it (Budget._heartbeat)
                kept, reheld, dropped = redis_sync.eval(INSTALL, len(KEYS), *KEYS, gen,
                                                        int(REHOLD_GRACE_S * 1000), json.dumps(snap))
                redis_sync.set(RUN_ID_KEY, _redis_run_id(redis_sync))
                log.warning("budget counters rebuilt from the Postgres ledger (generation %s, %d live holds"
                            " kept, %d holds of requests already in the ledger dropped, %d running requests"
                            " re-held)", gen, kept, dropped, reheld)
                return True
            finally:
                if redis_sync.get(LOCK_KEY) == token.encode():
                    redis_sync.delete(LOCK_KEY)
        if time.monotonic() > deadline:
            raise BudgetUnavailable("budget counters are being rebuilt and the rebuild did not finish in time")
        time.sleep(0.05)
    return False


def _redis_run_id(redis_sync) -> str:
    return str(redis_sync.info("server").get("run_id", ""))


def _drift(engine, redis_sync, settings: Settings) -> tuple[str | None, dict[str, int], dict]:
    """(generation, {spent field: Redis − ledger units} where they differ, ledger snapshot)."""
    gen = redis_sync.get(KEYS[0])
    live = {k.decode(): v.decode() for k, v in redis_sync.hgetall(KEYS[2]).items()}
    snap = ledger_snapshot(engine, settings)
    drift = {}
    for field, units in snap["spent"].items():
        have = live.get(field, "0" if not field.startswith("job:") else None)
        if have is None:        # a job scope not loaded yet: loaded from the ledger on first use
            continue
        try:
            d = int(have) - int(units)
        except ValueError:      # unreadable counter: as wrong as it can be
            d = -int(units) - 1
        if d:
            drift[field] = d
    return (gen.decode() if gen else None), drift, snap


def reconcile(engine, redis_sync, settings: Settings, *, recheck_s: float = 1.0) -> dict:
    """Compare the Redis counters with the Postgres ledger; rebuild them when they drifted.

    Run by the scheduler's upkeep (schedules/upkeep.py). A difference is drift
    only if it is still the same ``recheck_s`` later: a result committed and not
    yet settled differs for a moment. Drift (a settlement lost with its process,
    a Redis restart that restored old counters) is corrected by a rebuild, which
    is safe while calls are in flight (generations, ``Budget._check_gen``).
    Caps are mirrored from Postgres every time. Returns what it found.
    """
    try:
        gen = redis_sync.get(KEYS[0])
        if gen is None:
            rebuilt = rebuild(engine, redis_sync, settings)
            return {"drift_units": {}, "rebuilt": rebuilt, "reason": "no counters"}
        if (redis_sync.get(RUN_ID_KEY) or b"").decode() != _redis_run_id(redis_sync):
            reason = "Redis restarted since the counters were built"
            drift = _drift(engine, redis_sync, settings)[1]
        else:
            reason = "counters differ from the ledger"
            gen1, first, _ = _drift(engine, redis_sync, settings)
            drift, stale = {}, set()
            if first:
                time.sleep(recheck_s)
                gen2, second, _ = _drift(engine, redis_sync, settings)
                drift = {f: d for f, d in second.items() if first.get(f) == d} if gen1 == gen2 else {}
            if not drift:
                # spend right, but holds of requests the ledger already counts (a settle that failed,
                # or never ran): they stall their caps until a rebuild drops them
                stale = _stale_holds(engine, redis_sync)
                if stale:
                    time.sleep(recheck_s)   # a worker settles what it just wrote within moments
                    stale = stale & _stale_holds(engine, redis_sync)
                if stale:
                    reason = f"{len(stale)} holds of requests already in the ledger"
            if not drift and not stale:
                with engine.connect() as conn:
                    caps = caps_for(conn)
                for scope in ["global", *(f"tier:{t}" for t in TIERS)]:
                    redis_sync.eval(SET_CAP, len(KEYS), *KEYS, scope,
                                    str(to_units(caps[scope])) if scope in caps else NO_CAP)
                _report_drift({})
                return {"drift_units": {}, "rebuilt": False}
        total = sum(abs(d) for d in drift.values())
        log.warning("budget reconcile: %s (%s); rebuilding from the ledger: %s", reason,
                    f"${from_units(total)} in all", {f: str(from_units(abs(d)) * (1 if d > 0 else -1))
                                                     for f, d in drift.items()})
        _report_drift(drift)
        redis_sync.eval(INVALIDATE, len(KEYS), *KEYS, redis_sync.get(KEYS[0]) or "")
        rebuild(engine, redis_sync, settings)
        return {"drift_units": drift, "rebuilt": True, "reason": reason}
    except BudgetError:
        raise
    except Exception as e:
        raise BudgetUnavailable(f"budget reconcile: {e}") from e


def _stale_holds(engine, redis_sync) -> set[str]:
    """Holds whose request's result is already in the ledger (they should have been settled)."""
    held_ids = [k.decode() for k in redis_sync.hkeys(KEYS[4])]
    if not held_ids:
        return set()
    with engine.connect() as conn:
        return set(_counted_holds(conn, held_ids))


def _report_drift(drift: dict[str, int]) -> None:
    try:
        from pipeline import metrics
        metrics.BUDGET_DRIFT.set(float(from_units(sum(abs(d) for d in drift.values()))))
    except Exception as e:  # a metric never stops the reconcile
        log.debug("budget drift metric: %s", e)


def _ttl_ms(settings: Settings) -> int:
    return int(reservation_ttl_s(settings) * 1000)


# ---------------------------------------------------------------- worker side

@dataclass
class Reservation:
    rid: str
    gen: str
    fields: list[tuple[str, str]]
    units: int
    period: str
    #: its result row is committed: a rebuild's ledger may already count it
    written: bool = False
    #: the id of the transaction that committed it (``commit_xid``): a rebuild's ledger counts it
    #: exactly when that transaction is visible in the rebuild's snapshot
    xid: str = ""


def commit_xid(conn) -> str:
    """The id of ``conn``'s transaction, read inside it: once it commits, the settle of its
    results asks the counters' snapshot whether the rebuild behind them already counted them."""
    return str(conn.execute(sa.text("SELECT pg_current_xact_id()::text")).scalar())


class Budget:
    """Reservations for one worker process (async Redis; Postgres via threads)."""

    def __init__(self, settings: Settings, engine, redis_async, redis_sync):
        self.settings = settings
        self.engine = engine
        self.redis = redis_async
        self.redis_sync = redis_sync
        self._alerted: set[tuple] = set()
        self.live: dict[str, Reservation] = {}    # this process's reservations not yet settled
        self.pending: dict[str, tuple[Reservation, int]] = {}   # settlements Redis did not take yet
        self.gen: str | None = None
        self._beat: asyncio.Task | None = None
        self._run_id: str | None = None
        self._beat_redis = None

    def _beat_client(self):
        """The heartbeat's own connection: it never queues behind the requests' Redis calls, so a
        busy process still renews its holds in time."""
        if self._beat_redis is None:
            try:
                import redis.asyncio as aredis
                self._beat_redis = aredis.Redis.from_url(self.settings.redis_url, socket_timeout=5,
                                                         socket_connect_timeout=2)
            except Exception:   # pragma: no cover - a client without a URL (tests): share the main one
                self._beat_redis = self.redis
        return self._beat_redis

    def _beat_s(self) -> float:
        return max(0.05, min(REHOLD_GRACE_S / 4, reservation_ttl_s(self.settings) / 4))

    async def _heartbeat(self) -> None:
        """While this process lives: renew its holds (a hold lives as long as its call can be
        billed), retry settlements Redis refused, re-assert holds after a rebuild."""
        while True:
            await asyncio.sleep(self._beat_s())
            checkpoint()   # a Redis call of the last beat may have swallowed our cancellation
            r = self._beat_client()
            try:
                gen = await r.get(KEYS[0])
                if gen is None:
                    if self.live or self.pending:
                        await self._rebuild()
                    continue
                if await self._restarted(gen):
                    continue
                if _older(gen.decode(), self.gen):
                    await self._went_back(gen.decode())
                    continue
                await self._check_gen(gen.decode())
                if self.live:
                    mine = [x for x in self.live.values() if x.gen == self.gen and not x.written]
                    found = await r.eval(RENEW, len(KEYS), *KEYS, _ttl_ms(self.settings), *list(self.live))
                    if mine and int(found) < len(mine):   # holds of this generation vanished
                        log.warning("budget: %d of this process's live holds are missing from the counters:"
                                    " rebuilding them from the ledger", len(mine) - int(found))
                        await self._eval(INVALIDATE, self.gen)
                waited = len(self.pending)
                for rid, (res, units) in list(self.pending.items()):
                    await self._settle_once(res, units)
                    self.pending.pop(rid, None)
                    log.debug("budget: settlement of %s retried and counted", rid)
                if waited:
                    log.warning("budget: %d waiting settlement(s) retried and counted", waited)
            except Exception as e:  # next beat tries again; reserve/settle fail closed meanwhile
                log.warning("budget heartbeat: %s", e)

    async def _restarted(self, gen: bytes) -> bool:
        """Redis restarted since the counters were built (an append-only file restores old
        counters with their marker): drop them, so the next call rebuilds them from the ledger."""
        r = self._beat_client()
        run_id = str((await r.info("server")).get("run_id", ""))
        if run_id == self._run_id:
            return False
        built = await r.get(RUN_ID_KEY)
        if built is not None and built.decode() != run_id:
            log.warning("budget: Redis restarted (run id %s, counters built under %s): rebuilding them",
                        run_id, built.decode())
            await self._eval(INVALIDATE, gen)
            return True
        self._run_id = run_id
        return False

    async def _went_back(self, gen: str) -> None:
        log.warning("budget: the counters went back to generation %s after %s (Redis restored an old"
                    " state): rebuilding them from the ledger", gen, self.gen)
        await self._eval(INVALIDATE, gen)

    def _ensure_beat(self) -> None:
        if self._beat is None or self._beat.done():
            self._beat = asyncio.create_task(self._heartbeat())

    async def _check_gen(self, gen: str) -> None:
        if gen == self.gen:
            return
        old, self.gen = self.gen, gen
        if old is None or not self.live:
            return
        args = [_ttl_ms(self.settings)]
        for r in self.live.values():
            args += [r.rid, r.units, "\t".join(sf for sf, _ in r.fields), int(r.written)]
        out = await self._eval(REASSERT, *args)
        if out and out[0] in (b"ok", "ok"):
            for r in self.live.values():
                if not r.written:   # a written one keeps its old generation: missing then means counted
                    r.gen = gen
            log.warning("budget: re-asserted %d live reservations in generation %s", len(self.live), gen)

    async def _eval(self, script: str, *args):
        try:
            return await self.redis.eval(script, len(KEYS), *KEYS, *args)
        except Exception as e:  # redis.ConnectionError, TimeoutError …: fail closed
            raise store_error(e) from e

    async def _rebuild(self) -> None:
        try:
            await asyncio.to_thread(rebuild, self.engine, self.redis_sync, self.settings)
        except BudgetError:
            raise
        except Exception as e:
            raise BudgetUnavailable(f"cannot rebuild the budget counters: {e}") from e

    async def _load_caps(self) -> None:
        """Mirror the daily caps from Postgres into counters that lack them (never from the settings)."""
        def read():
            with self.engine.connect() as conn:
                return caps_for(conn)
        try:
            caps = await asyncio.to_thread(read)
        except Exception as e:
            raise BudgetUnavailable(f"cannot read the caps from Postgres: {e}") from e
        for scope in ["global", *(f"tier:{t}" for t in TIERS)]:
            await self._eval(FILL_CAP, scope, str(to_units(caps[scope])) if scope in caps else NO_CAP)

    async def _load_job(self, job_id: str) -> None:
        def read():
            with self.engine.connect() as conn:
                return conn.execute(sa.text(
                    f"SELECT j.budget_usd, {JOB_SPENT_SQL} FROM jobs j WHERE j.job_id = :j"),
                    {"j": job_id}).first()
        row = await asyncio.to_thread(read)
        cap, spent = (row if row else (None, 0))
        await self._eval(LOAD, f"job:{job_id}", job_cap_units(cap), f"job:{job_id}", str(to_units(spent)))

    async def reserve(self, rid: str, job_id: str, tier: str, amount: Decimal) -> Reservation:
        """Hold ``amount`` against every cap of the request, or raise ``BudgetExceeded``
        (``BudgetNeverFits`` when it is above a cap itself, ``InvalidAmount`` when it is no amount)."""
        units = reservation_units(amount)
        waited, since, noted = 0, None, 0.0
        while True:
            today = period(self.settings, self.engine)
            fields = fields_for(job_id, tier, today)
            args = [_ttl_ms(self.settings), rid, units, len(fields)] + [x for f in fields for x in f]
            r = [x.decode() if isinstance(x, bytes) else x for x in await self._eval(RESERVE, *args)]
            if r[0] == "ok":
                self._ensure_beat()
                if _older(r[1], self.gen):   # Redis went back in time: these counters lost holds
                    await self._eval(RELEASE, rid)
                    await self._went_back(r[1])
                    continue
                await self._check_gen(r[1])
                res = self.live[rid] = Reservation(rid, r[1], fields, units, today)
                return res
            if r[0] == "rebuild":
                await self._rebuild()
            elif r[0] == "load":
                if r[1].startswith("job:"):
                    await self._load_job(job_id)
                else:   # a daily scope's cap missing: the counters predate it
                    await self._load_caps()
            elif r[0] == "wait":
                waited += 1
                now = time.monotonic()
                since = since or now
                if now - noted > WAIT_NOTE_TTL_S / 3:   # say why, while it lasts (``llmbatch status``)
                    noted = now
                    await asyncio.to_thread(note_wait, self.redis_sync, job_id, r[1], _spent_field(fields, r[1]))
                if now - since >= self.settings.budget_wait_max_s:
                    raise await self._waited_out(r[1], _spent_field(fields, r[1]), now - since)
                await asyncio.sleep(min(0.5, 0.02 * waited) * random.uniform(0.5, 1.5))
            elif r[0] == "never":
                raise BudgetNeverFits(r[1], from_units(r[2]), from_units(r[3]))
            elif r[0] == "refuse":
                spent, cap = from_units(r[2]), from_units(r[3])
                await self._alert(r[1], fields, 100, cap, spent, today)
                raise BudgetExceeded(r[1], spent, cap)
            elif r[0] == "invalid":
                raise InvalidAmount(f"maximum cost {amount!r} refused by the budget store")
            else:  # pragma: no cover
                raise BudgetScriptError(f"unexpected answer from the reserve script: {r}")

    async def _waited_out(self, cap_field: str, spent_field: str, waited_s: float) -> BudgetWaitedOut:
        try:
            w = await asyncio.to_thread(wait_reason, self.redis_sync, cap_field, spent_field)
            why = describe_wait(w)
            spent, cap = Decimal(w["spent_usd"]), Decimal(w["cap_usd"] or 0)
        except Exception as e:   # the reason is best effort; giving up is not
            why, spent, cap = f"the {cap_field} cap (its holds unreadable: {e})", Decimal(0), Decimal(0)
        msg = (f"deferred: waited {waited_s:.0f}s (budget_wait_max_s) for live holds under {why};"
               f" tried again in a minute")
        log.warning("budget: %s", msg)
        return BudgetWaitedOut(cap_field, spent, cap, msg)

    async def release(self, res: Reservation) -> None:
        self.live.pop(res.rid, None)
        await self._eval(RELEASE, res.rid)

    async def keep(self, res: Reservation, why: str) -> None:
        """A call that may have been billed (timeout, connection lost after send): its hold stays,
        under a name of its own, until it expires; the request's next attempt holds anew."""
        self.live.pop(res.rid, None)
        log.info("budget: %s may have been billed (%s): its hold of $%s stays until it expires",
                 res.rid, why, from_units(res.units))
        await self._eval(DETACH, res.rid, f"{res.rid}~{secrets.token_hex(4)}", _ttl_ms(self.settings))

    async def detach(self, res: Reservation) -> Reservation:
        """A call that may have been billed: its hold moves to a name of its own and stays live
        (renewed by the heartbeat) until ``settle`` counts it at its maximum, once the call is
        on record as unconfirmed spend (pipeline/calls.py). The request's retry holds anew.
        Unlike ``keep``, nothing returns to the caps when the hold would have expired."""
        self.live.pop(res.rid, None)
        held = Reservation(f"{res.rid.rsplit('~', 1)[0]}~{secrets.token_hex(4)}", res.gen, res.fields,
                           res.units, res.period)
        if not int(await self._eval(DETACH, res.rid, held.rid, _ttl_ms(self.settings))):
            # the hold was gone (expired unrenewed): hold it again under its new name until it is counted
            await self._eval(REASSERT, _ttl_ms(self.settings), held.rid, held.units,
                             "\t".join(sf for sf, _ in held.fields), 0)
        self.live[held.rid] = held
        return held

    async def _settle_once(self, res: Reservation, units: int) -> list:
        while True:
            args = [res.rid, res.gen, units, res.xid, len(res.fields)] + [x for f in res.fields for x in f]
            r = [x.decode() if isinstance(x, bytes) else x for x in await self._eval(SETTLE, *args)]
            if r[0] != "rebuild":
                break
            await self._rebuild()
            await self._check_gen((await self.redis.get(KEYS[0]) or b"").decode())
        self.live.pop(res.rid, None)
        if r[0] == "late":
            log.warning("reservation %s expired before it settled: $%s counted late", res.rid, from_units(units))
        return r

    async def settle(self, res: Reservation, actual: Decimal) -> None:
        """Turn the hold into spend of ``actual``; run after the result row is committed.

        Never dropped: when Redis cannot take it, the hold stays (renewed) and the
        heartbeat retries until it is counted; if this process dies first, the
        reconcile (``reconcile``) counts it from the ledger.
        """
        try:
            units = to_units(actual)
        except ArithmeticError:
            units = -1
        if units < 0:   # the cost is unknown: the maximum stays spent
            log.error("reservation %s: actual cost %r is no amount; its maximum is counted", res.rid, actual)
            units = res.units
        try:
            r = await self._settle_once(res, units)
        except BudgetUnavailable as e:
            first = not self.pending   # one line when settlements start waiting, not one per request
            self.pending[res.rid] = (res, units)
            self._ensure_beat()
            (log.warning if first else log.debug)(
                "budget: settlement of %s not taken (%s); retried until it is (and any others meanwhile)",
                res.rid, e)
            return
        for i, (_, cf) in enumerate(res.fields):
            spent, cap = int(r[1 + 2 * i]), int(r[2 + 2 * i])
            if cap < 0:
                continue
            for threshold in (100, 80):
                if spent * 100 >= cap * threshold:
                    await self._alert(cf, res.fields, threshold, from_units(cap), from_units(spent), res.period)
                    break

    async def _alert(self, scope: str, fields, threshold: int, cap: Decimal, spent: Decimal, period: str):
        period = "job" if scope.startswith("job:") else period
        key = (scope, period, threshold, cap)
        if key in self._alerted:
            return
        self._alerted.add(key)
        await asyncio.to_thread(record_alert, self.engine, scope, period, threshold, cap, spent)


def record_alert(engine, scope: str, period: str, threshold: int, cap: Decimal, spent: Decimal) -> bool:
    """A row in ``budget_alerts`` (once per scope, period, threshold and cap), a log line, a metric."""
    with engine.begin() as conn:
        new = conn.execute(sa.text(
            "INSERT INTO budget_alerts (scope, period, threshold, cap_usd, spent_usd)"
            " VALUES (:s, :p, :t, :c, :x) ON CONFLICT DO NOTHING"),
            {"s": scope, "p": period, "t": threshold, "c": cap, "x": spent}).rowcount
    if new:
        what = "reached" if threshold == 100 else "at 80 % of"
        log.warning("budget alert: %s %s its cap: $%s spent of $%s (%s)", scope, what, spent, cap, period)
        try:  # the metrics module may not exist in every build
            from pipeline import metrics
            metrics.budget_alert(scope.split(":", 1)[0], threshold)
        except (ImportError, AttributeError):
            pass
    return bool(new)


# ---------------------------------------------------------------- deferral

def write_deferred(conn, rows: list[dict]) -> None:
    """Mark requests deferred (``job_id``, ``custom_id``, ``scope``, optional ``reason`` in words);
    terminal ones stay as they are."""
    if not rows:
        return
    from pipeline.stores.db import dumps
    conn.execute(sa.text(
        "UPDATE requests r SET status = 'deferred', deferred_scope = x.scope, deferred_reason = x.reason"
        " FROM jsonb_to_recordset(CAST(:rows AS jsonb))"
        " AS x(job_id text, custom_id text, scope text, reason text)"
        " WHERE r.job_id = x.job_id AND r.custom_id = x.custom_id"
        " AND r.status NOT IN ('succeeded', 'failed', 'cancelled')"), {"rows": dumps(rows)})


def defer_batch(conn, batch_id: str, kinds: set[str], now: datetime | None = None) -> None:
    """Park a batch with deferred requests until the earliest moment one of them may fit.

    Daily caps: the next UTC day. Budget store down, or a wait on live holds that ran out
    (``wait``): a minute. Job cap only: until the cap is raised (``budget set`` re-dispatches it).
    """
    now = now or datetime.now(timezone.utc)
    until = None
    if kinds & {"unavailable", "wait"}:
        until = now + timedelta(seconds=60)
    elif kinds & {"global", "tier"}:
        until = next_day(now)
    conn.execute(sa.text(
        "UPDATE batches SET status = 'deferred', deferred_until = :u, lease_until = NULL"
        " WHERE batch_id = :b"), {"b": batch_id, "u": until})


def resume_due_batches(engine, dispatch) -> int:
    """Hand deferred batches whose time has come back to their queues (the batcher's sweep calls this).

    A crash after the UPDATE leaves them ``queued``: the ordinary sweep sends them.
    """
    with engine.begin() as conn:
        # off-peak and background batches go back to 'held': the scheduler releases them in their window
        # so do provider-batch batches: the scheduler reserves and submits them (schedules/provider_batches.py)
        due = conn.execute(sa.text(
            "UPDATE batches SET deferred_until = NULL,"
            " status = CASE WHEN tier = ANY(:held) OR mode = 'provider_batch' THEN 'held' ELSE 'queued' END"
            " WHERE batch_id IN (SELECT batch_id FROM batches WHERE status = 'deferred'"
            "  AND deferred_until <= now() ORDER BY batch_id FOR UPDATE)"   # lock order: batch_id
            " RETURNING batch_id, tier, status"),
            {"held": list(HELD_TIERS)}).all()
        due = [(b, t) for b, t, st in due if st == "queued"]
    for batch_id, tier in due:
        log.info("budget: resuming deferred batch %s (%s)", batch_id, tier)
        dispatch(batch_id, tier)
    if due:
        from pipeline.stores.batches import mark_dispatched
        with engine.begin() as conn:
            mark_dispatched(conn, [b for b, _ in due])
    return len(due)


# ---------------------------------------------------------------- command-line side

def set_cap(engine, redis_sync, settings: Settings, scope: str, usd) -> dict:
    """Set a cap (Postgres, the source of truth, then its mirror in Redis) and wake what it deferred.

    ``scope``: 'global', 'tier:<tier>' or 'job:<job_id>'. Returns what changed.
    """
    usd = parse_cap(usd, scope)
    if usd is None:
        raise ConfigError(f"{scope}: no amount given")
    if not (scope == "global" or scope.startswith("job:") or
            (scope.startswith("tier:") and scope[5:] in TIERS)):
        raise ConfigError(f"unknown budget scope {scope!r}: 'global', 'tier:<tier>' or 'job:<job id>'")
    with engine.begin() as conn:
        if scope.startswith("job:"):
            from pipeline.stores.jobs import lock_job_batches
            job_id = scope[4:]
            # lock order (pipeline/stores/batches.py): the job's batches, then the job, as cancel takes them
            lock_job_batches(conn, job_id)
            woken = conn.execute(sa.text(
                "UPDATE batches b SET deferred_until = now() WHERE b.status = 'deferred'"
                " AND b.batch_id IN (SELECT batch_id FROM requests WHERE job_id = :j AND status = 'deferred')"),
                {"j": job_id}).rowcount
            found = conn.execute(sa.text(
                "UPDATE jobs SET budget_usd = :u,"
                " status = CASE WHEN status = 'paused_budget' THEN 'running' ELSE status END"
                " WHERE job_id = :j"), {"u": usd, "j": job_id}).rowcount
            if not found:
                raise BudgetError(f"no job {job_id}")
        else:
            conn.execute(sa.text(
                "INSERT INTO budget_caps (scope, usd) VALUES (:s, :u)"
                " ON CONFLICT (scope) DO UPDATE SET usd = excluded.usd, updated_at = now()"),
                {"s": scope, "u": usd})
            tier_only = scope[5:] if scope.startswith("tier:") else None
            woken = conn.execute(sa.text(
                "UPDATE batches SET deferred_until = now() WHERE batch_id IN (SELECT batch_id FROM batches"
                "  WHERE status = 'deferred' AND (CAST(:t AS text) IS NULL OR tier = :t)"
                "  ORDER BY batch_id FOR UPDATE)"), {"t": tier_only}).rowcount
    try:
        redis_sync.eval(SET_CAP, len(KEYS), *KEYS, scope, str(to_units(usd)))
    except Exception as e:
        raise store_error(e, "cap saved in Postgres, but the budget store is unreachable") from e
    return {"scope": scope, "usd": str(usd), "batches_resumed": woken}


def apply_config(engine, redis_sync, settings: Settings) -> list[dict]:
    """``llmbatch budget apply-config``: write the caps in the settings to Postgres, once, on purpose.

    The only way configuration reaches the caps in force; no process applies it by itself.
    """
    return [set_cap(engine, redis_sync, settings, scope, usd) for scope, usd in config_caps(settings).items()]


# ---------------------------------------------------------------- synchronous holds (the scheduler)

def reserve_now(engine, redis_sync, settings: Settings, rid: str, job_id: str, tier: str, amount,
                *, ttl_s: float, today: str | None = None) -> str | None:
    """One reservation without waiting: None when held; the scope when only other live holds are in
    the way (try again later). Raises ``BudgetExceeded`` (``BudgetNeverFits``), ``InvalidAmount``,
    ``BudgetUnavailable``, like ``Budget.reserve``. ``today``: the period to hold it in (the
    caller records it with the request, ``requests.budget_period``); by default the clock's.
    """
    units = reservation_units(amount)
    today = today or period(settings, engine)
    for _ in range(5):
        fields = fields_for(job_id, tier, today)
        args = [int(ttl_s * 1000), rid, units, len(fields)] + [x for f in fields for x in f]
        try:
            r = [x.decode() if isinstance(x, bytes) else x
                 for x in redis_sync.eval(RESERVE, len(KEYS), *KEYS, *args)]
        except Exception as e:
            raise store_error(e) from e
        if r[0] == "ok":
            return None
        if r[0] == "wait":
            note_wait(redis_sync, job_id, r[1], _spent_field(fields, r[1]))
            return r[1]
        if r[0] == "never":
            raise BudgetNeverFits(r[1], from_units(r[2]), from_units(r[3]))
        if r[0] == "refuse":
            raise BudgetExceeded(r[1], from_units(r[2]), from_units(r[3]))
        if r[0] == "invalid":
            raise InvalidAmount(f"maximum cost {amount!r} refused by the budget store")
        if r[0] == "rebuild":
            rebuild(engine, redis_sync, settings)
        elif r[0] == "load":
            with engine.connect() as conn:
                caps = caps_for(conn)
                row = conn.execute(sa.text(
                    f"SELECT j.budget_usd, {JOB_SPENT_SQL} FROM jobs j WHERE j.job_id = :j"),
                    {"j": job_id}).first()
            if r[1].startswith("job:"):
                cap, spent = row if row else (None, 0)
                redis_sync.eval(LOAD, len(KEYS), *KEYS, r[1], job_cap_units(cap), r[1], str(to_units(spent)))
            else:
                for scope in ["global", *(f"tier:{t}" for t in TIERS)]:
                    redis_sync.eval(FILL_CAP, len(KEYS), *KEYS, scope,
                                    str(to_units(caps[scope])) if scope in caps else NO_CAP)
    raise BudgetUnavailable(f"reservation {rid}: the budget counters kept changing")


def settle_held(engine, redis_sync, settings: Settings, spent: dict[str, Decimal], xid: str = "",
                *, attempts: int = 10) -> int:
    """Settle holds ``{rid: actual USD}`` by the fields they recorded (provider batches), after
    transaction ``xid`` committed the results; ``attempts`` tries per hold (``BudgetUnavailable``
    after that: the caller tries again later, and a rebuild drops the holds of results the ledger
    counts). A missing hold adds nothing."""
    counted = 0
    for rid, actual in spent.items():
        for attempt in range(attempts):
            try:
                r = redis_sync.eval(SETTLE_HELD, len(KEYS), *KEYS, rid, str(max(0, to_units(actual))), xid)
                if r[0] in (b"rebuild", "rebuild"):
                    rebuild(engine, redis_sync, settings)
                    continue
                counted += r[0] in (b"ok", "ok")
                break
            except BudgetError:
                raise
            except Exception as e:
                if attempt == attempts - 1:
                    raise BudgetUnavailable(f"settling {rid}: {e}") from e
                time.sleep(min(2.0, 0.1 * 2 ** attempt))
    return counted


def release_held(redis_sync, rids, *, strict: bool = False) -> None:
    """Release holds whose calls never happened (a provider batch not created, requests not run).

    ``strict``: a failure raises ``BudgetUnavailable`` (the caller tries again) instead of a log line.
    """
    try:
        for rid in rids:
            redis_sync.eval(RELEASE, len(KEYS), *KEYS, rid)
    except Exception as e:
        if strict:
            raise store_error(e, f"releasing {len(rids)} holds") from e
        log.warning("budget: releasing %d holds failed (%s); they expire, and the reconcile corrects", len(rids), e)


# ---------------------------------------------------------------- why a reservation waits

def _spent_field(fields, cap_field: str) -> str:
    return next((sf for sf, cf in fields if cf == cap_field), "")


def _wait_note(job_id: str, cap_field: str, spent_field: str, old: bytes | None) -> str:
    """The note's JSON; ``since`` carried over from the note it renews (same cap)."""
    since = time.time()
    try:
        prev = json.loads(old) if old else None
        if prev and prev.get("cap") == cap_field:
            since = float(prev["since"])
    except (ValueError, TypeError, KeyError):
        pass
    return json.dumps({"job_id": job_id, "cap": cap_field, "field": spent_field, "since": since})


def note_wait(redis_sync, job_id: str, cap_field: str, spent_field: str) -> None:
    """Say that ``job_id``'s reservations wait on ``cap_field`` (read by ``wait_status``). Best effort."""
    try:
        key = WAIT_KEY + job_id
        redis_sync.set(key, _wait_note(job_id, cap_field, spent_field, redis_sync.get(key)), ex=WAIT_NOTE_TTL_S)
    except Exception as e:   # the note only explains; the reservation goes on without it
        log.debug("budget: wait note for %s: %s", job_id, e)


def wait_reason(redis_sync, cap_field: str, spent_field: str) -> dict:
    """What stands in front of a cap: its cap, spend and holds now, and which jobs hold them."""
    cap = int(redis_sync.hget(KEYS[1], cap_field) or -1)
    spent = int(redis_sync.hget(KEYS[2], spent_field) or 0)
    held = int(redis_sync.hget(KEYS[3], spent_field) or 0)
    by_job: dict[str, list[int]] = {}
    for rid, rec in redis_sync.hscan_iter(KEYS[4]):
        rec = rec.decode(errors="replace")
        parts = rec.split("|", 2)
        if len(parts) == 3 and spent_field in parts[2].split("\t") and parts[0].isdigit():
            b = by_job.setdefault(rid.decode(errors="replace").split(":", 1)[0], [0, 0])
            b[0] += 1
            b[1] += int(parts[0])
    holders = sorted(({"job_id": j, "holds": n, "held_usd": str(from_units(u))} for j, (n, u) in by_job.items()),
                     key=lambda h: -Decimal(h["held_usd"]))
    return {"cap": cap_field, "cap_usd": str(from_units(cap)) if cap >= 0 else None,
            "spent_usd": str(from_units(spent)), "held_usd": str(from_units(held)), "holders": holders[:5],
            "holders_total": len(holders)}


def describe_wait(w: dict) -> str:
    """``the tier:background cap $0.01: $0.002 spent, $0.0079 held by job_x (100 holds, $0.0079)``."""
    by = ", ".join(f"{h['job_id']} ({h['holds']} holds, ${h['held_usd']})" for h in w["holders"]) or "nobody now"
    more = f" and {w['holders_total'] - len(w['holders'])} more jobs" if w["holders_total"] > len(w["holders"]) else ""
    return (f"the {w['cap']} cap ${w['cap_usd']}: ${w['spent_usd']} spent, ${w['held_usd']} held by {by}{more}")


def wait_status(redis_sync, job_id: str) -> dict | None:
    """Why ``job_id``'s reservations wait right now (``llmbatch status``), or None."""
    raw = redis_sync.get(WAIT_KEY + job_id)
    if not raw:
        return None
    note = json.loads(raw)
    w = wait_reason(redis_sync, note["cap"], note["field"])
    w["waiting_s"] = round(max(0.0, time.time() - float(note["since"])), 1)
    w["text"] = f"waiting {w['waiting_s']:.0f}s on " + describe_wait(w)
    return w


def show(engine, redis_sync, settings: Settings) -> dict:
    """Caps, today's spend (live counters and ledger) and reservations held, per scope."""
    today = period(settings, engine)
    try:
        live = redis_sync.get(KEYS[0]) is not None
        spent = {k.decode(): int(v) for k, v in redis_sync.hgetall(KEYS[2]).items()}
        held = {k.decode(): int(v) for k, v in redis_sync.hgetall(KEYS[3]).items()}
    except Exception as e:
        raise store_error(e) from e
    with engine.connect() as conn:
        caps = caps_for(conn, settings)
        ledger_tier = dict(conn.execute(sa.text(
            "SELECT q.tier, sum(r.cost_usd) FROM results r JOIN requests q USING (job_id, custom_id)"
            " WHERE r.budget_period = CAST(:p AS date) GROUP BY q.tier"), {"p": today}).all())
        # calls that may have been billed, apart: spend the caps count, not yet confirmed by the provider
        unconfirmed_tier = dict(conn.execute(sa.text(
            "SELECT tier, sum(max_cost_usd) FROM provider_calls WHERE state = 'unconfirmed'"
            " AND budget_period = CAST(:p AS date) GROUP BY tier"), {"p": today}).all())
        jobs = conn.execute(sa.text(
            "SELECT j.job_id, j.status, j.budget_usd, j.on_budget,"
            " (SELECT coalesce(sum(cost_usd), 0) FROM results r WHERE r.job_id = j.job_id) AS spent,"
            " (SELECT coalesce(sum(max_cost_usd), 0) FROM provider_calls p"
            "  WHERE p.job_id = j.job_id AND p.state = 'unconfirmed') AS unconfirmed,"
            " (SELECT count(*) FROM requests q WHERE q.job_id = j.job_id AND q.status = 'deferred') AS deferred"
            " FROM jobs j WHERE j.budget_usd IS NOT NULL OR j.status = 'paused_budget'"
            " ORDER BY j.created_at DESC LIMIT 50")).mappings().all()
        alerts = conn.execute(sa.text(
            "SELECT scope, period, threshold, cap_usd, spent_usd, created_at FROM budget_alerts"
            " ORDER BY created_at DESC LIMIT 20")).mappings().all()

    def scope(cap_field: str, spent_field: str, ledger: Decimal, unconfirmed: Decimal) -> dict:
        cap = caps.get(cap_field)
        return {"cap_usd": str(cap) if cap is not None else None,
                "spent_usd": str(from_units(spent.get(spent_field, 0))) if live else None,
                "held_usd": str(from_units(held.get(spent_field, 0))) if live else None,
                "ledger_usd": str(ledger), "unconfirmed_usd": str(unconfirmed)}

    return {
        "period": today, "counters": "live" if live else "not built (rebuilt from Postgres on next use)",
        "global": scope("global", f"global@{today}", sum(ledger_tier.values(), Decimal(0)),
                        sum(unconfirmed_tier.values(), Decimal(0))),
        "tiers": {t: scope(f"tier:{t}", f"tier:{t}@{today}", ledger_tier.get(t, Decimal(0)),
                           unconfirmed_tier.get(t, Decimal(0))) for t in TIERS},
        "jobs": [{"job_id": j["job_id"], "status": j["status"], "on_budget": j["on_budget"],
                  "cap_usd": str(j["budget_usd"]) if j["budget_usd"] is not None else None,
                  "spent_usd": str(j["spent"]), "unconfirmed_usd": str(j["unconfirmed"]),
                  "deferred": j["deferred"],
                  "held_usd": str(from_units(held.get(f"job:{j['job_id']}", 0))) if live else None}
                 for j in jobs],
        "alerts": [{**a, "cap_usd": str(a["cap_usd"]), "spent_usd": str(a["spent_usd"]),
                    "created_at": a["created_at"].isoformat()} for a in alerts],
    }


def redis_clients(settings: Settings):
    """(async, sync) Redis clients with short timeouts: the budget fails closed, fast.

    They recover from a Redis restart: a pooled connection idle longer than
    ``health_check_interval`` is pinged before use, and a command that meets a
    dead connection (ConnectionError, TimeoutError) reconnects and is sent again,
    with backoff, a few times before the error reaches the caller.
    """
    import redis
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RConnectionError, TimeoutError as RTimeoutError
    from redis.retry import Retry

    def kw(retry_cls):
        return dict(socket_timeout=5, socket_connect_timeout=2, health_check_interval=10,
                    retry=retry_cls(ExponentialBackoff(cap=1.0, base=0.05), 3),
                    retry_on_error=[RConnectionError, RTimeoutError, ConnectionResetError, BrokenPipeError])
    # blocking pool: 200 requests reserving at once wait for a connection instead of failing
    pool = aredis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=32, timeout=10,
                                                  **kw(AsyncRetry))
    return aredis.Redis(connection_pool=pool), redis.Redis.from_url(settings.redis_url, **kw(Retry))
