"""The scheduler's notion of "now", injectable so window behaviour is tested without waiting for night.

- ``SystemClock``: real UTC time.
- ``DbClock`` (setting ``clock = "db"``): now() comes from the one-row table
  ``sched_clock`` — a frozen instant, or real time plus an offset — so a test
  process moves time for a scheduler running in another process.
- ``FixedClock``: an in-process clock unit tests set and advance.

Every scheduler decision (window open or closed, cron slots due, retention
cut-off) takes its time from a clock; nothing in ``schedules/`` calls
``datetime.now()`` directly. The clock never changes Postgres' own ``now()``:
leases and stuck-batch timeouts stay on real time, as they measure real waits.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Protocol

import sqlalchemy as sa

from pipeline.clock import from_row, read_db_clock
from pipeline.config import Settings, get_settings
from pipeline.errors import ConfigError
from pipeline.stores import db


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)


class FixedClock:
    """A clock a test sets and moves; starts at ``at``."""

    def __init__(self, at: datetime):
        self.at = _aware(at)

    def now(self) -> datetime:
        return self.at

    def set(self, at: datetime) -> None:
        self.at = _aware(at)

    def advance(self, **delta) -> datetime:
        self.at += timedelta(**delta)
        return self.at


class DbClock:
    """now() from ``sched_clock``; real time when the row is absent."""

    def __init__(self, engine=None):
        self.engine = engine or db.get_engine()

    def now(self) -> datetime:
        with self.engine.connect() as conn:
            return from_row(read_db_clock(conn))   # the caps read the same row (pipeline/clock.py)

    def set(self, at: datetime | None = None, *, offset_s: float = 0.0) -> None:
        """Freeze time at ``at``, or (``at`` None) run real time shifted by ``offset_s``."""
        with self.engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO sched_clock (id, frozen_at, offset_s) VALUES (1, :at, :off)"
                " ON CONFLICT (id) DO UPDATE SET frozen_at = :at, offset_s = :off"),
                {"at": _aware(at) if at else None, "off": offset_s})

    def reset(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM sched_clock"))


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


def get_clock(settings: Settings | None = None, engine=None) -> Clock:
    kind = (settings or get_settings()).clock
    if kind == "system":
        return SystemClock()
    if kind == "db":
        return DbClock(engine)
    raise ConfigError(f"setting clock: {kind!r} is not 'system' or 'db'")
