"""The scheduler against the real stack: off-peak window on a test clock, provider Batch APIs,
cancel, recurring runs across a kill -9 and with two schedulers.

A scheduler must lead (the stack's ``scheduler`` process, or one this module
starts). Time is moved through the shared test clock (table ``sched_clock``),
which every scheduler reads (setting ``clock = "db"``, the default).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipeline.config import get_settings
from pipeline.intake.windows import Window
from schedules.clock import DbClock
from schedules.service import LEADER_LOCK
from tests.integration.conftest import LLMBATCH, chat_line, llmbatch, wait_for, write_jsonl
from tests.integration.execution_helpers import calls_of, sim_stats, simulator_config

ANTHROPIC_MODEL = "claude-3-5-haiku-latest"


def _leader_pid(engine) -> int | None:
    """OS pid of the scheduler holding the leader lock (from its application_name)."""
    with engine.connect() as conn:
        name = conn.execute(sa.text(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.objid = :k AND l.granted"), {"k": LEADER_LOCK}).scalar()
    if not name or not name.startswith("llmbatch-scheduler-"):
        return None
    return int(name.rsplit("-", 1)[1])


def _stack(action: str, *names: str) -> None:
    subprocess.run(["bash", "infra/stack.sh", action, *names], cwd=Path(__file__).parents[2], check=True,
                   capture_output=True, timeout=180)


def _start_scheduler(log: Path) -> subprocess.Popen:
    return subprocess.Popen([LLMBATCH, "--log-level", "INFO", "scheduler"], stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def scheduler(stack, tmp_path_factory):
    """A leading scheduler: the stack's, or one started here for the module."""
    from pipeline.stores import db
    engine = db.get_engine()
    DbClock(engine).reset()
    proc = None
    if _leader_pid(engine) is None:
        proc = _start_scheduler(tmp_path_factory.mktemp("sched") / "scheduler.log")
        wait_for(lambda: _leader_pid(engine), timeout=30)
    yield engine
    DbClock(engine).reset()
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _counts(engine, job: str) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM requests WHERE job_id = :j GROUP BY status"), {"j": job}).all())


def _submit(path, *args) -> str:
    proc = llmbatch("submit", "--mode", "realtime", path, "--json", *args, check=True)
    return json.loads(proc.stdout)["job_id"]


def _job_status(engine, job: str) -> str:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT status FROM jobs WHERE job_id = :j"), {"j": job}).scalar()


# ------------------------------------------------------------------ off-peak window

def test_offpeak_job_waits_for_the_window_then_completes(scheduler, tmp_path):
    engine = scheduler
    clock = DbClock(engine)
    window = Window.offpeak(get_settings())
    now = datetime.now(timezone.utc)
    closed_at = now if not window.is_open(now) else window.next_change(now) + timedelta(minutes=1)
    open_at = window.next_change(closed_at) + timedelta(minutes=1)
    assert not window.is_open(closed_at) and window.is_open(open_at)
    clock.set(closed_at)
    try:
        n = 60
        path = write_jsonl(tmp_path / "offpeak.jsonl",
                           [chat_line(f"o{i}", f"Night question {i} {uuid.uuid4().hex}") for i in range(n)])
        job = _submit(path, "--tier", "offpeak")
        wait_for(lambda: _counts(engine, job).get("held") == n, timeout=60)
        time.sleep(5)   # five scheduler ticks with the window closed
        assert _counts(engine, job) == {"held": n}
        assert calls_of(get_settings(), job) == 0, "provider called while the window was closed"

        clock.set(open_at)
        wait_for(lambda: _job_status(engine, job) == "completed", timeout=120)
        assert _counts(engine, job) == {"succeeded": n}
        # this job's calls only: opening the window also releases other tests' held off-peak work
        assert calls_of(get_settings(), job) == n
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM results WHERE job_id = :j AND status_code = 200"),
                                {"j": job}).scalar() == n
    finally:
        clock.reset()


