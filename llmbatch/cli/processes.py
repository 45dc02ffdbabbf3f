"""The long-running processes and the schema: ``llmbatch api``, ``batcher``, ``worker --tier T``,
``simulator`` and ``db upgrade``. Each command sets up its process (logging, metrics) and hands
over to the module that does the work."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import click

from llmbatch.cli.common import fail, setup_logging
from pipeline.config import get_settings
from pipeline.constants import TIERS
from pipeline.errors import InfrastructureError
from pipeline.stores import db


@click.group("db")
def db_group():
    """Database schema."""


@db_group.command("upgrade")
def db_upgrade():
    """Apply the SQL migrations not yet applied (idempotent)."""
    try:
        applied = db.upgrade()
    except InfrastructureError as e:
        fail(str(e), 3)
    click.echo(f"applied: {', '.join(applied)}" if applied else "schema up to date")


@click.command("api")
def api():
    """Run the HTTP API: OpenAI's Files and Batches over the pipeline (pipeline/api/)."""
    from pipeline.api.app import serve
    setup_logging("INFO")
    serve(get_settings())


@click.command()
@click.option("--max-seconds", type=float, help="Stop after this long (tests, benchmarks).")
def batcher(max_seconds):
    """Run a batcher (a Kafka consumer group member)."""
    from pipeline import metrics
    from pipeline.intake.batcher import Batcher
    setup_logging("INFO")
    the_batcher = Batcher()
    metrics.count_cache_from(the_batcher.stats)   # its cache hits and misses, as counters
    metrics.serve("batcher", get_settings(), state_engine=db.get_engine)
    the_batcher.run(max_seconds=max_seconds)


@click.command()
@click.option("--tier", type=click.Choice(TIERS), required=True)
@click.option("--concurrency", type=int, help="Worker processes (default: the tier's setting).")
@click.option("--loglevel", default="INFO")
def worker(tier, concurrency, loglevel):
    """Run a Celery worker for one tier's queue."""
    from pipeline.constants import queue_for
    settings = get_settings()
    # before prometheus_client is imported (pipeline.metrics imports it): the pool
    # processes write their samples under this directory and the parent serves the sum
    mp_dir = Path(settings.var_dir) / "metrics" / f"worker-{tier}"
    shutil.rmtree(mp_dir, ignore_errors=True)
    mp_dir.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(mp_dir)
    from pipeline import metrics
    if not metrics.multiprocess_enabled():
        fail("prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set", 1)
    metrics.set_tier(tier)
    metrics.serve(f"worker-{tier}", settings)
    from workers.app import app
    # the SDKs, imported before the pool forks: otherwise every pool process imported them
    # during its first batch, about two seconds of an immediate request's time under load
    import pipeline.providers.anthropic  # noqa: F401
    import pipeline.providers.openai  # noqa: F401
    n = concurrency or settings.worker_concurrency[tier]
    # the pool processes inherit it; never lowered below what the process was started with
    nice = int(settings.worker_nice.get(tier, 0))
    if nice > os.nice(0):
        os.nice(nice - os.nice(0))
    app.worker_main(["worker", "-Q", queue_for(tier), "-c", str(n), "-n", f"{tier}@%h",
                     "--loglevel", loglevel, "-E"])


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def simulator(ctx):
    """Run the provider simulator (OpenAI and Anthropic APIs). Options: see --help of the simulator."""
    from simulator import config_from_args, run
    run(config_from_args(ctx.args))
