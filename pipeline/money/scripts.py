"""The budget's Redis side: its keys, the Lua scripts that reserve, settle, release and rebuild
the counters atomically, the clients (``redis_clients``), and what a failed Redis call means
(``store_error``).
"""

from __future__ import annotations

from redis import exceptions as redis_exceptions

from pipeline.config import Settings
from pipeline.constants import REDIS_PREFIX
from pipeline.errors import BudgetScriptError, BudgetUnavailable
from pipeline.money.roundtrips import CoalescedRedis

K = REDIS_PREFIX + "budget:"
#: per job: why its reservations wait (``note_wait``), read by ``llmbatch status``
WAIT_KEY = K + "wait:"
#: a wait note outlives its last renewal this long
WAIT_NOTE_TTL_S = 15
#: KEYS[7]: the Postgres snapshot the counters were rebuilt from (SETTLE); KEYS[8]: the holds that
#: lapsed and stay counted (``lapse`` in the scripts below)
KEYS = [K + "gen", K + "caps", K + "spent", K + "held", K + "res", K + "res:exp", K + "snapshot", K + "lapsed"]
LOCK_KEY = K + "rebuild-lock"
#: how long a rebuild re-holds the maximum cost of a 'running' request nobody has re-asserted
REHOLD_GRACE_S = 10.0
#: a provider batch's holds: its completion window (24 h) and a margin; settled when it is ingested
PROVIDER_BATCH_HOLD_S = 25 * 3600.0
#: Redis's run id when the counters were built: a restart (even one restoring the marker) is noticed
RUN_ID_KEY = K + "redis-run-id"


def store_error(e: Exception, what: str = "budget store unreachable") -> BudgetUnavailable:
    """The budget error for a failed Redis call: a script's refusal, or the store out of reach
    (a Redis out of memory, at maxmemory with noeviction, is an outage too, not a script's fault)."""
    if isinstance(e, redis_exceptions.OutOfMemoryError):
        return BudgetUnavailable(f"budget store out of memory (Redis at maxmemory refuses writes): {e}")
    if isinstance(e, redis_exceptions.ResponseError):
        return BudgetScriptError(f"budget script error (Redis answered): {e}")
    return BudgetUnavailable(f"{what}: {e}")


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
  redis.call('SREM', KEYS[8], id)
  return rec
end
-- holds past their expiry: a call attempt's ('<request>~<attempt>', workers/limited.py) may have
-- been billed, so it stays counted, set apart in KEYS[8] until a rebuild has put its calls in the
-- ledger (ledger.rebuild); any other (a rebuild's short re-hold of a running request, a provider
-- batch's hold, whose requests are on record in Postgres) is let go
local function lapse(now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now, 'LIMIT', 0, 200)) do
    if string.find(id, '~', 1, true) then
      redis.call('ZREM', KEYS[6], id)
      redis.call('SADD', KEYS[8], id)
    else
      release(id)
    end
  end
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
lapse(now)
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
    redis.call('SREM', KEYS[8], ARGV[i])          -- a stalled holder back in time: live again
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
redis.call('SREM', KEYS[8], ARGV[1])
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
# that failed or never ran): kept, they would count the spend twice and stall the cap; and
# data.lapsed: call attempts' holds past their expiry whose calls the rebuild put in the ledger
# first (``rebuild``). One that lapsed after the rebuild read them is kept, lapsed, for the next.
# Returns {holds kept, requests re-held, holds dropped}.
INSTALL = """
local data = cjson.decode(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local drop = {}
for _, id in ipairs(data.drop or {}) do drop[id] = true end
for _, id in ipairs(data.lapsed or {}) do drop[id] = true end
local keep = {}
local dropped = 0
local recs = redis.call('HGETALL', KEYS[5])
for i = 1, #recs, 2 do
  local id, rec = recs[i], recs[i + 1]
  local exp = tonumber(redis.call('ZSCORE', KEYS[6], id) or '0')
  local amount, fields = string.match(rec, '^(%d+)|[^|]*|(.*)$')
  if drop[id] then
    dropped = dropped + 1
  elseif amount and #amount <= 16 and (exp > now or string.find(id, '~', 1, true)) then
    keep[#keep + 1] = {id, amount, fields, exp, rec}
  end
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[8])
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


def redis_clients(settings: Settings):
    """(async, sync) Redis clients with short timeouts: the budget fails closed, fast. The async
    one's script calls made while one is out share the next round trip (``CoalescedRedis``).

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
    # the async client's script calls share round trips (pipeline/money/roundtrips.py)
    return CoalescedRedis(aredis.Redis(connection_pool=pool)), redis.Redis.from_url(settings.redis_url, **kw(Retry))
