"""Postgres access: the engine, transactions and retries, JSON parameters, and migrations.

The statements every process shares live beside this module: jobs (pipeline/stores/jobs.py),
batches and their requests (pipeline/stores/batches.py), outcomes (pipeline/stores/outcomes.py).

SQLAlchemy 2.0 Core over psycopg 3. Bulk writes go through one statement per
batch (``jsonb_to_recordset``), never a row at a time. Repository functions take
a connection so callers compose transactions (a state change and a result
write commit together). Writes are idempotent on natural keys: a replayed
message or a redelivered task changes nothing that is already done.
"""

from __future__ import annotations

import contextlib
import functools
import time
import logging
import re
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline import jsontext
from pipeline.config import ROOT, get_settings
from pipeline.constants import STATE_SETS
from pipeline.errors import InfrastructureError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = ROOT / "sql"


@functools.cache
def get_engine(url: str | None = None) -> Engine:
    """One engine (and pool) per process.

    Its sessions end when idle inside a transaction for ``db_idle_transaction_s``, so the row
    locks of a stalled process (stopped, hung) go instead of holding up every writer of those
    rows for as long as it stalls (a cancel waited 518 s on a stopped scheduler's uncommitted
    UPDATE). The limit is set above the longest wait a healthy transaction has between its
    statements; the stalled process's next statement fails as on a dropped connection, and its
    work is taken up again as after one (``retrying``, the next tick, a lease running out)."""
    settings = get_settings()
    idle_ms = max(1, round(settings.db_idle_transaction_s * 1000))
    engine = sa.create_engine(url or settings.sqlalchemy_url, pool_size=5, max_overflow=10, future=True,
                              connect_args={"options": f"-c idle_in_transaction_session_timeout={idle_ms}"})
    ping_when_idle(engine)
    return engine


#: a pooled connection idle this long is pinged before it is handed out again
PING_IDLE_S = 2.0


def ping_when_idle(engine: Engine, idle_s: float = PING_IDLE_S, clock=time.monotonic) -> None:
    """Ping a pooled connection at checkout only when it sat idle ``idle_s`` or more.

    ``pool_pre_ping`` pings at every checkout: a round trip per transaction, a fifth of an
    immediate request's trips to Postgres (each a wait for a core under load). A connection
    checked in moments ago is as alive as a ping would show; one that sat idle across a
    Postgres restart is found dead here and replaced, as ``pool_pre_ping`` would. A connection
    that dies unpinged fails its first statement, as one dying mid-transaction always could:
    the pool is invalidated, and ``retrying`` (or the caller's next try) gets a new one."""
    dialect = engine.dialect

    @sa.event.listens_for(engine, "connect")
    @sa.event.listens_for(engine, "checkin")
    def _checked_in(dbapi_connection, record):
        record.info["checked_in"] = clock()

    @sa.event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection, record, proxy):
        if clock() - record.info.get("checked_in", float("-inf")) < idle_s:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as e:
            if dialect.is_disconnect(e, dbapi_connection, None):
                raise sa.exc.DisconnectionError(f"a pooled connection was found closed: {e}") from e
            raise


def dumps(value) -> str:
    """JSON for jsonb parameters; Decimals keep their exact value, as plain decimals."""
    return jsontext.dumps(value, separators=(",", ":"), ensure_ascii=False)


@contextlib.contextmanager
def transaction(engine: Engine, patience_s: float | None = None):
    """``engine.begin()`` that waits out a short Postgres outage (a restart) when connecting,
    for ``patience_s`` (default: the setting ``outage_patience_s``).

    Only the connect is retried, never a statement: the block runs once, so its connection is
    pinged first (the pool pings only those that sat idle, ``ping_when_idle``) and one that died
    since its last use, in a restart say, is replaced before the block starts.
    """
    if patience_s is None:
        patience_s = get_settings().outage_patience_s
    started = time.monotonic()
    deadline = started + patience_s
    waiting = False
    while True:
        try:
            conn = engine.connect()
            if not _alive(conn):
                conn.invalidate()
                conn.close()
                conn = engine.connect()
            break
        except sa.exc.OperationalError as e:
            if not waiting:   # one line per state change, not one per attempt, said at the first
                log.warning("waiting for Postgres (up to %.0f s): %s", patience_s, str(e.orig).strip())
                waiting = True
            else:
                log.debug("Postgres still unreachable: %s", e.orig)
            if time.monotonic() > deadline:
                raise InfrastructureError(f"cannot reach Postgres: {e.orig}") from e
            time.sleep(1.0)
    if waiting:
        log.warning("Postgres reachable again after %.0f s", time.monotonic() - started)
    with conn, conn.begin():
        yield conn


