"""A job whose accepted lines never all become requests still ends.

The producer counts a line accepted once Kafka has it; the batcher can still
refuse the message (to llm.requests.dlq). Before ``jobs.refused`` such a job
waited for the missing lines for ever and ``submit --wait`` never returned.
The upkeep ends it, once quiet, with the missing lines counted and an outcome
that is never ``completed``; a job that is only slow is left alone.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa

from pipeline.stores import db, jobs
from schedules.upkeep import close_short_jobs


def _job(conn, *, accepted: int, done: int, open_: int = 0, age_s: int = 1200) -> str:
    job = "job_refused_" + uuid.uuid4().hex[:10]
    conn.execute(sa.text(
        "INSERT INTO jobs (job_id, name, status, lines_read, accepted, rejected, created_at, submitted_at)"
        " VALUES (:j, 'refused-test', 'running', :a, :a, 0, now() - make_interval(secs => :age),"
        " now() - make_interval(secs => :age))"), {"j": job, "a": accepted, "age": age_s})
    for i in range(done + open_):
        conn.execute(sa.text(
            "INSERT INTO requests (job_id, custom_id, line, provider, model, tier, tier_reason, priority,"
            " body, input_tokens, max_cost_usd, status, created_at)"
            " VALUES (:j, :c, :n, 'openai', 'gpt-4o-mini', 'peak', 'test', 5, '{}', 1, 0.0001, :s,"
            " now() - make_interval(secs => :age))"),
            {"j": job, "c": f"r{i}", "n": i + 1, "s": "succeeded" if i < done else "running", "age": age_s})
    return job


def _state(engine, job):
    with engine.connect() as conn:
        return tuple(conn.execute(sa.text("SELECT status, refused FROM jobs WHERE job_id = :j"), {"j": job}).one())


def test_a_quiet_job_missing_lines_ends_with_them_counted(stack):
    engine = db.get_engine()
    with engine.begin() as conn:
        short = _job(conn, accepted=5, done=3)
        nothing = _job(conn, accepted=2, done=0)
        slow = _job(conn, accepted=5, done=3, age_s=5)            # the batcher may still be catching up
        busy = _job(conn, accepted=5, done=2, open_=1)           # work still running
    closed = close_short_jobs(engine=engine, quiet_s=600)
    assert short in closed and nothing in closed and slow not in closed and busy not in closed
    assert _state(engine, short) == ("completed_with_errors", 2)
    assert _state(engine, nothing) == ("failed", 2)
    assert _state(engine, slow) == ("running", 0)
    assert _state(engine, busy) == ("running", 0)
    with engine.connect() as conn:
        assert jobs.job_status(conn, short)["counts"]["refused"] == 2
    assert short not in close_short_jobs(engine=engine, quiet_s=600)   # once only
