"""The scheduler's one event loop for its provider-batch work, and the ``Budget`` on it.

APScheduler runs the tick in a thread; the provider calls (create, find, poll,
cancel: pipeline/providers/batch_api.py) and the budget (pipeline/money/budget.py,
async, the workers' own) run as coroutines on one loop that lives in a thread of
its own for the whole process (``run``), instead of a new loop per call. The
budget's Redis clients, its heartbeat and the SDK clients' connections belong to
that loop, and so does the key chooser (``keys``) that picks a provider batch's key.

It must never run a coroutine of the loop from the loop's own thread (``run``
would wait for itself): the tick and the tests call it from other threads.
"""

from __future__ import annotations

import asyncio
import threading

from pipeline.config import Settings
from pipeline.money import budget as budget_mod, scripts
from pipeline.providers import ratelimit
from pipeline.providers.keys import Keys

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_budgets: dict[tuple, tuple] = {}


def _the_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="scheduler-loop", daemon=True).start()
            _loop = loop
        return _loop


def run(coro, timeout: float | None = None):
    """Run ``coro`` on the scheduler's loop and wait for its result (or exception)."""
    return asyncio.run_coroutine_threadsafe(coro, _the_loop()).result(timeout)


def budget(settings: Settings, engine) -> budget_mod.Budget:
    """The scheduler's ``Budget`` for these settings and engine, made on its loop (one per pair)."""
    key = (id(settings), id(engine))
    with _lock:
        got = _budgets.get(key)
        if got is not None and got[0] is settings and got[1] is engine:
            return got[2]

    async def make():
        return budget_mod.Budget(settings, engine, *scripts.redis_clients(settings))
    b = run(make())
    with _lock:
        _budgets[key] = (settings, engine, b)
    return b


_keyrings: dict[int, tuple] = {}


def keys(settings: Settings, engine) -> Keys:
    """The scheduler's key chooser (pipeline/providers/keys.py), on its budget's Redis client: the
    same rate windows and revocation marks the workers read."""
    b = budget(settings, engine)
    with _lock:
        got = _keyrings.get(id(b))
        if got is None or got[0] is not b:
            got = _keyrings[id(b)] = (b, Keys(ratelimit.Limiter(settings, b.redis)))
        return got[1]
