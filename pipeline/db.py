"""Postgres access: the engine, migrations, and the statements every process shares.

SQLAlchemy 2.0 Core over psycopg 3. Bulk writes go through one statement per
batch (``jsonb_to_recordset``), never a row at a time. Repository functions take
a connection so callers compose transactions (a state change and a result
write commit together). Writes are idempotent on natural keys: a replayed
message or a redelivered task changes nothing that is already done.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
import logging
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline.config import ROOT, get_settings
from pipeline.constants import JOB_FINISHED
from pipeline.errors import InfrastructureError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = ROOT / "sql"


@functools.cache
def get_engine(url: str | None = None) -> Engine:
    """One engine (and pool) per process."""
    return sa.create_engine(url or get_settings().sqlalchemy_url, pool_size=5, max_overflow=10,
                            pool_pre_ping=True, future=True)


def dumps(value) -> str:
    """JSON for jsonb parameters; Decimals keep their exact text."""
    return json.dumps(value, separators=(",", ":"), default=_json_default, ensure_ascii=False)


def _json_default(o):
    if isinstance(o, Decimal):
        return str(o)
    if hasattr(o, "isoformat"):
        return o.isoformat()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def transaction(engine: Engine, patience_s: float = 60.0):
    """``engine.begin()`` that waits out a short Postgres outage (a restart) when connecting.

    Only the connect is retried, never a statement: the block runs once.
    """
    started = time.monotonic()
    deadline = started + patience_s
    waiting = False
    while True:
        try:
            conn = engine.connect()
            break
        except sa.exc.OperationalError as e:
            if time.monotonic() > deadline:
                raise InfrastructureError(f"cannot reach Postgres: {e.orig}") from e
            if not waiting:   # one line per state change, not one per attempt
                log.warning("waiting for Postgres (up to %.0f s): %s", patience_s, str(e.orig).strip())
                waiting = True
            else:
                log.debug("Postgres still unreachable: %s", e.orig)
            time.sleep(1.0)
    if waiting:
        log.warning("Postgres reachable again after %.0f s", time.monotonic() - started)
    with conn, conn.begin():
        yield conn


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


def retrying(engine: Engine, work, *, what: str, patience_s: float | None = None, sleep=time.sleep):
    """``work(conn)`` in one transaction, tried again on a transient error until it commits.

    A deadlock victim, a serialization failure and a Postgres outage are waited
    out with backoff (a log line when it starts failing and one when it is
    through, not one per try). ``patience_s``: give up after that long and raise
    the last error (None: never). Other errors are raised at once. ``work``
    must be safe to run again (every statement here is).
    """
    started, delay, failing = time.monotonic(), RETRY_FIRST_S, None
    while True:
        try:
            with engine.begin() as conn:
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


def upgrade(engine: Engine | None = None) -> list[str]:
    """Apply migrations not yet applied, each in its own transaction. Idempotent.

    An advisory lock keeps two concurrent upgrades from racing.
    """
    engine = engine or get_engine()
    applied_now = []
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(727001)"))
            conn.execute(sa.text(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"))
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


# ---------------------------------------------------------------- jobs

def create_job(conn: Connection, job_id: str, *, name: str | None, source: str | None,
               priority: int | None, tier: str | None, budget_usd: Decimal | None,
               on_budget: str, mode: str, simulated: bool, fallback_model: str | None = None,
               producer: str | None = None) -> None:
    """A job row; ``producer`` is the Kafka user whose messages it takes (sql/013_job_producer.sql)."""
    conn.execute(sa.text(
        "INSERT INTO jobs (job_id, name, source, priority, tier, budget_usd, on_budget, mode, simulated,"
        " fallback_model, producer)"
        " VALUES (:job_id, :name, :source, :priority, :tier, :budget_usd, :on_budget, :mode, :simulated,"
        " :fallback_model, :producer) ON CONFLICT (job_id) DO NOTHING"),
        dict(job_id=job_id, name=name, source=source, priority=priority, tier=tier,
             budget_usd=budget_usd, on_budget=on_budget, mode=mode, simulated=simulated,
             fallback_model=fallback_model, producer=producer))


def record_rejections(conn: Connection, job_id: str, rejections: list[dict]) -> None:
    """Store rejected lines (``line``, ``custom_id``, ``reason``); idempotent."""
    if not rejections:
        return
    conn.execute(sa.text(
        "INSERT INTO rejections (job_id, line, custom_id, reason)"
        " SELECT :job_id, x.line, x.custom_id, x.reason"
        " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(line int, custom_id text, reason text)"
        " ON CONFLICT DO NOTHING"), {"job_id": job_id, "rows": dumps(rejections)})


def finish_submit(conn: Connection, job_id: str, *, lines_read: int, accepted: int, rejected: int) -> None:
    """Submit is over: the job's counts are final and it can complete."""
    conn.execute(sa.text(
        "UPDATE jobs SET lines_read = :lines_read, accepted = :accepted, rejected = :rejected,"
        " status = CASE WHEN status = 'submitting' THEN 'running' ELSE status END,"
        " submitted_at = now() WHERE job_id = :job_id"),
        dict(job_id=job_id, lines_read=lines_read, accepted=accepted, rejected=rejected))
    refresh_jobs(conn, [job_id])