def _alive(conn: Connection) -> bool:
    try:
        conn.dialect.do_ping(conn.connection.dbapi_connection)
        return True
    except Exception:
        return False


#: backoff of ``retrying``: first wait, growth, ceiling (seconds)
RETRY_FIRST_S, RETRY_FACTOR, RETRY_MAX_S = 0.2, 2.0, 5.0


def is_transient(exc: BaseException) -> bool:
    """An error a later try of the same transaction can get past: Postgres down or
    restarting, a dropped connection, a deadlock or serialization victim, a full pool."""
    if isinstance(exc, InfrastructureError):
        return True
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError))


def autocommit(engine: Engine):
    """A connection whose every statement is a transaction of its own: no ``BEGIN`` and no
    ``COMMIT`` round trips around one statement (a read, or a write that stands alone)."""
    return engine.connect().execution_options(isolation_level="AUTOCOMMIT")


def retrying(engine: Engine, work, *, what: str, patience_s: float | None = None, sleep=time.sleep,
             each_statement: bool = False):
    """``work(conn)`` in one transaction, tried again on a transient error until it commits;
    ``each_statement``: on an ``autocommit`` connection, for work whose statements stand alone.

    A deadlock victim, a serialization failure and a Postgres outage are waited
    out with backoff (a log line when it starts failing and one when it is
    through, not one per try). ``patience_s``: give up after that long and raise
    the last error (None: never). Other errors are raised at once. ``work``
    must be safe to run again (every statement here is).
    """
    started, delay, failing = time.monotonic(), RETRY_FIRST_S, None
    while True:
        try:
            with (autocommit(engine) if each_statement else engine.begin()) as conn:
                out = work(conn)
            if failing is not None:
                log.warning("Postgres: %s went through after %.1f s", what, time.monotonic() - started)
            return out
        except Exception as e:
            if not is_transient(e):
                raise
            if patience_s is not None and time.monotonic() - started > patience_s:
                raise
            reason = f"{type(getattr(e, 'orig', None) or e).__name__}"
            if failing != reason:
                log.warning("Postgres: %s failed (%s: %s); retrying with backoff", what, reason,
                            str(getattr(e, "orig", None) or e).strip().splitlines()[0] if str(e) else "")
                failing = reason
            sleep(delay)
            delay = min(delay * RETRY_FACTOR, RETRY_MAX_S)


# ---------------------------------------------------------------- migrations

def migration_files(directory: Path = MIGRATIONS_DIR) -> list[Path]:
    """Ordered migrations: ``NNN_name.sql`` at the top of ``sql/``."""
    return sorted(p for p in directory.glob("[0-9][0-9][0-9]_*.sql"))


#: the SQL face of pipeline/constants.py ``STATE_SETS``: ``llmbatch_states('request_terminal')``
STATES_FUNCTION = "llmbatch_states"


def states_function_body() -> str:
    """The body of ``llmbatch_states(set_name)``: each set of ``STATE_SETS`` as a text[]; a name
    it does not know raises (a typo must not read as an empty set, which ``<> ALL`` passes)."""
    if not all(re.fullmatch(r"[a-z_]+", x) for x in [*STATE_SETS, *(s for v in STATE_SETS.values() for s in v)]):
        raise ValueError(f"state sets and states are lower-case words: {STATE_SETS}")
    arms = "".join(f"\n        WHEN '{name}' THEN RETURN ARRAY[{', '.join(repr(s) for s in states)}]::text[];"
                   for name, states in sorted(STATE_SETS.items()))
    return (f"\nBEGIN\n    CASE set_name{arms}\n        ELSE RAISE EXCEPTION USING"
            f" MESSAGE = 'no state set named ' || coalesce(set_name, 'NULL'),"
            f" HINT = 'the sets are pipeline/constants.py STATE_SETS';\n    END CASE;\nEND\n")


