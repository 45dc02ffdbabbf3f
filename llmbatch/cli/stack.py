"""``llmbatch up|down|ps``: the local stack, through infra/stack.sh (the same script as the make
targets). ``status`` is a job's status, so the stack's is ``ps``."""

from __future__ import annotations

import json
import subprocess
import sys

import click

from llmbatch.cli.common import fail
from pipeline.config import ROOT


def _stack(action: str, names) -> None:
    """Run infra/stack.sh with ``action``; exits with its code."""
    script = ROOT / "infra" / "stack.sh"
    if not script.is_file():
        fail("infra/stack.sh not found: up/down/ps need a source checkout", 2)
    sys.exit(subprocess.call(["bash", str(script), action, *names]))


@click.command()
@click.argument("names", nargs=-1)
def up(names):
    """Start the local stack, or only NAMES (like `make up`; idempotent)."""
    _stack("up", names)


@click.command()
@click.argument("names", nargs=-1)
def down(names):
    """Stop the local stack, or only NAMES (like `make down`)."""
    _stack("down", names)


@click.command()
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per process: name, state, pid, uptime, restarts, port.")
def ps(names, as_json):
    """List the local stack's processes: NAME STATE PID UPTIME RESTARTS PORT (like `make status`).

    STATE: up, starting, backoff (died during start-up; the supervisor tries again after a
    growing delay), stopping, down, or fatal (the supervisor gave up)."""
    if not as_json:
        _stack("status", names)
    proc = subprocess.run(["bash", str(ROOT / "infra" / "stack.sh"), "status", *names],
                          capture_output=True, text=True)
    if proc.returncode:
        click.echo(proc.stderr, err=True, nl=False)
        sys.exit(proc.returncode)

    def value(v: str):
        return None if v == "-" else int(v) if v.isdigit() else v
    for line in proc.stdout.splitlines()[1:]:   # the first line is the header
        parts = line.split()
        if len(parts) == 6:
            click.echo(json.dumps(dict(zip(("name", "state", "pid", "uptime", "restarts", "port"),
                                           map(value, parts)))))
