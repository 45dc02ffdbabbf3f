"""A worker rides out a Postgres outage mid-batch: its claims, writes, checks and finish wait with
backoff, and the batch ends with every outcome written and every request called once.

Stops and starts the stack's Postgres (``infra/stack.sh``); processes that do not survive an
outage yet are started again afterwards (``make up`` is idempotent)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import threading
import time
import uuid

from pipeline.config import ROOT
from tests.integration.execution_helpers import LOOP, TEST_TIER, calls_of, keys_seen, make_batch, requests_of, scalar, simulator_config
from workers.execute import run_batch


def _stack(*args: str, check: bool = True) -> None:
    proc = subprocess.run(["bash", str(ROOT / "infra" / "stack.sh"), *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))
    assert proc.returncode == 0 or not check, proc.stdout + proc.stderr


def test_a_batch_rides_out_a_postgres_outage(stack, engine, caplog):
    n = 150
    job, batch = make_batch(engine, n)
    settings = dataclasses.replace(stack, inflight_per_batch={**stack.inflight_per_batch, TEST_TIER: 8})
    outage = {}

    def stop_postgres_mid_batch():
        deadline = time.monotonic() + 60
        while scalar(engine, "SELECT count(*) FROM requests WHERE job_id = :j AND status = 'succeeded'",
                     j=job) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        outage["start"] = time.monotonic()
        _stack("down", "postgres")
        time.sleep(4.0)
        _stack("up", "postgres")
        outage["end"] = time.monotonic()

    loop = LOOP
    t = threading.Thread(target=stop_postgres_mid_batch)
    try:
        with simulator_config(stack, latency_ms=150.0):
            t.start()
            result = loop.run_until_complete(run_batch(batch, owner=f"outage-{uuid.uuid4().hex[:6]}",
                                                       settings=settings))
            t.join()
    finally:
        t.join(300)
        _stack("up", check=False)   # whatever did not survive the outage (not this test's subject)
    calls = calls_of(stack, job)
    assert outage.get("end"), "Postgres was never stopped"
    assert result["succeeded"] == n, result
    reqs = requests_of(engine, job)
    assert sum(1 for r in reqs.values() if r["status"] == "succeeded" and r["answered"]) == n
    assert calls == n and keys_seen(stack, job) == {}
    assert scalar(engine, "SELECT status FROM batches WHERE batch_id = :b", b=batch) == "done"
    assert scalar(engine, "SELECT status FROM jobs WHERE job_id = :j", j=job) == "completed"
    waited = [r.getMessage() for r in caplog.records if "retrying with backoff" in r.getMessage()]
    assert waited, "the outage was never noticed: it did not happen during the batch"
    assert len(waited) < 50, f"{len(waited)} log lines: one per state change, not one per try"
