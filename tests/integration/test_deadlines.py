"""Deadlines kept or reported, on the real stack with the scheduler's clock moved (issue 24, item 4).

The batcher classifies on real time; the scheduler decides on its clock (the
``sched_clock`` row, schedules/clock.py). Each test holds lines for the
off-peak window with a deadline in the closed hours after the *next* window,
then moves the scheduler's clock into those closed hours, where the window
will not open before the deadline:

- to just before the lines' latest start (deadline - ``deadline_margin_s``):
  still held; to just after it: released, run, and finished by the deadline;
- to 10 minutes past the deadline (the issue's reproduction): failed
  ``deadline_missed`` without a provider call, and reported as missed by
  ``llmbatch status``, the views and ``llmbatch_deadlines_missed_total``.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from pipeline import metrics
from pipeline.config import get_settings
from pipeline.intake.tiers import latest_start, rules_for
from pipeline.intake.windows import Window
from schedules.clock import DbClock
from tests.integration.conftest import chat_line, llmbatch, wait_for, write_jsonl
from tests.integration.execution_helpers import calls_of
from tests.integration.test_scheduler import scheduler  # noqa: F401  (the fixture: a leading scheduler)

N = 3


def _times() -> tuple[datetime, datetime]:
    """(a closed instant to submit at, a deadline in the closed hours after the next window)."""
    window = Window.offpeak(get_settings())
    now = datetime.now(timezone.utc)
    closed_at = now if not window.is_open(now) else window.next_change(now) + timedelta(minutes=1)
    opens = window.next_change(closed_at)
    closes = window.next_change(opens)
    reopens = window.next_change(closes)
    deadline = (closes + (reopens - closes) / 2).replace(microsecond=0)
    assert not window.is_open(closed_at) and not window.is_open(deadline)
    assert window.next_change(latest_start(deadline, rules_for(get_settings()))) > deadline + timedelta(minutes=10)
    return closed_at, deadline


def _submit(tmp_path, name: str, deadline: datetime) -> str:
    path = write_jsonl(tmp_path / f"{name}.jsonl",
                       [chat_line(f"{name}{i}", f"Deadline question {i} {uuid.uuid4().hex}", priority=3,
                                  deadline=deadline.isoformat()) for i in range(N)])
    return json.loads(llmbatch("submit", "--mode", "realtime", path, "--json", check=True).stdout)["job_id"]


def _requests(engine, job: str) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(
            "SELECT q.custom_id, q.status, q.tier, q.tier_reason, q.deadline, q.finished_at, x.error"
            " FROM requests q LEFT JOIN results x USING (job_id, custom_id) WHERE q.job_id = :j"),
            {"j": job}).mappings()]


def _statuses(engine, job: str) -> dict:
    out: dict[str, int] = {}
    for r in _requests(engine, job):
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out


def _job(engine, job: str) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text(
            "SELECT j.status, d.with_deadline, d.on_time, d.late, d.missed, d.overdue, d.pending"
            " FROM jobs j LEFT JOIN job_deadlines d USING (job_id) WHERE j.job_id = :j"), {"j": job}).mappings().one())


def _missed_metric(tier: str) -> float:
    s = get_settings()
    text = urllib.request.urlopen(f"http://{s.metrics_host}:{metrics.port_for('scheduler', s)}/metrics",
                                  timeout=10).read().decode()
    m = re.search(rf'^llmbatch_deadlines_missed_total\{{tier="{tier}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def _missed_in_db(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT count(*) FROM results x JOIN requests q USING (job_id, custom_id)"
            " WHERE x.error ->> 'code' = 'deadline_missed' AND q.tier = 'offpeak'")).scalar()


def test_held_request_is_released_at_its_latest_start_and_meets_its_deadline(scheduler, tmp_path):  # noqa: F811
    engine = scheduler
    clock = DbClock(engine)
    closed_at, deadline = _times()
    start_by = latest_start(deadline, rules_for(get_settings()))
    clock.set(closed_at)
    try:
        job = _submit(tmp_path, "keep", deadline)
        wait_for(lambda: _statuses(engine, job).get("held") == N, timeout=60, what="lines held for off-peak")
        assert {r["tier"] for r in _requests(engine, job)} == {"offpeak"}

        clock.set(start_by - timedelta(minutes=1))   # window closed, deadline ahead: it may wait
        time.sleep(3)                                # three scheduler ticks
        assert _statuses(engine, job) == {"held": N}
        assert calls_of(get_settings(), job) == 0
        # status names the release: the window's next opening comes after the latest start
        shown = llmbatch("status", job).stdout
        assert f"has the scheduler release it by {start_by:%Y-%m-%d %H:%M} UTC" in shown, shown

        clock.set(start_by + timedelta(seconds=1))   # its latest start: the window will not open in time
        wait_for(lambda: _job(engine, job)["status"] == "completed", timeout=90, what="job completed")
        rows = _requests(engine, job)
        assert {r["status"] for r in rows} == {"succeeded"}
        assert {r["tier"] for r in rows} == {"peak"}
        assert all("released to peak for its deadline" in r["tier_reason"] for r in rows), rows
        assert all(r["finished_at"] <= r["deadline"] for r in rows)
        assert clock.now() < deadline   # the scheduler's time did not pass the deadline either
        assert calls_of(get_settings(), job) == N
        j = _job(engine, job)
        assert (j["with_deadline"], j["on_time"], j["missed"]) == (N, N, 0), j
    finally:
        clock.reset()


def test_held_request_past_its_deadline_is_reported_missed_not_run(scheduler, tmp_path):  # noqa: F811
    engine = scheduler
    clock = DbClock(engine)
    closed_at, deadline = _times()
    clock.set(closed_at)
    try:
        job = _submit(tmp_path, "miss", deadline)
        wait_for(lambda: _statuses(engine, job).get("held") == N, timeout=60, what="lines held for off-peak")
        before, before_db = _missed_metric("offpeak"), _missed_in_db(engine)

        clock.set(deadline + timedelta(minutes=10))   # the issue: 10 minutes past the deadline
        wait_for(lambda: _job(engine, job)["status"] == "failed", timeout=60, what="job failed")
        rows = _requests(engine, job)
        assert {r["status"] for r in rows} == {"failed"}
        assert {r["error"]["code"] for r in rows} == {"deadline_missed"}
        assert calls_of(get_settings(), job) == 0, "a missed request was sent"

        j = _job(engine, job)
        assert (j["with_deadline"], j["missed"], j["on_time"], j["pending"]) == (N, N, 0, 0), j
        with engine.connect() as conn:
            outcomes = conn.execute(sa.text("SELECT DISTINCT deadline_outcome FROM request_deadlines"
                                            " WHERE job_id = :j"), {"j": job}).scalars().all()
        assert outcomes == ["missed"]

        shown = llmbatch("status", job).stdout
        assert f"deadlines: {N} MISSED (failed deadline_missed, not sent)" in shown, shown
        st = json.loads(llmbatch("status", job, "--json").stdout)
        assert st["deadlines"]["missed"] == N and st["counts"]["failed"] == N

        # every missed request counted once (other jobs held to the same deadline may have missed it too)
        assert _missed_in_db(engine) - before_db >= N
        assert _missed_metric("offpeak") - before == _missed_in_db(engine) - before_db
    finally:
        clock.reset()
