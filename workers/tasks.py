"""Celery tasks. A task executes a whole batch, never a single request.

Each worker process keeps one asyncio event loop (and so one SDK client per
provider) for its whole life; a task runs its batch on that loop.
"""

from __future__ import annotations

import asyncio
import logging

from pipeline.config import get_settings
from pipeline.constants import queue_for
from workers.app import app
from workers.execute import run_batch

log = logging.getLogger(__name__)

_loop: asyncio.AbstractEventLoop | None = None


def _event_loop() -> asyncio.AbstractEventLoop:
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
        asyncio.set_event_loop(_loop)
    return _loop


@app.task(name="llmbatch.execute_batch", bind=True)
def execute_batch(self, batch_id: str) -> None:
    summary = _event_loop().run_until_complete(
        run_batch(batch_id, owner=self.request.id or batch_id, settings=get_settings()))
    log.info("batch %s: %s", batch_id, summary)


def enqueue_batch(batch_id: str, tier: str) -> None:
    execute_batch.apply_async(args=[batch_id], queue=queue_for(tier))
