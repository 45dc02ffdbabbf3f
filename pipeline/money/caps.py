"""Which caps a spend counts against, and in which period: the UTC day by the caps' one clock
(pipeline/clock.py), the scopes of a request (``fields_for``: global, tier, job and, for a job of an
API project, the project's daily cap ``project:<id>``), the caps in force (``caps_for``,
the ``budget_caps`` table) and those written in the settings (``config_caps``), and how long a
hold outlives its last renewal (``reservation_ttl_s``).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import sqlalchemy as sa

from pipeline.clock import budget_now
from pipeline.config import Settings
from pipeline.constants import TIERS
from pipeline.errors import ConfigError
from pipeline.money.units import parse_cap
from pipeline.stores.db import get_engine

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


def fields_for(job_id: str, tier: str, today: str, project: str | None = None) -> list[tuple[str, str]]:
    """(spent field, cap field) of every scope a request of ``job_id`` in ``tier`` counts against;
    a job of an API project (``jobs.project_id``, pipeline/api/) also against its project's daily cap."""
    fields = [(f"global@{today}", "global"), (f"tier:{tier}@{today}", f"tier:{tier}"),
              (f"job:{job_id}", f"job:{job_id}")]
    if project:
        fields.append((f"project:{project}@{today}", f"project:{project}"))
    return fields


def daily_scopes(caps: dict) -> list[str]:
    """The daily cap fields kept in the counters: global, every tier, and each project with a cap."""
    return ["global", *(f"tier:{t}" for t in TIERS), *sorted(s for s in caps if s.startswith("project:"))]


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


def reservation_ttl_s(settings: Settings) -> float:
    """How long a hold outlives its last renewal: at least the provider timeout plus a margin.

    A live process renews its holds (``Budget._heartbeat``) while they wait for a
    lease or a rate window and while their call is in flight, so only a dead
    worker's hold expires, and only after its call can no longer be answered
    (``provider_timeout_s`` + ``budget_reservation_margin_s``).
    """
    return max(settings.budget_reservation_ttl_s,
               settings.provider_timeout_s + settings.budget_reservation_margin_s)
