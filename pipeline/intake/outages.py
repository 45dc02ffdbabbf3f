"""Outage or refusal: how the batcher tells "Postgres (or Redis, or Kafka) is not there" from
"Postgres refuses this data", and how it waits an outage out.

An outage is retried with capped backoff and never costs a message; a refusal is the
message's own (the batcher isolates it and dead-letters it, pipeline/intake/batcher.py).
``Dependency`` logs one line per change of state (down, back), never one per attempt.
"""

from __future__ import annotations

import logging
import time

import sqlalchemy as sa

log = logging.getLogger(__name__)

#: SQLSTATE classes that mean "Postgres is not there (or not now)" rather than "Postgres refuses
#: this data": connection, resources, operator intervention, system; and the transient ones,
#: deadlock or serialization failure (40) and lock not available (55): retried, never dead-lettered
_OUTAGE_SQLSTATES = ("08", "53", "57", "58", "40", "55")


def _first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


class Dependency:
    """Up or down, with capped exponential backoff; logs only when the state changes."""

    def __init__(self, name: str, first_s: float = 0.5, max_s: float = 15.0):
        self.name = name
        self.first_s, self.max_s = first_s, max_s
        self.down_since: float | None = None
        self.delay = first_s
        self.retry_at = 0.0
        self.outages = 0
        self.conflicts = 0

    @property
    def up(self) -> bool:
        return self.down_since is None

    def may_try(self) -> bool:
        return self.up or time.monotonic() >= self.retry_at

    def failed(self, error) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            self.delay = self.first_s
            self.outages += 1
            log.warning("%s down: %s; waiting it out (retrying with backoff)", self.name, _first_line(error))
        else:
            self.delay = min(self.delay * 2, self.max_s)
        self.retry_at = now + self.delay

    def conflicted(self, error) -> None:
        """A transient conflict, not an outage: retried at once, logged as what it is."""
        self.conflicts += 1
        log.info("%s conflict, retrying: %s", self.name, _first_line(error))

    def ok(self) -> None:
        if self.down_since is not None:
            log.warning("%s back after %.1f s", self.name, time.monotonic() - self.down_since)
            self.down_since = None
            self.delay = self.first_s



def is_conflict(error: BaseException) -> bool:
    """True for a transient conflict between transactions (deadlock, serialization failure, lock
    not available): Postgres is up, and the same write is simply tried again."""
    state = getattr(getattr(error, "orig", error), "sqlstate", None) or ""
    return state[:2] == "40" or state == "55P03"


def is_outage(error: BaseException) -> bool:
    """True when ``error`` says Postgres is unreachable (or the failure is transient, such as
    a deadlock), not that it refuses the data: such a write is retried, never dead-lettered."""
    if isinstance(error, (sa.exc.InterfaceError, sa.exc.TimeoutError)):
        return True
    if isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated:
        return True
    orig = getattr(error, "orig", error)
    state = getattr(orig, "sqlstate", None)
    if state is not None:
        return state[:2] in _OUTAGE_SQLSTATES
    return isinstance(error, sa.exc.OperationalError) or type(orig).__name__ in ("OperationalError",
                                                                                "InterfaceError")
