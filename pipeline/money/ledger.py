"""The truth behind the counters: the Postgres ledger. ``ledger_snapshot`` reads caps, spend per
scope and period and the running requests from one consistent snapshot; ``rebuild`` installs
them in Redis under a lock when the marker is missing; ``reconcile`` (the scheduler's upkeep)
compares the counters with the ledger and rebuilds them when they drifted.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from datetime import datetime
from urllib.parse import unquote

import sqlalchemy as sa

from pipeline.config import Settings
from pipeline.errors import BudgetError, BudgetUnavailable, InvalidAmount
from pipeline.ids import request_key
from pipeline.money.caps import caps_for, daily_scopes, day, fields_for, period
from pipeline.money.scripts import (
    INSTALL, INVALIDATE, KEYS, LOCK_KEY, PROVIDER_BATCH_HOLD_S, REHOLD_GRACE_S, RUN_ID_KEY, SET_CAP,
)
from pipeline.money.units import NO_CAP, from_units, job_cap_units, reservation_units, to_units

log = logging.getLogger(__name__)


#: what a provider call that got no answer costs in the ledger (sql/012_unconfirmed_spend.sql):
#: its maximum while unconfirmed, the provider's figure once a report confirms it
CALL_SPEND = ("CASE p.state WHEN 'unconfirmed' THEN p.max_cost_usd"
              " WHEN 'confirmed' THEN coalesce(p.confirmed_usd, 0) ELSE 0 END")
#: the jobs that may still spend
OPEN_JOBS = "SELECT job_id FROM jobs WHERE status = ANY(llmbatch_states('job_open'))"


def jobs_spent_sql(jobs: str) -> str:
    """The spend in the ledger of the jobs ``jobs`` (SQL: a bind parameter, or a subquery of job
    ids): their results, and their calls that may have been billed, as rows ``(job_id, spent)``.

    A join the planner sees whole, never a subquery correlated with ``jobs.job_id``: that one is
    planned for an average job, and where a few large jobs fill ``results`` it read the whole table
    for every job asked about, a new job's first request included."""
    return (f"SELECT job_id, sum(spent) AS spent FROM ("
            f"SELECT r.job_id, r.cost_usd AS spent FROM results r WHERE r.job_id IN ({jobs})"
            f" UNION ALL SELECT p.job_id, {CALL_SPEND} FROM provider_calls p"
            f" WHERE p.job_id IN ({jobs}) AND p.state <> 'sent') s GROUP BY job_id")


#: one job's cap and spend in the ledger (the budget loads a job's counter from it)
JOB_SPENT_SQL = (f"SELECT j.budget_usd, coalesce(s.spent, 0) FROM jobs j"
                 f" LEFT JOIN ({jobs_spent_sql(':j')}) s USING (job_id) WHERE j.job_id = :j")


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
            for scope in daily_scopes(caps):
                caps.setdefault(scope, NO_CAP)
            spent: dict[str, str] = {}
            for job_id, cap, s in conn.execute(sa.text(
                    f"SELECT j.job_id, j.budget_usd, coalesce(s.spent, 0) FROM jobs j LEFT JOIN"
                    f" ({jobs_spent_sql(OPEN_JOBS)}) s USING (job_id) WHERE j.status = ANY(llmbatch_states('job_open'))")).all():
                caps[f"job:{job_id}"] = job_cap_units(cap)
                spent[f"job:{job_id}"] = str(to_units(s))
            res, periods = [], {today}
            for job_id, cid, tier, max_cost, in_pb, held_in, project in conn.execute(sa.text(
                    "SELECT q.job_id, q.custom_id, q.tier, q.max_cost_usd, b.provider_batch IS NOT NULL,"
                    " q.budget_period, j.project_id"
                    " FROM requests q LEFT JOIN batches b ON b.batch_id = q.batch_id"
                    " LEFT JOIN jobs j ON j.job_id = q.job_id"
                    " WHERE q.status = 'running'")).all():
                # a provider batch's hold stays in the period it was taken in; a worker's is re-asserted
                when = held_in.isoformat() if in_pb and held_in is not None else today
                periods.add(when)
                fields = [sf for sf, _ in fields_for(job_id, tier, when, project)]
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
            # each API project's daily spend (sql/030_api.sql): its jobs' results and unanswered calls
            for p, project, s in conn.execute(sa.text(
                    "SELECT p, project_id, sum(c) FROM (SELECT r.budget_period::text AS p, j.project_id,"
                    "  r.cost_usd AS c FROM results r JOIN jobs j USING (job_id)"
                    "  WHERE j.project_id IS NOT NULL AND r.budget_period = ANY(CAST(:ps AS date[]))"
                    f" UNION ALL SELECT p.budget_period::text, j.project_id, {CALL_SPEND} FROM provider_calls p"
                    "  JOIN jobs j USING (job_id) WHERE j.project_id IS NOT NULL AND p.state <> 'sent'"
                    "  AND p.budget_period = ANY(CAST(:ps AS date[]))) x GROUP BY 1, 2"), {"ps": ps}).all():
                spent[f"project:{project}@{p}"] = str(to_units(s))
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


