"""A batch run in this process (``run_batch``) on the real Postgres, Redis and simulator:
one bad request, lost writes, deferrals against crashes, a stolen lease, cancel against claim."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid

import pytest
import sqlalchemy as sa

from pipeline.money import deferral
from pipeline.providers.base import ProviderClient
from pipeline.stores import batches, jobs as job_store
from pipeline.stores.jobs import cancel_job
from tests.integration.conftest import wait_for
from tests.integration.execution_helpers import (LOOP, TEST_TIER, calls_of, insert_requests, keys_seen, make_batch,
                                                 requests_of, scalar, simulator_config)
from workers.execute import run_batch


_loop = LOOP


def _run(batch: str, settings, owner: str | None = None) -> dict:
    return _loop.run_until_complete(run_batch(batch, owner=owner or f"test-{uuid.uuid4().hex[:8]}",
                                              settings=settings))


def test_one_poisoned_request_fails_alone_and_every_other_is_called_once(stack, engine):
    """Items 5 and 10: a request the worker cannot run (a NaN maximum cost, a model not in its
    price book) fails on its own, with the reason; the other 38 are each sent exactly once."""
    n = 40
    job, batch = make_batch(engine, n, overrides={
        "r7": {"max_cost_usd": "NaN"},
        "r13": {"model": "gpt-4o-mini-unpriced"}})
    outcome = None
    try:
        outcome = _run(batch, stack)
    finally:
        calls = calls_of(stack, job)
        reqs = requests_of(engine, job)
    assert outcome is not None and outcome["succeeded"] == n - 2 and outcome["failed"] == 2, outcome
    assert calls == n - 2, f"{calls} provider calls for {n - 2} runnable requests"
    assert keys_seen(stack, job) == {}
    assert {c for c, r in reqs.items() if r["status"] == "succeeded"} == {f"r{i}" for i in range(n)} - {"r7", "r13"}
    # the NaN maximum is refused by the budget itself (InvalidAmount), the unpriced model is unexpected
    for cid, code, words in (("r7", "invalid_max_cost", "NaN"), ("r13", "internal_error", "UnknownModelError")):
        assert reqs[cid]["status"] == "failed", reqs[cid]
        err = reqs[cid]["error"]
        assert err["code"] == code and words in err["message"], err
    assert scalar(engine, "SELECT status FROM batches WHERE batch_id = :b", b=batch) == "done"
    assert scalar(engine, "SELECT status FROM jobs WHERE job_id = :j", j=job) == "completed_with_errors"


def _defer_and_resume(engine, batch: str, owner: str) -> None:
    """What a budget deferral does to a batch: claimed, its requests deferred, the batch parked,
    then resumed by the sweep (``resume_due_batches``)."""
    with engine.begin() as conn:
        assert batches.claim_batch(conn, batch, owner, 60) is not None
        reqs = batches.open_requests(conn, batch)
        deferral.write_deferred(conn, [{"job_id": r["job_id"], "custom_id": r["custom_id"], "scope": "unavailable"}
                                     for r in reqs])
        deferral.defer_batch(conn, batch, {"unavailable"})
        conn.execute(sa.text("UPDATE batches SET deferred_until = now() WHERE batch_id = :b"), {"b": batch})
    with engine.begin() as conn:   # only this batch is due: leave other deferred batches alone
        conn.execute(sa.text("UPDATE batches SET status = 'queued', deferred_until = NULL WHERE batch_id = :b"),
                     {"b": batch})


def test_budget_resumes_are_not_counted_as_crashes(stack, engine):
    """Item 7: eight deferrals and resumes, then the batch runs normally."""
    job, batch = make_batch(engine, 5)
    for i in range(8):
        _defer_and_resume(engine, batch, f"deferring-{i}")
    outcome = _run(batch, stack)
    reqs = requests_of(engine, job)
    assert {r["status"] for r in reqs.values()} == {"succeeded"}, reqs
    assert outcome["succeeded"] == 5
    assert scalar(engine, "SELECT status FROM jobs WHERE job_id = :j", j=job) == "completed"


def test_crashed_deliveries_are_counted_and_the_poison_message_says_so(stack, engine):
    """Item 7: five holders that died mid-batch (their leases ran out), then the batch is poison."""
    job, batch = make_batch(engine, 3)
    for i in range(5):
        with engine.begin() as conn:
            assert batches.claim_batch(conn, batch, f"dead-{i}", 0.05) is not None
            batches.open_requests(conn, batch)
        time.sleep(0.1)   # the lease runs out: its holder died
    _run(batch, stack)
    reqs = requests_of(engine, job)
    assert {r["status"] for r in reqs.values()} == {"failed"}
    message = reqs["r0"]["error"]["message"]
    assert reqs["r0"]["error"]["code"] == "batch_poison"
    assert "left unfinished 5 times" in message and "died or lost the lease" in message, message
    assert scalar(engine, "SELECT status FROM jobs WHERE job_id = :j", j=job) == "failed"


@pytest.fixture
def failing_result_writes(engine):
    """A test hook in Postgres: the first three inserts into ``results`` for one job fail, as a
    dropped connection, a deadlock and a serialization failure would (a sequence is not rolled back)."""
    tag = uuid.uuid4().hex[:8]
    seq, fn, trg = f"fail_seq_{tag}", f"fail_results_{tag}", f"fail_results_{tag}"
    state = {}

    def arm(job: str):
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE SEQUENCE {seq}")
            conn.exec_driver_sql(f"""
                CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
                DECLARE n bigint;
                BEGIN
                    IF NEW.job_id = '{job}' THEN
                        n := nextval('{seq}');
                        IF n = 1 THEN RAISE EXCEPTION 'injected: terminating connection' USING ERRCODE = '57P01'; END IF;
                        IF n = 2 THEN RAISE EXCEPTION 'injected: deadlock' USING ERRCODE = '40P01'; END IF;
                        IF n = 3 THEN RAISE EXCEPTION 'injected: serialization' USING ERRCODE = '40001'; END IF;
                    END IF;
                    RETURN NEW;
                END $$""")
            conn.exec_driver_sql(f"CREATE TRIGGER {trg} BEFORE INSERT ON results FOR EACH ROW EXECUTE FUNCTION {fn}()")
        state["armed"] = True

    def fired() -> int:
        return scalar(engine, f"SELECT last_value FROM {seq}")

    yield arm, fired
    if state:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {trg} ON results")
            conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {fn}()")
            conn.exec_driver_sql(f"DROP SEQUENCE IF EXISTS {seq}")


def test_failed_outcome_writes_are_retried_until_durable(stack, engine, failing_result_writes):
    """Item 4: three writes of the batch's outcomes fail; none is lost, the batch and job end."""
    arm, fired = failing_result_writes
    n = 30
    job, batch = make_batch(engine, n)
    arm(job)
    with simulator_config(stack, latency_ms=30.0, jitter_ms=30.0):   # outcomes finish over several writes
        outcome = _run(batch, stack)
    reqs = requests_of(engine, job)
    assert fired() >= 4   # the three failures and at least the write that went through
    assert sorted(c for c, r in reqs.items() if r["status"] == "succeeded" and r["answered"]) == \
        sorted(f"r{i}" for i in range(n)), {c: r["status"] for c, r in reqs.items() if r["status"] != "succeeded"}
    assert outcome["succeeded"] == n
    assert scalar(engine, "SELECT status FROM batches WHERE batch_id = :b", b=batch) == "done"
    assert scalar(engine, "SELECT status FROM jobs WHERE job_id = :j", j=job) == "completed"


