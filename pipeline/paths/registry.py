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
from pipeline.paths.chooser import choose
from pipeline.paths.flex import FLEX, claims as claims_flex
from pipeline.paths.provider_batch import PROVIDER_BATCH
from pipeline.paths.realtime import REALTIME
from pipeline.paths.window import WINDOW

_ALL: tuple[Path, ...] = (REALTIME, FLEX, PROVIDER_BATCH, WINDOW)
PATHS: dict[str, Path] = {p.name: p for p in _ALL}
#: the mode that lets the cost engine choose the path per request (pipeline/paths/chooser.py)
AUTO = "auto"


def names() -> tuple[str, ...]:
    """The paths by name, for ``batches.mode`` and the message schema's ``mode`` (with ``auto``)."""
    return tuple(PATHS)


def modes() -> tuple[str, ...]:
    """What a job's ``--mode`` may say: a path, or ``auto`` (the default)."""
    return (*PATHS, AUTO)


def all_paths() -> tuple[Path, ...]:
    """Every path, realtime first (the chooser's candidates)."""
    return _ALL


def path_for(name: str | None) -> Path:
    """The path called ``name`` (None: realtime); LineError naming the known ones otherwise."""
    path = PATHS.get(name or REALTIME.name)
    if path is None:
        raise LineError(f"mode must be one of {', '.join(modes())}, got {name!r}"[:200])
    return path


def check_mode(mode: str | None) -> None:
    """LineError unless ``mode`` is a path's name or ``auto``."""
    if mode != AUTO:
        path_for(mode)


def path_of(mode: str | None, body: dict) -> Path:
    """The path a request takes in a job of ``mode``: a realtime request whose body asks for
    flex itself is priced and called as flex. ``auto`` is chosen per request by the batcher
    (``choose_path``); asked here (a producer checking a line), it answers realtime."""
    path = REALTIME if mode == AUTO else path_for(mode)
    return FLEX if path is REALTIME and claims_flex(body) else path


def choose_path(mode: str | None, req, price, now, **when) -> tuple[Path, str]:
    """The path of one request and why: the job's own, or the cost engine's choice under ``auto``
    (``when``: the off-peak window's opening and the deadline margin, ``chooser.choose``)."""
    if mode != AUTO:
        path = path_of(mode, req.body)
        return path, ("asked for flex in the body" if path is not path_for(mode) else f"the job's mode {path.name}")
    if claims_flex(req.body):
        return FLEX, "asked for flex in the body"
    choice = choose(req, price, now, _ALL, **when)
    return choice.path, choice.reason


def tier_window_paths() -> list[str]:
    """Names of the worker paths whose held batches wait for their tier's off-peak window."""
    return [p.name for p in _ALL if p.runs_in == "worker" and p.waits_for_tier_window]


def price_window_paths() -> list[str]:
    """Names of the worker paths whose held batches wait for their model's price window."""
    return [p.name for p in _ALL if p.runs_in == "worker" and not p.waits_for_tier_window]


def worker_paths() -> list[str]:
    """Names of the paths whose batches our workers run (for SQL: ``mode = ANY(:modes)``)."""
    return [p.name for p in _ALL if p.runs_in == "worker"]


def scheduler_paths() -> list[str]:
    """Names of the paths whose batches the scheduler sends to a provider's Batch API."""
    return [p.name for p in _ALL if p.runs_in == "scheduler"]
