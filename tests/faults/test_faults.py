"""Fault scenarios on a real local stack (see conftest.py: run with ``make test-faults``).

Each scenario: a small job, a fault while it runs, then ``check_invariants``
(every request terminal, one result each, duplicate provider calls counted and
bounded, no provider traffic after the end, and the provider's bill in the
ledger and within the cap).

Caps are set from the job (conftest.py ``JobCaps``; the simulator bills every
call to its limit, so a call costs what the pipeline reserves for it) in one of
two ways, named in each scenario's docstring:

- **paused at the cap**: the job's cap is 70 % of its maxima, so the job stops
  at it after the fault (which lands at 20–30 %); the bill then must be within
  that cap, and in the ledger. Then the cap is raised to what the job may
  spend and the job finishes. Used where the fault can make the pipeline lose
  track of money (a worker killed mid-call, the budget's Redis or the ledger's
  Postgres gone): a call spent without a hold, or a hold lost, shows as a
  bill over a cap the job has filled;
- **what the job may spend**: every request once at its maximum plus the billed
  duplicate calls the scenario allows (none, where refusals are not billed).
  The last request of the job needs the whole cap, so a single call billed
  beyond that shows as a bill over the cap (or, refused by the pipeline, as a
  job that cannot finish).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from decimal import Decimal

import pytest
import sqlalchemy as sa

from pipeline.config import get_settings
from pipeline.ids import request_key
from pipeline.providers.registry import get_registry
from pipeline.stores import db
from tests.faults.conftest import (JobCaps, check_invariants, check_paused_at_cap, counts, crash, done, ledger_of,
                                   provider_bill, restart_with_env, sim_config, sim_stats, stack_sh, submit,
                                   submitted_job, supervised, wait_terminal, wait_until)
from tests.faults.money import money_failures

MAX_ATTEMPTS = get_settings().max_attempts
#: the cap a "paused at the cap" scenario starts with: past its fault, short of its end
PAUSE_AT = 0.7


def _run_with_kill(fault_job, name: str, n: int, latency_ms: float, at_fraction: float = 0.3,
                   timeout: float = 180, then: int = 0):
    sim_config(latency_ms=latency_ms)
    started = time.monotonic()
    path = fault_job(n)
    caps = JobCaps.of(path)
    cap = caps.part(PAUSE_AT)
    job = submit(path, "--budget-usd", str(cap))
    wait_until(lambda: done(job) >= n * at_fraction, 120, what=f"{at_fraction:.0%} of {job} done")
    crash(name)                  # the supervisor starts it again; nothing here does
    at_pause = check_paused_at_cap(job, cap, caps.may_spend(then))
    wait_terminal(job, n, timeout)
    return job, started, caps.may_spend(then), at_pause


@pytest.mark.parametrize("name", ["worker-peak", "batcher"])
def test_kill_9_mid_job(fault_job, name):
    """Paused at the cap: calls cut off by the kill may have been billed, so they must be spent in
    the ledger before the cap lets more calls out."""
    n = 1500
    # a killed worker's batch is redone from its open requests: calls whose result was not yet
    # written are repeated once. Per killed process that is its calls in flight (at most its
    # in-flight cap, 64) and the answers it had received but not yet committed: measured up to
    # about 2 x 64 more at 30 ms a call (bench/limits.py "crash" splits the two).
    bound = 3 * 64 * get_settings().worker_concurrency["peak"]
    job, started, cap, at_pause = _run_with_kill(fault_job, name, n, latency_ms=30, then=bound)
    check_invariants(f"kill -9 {name}", job, n, started=started, cap=cap, max_duplicate_calls=bound,
                     at_pause=at_pause)


def test_kill_9_scheduler_with_background_work(fault_job):
    """Background batches are held until the scheduler releases them; kill it in between.
    Cap: what the job may spend with the duplicate calls it allows (the kill cuts off no call)."""
    status = stack_sh("status", "scheduler")
    if " up " not in f" {status} ":
        pytest.skip("the stack runs no scheduler (`llmbatch scheduler`, issue 6) yet")
    n = 600
    bound = 2 * 32 * get_settings().worker_concurrency["background"]
    sim_config(latency_ms=20)
    started = time.monotonic()
    path = fault_job(n)
    cap = JobCaps.of(path).may_spend(bound)
    job = submit(path, "--budget-usd", str(cap), "--tier", "background", "--mode", "realtime")
    wait_until(lambda: counts(job).get("held", 0) + done(job) >= n // 2, 60, what="background work written")
    crash("scheduler")
    wait_terminal(job, n, 240)
    check_invariants("kill -9 scheduler", job, n, started=started, cap=cap, max_duplicate_calls=bound)


#: the services whose loss can cost the pipeline its count of money: the budget's counters and the ledger
MONEY_SERVICES = ("redis", "postgres")


def _capped_submit(path, name: str, bound: int):
    """Submit in the background with the cap the scenario uses: paused at the cap for a service that
    holds money (``MONEY_SERVICES``), else what the job may spend. Returns (proc, caps, first cap)."""
    caps = JobCaps.of(path)
    cap = caps.part(PAUSE_AT) if name in MONEY_SERVICES else caps.may_spend(bound)
    return submit(path, "--budget-usd", str(cap), background=True), caps, cap


@pytest.mark.parametrize("name", ["kafka", "redis", "postgres"])
def test_restart_service_mid_job(fault_job, name):
    """Redis and Postgres: paused at the cap (the budget's counters are rebuilt from the ledger, or
    the ledger is away while calls are answered). Kafka holds no money: what the job may spend."""
    n = 1500
    bound = 2 * 64 * get_settings().worker_concurrency["peak"]
    sim_config(latency_ms=30)
    started = time.monotonic()
    before = _job_ids()
    proc, caps, cap = _capped_submit(fault_job(n), name, bound)
    _new_job(before, n, 0.0 if name == "kafka" else 0.2)   # kafka: while lines are still flowing
    stack_sh("restart", name)
    job = submitted_job(proc)
    at_pause = check_paused_at_cap(job, cap, caps.may_spend(bound)) if name in MONEY_SERVICES else None
    wait_terminal(job, n, 240)
    check_invariants(f"restart {name}", job, n, started=started, cap=caps.may_spend(bound),
                     max_duplicate_calls=bound, at_pause=at_pause)


@pytest.mark.parametrize("name", ["postgres", "kafka", "redis"])
def test_kill_9_service_mid_job(fault_job, name):
    """kill -9 of a service the pipeline depends on, mid-job, and the supervisor restarts it:
    the Postgres postmaster alone (its backends outlive it, as after a real crash, and hold
    its shared memory until they notice), Kafka's JVM, Redis (append-only file, fsync every
    second: the last second of writes may be gone). Caps as in ``test_restart_service_mid_job``."""
    n = 1500
    bound = 2 * 64 * get_settings().worker_concurrency["peak"]
    sim_config(latency_ms=30)
    started = time.monotonic()
    before = _job_ids()
    proc, caps, cap = _capped_submit(fault_job(n), name, bound)
    _new_job(before, n, 0.0 if name == "kafka" else 0.2)   # kafka: while lines are still flowing
    crash(name, leader_only=(name == "postgres"))
    job = submitted_job(proc)
    at_pause = check_paused_at_cap(job, cap, caps.may_spend(bound)) if name in MONEY_SERVICES else None
    wait_terminal(job, n, 300)
    check_invariants(f"kill -9 {'postgres postmaster' if name == 'postgres' else name}", job, n,
                     started=started, cap=caps.may_spend(bound), max_duplicate_calls=bound, at_pause=at_pause)


def test_batcher_killed_while_postgres_is_down(fault_job):
    """Postgres stops mid-job; while it is down the batcher is killed -9. The supervisor starts
    the batcher again at once, into the outage (it must wait it out, or die and be tried again
    with a growing delay); then Postgres comes back and the job completes. Paused at the cap: the
    workers' calls answered while the ledger is away must be in it before more calls go out."""
    n = 1500
    bound = 2 * 64 * get_settings().worker_concurrency["peak"]
    sim_config(latency_ms=30)
    started = time.monotonic()
    before = _job_ids()
    proc, caps, cap = _capped_submit(fault_job(n), "postgres", bound)
    job = _new_job(before, n, 0.2)
    stack_sh("down", "postgres")
    try:
        crash("batcher")
        time.sleep(5)            # the restarted batcher meets the outage
        during = supervised("batcher")["batcher"]
    finally:
        stack_sh("up", "postgres")
    submitted_job(proc)
    at_pause = check_paused_at_cap(job, cap, caps.may_spend(bound))
    wait_terminal(job, n, 300)
    row = check_invariants("batcher kill -9 while postgres down", job, n, started=started,
                           cap=caps.may_spend(bound), max_duplicate_calls=bound, at_pause=at_pause)
    after = supervised("batcher")["batcher"]
    print(f"batcher during the outage: {during}; after: {after}; {row.scenario}")
    assert after["state"] == "up", after


