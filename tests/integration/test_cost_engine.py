"""The cost engine's choice of path, and price windows, against the real stack (issue 21, items 1 and 5).

- An off-peak job with ``--mode auto`` (the default) and no deadline goes to the provider's Batch
  API, and is billed at the batch price by the simulator's own count.
- The same kind of job with every deadline under an hour: nothing goes to a provider batch, and
  every deadline is met.
- Price windows (DeepSeek's off-peak hours): with the scheduler's clock (``sched_clock``) and the
  simulator's clock moved inside a window, a job is billed at the window's price, by the ledger and
  by the simulator alike; moved into peak hours, at list price. A job on the ``window`` path is held
  while the window is closed and released when the clock enters it.

The figures are printed as measured (``-s`` shows them).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import sqlalchemy as sa

from pipeline.config import get_settings
from schedules.clock import DbClock
from tests.integration.conftest import LLMBATCH, chat_line, llmbatch, wait_for, write_jsonl
from tests.integration.execution_helpers import sim_stats
from tests.integration.named_providers import key, restarted, sim
from tests.integration.test_scheduler import _job_status, scheduler  # noqa: F401  (fixture)

HALF_UNIT = Decimal("0.000000005")   # the ledger keeps 8 decimals
ENDED = ("completed", "completed_with_errors", "failed", "cancelled")
DEEPSEEK = "deepseek-flash"
#: Saturday: off-peak all day at DeepSeek; Monday 02:30 UTC (10:30 Beijing): peak; 04:30 UTC: off-peak
SATURDAY = datetime(2026, 12, 12, 12, 0, tzinfo=timezone.utc)
MONDAY_PEAK = datetime(2026, 12, 7, 2, 30, tzinfo=timezone.utc)
MONDAY_LUNCH = datetime(2026, 12, 7, 4, 30, tzinfo=timezone.utc)


def _submit(path, *args, env=None) -> str:
    proc = subprocess.run([LLMBATCH, "submit", str(path), "--json", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)["job_id"]


def _wait(engine, job: str, timeout: float = 300) -> str:
    return wait_for(lambda: (s := _job_status(engine, job)) in ENDED and s, timeout=timeout, every=0.5,
                    what=f"job {job} ended")


def _paths(engine, job: str) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(
            "SELECT custom_id, status, path, path_reason, answered_by, lever, cost_usd, list_cost_usd"
            " FROM request_paths WHERE job_id = :j ORDER BY custom_id"), {"j": job}).mappings()]


def _billed(provider: str) -> tuple[Decimal, int]:
    p = sim_stats(get_settings())["providers"].get(provider) or {}
    return Decimal(str(p.get("billed_usd") or 0)), int(p.get("batch_lines") or 0)


# ------------------------------------------------------------------ choosing the path

def test_an_offpeak_job_in_auto_without_a_deadline_goes_to_a_provider_batch_at_the_batch_price(
        scheduler, tmp_path):  # noqa: F811
    engine, n = scheduler, 40
    tag = uuid.uuid4().hex[:8]
    path = write_jsonl(tmp_path / "auto.jsonl",
                       [chat_line(f"a{i:03d}", f"Cost engine {tag} question {i}", max_tokens=24) for i in range(n)])
    billed0, lines0 = _billed("openai")
    job = _submit(path, "--tier", "offpeak")   # --mode auto is the default
    assert _wait(engine, job) == "completed"
    billed1, lines1 = _billed("openai")
    rows = _paths(engine, job)
    assert len(rows) == n and {r["status"] for r in rows} == {"succeeded"}
    assert {r["path"] for r in rows} == {r["answered_by"] for r in rows} == {"provider_batch"}
    assert all(r["path_reason"].startswith("auto: provider_batch, 0.50× list price") for r in rows), rows[0]
    assert {r["lever"] for r in rows} == {"batch"}
    ledger = sum(r["cost_usd"] for r in rows)
    listed = sum(r["list_cost_usd"] for r in rows)
    assert lines1 - lines0 == n, "every line went through the simulator's Batch API"
    assert abs(ledger - (billed1 - billed0)) <= HALF_UNIT * n, (ledger, billed1 - billed0)
    assert abs(ledger - listed / 2) <= HALF_UNIT * n, (ledger, listed)
    status = json.loads(llmbatch("status", job, "--json", check=True).stdout)
    assert [p["path"] for p in status["paths"]] == ["provider_batch"]
    print(f"\nauto, off-peak, no deadline: {n} lines -> provider_batch; ledger ${ledger} = simulator"
          f" ${billed1 - billed0} (batch lines {lines1 - lines0}); list price ${listed}:"
          f" {ledger / listed:.3f} of list")


def test_with_every_deadline_under_an_hour_nothing_goes_to_a_provider_batch_and_every_deadline_is_met(
        scheduler, tmp_path):  # noqa: F811
    engine, n = scheduler, 30
    tag = uuid.uuid4().hex[:8]
    now = datetime.now(timezone.utc)
    lines = [chat_line(f"d{i:03d}", f"Deadline {tag} question {i}", max_tokens=24,
                       deadline=(now + timedelta(minutes=12 + i * 43 // n)).isoformat()) for i in range(n)]
    billed0, lines0 = _billed("openai")
    job = _submit(write_jsonl(tmp_path / "short.jsonl", lines), "--tier", "offpeak", "--mode", "auto")
    assert _wait(engine, job) == "completed"
    billed1, lines1 = _billed("openai")
    rows = _paths(engine, job)
    assert len(rows) == n and {r["status"] for r in rows} == {"succeeded"}
    assert "provider_batch" not in {r["path"] for r in rows} | {r["answered_by"] for r in rows}
    assert lines1 == lines0
    with engine.connect() as conn:
        d = conn.execute(sa.text("SELECT with_deadline, on_time, late, missed FROM job_deadlines WHERE job_id = :j"),
                         {"j": job}).mappings().one()
    assert (d["with_deadline"], d["on_time"], d["late"], d["missed"]) == (n, n, 0, 0), dict(d)
    ledger = sum(r["cost_usd"] for r in rows)
    assert abs(ledger - (billed1 - billed0)) <= HALF_UNIT * n
    print(f"\ndeadlines 12-55 min: {n} lines, paths {sorted({r['path'] for r in rows})}, on time {d['on_time']}"
          f" of {n}, missed {d['missed']}, late {d['late']}; ledger ${ledger} = simulator ${billed1 - billed0}")


# ------------------------------------------------------------------ price windows

RESTARTED = ("batcher", "worker-immediate", "worker-peak", "worker-offpeak", "scheduler")


@contextmanager
def deepseek_stack(settings):
    """The stack with a provider named deepseek (the price book's DeepSeek entries and their windows
    apply), served by the simulator at its own DeepSeek prices and peak hours."""
    var, secret, _ = key()
    sim(settings, "POST", "/_config", {"providers": {"deepseek": {
        "kind": "openai", "models": {DEEPSEEK: {}}, "keys": [{"key": secret, "alias": "ds"}]}}})
    env = dict(os.environ, **{var: secret}, LLMBATCH_PROVIDERS=json.dumps({"deepseek": {
        "kind": "openai", "base_url": f"{settings.simulator_url}/p/deepseek/v1",
        "keys": [{"alias": "ds", "env": var}]}}))
    with restarted(settings, env, RESTARTED):
        yield env


def _set_clocks(engine, settings, at: datetime) -> None:
    """The scheduler's and workers' clock (sched_clock, frozen) and the simulator's, both at ``at``."""
    DbClock(engine).set(at)
    sim(settings, "POST", "/_config", {"clock_offset_s": (at - datetime.now(timezone.utc)).total_seconds()})


