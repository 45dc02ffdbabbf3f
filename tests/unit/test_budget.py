"""Budget arithmetic and configuration: no services."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest

from pipeline import budget
from pipeline.config import load_settings
from pipeline.errors import ConfigError


def test_units_round_up_and_back_exactly():
    assert budget.to_units(Decimal("0.00000001")) == 1
    assert budget.to_units("0.000000001") == 1            # below the scale: held as one unit, never 0
    assert budget.to_units(Decimal("0.0000217")) == 2170
    assert budget.to_units(Decimal("12.5")) == 1_250_000_000
    assert budget.from_units(1_250_000_000) == Decimal("12.5")
    assert budget.from_units("0") == 0
    # a reservation is never below the cost the ledger will record (numeric(18, 8) rounds)
    for cost in ("0.000000015", "0.0000000149", "1.000000001"):
        assert budget.from_units(budget.to_units(cost)) >= Decimal(cost).quantize(budget.UNIT)


def test_every_request_counts_against_global_tier_and_job_scopes():
    fields = budget.fields_for("job_1", "peak", "2026-11-24")
    assert fields == [("global@2026-11-24", "global"), ("tier:peak@2026-11-24", "tier:peak"),
                      ("job:job_1", "job:job_1")]


def test_days_are_utc():
    late = datetime(2026, 11, 24, 23, 59, 59, tzinfo=timezone.utc)
    assert budget.day(late) == "2026-11-24"
    assert budget.next_day(late) == datetime(2026, 11, 25, tzinfo=timezone.utc)


def test_caps_from_config():
    s = load_settings({"LLMBATCH_BUDGET_GLOBAL_DAILY_USD": "100",
                       "LLMBATCH_BUDGET_TIER_DAILY_USD": "peak=20.5,background=1", "LLMBATCH_CONFIG": "/nonexistent"})
    assert budget.config_caps(s) == {"global": Decimal(100), "tier:peak": Decimal("20.5"),
                                     "tier:background": Decimal(1)}
    assert budget.config_caps(load_settings({"LLMBATCH_CONFIG": "/nonexistent"})) == {}
    with pytest.raises(ConfigError, match="unknown tier"):
        budget.config_caps(load_settings({"LLMBATCH_BUDGET_TIER_DAILY_USD": "urgent=1",
                                          "LLMBATCH_CONFIG": "/nonexistent"}))
    with pytest.raises(ConfigError, match="outside"):
        budget.config_caps(load_settings({"LLMBATCH_BUDGET_GLOBAL_DAILY_USD": "-1",
                                          "LLMBATCH_CONFIG": "/nonexistent"}))
    with pytest.raises(ConfigError, match="not a decimal"):
        budget.config_caps(load_settings({"LLMBATCH_BUDGET_GLOBAL_DAILY_USD": "lots",
                                          "LLMBATCH_CONFIG": "/nonexistent"}))


def test_caps_stay_exact_in_lua_doubles():
    # Lua compares amounts as doubles: every cap we accept must be an exact integer there
    assert budget.to_units(budget.MAX_CAP_USD) < 2 ** 53


class _Conn:
    def __init__(self):
        self.calls = []

    def execute(self, stmt, params=None):
        self.calls.append((str(stmt), params))


def test_deferred_batches_wait_for_the_next_day_a_minute_or_a_raised_cap():
    now = datetime(2026, 11, 24, 10, 0, tzinfo=timezone.utc)
    conn = _Conn()
    budget.defer_batch(conn, "b1", {"global", "job"}, now)
    budget.defer_batch(conn, "b2", {"job"}, now)
    budget.defer_batch(conn, "b3", {"unavailable", "tier"}, now)
    untils = [p["u"] for _, p in conn.calls]
    assert untils[0] == datetime(2026, 11, 25, tzinfo=timezone.utc)
    assert untils[1] is None                                  # only `budget set --job` wakes it
    assert (untils[2] - now).total_seconds() == 60

