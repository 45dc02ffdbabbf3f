"""Provider batches that ended, back into the pipeline (the scheduler's step 3; steps 1–2c,
reserve, submit, recover and cancel, are schedules/pb_submit.py).

**Poll** — open provider batches are retrieved; one that ended is ingested:
answers and errors become ``Outcome``s at the path's price (pipeline/paths/provider_batch.py
``outcome_of_line``) and land in ``results`` / ``attempts`` / ``requests`` through the
sequence's write step, exactly like realtime results. Requests the provider did not
run (expired, cancelled, batch failed) are re-queued to realtime or marked
failed, as the job's ``batch_fallback`` says; those of a cancelled job are
``cancelled``. Ingestion is idempotent: a crash mid-way redoes it harmlessly.
After the commit each hold is settled to the actual cost (the difference is
freed, the spend enters the Redis counters that realtime jobs see); holds of
requests not run are released: through the workers' async ``Budget``, on the
scheduler's one event loop (schedules/loop.py).

Read back by the custom_ids ``provider_custom_id`` gave the requests (pipeline/paths/provider_batch.py).
A request sent as another's line (one cache key, ``twins``) takes that line's answer at cost 0,
as a cache hit (lever ``coalesce``); when the line got no answer, the twin was not run either.

It must never hold a Postgres transaction open across a provider call.
"""

from __future__ import annotations

import logging
from datetime import datetime
from decimal import Decimal

import sqlalchemy as sa

from pipeline import errors, metrics
from pipeline.config import Settings, get_settings
from pipeline.constants import REQUEST_TERMINAL
from pipeline.ids import request_key
from pipeline.intake.batcher import dispatch
from pipeline.money import budget
from pipeline.money.pricing import get_price_book
from pipeline.paths import base as sequence
from pipeline.paths.base import without_call
from pipeline.paths.provider_batch import outcome_of_line, provider_custom_id, twins
from pipeline.providers import batch_api
from pipeline.request import Outcome
from pipeline.stores import batches as batch_store, db, jobs as job_store
from schedules import loop, pb_queue
from schedules.clock import get_clock
from schedules.pb_submit import _abandon, pb_requests

log = logging.getLogger(__name__)


def poll_open(*, settings: Settings | None = None, engine=None, dispatcher=dispatch,
              now: datetime | None = None) -> list[str]:
    """Poll submitted provider batches due for a poll, those whose results the provider deletes first
    first; copy the result lines of those that ended into Postgres, then ingest them (one whose copy
    is there already, its ingest having failed, is ingested from the copy). ``now``: the scheduler's
    clock. Returns ended ids."""
    settings = settings or get_settings()
    engine = engine or db.get_engine()
    now = now or get_clock(settings, engine).now()
    with engine.connect() as conn:
        due = conn.execute(sa.text(
            "SELECT id, provider, provider_batch_id, counts->>'key_alias', results_copied_at IS NOT NULL,"
            " provider_status FROM provider_batches WHERE status = 'submitted'"
            " AND (polled_at IS NULL OR polled_at < now() - make_interval(secs => :s))"
            " ORDER BY results_expire_at NULLS LAST, submitted_at"),
            {"s": settings.provider_batch_poll_s}).all()
    ended = []
    for pb_id, provider, pbid, key, is_copied, status in due:
        if is_copied:
            lines = pb_queue.copied(engine, pb_id)
        else:
            try:
                status, done, lines, codes = loop.run(batch_api.poll(settings, provider, pbid, key_alias=key))
            except Exception as e:
                log.warning("provider batch %s (%s): poll failed, will retry: %s", pb_id, pbid, e)
                continue
            if not done:
                # one statement that Postgres commits by itself: a scheduler stopped after sending it
                # holds no lock on the row (a cancel waited 518 s on an UPDATE left uncommitted)
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.execute(sa.text(
                        "UPDATE provider_batches SET provider_status = :st, polled_at = now() WHERE id = :id"),
                        {"id": pb_id, "st": status})
                continue
            if pb_queue.TOKEN_LIMIT in codes:   # the queue was full: nothing ran or was billed; held again
                log.warning("provider batch %s (%s): the provider's batch queue for its model was full; its lines"
                            " are held and sent again when there is room", pb_id, pbid)
                _abandon(engine, pb_id, f"{pb_queue.TOKEN_LIMIT}: failed at the provider ({pbid})", settings)
                continue
            pb_queue.copy_results(engine, pb_id, status, lines)
        try:
            ingest(pb_id, provider, status, lines, settings=settings, engine=engine, dispatcher=dispatcher,
                   key_alias=key, now=now)
        except Exception:   # its copy is in Postgres: ingested from it next tick
            log.exception("provider batch %s: ingest failed; its copied results are ingested again next tick", pb_id)
            continue
        ended.append(pb_id)
    return ended


