"""What every command module of the CLI shares: how a command ends with an error and its exit
code (the codes: llmbatch/cli/main.py), and the one place logging handlers are set up."""

from __future__ import annotations

import sys

import click

from pipeline.config import get_settings


def fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def setup_logging(level: str = "INFO") -> None:
    from pipeline.logs import configure
    configure(level, get_settings().log_format)
