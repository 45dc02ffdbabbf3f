"""Deadlines read with the off-peak window (pure: pipeline/intake/tiers.py, pipeline/intake/windows.py).

The promise (docs/USAGE.md "Deadlines"): a request is never held past the
latest time it can start and still meet its deadline. Two parts keep it: the
batcher holds a request for the window only when the window opens by its
latest start, and the scheduler releases any held request at its latest start
(whatever the batcher's clock said), before the deadline makes it missed.
"""

from datetime import datetime, timedelta, timezone
from functools import lru_cache

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.intake.tiers import TierRules, classify, latest_start, missed, release_due
from pipeline.intake.windows import Window

UTC = timezone.utc
HELD = ("offpeak", "background")
RULES = TierRules(deadline_margin_s=900)


@lru_cache(maxsize=None)
def window(open_h: int, close_h: int) -> Window:
    return Window(f"0 {open_h} * * *", f"0 {close_h} * * *")


def test_issue_24_priority_3_deadline_12h30_at_0630_is_not_held_for_a_window_at_22():
    """The reproduction: clock 06:30 UTC, deadline 12 h 30 m away, window 22:00 → 06:00."""
    now = datetime(2026, 12, 5, 6, 30, tzinfo=UTC)
    w = window(22, 6)
    tier, why = classify(3, None, now + timedelta(hours=12, minutes=30), now, RULES, offpeak_opens=w.opens_at(now))
    assert tier == "peak", why
    assert "deadline" in why


def test_a_deadline_after_the_window_opens_still_waits_for_the_window():
    now = datetime(2026, 12, 5, 6, 30, tzinfo=UTC)
    w = window(22, 6)
    deadline = datetime(2026, 12, 6, 5, 0, tzinfo=UTC)   # inside tonight's window, after its latest start
    assert classify(3, None, deadline, now, RULES, offpeak_opens=w.opens_at(now))[0] == "offpeak"


def test_an_open_window_serves_any_deadline_past_the_margin():
    now = datetime(2026, 12, 5, 23, 0, tzinfo=UTC)
    w = window(22, 6)
    assert w.opens_at(now) == now
    assert classify(3, None, now + timedelta(minutes=20), now, RULES, offpeak_opens=w.opens_at(now))[0] == "offpeak"


instants = st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2027, 12, 31), timezones=st.just(UTC))
hours = st.integers(0, 23)


@settings(max_examples=300, deadline=None)
@given(now=instants, left_s=st.integers(-3600, 3 * 86400), open_h=hours, close_h=hours,
       priority=st.integers(0, 9), margin_s=st.integers(60, 4 * 3600), tick_s=st.integers(1, 59),
       late_s=st.integers(0, 3 * 86400))
def test_a_request_is_never_held_past_its_latest_start(now, left_s, open_h, close_h, priority, margin_s,
                                                      tick_s, late_s):
    if open_h == close_h:
        close_h = (open_h + 1) % 24
    w = window(open_h, close_h)
    rules = TierRules(deadline_margin_s=margin_s)
    deadline = now + timedelta(seconds=left_s)
    start_by = latest_start(deadline, rules)
    opens = w.opens_at(now)
    tier, why = classify(priority, None, deadline, now, rules, offpeak_opens=opens)

    # the batcher: off-peak only when the window opens by the latest start
    if tier == "offpeak":
        assert opens <= start_by, why
    # ... and nothing is held that is already due
    if tier in HELD:
        assert start_by >= now, why

    # the scheduler, at any tick from now on: released once the latest start is reached, never missed
    # while it could still be released, and a tick after the latest start comes before the deadline
    t = now + timedelta(seconds=late_s)
    assert release_due(t, deadline, rules) == (t >= start_by)
    if missed(t, deadline):
        assert release_due(t, deadline, rules)
    first_tick = start_by + timedelta(seconds=tick_s)   # the worst case: a tick just missed it
    if margin_s > tick_s:
        assert release_due(first_tick, deadline, rules) and not missed(first_tick, deadline)


@settings(max_examples=200, deadline=None)
@given(now=instants, left_s=st.integers(0, 2 * 86400), open_h=hours, close_h=hours)
def test_a_later_window_never_lowers_the_tier(now, left_s, open_h, close_h):
    """Knowing the window only ever lifts a request: never below the rule without a window."""
    if open_h == close_h:
        close_h = (open_h + 1) % 24
    deadline = now + timedelta(seconds=left_s)
    order = RULES.order
    with_window = classify(3, None, deadline, now, RULES, offpeak_opens=window(open_h, close_h).opens_at(now))[0]
    without = classify(3, None, deadline, now, RULES)[0]
    if without != "peak":   # the old 12 h rule may lift to peak a request the window serves in time
        assert order.index(with_window) >= order.index(without)


def test_no_deadline_no_change():
    now = datetime(2026, 12, 5, 6, 30, tzinfo=UTC)
    assert classify(3, None, None, now, RULES, offpeak_opens=now + timedelta(hours=15))[0] == "offpeak"
    assert not release_due(now, None) and not missed(now, None)


def test_status_names_missed_deadlines():
    from llmbatch.cli import views
    st = {"job_id": "job_d", "status": "completed_with_errors", "provider": "simulator",
          "counts": {"total": 3, "accepted": 3, "rejected": 0, "succeeded": 1, "failed": 2, "cancelled": 0,
                     "pending": 0},
          "cost_usd": "0.001", "budget_usd": None, "rate_per_s": 0.0, "eta_s": 0, "by_tier": {},
          "deadlines": {"with_deadline": 3, "on_time": 1, "late": 0, "missed": 2, "overdue": 0, "pending": 0,
                        "next_deadline": None}}
    text = views.format_status(st)
    assert "deadlines: 2 MISSED (failed deadline_missed, not sent), 1 on time" in text
    assert "2 MISSED" in views.wait_line(st)


def test_the_batcher_path_passes_the_window_to_the_rule():
    """decode (what the batcher calls) classifies with the window's opening it is given."""
    from pipeline.intake.messages import decode
    from tests.unit.test_intake_messages import message, raw
    now = datetime(2026, 12, 5, 6, 30, tzinfo=UTC)
    m = raw(message(priority=3, tier=None, deadline=(now + timedelta(hours=12, minutes=30)).isoformat()))
    assert decode(m, now, offpeak_opens=window(22, 6).opens_at(now), rules=RULES)["tier"] == "peak"
    assert decode(m, now, offpeak_opens=now, rules=RULES)["tier"] == "offpeak"   # the window is open


def test_the_held_batch_selection_is_spelled_once():
    """schedules/release.py and schedules/deadlines.py used to pick held batches each in their own
    words (by tier, by deadline, to fail the missed): one selection now, in schedules/release.py."""
    import ast
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[2] / "schedules"
    picks = re.compile(r"FROM batches\b[^()]*?status\s*=\s*'held'", re.I)
    found = [f"{path.name}:{node.lineno}" for path in (root / "release.py", root / "deadlines.py")
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and picks.search(node.value)]
    assert len(found) == 1, found