def refresh_jobs(conn: Connection, job_ids) -> None:
    """End running jobs once every accepted request is terminal, with their outcome:

    * ``completed``: every request succeeded (and, if lines were rejected, at least one ran),
      and no accepted line was refused by the batcher (``jobs.refused``, schedules/upkeep.py);
    * ``failed``: none succeeded;
    * ``completed_with_errors``: some succeeded, some failed or were cancelled.

    Cheap when work remains: the partial index on open requests answers the
    NOT EXISTS; the counts run only when nothing is open.
    """
    ids = sorted(set(job_ids))
    if not ids:
        return
    completed = conn.execute(sa.text(
        "WITH ended AS (SELECT j.job_id FROM jobs j WHERE j.job_id = ANY(:ids) AND j.status = 'running'"
        "   AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.job_id = j.job_id"
        "                   AND r.status NOT IN ('succeeded', 'failed', 'cancelled'))),"
        " c AS (SELECT r.job_id, count(*) AS n, count(*) FILTER (WHERE r.status = 'succeeded') AS ok,"
        "   count(*) FILTER (WHERE r.status <> 'succeeded') AS bad"
        "   FROM requests r WHERE r.job_id IN (SELECT job_id FROM ended) GROUP BY r.job_id)"
        " UPDATE jobs j SET finished_at = now(), status = CASE"
        "   WHEN coalesce(c.bad, 0) = 0 AND j.refused = 0 AND (coalesce(c.ok, 0) > 0 OR j.rejected = 0)"
        "     THEN 'completed'"
        "   WHEN coalesce(c.ok, 0) = 0 THEN 'failed' ELSE 'completed_with_errors' END"
        " FROM ended e LEFT JOIN c ON c.job_id = e.job_id"
        " WHERE j.job_id = e.job_id AND j.status = 'running' AND coalesce(c.n, 0) + j.refused >= j.accepted"
        " RETURNING j.job_id"), {"ids": ids}).scalars().all()
    if completed:
        # A worker killed after its last result but before closing its batch leaves the
        # batch 'running' until its lease runs out; with nothing open in it, close it now.
        # SKIP LOCKED: a batch another transaction holds is theirs to close (lock order, above).
        conn.execute(sa.text(
            "UPDATE batches b SET status = 'done', finished_at = now(), lease_until = NULL"
            " WHERE b.batch_id IN (SELECT x.batch_id FROM batches x WHERE x.batch_id IN"
            "   (SELECT DISTINCT batch_id FROM requests WHERE job_id = ANY(:ids))"
            "   AND x.status IN ('queued', 'dispatched', 'running') AND x.mode = 'realtime'"
            "   FOR UPDATE SKIP LOCKED)"
            " AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.batch_id = b.batch_id"
            "                 AND r.status NOT IN ('succeeded', 'failed', 'cancelled'))"), {"ids": completed})
    # stopped by its own cap: nothing left but requests deferred by it (pipeline/budget.py);
    # ``budget set --job`` puts it back to running
    conn.execute(sa.text(
        "UPDATE jobs j SET status = 'paused_budget'"
        " WHERE j.job_id = ANY(:ids) AND j.status = 'running'"
        " AND EXISTS (SELECT 1 FROM requests r WHERE r.job_id = j.job_id AND r.status = 'deferred'"
        "             AND r.deferred_scope = 'job')"
        " AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.job_id = j.job_id"
        "                 AND r.status NOT IN ('succeeded', 'failed', 'cancelled', 'deferred'))"
        " AND (SELECT count(*) FROM requests r WHERE r.job_id = j.job_id) + j.refused >= j.accepted"),
        {"ids": ids})