def test_a_lost_lease_stops_new_calls_and_in_flight_ones_are_written(stack, engine):
    """Item 6: another owner takes the lease mid-batch; no call starts after the worker sees it."""
    n = 120
    job, batch = make_batch(engine, n)
    settings = dataclasses.replace(stack, batch_lease_s=3.0,
                                   inflight_per_batch={**stack.inflight_per_batch, TEST_TIER: 4})
    result, stolen_at = {}, {}

    def steal():
        def some_done():
            return scalar(engine, "SELECT count(*) FROM requests WHERE job_id = :j AND status = 'succeeded'",
                          j=job) >= 8
        deadline = time.monotonic() + 60
        while not some_done() and time.monotonic() < deadline:
            time.sleep(0.05)
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE batches SET lease_owner = 'thief' WHERE batch_id = :b"), {"b": batch})
        stolen_at["t"] = time.monotonic()
        stolen_at["calls"] = calls_of(stack, job)

    with simulator_config(stack, latency_ms=150.0):
        thief = threading.Thread(target=steal)
        thief.start()
        result.update(_run(batch, settings, owner="rightful"))
        thief.join()
        ended = time.monotonic()
        time.sleep(1.0)
        calls = calls_of(stack, job)
    # renewals every second: seen within about 1 s, then only the 4 in flight may go on
    late = calls - stolen_at["calls"]
    assert late <= 4 + 4 * 2 * 2, f"{late} calls after the lease was stolen"
    assert calls < n, f"all {n} requests were called despite the lost lease"
    assert result["abandoned"] > 0 and result["succeeded"] + result["abandoned"] == n, result
    reqs = requests_of(engine, job)
    written = sum(1 for r in reqs.values() if r["status"] == "succeeded")
    assert written == result["succeeded"]   # what was in flight finished and was written
    # left to its new holder: still running, not finished by the old one
    assert scalar(engine, "SELECT status FROM batches WHERE batch_id = :b", b=batch) == "running"
    assert ended - stolen_at["t"] < 30