def test_closing_window_holds_released_batches_not_started(scheduler, tmp_path):
    """Released-but-unclaimed off-peak batches go back to held at close; the worker skips them."""
    from schedules.release import hold_unstarted, release_held
    engine = scheduler
    clock = DbClock(engine)
    window = Window.offpeak(get_settings())
    now = datetime.now(timezone.utc)
    closed_at = now if not window.is_open(now) else window.next_change(now) + timedelta(minutes=1)
    clock.set(closed_at)
    try:
        path = write_jsonl(tmp_path / "close.jsonl",
                           [chat_line(f"c{i}", f"Close question {i} {uuid.uuid4().hex}") for i in range(5)])
        job = _submit(path, "--tier", "offpeak")
        wait_for(lambda: _counts(engine, job).get("held") == 5, timeout=60)
        # release without dispatching (as if Celery had not delivered yet), then the window is closed
        with engine.connect() as conn:
            batch = conn.execute(sa.text("SELECT DISTINCT batch_id FROM requests WHERE job_id = :j"),
                                 {"j": job}).scalar()
        sent = []
        while batch not in sent:
            got = release_held(("offpeak",), limit=1, dispatcher=lambda b, t, jobs: None)
            assert got, "batch not released"
            sent += got
        assert _counts(engine, job) == {"queued": 5}
        time.sleep(3)   # the scheduler ticks with the window closed
        assert _counts(engine, job) == {"held": 5}
        assert hold_unstarted(("offpeak",)) == []   # already done by the scheduler
        # the Celery message arriving now finds the batch held and does nothing
        from pipeline.intake.dispatch import enqueue_batch
        enqueue_batch(batch, "offpeak")
        time.sleep(3)
        assert _counts(engine, job) == {"held": 5}
    finally:
        clock.reset()
        llmbatch("cancel", job)


# ------------------------------------------------------------------ provider batch mode

def _lines(provider: str, n: int) -> list[dict]:
    if provider == "openai":
        return [chat_line(f"p{i}", f"Batch question {i}: name a colour.") for i in range(n)]
    return [{"custom_id": f"p{i}", "params": {"model": ANTHROPIC_MODEL, "max_tokens": 40,
                                               "messages": [{"role": "user", "content": f"Batch question {i}"}]}}
            for i in range(n)]


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_provider_batch_costs_half_of_realtime_with_identical_results(scheduler, tmp_path, provider):
    engine = scheduler
    n = 1000
    path = write_jsonl(tmp_path / f"{provider}.jsonl", _lines(provider, n))
    batch_before = sum(sim_stats(get_settings())["batch_requests"].values())
    realtime = _submit(path, "--tier", "peak")
    batch = _submit(path, "--tier", "peak", "--mode", "provider_batch")
    wait_for(lambda: _job_status(engine, realtime) == "completed", timeout=180, every=1)
    wait_for(lambda: _job_status(engine, batch) == "completed", timeout=180, every=1)
    assert sum(sim_stats(get_settings())["batch_requests"].values()) - batch_before == n

    q = ("SELECT custom_id, status_code, response, error, input_tokens, cached_input_tokens, output_tokens,"
         " usage_missing, cost_usd FROM results WHERE job_id = :j ORDER BY custom_id")
    with engine.connect() as conn:
        rt = {r.custom_id: r for r in conn.execute(sa.text(q), {"j": realtime})}
        pb = {r.custom_id: r for r in conn.execute(sa.text(q), {"j": batch})}
        modes = dict(conn.execute(sa.text(
            "SELECT b.mode, count(DISTINCT b.batch_id) FROM requests r JOIN batches b USING (batch_id)"
            " WHERE r.job_id = :j GROUP BY b.mode"), {"j": batch}).all())
        statuses = dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM requests WHERE job_id = :j GROUP BY status"), {"j": batch}).all())
        attempts = conn.execute(sa.text("SELECT count(*) FROM attempts WHERE job_id = :j"), {"j": batch}).scalar()
    assert set(modes) == {"provider_batch"}
    assert statuses == {"succeeded": n} and attempts == n
    assert rt.keys() == pb.keys() and len(rt) == n
    total_rt = total_pb = Decimal(0)
    for cid, a in rt.items():
        b = pb[cid]
        assert a.status_code == b.status_code == 200 and a.error is None and b.error is None
        assert (a.input_tokens, a.cached_input_tokens, a.output_tokens) == \
               (b.input_tokens, b.cached_input_tokens, b.output_tokens)
        assert set(a.response) == set(b.response)                      # same JSON shape
        text = (lambda r: r["choices"][0]["message"]["content"]) if provider == "openai" else \
               (lambda r: r["content"][0]["text"])
        assert text(a.response) == text(b.response)                   # same deterministic answer
        assert b.cost_usd * 2 == a.cost_usd, f"{cid}: batch {b.cost_usd} vs realtime {a.cost_usd}"
        total_rt += a.cost_usd
        total_pb += b.cost_usd
    assert total_pb * 2 == total_rt > 0
    print(f"\n{provider}: {n} requests, realtime ${total_rt}, provider batch ${total_pb} "
          f"({total_pb / total_rt:.2%})")


