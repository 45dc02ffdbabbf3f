"""``llmbatch purge``: delete the rows of jobs that ended long ago (pipeline/stores/retention.py)."""

from __future__ import annotations

import json

import click

from llmbatch.cli.common import fail
from pipeline.config import get_settings
from pipeline.stores import retention


@click.command()
@click.option("--older-than-days", type=float, metavar="DAYS",
              help="Jobs that ended more than DAYS ago (default: the purge_jobs_after_days setting).")
@click.option("--dry-run", is_flag=True, help="Only count the jobs that would be purged.")
@click.option("--json", "as_json", is_flag=True)
def purge(older_than_days, dry_run, as_json):
    """Delete the requests, results and attempts of jobs that ended long ago.

    The job's own row stays, with its totals (succeeded, failed, cancelled, cost), so
    `llmbatch jobs` still lists it; its results can no longer be exported. Run it from cron,
    or as often as you like: it only ever takes jobs that ended DAYS ago with nothing open.
    """
    days = older_than_days if older_than_days is not None else get_settings().purge_jobs_after_days
    if not days:
        fail("retention is off (purge_jobs_after_days is 0): set it, or pass --older-than-days", 2)
    out = retention.purge(older_than_days=days, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(out))
    elif dry_run:
        click.echo(f"{out['jobs']} jobs ended before {out['cutoff']} would be purged")
    else:
        click.echo(f"purged {out['jobs']} jobs ({out['requests']} requests) that ended before {out['cutoff']}")
