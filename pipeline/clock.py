"""The one clock the cost caps follow, so a test can move the budget across midnight.

Setting ``clock`` (pipeline/config.py) picks it, for the budget and the scheduler alike:

- ``"system"``: real UTC time.
- ``"db"`` (the default): real time unless the one-row table ``sched_clock`` says otherwise (a
  frozen instant, or real time plus an offset). Tests set the row from their own process and every
  process follows; production never has the row. Postgres reads the same row
  (``budget_now()``/``budget_day()``, sql/018_budget_periods.sql), so a result row written without
  a period lands in the day this clock says.

A worker reserves for every request: the row is read at most once per ``DB_CLOCK_CACHE_S`` per
process, so a move reaches every process within that. Two reservations a moment apart may then
fall either side of midnight; each counts in its own period (its counters and its ledger row
alike), so no cap is overspent by it.

This module never changes Postgres' own ``now()``: leases and timeouts measure real waits.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from pipeline.config import Settings
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

#: how long a process trusts the ``sched_clock`` row it read
DB_CLOCK_CACHE_S = 1.0

_lock = threading.Lock()
_cached: dict[int, tuple[float, datetime | None, float]] = {}


def read_db_clock(conn) -> tuple[datetime | None, float] | None:
    """``(frozen_at, offset_s)`` from ``sched_clock``, or None when no test set it."""
    row = conn.execute(sa.text("SELECT frozen_at, offset_s FROM sched_clock WHERE id = 1")).first()
    return None if row is None else (row.frozen_at, float(row.offset_s or 0.0))


def from_row(row: tuple[datetime | None, float] | None, real: datetime | None = None) -> datetime:
    real = real or datetime.now(timezone.utc)
    if row is None:
        return real
    frozen, offset_s = row
    if frozen is not None:
        return frozen.astimezone(timezone.utc)
    return real + timedelta(seconds=offset_s)


def budget_now(settings: Settings, engine=None) -> datetime:
    """Now, by the caps' clock (``settings.clock``); ``engine`` reads the ``db`` clock's row."""
    if settings.clock == "system":
        return datetime.now(timezone.utc)
    if settings.clock != "db":
        raise ConfigError(f"setting clock: {settings.clock!r} is not 'system' or 'db'")
    if engine is None:   # the caller passes its engine: this module imports no store
        raise ConfigError("clock 'db' reads sched_clock through an engine, and none was given")
    key = id(engine)
    hit = _cached.get(key)
    mono = time.monotonic()
    if hit is None or mono - hit[0] > DB_CLOCK_CACHE_S:
        try:
            with engine.connect() as conn:
                row = read_db_clock(conn)
        except Exception as e:   # Postgres away: a reservation needs only Redis, so it must not fail here
            if hit is None:
                log.warning("budget clock: sched_clock unreadable (%s); real time until it is", e)
                hit = (mono, None, None)
            row = None if hit[1] is None and hit[2] is None else (hit[1], hit[2])
        with _lock:
            _cached[key] = hit = (mono, *(row or (None, None)))
    _, frozen, offset_s = hit
    return from_row(None if frozen is None and offset_s is None else (frozen, offset_s or 0.0))


def forget() -> None:
    """Drop the cached row (a test that just moved the clock, in this process)."""
    with _lock:
        _cached.clear()