def ingest(pb_id: str, provider: str, status: str, lines: list[dict], *, settings: Settings, engine,
           dispatcher=dispatch, key_alias: str | None = None, now: datetime | None = None) -> dict:
    """Write what the provider batch did (``key_alias``: the key it went out on, stored with each
    result and attempt as realtime stores its own); returns the counts."""
    prices = get_price_book()
    requeue: list = []   # Requests the provider did not run, back to realtime
    with engine.begin() as conn:
        reqs = pb_requests(conn, pb_id)
        by_pid = {provider_custom_id(r): (r, state) for r, state in reqs}
        outcomes, attempts, seen, not_run, counts = read_lines(
            [r for r, state in reqs if state["status"] not in REQUEST_TERMINAL], lines, prices, key_alias)
        sequence.write(conn, outcomes, attempts)
        # requests the provider never ran (expired, cancelled, batch failed, a retryable error): a new
        # provider batch when the deadline leaves time (pb_queue.split_not_run), else fallback per job
        cancel, fail, missing = [], [], []
        for pid, (r, state) in by_pid.items():
            if pid in seen or state["status"] in REQUEST_TERMINAL:
                continue
            reason = not_run.get(pid) or f"batch_{status}"
            if state["job_status"] == "cancelled":
                cancel.append(r)
            else:
                missing.append(pb_queue.NotRun(pid, reason, _aware(r.deadline), state["batch_resubmits"]))
        again, back = pb_queue.split_not_run(missing, now or get_clock(settings, engine).now(), settings)
        resubmitted = [by_pid[pid][0] for pid in again]
        for pid in back:
            r, state = by_pid[pid]
            reason = not_run.get(pid) or f"batch_{status}"
            if state["batch_fallback"] == "fail":
                fail.append(Outcome.failed(r, reason, f"the provider batch ended ({status}) without running"
                                                      f" this request"))
            else:
                requeue.append(r)
        if cancel:
            conn.execute(sa.text(
                "UPDATE requests r SET status = 'cancelled', finished_at = now()"
                " FROM jsonb_to_recordset(CAST(:k AS jsonb)) AS x(job_id text, custom_id text)"
                " WHERE r.job_id = x.job_id AND r.custom_id = x.custom_id"
                " AND r.status <> ALL(llmbatch_states('request_terminal'))"),
                {"k": db.dumps([{"job_id": r.job_id, "custom_id": r.custom_id} for r in cancel])})
        sequence.write(conn, fail, [])
        counts.update(cancelled=len(cancel), failed=counts["failed"] + len(fail), requeued=len(requeue),
                      resubmitted=len(resubmitted))
        if resubmitted:
            pb_queue.resubmit(conn, resubmitted, {(r.job_id, r.custom_id): not_run.get(provider_custom_id(r))
                                                  or f"batch_{status}" for r in resubmitted})
            log.info("provider batch %s: %d lines it did not run go into a new provider batch", pb_id, len(resubmitted))
        new_batches = pb_queue.to_realtime(conn, requeue) if requeue else []
        conn.execute(sa.text(
            "UPDATE batches SET status = 'done', finished_at = now() WHERE provider_batch = :pb"
            " AND status = 'submitted'"), {"pb": pb_id})
        conn.execute(sa.text("DELETE FROM provider_batch_results WHERE provider_batch = :id"), {"id": pb_id})
        conn.execute(sa.text(
            "UPDATE provider_batches SET status = 'ended', provider_status = :st, ended_at = now(),"
            " polled_at = now(), counts = coalesce(counts, '{}'::jsonb) || CAST(:c AS jsonb) WHERE id = :id"),
            {"id": pb_id, "st": status, "c": db.dumps(counts)})
        job_store.refresh_jobs(conn, {r.job_id for r, _ in reqs})
        xid = budget.commit_xid(conn)
        # settled_at stays NULL until the holds are settled: whatever stops that (Redis refusing
        # writes, a scheduler killed right after this commit), settle_unsettled finishes it
        conn.execute(sa.text("UPDATE provider_batches SET settle_xid = :x, settled_at = NULL WHERE id = :id"),
                     {"id": pb_id, "x": xid})
    _settle(pb_id, [(r.job_id, r.custom_id) for r, state in reqs if state["status"] not in REQUEST_TERMINAL],
            outcomes + fail, settings, engine, xid)
    metrics.record_savings([o.to_row() for o in outcomes])   # the batch discount, by lever
    for batch_id, tier, state in new_batches:
        if state == "queued":
            dispatcher(batch_id, tier)
    if new_batches:
        with engine.begin() as conn:
            batch_store.mark_dispatched(conn, [b for b, _, s in new_batches if s == "queued"])
    log.info("provider batch %s (%s) ended %s: %s", pb_id, provider, status, counts)
    return counts