def older(gen: str, than: str | None) -> bool:
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
                lapsed = _resolve_lapsed(engine, redis_sync)
                snap = ledger_snapshot(engine, settings, held_ids=held_ids)
                snap["lapsed"] = lapsed
                gen = new_generation()
                # re-held for a short grace only: most 'running' requests are queued in their batch,
                # not in a call; the live workers re-assert theirs within it (Budget._heartbeat)
                kept, reheld, dropped = redis_sync.eval(INSTALL, len(KEYS), *KEYS, gen,
                                                        int(REHOLD_GRACE_S * 1000), json.dumps(snap))
                redis_sync.set(RUN_ID_KEY, _redis_run_id(redis_sync))
                log.warning("budget counters rebuilt from the Postgres ledger (generation %s, %d live holds"
                            " kept, %d holds of requests already in the ledger or lapsed dropped, %d running"
                            " requests re-held)", gen, kept, dropped, reheld)
                return True
            finally:
                if redis_sync.get(LOCK_KEY) == token.encode():
                    redis_sync.delete(LOCK_KEY)
        if time.monotonic() > deadline:
            raise BudgetUnavailable("budget counters are being rebuilt and the rebuild did not finish in time")
        time.sleep(0.05)
    return False


def lapsed_holds(redis_sync) -> list[str]:
    """The call attempts' holds past their expiry (by Redis's clock), set apart or not yet:
    their holders stopped renewing them (``scripts`` ``lapse``)."""
    sec, usec = redis_sync.time()
    due = redis_sync.zrangebyscore(KEYS[5], "-inf", sec * 1000 + usec // 1000)
    return sorted({k.decode() for k in redis_sync.smembers(KEYS[7])} | {k.decode() for k in due if b"~" in k})


def _resolve_lapsed(engine, redis_sync) -> list[str]:
    """Put the calls of lapsed holds in the ledger before a rebuild lets the holds go.

    A hold lapses when its holder stops renewing it: a worker killed mid-call, whose calls the
    provider bills all the same. Its calls still on record as sent become unconfirmed spend
    (pipeline/money/calls.py) in a transaction that commits before the rebuild's snapshot, so
    the counters never stop counting them: without this, the room a lapsed hold left was taken
    by other calls before anyone counted the dead ones (issue 24, kill -9 of a worker at a cap).
    Returns the holds resolved; the rebuild drops them.
    """
    from pipeline.money import calls
    lapsed = lapsed_holds(redis_sync)
    if lapsed:
        with engine.begin() as conn:
            rows, _ = calls.unconfirm_held(conn, lapsed)
        if rows:
            log.warning("budget: %d calls of %d lapsed holds counted as unconfirmed spend", len(rows), len(lapsed))
    return lapsed


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
                if gen1 != gen2:
                    # another process invalidated or rebuilt the counters meanwhile (a worker that saw
                    # them go back in time): make sure they are rebuilt before saying they are right
                    rebuilt = rebuild(engine, redis_sync, settings)
                    return {"drift_units": {}, "rebuilt": rebuilt, "reason": "counters replaced meanwhile"}
                drift = {f: d for f, d in second.items() if first.get(f) == d}
            lapsed = [] if drift else lapsed_holds(redis_sync)
            if lapsed:
                # holds their holders stopped renewing stay counted until a rebuild has put their
                # calls in the ledger (``_resolve_lapsed``)
                stale, reason = set(lapsed), f"{len(lapsed)} holds lapsed (their holders stopped renewing them)"
            elif not drift:
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
                for scope in daily_scopes(caps):
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
