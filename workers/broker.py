"""The Celery broker transport: kombu's Redis transport, waiting out a Redis that is out of memory.

Redis at ``maxmemory`` with ``noeviction`` refuses writes ("OOM command not allowed"). kombu
raises that as a channel error, not a connection error, when it acknowledges a finished task
(ZREM from its unacked index) or restores unacked messages on connecting (SET of its mutex), and
Celery's consumer treats a channel error as unrecoverable: a busy worker exited every few
seconds, and its supervisor restarted it into the same wall. A stopped Redis, by contrast, is a
connection error that Celery retries with backoff for as long as it lasts.

This transport makes a full Redis the same kind of outage: a command Redis refused for memory is
sent again, with a capped backoff, until Redis takes it. The consumer waits meanwhile (it could
neither acknowledge, take nor restore a message anyway); tasks already running go on in their
pool processes. One warning when a process meets a full Redis, one when Redis takes its writes
again: never one per attempt. It never drops or skips the command, and stops waiting only when
the worker is shutting down.
"""

from __future__ import annotations

import logging
import threading
import time

from kombu.transport import redis as kombu_redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import OutOfMemoryError
from redis.retry import Retry

log = logging.getLogger(__name__)

#: backoff between attempts while Redis is full: first wait, ceiling (seconds)
OOM_FIRST_S, OOM_MAX_S = 0.2, 5.0


class _FullState:
    """Whether this process is waiting for a full Redis (shared by every connection: one log
    line per state change per process, however many commands wait)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.since: float | None = None

    def full(self, e: Exception) -> None:
        with self.lock:
            if self.since is None:
                self.since = time.monotonic()
                log.warning("broker: Redis is out of memory (%s); waiting until it takes writes again,"
                            " with backoff up to %.0f s", e, OOM_MAX_S)

    def room(self) -> None:
        if self.since is None:
            return
        with self.lock:
            if self.since is not None:
                log.warning("broker: Redis takes writes again after %.1f s", time.monotonic() - self.since)
                self.since = None


STATE = _FullState()


def _shutting_down() -> bool:
    from celery.worker import state
    return bool(state.should_stop is not None or state.should_terminate is not None)


class WaitOutOfMemory(Retry):
    """redis-py's retry policy (connection errors: as configured) plus: an OOM refusal is waited
    out, for as long as it lasts. The refused command had no effect (Redis checks memory before
    it runs a command, and discards a whole MULTI), so sending it again is safe."""

    def call_with_retry(self, do, fail, *args, **kwargs):
        backoff = ExponentialWithJitterBackoff(cap=OOM_MAX_S, base=OOM_FIRST_S)
        failures = 0
        while True:
            try:
                result = super().call_with_retry(do, fail, *args, **kwargs)
            except OutOfMemoryError as e:
                if _shutting_down():
                    raise
                STATE.full(e)
                failures += 1
                time.sleep(backoff.compute(failures))
                continue
            STATE.room()
            return result


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous=False):
        params = super()._connparams(asynchronous=asynchronous)
        # kombu sets no retry of its own: redis-py's default is none (NoBackoff, 0 retries)
        params.setdefault("retry", WaitOutOfMemory(ExponentialWithJitterBackoff(cap=OOM_MAX_S), 0))
        return params


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with ``Channel`` above (``broker_transport`` in workers/app.py)."""

    Channel = Channel