def _tight(path) -> tuple[str, Decimal]:
    """Submit with the cap of every request once at its maximum: (job, cap)."""
    cap = JobCaps.of(path).may_spend()
    return submit(path, "--budget-usd", str(cap)), cap


def _job_ids() -> set[str]:
    with db.get_engine().connect() as conn:
        return set(conn.execute(sa.text("SELECT job_id FROM jobs")).scalars())


def _new_job(before: set[str], n: int, fraction: float) -> str:
    """The job a background submit created (not one of ``before``), once ``fraction`` of its
    n requests have results (0: once any of its requests is in Postgres). Postgres may be
    restarting meanwhile: a failed look is just another poll."""
    def look():
        try:
            with db.get_engine().connect() as conn:
                rows = conn.execute(sa.text(
                    "SELECT j.job_id, (SELECT count(*) FROM requests r WHERE r.job_id = j.job_id),"
                    " (SELECT count(*) FROM results x WHERE x.job_id = j.job_id)"
                    " FROM jobs j WHERE j.created_at > now() - interval '1 hour'")).all()
        except sa.exc.OperationalError:
            return None
        for job, n_requests, n_results in rows:
            if job not in before and n_requests > 0 and n_results >= n * fraction:
                return job
        return None
    return wait_until(look, 180, what=f"the new job {fraction:.0%} done")