def job_status(conn: Connection, job_id: str) -> dict | None:
    """The object ``status --json`` prints."""
    row = conn.execute(sa.text(
        "SELECT job_id, status, simulated, lines_read, accepted, rejected,"
        " succeeded, failed, cancelled, pending, cost_usd, created_at, finished_at, refused"
        " FROM job_summary WHERE job_id = :j"), {"j": job_id}).mappings().first()
    if row is None:
        return None
    tiers = dict(conn.execute(sa.text(
        "SELECT tier, count(*) FROM requests WHERE job_id = :j GROUP BY tier"), {"j": job_id}).all())
    cached, saved = conn.execute(sa.text(
        "SELECT count(*), coalesce(sum(saved_usd), 0) FROM results WHERE job_id = :j AND from_cache"),
        {"j": job_id}).one()
    cap, on_budget, fallback, deferred = conn.execute(sa.text(
        "SELECT budget_usd, on_budget, fallback_model, (SELECT count(*) FROM requests r"
        " WHERE r.job_id = j.job_id AND r.status = 'deferred') FROM jobs j WHERE job_id = :j"),
        {"j": job_id}).one()
    # calls that got no answer and may have been billed: spent at their maximum, apart from cost_usd
    unconfirmed_calls, unconfirmed = conn.execute(sa.text(
        "SELECT count(*), coalesce(sum(max_cost_usd), 0) FROM provider_calls"
        " WHERE job_id = :j AND state = 'unconfirmed'"), {"j": job_id}).one()
    by_fallback = conn.execute(sa.text(
        "SELECT count(*) FROM results x JOIN requests r USING (job_id, custom_id)"
        " WHERE x.job_id = :j AND x.model <> r.model"), {"j": job_id}).scalar() if fallback else 0
    return {
        "job_id": row["job_id"],
        "status": row["status"],
        "provider": "simulator" if row["simulated"] else "live",
        "counts": {
            "total": row["lines_read"], "accepted": row["accepted"], "rejected": row["rejected"],
            "succeeded": row["succeeded"], "failed": row["failed"], "cancelled": row["cancelled"],
            "pending": row["pending"], "cached": cached,
            # accepted lines whose messages the batcher refused (llm.requests.dlq)
            "refused": row["refused"],
        },
        "tiers": tiers,
        "cost_usd": str(row["cost_usd"]),
        "unconfirmed_usd": str(unconfirmed), "unconfirmed_calls": unconfirmed_calls,
        "cache_saved_usd": str(saved),
        # deferred requests are also counted in pending (pipeline/budget.py)
        "budget": {"cap_usd": str(cap) if cap is not None else None, "on_budget": on_budget,
                   "deferred": deferred, "fallback_model": fallback, "answered_by_fallback": by_fallback},
        "created_at": row["created_at"].isoformat(),
        "finished_at": row["finished_at"].isoformat() if row["finished_at"] else None,
    }


# ---------------------------------------------------------------- batches

