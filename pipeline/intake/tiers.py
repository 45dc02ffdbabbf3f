"""Tier classification: which of the four tiers a request runs in, and why.

Rules (docs/USAGE.md "Tiers and windows"): an explicit tier wins; otherwise the priority
decides (≥ 8 immediate, 5–7 peak, 2–4 off-peak, 0–1 background); a deadline
lifts a request to the lowest tier that can still meet it. Pure functions:
no clock is read here, the caller passes ``now``.

Deadlines and the off-peak window are read together. A request must start by
its *latest start*, ``deadline - deadline_margin_s`` (the margin is the time
allowed to run it). Off-peak (or background, which also waits) is only chosen
when the window opens by then; otherwise the request goes to peak at once.
The batcher decides with its own clock and may be wrong (a test clock, a window
paced full), so the scheduler releases any held request at its latest start
(``release_due``, schedules/deadlines.py): a request is never held past it.
A request still held at its deadline is failed ``deadline_missed``, as a
provider batch expires the lines it did not run (docs/USAGE.md "Deadlines").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

DEFAULT_PRIORITY = 5


@dataclass(frozen=True)
class TierRules:
    immediate_min: int = 8
    peak_min: int = 5
    offpeak_min: int = 2
    #: a deadline closer than this (seconds) needs the immediate tier
    immediate_within_s: float = 600
    #: ... closer than this needs at least peak (off-peak may wait for the night)
    peak_within_s: float = 12 * 3600
    #: ... closer than this needs at least off-peak (background may wait a day)
    offpeak_within_s: float = 24 * 3600
    #: the time allowed to run a request released for its deadline (setting ``deadline_margin_s``)
    deadline_margin_s: float = 900
    order: tuple = field(default=("background", "offpeak", "peak", "immediate"))


def rules_for(settings) -> TierRules:
    """The rules with the deadline margin of ``settings`` (``deadline_margin_s``)."""
    return TierRules(deadline_margin_s=settings.deadline_margin_s)


def latest_start(deadline: datetime, rules: TierRules = TierRules()) -> datetime:
    """The last instant a request can start and still be expected to meet ``deadline``."""
    return deadline - timedelta(seconds=rules.deadline_margin_s)


def release_due(now: datetime, deadline: datetime | None, rules: TierRules = TierRules()) -> bool:
    """True when a held request must be released now, window or not, to meet its deadline."""
    return deadline is not None and now >= latest_start(deadline, rules)


def missed(now: datetime, deadline: datetime | None) -> bool:
    """True when a request not yet started can no longer meet its deadline."""
    return deadline is not None and now >= deadline


def classify(priority: int | None, tier: str | None, deadline: datetime | None,
             now: datetime, rules: TierRules = TierRules(), *,
             offpeak_opens: datetime | None = None) -> tuple[str, str]:
    """Return ``(tier, reason)``; ``deadline`` and ``now`` must carry a UTC offset (ValueError).

    ``offpeak_opens``: when off-peak work can first run (``now`` while the window
    is open; ``Window.opens_at``). Given, a deadline needs peak unless the window
    opens by the request's latest start; None keeps the fixed ``peak_within_s``.
    """
    if tier:
        return tier, "explicit tier"
    p = DEFAULT_PRIORITY if priority is None else priority
    if p >= rules.immediate_min:
        chosen = "immediate"
    elif p >= rules.peak_min:
        chosen = "peak"
    elif p >= rules.offpeak_min:
        chosen = "offpeak"
    else:
        chosen = "background"
    reason = f"priority {p}" + (" (default)" if priority is None else "")
    if deadline is not None:
        if deadline.tzinfo is None or deadline.utcoffset() is None:
            # comparing it with an aware ``now`` raised TypeError deep in the batcher
            raise ValueError(f"deadline {deadline.isoformat()} has no UTC offset")
        left = (deadline - now).total_seconds()
        if left <= rules.immediate_within_s:
            needed = "immediate"
        elif offpeak_opens is not None and offpeak_opens > latest_start(deadline, rules):
            needed = "peak"   # the window opens too late: holding it would only make it wait
        elif offpeak_opens is None and left <= rules.peak_within_s:
            needed = "peak"
        elif left <= rules.offpeak_within_s:
            needed = "offpeak"
        else:
            needed = "background"
        if rules.order.index(needed) > rules.order.index(chosen):
            return needed, f"{reason}, lifted by deadline in {int(left)} s"
    return chosen, reason
