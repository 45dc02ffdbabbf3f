"""Hand a batch to its tier's Celery queue, by task name.

The batcher, the sweep and the command line send ``llmbatch.execute_batch``
through a producer-only Celery app on the same broker, so nothing in
``pipeline`` imports ``workers`` (the layout rule, tests/unit/test_layout.py).
"""

from __future__ import annotations

import functools

from celery import Celery

from pipeline.config import get_settings
from pipeline.constants import EXECUTE_BATCH_TASK, queue_for


@functools.cache
def _app() -> Celery:
    settings = get_settings()
    app = Celery("llmbatch", broker=settings.redis_url)
    app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                    broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
                    task_send_sent_event=True)
    return app


def enqueue_batch(batch_id: str, tier: str, jobs: list[str] | None = None) -> None:
    """Send the batch's task; ``tier`` (and the ``jobs`` in it, when the caller knows them) go in
    its kwargs so Flower's task list shows them next to the batch id."""
    kwargs = {"tier": tier} | ({"jobs": list(jobs)} if jobs else {})
    _app().send_task(EXECUTE_BATCH_TASK, args=[batch_id], kwargs=kwargs, queue=queue_for(tier))