def _first_wave(n: int, most: bool = False) -> int:
    """Requests tried before the first retry-after ends: a sleeping retry keeps its in-flight
    slot, so one batch tries its in-flight cap (64), and at most one batch per worker process runs."""
    s = get_settings()
    per_batch = s.inflight_per_batch["peak"]
    return min(n, per_batch * s.worker_concurrency["peak"] if most else per_batch)


def test_429_storm_retry_after_30s(fault_job):
    """Every call refused with retry-after 30 s for 8 s, then the provider recovers. A refusal is
    not billed: the cap is every request once at its maximum (``_tight``)."""
    n = 300
    sim_config(latency_ms=20, error_rates={"429": 1.0}, injected_retry_after_s=30)
    started = time.monotonic()
    job, cap = _tight(fault_job(n))
    wait_until(lambda: sim_stats()["total"]["requests"] >= _first_wave(n), 60, what="the first wave tried")
    time.sleep(8)
    storm = sim_stats()["total"]
    sim_config(error_rates={})
    # nobody retries before the provider's 30 s: no key was called twice during the storm
    assert storm["duplicates"] == 0, f"{storm['duplicates']} calls ignored retry-after"
    assert storm["requests"] <= _first_wave(n, most=True), storm
    wait_terminal(job, n, 150)
    assert counts(job).get("succeeded") == n
    check_invariants("429 storm, retry-after 30 s", job, n, started=started, cap=cap,
                     max_duplicate_calls=n)


def test_429_storm_retry_after_300s_is_a_scheduled_retry(fault_job):
    """retry-after 300 s: the request waits (no retry loop, no failure); the test does not wait 300 s.

    Within 8 s: no key called twice, every refusal recorded as an attempt, no
    request failed. Then the workers holding the sleeping batches are killed and
    restarted (the provider has recovered): the batches come back through the
    lease sweep and finish. No refusal is billed: the cap is every request once at its maximum.
    """
    n = 200
    sim_config(latency_ms=20, error_rates={"429": 1.0}, injected_retry_after_s=300)
    started = time.monotonic()
    job, cap = _tight(fault_job(n))
    wait_until(lambda: sim_stats()["total"]["requests"] >= _first_wave(n), 60, what="the first wave tried")
    time.sleep(8)
    stats = sim_stats()["total"]
    assert stats["duplicates"] == 0, f"{stats['duplicates']} calls before the 300 s retry-after ran out"
    with db.get_engine().connect() as conn:
        recorded = conn.execute(sa.text("SELECT count(*) FROM attempts WHERE job_id = :j AND status_code = 429"),
                                {"j": job}).scalar()
    c = counts(job)
    assert recorded == stats["requests"], f"{recorded} of {stats['requests']} refused attempts recorded"
    assert c.get("failed", 0) == 0 and c.get("succeeded", 0) == 0, c
    sim_config(error_rates={})
    crash("worker-peak")
    wait_terminal(job, n, 120)
    check_invariants("429 storm, retry-after 300 s", job, n, started=started, cap=cap,
                     max_duplicate_calls=n)


def test_5xx_burst(fault_job):
    """500 and 529 answer without a generation and are not billed: the cap is every request once
    at its maximum."""
    n = 800
    sim_config(latency_ms=20, error_rates={"500": 0.3, "529": 0.1})
    started = time.monotonic()
    job, cap = _tight(fault_job(n))
    wait_until(lambda: done(job) >= n * 0.5, 120, what="half done")
    sim_config(error_rates={})
    wait_terminal(job, n, 120)
    with db.get_engine().connect() as conn:
        bad = conn.execute(sa.text(
            "SELECT count(*) FROM requests WHERE job_id = :j AND status = 'failed' AND attempts < :m"),
            {"j": job, "m": MAX_ATTEMPTS}).scalar()
    assert bad == 0, f"{bad} requests failed before using their {MAX_ATTEMPTS} attempts"
    check_invariants("5xx burst (40 %)", job, n, started=started, cap=cap,
                     max_duplicate_calls=n * (MAX_ATTEMPTS - 1))


