"""Provider batches as an operator runs them, against the real stack (issue 21, item 2).

- Lines a provider batch did not run (the simulator expires 10 % of every batch's lines) and only
  they go into a new provider batch; every line is billed once, by the simulator's own count.
- OpenAI's enqueued-token limit per model (the simulator enforces it: a batch over it fails with
  ``token_limit_exceeded``): the pipeline, told the limit, sends batch after batch as room frees
  and none fails; not told it, a batch the provider fails is held again and sent later, unbilled.
- Results are copied into Postgres before the provider deletes them: with the scheduler's and the
  simulator's clocks moved to days after the batch ended, the results still at the provider are
  copied and ingested, and are gone from the provider soon after (Anthropic 29 days from
  creation; OpenAI's output files ``provider_batch_output_keep_s`` after creation).

The figures are printed as measured (``-s`` shows them).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from datetime import timedelta

import pytest
import sqlalchemy as sa

from pipeline.config import get_settings
from pipeline.providers import batch_api
from schedules import loop, pb_ingest, pb_queue, pb_reserve, pb_submit
from schedules.clock import DbClock
from tests.integration.conftest import chat_line, wait_for, write_jsonl
from tests.integration.test_cost_engine import ENDED, _submit, _wait
from tests.integration.named_providers import restarted, sim
from tests.integration.test_scheduler import _job_status, scheduler  # noqa: F401  (fixture)



def _lines(n: int, tag: str, model: str = "gpt-4o-mini", words: int = 8) -> list[dict]:
    out = []
    for i in range(n):
        text = f"Batch ops {tag} question {i}: " + " ".join(f"w{(i * 7 + k) % 97}" for k in range(words))
        if model.startswith("claude"):
            out.append({"custom_id": f"a{i:04d}", "params": {"model": model, "max_tokens": 24,
                                                               "messages": [{"role": "user", "content": text}]}})
        else:
            out.append(chat_line(f"o{i:04d}", text, model=model, max_tokens=24))
    return out


def _provider_batches(engine, since) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(
            "SELECT id, provider, model, status, requests, bytes, input_tokens, provider_status, error, counts,"
            " results_expire_at, results_copied_at, created_at FROM provider_batches WHERE created_at >= :t"
            " ORDER BY created_at"), {"t": since}).mappings()]


def _db_now(engine):
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT now()")).scalar()


def _billed_lines(settings) -> dict:
    """The simulator's count of Batch API lines billed so far (no reset: other work may run meanwhile)."""
    st = sim(settings, "GET", "/_stats")
    return {"lines": st["batch_lines_billed"], "ids": st["batch_custom_ids_billed"],
            "twice": set(st["batch_custom_ids_billed_twice"])}


def _realtime_calls(settings, job: str) -> int:
    return sim(settings, "GET", f"/_stats?key_prefix={job}:")["keys"]["calls"]


def _ledger(engine, job: str) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text(
            "SELECT count(*) AS n, count(*) FILTER (WHERE x.path = 'provider_batch') AS batch,"
            " coalesce(sum(x.cost_usd), 0) AS cost FROM results x WHERE x.job_id = :j"), {"j": job}).mappings().one())


# ------------------------------------------------------------------ resubmission

def test_only_the_lines_a_batch_did_not_run_are_resubmitted_and_each_line_is_billed_once(
        scheduler, tmp_path):  # noqa: F811
    engine, settings = scheduler, get_settings()
    tag = uuid.uuid4().hex[:8]
    n_openai, n_anthropic = 100, 60
    lines = _lines(n_openai, tag) + _lines(n_anthropic, tag, model="claude-haiku-4-5")
    since = _db_now(engine)
    sim(settings, "POST", "/_config", {"batch_expire_share": 0.1})
    before = _billed_lines(settings)
    try:
        job = _submit(write_jsonl(tmp_path / "expire.jsonl", lines), "--tier", "background",
                      "--mode", "provider_batch")
        assert _wait(engine, job, timeout=400) == "completed"
        after = _billed_lines(settings)
    finally:
        sim(settings, "DELETE", "/_config")
    pbs = _provider_batches(engine, since)
    with engine.connect() as conn:
        by_resubmits = dict(conn.execute(sa.text(
            "SELECT batch_resubmits, count(*) FROM requests WHERE job_id = :j GROUP BY 1"), {"j": job}).all())
    for provider, n in (("openai", n_openai), ("anthropic", n_anthropic)):
        mine = [p for p in pbs if p["provider"] == provider]
        sizes = [p["requests"] for p in mine]
        resub = [int(p["counts"].get("resubmitted", 0)) for p in mine]
        assert {p["status"] for p in mine} == {"ended"}
        # 10 % of each batch's lines expire (rounded); exactly those are resubmitted, nothing else
        assert resub == [int(round(k * 0.1)) for k in sizes], (provider, sizes, resub)
        assert sum(sizes) == n + sum(resub), (provider, sizes, resub)
        print(f"\n{provider}: {n} lines, provider batches of {sizes} lines; resubmitted {resub}")
    assert sum(k * c for k, c in by_resubmits.items()) == sum(int(p["counts"].get("resubmitted", 0)) for p in pbs)
    total = n_openai + n_anthropic
    billed, ids = after["lines"] - before["lines"], after["ids"] - before["ids"]
    assert billed == total == ids, (billed, ids)
    assert after["twice"] == before["twice"], "no line billed twice"
    assert _realtime_calls(settings, job) == 0, "nothing went to realtime"
    led = _ledger(engine, job)
    assert led["n"] == led["batch"] == total
    print(f"requests by times resubmitted {by_resubmits}; the simulator billed {billed} batch lines for {total}"
          f" requests, {ids} distinct custom_ids, none twice; ledger ${led['cost']}")


