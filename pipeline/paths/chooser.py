"""The cost engine's choice: ``--mode auto`` picks the cheapest path that meets the deadline.

For a request whose job says ``auto`` (the default of the off-peak and background tiers; the
immediate and peak tiers stay realtime unless a job asks otherwise), every path of the registry
that serves it (``Path.why_not``) is quoted (``Path.quote``: the request's maximum at the path's
price, sent when the path plans to, in the price window in force then) with the time its answer is
expected (``Path.expected_done``), from when it can start: now, or for an off-peak request on a path
that waits for the off-peak window (``waits_for_tier_window``) when that window opens (``tier_opens``;
by the deadline's latest start at the latest, when the scheduler releases it anyway). The choice is the cheapest path expected done by the deadline
(no deadline: within ``NO_DEADLINE``, 24 h, the providers' batch window); of equal quotes, the one
expected first. When no path is expected in time, the fastest one is taken (and the scheduler's
deadline release does what it can). The reason is kept with the request (``requests.path_reason``).

Pure: the caller passes ``now``. It never picks a path that cannot serve the request, nor one
dearer than another that meets the deadline.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from pipeline.constants import DISPATCHED_TIERS
from pipeline.money.pricing import ModelPrice, cost
from pipeline.paths.base import Path, quote_usage
from pipeline.request import Request

AUTO = "auto"
#: a request without a deadline may take this long (the providers' Batch API window)
NO_DEADLINE = timedelta(hours=24)


@dataclass(frozen=True)
class Option:
    path: Path
    quote: Decimal
    done: datetime


@dataclass(frozen=True)
class Choice:
    path: Path
    reason: str
    options: tuple[Option, ...] = ()


def _deadline(req: Request) -> datetime | None:
    d = req.deadline
    return datetime.fromisoformat(d) if isinstance(d, str) else d


def _start(path: Path, req: Request, now: datetime, by: datetime, tier_opens: datetime | None,
           margin: timedelta) -> datetime:
    """When ``path`` can first send ``req``: an off-peak request on a path that waits for the off-peak
    window starts when it opens, or at the deadline's latest start if that comes first."""
    if (tier_opens is None or tier_opens <= now or req.tier != "offpeak" or path.runs_in != "worker"
            or not path.waits_for_tier_window):
        return now
    return max(now, min(tier_opens, by - margin))


def options(req: Request, price: ModelPrice, now: datetime, paths, by: datetime, *,
            tier_opens: datetime | None = None, margin: timedelta = timedelta(0)) -> list[Option]:
    """Every path that serves ``req``, quoted, cheapest first (then soonest)."""
    out = []
    for p in paths:
        if p.serves(req, req.provider, price):
            start = _start(p, req, now, by, tier_opens, margin)
            out.append(Option(p, p.quote(req, price, start, by), p.expected_done(req, start, price, by)))
    return sorted(out, key=lambda o: (o.quote, o.done))


def choose(req: Request, price: ModelPrice, now: datetime, paths, *, tier_opens: datetime | None = None,
           margin: timedelta = timedelta(0)) -> Choice:
    """The path for ``req`` in an ``auto`` job, and why (``paths``: the registry's, realtime first;
    ``tier_opens``: when the off-peak window opens, ``now`` while it is open; ``margin``: the time
    the scheduler allows a request released at its deadline's latest start)."""
    paths = list(paths)
    if req.tier in DISPATCHED_TIERS:
        return Choice(paths[0], f"auto: the {req.tier} tier stays {paths[0].name}")
    deadline = _deadline(req)
    by = deadline if deadline is not None else now + NO_DEADLINE
    what = f"deadline {by.isoformat(timespec='minutes')}" if deadline is not None else "no deadline (24 h)"
    found = options(req, price, now, paths, by, tier_opens=tier_opens, margin=margin)
    if not found:
        return Choice(paths[0], f"auto: no path serves it; {paths[0].name}")
    listed = cost(price, quote_usage(req))   # realtime at list price, outside any window
    meets = [o for o in found if o.done <= by]
    if not meets:
        fastest = min(found, key=lambda o: (o.done, o.quote))
        return Choice(fastest.path, f"auto: no path is expected by its {what}; the fastest, {fastest.path.name}",
                      tuple(found))
    best = meets[0]
    share = (best.quote / listed).quantize(Decimal("0.01")) if listed else Decimal(1)
    missed = [o.path.name for o in found if o.quote < best.quote and o.done > by]
    reason = (f"auto: {best.path.name}, {share}× list price, expected "
              f"{best.done.isoformat(timespec='minutes')}, meets its {what}")
    if missed:
        reason += f"; cheaper {', '.join(missed)} would miss it"
    return Choice(best.path, reason[:300], tuple(found))
