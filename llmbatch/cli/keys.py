"""``llmbatch keys list|restore``: the providers' keys by alias, and bringing one back into the rotation.

A key answered 401/403 is out of the rotation for every worker (pipeline/providers/keys.py): a
mark in Redis, kept until someone restores it, once the key is fixed (a new secret in its
variable, the workers restarted). Only aliases are shown; a secret is never printed.
"""

from __future__ import annotations

import asyncio

import click

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
    """Provider keys: which are in the rotation, and restoring one after a 401/403."""


@keys.command("list")
def list_keys() -> None:
    """Every provider's keys by alias: its limits, whether its variable is set, and if it is out."""
    from pipeline.providers.registry import build_registry
    settings = get_settings()
    reg = build_registry(settings, secret_required=False)
    pairs = [(p.name, k.alias) for p in reg for k in p.keys]
    marks = dict(zip(pairs, asyncio.run(_marks(settings, pairs))))
    for p in reg:
        for k in p.keys:
            state = "OUT (" + marks[(p.name, k.alias)].decode(errors="replace") + ")" if marks[(p.name, k.alias)] \
                else "in rotation"
            unset = " variable unset" if k.env and not k.secret else ""
            click.echo(f"{p.name:16} {p.kind:13} {k.alias:16} rpm={k.rpm or '-'} tpm={k.tpm or '-'}"
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
