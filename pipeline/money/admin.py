"""The budget from the command line and the operator's side: set a cap (``set_cap``, Postgres
first, then its Redis mirror), apply the settings' caps on purpose (``apply_config``), show
caps, spend and holds (``show``), and record an alert when spend reaches 80 % or 100 % of a cap
(``record_alert``).
"""

from __future__ import annotations

import logging
from decimal import Decimal

import sqlalchemy as sa

from pipeline.config import Settings
from pipeline.constants import TIERS
from pipeline.errors import BudgetError, ConfigError
from pipeline.money.caps import caps_for, config_caps, period
from pipeline.money.scripts import KEYS, SET_CAP, store_error
from pipeline.money.units import from_units, parse_cap, to_units

log = logging.getLogger(__name__)


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



def set_cap(engine, redis_sync, settings: Settings, scope: str, usd) -> dict:
    """Set a cap (Postgres, the source of truth, then its mirror in Redis) and wake what it deferred.

    ``scope``: 'global', 'tier:<tier>', 'project:<id>' (an API project's daily cap) or 'job:<job_id>'.
    Returns what changed.
    """
    usd = parse_cap(usd, scope)
    if usd is None:
        raise ConfigError(f"{scope}: no amount given")
    if not (scope == "global" or scope.startswith("job:") or
            (scope.startswith("tier:") and scope[5:] in TIERS) or
            (scope.startswith("project:") and len(scope) > len("project:"))):
        raise ConfigError(f"unknown budget scope {scope!r}: 'global', 'tier:<tier>', 'project:<id>'"
                          " or 'job:<job id>'")
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


def project_spend(conn, day: str, project_id: str | None = None) -> tuple[dict, dict]:
    """Each API project's spend in the budget period ``day`` (sql/030_api.sql): its results
    (``{project: usd}``) and, apart, its unconfirmed calls; one project's alone when named."""
    params = {"p": day, "project": project_id}
    only = " AND (CAST(:project AS text) IS NULL OR j.project_id = :project)"
    ledger = dict(conn.execute(sa.text(
        "SELECT j.project_id, sum(r.cost_usd) FROM results r JOIN jobs j USING (job_id)"
        " WHERE j.project_id IS NOT NULL AND r.budget_period = CAST(:p AS date)" + only + " GROUP BY 1"),
        params).all())
    unconfirmed = dict(conn.execute(sa.text(
        "SELECT j.project_id, sum(c.max_cost_usd) FROM provider_calls c JOIN jobs j USING (job_id)"
        " WHERE j.project_id IS NOT NULL AND c.state = 'unconfirmed' AND c.budget_period = CAST(:p AS date)"
        + only + " GROUP BY 1"), params).all())
    return ledger, unconfirmed


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
        ledger_project, unconfirmed_project = project_spend(conn, today)
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
        "projects": {s[8:]: scope(s, f"{s}@{today}", ledger_project.get(s[8:], Decimal(0)),
                                  unconfirmed_project.get(s[8:], Decimal(0)))
                     for s in sorted(caps) if s.startswith("project:")},
        "jobs": [{"job_id": j["job_id"], "status": j["status"], "on_budget": j["on_budget"],
                  "cap_usd": str(j["budget_usd"]) if j["budget_usd"] is not None else None,
                  "spent_usd": str(j["spent"]), "unconfirmed_usd": str(j["unconfirmed"]),
                  "deferred": j["deferred"],
                  "held_usd": str(from_units(held.get(f"job:{j['job_id']}", 0))) if live else None}
                 for j in jobs],
        "alerts": [{**a, "cap_usd": str(a["cap_usd"]), "spent_usd": str(a["spent_usd"]),
                    "created_at": a["created_at"].isoformat()} for a in alerts],
    }
