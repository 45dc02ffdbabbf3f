"""Off-peak windows and cron slots (pure: no services, the time is passed in)."""

from datetime import datetime, timedelta, timezone

import pytest

from pipeline.errors import ConfigError
from pipeline.intake.windows import Window, cron_trigger, fire_times, next_fire
from schedules.clock import FixedClock

UTC = timezone.utc


def at(h, m=0, s=0, day=24):
    return datetime(2026, 11, day, h, m, s, tzinfo=UTC)


def test_overnight_window_open_and_closed():
    w = Window("0 22 * * *", "0 6 * * *")
    assert w.is_open(at(23))
    assert w.is_open(at(3))
    assert not w.is_open(at(12))
    assert not w.is_open(at(21, 59, 59))
    # the opening instant is inside, the closing instant outside
    assert w.is_open(at(22))
    assert not w.is_open(at(6))
    assert w.is_open(at(5, 59, 59))


def test_half_second_before_opening_is_still_closed():
    w = Window("0 22 * * *", "0 6 * * *")
    assert not w.is_open(at(21, 59, 59) + timedelta(milliseconds=500))


def test_window_in_a_time_zone():
    # 22:00-06:00 in New York is 03:00-11:00 UTC in November (EST, UTC-5)
    w = Window("0 22 * * *", "0 6 * * *", "America/New_York")
    assert w.is_open(at(4))
    assert not w.is_open(at(12))
    assert not w.is_open(at(2, 59))


def test_daytime_window_and_next_change():
    w = Window("0 9 * * 1-5", "0 17 * * 1-5")  # 2026-11-24 is a Tuesday
    assert w.is_open(at(10))
    assert not w.is_open(at(18))
    assert w.next_change(at(10)) == at(17)
    assert w.next_change(at(18)) == at(9, day=25)
    assert not w.is_open(datetime(2026, 11, 28, 10, tzinfo=UTC))   # Saturday


def test_fire_times_are_exclusive_of_start_and_inclusive_of_end():
    t = cron_trigger("*/10 * * * * *")          # 6 fields: every 10 seconds
    assert fire_times(t, at(1, 0, 0), at(1, 0, 30)) == [at(1, 0, 10), at(1, 0, 20), at(1, 0, 30)]
    assert fire_times(t, at(1, 0, 5), at(1, 0, 9)) == []
    assert next_fire(cron_trigger("0 1 * * *"), at(1)) == at(1, day=25)


def test_bad_cron_is_a_config_error():
    with pytest.raises(ConfigError):
        cron_trigger("61 * * * *")
    with pytest.raises(ConfigError):
        cron_trigger("* * *")


def test_fixed_clock_moves_a_window():
    w = Window("0 22 * * *", "0 6 * * *")
    clock = FixedClock(at(21, 59))
    assert not w.is_open(clock.now())
    clock.advance(minutes=2)
    assert w.is_open(clock.now())
    clock.advance(hours=8)
    assert not w.is_open(clock.now())


def test_crontab_day_of_week_numbers_mean_what_crontab_means():
    from pipeline.intake.windows import crontab_dow
    assert crontab_dow("1-5") == "mon,tue,wed,thu,fri"
    assert crontab_dow("0") == crontab_dow("7") == "sun"
    assert crontab_dow("5-7") == "sun,fri,sat"
    assert crontab_dow("*/2") == "sun,tue,thu,sat"
    assert crontab_dow("sat,sun") == "sun,sat"
    # Sunday 2026-11-29 01:00 fires "0 1 * * 0", Monday does not
    t = cron_trigger("0 1 * * 0")
    assert next_fire(t, at(2)) == datetime(2026, 11, 29, 1, tzinfo=UTC)