def read_lines(reqs: list, lines: list[dict], prices, key_alias: str | None = None):
    """What a provider batch's result lines say of ``reqs`` (pure): ``(outcomes, attempts, seen,
    not_run, counts)``; ``seen``: provider custom_ids answered (a success, or an error the provider
    bills or that a new batch would repeat: a 4xx); ``not_run``: provider custom_id -> why (None: it
    has no line), for the others: no line, a line not run, or a retryable error (not billed: pb_queue.RETRYABLE_STATUS). A
    twin (one cache key, sent as another's line) takes its line's success at cost 0, else is not run."""
    by_pid = {provider_custom_id(r): r for r in reqs}
    twins_of = twins(reqs)   # requests sent as another's line (one cache key)
    outcomes: list[Outcome] = []
    attempts, seen, not_run = [], set(), {}
    counts = {"succeeded": 0, "failed": 0, "requeued": 0, "cancelled": 0, "unknown_lines": 0, "coalesced": 0}
    for line in lines:
        req = by_pid.get(line.get("custom_id"))
        if req is None or line["custom_id"] in seen:
            counts["unknown_lines"] += 1
            continue
        outcome, attempt, why = outcome_of_line(req, line, prices, key_alias)
        if outcome is not None and outcome.status == "failed" and pb_queue.retryable(outcome.status_code):
            outcome, why = None, f"error_{outcome.status_code}"   # not billed: a new batch may answer it
        if outcome is not None:
            seen.add(line["custom_id"])
            not_run.pop(line["custom_id"], None)
            outcomes.append(outcome)
            attempts.append(attempt)
            counts[outcome.status] += 1
        else:
            not_run[line["custom_id"]] = why
        for twin in twins_of.get(line["custom_id"], ()):
            # its line's answer, at cost 0; a line that got none: the twin was not run either
            # (resubmitted, re-queued or failed as its job says, never answered with an error not its own)
            got = without_call(twin, outcome.response, prices, "coalesce") \
                if outcome is not None and outcome.status == "succeeded" else None
            if got is not None:
                seen.add(provider_custom_id(twin))
                outcomes.append(got)
                counts["succeeded"] += 1
                counts["coalesced"] += 1
            else:
                not_run[provider_custom_id(twin)] = why or "its_line_was_not_answered"
    for pid in by_pid.keys() - seen - not_run.keys():
        not_run[pid] = None   # no line: why is the batch's own status (the caller's)
    return outcomes, attempts, seen, not_run, counts


def _settle(pb_id: str, open_keys: list[tuple[str, str]], outcomes: list[Outcome], settings: Settings, engine,
            xid: str) -> bool:
    """Step 5, after the results are committed: each hold becomes the request's actual cost (the
    rest of its maximum is freed); holds of requests still open that the provider did not run
    (``open_keys``: (job, custom_id)) are released (a re-queued request reserves again on its
    realtime path). True once every hold is settled or released (``provider_batches.settled_at``);
    else ``settle_unsettled`` tries again, next tick."""
    spent = {o.key: o.cost for o in outcomes}   # an answer without usage is recorded at 0 (usage_missing)
    others = [k for k in (request_key(j, c) for j, c in open_keys) if k not in spent]
    budget_ = loop.budget(settings, engine)

    async def settle():
        # a few quick tries: settle_unsettled tries again every tick, so no tick waits long on Redis
        await budget_.settle_held(spent, xid, attempts=4)
        await budget_.release_ids(others, strict=True)
    try:
        loop.run(settle())
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
        outcomes = [Outcome(r["job_id"], r["custom_id"], "", "succeeded", cost=Decimal(str(r["cost_usd"])))
                    for r in rows if r["cost_usd"] is not None]
        # requests of the batch without a result that no one will reserve again (cancelled)
        cancelled = [(r["job_id"], r["custom_id"]) for r in rows if r["cost_usd"] is None and r["status"] == "cancelled"]
        if _settle(pb_id, cancelled, outcomes, settings, engine, xid or ""):
            done += 1
            log.info("provider batch %s: holds settled after the ingest (%d results)", pb_id, len(outcomes))
    return done


def _aware(value) -> datetime | None:
    """A deadline as an aware datetime (a row may carry it as text)."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))
