"""The first hour (issue 15) against the live stack: interrupts, crashed submits, held work,
loud failures. Every job here is the test's own; held jobs are cancelled at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from schedules.clock import DbClock
from schedules.upkeep import close_abandoned_submits
from tests.integration.conftest import LLMBATCH, chat_line, llmbatch, wait_for, write_jsonl
from tests.integration.holds import held_metadata


def _job(engine, job_id):
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT status, lines_read, accepted, rejected, (SELECT count(*) FROM requests r"
            " WHERE r.job_id = j.job_id) AS requests FROM jobs j WHERE job_id = :j"), {"j": job_id}).mappings().first()


def _job_by_source(engine, path):
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT job_id, status, lines_read FROM jobs WHERE source = :s ORDER BY created_at DESC LIMIT 1"),
            {"s": str(path)}).mappings().first()


def _big_file(path, n, **extra):
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps(chat_line(f"r{i}", f"question {i}", max_tokens=8, **extra)) + "\n")
    return path


def _held_cap(path) -> str:
    """``--budget-usd`` that holds the job whatever the hour (tests/integration/holds.py): the
    off-peak tier alone waits only until its window opens at 22:00 UTC."""
    with path.open() as f:
        first, *_, last = (json.loads(x) for x in f)
    return held_metadata([first, last])["llmbatch_budget_usd"]


#: a held job: one line may have run, the others wait for the window or on the job's cap
HELD_STATES = ("running", "paused_budget")


def _start_submit(*args):
    return subprocess.Popen([LLMBATCH, "submit", "--mode", "realtime", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))


def _wait_reading(engine, path):
    """The submit of ``path`` is still reading: it records its progress at its first line, then
    every 2 s. A finished job's count is not progress, so a submit that ran to the end before the
    test saw it fails the wait instead of being signalled too late. Polled every 20 ms: a file of
    n lines keeps the submit reading for about n / 14,000 s here."""
    def reading():
        row = _job_by_source(engine, path)
        return row if row and row["status"] == "submitting" and row["lines_read"] >= 1 else None
    return wait_for(reading, timeout=120, every=0.02, what="the submit to be reading")


def test_ctrl_c_during_a_100k_line_submit_finishes_the_job_with_what_was_published(engine, tmp_path):
    path = _big_file(tmp_path / "big.jsonl", 100_000)
    proc = _start_submit(path, "--priority", 6)
    _wait_reading(engine, path)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    print(f"exit {proc.returncode}\nstdout: {out}\nstderr: {err}")
    assert proc.returncode == 130, err
    job_id = out.strip().splitlines()[-1]
    assert job_id.startswith("job_")
    assert f"resume: llmbatch submit {path} --resume {job_id}" in err and f"llmbatch cancel {job_id}" in err
    job = _job(engine, job_id)
    assert job["status"] != "submitting"
    assert 0 < job["accepted"] < 100_000 and job["lines_read"] == job["accepted"] + job["rejected"]
    # every published request reaches Postgres and runs; the job completes with exactly them
    done = wait_for(lambda: (_job(engine, job_id)["status"] in ("completed", "failed")) and _job(engine, job_id),
                    timeout=900, every=2, what="the interrupted job completed")
    print(f"final: {dict(done)}")
    assert done["status"] == "completed" and done["requests"] == job["accepted"]


def test_an_interrupted_submit_resumes_from_the_next_line(engine, tmp_path):
    n = 60_000
    path = _big_file(tmp_path / "resume.jsonl", n, tier="offpeak")
    proc = _start_submit(path, "--budget-usd", _held_cap(path))
    _wait_reading(engine, path)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    job_id = out.strip().splitlines()[-1]
    first = _job(engine, job_id)
    try:
        assert first["accepted"] < n
        proc = llmbatch("submit", "--mode", "realtime", path, "--resume", job_id, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert f"resumed after line {first['lines_read']}" in proc.stderr
        wait_for(lambda: _job(engine, job_id)["requests"] >= n, timeout=300, every=1, what="all requests arrived")
        job = _job(engine, job_id)
        assert (job["lines_read"], job["accepted"], job["rejected"], job["requests"]) == (n, n, 0, n)
        assert job["status"] in HELD_STATES   # held work: not completed, not submitting
    finally:
        llmbatch("cancel", job_id)


def test_a_killed_submit_is_closed_by_the_upkeep_with_its_line_count(engine, tmp_path):
    path = _big_file(tmp_path / "killed.jsonl", 100_000, tier="offpeak")
    proc = _start_submit(path, "--budget-usd", _held_cap(path))
    job_id = _wait_reading(engine, path)["job_id"]

    def published_while_reading():
        job = _job(engine, job_id)
        return job if job["status"] == "submitting" and job["requests"] > 0 else None
    row = wait_for(published_while_reading, timeout=60, every=0.02, what="published lines in Postgres while reading")
    proc.kill()
    proc.wait(timeout=30)
    try:
        assert _job(engine, job_id)["status"] == "submitting"
        wait_for(lambda: job_id in close_abandoned_submits(engine=engine), timeout=120, every=1,
                 what="the upkeep closed the dead submit's job")
        job = _job(engine, job_id)
        assert job["status"] in HELD_STATES and job["accepted"] == job["requests"] > 0
        assert job["lines_read"] >= row["lines_read"]
    finally:
        llmbatch("cancel", job_id)


@pytest.fixture
def clock_at_20_08(engine):
    """The scheduler's clock (the db clock every process reads) at 20:08 UTC: the window is closed."""
    clock = DbClock(engine)
    today = datetime.now(timezone.utc).replace(hour=20, minute=8, second=0, microsecond=0)
    clock.set(today)
    yield today
    clock.reset()