def _billed_usd(settings) -> float:
    return sum(float(p["billed_usd"]) for p in sim(settings, "GET", "/_stats")["providers"].values())


def test_a_job_cap_with_on_budget_fail_holds_against_the_providers_bill_and_refused_lines_are_never_sent(
        scheduler_stopped, tmp_path):
    """One batch of ours, part of it within the job's cap: the rest fails before sending and stays in
    that batch; the provider gets only the lines the cap let through (its steps run in-process)."""
    engine, settings = scheduler_stopped, get_settings()
    tag = uuid.uuid4().hex[:8]
    n, cap = 80, "0.0006"   # about half the lines' maxima at the batch price
    before, usd0 = _billed_lines(settings), _billed_usd(settings)
    lines = _lines(n, tag, words=40)
    for x in lines[::2]:   # dear and cheap maxima alternate: after the first settles, some fit and some not
        x["body"]["max_tokens"] = 400
    job = _submit(write_jsonl(tmp_path / "cap.jsonl", lines), "--tier", "background",
                  "--mode", "provider_batch", "--budget-usd", cap, "--on-budget", "fail")
    wait_for(lambda: _held(engine, job) == n, timeout=120, what="the batcher held every line")
    pb_submit.submit_held(settings=settings, engine=engine)
    def tick():   # the scheduler's steps: what live holds kept waiting is sent or refused once they settle
        pb_submit.submit_held(settings=settings, engine=engine)
        pb_ingest.poll_open(settings=settings, engine=engine)
        return (st := _job_status(engine, job)) in ENDED and st
    status = wait_for(tick, timeout=180, every=1.0, what="the job ended")
    assert status in ("completed_with_errors", "failed"), status
    after, usd1 = _billed_lines(settings), _billed_usd(settings)
    with engine.connect() as conn:
        row = conn.execute(sa.text(
            "SELECT count(*) FILTER (WHERE r.status = 'succeeded') AS ok,"
            " count(*) FILTER (WHERE x.error->>'code' = 'budget_exceeded') AS refused,"
            " coalesce(sum(x.cost_usd), 0) AS ledger, count(DISTINCT r.batch_id) AS batches FROM requests r"
            " LEFT JOIN results x ON x.job_id = r.job_id AND x.custom_id = r.custom_id WHERE r.job_id = :j"),
            {"j": job}).mappings().one()
    billed = after["lines"] - before["lines"]
    assert row["refused"] > 0 and row["ok"] > 0 and row["ok"] + row["refused"] == n, dict(row)
    assert billed == row["ok"], f"the provider billed {billed} lines; the cap let {row['ok']} through"
    assert usd1 - usd0 <= float(cap) and float(row["ledger"]) <= float(cap), (usd1 - usd0, row["ledger"])
    print(f"\ncap ${cap}, on_budget fail: {row['ok']} lines sent and billed ({billed} by the simulator),"
          f" {row['refused']} refused before sending; simulator ${usd1 - usd0:.8f}, ledger ${row['ledger']}")


# ------------------------------------------------------------------ the batch queue

def _tokens_per_line(engine, job: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT max(input_tokens) FROM requests WHERE job_id = :j"),
                                {"j": job}).scalar())


# a model each: a refusal teaches the pipeline a model's limit for provider_batch_queue_retry_s
@pytest.mark.parametrize("told,model", [(True, "gpt-4o-mini"), (False, "gpt-4.1-nano")],
                         ids=["limit_known", "limit_unknown"])
