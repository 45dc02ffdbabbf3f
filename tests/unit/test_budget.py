"""Budget arithmetic and configuration: no services."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest

from pipeline import errors
from pipeline.config import load_settings
from pipeline.errors import ConfigError
from pipeline.money import caps, deferral, units as units_mod


def test_units_round_up_and_back_exactly():
    assert units_mod.to_units(Decimal("0.00000001")) == 1
    assert units_mod.to_units("0.000000001") == 1            # below the scale: held as one unit, never 0
    assert units_mod.to_units(Decimal("0.0000217")) == 2170
    assert units_mod.to_units(Decimal("12.5")) == 1_250_000_000
    assert units_mod.from_units(1_250_000_000) == Decimal("12.5")
    assert units_mod.from_units("0") == 0
    # a reservation is never below the cost the ledger will record (numeric(18, 8) rounds)
    for cost in ("0.000000015", "0.0000000149", "1.000000001"):
        assert units_mod.from_units(units_mod.to_units(cost)) >= Decimal(cost).quantize(units_mod.UNIT)


def test_every_request_counts_against_global_tier_and_job_scopes():
    fields = caps.fields_for("job_1", "peak", "2026-11-24")
    assert fields == [("global@2026-11-24", "global"), ("tier:peak@2026-11-24", "tier:peak"),
                      ("job:job_1", "job:job_1")]


def test_a_job_of_an_api_project_also_counts_against_its_projects_daily_cap():
    fields = caps.fields_for("job_1", "peak", "2026-11-24", "team-a")
    assert fields[-1] == ("project:team-a@2026-11-24", "project:team-a") and len(fields) == 4
    assert caps.daily_scopes({"project:team-a": 1, "global": 2, "job:x": 3}) == [
        "global", "tier:immediate", "tier:peak", "tier:offpeak", "tier:background", "project:team-a"]


def test_days_are_utc():
    late = datetime(2026, 11, 24, 23, 59, 59, tzinfo=timezone.utc)
    assert caps.day(late) == "2026-11-24"
    assert caps.next_day(late) == datetime(2026, 11, 25, tzinfo=timezone.utc)


def test_caps_from_config():
    s = load_settings({"LLMBATCH_BUDGET_GLOBAL_DAILY_USD": "100",
                       "LLMBATCH_BUDGET_TIER_DAILY_USD": "peak=20.5,background=1", "LLMBATCH_CONFIG": "/nonexistent"})
    assert caps.config_caps(s) == {"global": Decimal(100), "tier:peak": Decimal("20.5"),
                                     "tier:background": Decimal(1)}
    assert caps.config_caps(load_settings({"LLMBATCH_CONFIG": "/nonexistent"})) == {}
    with pytest.raises(ConfigError, match="unknown tier"):
        caps.config_caps(load_settings({"LLMBATCH_BUDGET_TIER_DAILY_USD": "urgent=1",
                                          "LLMBATCH_CONFIG": "/nonexistent"}))
    with pytest.raises(ConfigError, match="outside"):
        caps.config_caps(load_settings({"LLMBATCH_BUDGET_GLOBAL_DAILY_USD": "-1",
                                          "LLMBATCH_CONFIG": "/nonexistent"}))
    with pytest.raises(ConfigError, match="not a decimal"):
        caps.config_caps(load_settings({"LLMBATCH_BUDGET_GLOBAL_DAILY_USD": "lots",
                                          "LLMBATCH_CONFIG": "/nonexistent"}))


def test_caps_stay_exact_in_lua_doubles():
    # Lua compares amounts as doubles: every cap we accept must be an exact integer there
    assert units_mod.to_units(units_mod.MAX_CAP_USD) < 2 ** 53


class _Conn:
    def __init__(self):
        self.calls = []

    def execute(self, stmt, params=None):
        self.calls.append((str(stmt), params))


def test_deferred_batches_wait_for_the_next_day_a_minute_or_a_raised_cap():
    now = datetime(2026, 11, 24, 10, 0, tzinfo=timezone.utc)
    conn = _Conn()
    deferral.defer_batch(conn, "b1", {"global", "job"}, now)
    deferral.defer_batch(conn, "b2", {"job"}, now)
    deferral.defer_batch(conn, "b3", {"unavailable", "tier"}, now)
    untils = [p["u"] for _, p in conn.calls]
    assert untils[0] == datetime(2026, 11, 25, tzinfo=timezone.utc)
    assert untils[1] is None                                  # only `budget set --job` wakes it
    assert (untils[2] - now).total_seconds() == 60



# ---------------------------------------------------------------- issue 13: amounts, caps, TTL

from hypothesis import given, strategies as st  # noqa: E402


@pytest.mark.parametrize("bad", ["-5", -5, "-0.00000001", "NaN", "nan", "Infinity", "-Infinity", "sNaN", "abc", "",
                                 "1e12", Decimal("50000000.00000001"), None, "1,5"])
def test_a_reservation_of_no_real_amount_is_refused(bad):
    """#12 item 2: a negative, non-finite or absurd hold would bypass or poison the caps."""
    with pytest.raises(errors.InvalidAmount, match="cannot be reserved"):
        units_mod.reservation_units(bad)