def test_provider_slower_than_visibility_timeout(fault_job, request):
    """A batch outlives the broker's visibility timeout: Redis hands the task out again. The second
    delivery finds the batch leased and must not run it again: the cap is every request once at
    its maximum, so a request run twice goes over it."""
    n = 120
    restart_with_env("worker-peak", LLMBATCH_VISIBILITY_TIMEOUT_S="4")
    request.node.restart_plain = ["worker-peak"]
    sim_config(latency_ms=9000)
    started = time.monotonic()
    job, cap = _tight(fault_job(n))
    wait_terminal(job, n, 180)
    check_invariants("provider slower than visibility timeout", job, n, started=started, cap=cap,
                     max_duplicate_calls=n)


def test_consumer_rebalance_1_3_1(fault_job, extras):
    """No request may run twice: the cap is every request once at its maximum."""
    n = 2000
    sim_config(latency_ms=20)
    started = time.monotonic()
    path = fault_job(n)
    cap = JobCaps.of(path).may_spend()
    proc = submit(path, "--budget-usd", str(cap), background=True)
    more = [extras.batcher(), extras.batcher()]
    time.sleep(6)          # the group rebalances to three members while messages flow
    for p in more:
        extras.stop(p)     # and back to one
    job = submitted_job(proc)
    wait_terminal(job, n, 180)
    check_invariants("rebalance 1 -> 3 -> 1 batchers", job, n, started=started, cap=cap, max_duplicate_calls=0)


def test_redis_flushall_with_batches_waiting_in_the_queue(fault_job):
    """FLUSHALL empties the Celery queues as well as the budget counters. With the peak worker
    stopped, every batch of the job is waiting in its queue when Redis is flushed; the batcher's
    sweep sees its marker key gone and dispatches them again (the scheduler's stuck-batch check,
    ``stuck_dispatched_s``, would take 15 minutes), and spend is rebuilt from the ledger. Nothing
    is spent before the flush, and no request may run twice: the cap is every request once at its
    maximum."""
    import redis
    n = 600
    sim_config(latency_ms=20)
    stack_sh("down", "worker-peak")
    started = time.monotonic()
    job, cap = _tight(fault_job(n))

    def all_dispatched():
        with db.get_engine().connect() as conn:
            return conn.execute(sa.text(
                "SELECT count(*) FROM requests r JOIN batches b USING (batch_id)"
                " WHERE r.job_id = :j AND b.status = 'dispatched'"), {"j": job}).scalar() == n
    wait_until(all_dispatched, 60, what=f"all {n} requests in dispatched batches")
    redis.Redis.from_url(get_settings().redis_url).flushall()
    stack_sh("up", "worker-peak")
    wait_terminal(job, n, 60)
    check_invariants("FLUSHALL with batches queued", job, n, started=started, cap=cap, max_duplicate_calls=0)


def test_the_money_check_can_fail(fault_job):
    """The money check on the live stack, broken on purpose: a job within its cap passes; the same
    bill against a cap one call smaller is over it; and one call planted with a request's own
    ``Idempotency-Key``, which the pipeline never made, is spent unseen."""
    n = 50
    sim_config(latency_ms=20)
    started = time.monotonic()
    path = fault_job(n)
    caps = JobCaps.of(path)
    job, cap = _tight(path)
    wait_terminal(job, n, 60)
    bill, led = provider_bill(job), ledger_of(job)
    assert money_failures(bill, led, cap) == []
    smaller = cap - max(caps.per_request)
    assert [f for f in money_failures(bill, led, smaller) if f.startswith("over the cap")], \
        f"a cap one call smaller (${smaller}) than the job's maxima holds a bill of ${bill.usd}"
    line = json.loads(path.read_text().splitlines()[0])
    openai = get_registry().get("openai")   # the simulated provider, as the pipeline reaches it
    req = urllib.request.Request(f"{openai.base_url}/chat/completions", method="POST",
                                 data=json.dumps(line["body"]).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {openai.keys[0].reveal()}",
                                          "Idempotency-Key": request_key(job, line["custom_id"])})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    with pytest.raises(AssertionError, match="spent unseen"):
        check_invariants("self-test: one call planted outside the pipeline", job, n, started=started, cap=cap)
