"""Hard cost caps: reserve before a call, settle after, never overspend.

Scopes: ``global`` per UTC day, ``tier:<tier>`` per UTC day, ``job:<job_id>``
for the job's life, and ``project:<id>`` per UTC day for a job of an API project (pipeline/api/). Before each provider call (each attempt) the worker
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
calls that got no answer at their maximum: ``CALL_SPEND``, pipeline/money/calls.py) and
re-holds the maximum cost of every request still ``running``, under a lock.
Redis unreachable means no call: ``BudgetUnavailable`` (fail closed).

A reservation that outlives ``budget_reservation_ttl_s`` unrenewed (its worker died) lapses,
and stays counted: its call may have been billed. The next rebuild of the counters (the
reconcile starts one when it finds a lapsed hold) first puts the hold's calls still on record
as sent in the ledger as unconfirmed spend, then lets it go (``ledger.rebuild``). Until then
the caps wait: a lapse never frees money by itself.

**One period per spend.** A daily scope's period is the UTC day, by the caps' one clock
(``period``, pipeline/clock.py: setting ``clock``; tests move it). A spend belongs to the period
of its reservation: the counters settle it there, its ledger row records it
(``results.budget_period``), and the views and every rebuild count it there. A provider batch
reserved on day D and ingested on D+1 is D's spend, never D+1's.

**A wait says why, and ends.** A reservation that only other live holds stand in front of waits
(they settle below their maximum); ``llmbatch status`` shows which cap, how much is held and by
which jobs (``wait_status``), and after ``budget_wait_max_s`` it gives up (``BudgetWaitedOut``):
its request is deferred a minute, with that reason, like a refusal, never dropped.

**One reservation code path.** The workers and the scheduler both hold through ``Budget``
(pipeline/paths/base.py ``reserve``): a worker's holds are live (renewed by the heartbeat while
their call can be billed, each with its own expiry: a flex call's is longer); the scheduler's
provider-batch holds are not tracked (``track=False``): they carry the batch's whole window as
their expiry, survive a scheduler restart, and are settled by the fields they recorded
(``settle_held``) or released (``release_ids``) once the batch is ingested.

This module is ``Budget``, ``Reservation`` and ``commit_xid``. Beside it in
pipeline/money/: ``units`` (money as integers), ``caps`` (scopes, periods, caps in force),
``scripts`` (Redis keys and Lua), ``ledger`` (rebuild and reconcile), ``waits`` (why a
reservation waits), ``deferral``, ``admin`` (``budget set``, ``show``, alerts); the errors are
in pipeline/errors.py.
This module must never let a call go ahead without a reservation.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from dataclasses import dataclass
from decimal import Decimal

import sqlalchemy as sa

from pipeline.aio import checkpoint
from pipeline.config import Settings
from pipeline.errors import (
    BudgetError, BudgetExceeded, BudgetNeverFits, BudgetScriptError, BudgetUnavailable, BudgetWaitedOut,
    InvalidAmount,
)
from pipeline.money.admin import record_alert
from pipeline.money.caps import caps_for, daily_scopes, fields_for, period as _period, reservation_ttl_s
from pipeline.money.ledger import JOB_SPENT_SQL, older, rebuild
from pipeline.money.scripts import (
    DETACH, FILL_CAP, INVALIDATE, KEYS, LOAD, REASSERT, REHOLD_GRACE_S, RELEASE, RENEW, RESERVE, RUN_ID_KEY,
    SETTLE, SETTLE_HELD, WAIT_NOTE_TTL_S, store_error,
)
from pipeline.money.units import NO_CAP, from_units, job_cap_units, reservation_units, to_units
from pipeline.money.waits import describe_wait, note_wait, spent_field, wait_reason
from pipeline.stores.db import autocommit

log = logging.getLogger(__name__)


def _ttl_ms(settings: Settings) -> int:
    return int(reservation_ttl_s(settings) * 1000)



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
    #: how long it outlives its last renewal, in ms (a flex call's is longer than the budget's own)
    ttl_ms: int = 0


def _by_ttl(reservations) -> dict[int, list]:
    out: dict[int, list] = {}
    for r in reservations:
        out.setdefault(r.ttl_ms, []).append(r)
    return out


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
        self._projects: dict[str, str | None] = {}

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
                if older(gen.decode(), self.gen):
                    await self._went_back(gen.decode())
                    continue
                await self._check_gen(gen.decode())
                if self.live:
                    mine = [x for x in self.live.values() if x.gen == self.gen and not x.written]
                    found = 0
                    for ttl, group in _by_ttl(self.live.values()).items():
                        found += int(await r.eval(RENEW, len(KEYS), *KEYS, ttl or _ttl_ms(self.settings),
                                                  *[x.rid for x in group]))
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
        for ttl, group in _by_ttl(self.live.values()).items():
            args = [ttl or _ttl_ms(self.settings)]
            for r in group:
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

    async def _load_caps(self, missing: str | None = None) -> None:
        """Mirror the daily caps from Postgres into counters that lack them (never from the settings);
        ``missing``: the cap field a reservation found absent (a project without a cap: none)."""
        def read():
            with autocommit(self.engine) as conn:   # a read: no BEGIN, no ROLLBACK
                return caps_for(conn)
        try:
            caps = await asyncio.to_thread(read)
        except Exception as e:
            raise BudgetUnavailable(f"cannot read the caps from Postgres: {e}") from e
        for scope in dict.fromkeys(daily_scopes(caps) + ([missing] if missing else [])):
            await self._eval(FILL_CAP, scope, str(to_units(caps[scope])) if scope in caps else NO_CAP)

    async def _project(self, job_id: str) -> str | None:
        """The API project of a job (fixed when the job is made), read once per job and process."""
        if job_id not in self._projects:
            def read():
                with autocommit(self.engine) as conn:   # a read: no BEGIN, no ROLLBACK
                    return conn.execute(sa.text("SELECT project_id FROM jobs WHERE job_id = :j"),
                                        {"j": job_id}).scalar()
            try:
                self._projects[job_id] = await asyncio.to_thread(read)
            except Exception as e:
                raise BudgetUnavailable(f"cannot read the job's project from Postgres: {e}") from e
            if len(self._projects) > 100_000:
                self._projects.clear()
        return self._projects[job_id]

    async def _load_job(self, job_id: str) -> None:
        def read():
            with autocommit(self.engine) as conn:   # a read: no BEGIN, no ROLLBACK
                return conn.execute(sa.text(JOB_SPENT_SQL), {"j": job_id}).first()
        row = await asyncio.to_thread(read)
        cap, spent = (row if row else (None, 0))
        await self._eval(LOAD, f"job:{job_id}", job_cap_units(cap), f"job:{job_id}", str(to_units(spent)))

    async def reserve(self, rid: str, job_id: str, tier: str, amount: Decimal, *, ttl_s: float | None = None,
                      wait: bool = True, period: str | None = None, track: bool = True) -> Reservation | None:
        """Hold ``amount`` against every cap of the request, or raise ``BudgetExceeded``
        (``BudgetNeverFits`` when it is above a cap itself, ``InvalidAmount`` when it is no amount).

        ``ttl_s``: how long the hold outlives its last renewal (never less than the budget's own);
        ``wait=False``: when only other live holds stand in the way, note why and return None at
        once (the scheduler tries again next tick); ``period``: the period to hold it in (default:
        the clock's); ``track=False``: not renewed by this process's heartbeat (a provider batch's
        hold lives by its own expiry, across restarts of its holder)."""
        units = reservation_units(amount)
        ttl_ms = max(_ttl_ms(self.settings), int((ttl_s or 0) * 1000))
        waited, since, noted = 0, None, 0.0
        while True:
            today = period or _period(self.settings, self.engine)
            fields = fields_for(job_id, tier, today, await self._project(job_id))
            args = [ttl_ms, rid, units, len(fields)] + [x for f in fields for x in f]
            r = [x.decode() if isinstance(x, bytes) else x for x in await self._eval(RESERVE, *args)]
            if r[0] == "ok":
                self._ensure_beat()
                if older(r[1], self.gen):   # Redis went back in time: these counters lost holds
                    await self._eval(RELEASE, rid)
                    await self._went_back(r[1])
                    continue
                await self._check_gen(r[1])
                res = Reservation(rid, r[1], fields, units, today, ttl_ms=ttl_ms)
                if track:
                    self.live[rid] = res
                return res
            if r[0] == "rebuild":
                await self._rebuild()
            elif r[0] == "load":
                if r[1].startswith("job:"):
                    await self._load_job(job_id)
                else:   # a daily scope's cap missing: the counters predate it
                    await self._load_caps(r[1])
            elif r[0] == "wait" and not wait:
                await asyncio.to_thread(note_wait, self.redis_sync, job_id, r[1], spent_field(fields, r[1]))
                return None
            elif r[0] == "wait":
                waited += 1
                now = time.monotonic()
                since = since or now
                if now - noted > WAIT_NOTE_TTL_S / 3:   # say why, while it lasts (``llmbatch status``)
                    noted = now
                    await asyncio.to_thread(note_wait, self.redis_sync, job_id, r[1], spent_field(fields, r[1]))
                if now - since >= self.settings.budget_wait_max_s:
                    raise await self._waited_out(r[1], spent_field(fields, r[1]), now - since)
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
        under a name of its own, until it lapses and a rebuild lets it go; the request's next
        attempt holds anew."""
        self.live.pop(res.rid, None)
        log.info("budget: %s may have been billed (%s): its hold of $%s stays until it expires",
                 res.rid, why, from_units(res.units))
        await self._eval(DETACH, res.rid, f"{res.rid}~{secrets.token_hex(4)}", res.ttl_ms or _ttl_ms(self.settings))

    async def detach(self, res: Reservation) -> Reservation:
        """A call that may have been billed: its hold moves to a name of its own and stays live
        (renewed by the heartbeat) until ``settle`` counts it at its maximum, once the call is
        on record as unconfirmed spend (pipeline/money/calls.py). The request's retry holds anew.
        Unlike ``keep``, nothing returns to the caps when the hold would have expired."""
        self.live.pop(res.rid, None)
        held = Reservation(f"{res.rid.rsplit('~', 1)[0]}~{secrets.token_hex(4)}", res.gen, res.fields,
                           res.units, res.period, ttl_ms=res.ttl_ms or _ttl_ms(self.settings))
        if not int(await self._eval(DETACH, res.rid, held.rid, held.ttl_ms)):
            # the hold was gone (expired unrenewed): hold it again under its new name until it is counted
            await self._eval(REASSERT, held.ttl_ms, held.rid, held.units,
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

    async def settle_held(self, spent: dict[str, Decimal], xid: str = "", *, attempts: int = 10) -> int:
        """Settle untracked holds ``{rid: actual USD}`` (provider batches) by the fields each recorded,
        after transaction ``xid`` committed their results. ``attempts`` tries per hold, then
        ``BudgetUnavailable`` (the caller tries again later; a rebuild drops the holds of results its
        ledger counts). A hold already gone adds nothing. Returns how many were counted."""
        counted = 0
        for rid, actual in spent.items():
            for attempt in range(attempts):
                try:
                    r = await self.redis.eval(SETTLE_HELD, len(KEYS), *KEYS, rid, str(max(0, to_units(actual))), xid)
                except Exception as e:
                    if attempt == attempts - 1:
                        raise store_error(e, f"settling {rid}") from e
                    await asyncio.sleep(min(2.0, 0.1 * 2 ** attempt))
                    continue
                if r[0] in (b"rebuild", "rebuild"):
                    await self._rebuild()
                    continue
                counted += r[0] in (b"ok", "ok")
                break
        return counted

    async def release_ids(self, rids, *, strict: bool = False) -> None:
        """Release holds whose calls never happened (a provider batch not created, requests not run).
        ``strict``: a failure raises ``BudgetUnavailable`` (the caller tries again) instead of a log line."""
        try:
            for rid in rids:
                self.live.pop(rid, None)
                await self.redis.eval(RELEASE, len(KEYS), *KEYS, rid)
        except Exception as e:
            if strict:
                raise store_error(e, f"releasing {len(rids)} holds") from e
            log.warning("budget: releasing %d holds failed (%s); they expire, and the reconcile corrects",
                        len(rids), e)
