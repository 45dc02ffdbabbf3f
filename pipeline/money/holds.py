"""The scheduler's synchronous holds (provider batches): one reservation without waiting
(``reserve_now``), held for the batch's whole window; settled by the fields each hold recorded
once the results are committed (``settle_held``); released when the call never happened
(``release_held``). Same scripts and same caps as ``Budget.reserve``.
"""

from __future__ import annotations

import logging
import time
from decimal import Decimal

import sqlalchemy as sa

from pipeline.config import Settings
from pipeline.constants import TIERS
from pipeline.errors import BudgetError, BudgetExceeded, BudgetNeverFits, BudgetUnavailable, InvalidAmount
from pipeline.money.caps import caps_for, fields_for, period
from pipeline.money.ledger import JOB_SPENT_SQL, rebuild
from pipeline.money.scripts import FILL_CAP, KEYS, LOAD, RELEASE, RESERVE, SETTLE_HELD, store_error
from pipeline.money.units import NO_CAP, from_units, job_cap_units, reservation_units, to_units
from pipeline.money.waits import note_wait, spent_field

log = logging.getLogger(__name__)


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
            note_wait(redis_sync, job_id, r[1], spent_field(fields, r[1]))
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