def test_held_work_says_when_it_will_run_and_is_left_out_of_the_eta(engine, tmp_path, clock_at_20_08):
    path = write_jsonl(tmp_path / "mixed.jsonl", [chat_line(f"p{i}", f"now {i}", priority=6) for i in range(3)]
                       + [chat_line(f"o{i}", f"tonight {i}", priority=3) for i in range(7)])
    proc = llmbatch("submit", "--mode", "realtime", path)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().splitlines()[-1]
    try:
        wait_for(lambda: _job(engine, job_id)["requests"] == 10, what="requests in Postgres")
        wait_for(lambda: json.loads(llmbatch("status", job_id, "--json").stdout)["counts"]["succeeded"] == 3,
                 timeout=120, what="the peak requests ran")
        st = json.loads(llmbatch("status", job_id, "--json").stdout)
        assert st["held"][0]["tier"] == "offpeak" and st["held"][0]["requests"] == 7
        assert st["held"][0]["text"].startswith("7 off-peak, window opens 22:00 UTC, in 1 h 52 m")
        assert st["eta_s"] == 0   # nothing runnable left: held work is not in the ETA
        text = llmbatch("status", job_id).stdout
        assert "held: 7 off-peak, window opens 22:00 UTC, in 1 h 52 m" in text
        assert "ETA - (only held work left)" in text
        # --wait, not on a terminal: one line per change, then Ctrl-C says the job goes on
        waiter = subprocess.Popen([LLMBATCH, "status", job_id, "--watch", "--interval", "0.2"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first_line = waiter.stdout.readline()   # it is watching: its SIGINT handling is in place
        waiter.send_signal(signal.SIGINT)
        out, err = waiter.communicate(timeout=30)
        assert waiter.returncode == 130 and f"job {job_id} goes on" in err
        assert "held: 7 off-peak, window opens 22:00 UTC" in first_line
        partial = llmbatch("results", job_id)
        assert partial.returncode == 2 and "--partial" in partial.stderr and partial.stdout == ""
        partial = llmbatch("results", job_id, "--partial")
        assert partial.returncode == 0, partial.stderr
        ids = [json.loads(line)["custom_id"] for line in partial.stdout.splitlines()]
        assert sorted(ids) == ["p0", "p1", "p2"] and "7 not finished" in partial.stderr
    finally:
        llmbatch("cancel", job_id)


def test_submit_wait_shows_held_work_and_ctrl_c_exits_130(engine, tmp_path, clock_at_20_08):
    path = write_jsonl(tmp_path / "held.jsonl", [chat_line(f"o{i}", f"tonight {i}", priority=3) for i in range(4)])
    proc = _start_submit(path, "--wait")
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if "held: 4 off-peak" in line:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    text = "".join(lines) + err
    job_id = next(w for w in text.split() if w.startswith("job_")).rstrip(":")
    try:
        assert "held: 4 off-peak, window opens 22:00 UTC, in 1 h 52 m" in text, text
        assert proc.returncode == 130 and "goes on" in err and "Aborted" not in err
    finally:
        llmbatch("cancel", job_id)


def test_no_line_accepted_exits_2_with_the_reason_and_rejections_lists_them(engine, tmp_path):
    path = write_jsonl(tmp_path / "unknown.jsonl", [chat_line(f"u{i}", "x", model="gpt-nonexistent") for i in range(9)])
    proc = llmbatch("submit", "--mode", "realtime", path)
    assert proc.returncode == 2, proc.stderr
    assert "no line of" in proc.stderr and "most common reason (9 of 9 lines)" in proc.stderr
    assert "gpt-nonexistent" in proc.stderr and "line 1:" in proc.stderr and "4 more" in proc.stderr
    job_id = next(w for w in proc.stderr.split() if w.startswith("job_")).rstrip(":")
    assert _job(engine, job_id)["status"] == "failed"
    listed = llmbatch("rejections", job_id, "--json")
    assert listed.returncode == 0
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["line"] for r in rows] == list(range(1, 10)) and all("gpt-nonexistent" in r["reason"] for r in rows)
    assert "(9 rows)" in llmbatch("rejections", job_id).stdout


def test_a_json_array_file_is_refused_before_a_job_exists(tmp_path):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([chat_line("a", "x"), chat_line("b", "y")], indent=2))
    proc = llmbatch("submit", "--mode", "realtime", path)
    assert proc.returncode == 2 and "this file is a JSON array, not JSONL: put one request per line" in proc.stderr
    proc = llmbatch("submit", "--mode", "realtime", tmp_path)
    assert proc.returncode == 2 and "is a directory" in proc.stderr