_REQUEST_COLUMNS = (
    "job_id text, custom_id text, line int, batch_id text, provider text, model text,"
    " tier text, tier_reason text, priority smallint, deadline timestamptz, body jsonb,"
    " metadata jsonb, input_tokens int, tokens_exact bool, max_cost_usd numeric,"
    " status text, published_at timestamptz, cache_key text")


def admit_requests(conn: Connection, requests: list[dict]) -> tuple[list[dict], dict[tuple, str]]:
    """The requests a job may still take, and why the others are refused.

    A new job is created ``running``, owned by the producer of its first message
    (``producer``: the Kafka user that signed it, pipeline/intake/kafka.py). A request is
    refused when its job was cancelled, when another producer owns the job, or
    when the job is finished (``JOB_FINISHED``) and came from a submit, whose
    intake is closed: such a job's counts, cost and state never change after it
    ends, and nobody puts work into a job that is not theirs. A job a service
    streams into with ``publish_request`` has no end of intake: its owner's new
    request makes it ``running`` again. A request
    already stored (a replayed message) is never refused: writing it again is a no-op.

    Returns (admitted requests, {(job_id, custom_id, producer): reason}). Takes the jobs'
    rows FOR SHARE, so a job cannot end or be cancelled before the caller's
    transaction (which writes the admitted requests) commits.
    """
    if not requests:
        return requests, {}
    owners: dict[str, str] = {}
    for r in requests:
        owners.setdefault(r["job_id"], r.get("producer"))
    ids = sorted(owners)
    conn.execute(sa.text(
        "INSERT INTO jobs (job_id, status, producer)"
        " SELECT x.j, 'running', x.p FROM unnest(CAST(:ids AS text[]), CAST(:producers AS text[])) AS x(j, p)"
        " ON CONFLICT DO NOTHING"), {"ids": ids, "producers": [owners[j] for j in ids]})
    jobs = {j: (status, owner, stream) for j, status, owner, stream in conn.execute(sa.text(
        "SELECT job_id, status, producer, submitted_at IS NULL AND source IS NULL FROM jobs"
        " WHERE job_id = ANY(:ids) ORDER BY job_id FOR SHARE"), {"ids": ids}).all()}
    refused: dict[tuple, str] = {}
    reopen: set[str] = set()
    for r in requests:
        job, producer = r["job_id"], r.get("producer")
        status, owner, stream = jobs[job]
        if status == "cancelled":
            refused[(job, producer)] = f"job {job} was cancelled: it takes no new request"
        elif owner != producer:
            refused[(job, producer)] = (f"job {job} belongs to producer {owner!r}: a message from"
                                        f" {producer!r} cannot add to it")
        elif status in JOB_FINISHED and not stream:
            refused[(job, producer)] = f"job {job} is finished ({status}): it takes no new request"
        elif status in JOB_FINISHED:
            reopen.add(job)
    if not refused and not reopen:
        return requests, {}
    stored = set(conn.execute(sa.text(
        "SELECT r.job_id, r.custom_id FROM requests r"
        " JOIN jsonb_to_recordset(CAST(:keys AS jsonb)) AS x(job_id text, custom_id text)"
        " ON r.job_id = x.job_id AND r.custom_id = x.custom_id"),
        {"keys": dumps([{"job_id": r["job_id"], "custom_id": r["custom_id"]} for r in requests
                        if (r["job_id"], r.get("producer")) in refused or r["job_id"] in reopen])}).all())
    reopen = {r["job_id"] for r in requests if r["job_id"] in reopen and (r["job_id"], r["custom_id"]) not in stored}
    if reopen:
        # a service's stream (publish_request; no submit closed its intake) is done whenever its
        # requests so far are; a new one from its owner (not a replay) makes it running again,
        # never a 'completed' job with a request still to run
        conn.execute(sa.text("UPDATE jobs SET status = 'running', finished_at = NULL"
                             " WHERE job_id = ANY(:ids) AND status = ANY(:ended)"),
                     {"ids": sorted(reopen), "ended": list(JOB_FINISHED)})
    admitted, out = [], {}
    for r in requests:
        reason = refused.get((r["job_id"], r.get("producer")))
        if reason is None or (r["job_id"], r["custom_id"]) in stored:
            admitted.append(r)
        else:
            out[(r["job_id"], r["custom_id"], r.get("producer"))] = reason
    return admitted, out


