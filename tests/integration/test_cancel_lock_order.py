"""Two cancels of one job while the batcher commits more of its batches: they must not deadlock.

The API cancels a job more than once (the client's cancel, then every move of a 'cancelling' batch,
pipeline/api/batches.py ``advance``), and a large job's batches are still being written by the
batcher meanwhile. Seen once, in an API test under load: a cancel of a 35,000-line batch deadlocked with a
second cancel of the same job, the first closing batches it had not locked (committed after its
ordered lock step) that the second had locked in order, and went through after 45 s of retries.

The interleaving is made here with a lock the test holds, against the real Postgres; success is
``pg_stat_database.deadlocks`` unchanged, and both cancels back at once.

And a pipeline process that stalls inside a transaction (stopped by the OS or a debugger, or hung)
must not make a cancel wait as long as it stalls: seen once, a scheduler stopped between its
poll's UPDATE of a provider batch and the commit held that row for 518 s, and the job's cancel
waited all of it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import sqlalchemy as sa

from pipeline.config import ROOT
from pipeline.stores import jobs
from tests.integration.conftest import wait_for
from tests.integration.execution_helpers import insert_requests, scalar


def _batch(engine, job: str, batch: str, n: int = 2) -> None:
    """One held batch of ``n`` queued requests of ``job``, committed as the batcher commits one."""
    rows = [{"job_id": job, "custom_id": f"{batch}-{i}", "line": i + 1, "batch_id": batch, "provider": "openai",
             "model": "gpt-4o-mini", "tier": "background", "tier_reason": "test", "priority": 3,
             "body": {"model": "gpt-4o-mini", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]},
             "input_tokens": 10, "max_cost_usd": "0.0001", "status": "queued"} for i in range(n)]
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE jobs SET accepted = accepted + :n, lines_read = lines_read + :n"
                             " WHERE job_id = :j"), {"n": n, "j": job})
        conn.execute(sa.text("INSERT INTO batches (batch_id, tier, provider, model, size, status)"
                             " VALUES (:b, 'background', 'openai', 'gpt-4o-mini', :n, 'held')"), {"b": batch, "n": n})
        insert_requests(conn, rows)


def _deadlocks(engine) -> int:
    return scalar(engine, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")


def _waiting_cancels(engine) -> int:
    """Cancels waiting for a lock in their ordered lock step (jobs.lock_job_batches)."""
    return scalar(engine, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                          " AND query LIKE '%ORDER BY batch_id FOR UPDATE%'"
                          " AND query LIKE '%FROM requests WHERE job_id%'")


def test_two_cancels_of_a_job_being_written_do_not_deadlock(stack, engine):
    job = f"lockorder-{uuid.uuid4().hex[:10]}"
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO jobs (job_id, status, accepted, lines_read) VALUES (:j, 'running', 0, 0)"),
                     {"j": job})
    b1, b3, b5 = (f"b-{job}-{k}" for k in (1, 3, 5))   # batch_id order: b1 < b3 < b5
    _batch(engine, job, b3)
    _batch(engine, job, b5)
    before = _deadlocks(engine)
    outcomes: dict[str, object] = {}

    def cancel(name: str) -> None:
        started = time.monotonic()
        try:
            outcomes[name] = (jobs.cancel_job(job, engine=engine), time.monotonic() - started)
        except Exception as e:   # noqa: BLE001 - the test reports it
            outcomes[name] = (e, time.monotonic() - started)

    holder = engine.connect()
    first = second = None
    try:
        tx = holder.begin()   # b5 held, as a worker's claim holds its batch: the first cancel stops in its lock step
        holder.execute(sa.text("SELECT 1 FROM batches WHERE batch_id = :b FOR UPDATE"), {"b": b5})
        first = threading.Thread(target=cancel, args=("first",))
        first.start()
        wait_for(lambda: _waiting_cancels(engine) == 1, timeout=30, every=0.05, what="the first cancel on b5")
        _batch(engine, job, b1)   # the batcher commits another batch of the job, before the others in order
        second = threading.Thread(target=cancel, args=("second",))
        second.start()   # its lock step takes b1, then waits for b3 (the first cancel's)
        wait_for(lambda: _waiting_cancels(engine) == 2, timeout=30, every=0.05, what="the second cancel on b3")
        tx.rollback()
    finally:
        holder.close()
        for t in (first, second):
            if t is not None:
                t.join(timeout=180)
    time.sleep(1.5)   # backends report their counters when idle (at most every second)
    took = {name: round(s, 1) for name, (_, s) in outcomes.items()}
    print(f"\ncancels took {took} s; deadlocks {before} -> {_deadlocks(engine)}")
    assert all(isinstance(out, dict) for out, _ in outcomes.values()) and len(outcomes) == 2, outcomes
    assert _deadlocks(engine) == before, "the two cancels deadlocked (Postgres detected it)"
    assert max(took.values()) < 10, took   # a deadlock victim waits deadlock_timeout, then retries with backoff
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM jobs WHERE job_id = :j"), {"j": job}).scalar() == "cancelled"
        left = dict(conn.execute(sa.text(
            "SELECT b.batch_id, b.status FROM batches b WHERE b.batch_id = ANY(:b)"), {"b": [b1, b3, b5]}).all())
        open_requests = conn.execute(sa.text(
            "SELECT count(*) FROM requests WHERE job_id = :j AND status <> 'cancelled'"), {"j": job}).scalar()
    assert open_requests == 0 and left == {b1: "done", b3: "done", b5: "done"}, (open_requests, left)


#: a process of the pipeline that takes the job's row lock in a transaction, says so, and stalls
STALLED_HOLDER = """
import os, signal, sys
import sqlalchemy as sa
from pipeline.stores.db import get_engine
with get_engine().begin() as conn:
    conn.execute(sa.text("SELECT 1 FROM jobs WHERE job_id = :j FOR UPDATE"), {"j": sys.argv[1]})
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_a_stalled_process_inside_a_transaction_does_not_hold_up_a_cancel(stack, engine):
    """The pipeline's own sessions end when idle in a transaction longer than
    ``db_idle_transaction_s`` (here 2 s), so the lock a stalled process holds is let go."""
    job = f"stalled-{uuid.uuid4().hex[:10]}"
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO jobs (job_id, status, accepted, lines_read) VALUES (:j, 'running', 0, 0)"),
                     {"j": job})
    holder = subprocess.Popen([sys.executable, "-c", STALLED_HOLDER, job], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "LLMBATCH_DB_IDLE_TRANSACTION_S": "2"})
    outcome: list = []
    canceller = threading.Thread(target=lambda: outcome.append(jobs.cancel_job(job, engine=engine)), daemon=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        canceller.start()
        canceller.join(timeout=60)
        took = time.monotonic() - started
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert outcome, "the cancel still waits for the stalled process's lock after 60 s"
    print(f"\ncancel behind a stalled holder took {took:.1f} s")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM jobs WHERE job_id = :j"), {"j": job}).scalar() == "cancelled"