def test_cancel_stops_held_work_and_cancels_the_provider_batch(scheduler, stack, tmp_path):
    """The provider batch stays in progress (30 s) until the cancel reaches it: with the
    simulator's default 2 s, a loaded machine let the batch complete first (CI run 32)."""
    with simulator_config(stack, batch_processing_s=30.0):
        _cancel_a_provider_batch_job(scheduler, tmp_path)


def _cancel_a_provider_batch_job(scheduler, tmp_path):
    engine = scheduler
    n = 400
    path = write_jsonl(tmp_path / "cancel.jsonl", [
        {"custom_id": f"k{i}", "params": {"model": ANTHROPIC_MODEL, "max_tokens": 30,
                                          "messages": [{"role": "user", "content": f"cancel me {i} {uuid.uuid4().hex}"}]}}
        for i in range(n)])
    import anthropic  # noqa: F401  (imported before the race: the first import takes a second or more)
    from pipeline.stores.jobs import cancel_job   # in-process: no CLI start-up in the race
    job = _submit(path, "--mode", "provider_batch", "--tier", "background")

    def submitted():
        with engine.connect() as conn:
            return conn.execute(sa.text(
                "SELECT DISTINCT pb.provider_batch_id FROM provider_batches pb JOIN batches b ON b.provider_batch = pb.id"
                " JOIN requests r ON r.batch_id = b.batch_id WHERE r.job_id = :j AND pb.status = 'submitted'"),
                {"j": job}).scalar()
    wait_for(submitted, timeout=60, every=0.05)
    out = cancel_job(job)
    assert out["provider_batches"] and "error" not in out["provider_batches"][0]
    wait_for(lambda: not (set(_counts(engine, job)) - {"succeeded", "cancelled"}), timeout=60)
    counts = _counts(engine, job)
    assert counts.get("cancelled", 0) > 0, counts
    assert sum(counts.values()) == n
    assert _job_status(engine, job) == "cancelled"
    with engine.connect() as conn:
        cost = conn.execute(sa.text("SELECT coalesce(sum(cost_usd), 0), count(*) FROM results WHERE job_id = :j"),
                            {"j": job}).one()
    assert cost[1] == counts.get("succeeded", 0)   # what ran is kept, with its cost
    print(f"\ncancel: {counts}, kept cost ${cost[0]}")


def test_cancel_of_unknown_job_is_a_usage_error(stack):
    proc = llmbatch("cancel", "job_does_not_exist")
    assert proc.returncode == 2 and "no job" in proc.stderr


# ------------------------------------------------------------------ recurring runs

