"""The ``llmbatch`` command: one module per command group.

``main`` holds the group and the job commands (submit, status, jobs, results,
sql, the stack and the long-running processes); ``budget``, ``schedule``, ``kafka`` and
``keys`` hold their groups; ``doctor``, ``views`` and ``report`` render what the
commands print. This package may import every other package; nothing imports it.
"""

from llmbatch.cli.main import main, run

__all__ = ["main", "run"]
