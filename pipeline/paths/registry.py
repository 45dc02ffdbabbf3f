"""The paths by name: a new path is one module and one line in ``_ALL``.

Callers ask these instead of naming a path: ``path_for(name)``, the paths our
workers run (``worker_paths``: released, dispatched and claimed like any batch)
and the ones the scheduler sends (``scheduler_paths``), ``names()`` for the
``--mode`` option and the message schema, and ``path_of(mode, body)``: the path
of one request (a body that asks for flex itself takes the flex path).
"""

from __future__ import annotations

from pipeline.errors import LineError
from pipeline.paths.base import Path
from pipeline.paths.flex import FLEX, claims as claims_flex
from pipeline.paths.provider_batch import PROVIDER_BATCH
from pipeline.paths.realtime import REALTIME

_ALL: tuple[Path, ...] = (REALTIME, FLEX, PROVIDER_BATCH)
PATHS: dict[str, Path] = {p.name: p for p in _ALL}


def names() -> tuple[str, ...]:
    return tuple(PATHS)


def path_for(name: str | None) -> Path:
    """The path called ``name`` (None: realtime); LineError naming the known ones otherwise."""
    path = PATHS.get(name or REALTIME.name)
    if path is None:
        raise LineError(f"mode must be one of {', '.join(PATHS)}, got {name!r}"[:200])
    return path


def path_of(mode: str | None, body: dict) -> Path:
    """The path a request takes in a job of ``mode``: a realtime request whose body asks for
    flex itself is priced and called as flex."""
    path = path_for(mode)
    return FLEX if path is REALTIME and claims_flex(body) else path


def worker_paths() -> list[str]:
    """Names of the paths whose batches our workers run (for SQL: ``mode = ANY(:modes)``)."""
    return [p.name for p in _ALL if p.runs_in == "worker"]


def scheduler_paths() -> list[str]:
    """Names of the paths whose batches the scheduler sends to a provider's Batch API."""
    return [p.name for p in _ALL if p.runs_in == "scheduler"]