@contextmanager
def clocks_at(engine, settings, at: datetime):
    """Both clocks at ``at`` (``_set_clocks``) for the block, then real time again."""
    _set_clocks(engine, settings, at)
    try:
        yield
    finally:
        DbClock(engine).reset()
        sim(settings, "POST", "/_config", {"clock_offset_s": 0})


def _ds_lines(tag: str, n: int) -> list[dict]:
    return [chat_line(f"w{i:03d}", f"Window {tag} question {i}", model=DEEPSEEK, max_tokens=24) for i in range(n)]


@pytest.fixture(scope="module")
def deepseek(scheduler):  # noqa: F811
    settings = get_settings()
    with deepseek_stack(settings) as env:
        yield scheduler, settings, env
    DbClock(scheduler).reset()


@pytest.mark.parametrize("at,share", [(SATURDAY, Decimal("0.5")), (MONDAY_PEAK, Decimal(1))],
                         ids=["inside-the-window", "peak"])
def test_a_job_is_billed_at_the_price_in_force_when_its_calls_were_sent(deepseek, tmp_path, at, share):
    engine, settings, env = deepseek
    n = 20
    with clocks_at(engine, settings, at):
        billed0, _ = _billed("deepseek")
        job = _submit(write_jsonl(tmp_path / "ds.jsonl", _ds_lines(uuid.uuid4().hex[:8], n)), "--tier", "peak",
                      env=env)
        assert _wait(engine, job) == "completed"
        billed1, _ = _billed("deepseek")
    rows = _paths(engine, job)
    assert len(rows) == n and {r["answered_by"] for r in rows} == {"realtime"}
    ledger, listed = sum(r["cost_usd"] for r in rows), sum(r["list_cost_usd"] for r in rows)
    assert abs(ledger - listed * share) <= HALF_UNIT * n, (ledger, listed)
    assert abs(ledger - (billed1 - billed0)) <= HALF_UNIT * n, (ledger, billed1 - billed0)
    assert {r["lever"] for r in rows} == ({"window"} if share < 1 else {None})
    print(f"\n{DEEPSEEK} at {at:%a %H:%M} UTC: ledger ${ledger} = simulator ${billed1 - billed0};"
          f" list ${listed} (share {ledger / listed:.2f})")


