"""Kafka clients with the settings that make delivery safe.

The producer is idempotent (``enable.idempotence`` implies ``acks=all`` and
safe retries); the consumer never auto-commits: the batcher commits offsets
itself, only after the rows are in Postgres.
"""

from __future__ import annotations

from confluent_kafka import Consumer, Producer

from pipeline.config import Settings

MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def make_producer(settings: Settings, **overrides) -> Producer:
    conf = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 20,
        "batch.size": 1_000_000,
        "compression.type": "lz4",
        "message.max.bytes": MAX_MESSAGE_BYTES,
        "queue.buffering.max.messages": 200_000,
        "queue.buffering.max.kbytes": 512 * 1024,
    }
    conf.update(overrides)
    return Producer(conf)


def make_consumer(settings: Settings, group: str | None = None, **overrides) -> Consumer:
    conf = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": group or settings.consumer_group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "fetch.max.bytes": MAX_MESSAGE_BYTES * 2,
        "max.partition.fetch.bytes": MAX_MESSAGE_BYTES,
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 1_000,
        "max.poll.interval.ms": 300_000,
    }
    conf.update(overrides)
    return Consumer(conf)