def write_batches(conn: Connection, requests: list[dict], batches: list[dict],
                  cached: list[dict] = ()) -> dict[str, int]:
    """Insert requests and their batches in one go; returns new requests per batch.

    Requests already present (a replayed message) are skipped by the natural
    key and do not count; a batch left with no new request is not written.
    ``cached`` are result rows for requests answered from the cache (their
    request rows are in ``requests`` with no batch); they are written only for
    requests inserted now, so a replay never adds a second answer. Requests of a
    cancelled job are written ``cancelled``, in no batch (and get no cached answer).
    """
    jobs = sorted({r["job_id"] for r in requests})
    conn.execute(sa.text(
        "INSERT INTO jobs (job_id, status) SELECT unnest(CAST(:ids AS text[])), 'running'"
        " ON CONFLICT DO NOTHING"), {"ids": jobs})
    # FOR SHARE: a cancel (UPDATE jobs, then its requests) either committed before, and we
    # see it here, or waits for this transaction and then cancels the rows written now
    cancelled = set(conn.execute(sa.text(
        "SELECT job_id, status FROM jobs WHERE job_id = ANY(:ids) ORDER BY job_id FOR SHARE"),
        {"ids": jobs}).all())
    cancelled = {j for j, status in cancelled if status == "cancelled"}
    if cancelled:   # a cancelled job's requests are written terminal, in no batch, never run
        requests = [dict(r, status="cancelled", batch_id=None) if r["job_id"] in cancelled else r
                    for r in requests]
    inserted = conn.execute(sa.text(
        f"INSERT INTO requests (job_id, custom_id, line, batch_id, provider, model, tier, tier_reason,"
        f" priority, deadline, body, metadata, input_tokens, tokens_exact, max_cost_usd, status,"
        f" published_at, cache_key)"
        f" SELECT x.* FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x({_REQUEST_COLUMNS})"
        f" ON CONFLICT (job_id, custom_id) DO NOTHING RETURNING job_id, custom_id, batch_id, status"),
        {"rows": dumps(requests)}).all()
    counts: dict[str, int] = {}
    for _, _, batch_id, _ in inserted:
        if batch_id is not None:
            counts[batch_id] = counts.get(batch_id, 0) + 1
    if cancelled:
        conn.execute(sa.text(
            "UPDATE requests SET finished_at = now() WHERE job_id = ANY(:ids) AND status = 'cancelled'"
            " AND finished_at IS NULL"), {"ids": sorted(cancelled)})
    kept = [dict(b, size=counts[b["batch_id"]]) for b in batches if counts.get(b["batch_id"])]
    if kept:
        conn.execute(sa.text(
            "INSERT INTO batches (batch_id, tier, provider, model, size, status)"
            " SELECT x.* FROM jsonb_to_recordset(CAST(:rows AS jsonb))"
            " AS x(batch_id text, tier text, provider text, model text, size int, status text)"),
            {"rows": dumps(kept)})
    if cached:
        new = {(j, c) for j, c, b, status in inserted if status == "succeeded"}
        hits = [r for r in cached if (r["job_id"], r["custom_id"]) in new]
        if hits:
            conn.execute(sa.text(
                "INSERT INTO results (job_id, custom_id, model, status_code, response, input_tokens,"
                " cached_input_tokens, output_tokens, cost_usd, provider_request_id, latency_ms,"
                " from_cache, saved_usd)"
                " SELECT x.job_id, x.custom_id, x.model, 200, x.response, x.input_tokens,"
                " x.cached_input_tokens, x.output_tokens, 0, x.provider_request_id, 0, true, x.saved_usd"
                " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(job_id text, custom_id text,"
                " model text, response jsonb, input_tokens int, cached_input_tokens int, output_tokens int,"
                " provider_request_id text, saved_usd numeric)"
                " ON CONFLICT DO NOTHING"), {"rows": dumps(hits)})
            conn.execute(sa.text(
                "UPDATE requests r SET finished_at = now(), started_at = now()"
                " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(job_id text, custom_id text)"
                " WHERE r.job_id = x.job_id AND r.custom_id = x.custom_id"), {"rows": dumps(hits)})
            refresh_jobs(conn, {r["job_id"] for r in hits})
    return counts


