"""Batches and their requests in Postgres: admitting requests, writing batches, marking them,
the workers' leases and claims, a batch's open requests, and its end.

Lock order, for every writer: a job's batches (in batch_id order), then their requests, then
the job; a worker's claim takes the batch before its requests, so the two never deadlock.
Functions take a connection so callers compose transactions.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.constants import JOB_FINISHED
from pipeline.stores.db import dumps
from pipeline.stores.jobs import refresh_jobs
from pipeline.stores.outcomes import write_outcomes


_REQUEST_COLUMNS = (
    "job_id text, custom_id text, line int, batch_id text, provider text, model text,"
    " tier text, tier_reason text, priority smallint, deadline timestamptz, body jsonb,"
    " metadata jsonb, input_tokens int, tokens_exact bool, max_cost_usd numeric,"
    " status text, published_at timestamptz, cache_key text, endpoint text, path_reason text")


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
                             " WHERE job_id = ANY(:ids) AND status = ANY(llmbatch_states('job_finished'))"),
                     {"ids": sorted(reopen)})
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

    ``requests`` are what ``admit_requests`` admitted, in this same transaction: it made their
    jobs and holds them FOR SHARE, so none of them is cancelled or ends before the commit (a
    cancel waits for it and then cancels the rows written now).

    Requests already present (a replayed message) are skipped by the natural
    key and do not count; a batch left with no new request is not written.
    ``cached`` are result rows for requests answered from the cache (their
    request rows are in ``requests`` with no batch; ``Outcome.to_row()``s of
    ``pipeline.paths.base.without_call``: cost 0, their list price saved), through the one outcome
    write (pipeline/stores/outcomes.py); they are written only for
    requests inserted now, so a replay never adds a second answer.
    """
    inserted = conn.execute(sa.text(
        f"INSERT INTO requests (job_id, custom_id, line, batch_id, provider, model, tier, tier_reason,"
        f" priority, deadline, body, metadata, input_tokens, tokens_exact, max_cost_usd, status,"
        f" published_at, cache_key, endpoint, path_reason)"
        f" SELECT x.* FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x({_REQUEST_COLUMNS})"
        f" ON CONFLICT (job_id, custom_id) DO NOTHING RETURNING job_id, custom_id, batch_id, status"),
        {"rows": dumps(requests)}).all()
    counts: dict[str, int] = {}
    for _, _, batch_id, _ in inserted:
        if batch_id is not None:
            counts[batch_id] = counts.get(batch_id, 0) + 1
    kept = [dict(b, size=counts[b["batch_id"]]) for b in batches if counts.get(b["batch_id"])]
    if kept:
        conn.execute(sa.text(
            "INSERT INTO batches (batch_id, tier, provider, model, size, status, mode)"
            " SELECT x.batch_id, x.tier, x.provider, x.model, x.size, x.status, coalesce(x.mode, 'realtime')"
            " FROM jsonb_to_recordset(CAST(:rows AS jsonb))"
            " AS x(batch_id text, tier text, provider text, model text, size int, status text, mode text)"),
            {"rows": dumps(kept)})
    if cached:
        new = {(j, c) for j, c, b, status in inserted if status == "succeeded"}
        hits = [r for r in cached if (r["job_id"], r["custom_id"]) in new]
        if hits:
            # one outcome write, vectors and all; nothing spent, the whole list cost saved (without_call)
            write_outcomes(conn, [dict(r, status_code=200, latency_ms=0, from_cache=True,
                                       saved_usd=r["list_cost_usd"]) for r in hits], [])
            conn.execute(sa.text(   # written 'succeeded' above: the outcome write leaves their state alone
                "UPDATE requests r SET finished_at = now(), started_at = now()"
                " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(job_id text, custom_id text)"
                " WHERE r.job_id = x.job_id AND r.custom_id = x.custom_id"),
                {"rows": dumps([{"job_id": r["job_id"], "custom_id": r["custom_id"]} for r in hits])})
            refresh_jobs(conn, {r["job_id"] for r in hits})
    return counts


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
    return _take_lease(conn, "batch_id = :b AND (status = ANY(llmbatch_states('batch_released'))"
                             " OR (status = 'running' AND (lease_until < now() OR lease_owner = :owner)))",
                       {"b": batch_id, "owner": owner, "lease": lease_s})


def claim_next_batch(conn: Connection, tier: str, owner: str, lease_s: float) -> dict | None:
    """Take the lease of the tier's oldest dispatched batch no worker has started, or None.

    For a worker whose batch has nothing left to start (workers/execute.py): the
    batch's own Celery task then finds the lease held and does nothing.
    """
    # only batches our workers run are ever 'dispatched' (a provider batch's are 'submitted')
    return _take_lease(conn, "batch_id = (SELECT batch_id FROM batches WHERE tier = :tier"
                             " AND status = 'dispatched'"
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


def open_requests(conn: Connection, batch_id: str) -> list[dict]:
    """The batch's requests not yet finished, marked running; those of a cancelled job
    become ``cancelled`` here and are not returned."""
    conn.execute(sa.text(
        "UPDATE requests r SET status = 'cancelled', finished_at = now()"
        " WHERE r.batch_id = :b AND r.status <> ALL(llmbatch_states('request_terminal'))"
        " AND EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = r.job_id AND j.status = 'cancelled')"),
        {"b": batch_id})
    rows = conn.execute(sa.text(
        "UPDATE requests r SET status = 'running', started_at = coalesce(started_at, now())"
        " WHERE batch_id = :b AND status <> ALL(llmbatch_states('request_terminal'))"
        " RETURNING job_id, custom_id, line, batch_id, provider, model, endpoint, tier, tier_reason, priority,"
        " deadline, body, metadata, input_tokens, tokens_exact, max_cost_usd, cache_key,"
        " budget_period::text AS budget_period,"
        " (SELECT b.mode FROM batches b WHERE b.batch_id = r.batch_id) AS path,"
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
        "   AND r.status <> ALL(llmbatch_states('request_terminal')))"), {"b": batch_id}).rowcount)


