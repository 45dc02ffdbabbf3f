"""A job's spend is read from its own rows: never a scan of every result, once per job (issue 23).

The budget loads a job's counter from the ledger at the job's first request, and a rebuild loads
every open job's. Where a few large jobs fill ``results`` (a nightly bulk job, say), a subquery
correlated with ``jobs.job_id`` is planned for an average job, and Postgres read the whole table
for each job asked about: 9 ms of a new job's first immediate request with 30,000 results, and
growing with the table; once per open job in a rebuild.

The test runs the budget's own queries on copies of ``jobs``, ``results`` and ``provider_calls``
in a schema of its own (first on the search path), filled with three large jobs and analysed,
and asks Postgres for the plan of each statement that read ``results``.
"""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import sqlalchemy as sa

from pipeline.ids import request_key
from pipeline.money import budget, ledger, scripts
from tests.integration.execution_helpers import budget_settings

TABLES = ("jobs", "results", "provider_calls")


def _seq_scans_of_results(plan: dict, under_subplan: bool = False) -> list[bool]:
    """One entry per sequential scan of ``results`` in the plan: whether it runs under a subplan
    (once per row of its outer query)."""
    found = []
    if plan.get("Node Type") == "Seq Scan" and plan.get("Relation Name") == "results":
        found.append(under_subplan)
    for child in plan.get("Plans", []):
        found += _seq_scans_of_results(child, under_subplan or child.get("Parent Relationship") == "SubPlan")
    return found


def test_a_new_jobs_spend_and_a_rebuilds_are_read_by_index_not_by_a_scan_per_job(stack, engine):
    schema = "plans_" + uuid.uuid4().hex[:10]
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
        for t in TABLES:   # no foreign keys: the copies stand alone
            conn.execute(sa.text(f"CREATE TABLE {schema}.{t} (LIKE public.{t} INCLUDING ALL)"))
        conn.execute(sa.text(
            f"INSERT INTO {schema}.jobs (job_id, status) SELECT 'big-' || g, 'completed' FROM generate_series(1, 3) g"
            f" UNION ALL SELECT 'warm', 'running'"))
        conn.execute(sa.text(
            f"INSERT INTO {schema}.results (job_id, custom_id, model, cost_usd)"
            f" SELECT 'big-' || (g % 3 + 1), 'r' || g, 'gpt-4o-mini', 0.0001 FROM generate_series(1, 30000) g"))
        for t in TABLES:
            conn.execute(sa.text(f"ANALYZE {schema}.{t}"))
    copies = sa.create_engine(engine.url, connect_args={"options": f"-c search_path={schema},public"})
    statements: list[tuple[str, dict]] = []

    def record(conn, cursor, sql, params, context, many):
        statements.append((sql, params))
    sa.event.listen(copies, "before_cursor_execute", record)
    settings = budget_settings(stack)
    aredis, sredis = scripts.redis_clients(settings)
    sredis.flushdb()
    try:
        async def first_request():
            b = budget.Budget(settings, copies, aredis, sredis)
            await b.release(await b.reserve(request_key("warm", "r1"), "warm", "background", Decimal("0.0001")))
            with copies.begin() as conn:   # after the counters' rebuild: its counter is loaded alone
                conn.execute(sa.text("INSERT INTO jobs (job_id, status) VALUES ('fresh', 'running')"))
            res = await b.reserve(request_key("fresh", "r1"), "fresh", "background", Decimal("0.0001"))
            await b.release(res)
        asyncio.run(first_request())
        sredis.flushdb()
        with copies.connect() as conn:
            ledger.ledger_snapshot(copies, settings)   # what a rebuild reads
            sa.event.remove(copies, "before_cursor_execute", record)
            plans = []
            for sql, params in [s for s in statements if " results " in s[0] or "FROM results" in s[0]]:
                explained = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + sql, params).scalar()
                plans.append((sql, params, explained[0]["Plan"]))
    finally:
        sredis.flushdb()
        copies.dispose()
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    one_job = [(sql, plan) for sql, params, plan in plans if "fresh" in str(params)]
    assert one_job, f"the budget never read the new job's spend: {[s for s, _ in statements]}"
    for sql, plan in one_job:
        assert not _seq_scans_of_results(plan), f"a new job's spend read every result: {sql}"
    per_job = [sql for sql, params, plan in plans if any(_seq_scans_of_results(plan))]
    assert not per_job, f"results read once per job (a correlated subquery): {per_job}"