def test_a_job_whose_batches_end_together_ends(stack, engine):
    """Its batches' last writes run at once, each in a transaction that cannot see the others'
    rows: the end of each batch (and its job refresh) must come after its write has committed, or
    no refresh sees every request terminal and the job stays 'running' for good (a merged write
    and end did that in CI: 100 requests succeeded, 5 batches done, the job never ended)."""
    for _ in range(6):
        job, first = make_batch(engine, 2)
        batches = [first] + [f"{first}-{i}" for i in range(1, 4)]
        with engine.begin() as conn:
            for b in batches[1:]:
                conn.execute(sa.text("INSERT INTO batches (batch_id, tier, provider, model, size, status)"
                                     " VALUES (:b, :t, 'openai', 'gpt-4o-mini', 2, 'queued')"), {"b": b, "t": TEST_TIER})
                insert_requests(conn, [{
                    "job_id": job, "custom_id": f"{b}-{i}", "line": 10 + i, "batch_id": b, "provider": "openai",
                    "model": "gpt-4o-mini", "tier": TEST_TIER, "tier_reason": "test", "priority": 3,
                    "body": {"model": "gpt-4o-mini", "max_tokens": 16,
                             "messages": [{"role": "user", "content": f"together {b} {i}"}]},
                    "input_tokens": 20, "max_cost_usd": "0.0001", "status": "queued"} for i in range(2)])
            conn.execute(sa.text("UPDATE jobs SET accepted = 8, lines_read = 8 WHERE job_id = :j"), {"j": job})
        async def together():
            return await asyncio.gather(*(run_batch(b, owner=f"test-{uuid.uuid4().hex[:8]}", settings=stack)
                                          for b in batches))
        done = _loop.run_until_complete(together())
        assert sum(d["succeeded"] for d in done) == 8
        with engine.connect() as conn:
            assert job_store.job_status(conn, job)["status"] == "completed", job


def test_job_outcome_says_whether_every_request_succeeded(stack, engine):
    """Item 8: completed only when all succeeded; completed_with_errors; failed when none did."""
    cases = {"completed": ["succeeded"] * 3, "completed_with_errors": ["succeeded", "failed", "succeeded"],
             "failed": ["failed", "failed"]}
    jobs = {}
    for expected, states in cases.items():
        job, _ = make_batch(engine, len(states))
        with engine.begin() as conn:
            for i, st in enumerate(states):
                conn.execute(sa.text("UPDATE requests SET status = :s WHERE job_id = :j AND custom_id = :c"),
                             {"s": st, "j": job, "c": f"r{i}"})
            job_store.refresh_jobs(conn, [job])
        jobs[job] = expected
    with engine.connect() as conn:
        for job, expected in jobs.items():
            assert job_store.job_status(conn, job)["status"] == expected
            assert conn.execute(sa.text("SELECT status FROM job_summary WHERE job_id = :j"),
                                {"j": job}).scalar() == expected
    with engine.begin() as conn, pytest.raises(sa.exc.IntegrityError):
        conn.execute(sa.text("UPDATE jobs SET status = 'finished-ish' WHERE job_id = :j"), {"j": next(iter(jobs))})


def test_cancel_and_claim_in_opposite_order_do_not_deadlock(stack, engine):
    """Item 11b: a claim holds the batch and is about to mark its requests running while a cancel
    of the same job runs. Both finish, no deadlock, and the claimed requests never reach the provider."""
    job, batch = make_batch(engine, 6)
    claim_conn = engine.connect()
    tx = claim_conn.begin()
    assert batches.claim_batch(claim_conn, batch, "claimer", 60) is not None   # the batch row is locked
    outcome = {}

    def cancel():
        try:
            outcome["result"] = cancel_job(job, engine=engine)
        except Exception as e:   # what the CLI would print as a traceback
            outcome["error"] = e

    t = threading.Thread(target=cancel)
    t.start()
    deadline = time.monotonic() + 20
    while scalar(engine, "SELECT count(*) FROM pg_locks WHERE NOT granted") == 0:
        assert time.monotonic() < deadline, "the cancel never waited for the claim"
        time.sleep(0.05)
    try:
        claimed = batches.open_requests(claim_conn, batch)   # the order that deadlocked: batch, then requests
        tx.commit()
    except Exception as e:
        tx.rollback()
        claimed = e
    finally:
        claim_conn.close()
    t.join(60)
    assert "error" not in outcome, f"cancel failed: {outcome.get('error')!r}"
    assert not isinstance(claimed, Exception), f"claim failed: {claimed!r}"
    assert scalar(engine, "SELECT status FROM jobs WHERE job_id = :j", j=job) == "cancelled"
    # the claimed requests are 'running'; the worker's check before each call stops them
    with engine.begin() as conn:   # the claim's holder died; its lease runs out
        conn.execute(sa.text("UPDATE batches SET lease_until = now() - interval '1 hour' WHERE batch_id = :b"),
                     {"b": batch})
    _run(batch, stack)
    assert calls_of(stack, job) == 0
    assert {r["status"] for r in requests_of(engine, job).values()} == {"cancelled"}


