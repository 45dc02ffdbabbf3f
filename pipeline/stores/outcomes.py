"""Finished requests in Postgres: result and attempt rows and terminal states (``write_outcomes``,
idempotent), and a job's results read back in input order (``iter_results``). Embedding vectors
go to their own table with their result row (pipeline/stores/embeddings.py).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.constants import REQUEST_ANSWERED
from pipeline.stores import embeddings
from pipeline.stores.db import dumps


def write_outcomes(conn: Connection, outcomes: list[dict], attempts: list[dict]) -> None:
    """Store finished requests: result rows, attempt rows, terminal states. Idempotent.

    ``outcomes``: ``pipeline.request.Outcome.to_row()``s: job_id, custom_id, model, status
    ('succeeded'|'failed'|'cancelled': a cancelled one, never sent, gets no result row),
    status_code, response, error, token counts, usage_missing, cost_usd, list_cost_usd, path,
    lever, savings (what each lever saved, pipeline/money/savings.py), from_cache and saved_usd (list
    price minus cost), service_tier, provider_request_id, latency_ms, attempts, ``key_alias`` (the key's alias,
    never the key; attempts carry theirs too); ``budget_period`` ('YYYY-MM-DD'), the period its
    cost was reserved in (pipeline/money/budget.py: one period per spend), by default the caps' clock's day.
    An answer given without a call (pipeline/paths/base.py ``without_call``) comes through here too.
    """
    if attempts:
        conn.execute(sa.text(
            "INSERT INTO attempts (job_id, custom_id, attempt, status_code, error, latency_ms,"
            " provider_request_id, cost_usd, key_alias)"
            " SELECT x.* FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(job_id text, custom_id text,"
            " attempt smallint, status_code int, error text, latency_ms int, provider_request_id text,"
            " cost_usd numeric, key_alias text) ON CONFLICT DO NOTHING"), {"rows": dumps(attempts)})
    if not outcomes:
        return
    # the state update reads four fields: an answer (an embedding's vectors) is not serialised twice
    rows = dumps([{k: o.get(k) for k in ("job_id", "custom_id", "status", "attempts")} for o in outcomes])
    answered, vectors = embeddings.split([o for o in outcomes if o["status"] in REQUEST_ANSWERED])
    inserted = conn.execute(sa.text(
        "INSERT INTO results (job_id, custom_id, model, status_code, response, error, input_tokens,"
        " cached_input_tokens, output_tokens, usage_missing, cost_usd, provider_request_id, latency_ms,"
        " budget_period, path, lever, list_cost_usd, service_tier, key_alias, savings, from_cache, saved_usd)"
        " SELECT x.job_id, x.custom_id, x.model, x.status_code, x.response, x.error, x.input_tokens,"
        " x.cached_input_tokens, x.output_tokens, coalesce(x.usage_missing, false), x.cost_usd,"
        " x.provider_request_id, x.latency_ms, coalesce(x.budget_period, budget_day()), x.path, x.lever,"
        " x.list_cost_usd, x.service_tier, x.key_alias, x.savings, coalesce(x.from_cache, false),"
        " coalesce(x.saved_usd, 0)"
        " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(job_id text, custom_id text, model text,"
        " status_code int, response jsonb, error jsonb, input_tokens int, cached_input_tokens int,"
        " output_tokens int, usage_missing bool, cost_usd numeric, provider_request_id text, latency_ms int,"
        " budget_period date, path text, lever text, list_cost_usd numeric, service_tier text, key_alias text,"
        " savings jsonb, from_cache bool, saved_usd numeric)"
        " ON CONFLICT DO NOTHING" + (" RETURNING job_id, custom_id" if vectors else "")), {"rows": dumps(answered)})
    if vectors:   # only the results inserted now: a replayed outcome writes no vector twice
        embeddings.write(conn, vectors, inserted.all())
    conn.execute(sa.text(
        "UPDATE requests r SET status = x.status, attempts = x.attempts, finished_at = now()"
        " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(job_id text, custom_id text, status text,"
        " attempts smallint)"
        " WHERE r.job_id = x.job_id AND r.custom_id = x.custom_id"
        " AND r.status <> ALL(llmbatch_states('request_terminal'))"), {"rows": rows})


def iter_results(conn: Connection, job_id: str, chunk: int = 2000):
    """Results of a job in input order, streamed (a server-side cursor, ``chunk`` rows a fetch).

    The cursor's transaction idles for as long as its reader pauses (a pager, a slow download)
    and holds no row lock, only its snapshot: the session's limit on idling inside a
    transaction (``db_idle_transaction_s``, there for writers' locks) is lifted for it."""
    conn.execute(sa.text("SET LOCAL idle_in_transaction_session_timeout = 0"))
    result = conn.execution_options(stream_results=True, yield_per=chunk).execute(sa.text(
        "SELECT q.custom_id, q.line, q.status, r.status_code, r.response, r.error,"
        " r.provider_request_id, r.cost_usd, q.model, r.input_tokens, r.cached_input_tokens,"
        " r.output_tokens, q.endpoint, q.body->>'encoding_format' AS encoding_format,"
        " (SELECT array_agg(e.vector ORDER BY e.idx)::text FROM embeddings e"
        "  WHERE e.job_id = q.job_id AND e.custom_id = q.custom_id) AS vectors"
        " FROM requests q LEFT JOIN results r USING (job_id, custom_id)"
        " WHERE q.job_id = :j ORDER BY q.line NULLS LAST, q.custom_id"), {"j": job_id})
    for row in result.mappings():
        row = dict(row)
        if row["vectors"]:   # the answer as the provider sent it, vectors included
            row["response"] = embeddings.attach(row["response"], embeddings.read_vectors(row["vectors"]),
                                                row["encoding_format"])
        yield row

