"""Time-of-day prices as data: the windows in which a model is billed at a fraction of its list price.

A model's entry in the price book (pipeline/data/pricing.json) may carry ``windows``::

    "windows": [{"name": "off-peak", "timezone": "Asia/Shanghai", "days": ["mon", "tue", "wed", "thu", "fri"],
                 "start": "18:00", "end": "24:00", "multiplier": "0.5"}]

Each window is open on the named days (of its own time zone, an IANA name or ``UTC``) from
``start`` to ``end`` (``HH:MM``, ``end`` after ``start``; ``24:00`` is the end of the day), and a
call *sent* inside it is billed at ``multiplier`` × the list price (usage as ever: cached input,
cache writes and output alike). Where windows overlap the lowest multiplier is in force. The list
price is the dearest price a model has: a multiplier is at most 1, so a reservation at list price
is never below the bill.

Pure functions: the caller passes the instant (the caps' one clock, pipeline/clock.py).
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pipeline.errors import ConfigError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ONE = Decimal(1)
#: how far ahead the next opening of a window is looked for
LOOKAHEAD = timedelta(days=8)


def _clock(text, where: str) -> int:
    """``HH:MM`` → minutes after midnight (``24:00`` is 1440)."""
    try:
        hh, mm = str(text).split(":")
        h, m = int(hh), int(mm)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a time of day HH:MM") from None
    if not (0 <= h <= 24 and 0 <= m < 60) or (h == 24 and m):
        raise ConfigError(f"{where}: {text!r} is not a time of day from 00:00 to 24:00")
    return h * 60 + m


@dataclass(frozen=True)
class PriceWindow:
    name: str
    timezone: str
    days: tuple[int, ...]      # 0 = Monday, as datetime.weekday()
    start_min: int             # minutes after local midnight
    end_min: int               # exclusive; 1440 = midnight at the day's end
    multiplier: Decimal

    @classmethod
    def parse(cls, raw: dict, where: str) -> "PriceWindow":
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: a window is an object, got {raw!r}")
        name = str(raw.get("name") or "window")
        where = f"{where} window {name!r}"
        tz = raw.get("timezone", "UTC")
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ConfigError(f"{where}: timezone {tz!r} is not an IANA time zone name") from None
        days = raw.get("days", list(DAYS))
        if not isinstance(days, list) or not days or not all(isinstance(d, str) and d[:3].lower() in DAYS
                                                              for d in days):
            raise ConfigError(f"{where}: days must be a non-empty list of {', '.join(DAYS)}, got {days!r}")
        start, end = _clock(raw.get("start"), where), _clock(raw.get("end"), where)
        if end <= start:
            raise ConfigError(f"{where}: end {raw.get('end')} must be after start {raw.get('start')}"
                              " (a window across midnight is two windows)")
        mult = raw.get("multiplier")
        if isinstance(mult, (float, bool)) or mult is None:
            raise ConfigError(f"{where}: multiplier must be a decimal string, got {mult!r}")
        try:
            value = Decimal(str(mult))
        except decimal.InvalidOperation:
            raise ConfigError(f"{where}: multiplier {mult!r} is not a number") from None
        if not value.is_finite() or not 0 <= value <= 1:
            raise ConfigError(f"{where}: multiplier must be within 0..1 (the list price is the dearest), "
                              f"got {mult!r}")
        return cls(name, tz, tuple(sorted({DAYS.index(d[:3].lower()) for d in days})), start, end, value)

    def _local(self, at: datetime) -> datetime:
        if at.tzinfo is None:
            raise ValueError(f"instant {at.isoformat()} has no UTC offset")
        return at.astimezone(ZoneInfo(self.timezone))

    def is_open(self, at: datetime) -> bool:
        local = self._local(at)
        minute = local.hour * 60 + local.minute
        return local.weekday() in self.days and self.start_min <= minute < self.end_min

    def next_open(self, at: datetime) -> datetime | None:
        """``at`` while open, else the next instant it opens (within ``LOOKAHEAD``), in UTC."""
        if self.is_open(at):
            return at
        local = self._local(at)
        zone = ZoneInfo(self.timezone)
        for offset in range(LOOKAHEAD.days + 1):
            day = (local + timedelta(days=offset)).date()
            if day.weekday() not in self.days:
                continue
            opens = datetime.combine(day, time(self.start_min // 60, self.start_min % 60), zone)
            if opens > local:
                return opens.astimezone(timezone.utc)
        return None

    def closes_after(self, at: datetime) -> datetime:
        """When a window open at ``at`` closes (UTC)."""
        local = self._local(at)
        zone = ZoneInfo(self.timezone)
        end = datetime.combine(local.date(), time(0, 0), zone) + timedelta(minutes=self.end_min)
        return end.astimezone(timezone.utc)


def multiplier_at(windows: tuple[PriceWindow, ...], at: datetime | None) -> Decimal:
    """The multiplier in force at ``at`` (1 outside every window, or when ``at`` is None)."""
    if at is None or not windows:
        return ONE
    return min((w.multiplier for w in windows if w.is_open(at)), default=ONE)


def cheapest_start(windows: tuple[PriceWindow, ...], now: datetime, latest: datetime) -> tuple[datetime, Decimal]:
    """The instant in ``[now, latest]`` with the lowest multiplier, the earliest of equals:
    ``(instant, multiplier)``. ``(now, 1)`` without windows."""
    best = (now, multiplier_at(windows, now))
    for w in windows:
        opens = w.next_open(now)
        if opens is None or opens > latest:
            continue
        mult = multiplier_at(windows, opens)
        if mult < best[1] or (mult == best[1] and opens < best[0]):
            best = (opens, mult)
    return best


def parse_windows(raw, where: str) -> tuple[PriceWindow, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: windows must be a list, got {raw!r}")
    return tuple(PriceWindow.parse(w, where) for w in raw)
