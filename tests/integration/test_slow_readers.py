"""A reader that pauses mid-stream (a pager, a slow download) still gets every result.

Every pipeline session ends when it idles inside a transaction for ``db_idle_transaction_s``, so a
stalled writer's row locks go (pipeline/stores/db.py). A job's results are streamed through a
server-side cursor, whose transaction idles for as long as its reader pauses and holds no row
lock: the limit must not end it.
"""

from __future__ import annotations

import time
import uuid

import sqlalchemy as sa

from pipeline.config import get_settings
from pipeline.stores import outcomes


def test_a_reader_paused_longer_than_the_idle_limit_still_gets_every_result(stack, engine):
    job, n = "job_slowread" + uuid.uuid4().hex[:8], 25
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO jobs (job_id, status, accepted, mode) VALUES (:j, 'cancelled', :n,"
                             " 'realtime')"), {"j": job, "n": n})
        conn.execute(sa.text(
            "INSERT INTO requests (job_id, custom_id, line, provider, model, tier, tier_reason, priority,"
            " input_tokens, max_cost_usd, status)"
            " SELECT :j, 'r' || i, i, 'openai', 'gpt-4o-mini', 'peak', 'test', 0, 1, 0, 'cancelled'"
            " FROM generate_series(1, :n) AS i"), {"j": job, "n": n})
    # the limit of every pipeline session, at half a second
    strict = sa.create_engine(get_settings().sqlalchemy_url,
                              connect_args={"options": "-c idle_in_transaction_session_timeout=500"})
    try:
        with strict.connect() as conn:
            rows = outcomes.iter_results(conn, job, chunk=10)
            first = next(rows)
            time.sleep(2)   # the reader's pager waits for its user
            got = [first["custom_id"]] + [r["custom_id"] for r in rows]
    finally:
        strict.dispose()
    assert got == [f"r{i}" for i in range(1, n + 1)]
