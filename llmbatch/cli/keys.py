"""``llmbatch keys create|list|revoke``: the API keys of ``llmbatch api`` (pipeline/api/keys.py), and
``llmbatch keys list|restore`` for the providers' keys by alias, bringing one back into the rotation.

An API key belongs to a project: the project sees its own files and batches only, and its daily
cap is ``budget set --project P USD``. A key is shown once, when it is made; Postgres keeps its
sha256 only.

A provider key answered 401/403 is out of the rotation for every worker (pipeline/providers/keys.py): a
mark in Redis, kept until someone restores it, once the key is fixed (a new secret in its
variable, the workers restarted). Only aliases are shown; a secret is never printed.
"""

from __future__ import annotations

import asyncio

import click

from llmbatch.cli.common import fail
from pipeline.config import get_settings


async def _marks(settings, pairs: list[tuple[str, str]]) -> list:
    from pipeline.money import scripts
    from pipeline.providers.keys import dead_key
    redis_async, _ = scripts.redis_clients(settings)
    try:
        return await redis_async.mget([dead_key(p, a) for p, a in pairs]) if pairs else []
    finally:
        await redis_async.aclose()


@click.group()
def keys() -> None:
    """API keys of `llmbatch api` (create, list, revoke); provider keys (list, restore after a 401/403)."""


@keys.command("create")
@click.option("--project", required=True, help="The project the key belongs to (made if new).")
@click.option("--name", help="A note to tell the key apart in the list.")
def create_key(project: str, name: str | None) -> None:
    """A new API key for PROJECT, printed once: keep it, it cannot be shown again."""
    from pipeline.api import keys as api_keys
    from pipeline.errors import InputError
    from pipeline.stores import db
    try:
        with db.get_engine().begin() as conn:
            key_id, key = api_keys.create_key(conn, project, name)
    except InputError as e:
        fail(str(e), 2)
    click.echo(f"key {key_id} for project {project} (shown once):", err=True)
    click.echo(key)


@keys.command("revoke")
@click.argument("key_id")
def revoke_key(key_id: str) -> None:
    """Revoke API key KEY_ID: its next call answers 401."""
    from pipeline.api import keys as api_keys
    from pipeline.stores import db
    with db.get_engine().begin() as conn:
        if not api_keys.revoke_key(conn, key_id):
            fail(f"no live API key {key_id} (see `llmbatch keys list`)", 2)
    click.echo(f"key {key_id} revoked")


@keys.command("list")
@click.option("--json", "as_json", is_flag=True)
def list_keys(as_json: bool) -> None:
    """The API keys (id, project, first characters, revoked or not), then every provider's keys by
    alias: its limits, whether its variable is set, and if it is out of the rotation."""
    from pipeline import jsontext
    from pipeline.api import keys as api_keys
    from pipeline.providers.registry import build_registry
    from pipeline.stores import db
    try:
        with db.get_engine().connect() as conn:
            rows = api_keys.list_keys(conn)
    except Exception as e:   # the provider keys below need no Postgres: still list them
        if as_json:
            fail(f"API keys: cannot read them from Postgres ({type(e).__name__}); run `llmbatch doctor`", 3)
        click.echo(f"API keys: Postgres unreachable ({type(e).__name__})", err=True)
        rows = None
    if as_json:
        click.echo(jsontext.dumps([{**r, "created_at": r["created_at"].isoformat(),
                                    "revoked_at": r["revoked_at"] and r["revoked_at"].isoformat()}
                                   for r in rows]))
        return
    click.echo("API keys (llmbatch api):")
    for r in rows or []:
        state = f"revoked {r['revoked_at']:%Y-%m-%d %H:%M}" if r["revoked_at"] else "live"
        click.echo(f"  {r['key_id']:22} {r['project_id']:20} {r['hint']}…  {state}  {r['name'] or ''}")
    if rows == []:
        click.echo("  none (llmbatch keys create --project P)")
    click.echo("provider keys:")
    settings = get_settings()
    reg = build_registry(settings, secret_required=False)
    pairs = [(p.name, k.alias) for p in reg for k in p.keys]
    marks = dict(zip(pairs, asyncio.run(_marks(settings, pairs))))
    for p in reg:
        for k in p.keys:
            state = "OUT (" + marks[(p.name, k.alias)].decode(errors="replace") + ")" if marks[(p.name, k.alias)] \
                else "in rotation"
            unset = " variable unset" if k.env and not k.secret else ""
            click.echo(f"  {p.name:16} {p.kind:13} {k.alias:16} rpm={k.rpm or '-'} tpm={k.tpm or '-'}"
                       f" {state}{unset}")


@keys.command("restore")
@click.argument("provider")
@click.argument("alias")
def restore(provider: str, alias: str) -> None:
    """Put key ALIAS of PROVIDER back in the rotation (after fixing it; its alert row stays)."""
    from pipeline.money import scripts
    from pipeline.providers.keys import dead_key
    from pipeline.providers.registry import build_registry
    build_registry(get_settings(), secret_required=False).get(provider).key(alias)   # ConfigError if unknown
    _, redis_sync = scripts.redis_clients(get_settings())
    gone = redis_sync.delete(dead_key(provider, alias))
    click.echo(f"key {alias} of {provider}: " + ("back in the rotation" if gone else "was not out of it"))
