"""A Redis out of memory is an outage, not a crash (issue 24, item 7).

With ``maxmemory`` below the memory Redis already used (policy ``noeviction``: nothing is evicted,
every write is refused), the busy worker exited with "Unrecoverable error: OutOfMemoryError"
every few seconds and ``doctor`` said Redis was fine. Here Redis fills up mid-job, on the real
stack: the workers wait it out without a restart, ``doctor`` names used memory against
maxmemory, and once Redis has room the job completes with every request sent to the provider
exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import redis

from pipeline.config import ROOT
from tests.integration.conftest import chat_line, llmbatch, wait_for, write_jsonl
from tests.integration.execution_helpers import calls_of, keys_seen, scalar, simulator_config

pytestmark = pytest.mark.integration

#: how long Redis stays full here: several of the old crash's 5 s cycles (60 s was run by hand once)
FULL_S = 20.0
WORKERS = ("worker-immediate", "worker-peak", "worker-offpeak", "worker-background")


def _restarts() -> dict[str, tuple[str, int]]:
    """``infra/stack.sh status``: per worker its state and the supervisor's restart count."""
    out = subprocess.run(["bash", str(ROOT / "infra" / "stack.sh"), "status", *WORKERS], capture_output=True,
                         text=True, timeout=60, env=dict(os.environ)).stdout
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in WORKERS:
            rows[parts[0]] = (parts[1], int(parts[4]) if parts[4].isdigit() else 0)
    assert set(rows) == set(WORKERS), out
    return rows


def test_a_full_redis_mid_job_is_waited_out(stack, engine, tmp_path):
    n = 300
    r = redis.Redis.from_url(stack.redis_url, socket_timeout=10)
    before = _restarts()
    assert all(state == "up" for state, _ in before.values()), before
    old_max = r.config_get("maxmemory")["maxmemory"]
    path = write_jsonl(tmp_path / "full.jsonl",
                       [chat_line(f"m{i}", f"redis full {i}", priority=6) for i in range(n)])
    with simulator_config(stack, latency_ms=300.0):
        job = json.loads(llmbatch("submit", path, "--json", check=True, timeout=180).stdout.splitlines()[-1])["job_id"]
        wait_for(lambda: scalar(engine, "SELECT count(*) FROM results WHERE job_id = :j", j=job) >= 20,
                 timeout=120, what="the job under way")
        used = int(r.info("memory")["used_memory"])
        r.config_set("maxmemory", max(used // 2, 1 << 20))
        try:
            with pytest.raises(redis.exceptions.OutOfMemoryError):   # sanity: Redis really is full
                r.set("llmbatch:test:full", "x")
            doctor = llmbatch("doctor", "--json", timeout=120)
            redis_check = next(c for c in json.loads(doctor.stdout) if c["name"] == "redis")
            assert not redis_check["ok"] and "out of memory" in redis_check["detail"] \
                and "maxmemory" in redis_check["detail"], redis_check
            time.sleep(FULL_S)
            during = _restarts()
        finally:
            r.config_set("maxmemory", old_max)
        wait_for(lambda: scalar(engine, "SELECT count(*) FROM requests WHERE job_id = :j AND status = 'succeeded'",
                                j=job) == n, timeout=240, what=f"all {n} requests of {job} succeeded")
    after = _restarts()
    assert {w: c for w, (_, c) in during.items()} == {w: c for w, (_, c) in before.items()}, (before, during)
    assert after == before, (before, after)
    assert calls_of(stack, job) == n and not keys_seen(stack, job), (calls_of(stack, job), keys_seen(stack, job))
