from datetime import datetime, timedelta, timezone

import pytest

from pipeline.intake.tiers import classify

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("priority, tier", [(9, "immediate"), (8, "immediate"), (7, "peak"), (5, "peak"),
                                            (4, "offpeak"), (2, "offpeak"), (1, "background"),
                                            (0, "background"), (None, "peak")])
def test_priority_decides(priority, tier):
    assert classify(priority, None, None, NOW)[0] == tier


def test_explicit_tier_wins():
    assert classify(9, "background", None, NOW) == ("background", "explicit tier")


def test_deadline_lifts_to_the_lowest_tier_that_meets_it():
    tier, why = classify(0, None, NOW + timedelta(minutes=3), NOW)
    assert tier == "immediate" and "deadline" in why
    assert classify(0, None, NOW + timedelta(hours=2), NOW)[0] == "peak"
    assert classify(0, None, NOW + timedelta(hours=20), NOW)[0] == "offpeak"
    assert classify(0, None, NOW + timedelta(days=3), NOW)[0] == "background"


def test_deadline_never_lowers_a_tier():
    assert classify(9, None, NOW + timedelta(days=3), NOW)[0] == "immediate"
