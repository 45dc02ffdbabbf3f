"""``llmbatch webhooks set|show|remove``: a project's webhook of ``llmbatch api`` (pipeline/api/webhooks.py).

A project with a webhook gets one signed POST (OpenAI's ``batch.*`` event shape, Standard Webhooks
headers) when each of its batches ends. ``set`` prints the signing secret once: the receiver
verifies events with it (for example the openai SDK's ``client.webhooks.unwrap(body, headers,
secret=…)``).
"""

from __future__ import annotations

import click

from llmbatch.cli.common import fail


@click.group()
def webhooks() -> None:
    """A project's webhook: one signed event when each of its batches ends."""


@webhooks.command("set")
@click.option("--project", required=True, help="The project (made if new).")
@click.option("--url", required=True, help="Where its events are POSTed (http or https).")
def set_webhook(project: str, url: str) -> None:
    """Send PROJECT's batch events to URL; prints the new signing secret once (a new one each time)."""
    from pipeline.api import webhooks as api_webhooks
    from pipeline.errors import InputError
    from pipeline.stores import db
    try:
        with db.get_engine().begin() as conn:
            secret = api_webhooks.register(conn, project, url)
    except InputError as e:
        fail(str(e), 2)
    click.echo(f"webhook of project {project}: {url}; its signing secret (shown once):", err=True)
    click.echo(secret)


@webhooks.command("show")
@click.option("--project", required=True)
def show_webhook(project: str) -> None:
    """PROJECT's webhook URL and its events: delivered, pending, given up, attempts."""
    from pipeline import jsontext
    from pipeline.api import webhooks as api_webhooks
    from pipeline.stores import db
    with db.get_engine().connect() as conn:
        found = api_webhooks.status(conn, project)
    if found is None:
        fail(f"project {project} has no webhook (llmbatch webhooks set)", 2)
    click.echo(jsontext.dumps(found, indent=2))


@webhooks.command("remove")
@click.option("--project", required=True)
def remove_webhook(project: str) -> None:
    """No more events for PROJECT (pending ones are given up)."""
    from pipeline.api import webhooks as api_webhooks
    from pipeline.stores import db
    with db.get_engine().begin() as conn:
        if not api_webhooks.remove(conn, project):
            fail(f"project {project} has no webhook", 2)
    click.echo(f"webhook of project {project} removed")