def test_the_window_path_waits_for_the_window_and_is_billed_at_its_price(deepseek, tmp_path):
    engine, settings, env = deepseek
    n = 10
    with clocks_at(engine, settings, MONDAY_PEAK):
        billed0, _ = _billed("deepseek")
        job = _submit(write_jsonl(tmp_path / "dsw.jsonl", _ds_lines(uuid.uuid4().hex[:8], n)), "--tier", "offpeak",
                      "--mode", "window", env=env)
        wait_for(lambda: len(_paths(engine, job)) == n, timeout=60, what="the batcher wrote the requests")
        held = wait_for(lambda: [r for r in _paths(engine, job) if r["status"] == "held"], timeout=30)
        time.sleep(6)   # a few scheduler ticks inside peak hours: still held
        assert {r["status"] for r in _paths(engine, job)} == {"held"} and len(held) == n
        _set_clocks(engine, settings, MONDAY_LUNCH)
        assert _wait(engine, job) == "completed"
        billed1, _ = _billed("deepseek")
    rows = _paths(engine, job)
    ledger, listed = sum(r["cost_usd"] for r in rows), sum(r["list_cost_usd"] for r in rows)
    assert {r["answered_by"] for r in rows} == {"window"} and {r["lever"] for r in rows} == {"window"}
    assert abs(ledger - listed / 2) <= HALF_UNIT * n and abs(ledger - (billed1 - billed0)) <= HALF_UNIT * n
    print(f"\nwindow path: held through peak, released at {MONDAY_LUNCH:%H:%M} UTC; ledger ${ledger} ="
          f" simulator ${billed1 - billed0}; list ${listed}")


# ------------------------------------------------------------------ fallback before a deadline

def test_an_unfinished_provider_batch_goes_back_to_realtime_before_its_deadline(scheduler, tmp_path):  # noqa: F811
    """A provider batch still running when a request's deadline nears (``provider_batch_deadline_lead_s``)
    is cancelled; what it did not run goes to realtime and meets the deadline; no line is billed twice.
    Whether the provider ran a line before the cancel reached it depends on timing: both are right."""
    from tests.integration.execution_helpers import calls_of, simulator_config
    engine, n = scheduler, 12
    settings = get_settings()
    now = datetime.now(timezone.utc)
    deadline = now + timedelta(hours=3)
    tag = uuid.uuid4().hex[:8]
    lines = [chat_line(f"f{i:03d}", f"Fallback {tag} question {i}", max_tokens=24, deadline=deadline.isoformat())
             for i in range(n)]
    with simulator_config(settings, batch_processing_s=900.0):   # the provider takes its time
        job = _submit(write_jsonl(tmp_path / "fallback.jsonl", lines), "--tier", "offpeak", "--mode",
                      "provider_batch")

        def submitted():
            with engine.connect() as conn:
                return conn.execute(sa.text(
                    "SELECT DISTINCT pb.id FROM provider_batches pb JOIN batches b ON b.provider_batch = pb.id"
                    " JOIN requests r ON r.batch_id = b.batch_id WHERE r.job_id = :j AND pb.status = 'submitted'"),
                    {"j": job}).scalars().all()
        # kept by id: once its lines have moved to realtime, no request of the job points at it any more
        pb_ids = wait_for(submitted, timeout=90, what="the provider batch was submitted")
        # the scheduler's clock moves to 14 minutes before the deadline: inside the lead (30 min), past the
        # latest start (deadline - deadline_margin_s, 15 min)
        DbClock(engine).set(deadline - timedelta(minutes=14))
        try:
            assert _wait(engine, job, timeout=240) == "completed"
        finally:
            DbClock(engine).reset()
    rows = _paths(engine, job)
    assert {r["status"] for r in rows} == {"succeeded"} and len(rows) == n
    assert {r["answered_by"] for r in rows} <= {"realtime", "provider_batch"}
    moved = [r for r in rows if r["answered_by"] == "realtime"]
    assert moved and all("the provider batch did not run it: realtime" in r["path_reason"] for r in moved)
    with engine.connect() as conn:
        d = conn.execute(sa.text("SELECT on_time, late, missed FROM job_deadlines WHERE job_id = :j"),
                         {"j": job}).mappings().one()
        pb = conn.execute(sa.text(
            "SELECT provider_status, cancel_requested FROM provider_batches WHERE id = ANY(:ids) LIMIT 1"),
            {"ids": pb_ids}).mappings().one()
    assert (d["on_time"], d["late"], d["missed"]) == (n, 0, 0) and pb["cancel_requested"]
    assert calls_of(settings, job) == len(moved), "each line the batch did not run was called once, realtime"
    print(f"\nprovider batch near its deadline: cancelled ({pb['provider_status']}); {len(moved)} of {n} lines went"
          f" to realtime, {n - len(moved)} ran in the batch; on time {d['on_time']} of {n}")
