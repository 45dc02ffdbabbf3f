"""Time windows from cron expressions: is the off-peak window open at an instant?

Used by the scheduler (which opens the window) and by the batcher (which asks
whether the window opens in time for a request's deadline, pipeline/intake/tiers.py).

A window is a pair of crons, open and close, in one time zone. It is open at
``t`` when, looking forward from ``t``, the next close comes before the next
open: ``22:00 → 06:00`` is open at 23:00 (next close 06:00, next open 22:00
tomorrow) and closed at 12:00. Pure functions: the caller passes the time.

Cron syntax: 5 fields (``min hour dom month dow``, as crontab: day of week 0
or 7 is Sunday), or 6 fields with seconds first (``sec min hour dom month
dow``), which tests use.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from apscheduler.triggers.cron import CronTrigger

from pipeline.errors import ConfigError

_EPS = timedelta(microseconds=1)   # the trigger rounds up to the next whole second


_DOW = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def crontab_dow(field: str) -> str:
    """A crontab day-of-week field (0 or 7 = Sunday) as APScheduler day names.

    APScheduler 3 numbers days from Monday = 0 and ``CronTrigger.from_crontab``
    passes the field through unchanged, so crontab's ``1-5`` would mean Tuesday
    to Saturday there. Names are unambiguous, so numbers become names.
    """
    if field == "*":
        return "*"
    days: set[int] = set()
    for part in field.lower().split(","):
        base, _, step = part.partition("/")
        if base == "*":
            lo, hi = 0, 6
        elif "-" in base:
            lo, hi = (_dow_number(x) for x in base.split("-", 1))
        else:
            lo = hi = _dow_number(base)
            if step:
                hi = 6
        if hi < lo and hi == 0:   # "5-0" / "fri-sun": through Sunday
            hi = 7
        if hi < lo:
            raise ValueError(f"day-of-week range {base!r} runs backwards")
        days.update(d % 7 for d in range(lo, hi + 1, int(step) if step else 1))
    return ",".join(_DOW[d] for d in sorted(days))


def _dow_number(token: str) -> int:
    if token[:3] in _DOW:
        return _DOW.index(token[:3])
    n = int(token)
    if not 0 <= n <= 7:
        raise ValueError(f"day of week {n} is not 0-7")
    return n


def cron_trigger(expr: str, timezone: str = "UTC") -> CronTrigger:
    """An APScheduler ``CronTrigger`` from 5 or 6 fields; ``ConfigError`` when unusable."""
    fields = expr.split()
    try:
        if len(fields) == 5:
            fields = ["0", *fields]
        if len(fields) == 6:
            sec, minute, hour, day, month, dow = fields
            return CronTrigger(second=sec, minute=minute, hour=hour, day=day, month=month,
                               day_of_week=crontab_dow(dow), timezone=timezone)
    except (ValueError, LookupError) as e:
        raise ConfigError(f"cron {expr!r} ({timezone}): {e}") from e
    raise ConfigError(f"cron {expr!r}: expected 5 fields (min hour dom month dow) or 6 (seconds first)")


def next_fire(trigger: CronTrigger, after: datetime) -> datetime | None:
    """The first fire time strictly after ``after``."""
    return trigger.get_next_fire_time(None, after + _EPS)


def fire_times(trigger: CronTrigger, after: datetime, until: datetime, limit: int = 10_000) -> list[datetime]:
    """Fire times in ``(after, until]``, oldest first, at most ``limit``."""
    out = []
    t = trigger.get_next_fire_time(None, after + _EPS)
    while t is not None and t <= until and len(out) < limit:
        out.append(t)
        t = trigger.get_next_fire_time(t, t + _EPS)
    return out


@dataclass(frozen=True)
class Window:
    open_cron: str
    close_cron: str
    timezone: str = "UTC"

    def __post_init__(self):
        object.__setattr__(self, "_open", cron_trigger(self.open_cron, self.timezone))
        object.__setattr__(self, "_close", cron_trigger(self.close_cron, self.timezone))

    @classmethod
    def offpeak(cls, settings) -> "Window":
        return cls(settings.offpeak_open_cron, settings.offpeak_close_cron, settings.offpeak_timezone)

    def is_open(self, at: datetime) -> bool:
        # ``at`` itself counts: at the opening instant the window is open, at the closing one closed
        nxt_open = self._open.get_next_fire_time(None, at + _EPS)
        nxt_close = self._close.get_next_fire_time(None, at + _EPS)
        if nxt_close is None:
            return False
        if nxt_open is None:
            return True
        return nxt_close < nxt_open

    def opens_at(self, at: datetime) -> datetime | None:
        """When work held for the window can first run: ``at`` while open, else the next opening."""
        if self.is_open(at):
            return at
        return self._open.get_next_fire_time(None, at + _EPS)

    def next_change(self, at: datetime) -> datetime | None:
        """When the window next opens (if closed) or closes (if open)."""
        trigger = self._close if self.is_open(at) else self._open
        return trigger.get_next_fire_time(None, at + _EPS)