def test_postgres_unreachable_at_submit_says_so_once_and_points_to_doctor(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [chat_line("a", "x")])
    env = dict(os.environ, LLMBATCH_DATABASE_URL="postgresql+psycopg://llmbatch@127.0.0.1:9/llmbatch",
               LLMBATCH_OUTAGE_PATIENCE_S="5")   # how long it waits is not what is checked here
    proc = subprocess.run([LLMBATCH, "submit", "--mode", "realtime", str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("waiting for Postgres") == 1, proc.stderr
    assert "retrying" not in proc.stderr and "llmbatch doctor" in proc.stderr.splitlines()[-1]


def test_kafka_unreachable_at_submit_says_so_once_and_leaves_no_job(engine, tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [chat_line("a", "x")])
    env = dict(os.environ, LLMBATCH_KAFKA_BOOTSTRAP="127.0.0.1:9",
               LLMBATCH_OUTAGE_PATIENCE_S="8")   # past one 5 s metadata try: long enough to say it waits
    proc = subprocess.run([LLMBATCH, "submit", "--mode", "realtime", str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("waiting for Kafka") == 1 and "FAIL" not in proc.stderr, proc.stderr
    assert "llmbatch doctor" in proc.stderr.splitlines()[-1]
    assert _job_by_source(engine, path) is None
