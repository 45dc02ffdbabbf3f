"""The scheduler's one event loop for its provider-batch work (schedules/loop.py), no services."""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

import pytest

from pipeline.config import Settings
from schedules import loop

ROOT = Path(__file__).resolve().parents[2]


def test_every_call_runs_on_the_same_loop_in_its_own_thread():
    async def where():
        return id(asyncio.get_running_loop()), threading.current_thread().name
    first, second = loop.run(where()), loop.run(where())
    assert first == second and first[1] == "scheduler-loop"


def test_an_exception_comes_back_to_the_caller():
    async def fails():
        raise ValueError("the provider said no")
    with pytest.raises(ValueError, match="said no"):
        loop.run(fails())


def test_one_budget_per_settings_and_engine_made_on_the_loop():
    s, engine = Settings(redis_url="redis://127.0.0.1:1/0"), object()
    b = loop.budget(s, engine)
    assert loop.budget(s, engine) is b and loop.budget(Settings(redis_url=s.redis_url), engine) is not b


def test_the_scheduler_never_starts_an_event_loop_per_call():
    """Provider calls and the budget go through ``loop.run``: ``asyncio.run`` made a loop (and SDK
    clients) per call, and a sync twin of the budget existed for want of one."""
    found = [f"{p.name}:{n}" for p in sorted((ROOT / "schedules").glob("*.py"))
             for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"asyncio\.run\(", line)]
    assert found == []
    assert not (ROOT / "pipeline" / "money" / "holds.py").exists()
