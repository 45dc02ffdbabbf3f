"""The ``llmbatch`` command: one module per command group.

``main`` holds the group and the job commands (submit, status, jobs, results,
sql, report, doctor); ``stack`` (up, down, ps) and ``processes`` (batcher, worker,
simulator, db upgrade), ``budget``, ``schedule``, ``kafka`` and ``keys`` hold theirs;
``common`` how a command fails and logging; ``doctor``, ``views`` and ``report`` render what the
commands print. This package may import every other package; nothing imports it.
"""

from llmbatch.cli.main import main, run

__all__ = ["main", "run"]
