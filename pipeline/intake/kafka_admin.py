"""Kafka's topics, users and ACLs, as the admin principal sets them up.

What each principal may do (the broker runs the StandardAuthorizer with
``allow.everyone.if.no.acl.found=false``, so anything not granted here is
refused, and an unauthenticated client cannot even connect):

* ``llmbatch-admin`` is the broker's super user: it alone creates, alters or
  deletes topics, users and ACLs (infra/stack.sh, ``llmbatch kafka``);
* ``llmbatch-batcher`` reads ``llm.requests`` and ``llm.requests.immediate``
  in consumer groups whose names start with ``consumer_group``, and writes
  ``llm.requests.dlq``;
* a producer (``llmbatch-submit``, the pipeline's own; or a service's, made
  by ``llmbatch kafka add-producer``) writes the two request topics and
  nothing else: it cannot read them, nor touch the DLQ.

Users are SASL/SCRAM credentials stored in the cluster's metadata. A
producer's password derives from ``kafka_producer_key`` (pipeline/config.py
``producer_password``), so making one again gives the same password and
nothing has to be stored. Every function here is idempotent.
"""

from __future__ import annotations

import secrets

from confluent_kafka.admin import (AclBinding, AclBindingFilter, AclOperation, AclPermissionType,
                                   NewTopic, ResourcePatternType, ResourceType, ScramCredentialInfo,
                                   ScramMechanism, UserScramCredentialUpsertion)

from pipeline.config import Settings, producer_password
from pipeline.constants import (DLQ_TOPIC, IMMEDIATE_PARTITIONS, IMMEDIATE_TOPIC, KAFKA_ADMIN_USER,
                                KAFKA_BATCHER_USER, KAFKA_SUBMIT_USER, REQUESTS_PARTITIONS, REQUESTS_TOPIC)
from pipeline.errors import ConfigError, InfrastructureError
from pipeline.intake.kafka import make_admin

TOPICS = {REQUESTS_TOPIC: REQUESTS_PARTITIONS, IMMEDIATE_TOPIC: IMMEDIATE_PARTITIONS, DLQ_TOPIC: 1}
#: the pipeline's own users (the admin is made at ``kafka-storage format`` time, infra/stack.sh)
PIPELINE_USERS = (KAFKA_BATCHER_USER, KAFKA_SUBMIT_USER)
ITERATIONS = 8192
TIMEOUT_S = 30


def _mechanism(settings: Settings):
    names = {"SCRAM-SHA-512": ScramMechanism.SCRAM_SHA_512, "SCRAM-SHA-256": ScramMechanism.SCRAM_SHA_256}
    try:
        return names[settings.kafka_sasl_mechanism]
    except KeyError:
        raise ConfigError(f"kafka_sasl_mechanism {settings.kafka_sasl_mechanism!r}: users are made for"
                          f" {' or '.join(names)}") from None


def _wait(futures: dict, what: str, ignore: tuple[str, ...] = ()) -> None:
    for key, fut in futures.items():
        try:
            fut.result(timeout=TIMEOUT_S)
        except Exception as e:
            if not any(s in str(e) for s in ignore):
                raise InfrastructureError(f"Kafka refused to {what} {key}: {e}") from e


def _allow(user: str, rtype, name: str, op, pattern=ResourcePatternType.LITERAL) -> AclBinding:
    return AclBinding(rtype, name, pattern, f"User:{user}", "*", op, AclPermissionType.ALLOW)


def producer_acls(user: str) -> list[AclBinding]:
    return [_allow(user, ResourceType.TOPIC, t, AclOperation.WRITE) for t in (REQUESTS_TOPIC, IMMEDIATE_TOPIC)]


def batcher_acls(settings: Settings) -> list[AclBinding]:
    return [_allow(KAFKA_BATCHER_USER, ResourceType.TOPIC, REQUESTS_TOPIC, AclOperation.READ),
            _allow(KAFKA_BATCHER_USER, ResourceType.TOPIC, IMMEDIATE_TOPIC, AclOperation.READ),
            _allow(KAFKA_BATCHER_USER, ResourceType.GROUP, settings.consumer_group, AclOperation.READ,
                   ResourcePatternType.PREFIXED),
            _allow(KAFKA_BATCHER_USER, ResourceType.TOPIC, DLQ_TOPIC, AclOperation.WRITE)]