def test_a_full_batch_queue_is_waited_for_never_a_lost_or_twice_billed_line(scheduler, tmp_path, told,  # noqa: F811
                                                                            model):
    engine, settings = scheduler, get_settings()
    tag = uuid.uuid4().hex[:8]
    n, limit = 120, 1_500   # ~ 25 prompt tokens a line: about four batches' worth of the queue
    since = _db_now(engine)
    env = {"LLMBATCH_PROVIDER_BATCH_QUEUE_TOKENS": f"{model}={limit}"} if told else {}
    import os
    with restarted(settings, {**os.environ, **env}, ("scheduler",)):
        sim(settings, "POST", "/_config", {"batch_enqueued_tokens": {model: limit},
                                           "batch_processing_s": 1.5})
        before = _billed_lines(settings)
        t0 = time.monotonic()
        job = _submit(write_jsonl(tmp_path / "queue.jsonl", _lines(n, tag, model=model, words=12)), "--tier",
                      "background",
                      "--mode", "provider_batch")
        assert _wait(engine, job, timeout=600) == "completed"
        took = time.monotonic() - t0
        after = _billed_lines(settings)
        per_line = _tokens_per_line(engine, job)
    pbs = _provider_batches(engine, since)
    sent = [p for p in pbs if p["status"] == "ended"]
    refused = [p for p in pbs if p["status"] == "abandoned" and pb_queue.TOKEN_LIMIT in (p["error"] or "")]
    assert all(p["input_tokens"] <= limit for p in (pbs if told else sent)), [p["input_tokens"] for p in pbs]
    assert sum(p["requests"] for p in sent) == n
    if told:
        assert refused == [], "told the limit, the pipeline never lets the provider fail a batch"
        assert len(sent) >= n * per_line // limit, [p["requests"] for p in sent]
    billed = after["lines"] - before["lines"]
    assert billed == n and after["twice"] == before["twice"], "every line billed once"
    assert _realtime_calls(settings, job) == 0, "nothing went to realtime"
    print(f"\n{model}: queue limit {limit} tokens ({'known' if told else 'unknown'} to the pipeline), {n} lines of"
          f" <= {per_line} tokens: {len(sent)} provider batches {[p['requests'] for p in sent]} lines,"
          f" {[p['input_tokens'] for p in sent]} tokens; failed at the provider for the limit: {len(refused)};"
          f" {billed} lines billed once each; {took:.0f} s under load")


# ------------------------------------------------------------------ retention

@pytest.fixture
def scheduler_stopped(stack):
    """The stack's scheduler stopped for the block (this test runs its steps in-process), the clocks
    and the simulator's configuration restored after."""
    import os
    from tests.integration.named_providers import _stack_sh
    from pipeline.stores import db
    engine = db.get_engine()
    _stack_sh(dict(os.environ), "down", "scheduler")
    try:
        yield engine
    finally:
        DbClock(engine).reset()
        sim(get_settings(), "DELETE", "/_config")
        _stack_sh(dict(os.environ), "up", "scheduler")


@pytest.mark.parametrize("model,keep_days", [("claude-haiku-4-5", 29), ("gpt-4o-mini", 2)])
def test_results_are_copied_into_postgres_before_the_provider_deletes_them(scheduler_stopped, tmp_path,
                                                                            model, keep_days):
    engine = scheduler_stopped
    settings = replace(get_settings(), provider_batch_output_keep_s=keep_days * 86400)
    tag = uuid.uuid4().hex[:8]
    n = 12
    since = _db_now(engine)
    job = _submit(write_jsonl(tmp_path / "keep.jsonl", _lines(n, tag, model=model)), "--tier", "background",
                  "--mode", "provider_batch")
    wait_for(lambda: _held(engine, job) == n, timeout=120, what="the batcher held every line")
    [pb_id] = pb_submit.submit_held(settings=settings, engine=engine)
    [pb] = _provider_batches(engine, since)
    keep = pb["results_expire_at"] - pb["created_at"]
    assert timedelta(days=keep_days) <= keep <= timedelta(days=keep_days, minutes=5), keep
    with engine.connect() as conn:
        pbid, provider = conn.execute(sa.text("SELECT provider_batch_id, provider FROM provider_batches WHERE id = :id"),
                                      {"id": pb_id}).one()
    wait_for(lambda: loop.run(batch_api.status(settings, provider, pbid)) in ("completed", "ended"), timeout=120,
             what="the provider batch ended")
    # days later, the results not copied yet (the scheduler was down): an alert, then the copy first
    late = keep.total_seconds() - 6 * 3600
    clock = DbClock(engine)
    clock.set(offset_s=late)
    sim(settings, "POST", "/_config", {"clock_offset_s": late})
    assert pb_queue.at_risk(engine, settings, clock.now()) == [pb_id]
    ended = pb_ingest.poll_open(settings=settings, engine=engine, now=clock.now())
    assert ended == [pb_id]
    assert _job_status(engine, job) == "completed"
    assert pb_queue.at_risk(engine, settings, clock.now()) == []
    with engine.connect() as conn:
        copied_at, left = conn.execute(sa.text(
            "SELECT results_copied_at, (SELECT count(*) FROM provider_batch_results WHERE provider_batch = :id)"
            " FROM provider_batches WHERE id = :id"), {"id": pb_id}).one()
    assert copied_at is not None and left == 0, "copied, ingested, and the copy dropped with the ingest"
    assert _ledger(engine, job)["n"] == n
    # past the provider's retention, its results are gone; ours are in Postgres
    sim(settings, "POST", "/_config", {"clock_offset_s": keep.total_seconds() + 3600})
    with pytest.raises(Exception) as gone:
        loop.run(batch_api.poll(settings, provider, pbid))
    assert getattr(gone.value, "status_code", None) == 404, gone.value
    print(f"\n{provider}: results kept {keep} by the provider; copied at {keep.total_seconds() / 86400 - 0.25:.2f}"
          f" days (clocks moved), {n} of {n} results in Postgres; at +{keep_days} days + 1 h the provider"
          f" answers 404")