def mark_provider_batch_mode(conn: Connection, batch_ids: list[str]) -> None:
    """Label held batches for a provider Batch API (sql/003_schedules.sql); the scheduler sends them."""
    if batch_ids:
        conn.execute(sa.text("UPDATE batches SET mode = 'provider_batch' WHERE batch_id = ANY(:ids)"),
                     {"ids": batch_ids})


def mark_dispatched(conn: Connection, batch_ids: list[str]) -> None:
    conn.execute(sa.text(
        "UPDATE batches SET status = 'dispatched', dispatched_at = now()"
        " WHERE batch_id = ANY(:ids) AND status = 'queued'"), {"ids": batch_ids})


def undispatched_batches(conn: Connection, older_than_s: float) -> list[tuple[str, str]]:
    """Batches written but never handed to Celery, or whose worker lease ran out."""
    return conn.execute(sa.text(
        "SELECT batch_id, tier FROM batches"
        " WHERE (status = 'queued' AND created_at < now() - make_interval(secs => :age))"
        "    OR (status = 'running' AND lease_until < now() - make_interval(secs => :age))"
        " ORDER BY created_at LIMIT 1000"), {"age": older_than_s}).all()


def dispatched_batches(conn: Connection) -> list[tuple[str, str]]:
    """Batches handed to Celery that no worker has taken yet."""
    return conn.execute(sa.text(
        "SELECT batch_id, tier FROM batches WHERE status = 'dispatched' ORDER BY created_at")).all()


def _take_lease(conn: Connection, where: str, params: dict) -> dict | None:
    """Lease the batch ``where`` picks to ``params["owner"]`` for ``params["lease"]`` seconds.

    ``crashes`` grows only when the batch is still ``running``: its previous holder
    neither finished it, deferred it nor handed it back (a dead worker, a lost lease,
    a batch that raised). A new batch, a budget resume or a clean re-dispatch is
    ``queued``/``dispatched`` and counts nothing; ``deliveries`` counts every claim.
    """
    row = conn.execute(sa.text(
        "UPDATE batches SET lease_owner = :owner,"
        " lease_until = now() + make_interval(secs => :lease), deliveries = deliveries + 1,"
        " crashes = crashes + CASE WHEN status = 'running' THEN 1 ELSE 0 END,"
        " status = 'running', started_at = coalesce(started_at, now())"
        f" WHERE {where} RETURNING batch_id, tier, provider, model, deliveries, crashes, last_failure"),
        params).mappings().first()
    return dict(row) if row else None


def claim_batch(conn: Connection, batch_id: str, owner: str, lease_s: float) -> dict | None:
    """Take the batch's lease, or None if another live worker holds it or it is done.

    A redelivered Celery task keeps its task id, so it can take back its own lease
    (a crash: its worker died before it finished).
    """
    return _take_lease(conn, "batch_id = :b AND (status IN ('queued', 'dispatched')"
                             " OR (status = 'running' AND (lease_until < now() OR lease_owner = :owner)))",
                       {"b": batch_id, "owner": owner, "lease": lease_s})


def claim_next_batch(conn: Connection, tier: str, owner: str, lease_s: float) -> dict | None:
    """Take the lease of the tier's oldest dispatched batch no worker has started, or None.

    For a worker whose batch has nothing left to start (workers/execute.py): the
    batch's own Celery task then finds the lease held and does nothing.
    """
    return _take_lease(conn, "batch_id = (SELECT batch_id FROM batches WHERE tier = :tier"
                             " AND status = 'dispatched' AND mode = 'realtime'"
                             " ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)",
                       {"tier": tier, "owner": owner, "lease": lease_s})