def states_function_sql() -> str:
    """``CREATE OR REPLACE`` of the function. IMMUTABLE, so Postgres folds a call with a constant
    name into the array when it plans: ``status <> ALL(llmbatch_states('request_terminal'))`` is
    planned as the ``NOT IN`` of that set's words, so a partial index's predicate and a query's
    match as literals did, in generic plans too. plpgsql, not sql, only to raise on an unknown name."""
    return (f"CREATE OR REPLACE FUNCTION {STATES_FUNCTION}(set_name text) RETURNS text[]"
            f" LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $states${states_function_body()}$states$")


def install_states(conn: Connection) -> bool:
    """Make ``llmbatch_states`` answer what pipeline/constants.py says; True when it changed.

    An index predicate or a CHECK that calls an IMMUTABLE function is computed when a row is
    written, so when a set changes, what was computed before is rebuilt here, in the same
    transaction: the indexes that call the function are rebuilt, and its CHECKs are added again,
    which checks every row (a state still in use that the constants dropped fails the upgrade).
    """
    fn = f"{STATES_FUNCTION}(text)"
    installed = conn.execute(sa.text("SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure(:f)"),
                             {"f": fn}).scalar()
    if installed == states_function_body():
        return False
    conn.exec_driver_sql(states_function_sql())
    if installed is None:
        return True
    for (index,) in conn.execute(sa.text(
            "SELECT DISTINCT d.objid::regclass::text FROM pg_depend d JOIN pg_class c ON c.oid = d.objid"
            " WHERE d.classid = 'pg_class'::regclass AND d.refobjid = to_regprocedure(:f) AND c.relkind = 'i'"),
            {"f": fn}).all():
        log.warning("state sets changed: rebuilding index %s", index)
        conn.exec_driver_sql(f"REINDEX INDEX {index}")
    for table, name, definition in conn.execute(sa.text(
            "SELECT DISTINCT c.conrelid::regclass::text, quote_ident(c.conname), pg_get_constraintdef(c.oid)"
            " FROM pg_depend d JOIN pg_constraint c ON c.oid = d.objid"
            " WHERE d.classid = 'pg_constraint'::regclass AND d.refobjid = to_regprocedure(:f)"),
            {"f": fn}).all():
        log.warning("state sets changed: checking every row of %s against %s again", table, name)
        conn.exec_driver_sql(f"ALTER TABLE {table} DROP CONSTRAINT {name}, ADD CONSTRAINT {name} {definition}")
    return True


def upgrade(engine: Engine | None = None) -> list[str]:
    """Install the state sets (``install_states``), then apply migrations not yet applied.
    Idempotent.

    The sets come first, on every upgrade: a migration may read them, and a code change to
    pipeline/constants.py reaches Postgres with no migration. An advisory lock keeps two
    concurrent upgrades from racing.
    """
    engine = engine or get_engine()
    applied_now = []
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(727001)"))
            conn.execute(sa.text(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"))
            if install_states(conn):
                log.info("state sets installed from pipeline/constants.py (%s)", STATES_FUNCTION)
            done = set(conn.execute(sa.text("SELECT version FROM schema_migrations")).scalars())
            for path in migration_files():
                if path.stem in done:
                    continue
                conn.exec_driver_sql(path.read_text())
                conn.execute(sa.text("INSERT INTO schema_migrations (version) VALUES (:v)"),
                             {"v": path.stem})
                applied_now.append(path.stem)
            _set_reader_password(conn)
    except sa.exc.OperationalError as e:
        raise InfrastructureError(f"cannot reach Postgres: {e.orig}") from e
    return applied_now


def _set_reader_password(conn: Connection) -> None:
    """Give llmbatch_reader the password in ``reader_database_url``, when it has one
    and we may (docker compose: password auth). Local stacks use trust: no password."""
    from psycopg import sql
    url = sa.engine.make_url(get_settings().reader_url)
    if not (url.password and url.username == "llmbatch_reader"):
        return
    may, me = conn.execute(sa.text(
        "SELECT rolsuper OR rolcreaterole, current_user FROM pg_roles WHERE rolname = current_user")).one()
    if not may:
        log.warning("cannot set llmbatch_reader's password: %s may not manage roles", me)
        return
    raw = conn.connection.driver_connection   # same transaction; no parameters, so no placeholder parsing
    raw.execute(sql.SQL("ALTER ROLE llmbatch_reader PASSWORD {}").format(sql.Literal(url.password)))
