"""Provider batches that ended, back into the pipeline (the scheduler's step 3; steps 1–2c,
reserve, submit, recover and cancel, are schedules/pb_submit.py).

**Poll** — open provider batches are retrieved; one that ended is ingested:
answers and errors land in ``results`` / ``attempts`` / ``requests`` through
``outcomes.write_outcomes``, exactly like realtime results, with cost at the batch
discount (``pricing.cost(..., batch=True)``). Requests the provider did not
run (expired, cancelled, batch failed) are re-queued to realtime or marked
failed, as the job's ``batch_fallback`` says; those of a cancelled job are
``cancelled``. Ingestion is idempotent: a crash mid-way redoes it harmlessly.
After the commit each hold is settled to the actual cost (the difference is
freed, the spend enters the Redis counters that realtime jobs see); holds of
requests not run are released.

Read back by the custom_ids ``provider_custom_id`` gave the requests (schedules/pb_submit.py).

It must never hold a Postgres transaction open across a provider call.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from decimal import Decimal

import sqlalchemy as sa

from pipeline import errors
from pipeline.config import Settings, get_settings
from pipeline.constants import DISPATCHED_TIERS
from pipeline.ids import request_key
from pipeline.intake.batcher import dispatch
from pipeline.money import budget, holds
from pipeline.endpoints import answer_cost, endpoint_of
from pipeline.money.pricing import get_price_book
from pipeline.providers import batch_api
from pipeline.stores import batches as batch_store, db, jobs as job_store, outcomes as outcome_store
from schedules.pb_submit import budget_redis, pb_requests, provider_custom_id

log = logging.getLogger(__name__)

_TERMINAL = ("succeeded", "failed", "cancelled")


def poll_open(*, settings: Settings | None = None, engine=None, dispatcher=dispatch) -> list[str]:
    """Poll submitted provider batches due for a poll; ingest those that ended. Returns ended ids."""
    settings = settings or get_settings()
    engine = engine or db.get_engine()
    with engine.connect() as conn:
        due = conn.execute(sa.text(
            "SELECT id, provider, provider_batch_id FROM provider_batches WHERE status = 'submitted'"
            " AND (polled_at IS NULL OR polled_at < now() - make_interval(secs => :s)) ORDER BY submitted_at"),
            {"s": settings.provider_batch_poll_s}).all()
    ended = []
    for pb_id, provider, pbid in due:
        try:
            status, done, lines = asyncio.run(batch_api.poll(settings, provider, pbid))
        except Exception as e:
            log.warning("provider batch %s (%s): poll failed, will retry: %s", pb_id, pbid, e)
            continue
        if not done:
            with engine.begin() as conn:
                conn.execute(sa.text(
                    "UPDATE provider_batches SET provider_status = :st, polled_at = now() WHERE id = :id"),
                    {"id": pb_id, "st": status})
            continue
        ingest(pb_id, provider, status, lines, settings=settings, engine=engine, dispatcher=dispatcher)
        ended.append(pb_id)
    return ended


def _outcome(req: dict, provider: str, line: dict, prices) -> tuple[dict | None, dict | None, str | None]:
    """``(outcome, attempt, not_run_reason)`` for one result line."""
    attempt_no = (req["attempts"] or 0) + 1
    base = {"job_id": req["job_id"], "custom_id": req["custom_id"], "model": req["model"],
            "response": None, "error": None, "input_tokens": None, "cached_input_tokens": None,
            "output_tokens": None, "usage_missing": False, "cost_usd": "0", "provider_request_id": None,
            "latency_ms": None, "status_code": None, "attempts": attempt_no}
    attempt = {"job_id": req["job_id"], "custom_id": req["custom_id"], "attempt": attempt_no,
               "status_code": None, "error": None, "latency_ms": None, "provider_request_id": None,
               "cost_usd": "0"}
    if provider == "openai":
        resp, err = line.get("response"), line.get("error")
        if resp is None:
            return None, None, (err or {}).get("code") or "not_run"
        code, body = resp.get("status_code"), resp.get("body") or {}
        base.update(status_code=code, provider_request_id=resp.get("request_id"))
        attempt.update(status_code=code, provider_request_id=resp.get("request_id"))
        ok = code == 200
        error = None if ok else (body.get("error") or {"code": "provider_error", "message": f"status {code}"})
    else:
        result = line.get("result") or {}
        kind = result.get("type")
        if kind in ("canceled", "expired"):
            return None, None, kind
        if kind == "succeeded":
            body = result.get("message") or {}
            ok, code, error = True, 200, None
            base.update(provider_request_id=body.get("id"))
        else:
            body, ok = None, False
            error = (result.get("error") or {}).get("error") or {"type": "errored"}
            code = {"invalid_request_error": 400, "not_found_error": 404, "authentication_error": 401,
                    "permission_error": 403, "overloaded_error": 529}.get(error.get("type"), 500)
        base["status_code"] = attempt["status_code"] = code
    if not ok:
        message = error.get("message") if isinstance(error, dict) else str(error)
        base.update(status="failed", error={"code": "provider_error", "message": message,
                                            "provider_error": error})
        attempt["error"] = (message or "")[:500]
        return base, attempt, None
    # the request's endpoint reads the usage; a free answer without one (moderations) costs $0
    usage, known = answer_cost(endpoint_of(req.get("endpoint"), provider), body, prices.resolve(req["model"]),
                               batch=True)
    spent = known if known is not None else Decimal(0)
    base.update(status="succeeded", response=body, cost_usd=str(spent), usage_missing=known is None,
                input_tokens=usage.input_tokens if usage else None,
                cached_input_tokens=usage.cached_input_tokens if usage else None,
                output_tokens=usage.output_tokens if usage else None)
    attempt["cost_usd"] = str(spent)
    return base, attempt, None


def ingest(pb_id: str, provider: str, status: str, lines: list[dict], *, settings: Settings, engine,
           dispatcher=dispatch) -> dict:
    prices = get_price_book()
    requeue: list[tuple[str, str]] = []
    with engine.begin() as conn:
        reqs = pb_requests(conn, pb_id)
        by_pid = {provider_custom_id(r["job_id"], r["custom_id"]): r for r in reqs}
        outcomes, attempts, seen = [], [], set()
        counts = {"succeeded": 0, "failed": 0, "requeued": 0, "cancelled": 0, "unknown_lines": 0}
        for line in lines:
            req = by_pid.get(line.get("custom_id"))
            if req is None:
                counts["unknown_lines"] += 1
                continue
            outcome, attempt, not_run = _outcome(req, provider, line, prices)
            if outcome is not None:
                if req.get("budget_period"):   # its spend is the period of its hold (one period per spend)
                    outcome["budget_period"] = req["budget_period"]
                seen.add(line["custom_id"])
                outcomes.append(outcome)
                attempts.append(attempt)
                counts[outcome["status"]] += 1
            else:
                req["not_run"] = not_run
        outcome_store.write_outcomes(conn, outcomes, attempts)
        # requests the provider never ran (expired, cancelled, batch failed): fallback per job
        cancel, fail = [], []
        for pid, r in by_pid.items():
            if pid in seen or r["status"] in _TERMINAL:
                continue
            reason = r.get("not_run") or f"batch_{status}"
            if r["job_status"] == "cancelled":
                cancel.append(r)
            elif r["batch_fallback"] == "fail":
                fail.append({"job_id": r["job_id"], "custom_id": r["custom_id"], "model": r["model"],
                             "status": "failed", "attempts": r["attempts"] or 0, "cost_usd": "0",
                             "error": {"code": reason, "message": f"the provider batch ended ({status})"
                                                                  f" without running this request"}})
            else:
                requeue.append((r["job_id"], r["custom_id"]))
        if cancel:
            conn.execute(sa.text(
                "UPDATE requests r SET status = 'cancelled', finished_at = now()"
                " FROM jsonb_to_recordset(CAST(:k AS jsonb)) AS x(job_id text, custom_id text)"
                " WHERE r.job_id = x.job_id AND r.custom_id = x.custom_id AND r.status NOT IN"
                " ('succeeded', 'failed', 'cancelled')"),
                {"k": db.dumps([{"job_id": r["job_id"], "custom_id": r["custom_id"]} for r in cancel])})
        outcome_store.write_outcomes(conn, fail, [])
        counts.update(cancelled=len(cancel), failed=counts["failed"] + len(fail), requeued=len(requeue))
        new_batches = _requeue(conn, requeue, reqs) if requeue else []
        conn.execute(sa.text(
            "UPDATE batches SET status = 'done', finished_at = now() WHERE provider_batch = :pb"
            " AND status = 'submitted'"), {"pb": pb_id})
        conn.execute(sa.text(
            "UPDATE provider_batches SET status = 'ended', provider_status = :st, ended_at = now(),"
            " polled_at = now(), counts = CAST(:c AS jsonb) WHERE id = :id"),
            {"id": pb_id, "st": status, "c": db.dumps(counts)})
        job_store.refresh_jobs(conn, {r["job_id"] for r in reqs})
        xid = budget.commit_xid(conn)
        # settled_at stays NULL until the holds are settled: whatever stops that (Redis refusing
        # writes, a scheduler killed right after this commit), settle_unsettled finishes it
        conn.execute(sa.text("UPDATE provider_batches SET settle_xid = :x, settled_at = NULL WHERE id = :id"),
                     {"id": pb_id, "x": xid})
    _settle(pb_id, reqs, outcomes + fail, settings, engine, xid)
    for batch_id, tier, state in new_batches:
        if state == "queued":
            dispatcher(batch_id, tier)
    if new_batches:
        with engine.begin() as conn:
            batch_store.mark_dispatched(conn, [b for b, _, s in new_batches if s == "queued"])
    log.info("provider batch %s (%s) ended %s: %s", pb_id, provider, status, counts)
    return counts


def _settle(pb_id: str, reqs: list[dict], outcomes: list[dict], settings: Settings, engine, xid: str) -> bool:
    """After the results are committed: each hold becomes the request's actual cost (the rest of
    its maximum is freed); holds of requests the provider did not run are released (a re-queued
    request reserves again on its realtime path). True once every hold is settled or released
    (``provider_batches.settled_at``); else ``settle_unsettled`` tries again, next tick."""
    cost_of = {(o["job_id"], o["custom_id"]): Decimal(str(o.get("cost_usd") or 0)) for o in outcomes}
    spent = {request_key(j, c): x for (j, c), x in cost_of.items()}
    others = [request_key(r["job_id"], r["custom_id"]) for r in reqs
              if (r["job_id"], r["custom_id"]) not in cost_of and r["status"] not in _TERMINAL]
    redis = budget_redis(settings)
    try:
        # a few quick tries: settle_unsettled tries again every tick, so no tick waits long on Redis
        holds.settle_held(engine, redis, settings, spent, xid, attempts=4)
        holds.release_held(redis, others, strict=True)
    except errors.BudgetError as e:   # the results are in the ledger: settled again next tick
        log.warning("provider batch %s: settling %d holds failed (%s); tried again every tick until counted",
                    pb_id, len(spent), e)
        return False
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE provider_batches SET settled_at = now() WHERE id = :id"), {"id": pb_id})
    return True


def settle_unsettled(*, settings: Settings | None = None, engine=None) -> int:
    """Settle the holds of ended provider batches whose settle failed or never ran (the scheduler
    died after the ingest commit). Idempotent: a hold already settled or dropped by a rebuild adds
    nothing, and one the rebuild behind the counters already counted is only released
    (``settle_xid``). Re-queued requests are left alone: their realtime reservation replaces
    their hold under the same id. Returns how many provider batches it settled."""
    settings = settings or get_settings()
    engine = engine or db.get_engine()
    with engine.connect() as conn:
        due = conn.execute(sa.text(
            "SELECT id, settle_xid FROM provider_batches WHERE status = 'ended' AND settled_at IS NULL"
            " ORDER BY ended_at")).all()
    done = 0
    for pb_id, xid in due:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT r.job_id, r.custom_id, r.status, x.cost_usd FROM batches b"
                " JOIN requests r ON r.batch_id = b.batch_id"
                " LEFT JOIN results x ON x.job_id = r.job_id AND x.custom_id = r.custom_id"
                " WHERE b.provider_batch = :pb"), {"pb": pb_id}).mappings().all()
        outcomes = [{"job_id": r["job_id"], "custom_id": r["custom_id"], "cost_usd": r["cost_usd"]}
                    for r in rows if r["cost_usd"] is not None]
        # requests of the batch without a result that no one will reserve again (cancelled)
        reqs = [{"job_id": r["job_id"], "custom_id": r["custom_id"], "status": "running"}
                for r in rows if r["cost_usd"] is None and r["status"] == "cancelled"]
        if _settle(pb_id, reqs, outcomes, settings, engine, xid or ""):
            done += 1
            log.info("provider batch %s: holds settled after the ingest (%d results)", pb_id, len(outcomes))
    return done


def _requeue(conn, keys: list[tuple[str, str]], reqs: list[dict]) -> list[tuple[str, str, str]]:
    """Move requests to new realtime batches (per tier): held tiers wait for release, others dispatch."""
    tiers = {(r["job_id"], r["custom_id"]): r for r in reqs}
    by_tier: dict[str, list] = {}
    for k in keys:
        by_tier.setdefault(tiers[k]["tier"], []).append(k)
    out = []
    model = reqs[0]["model"]   # a provider batch holds one model
    provider = _provider_of(model)
    for tier, ks in by_tier.items():
        batch_id = "b_" + uuid.uuid4().hex
        state = "queued" if tier in DISPATCHED_TIERS else "held"
        conn.execute(sa.text(
            "INSERT INTO batches (batch_id, tier, provider, model, size, status, mode)"
            " VALUES (:b, :t, :p, :m, :n, :s, 'realtime')"),
            {"b": batch_id, "t": tier, "p": provider, "m": model, "n": len(ks), "s": state})
        conn.execute(sa.text(
            "UPDATE requests r SET batch_id = :b, status = :s"
            " FROM jsonb_to_recordset(CAST(:k AS jsonb)) AS x(job_id text, custom_id text)"
            " WHERE r.job_id = x.job_id AND r.custom_id = x.custom_id"),
            {"b": batch_id, "s": state, "k": db.dumps([{"job_id": j, "custom_id": c} for j, c in ks])})
        out.append((batch_id, tier, state))
    log.info("re-queued %d requests the provider batch did not run to realtime batches %s",
             len(keys), [b for b, _, _ in out])
    return out


def _provider_of(model: str) -> str:
    return get_price_book().resolve(model).provider
