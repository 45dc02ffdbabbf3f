"""Retention of ended jobs' rows (``llmbatch purge``, pipeline/stores/retention.py): real jobs run
through the stack, one made to look old, then purged; the young one and one still open stay."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
import sqlalchemy as sa

from pipeline.errors import ConfigError
from pipeline.stores import retention
from tests.integration.conftest import chat_line, llmbatch, write_jsonl

TABLES = ("requests", "results", "attempts", "rejections")


def run_job(tmp_path, name: str, n: int = 12) -> dict:
    lines = [chat_line(f"{name}-{i}", f"Retention {name} question {i}") for i in range(n)]
    lines.append('{"custom_id": "broken"')   # a rejected line: rejections are purged too
    proc = llmbatch("submit", write_jsonl(tmp_path / f"{name}.jsonl", lines), "--wait", "--json", check=True)
    status = json.loads(proc.stdout)
    assert status["status"] == "completed_with_errors" or status["status"] == "completed", status
    return status


def rows(conn, job: str) -> dict:
    return {t: conn.execute(sa.text(f"SELECT count(*) FROM {t} WHERE job_id = :j"), {"j": job}).scalar()
            for t in TABLES}


def backdate(conn, job: str, days: float) -> None:
    conn.execute(sa.text("UPDATE jobs SET finished_at = now() - make_interval(secs => :s) WHERE job_id = :j"),
                 {"s": days * 86400, "j": job})


@pytest.fixture
def one_request_running(engine):
    """Set a finished request back to 'running' (a worker has it) for the test; afterwards it is
    'succeeded' again: a request left running is re-held by every budget rebuild after it."""
    held = []

    def hold(job: str, custom_id: str) -> None:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE requests SET status = 'running' WHERE job_id = :j AND custom_id = :c"),
                         {"j": job, "c": custom_id})
        held.append((job, custom_id))
    yield hold
    with engine.begin() as conn:
        for job, custom_id in held:
            conn.execute(sa.text("UPDATE requests SET status = 'succeeded' WHERE job_id = :j AND custom_id = :c"),
                         {"j": job, "c": custom_id})


def test_purge_deletes_the_rows_of_jobs_ended_long_ago_and_keeps_their_totals(stack, engine, tmp_path,
                                                                               one_request_running):
    old, young, open_ = (run_job(tmp_path, n) for n in ("old", "young", "open"))
    # one request of this old job is still open (a worker has it): nothing of the job may go
    one_request_running(open_["job_id"], "open-0")
    with engine.begin() as conn:
        backdate(conn, old["job_id"], 10)
        backdate(conn, open_["job_id"], 10)
        batches = conn.execute(sa.text("SELECT DISTINCT batch_id FROM requests WHERE job_id = :j"),
                               {"j": old["job_id"]}).scalars().all()
        before = {j["job_id"]: rows(conn, j["job_id"]) for j in (old, young, open_)}
    assert before[old["job_id"]] == {"requests": 12, "results": 12, "attempts": 12, "rejections": 1}
    assert batches

    dry = llmbatch("purge", "--older-than-days", "7", "--dry-run", "--json", check=True)
    assert old["job_id"] in json.loads(dry.stdout)["job_ids"]
    assert json.loads(dry.stdout)["job_ids"].count(open_["job_id"]) == 0

    out = json.loads(llmbatch("purge", "--older-than-days", "7", "--json", check=True).stdout)
    assert out["jobs"] >= 1 and out["requests"] >= 12

    with engine.connect() as conn:
        assert rows(conn, old["job_id"]) == dict.fromkeys(TABLES, 0)
        assert rows(conn, young["job_id"]) == before[young["job_id"]]
        assert rows(conn, open_["job_id"]) == before[open_["job_id"]]
        left = conn.execute(sa.text("SELECT count(*) FROM batches WHERE batch_id = ANY(:b)"),
                            {"b": batches}).scalar()
        job = conn.execute(sa.text("SELECT status, accepted, rows_purged_at, purged_totals FROM jobs"
                                   " WHERE job_id = :j"), {"j": old["job_id"]}).one()
        again = retention.purge(older_than_days=7, dry_run=True)
    assert left == 0, "the batches the purged requests left empty are deleted"
    assert job.status == old["status"] and job.accepted == 12 and job.rows_purged_at is not None
    assert job.purged_totals["succeeded"] == 12 and job.purged_totals["failed"] == 0
    assert Decimal(job.purged_totals["cost_usd"]) == Decimal(old["cost_usd"]) > 0
    assert old["job_id"] not in again["job_ids"]


def test_a_purge_younger_than_a_day_is_refused(stack, engine):
    with pytest.raises(ConfigError, match="budget period"):
        retention.purge(engine, older_than_days=0.5)
    proc = llmbatch("purge")
    assert proc.returncode == 2 and "retention is off" in proc.stderr
