"""Injected 429s and 500s: bounded retries, every attempt recorded, cost counted once."""

from __future__ import annotations

import json

import sqlalchemy as sa

from tests.integration.conftest import chat_line, llmbatch, write_jsonl
from tests.integration.execution_helpers import simulator_config


def test_429_and_500_storm_ends_every_request_within_the_attempt_bound(stack, engine, tmp_path):
    n = 200
    path = write_jsonl(tmp_path / "storm.jsonl", [chat_line(f"s{i}", f"storm {i}") for i in range(n)])
    with simulator_config(stack, error_rate="429=0.2,500=0.05", injected_retry_after_s=0.05,
                          seed=7):
        proc = llmbatch("submit", path, "--wait", "--json")
    status = json.loads(proc.stdout)
    job = status["job_id"]
    assert status["counts"]["succeeded"] + status["counts"]["failed"] == n
    # 'completed' only when every request succeeded; --wait exits 1 otherwise
    assert status["status"] == ("completed" if status["counts"]["failed"] == 0 else "completed_with_errors")
    assert proc.returncode == (0 if status["counts"]["failed"] == 0 else 1), proc.stderr
    with engine.connect() as conn:
        per_request = conn.execute(sa.text(
            "SELECT q.custom_id, q.status, q.attempts, count(a.attempt) AS listed,"
            " count(*) FILTER (WHERE a.status_code = 200) AS ok,"
            " count(*) FILTER (WHERE a.status_code IN (429, 500)) AS errors,"
            " coalesce(sum(a.cost_usd), 0) AS attempt_cost, max(r.cost_usd) AS result_cost"
            " FROM requests q JOIN attempts a USING (job_id, custom_id)"
            " LEFT JOIN results r USING (job_id, custom_id)"
            " WHERE q.job_id = :j GROUP BY q.custom_id, q.status, q.attempts"), {"j": job}).all()
    assert len(per_request) == n, "every request has its attempts listed"
    max_attempts = stack.max_attempts
    retried = 0
    for row in per_request:
        assert 1 <= row.listed <= max_attempts and row.listed == row.attempts
        assert row.ok + row.errors == row.listed
        retried += row.errors > 0
        if row.status == "succeeded":
            assert row.ok == 1, f"{row.custom_id}: {row.ok} successful calls"
            assert row.attempt_cost == row.result_cost > 0, "cost counted once, on the successful attempt"
        else:
            assert row.status == "failed" and row.listed == max_attempts and row.ok == 0
            assert row.attempt_cost == 0 and row.result_cost == 0
    assert retried > n * 0.15, f"only {retried} requests saw an injected error"
