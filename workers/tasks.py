"""Celery tasks. A task executes a whole batch, never a single request.

Each worker process keeps one asyncio event loop (and so one SDK client per
provider) for its whole life; a task runs its batch on that loop.
"""

from __future__ import annotations

import asyncio
import logging
import os

from celery.signals import task_prerun, worker_process_init, worker_process_shutdown

from pipeline import metrics
from pipeline.config import get_settings
from pipeline.constants import EXECUTE_BATCH_TASK
from workers.app import app
from workers.execute import prepare, run_batch

log = logging.getLogger(__name__)

_loop: asyncio.AbstractEventLoop | None = None


def _event_loop() -> asyncio.AbstractEventLoop:
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
        asyncio.set_event_loop(_loop)
    return _loop


@worker_process_init.connect
def _warm_up(**_):
    """A new pool process makes its event loop, SDK clients, budget and limiter before its
    first task, not during it."""
    _event_loop().run_until_complete(prepare(get_settings()))


@app.task(name=EXECUTE_BATCH_TASK, bind=True)
def execute_batch(self, batch_id: str, tier: str | None = None, jobs: list[str] | None = None) -> None:
    """``tier`` and ``jobs`` are labels for Flower's task list; the batch row is what counts."""
    summary = _event_loop().run_until_complete(
        run_batch(batch_id, owner=self.request.id or batch_id, settings=get_settings()))
    log.info("batch %s: %s", batch_id, summary, extra={"batch": batch_id})


@task_prerun.connect
def _label_tier(task=None, **_):
    """Metrics and log lines of this task carry the tier of the queue it came from."""
    queue = ((getattr(task.request, "delivery_info", None) or {}).get("routing_key") or "") if task else ""
    if queue.startswith("tier."):
        metrics.set_tier(queue[len("tier."):])


@worker_process_shutdown.connect
def _metrics_process_gone(pid=None, **_):
    metrics.mark_process_dead(pid or os.getpid())