@pytest.mark.parametrize("free", ["0", 0, Decimal("0.00000000"), "-0"])
def test_a_free_request_holds_the_smallest_unit(free):
    """A $0 maximum (a moderation: its model is free) still reserves, one unit, so its call is held and
    on record like any other and never outside the caps; it settles to $0."""
    assert units_mod.reservation_units(free) == 1


@given(st.decimals(allow_nan=True, allow_infinity=True, places=None))
def test_reservation_units_are_positive_and_exact_in_lua_or_refused(d):
    try:
        units = units_mod.reservation_units(d)
    except errors.InvalidAmount:
        assert not d.is_finite() or d < 0 or d > units_mod.MAX_CAP_USD
        return
    assert 0 <= d <= units_mod.MAX_CAP_USD
    assert 1 <= units < 2 ** 53 and len(str(units)) <= 16      # what the Lua scripts accept
    assert units_mod.from_units(units) >= d                          # never under-holds


@pytest.mark.parametrize("bad", ["-1", "NaN", "Infinity", "abc", "1e9"])
def test_caps_are_finite_and_in_range(bad):
    with pytest.raises(ConfigError):
        units_mod.parse_cap(bad, "cap")
    assert units_mod.parse_cap("0", "cap") == 0 and units_mod.parse_cap(" 2.5 ", "cap") == Decimal("2.5")


def test_a_stored_job_cap_that_is_no_amount_holds_everything():
    assert units_mod.job_cap_units(None) == units_mod.NO_CAP
    assert units_mod.job_cap_units(Decimal(-1)) == "0"           # used to mean "no cap"
    assert units_mod.job_cap_units(Decimal("NaN")) == "0"
    assert units_mod.job_cap_units(Decimal("0.5")) == "50000000"


def test_caps_in_force_never_come_from_the_settings():
    """#13 item 4: the settings are not read; only the budget_caps rows are."""
    class Conn:
        def execute(self, stmt):
            assert "budget_caps" in str(stmt)
            return type("R", (), {"all": lambda self: [("global", Decimal(3))]})()
    s = load_settings({"LLMBATCH_BUDGET_GLOBAL_DAILY_USD": "100", "LLMBATCH_CONFIG": "/nonexistent"})
    assert caps.caps_for(Conn(), s) == {"global": Decimal(3)}


def test_a_hold_outlives_the_provider_timeout():
    """#13 item 3: a dead worker's hold expires only after its call can no longer be answered."""
    s = load_settings({"LLMBATCH_BUDGET_RESERVATION_TTL_S": "1", "LLMBATCH_PROVIDER_TIMEOUT_S": "60",
                       "LLMBATCH_CONFIG": "/nonexistent"})
    assert caps.reservation_ttl_s(s) == 60 + s.budget_reservation_margin_s
    s = load_settings({"LLMBATCH_BUDGET_RESERVATION_TTL_S": "900", "LLMBATCH_CONFIG": "/nonexistent"})
    assert caps.reservation_ttl_s(s) == 900


def test_the_never_fits_reason_names_both_numbers():
    e = errors.BudgetNeverFits("job:j1", Decimal("0.0042"), Decimal("0.001"))
    assert e.permanent and e.code == "budget_exceeded" and "$0.0042" in str(e) and "$0.001" in str(e)
    assert not errors.BudgetExceeded("job:j1", Decimal(0), Decimal(1)).permanent


@pytest.mark.parametrize("bad", ["-1", "NaN", "abc", "inf", "1e9"])
def test_cap_input_is_validated_at_the_command_line(bad):
    """#13 item 6: exit 2 with a clear message, before any service is touched."""
    from click.testing import CliRunner

    from llmbatch.cli.main import main
    runner = CliRunner()
    for args in (["submit", "nofile.jsonl", "--budget-usd", bad],
                 ["schedule", "add", "n", "--cron", "0 1 * * *", "--file", "f.jsonl", "--budget-usd", bad],
                 ["budget", "set", "global", "--", bad], ["budget", "set", "--global", "--usd", bad]):
        out = runner.invoke(main, args)
        assert out.exit_code == 2, (args, out.output)
        assert "is not a cap" in out.output and "Traceback" not in out.output, out.output
