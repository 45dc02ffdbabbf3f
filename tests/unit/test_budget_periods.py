"""The pure parts of issue 25 items 3 and 4: the caps' clock, the wait note and its sentence, and
the deferral of a wait that ran out."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline import clock, errors
from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.money import caps, deferral, waits


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(timezone.utc)),
       st.floats(min_value=-10 * 86400, max_value=10 * 86400, allow_nan=False))
def test_the_clock_row_is_a_frozen_instant_or_real_time_plus_an_offset(real, offset_s):
    assert clock.from_row(None, real) == real
    assert clock.from_row((None, offset_s), real) == real + timedelta(seconds=offset_s)
    frozen = real - timedelta(days=3)
    assert clock.from_row((frozen, offset_s), real) == frozen


def test_the_system_clock_ignores_the_row_and_an_unknown_clock_is_refused():
    s = Settings()
    before = datetime.now(timezone.utc)
    assert caps.period(replace(s, clock="system")) in {caps.day(before), caps.day()}
    with pytest.raises(ConfigError):
        clock.budget_now(replace(s, clock="sundial"))


def test_a_wait_note_keeps_when_it_started_on_the_same_cap_only():
    first = json.loads(waits._wait_note("j", "global", "global@2026-12-05", None))
    again = json.loads(waits._wait_note("j", "global", "global@2026-12-05", json.dumps(first).encode()))
    other = json.loads(waits._wait_note("j", "tier:peak", "tier:peak@2026-12-05", json.dumps(first).encode()))
    assert again["since"] == first["since"]
    assert other["since"] >= first["since"] and other["cap"] == "tier:peak"
    assert json.loads(waits._wait_note("j", "global", "g", b"not json"))["cap"] == "global"


def test_the_wait_sentence_names_the_cap_what_is_held_and_by_whom():
    w = {"cap": "tier:background", "cap_usd": "0.01", "spent_usd": "0.002", "held_usd": "0.0079",
         "holders": [{"job_id": "job_a", "holds": 100, "held_usd": "0.0079"}], "holders_total": 3}
    text = waits.describe_wait(w)
    assert "tier:background cap $0.01" in text and "$0.0079 held by job_a (100 holds" in text
    assert "2 more jobs" in text


def test_a_wait_that_ran_out_is_deferred_a_minute_not_a_day():
    e = errors.BudgetWaitedOut("global", Decimal("1"), Decimal("2"), "deferred: waited 300s")
    assert isinstance(e, errors.BudgetExceeded) and e.kind == "wait" and not e.permanent

    class Conn:
        def execute(self, _sql, params):
            self.until = params["u"]
    now = datetime(2026, 12, 5, 23, 59, tzinfo=timezone.utc)
    conn = Conn()
    deferral.defer_batch(conn, "b", {"wait"}, now)
    assert conn.until == now + timedelta(seconds=60)