def renew_lease(conn: Connection, batch_id: str, owner: str, lease_s: float) -> bool:
    """Extend the lease; False when it is not ours any more (another owner, or the batch ended)."""
    return bool(conn.execute(sa.text(
        "UPDATE batches SET lease_until = now() + make_interval(secs => :lease)"
        " WHERE batch_id = :b AND lease_owner = :owner AND status = 'running'"),
        {"b": batch_id, "owner": owner, "lease": lease_s}).rowcount)


def release_lease(conn: Connection, batch_id: str, owner: str, reason: str | None = None) -> None:
    """End a lease early (the batch raised): the sweep may hand the batch out again.

    The batch stays ``running``, so the next claim counts a crash; ``reason`` is
    kept for the poison message.
    """
    conn.execute(sa.text(
        "UPDATE batches SET lease_until = now() - make_interval(secs => 3600),"
        " last_failure = coalesce(CAST(:r AS text), last_failure)"
        " WHERE batch_id = :b AND lease_owner = :owner AND status = 'running'"),
        {"b": batch_id, "owner": owner, "r": reason})


def lock_batch(conn: Connection, batch_id: str) -> None:
    """The first lock of a worker's write to a batch's requests (lock order, above)."""
    conn.execute(sa.text("SELECT 1 FROM batches WHERE batch_id = :b FOR SHARE"), {"b": batch_id})


def lock_job_batches(conn: Connection, job_id: str) -> list[str]:
    """Lock every batch holding a request of the job, in batch_id order (lock order, above)."""
    return conn.execute(sa.text(
        "SELECT batch_id FROM batches WHERE batch_id IN"
        " (SELECT DISTINCT batch_id FROM requests WHERE job_id = :j AND batch_id IS NOT NULL)"
        " ORDER BY batch_id FOR UPDATE"), {"j": job_id}).scalars().all()


def cancelled_jobs(conn: Connection, job_ids) -> set[str]:
    """Which of these jobs are cancelled (a worker asks before each provider call)."""
    ids = sorted(set(job_ids))
    if not ids:
        return set()
    return set(conn.execute(sa.text(
        "SELECT job_id FROM jobs WHERE job_id = ANY(:ids) AND status = 'cancelled'"), {"ids": ids}).scalars())


def open_requests(conn: Connection, batch_id: str) -> list[dict]:
    """The batch's requests not yet finished, marked running; those of a cancelled job
    become ``cancelled`` here and are not returned."""
    conn.execute(sa.text(
        "UPDATE requests r SET status = 'cancelled', finished_at = now()"
        " WHERE r.batch_id = :b AND r.status NOT IN ('succeeded', 'failed', 'cancelled')"
        " AND EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = r.job_id AND j.status = 'cancelled')"),
        {"b": batch_id})
    rows = conn.execute(sa.text(
        "UPDATE requests r SET status = 'running', started_at = coalesce(started_at, now())"
        " WHERE batch_id = :b AND status NOT IN ('succeeded', 'failed', 'cancelled')"
        " RETURNING job_id, custom_id, provider, model, tier, body, input_tokens, max_cost_usd, cache_key,"
        " (SELECT j.on_budget FROM jobs j WHERE j.job_id = r.job_id) AS on_budget,"
        " (SELECT j.fallback_model FROM jobs j WHERE j.job_id = r.job_id) AS fallback_model,"
        " greatest(r.attempts, coalesce((SELECT max(a.attempt) FROM attempts a"
        "   WHERE a.job_id = r.job_id AND a.custom_id = r.custom_id), 0)) AS attempts"),
        {"b": batch_id}).mappings().all()
    return [dict(r) for r in rows]