def ensure_topics(admin) -> list[str]:
    """Create the missing topics; returns a line per topic."""
    existing = admin.list_topics(timeout=10).topics
    new = [NewTopic(name, num_partitions=n, replication_factor=1) for name, n in TOPICS.items()
           if name not in existing]
    if new:
        _wait(admin.create_topics(new, operation_timeout=TIMEOUT_S), "create topic", ("TOPIC_ALREADY_EXISTS",))
    return [f"topic {name} {'exists' if name in existing else 'created'}" for name in TOPICS]


def upsert_user(admin, settings: Settings, user: str, password: str) -> None:
    info = ScramCredentialInfo(_mechanism(settings), ITERATIONS)
    _wait(admin.alter_user_scram_credentials([UserScramCredentialUpsertion(user, info, password.encode())]),
          "set the credentials of")


def grant(admin, acls: list[AclBinding]) -> None:
    _wait(admin.create_acls(acls), "grant")


def setup(settings: Settings) -> list[str]:
    """Topics, the pipeline's users and their ACLs (infra/stack.sh runs it at every ``up``)."""
    if not settings.kafka_batcher_password or not settings.kafka_producer_key:
        raise ConfigError("kafka_batcher_password and kafka_producer_key are needed (var/secrets.env)")
    admin = make_admin(settings)
    lines = ensure_topics(admin)
    upsert_user(admin, settings, KAFKA_BATCHER_USER, str.__str__(settings.kafka_batcher_password))
    grant(admin, batcher_acls(settings))
    add_producer(settings, KAFKA_SUBMIT_USER, admin=admin)
    return lines + [f"users {KAFKA_BATCHER_USER} and {KAFKA_SUBMIT_USER} with their ACLs set"]


def add_producer(settings: Settings, user: str, admin=None) -> str:
    """Make (or make again) producer ``user`` with its ACLs; returns its password."""
    if not user or not user.replace("-", "").replace("_", "").replace(".", "").isalnum() or len(user) > 100:
        raise ConfigError(f"producer name {user!r}: use letters, digits, '-', '_' and '.' (at most 100)")
    if user in (KAFKA_ADMIN_USER, KAFKA_BATCHER_USER):
        raise ConfigError(f"{user} is a pipeline principal, not a producer")
    if not settings.kafka_producer_key:
        raise ConfigError("no kafka_producer_key (var/secrets.env): producer passwords derive from it")
    admin = admin or make_admin(settings)
    password = producer_password(settings.kafka_producer_key, user)
    upsert_user(admin, settings, user, password)
    grant(admin, producer_acls(user))
    return password


def remove_producer(settings: Settings, user: str) -> None:
    """Take producer ``user``'s ACLs away and change its password to one nobody knows: it can no
    longer log in nor write.

    Its SCRAM credentials are overwritten, not deleted: with Kafka 4.1.1 (KRaft, combined mode)
    a deleted SCRAM user left every SCRAM login failing with "invalid credentials" after the next
    broker restart, the admin's included (reproduced on a fresh broker: upserts alone survive a
    restart; one deletion does not).
    """
    if user in (KAFKA_ADMIN_USER, KAFKA_BATCHER_USER):
        raise ConfigError(f"{user} is a pipeline principal, not a producer")
    admin = make_admin(settings)
    pattern = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, f"User:{user}", None,
                               AclOperation.ANY, AclPermissionType.ANY)
    _wait(admin.delete_acls([pattern]), "delete the ACLs of")
    upsert_user(admin, settings, user, secrets.token_hex(32))


def ready(settings: Settings) -> bool:
    """True when the broker answers the admin's metadata request."""
    return bool(make_admin(settings).list_topics(timeout=2).brokers)


if __name__ == "__main__":   # infra/stack.sh: python -m pipeline.intake.kafka_admin setup|ready
    import sys

    from pipeline.config import get_settings

    if sys.argv[1:] == ["ready"]:
        try:
            sys.exit(0 if ready(get_settings()) else 1)
        except Exception:
            sys.exit(1)
    if sys.argv[1:] != ["setup"]:
        sys.exit("usage: python -m pipeline.intake.kafka_admin setup|ready")
    try:
        print("\n".join(setup(get_settings())))
    except Exception as e:
        sys.exit(f"{type(e).__name__}: {e}")
