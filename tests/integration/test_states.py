"""States have one definition (pipeline/constants.py), and Postgres reads it (sql/026_state_sets.sql).

Against the stack's Postgres, after ``db.upgrade``: ``llmbatch_states`` answers the constants;
the views that now read it answer what their literal definitions answered (those definitions,
read from the earlier migrations, are the oracle); the hot queries plan as they did, on the
same partial indexes; and when a set changes, the upgrade rebuilds what was computed from it.
Every test writes inside a transaction it rolls back.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from pipeline import constants
from pipeline.stores import db
from tests.unit.test_states import statements

pytestmark = pytest.mark.integration


@pytest.fixture
def conn(engine):
    db.upgrade(engine)
    with engine.connect() as c:
        tx = c.begin()
        try:
            yield c
        finally:
            tx.rollback()


def literal(states) -> str:
    """The list as the migrations before 026 spelled it: the oracle."""
    return "(" + ", ".join(f"'{s}'" for s in states) + ")"


def test_the_function_answers_the_constants(conn):
    for name, states in constants.STATE_SETS.items():
        assert tuple(conn.execute(sa.text("SELECT llmbatch_states(:n)"), {"n": name}).scalar()) == states, name
    installed = conn.execute(sa.text("SELECT prosrc, provolatile FROM pg_proc"
                                     " WHERE oid = to_regprocedure('llmbatch_states(text)')")).one()
    assert installed == (db.states_function_body(), "i")
    assert db.install_states(conn) is False      # an upgrade with nothing changed changes nothing
    with pytest.raises(sa.exc.DBAPIError, match="no state set named request_terminl"):
        with conn.begin_nested():
            conn.execute(sa.text("SELECT llmbatch_states('request_terminl')"))


def _old_view(migration: str, view: str) -> str:
    for stmt in statements((db.MIGRATIONS_DIR / migration).read_text()):
        if m := re.match(rf"CREATE\s+(?:OR\s+REPLACE\s+)?VIEW\s+{view}\s+AS\s+(.*)", stmt, re.S | re.I):
            return m.group(1)
    raise AssertionError(f"no view {view} in {migration}")


def _rows(conn, sql: str, jobs) -> list[tuple]:
    return sorted((tuple(r) for r in conn.execute(sa.text(sql), {"jobs": jobs}).all()), key=repr)


def test_the_views_answer_as_their_literal_definitions_did(conn):
    now = datetime.now(timezone.utc)
    jobs = [f"states_{uuid.uuid4().hex[:8]}_{i}" for i in range(3)]
    for job, status in zip(jobs, ("running", "completed_with_errors", "submitting")):
        conn.execute(sa.text("INSERT INTO jobs (job_id, status, accepted, budget_usd) VALUES (:j, :s, 9, 1)"),
                     {"j": job, "s": status})
    rows = []
    for job in jobs[:2]:   # the third job has no request at all
        for k, deadline in enumerate((now - timedelta(minutes=30), now + timedelta(minutes=30), None)):
            for status in constants.REQUEST_STATES:
                finished = now - timedelta(minutes=10) if status in constants.REQUEST_TERMINAL else None
                rows.append({"j": job, "c": f"{status}-{k}", "s": status, "d": deadline, "f": finished})
    conn.execute(sa.text(
        "INSERT INTO requests (job_id, custom_id, provider, model, tier, tier_reason, priority, input_tokens,"
        " max_cost_usd, status, deadline, finished_at)"
        " VALUES (:j, :c, 'openai', 'gpt-4o-mini', 'background', 'test', 0, 1, 0.001, :s, :d, :f)"), rows)
    missed = (jobs[1], "failed-0")
    conn.execute(sa.text(
        "INSERT INTO results (job_id, custom_id, model, cost_usd, error)"
        " VALUES (:j, :c, 'gpt-4o-mini', 0.0005, CAST(:e AS jsonb))"),
        [{**r, "e": '{"code": "deadline_missed"}' if (r["j"], r["c"]) == missed else None}
         for r in rows if r["s"] in constants.REQUEST_ANSWERED])
    old_rd = _old_view("017_deadlines.sql", "request_deadlines")
    old_jd = _old_view("017_deadlines.sql", "job_deadlines").replace("FROM request_deadlines",
                                                                       f"FROM ({old_rd}) request_deadlines")
    for new, old in (("SELECT * FROM job_summary", _old_view("011_refused_lines.sql", "job_summary")),
                     ("SELECT * FROM request_deadlines", old_rd),
                     ("SELECT * FROM job_deadlines", old_jd)):
        got = _rows(conn, f"SELECT * FROM ({new}) v WHERE job_id = ANY(:jobs)", jobs)
        want = _rows(conn, f"SELECT * FROM ({old}) v WHERE job_id = ANY(:jobs)", jobs)
        assert got and got == want, new
    summary = conn.execute(sa.text("SELECT job_id, pending FROM job_summary WHERE job_id = ANY(:jobs)"),
                           {"jobs": jobs}).all()
    assert sorted(n for _, n in summary) == [0, 12, 12]
    outcomes = {o for (o,) in conn.execute(sa.text(
        "SELECT deadline_outcome FROM request_deadlines WHERE job_id = ANY(:jobs)"), {"jobs": jobs})}
    assert {"on_time", "late", "missed", "cancelled", "pending", "overdue"} <= outcomes


def _plan(conn, sql: str) -> str:
    return "\n".join(conn.execute(sa.text(f"EXPLAIN (COSTS OFF) {sql}")).scalars())


#: the hot queries' shapes, with ``{terminal}`` / ``{open_pb}`` where they test a set
HOT = (
    # refresh_jobs, cancel_job: a job's open requests (pipeline/stores/jobs.py)
    "SELECT 1 FROM requests r WHERE r.job_id = 'j' AND r.status {terminal}",
    # open_requests, finish_batch: a batch's open requests (pipeline/stores/batches.py)
    "SELECT job_id, custom_id FROM requests r WHERE r.batch_id = 'b' AND r.status {terminal}",
    # write_outcomes, write_deferred: one request, if still open (pipeline/stores/outcomes.py)
    "SELECT 1 FROM requests r WHERE r.job_id = 'j' AND r.custom_id = 'c' AND r.status {terminal}",
    # close_short_jobs (schedules/upkeep.py)
    "SELECT j.job_id, count(r.custom_id) FILTER (WHERE r.status {terminal}) FROM jobs j"
    " LEFT JOIN requests r ON r.job_id = j.job_id WHERE j.status = 'running' GROUP BY j.job_id",
    # cancel_job's provider batches
    "SELECT id FROM provider_batches pb WHERE pb.status {open_pb}",
)


def _empty_copies(conn, tables=("requests", "provider_batches")) -> None:
    """Empty copies of ``tables``, with the same indexes under the same names, first on the search
    path (dropped with the test's transaction): the plans then depend on the schema, not on what
    the stack's tables hold (benchmark jobs made the planner prefer another index there)."""
    schema = "plans_" + uuid.uuid4().hex[:10]
    conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    for t in tables:
        conn.execute(sa.text(f"CREATE TABLE {schema}.{t} (LIKE public.{t} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"))
        for (ddl,) in conn.execute(sa.text("SELECT indexdef FROM pg_indexes WHERE schemaname = 'public'"
                                           " AND tablename = :t"), {"t": t}):
            conn.execute(sa.text(ddl.replace(f" ON public.{t} ", f" ON {schema}.{t} ")))
    conn.execute(sa.text(f"SET LOCAL search_path = {schema}, public"))


def _plan_with_only(conn, index: str, sql: str) -> str:
    """The plan of ``sql`` with ``index`` the only index of its table's copy (``_empty_copies``),
    sequential scans off: it is used exactly when its predicate matches the query, whichever index
    the rows would make the planner prefer among several that do."""
    conn.execute(sa.text("SAVEPOINT only_index"))
    try:
        others = conn.execute(sa.text(
            "SELECT o.indexname FROM pg_indexes i JOIN pg_indexes o USING (schemaname, tablename)"
            " WHERE i.schemaname = current_schema() AND i.indexname = :i AND o.indexname <> :i"),
            {"i": index}).scalars().all()
        for other in others:
            conn.execute(sa.text(f"DROP INDEX {other}"))
        return _plan(conn, sql)
    finally:
        conn.execute(sa.text("ROLLBACK TO SAVEPOINT only_index"))


@pytest.mark.parametrize("scan", ["on", "off"])
def test_the_hot_queries_plan_as_with_the_literal_lists(conn, scan):
    _empty_copies(conn)
    conn.execute(sa.text(f"SET LOCAL enable_seqscan = {scan}"))
    sets = {"terminal": ("<> ALL(llmbatch_states('request_terminal'))",
                         f"NOT IN {literal(constants.REQUEST_TERMINAL)}"),
            "open_pb": ("= ANY(llmbatch_states('provider_batch_open'))",
                        f"IN {literal(constants.PROVIDER_BATCH_OPEN)}")}
    for shape in HOT:
        new = _plan(conn, shape.format(**{k: v[0] for k, v in sets.items()}))
        old = _plan(conn, shape.format(**{k: v[1] for k, v in sets.items()}))
        assert new == old, (shape, new, old)
    if scan == "off":   # the partial indexes match the queries that read the sets
        assert "requests_open_idx" in _plan_with_only(
            conn, "requests_open_idx", HOT[0].format(terminal=sets["terminal"][0]))
        # either partial index on the open set (sql/033_provider_batch_ops.sql adds one by model)
        for index in ("provider_batches_open_idx", "provider_batches_model_open_idx"):
            assert index in _plan_with_only(conn, index, HOT[-1].format(open_pb=sets["open_pb"][0]))
        # schedules/deadlines.py expire_missed: a held request implies an open one
        assert "requests_deadline_open_idx" in _plan_with_only(
            conn, "requests_deadline_open_idx", "SELECT r.batch_id FROM requests r WHERE r.status = 'held'"
            " AND r.deadline IS NOT NULL AND r.deadline <= now() ORDER BY r.deadline LIMIT 10")


def test_a_generic_plan_still_uses_the_partial_index(conn):
    """psycopg prepares a statement it runs often, and Postgres may then plan it once for any
    parameter: a set passed as a parameter could not match a partial index there; the function,
    called with a constant name, still does."""
    conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
    conn.execute(sa.text("SET LOCAL plan_cache_mode = force_generic_plan"))
    conn.exec_driver_sql("PREPARE states_open(text) AS SELECT 1 FROM requests r WHERE r.job_id = $1"
                         " AND r.status <> ALL(llmbatch_states('request_terminal'))")
    conn.exec_driver_sql("PREPARE states_param(text, text[]) AS SELECT 1 FROM requests r WHERE r.job_id = $1"
                         " AND r.status <> ALL($2)")
    try:
        plan = "\n".join(conn.exec_driver_sql("EXPLAIN (COSTS OFF) EXECUTE states_open('j')").scalars())
        assert "requests_open_idx" in plan, plan
        param = "\n".join(conn.exec_driver_sql(
            "EXPLAIN (COSTS OFF) EXECUTE states_param('j', '{succeeded,failed,cancelled}')").scalars())
        assert "requests_open_idx" not in param, param
    finally:
        conn.exec_driver_sql("DEALLOCATE states_open")
        conn.exec_driver_sql("DEALLOCATE states_param")


def _built(conn) -> dict[str, int]:
    """What was computed from the function: its indexes (by their storage, new when rebuilt) and
    CHECKs (by their oid, new when added again)."""
    return dict(conn.execute(sa.text(
        "SELECT c.relname, c.relfilenode::bigint FROM pg_depend d JOIN pg_class c ON c.oid = d.objid"
        " WHERE d.classid = 'pg_class'::regclass AND d.refobjid = to_regprocedure('llmbatch_states(text)')"
        "   AND c.relkind = 'i'"
        " UNION SELECT k.conname, k.oid::bigint FROM pg_depend d JOIN pg_constraint k ON k.oid = d.objid"
        " WHERE d.classid = 'pg_constraint'::regclass AND d.refobjid = to_regprocedure('llmbatch_states(text)')"
    )).all())


def test_a_changed_set_rebuilds_its_indexes(conn, monkeypatch):
    """A partial index computed its predicate when each row was written: after a set changes,
    an index not rebuilt would answer from the old set (an index scan does not check again)."""
    job = f"states_{uuid.uuid4().hex[:8]}"
    conn.execute(sa.text("INSERT INTO jobs (job_id, status) VALUES (:j, 'running')"), {"j": job})
    conn.execute(sa.text(
        "INSERT INTO requests (job_id, custom_id, provider, model, tier, tier_reason, priority, input_tokens,"
        " max_cost_usd, status) VALUES (:j, 'r0', 'openai', 'gpt-4o-mini', 'background', 't', 0, 1, 0, 'deferred')"),
        {"j": job})
    built = _built(conn)
    assert set(built) == {"requests_open_idx", "requests_deadline_open_idx", "provider_batches_open_idx",
                          "provider_batches_model_open_idx", "jobs_status_check"}
    changed = dict(constants.STATE_SETS, request_terminal=constants.REQUEST_TERMINAL + ("deferred",))
    monkeypatch.setattr(db, "STATE_SETS", changed)
    assert db.install_states(conn) is True
    rebuilt = _built(conn)
    assert set(rebuilt) == set(built) and all(rebuilt[k] != built[k] for k in built), (built, rebuilt)
    conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
    query = ("SELECT count(*) FROM requests r WHERE r.job_id = :j"
             " AND r.status <> ALL(llmbatch_states('request_terminal'))")
    assert "requests_open_idx" in _plan(conn, query.replace(":j", "'j'"))
    assert conn.execute(sa.text(query), {"j": job}).scalar() == 0


def test_a_set_that_drops_a_state_in_use_fails_the_upgrade(conn, monkeypatch):
    job = f"states_{uuid.uuid4().hex[:8]}"
    conn.execute(sa.text("INSERT INTO jobs (job_id, status) VALUES (:j, 'paused_budget')"), {"j": job})
    changed = dict(constants.STATE_SETS,
                   job_states=tuple(s for s in constants.JOB_STATES if s != "paused_budget"))
    monkeypatch.setattr(db, "STATE_SETS", changed)
    with pytest.raises(sa.exc.IntegrityError, match="jobs_status_check"):
        db.install_states(conn)