def finish_batch(conn: Connection, batch_id: str, owner: str | None = None) -> bool:
    """Mark the batch done: only while ``owner`` (when given) holds its lease, and only when
    none of its requests is still open (an unwritten outcome keeps a batch from ending).
    True when the batch is done."""
    if owner is not None:
        holder = conn.execute(sa.text("SELECT lease_owner, status FROM batches WHERE batch_id = :b FOR UPDATE"),
                              {"b": batch_id}).first()
        if holder is None or holder.status == "done":
            return holder is not None
        if holder.lease_owner != owner:
            return False
    return bool(conn.execute(sa.text(
        "UPDATE batches SET status = 'done', finished_at = now(), lease_until = NULL"
        " WHERE batch_id = :b AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.batch_id = :b"
        "   AND r.status NOT IN ('succeeded', 'failed', 'cancelled'))"), {"b": batch_id}).rowcount)


def write_outcomes(conn: Connection, outcomes: list[dict], attempts: list[dict]) -> None:
    """Store finished requests: result rows, attempt rows, terminal states. Idempotent.

    ``outcomes``: job_id, custom_id, model, status ('succeeded'|'failed'|'cancelled':
    a cancelled one, never sent, gets no result row),
    status_code, response, error, token counts, usage_missing, cost_usd,
    provider_request_id, latency_ms, attempts; ``budget_period`` ('YYYY-MM-DD'), the period its
    cost was reserved in (pipeline/budget.py: one period per spend), by default the caps' clock's day.
    """
    if attempts:
        conn.execute(sa.text(
            "INSERT INTO attempts (job_id, custom_id, attempt, status_code, error, latency_ms,"
            " provider_request_id, cost_usd)"
            " SELECT x.* FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(job_id text, custom_id text,"
            " attempt smallint, status_code int, error text, latency_ms int, provider_request_id text,"
            " cost_usd numeric) ON CONFLICT DO NOTHING"), {"rows": dumps(attempts)})
    if not outcomes:
        return
    rows = dumps(outcomes)
    answered = [o for o in outcomes if o["status"] in ("succeeded", "failed")]
    conn.execute(sa.text(
        "INSERT INTO results (job_id, custom_id, model, status_code, response, error, input_tokens,"
        " cached_input_tokens, output_tokens, usage_missing, cost_usd, provider_request_id, latency_ms,"
        " budget_period)"
        " SELECT x.job_id, x.custom_id, x.model, x.status_code, x.response, x.error, x.input_tokens,"
        " x.cached_input_tokens, x.output_tokens, coalesce(x.usage_missing, false), x.cost_usd,"
        " x.provider_request_id, x.latency_ms, coalesce(x.budget_period, budget_day())"
        " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(job_id text, custom_id text, model text,"
        " status_code int, response jsonb, error jsonb, input_tokens int, cached_input_tokens int,"
        " output_tokens int, usage_missing bool, cost_usd numeric, provider_request_id text, latency_ms int,"
        " budget_period date)"
        " ON CONFLICT DO NOTHING"), {"rows": dumps(answered)})
    conn.execute(sa.text(
        "UPDATE requests r SET status = x.status, attempts = x.attempts, finished_at = now()"
        " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(job_id text, custom_id text, status text,"
        " attempts smallint)"
        " WHERE r.job_id = x.job_id AND r.custom_id = x.custom_id"
        " AND r.status NOT IN ('succeeded', 'failed', 'cancelled')"), {"rows": rows})


def iter_results(conn: Connection, job_id: str, chunk: int = 2000):
    """Results of a job in input order, streamed."""
    result = conn.execution_options(stream_results=True, yield_per=chunk).execute(sa.text(
        "SELECT q.custom_id, q.line, q.status, r.status_code, r.response, r.error,"
        " r.provider_request_id, r.cost_usd, q.model, r.input_tokens, r.cached_input_tokens,"
        " r.output_tokens"
        " FROM requests q LEFT JOIN results r USING (job_id, custom_id)"
        " WHERE q.job_id = :j ORDER BY q.line NULLS LAST, q.custom_id"), {"j": job_id})
    for row in result.mappings():
        yield dict(row)

