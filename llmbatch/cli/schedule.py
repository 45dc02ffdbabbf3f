"""Commands of the scheduler: ``scheduler``, ``schedule add|list|remove|run``, ``cancel``.

Registered on the main group in pipeline/cli.py. Exit codes as there: 0
success, 1 failed, 2 bad usage or unknown name, 3 a service is unreachable.
"""

from __future__ import annotations

import json
import sys

import click

from llmbatch.cli.common import fail
from llmbatch.cli.budget import CAP_USD
from pipeline import jsontext
from pipeline.paths.registry import modes as path_modes
from pipeline.constants import TIERS
from pipeline.errors import ConfigError, InfrastructureError, InputError


@click.command()
@click.option("--max-seconds", type=float, help="Stop after this long (tests).")
def scheduler(max_seconds):
    """Run the scheduler: off-peak window, background fill, provider batches, recurring runs, upkeep."""
    import logging

    from schedules.service import SchedulerService
    # INFO at least: the readiness line "scheduler ready" and window changes are INFO
    logging.getLogger("apscheduler").setLevel(logging.ERROR)   # "skipped: max instances" is a slow tick, not a fault
    for name in ("schedules", "pipeline"):
        if logging.getLogger(name).getEffectiveLevel() > logging.INFO:
            logging.getLogger(name).setLevel(logging.INFO)
    _serve_metrics()
    try:
        code = SchedulerService().run(max_seconds=max_seconds)
    except InfrastructureError as e:
        fail(str(e), 3)
    sys.exit(code)


def _serve_metrics() -> None:
    """The scheduler's /metrics (port P+5): the off-peak window's state, and what every process exports."""
    from pipeline import metrics
    from pipeline.config import get_settings
    from pipeline.intake.windows import Window
    from schedules.clock import get_clock
    settings = get_settings()
    window, clock = Window.offpeak(settings), get_clock(settings)
    metrics.serve("scheduler", settings, collectors=[metrics.WindowCollector(window.is_open, window.next_change,
                                                                             clock.now)])


@click.group()
def schedule():
    """Recurring JSONL runs."""


@schedule.command("add")
@click.argument("name")
@click.option("--cron", required=True, help='5 fields ("0 1 * * *"), or 6 with seconds first.')
@click.option("--file", "file", required=True, type=click.Path(), help="The JSONL file each run submits.")
@click.option("--timezone", default="UTC", show_default=True)
@click.option("--tier", type=click.Choice(TIERS))
@click.option("--priority", type=click.IntRange(0, 9))
@click.option("--budget-usd", type=CAP_USD, help="Cap on each run's spend (finite, 0 or more).")
@click.option("--mode", type=click.Choice(list(path_modes())), default="auto", show_default=True)
@click.option("--overlap", type=click.Choice(["skip", "queue"]), default="skip", show_default=True,
              help="When a run is still going at the next slot: skip that slot, or queue it.")
@click.option("--replace", is_flag=True, help="Replace a schedule of that name.")
@click.option("--json", "as_json", is_flag=True)
def schedule_add(name, cron, file, timezone, tier, priority, budget_usd, mode, overlap, replace, as_json):
    """Add a recurring run."""
    from schedules.recurring import add_schedule
    try:
        s = add_schedule(name, cron=cron, file=file, timezone=timezone, tier=tier, priority=priority,
                         budget_usd=budget_usd, mode=mode, overlap=overlap, replace=replace)
    except (ConfigError, InputError) as e:
        fail(str(e), 2)
    click.echo(json.dumps(s) if as_json else f"schedule {name}: {cron} ({timezone}), next run {s['next_run']}")


@schedule.command("list")
@click.option("--json", "as_json", is_flag=True)
def schedule_list(as_json):
    """List schedules with their last and next run."""
    from schedules.recurring import list_schedules
    items = list_schedules()
    if as_json:
        click.echo(jsontext.dumps(items))
        return
    if not items:
        click.echo("no schedules")
    for s in items:
        last = s["last_run"] or {}
        click.echo(f"{s['name']:20} {s['cron']:18} {s['timezone']:8} overlap={s['overlap']:5} "
                   f"runs={s['runs']:<4} last={last.get('status', '-')} next={s['next_run']}  {s['file']}")


@schedule.command("remove")
@click.argument("name")
def schedule_remove(name):
    """Remove a schedule (its past runs' jobs stay)."""
    from schedules.recurring import remove_schedule
    if not remove_schedule(name):
        fail(f"no schedule {name!r}", 2)
    click.echo(f"schedule {name} removed")


@schedule.command("run")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def schedule_run(name, as_json):
    """Run a schedule once now (a manual run, linked to the schedule)."""
    from schedules.recurring import run_now
    try:
        run = run_now(name)
    except InputError as e:
        fail(str(e), 2)
    if as_json:
        click.echo(jsontext.dumps(run))
    else:
        click.echo(run["job_id"])
    if run["status"] == "failed":
        sys.exit(1)


@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
def cancel(job_id, as_json):
    """Cancel a job: held and queued requests stop, calls in flight finish, provider batches are cancelled."""
    from pipeline.stores.jobs import cancel_job
    out = cancel_job(job_id)
    if out is None:
        fail(f"no job {job_id}", 2)
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"job {job_id} cancelled (was {out['previous_status']}): {out['requests_cancelled']} requests "
               f"cancelled, {out['still_running']} in flight finish, "
               f"{len(out['provider_batches'])} provider batches cancelled"
               + (f" ({waiting} when the provider confirms their creation)" if (waiting := sum(
                   p.get("status") == "cancel_requested" for p in out["provider_batches"])) else ""))
