"""Tier classification: which of the four tiers a request runs in, and why.

Rules (DESIGN.md "Tiers"): an explicit tier wins; otherwise the priority
decides (≥ 8 immediate, 5–7 peak, 2–4 off-peak, 0–1 background); a deadline
lifts a request to the lowest tier that can still meet it. Pure functions:
no clock is read here, the caller passes ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

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
    order: tuple = field(default=("background", "offpeak", "peak", "immediate"))


def classify(priority: int | None, tier: str | None, deadline: datetime | None,
             now: datetime, rules: TierRules = TierRules()) -> tuple[str, str]:
    """Return ``(tier, reason)``; ``deadline`` and ``now`` must carry a UTC offset (ValueError)."""
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
        elif left <= rules.peak_within_s:
            needed = "peak"
        elif left <= rules.offpeak_within_s:
            needed = "offpeak"
        else:
            needed = "background"
        if rules.order.index(needed) > rules.order.index(chosen):
            return needed, f"{reason}, lifted by deadline in {int(left)} s"
    return chosen, reason
