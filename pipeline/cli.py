"""The ``llmbatch`` command line.

Exit codes: 0 success; 1 the job or command failed; 2 bad usage or input
(missing or empty file, unknown job); 3 a service is unreachable; 130
interrupted. Every read command takes ``--json``. Logging handlers are set up
here and nowhere else.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from decimal import Decimal
from pathlib import Path

import click

from pipeline import db
from pipeline.config import get_settings
from pipeline.constants import JOB_TERMINAL, SIMULATOR_LABEL, TIERS
from pipeline.errors import FileInputError, InfrastructureError, LLMBatchError

log = logging.getLogger("pipeline.cli")


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


def _provider_note() -> None:
    if get_settings().simulated:
        click.echo(f"provider: {SIMULATOR_LABEL}", err=True)


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group()
@click.option("--log-level", default="WARNING", show_default=True, help="Log level for this command.")
def main(log_level: str) -> None:
    """llmbatch: tiered, budgeted batch processing of LLM requests."""
    _setup_logging(log_level)


# ------------------------------------------------------------------ jobs

def _progress_printer():
    tty = sys.stderr.isatty()

    def show(report):
        rate = report.lines_read / report.elapsed if report.elapsed > 0 else 0.0
        text = (f"read {report.lines_read}  accepted {report.accepted}  rejected {report.rejected}"
                f"  {rate:,.0f} lines/s")
        if tty:
            click.echo(f"\r{text}   ", err=True, nl=False)
    return show


def _wait(job_id: str, poll_s: float = 0.5) -> dict:
    engine = db.get_engine()
    while True:
        with engine.connect() as conn:
            status = db.job_status(conn, job_id)
        if status["status"] in JOB_TERMINAL:
            return status
        time.sleep(poll_s)


def _print_status(status: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(status))
        return
    c = status["counts"]
    click.echo(f"job {status['job_id']}  {status['status']}  (provider: {status['provider']})")
    click.echo(f"  lines {c['total']}  accepted {c['accepted']}  rejected {c['rejected']}")
    click.echo(f"  succeeded {c['succeeded']}  failed {c['failed']}  cancelled {c['cancelled']}"
               f"  pending {c['pending']}")
    click.echo(f"  cost ${status['cost_usd']}")


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--priority", type=click.IntRange(0, 9), help="Default priority for lines without one.")
@click.option("--tier", type=click.Choice(TIERS), help="Run every line in this tier.")
@click.option("--budget-usd", type=Decimal, help="Cap on the job's spend.")
@click.option("--on-budget", type=click.Choice(["defer", "fail"]), default="defer", show_default=True)
@click.option("--name", help="A name for the job (default: the file name).")
@click.option("--wait", is_flag=True, help="Wait until the job is finished.")
@click.option("--json", "as_json", is_flag=True, help="Print the job status as JSON.")
def submit(file, priority, tier, budget_usd, on_budget, name, wait, as_json):
    """Submit a JSONL file (OpenAI or Anthropic batch lines) as a job."""
    from pipeline.producer import submit_file
    _provider_note()
    try:
        report = submit_file(file, priority=priority, tier=tier, budget_usd=budget_usd,
                             on_budget=on_budget, name=name, on_progress=_progress_printer())
    except FileInputError as e:
        _fail(str(e), 2)
    except InfrastructureError as e:
        _fail(str(e), 3)
    if sys.stderr.isatty():
        click.echo("", err=True)
    click.echo(f"job {report.job_id}: {report.lines_read} lines, {report.accepted} accepted, "
               f"{report.rejected} rejected ({report.elapsed:.1f} s)", err=True)
    if report.unacknowledged:
        click.echo(f"Kafka did not acknowledge lines: {', '.join(map(str, report.unacknowledged))}", err=True)
    if report.interrupted:
        click.echo("interrupted: lines after the last one read were not submitted", err=True)
        sys.exit(130)
    if wait:
        status = _wait(report.job_id)
        _print_status(status, as_json)
        sys.exit(0 if status["status"] == "completed" else 1)
    if as_json:
        with db.get_engine().connect() as conn:
            click.echo(json.dumps(db.job_status(conn, report.job_id)))
    else:
        click.echo(report.job_id)


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
def status(job_id, as_json):
    """Show a job's counts and cost."""
    with db.get_engine().connect() as conn:
        st = db.job_status(conn, job_id)
    if st is None:
        _fail(f"no job {job_id}", 2)
    _print_status(st, as_json)


@main.command()
@click.argument("job_id")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="File to write (default: stdout).")
def results(job_id, output):
    """Export a job's results in the OpenAI Batch output shape, one line per request."""
    from pipeline.export import openai_line
    engine = db.get_engine()
    with engine.connect() as conn:
        if db.job_status(conn, job_id) is None:
            _fail(f"no job {job_id}", 2)
        out = output.open("w") if output else sys.stdout
        n = 0
        try:
            for row in db.iter_results(conn, job_id):
                out.write(json.dumps(openai_line(job_id, row)) + "\n")
                n += 1
        finally:
            if output:
                out.close()
    if output:
        click.echo(f"wrote {n} results to {output}", err=True)


# ------------------------------------------------------------------ processes

@main.group("db")
def db_group():
    """Database schema."""


@db_group.command("upgrade")
def db_upgrade():
    """Apply the SQL migrations not yet applied (idempotent)."""
    try:
        applied = db.upgrade()
    except InfrastructureError as e:
        _fail(str(e), 3)
    click.echo(f"applied: {', '.join(applied)}" if applied else "schema up to date")


@main.command()
@click.option("--max-seconds", type=float, help="Stop after this long (tests, benchmarks).")
def batcher(max_seconds):
    """Run a batcher (a Kafka consumer group member)."""
    from pipeline.batcher import Batcher
    _setup_logging("INFO")
    Batcher().run(max_seconds=max_seconds)


@main.command()
@click.option("--tier", type=click.Choice(TIERS), required=True)
@click.option("--concurrency", type=int, help="Worker processes (default: the tier's setting).")
@click.option("--loglevel", default="INFO")
def worker(tier, concurrency, loglevel):
    """Run a Celery worker for one tier's queue."""
    from pipeline.constants import queue_for
    from workers.app import app
    n = concurrency or get_settings().worker_concurrency[tier]
    app.worker_main(["worker", "-Q", queue_for(tier), "-c", str(n), "-n", f"{tier}@%h",
                     "--loglevel", loglevel, "-E"])


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def simulator(ctx):
    """Run the provider simulator (OpenAI and Anthropic APIs). Options: see --help of the simulator."""
    from pipeline.simulator import config_from_args, run
    run(config_from_args(ctx.args))


def run() -> None:
    try:
        main()
    except LLMBatchError as e:
        _fail(str(e), 1)


if __name__ == "__main__":
    run()
