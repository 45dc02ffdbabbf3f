"""``python -m llmbatch``: the same command as the ``llmbatch`` console script."""

from llmbatch.cli import run

run()