def _held(engine, job: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM requests WHERE job_id = :j AND status = 'held'"),
                            {"j": job}).scalar()


# ------------------------------------------------------------------ no lock across the budget store

def test_reservations_are_made_outside_any_transaction_and_a_job_cancelled_meanwhile_is_not_sent(
        scheduler_stopped, tmp_path, monkeypatch):
    """While the scheduler takes the holds of held provider-batch work (a Redis call per request),
    none of the work's rows is locked: the job's cancel goes through at once, and what the cancel
    stopped is not sent and its holds are given back."""
    from pipeline.money import scripts
    from pipeline.stores import jobs as job_store
    engine = scheduler_stopped
    settings = get_settings()
    tag = uuid.uuid4().hex[:8]
    n = 6
    job = _submit(write_jsonl(tmp_path / "cancel.jsonl", _lines(n, tag)), "--tier", "background",
                  "--mode", "provider_batch")
    wait_for(lambda: _held(engine, job) == n, timeout=120, what="the batcher held every line")
    seen: dict = {}
    real = pb_reserve.reserve_all

    def cancel_now() -> None:
        with engine.connect() as conn:   # the job's batches, as a cancel locks them first
            try:
                conn.execute(sa.text(
                    "SELECT batch_id FROM batches WHERE batch_id IN (SELECT batch_id FROM requests"
                    " WHERE job_id = :j) FOR UPDATE NOWAIT"), {"j": job}).all()
                seen["locked"] = False
            except sa.exc.OperationalError as e:
                seen["locked"] = str(e.orig).strip()
            conn.rollback()
        if not seen["locked"]:   # (with the lock held by the scheduler's own thread, a cancel would wait forever)
            seen["cancel"] = job_store.cancel_job(job, settings=settings, engine=engine)

    async def reserving(budget, reqs, today):
        got = await real(budget, reqs, today)
        seen["rids"] = [res.rid for r, res in got if r.job_id == job and hasattr(res, "rid")]
        await asyncio.to_thread(cancel_now)
        return got

    monkeypatch.setattr(pb_reserve, "reserve_all", reserving)
    created = pb_submit.submit_held(settings=settings, engine=engine)
    assert seen["locked"] is False, f"the job's batches were locked while the holds were taken: {seen['locked']}"
    assert len(seen["rids"]) == n, seen
    assert _job_status(engine, job) == "cancelled"
    with engine.connect() as conn:
        statuses = conn.execute(sa.text("SELECT status, count(*) FROM requests WHERE job_id = :j GROUP BY 1"),
                                {"j": job}).all()
        sent = conn.execute(sa.text(
            "SELECT count(*) FROM requests r JOIN batches b USING (batch_id)"
            " WHERE r.job_id = :j AND b.provider_batch IS NOT NULL"), {"j": job}).scalar()
    assert dict(statuses) == {"cancelled": n} and sent == 0, (statuses, sent, created)
    _, sredis = scripts.redis_clients(settings)
    left = [rid for rid in seen["rids"] if sredis.hexists(scripts.KEYS[4], rid)]
    assert left == [], f"{len(left)} holds of the cancelled requests were not given back"
    print(f"\nholds taken with no row locked; the cancel went through during them; {n} of {n} requests"
          f" cancelled, none sent, {n} holds given back")
