"""The Celery application.

Delivery settings that make a killed worker lose nothing (Celery's documentation on acks_late and reject_on_worker_lost):
``task_acks_late`` + ``task_reject_on_worker_lost`` requeue a batch whose
process died; prefetch 1 keeps long batches from waiting behind each other; the
Redis visibility timeout is above the longest batch so a slow batch is not
delivered twice. The broker connection is retried for as long as Redis is away. Results are not kept in a Celery backend: Postgres is the record.
"""

from __future__ import annotations

from celery import Celery, signals
from kombu import Queue

from pipeline.config import get_settings
from pipeline.constants import TIERS, queue_for

settings = get_settings()

app = Celery("llmbatch", broker=settings.redis_url, include=["workers.tasks"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    result_backend=None,
    task_serializer="json",
    accept_content=["json"],
    task_queues=[Queue(queue_for(t)) for t in TIERS],
    task_default_queue=queue_for("peak"),
    broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
    broker_connection_retry_on_startup=True,
    # a Redis outage or restart is waited out (with Celery's backoff), never the end of the worker
    broker_connection_retry=True,
    broker_connection_max_retries=None,
    worker_send_task_events=True,
    task_send_sent_event=True,
    worker_hijack_root_logger=False,
)


@signals.celeryd_init.connect
def _wait_out_a_full_redis(conf=None, **_):
    """In a worker (not Flower, not a client of this app): a Redis out of memory is waited out like
    a stopped one, not an "Unrecoverable error" that ends the worker (workers/broker.py). Only
    here, so that every other connection keeps its plain ``redis://`` URL."""
    conf.broker_transport = "workers.broker:Transport"
