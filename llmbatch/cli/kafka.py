"""``llmbatch kafka add-producer|remove-producer``: Kafka credentials for another service.

A service that publishes requests (``llmbatch.publish_request``) connects as
a producer of its own: a SASL/SCRAM user allowed to write the two request
topics and nothing else (pipeline/intake/kafka_admin.py). Its jobs are its own: the
batcher refuses its messages for another producer's job. Run by whoever holds
the stack's admin password and producer key (var/secrets.env); the logic is in
pipeline/intake/kafka_admin.py.
"""

from __future__ import annotations

import click

from pipeline.config import get_settings


@click.group()
def kafka() -> None:
    """Kafka users: producer credentials for services that publish requests."""


@kafka.command("add-producer")
@click.argument("name")
def add_producer(name: str) -> None:
    """Make Kafka user NAME, allowed to write the request topics, and print its credentials.

    Give the service the three lines printed, as its environment (or its llmbatch.toml).
    The password derives from the stack's producer key: running this again prints the
    same one; `remove-producer` takes the user away.
    """
    from pipeline.intake.kafka_admin import add_producer as add
    settings = get_settings()
    password = add(settings, name)
    click.echo(f"# Kafka producer {name}: write access to the request topics; keep the password private")
    click.echo(f"LLMBATCH_KAFKA_BOOTSTRAP={settings.kafka_bootstrap}")
    click.echo(f"LLMBATCH_KAFKA_USER={name}")
    click.echo(f"LLMBATCH_KAFKA_PASSWORD={password}")


@kafka.command("remove-producer")
@click.argument("name")
def remove_producer(name: str) -> None:
    """Take Kafka user NAME's ACLs away and its password: it can no longer connect nor write."""
    from pipeline.intake.kafka_admin import remove_producer as remove
    remove(get_settings(), name)
    click.echo(f"Kafka producer {name} removed (no ACLs, a password nobody knows);"
               " add-producer gives it back its own")