def test_recurring_runs_survive_kill_and_fire_once_with_two_schedulers(scheduler, tmp_path):
    engine = scheduler
    name = "t_" + uuid.uuid4().hex[:8]
    path = write_jsonl(tmp_path / "rec.jsonl", [chat_line(f"s{i}", f"recurring {i}") for i in range(3)])
    llmbatch("schedule", "add", name, "--cron", "*/2 * * * * *", "--file", path, "--tier", "peak",
             "--overlap", "skip", check=True)
    assert any(s["name"] == name for s in json.loads(llmbatch("schedule", "list", "--json", check=True).stdout))
    # the stack's scheduler is supervised (restarted at once when killed): stop it, so this test
    # alone decides which schedulers run, and when none does
    _stack("down", "scheduler")
    first = _start_scheduler(tmp_path / "first.log")
    wait_for(lambda: _leader_pid(engine) == first.pid, timeout=30)
    second = _start_scheduler(tmp_path / "second.log")    # a standby beside the leader
    third = None
    try:
        time.sleep(7)
        killed = _leader_pid(engine)
        assert killed == first.pid
        os.kill(killed, signal.SIGKILL)                   # the leader dies like a crash
        wait_for(lambda: _leader_pid(engine) == second.pid, timeout=20)
        time.sleep(5)
        os.kill(second.pid, signal.SIGKILL)              # now no scheduler runs at all for 5 s
        second.wait(10)
        time.sleep(5)
        third = _start_scheduler(tmp_path / "third.log")   # restarted: it must catch up the missed slots
        wait_for(lambda: _leader_pid(engine) == third.pid, timeout=20)
        time.sleep(4)
        with engine.connect() as conn:
            conn.execute(sa.text("UPDATE schedules SET enabled = false WHERE name = :n"), {"n": name})
            conn.commit()

        def settled():  # a run fired just before the disable may still be submitting its file
            with engine.connect() as conn:
                return not conn.execute(sa.text(
                    "SELECT count(*) FROM schedule_runs WHERE schedule_name = :n AND status = 'submitting'"),
                    {"n": name}).scalar()
        wait_for(settled, timeout=60)
        with engine.connect() as conn:
            runs = conn.execute(sa.text(
                "SELECT scheduled_for, status, job_id FROM schedule_runs WHERE schedule_name = :n AND NOT manual"
                " ORDER BY scheduled_for"), {"n": name}).all()
            jobs = conn.execute(sa.text("SELECT count(*) FROM jobs WHERE schedule_name = :n"), {"n": name}).scalar()
        slots = [r.scheduled_for for r in runs]
        assert len(slots) >= 6, runs
        gaps = [(b - a).total_seconds() for a, b in zip(slots, slots[1:])]
        assert all(g == 2 for g in gaps), f"a slot was lost or doubled: {gaps}"     # none lost, none twice
        assert {r.status for r in runs} <= {"submitted", "skipped"}, runs
        submitted = [r for r in runs if r.status == "submitted"]
        assert len({r.job_id for r in submitted}) == len(submitted) == jobs   # one job per fired run
        print(f"\nrecurring: {len(slots)} slots over {gaps and sum(gaps)} s across a kill -9 of pid {killed}"
              f" (standby took over), a kill -9 of the standby and 5 s with no scheduler, then a restart:"
              f" {len(submitted)} submitted, {len(runs) - len(submitted)} skipped (overlap), 0 lost, 0 doubled")
        # the schedule is still there after the kill (the definitions live in Postgres)
        listed = json.loads(llmbatch("schedule", "list", "--json", check=True).stdout)
        assert any(s["name"] == name for s in listed)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM apscheduler_jobs WHERE id = :i"),
                                {"i": f"schedule:{name}"}).scalar() in (0, 1)
    finally:
        llmbatch("schedule", "remove", name)
        for p in (first, second, third):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
        _stack("up", "scheduler")
        wait_for(lambda: _leader_pid(engine), timeout=60, what="the stack's scheduler to lead again")
