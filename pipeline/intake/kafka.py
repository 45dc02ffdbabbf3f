"""Kafka clients with the settings that make delivery safe, and who a message is from.

The producer is idempotent (``enable.idempotence`` implies ``acks=all`` and
safe retries); the consumer never auto-commits: the batcher commits offsets
itself, only after the rows are in Postgres.

Every client authenticates (SASL/SCRAM, ``kafka_security_protocol`` and
``kafka_sasl_mechanism``) as one of three principals, and the broker's ACLs
(pipeline/intake/kafka_admin.py) decide what each may do: a producer
(``kafka_user``) writes the request topics; the batcher reads them and
writes the DLQ; the admin alone creates or deletes topics, users and ACLs.

Kafka does not tell a consumer who produced a message, so a producer signs
each request message: the header ``llmbatch.producer`` names it, and
``llmbatch.signature`` is HMAC-SHA256 of the message's value under the
producer's own Kafka password. Producer passwords derive from
``kafka_producer_key`` (pipeline/config.py ``producer_password``), so the
batcher recomputes the password of the named producer and checks the
signature: only whoever holds that producer's credentials can sign as it,
and a job belongs to the producer that made it (pipeline/stores/batches.py).
"""

from __future__ import annotations

import functools
import hashlib
import hmac

from confluent_kafka import Consumer, Producer

from pipeline.config import Settings, producer_password
from pipeline.constants import (KAFKA_ADMIN_USER, KAFKA_BATCHER_USER, PRODUCER_HEADER, SIGNATURE_HEADER)
from pipeline.errors import ConfigError, LineError

MAX_MESSAGE_BYTES = 16 * 1024 * 1024

#: who a client connects as: the settings' producer, the batcher, or the admin
ROLES = ("producer", "batcher", "admin")


def credentials(settings: Settings, role: str = "producer") -> tuple[str, str]:
    """(user, password) of ``role``; a missing password is a ``ConfigError`` naming its setting."""
    if role == "producer":
        user, password, name = settings.kafka_user, settings.kafka_password, "kafka_password"
    elif role == "batcher":
        user, password, name = KAFKA_BATCHER_USER, settings.kafka_batcher_password, "kafka_batcher_password"
    elif role == "admin":
        user, password, name = KAFKA_ADMIN_USER, settings.kafka_admin_password, "kafka_admin_password"
    else:
        raise ValueError(f"unknown Kafka role {role!r}")
    if not password:
        raise ConfigError(f"no Kafka password for {user}: set LLMBATCH_{name.upper()}"
                          f"{' (or LLMBATCH_KAFKA_PRODUCER_KEY)' if role == 'producer' else ''};"
                          " the local stack generates it into var/secrets.env")
    return user, str.__str__(password)


def client_conf(settings: Settings, role: str = "producer") -> dict:
    """The connection part of any confluent-kafka client's configuration, with its SASL login."""
    user, password = credentials(settings, role)
    return {"bootstrap.servers": settings.kafka_bootstrap,
            "security.protocol": settings.kafka_security_protocol,
            "sasl.mechanism": settings.kafka_sasl_mechanism,
            "sasl.username": user, "sasl.password": password}


def make_producer(settings: Settings, role: str = "producer", **overrides) -> Producer:
    conf = {
        **client_conf(settings, role),
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


def make_consumer(settings: Settings, group: str | None = None, role: str = "batcher", **overrides) -> Consumer:
    conf = {
        **client_conf(settings, role),
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


def make_admin(settings: Settings, role: str = "admin", **overrides):
    from confluent_kafka.admin import AdminClient
    return AdminClient({**client_conf(settings, role), "log_level": 0, **overrides})


def _mac(password: str, value: bytes | None) -> str:
    return hmac.new(password.encode(), value or b"", hashlib.sha256).hexdigest()


def sign(settings: Settings, value: bytes | None) -> list[tuple[str, bytes]]:
    """The headers that say this process's producer sent ``value``."""
    user, password = credentials(settings, "producer")
    return [(PRODUCER_HEADER, user.encode()), (SIGNATURE_HEADER, _mac(password, value).encode())]


@functools.lru_cache(maxsize=64)
def _password_of(key, user: str) -> str:
    """A producer's password, derived once per producer rather than once per message."""
    return producer_password(key, user)


def verify(settings: Settings, headers, value: bytes | None) -> str:
    """The producer that signed the message; ``LineError`` when it is unsigned or the proof fails."""
    found = {}
    for k, v in headers or ():
        if k in (PRODUCER_HEADER, SIGNATURE_HEADER):
            if k in found:
                raise LineError(f"header {k} given twice")
            found[k] = v or b""
    if PRODUCER_HEADER not in found or SIGNATURE_HEADER not in found:
        raise LineError("unsigned message: no producer signature (headers llmbatch.producer, llmbatch.signature)")
    try:
        user = found[PRODUCER_HEADER].decode("ascii")
    except UnicodeDecodeError:
        raise LineError("producer header is not ASCII") from None
    if not user.isprintable() or not 0 < len(user) <= 200:
        raise LineError("producer header is not a usable name")
    if not settings.kafka_producer_key:
        raise ConfigError("no kafka_producer_key: the batcher cannot check who sent a message")
    expected = _mac(_password_of(settings.kafka_producer_key, user), value)
    if not hmac.compare_digest(expected.encode(), found[SIGNATURE_HEADER]):
        raise LineError(f"signature does not match producer {user!r}: not sent with its credentials")
    return user