def test_requests_of_a_job_cancelled_mid_batch_are_not_sent(stack, engine):
    """Item 11b: the worker asks before each call; after the cancel, nothing more is sent."""
    n = 80
    job, batch = make_batch(engine, n)
    settings = dataclasses.replace(stack, inflight_per_batch={**stack.inflight_per_batch, TEST_TIER: 4})
    marks = {}

    def cancel_soon():
        deadline = time.monotonic() + 60
        while scalar(engine, "SELECT count(*) FROM requests WHERE job_id = :j AND status = 'succeeded'",
                     j=job) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        cancel_job(job, engine=engine)
        time.sleep(1.0)   # a call that passed its check just before the cancel has arrived by now
        marks["calls"] = calls_of(stack, job)

    with simulator_config(stack, latency_ms=100.0):
        t = threading.Thread(target=cancel_soon)
        t.start()
        result = _run(batch, settings)
        t.join()
        final = calls_of(stack, job)
    assert final == marks["calls"], f"{final - marks['calls']} calls more than 1 s after the cancel"
    reqs = requests_of(engine, job)
    assert result["cancelled"] > 0 and {r["status"] for r in reqs.values()} <= {"succeeded", "cancelled"}
    assert result["succeeded"] + result["cancelled"] == n
    assert scalar(engine, "SELECT status FROM jobs WHERE job_id = :j", j=job) == "cancelled"


def test_an_abandoned_batch_leaves_nothing_running(stack, engine, monkeypatch):
    """Item 5: the task running a batch is cancelled (its worker is shutting down): none of the
    batch's requests goes on calling the provider, and the lease is given back for a re-run.

    The calls counted are this process's own: the stack's batcher may hand the given-back batch
    to a stack worker at once (its sweep), and that worker's calls are the re-run, not a leak."""
    n = 80
    job, batch = make_batch(engine, n)
    settings = dataclasses.replace(stack, inflight_per_batch={**stack.inflight_per_batch, TEST_TIER: 4})
    sent = {"calls": 0}
    real_call = ProviderClient.call

    async def counted(self, body, *, headers, **kw):   # the key, url and timeout go on as given
        sent["calls"] += 1
        return await real_call(self, body, headers=headers, **kw)
    monkeypatch.setattr(ProviderClient, "call", counted)

    async def abandon():
        task = asyncio.ensure_future(run_batch(batch, owner="abandoned", settings=settings))
        deadline = time.monotonic() + 60
        while scalar(engine, "SELECT count(*) FROM requests WHERE job_id = :j AND status = 'succeeded'",
                     j=job) < 8 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        stopped = sent["calls"]
        await asyncio.sleep(2.0)   # anything left running would go on calling meanwhile
        return stopped, sent["calls"]

    with simulator_config(stack, latency_ms=100.0):
        stopped, later = _loop.run_until_complete(abandon())
    assert 8 <= stopped < n and later == stopped, f"{later - stopped} provider calls after the batch was abandoned"
    with engine.connect() as conn:
        lease_left = conn.execute(sa.text(
            "SELECT lease_until > now() FROM batches WHERE batch_id = :b AND lease_owner = 'abandoned'"),
            {"b": batch}).scalar()
    assert lease_left is not True   # given back (or already taken by the sweep's worker)
    _run(batch, stack)   # the re-run finishes what is open, once (here, or in the stack's worker)
    wait_for(lambda: {r["status"] for r in requests_of(engine, job).values()} == {"succeeded"}, 60,
             what="every request of the abandoned batch succeeded")
    dups = keys_seen(stack, job)
    assert sum(dups.values()) <= 4, dups   # only the calls cut off in flight (4 slots) are sent again
