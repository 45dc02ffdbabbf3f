"""asyncio helpers for the long-lived loops (a budget heartbeat, a lease renewer)."""

from __future__ import annotations

import asyncio


def checkpoint() -> None:
    """Raise ``CancelledError`` if this task has been asked to stop.

    Python 3.11's ``asyncio.wait_for`` returns the inner result when a
    cancellation arrives as the inner call completes, and the cancellation is
    gone. redis-py sends every command of a client with a ``socket_timeout``
    through it, so a loop that awaits Redis can miss its owner's ``cancel()``
    and run for ever. ``Task.cancelling()`` still counts the request: a loop
    that calls this once per round stops at the next round.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
