"""Issue 25 items 3 and 4 on the real stack: provider-batch holds end with their batch, a wait on
live holds says why, and a spend counts in the period of its reservation across midnight.

- Stalls: Redis refuses writes while a provider batch is ingested (an ACL user without ``@write``), or
  the scheduler is killed -9 between the ingest commit and the settle. The holds used to stay
  for ``PROVIDER_BATCH_HOLD_S`` (25 h), a reconcile kept them ("103 live holds kept"), and a later
  job under the same cap sat ``running`` with no reason shown. Now the reconcile drops them, the
  scheduler finishes the settle, ``status`` names the cap while the later job waits, and it ends.
- Midnight: the caps' clock (``sched_clock``, setting ``clock = "db"``) moved across midnight with
  a provider batch in flight: each day's spend, ledger and counters alike, within its cap.

The stack's scheduler is stopped while a test drives a provider batch itself, and started again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa

from pipeline.paths.provider_batch import provider_custom_id
from pipeline.request import Request
from schedules import loop
from pipeline import clock, errors
from pipeline.money import admin, budget, caps as caps_mod, ledger, scripts, units, waits
from pipeline.money.pricing import get_price_book
from pipeline.providers import batch_api
from schedules import pb_ingest, pb_reserve, pb_submit
from schedules.clock import DbClock
from tests.integration.conftest import chat_line, llmbatch, wait_for, write_jsonl
from tests.integration.execution_helpers import budget_settings, commit_result, insert_job

ROOT = Path(__file__).parents[2]


def _stack(action: str, *names: str) -> None:
    subprocess.run(["bash", "infra/stack.sh", action, *names], cwd=ROOT, check=True, capture_output=True,
                   timeout=180)


@pytest.fixture
def no_scheduler(stack, engine):
    """The stack's scheduler stopped: this test alone polls, ingests and settles provider batches.

    First, with the scheduler still running, the holds other tests left end: a provider batch's,
    which the scheduler settles, and a killed process's, which lapse. Left standing under the
    test's global cap, they would hold up its later job too (the cap leaves room for it alone)."""
    _, sredis = scripts.redis_clients(stack)
    field = f"global@{caps_mod.period(stack, engine)}"
    wait_for(lambda: not _holding(sredis, field), timeout=240, every=1,
             what="the holds other tests left under the global cap ended")
    _stack("down", "scheduler")
    try:
        yield
    finally:
        _stack("up", "scheduler")


@pytest.fixture
def caps(stack, engine):
    """Set daily caps for one test; the caps in force before are put back after."""
    _, sredis = scripts.redis_clients(stack)
    with engine.connect() as conn:
        before = caps_mod.caps_for(conn)
    touched = []

    def set_(scope: str, usd: Decimal) -> None:
        touched.append(scope)
        admin.set_cap(engine, sredis, stack, scope, usd)
    yield set_
    with engine.begin() as conn:
        for scope in touched:
            if scope in before:
                conn.execute(sa.text("UPDATE budget_caps SET usd = :u WHERE scope = :s"),
                             {"u": before[scope], "s": scope})
            else:
                conn.execute(sa.text("DELETE FROM budget_caps WHERE scope = :s"), {"s": scope})
    for scope in touched:
        sredis.eval(scripts.SET_CAP, len(scripts.KEYS), *scripts.KEYS, scope,
                    str(units.to_units(before[scope])) if scope in before else units.NO_CAP)


def _submit(path, *args) -> str:
    return json.loads(llmbatch("submit", "--mode", "realtime", path, "--json", *args, check=True).stdout)["job_id"]


def _lines(n: int, tag: str, **extra):
    return [chat_line(f"{tag}{i}", f"Hold question {tag}{i} {uuid.uuid4().hex[:6]}: name a prime above {i}.",
                      **extra) for i in range(n)]


def _counts(engine, job: str) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM requests WHERE job_id = :j GROUP BY status"), {"j": job}).all())


def _holds_of(sredis, job: str) -> list[str]:
    return [k.decode() for k in sredis.hkeys(scripts.KEYS[4]) if k.decode().startswith(job + ":")]


def _pb_of(engine, job: str) -> str:
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT DISTINCT b.provider_batch FROM batches b JOIN requests r ON r.batch_id = b.batch_id"
            " WHERE r.job_id = :j AND b.provider_batch IS NOT NULL"), {"j": job}).scalar()


def _sent_and_ended(stack, engine, job: str, n: int) -> str:
    """Submit ``job``'s held provider-batch work (this process, the stack's Redis), wait until the
    provider says the batch ended, without ingesting it. Returns our provider batch id."""
    wait_for(lambda: _counts(engine, job).get("held", 0) == n, timeout=60, what=f"{n} requests held")
    pb_submit.submit_held(settings=stack, engine=engine)
    pb = _pb_of(engine, job)
    assert pb, _counts(engine, job)
    with engine.connect() as conn:
        provider, pbid = conn.execute(sa.text(
            "SELECT provider, provider_batch_id FROM provider_batches WHERE id = :id"), {"id": pb}).one()
    import asyncio
    wait_for(lambda: asyncio.run(batch_api.poll(stack, provider, pbid))[1], timeout=60, every=0.5,
             what="the provider batch ended at the provider")
    return pb


@contextlib.contextmanager
def _writes_refused(stack, sredis):
    """Settings whose Redis user may read but not write (an ACL user without @write): every budget
    script that writes fails, as under ``min-replicas-to-write``, but only for this process. Refusing
    writes server-wide also refused the Celery broker's, and the stack's workers died and restarted."""
    user, password = "llmbatch-test-" + uuid.uuid4().hex[:8], uuid.uuid4().hex
    sredis.acl_setuser(user, enabled=True, passwords=["+" + password], keys=["*"], channels=["*"],
                       commands=["+@all", "-@write"])
    u = urlsplit(stack.redis_url)
    url = f"{u.scheme}://{user}:{password}@{u.hostname}:{u.port}{u.path}"
    try:
        yield dataclasses.replace(stack, redis_url=url)
    finally:
        sredis.acl_deluser(user)


def _holding(sredis, field: str) -> list[str]:
    """The holds under ``field`` (a cap's scope, e.g. ``global@<day>``)."""
    return [rid.decode() for rid, rec in sredis.hgetall(scripts.KEYS[4]).items()
            if field in rec.decode().split("|", 2)[2].split("\t")]


def _ledger_today(engine) -> Decimal:
    """Today's spend as the caps count it: results, and calls that may have been billed (other
    tests' timeouts leave unconfirmed calls, counted at their maximum)."""
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT (SELECT coalesce(sum(cost_usd), 0) FROM results WHERE budget_period = budget_day())"
            f" + (SELECT coalesce(sum({ledger.CALL_SPEND}), 0) FROM provider_calls p"
            "    WHERE p.state <> 'sent' AND p.budget_period = budget_day())")).scalar()


def _later_job_waits_then_runs(stack, engine, caps, sredis, pb_job: str, fix) -> None:
    """Under a global cap the provider batch's leftover holds stand in front of: a later realtime
    job waits, ``status`` names the cap, what it holds and for whom; then ``fix`` (the operator's
    reconcile, or the scheduler) and the job completes without any cap raised by hand."""
    later_n, line_max = 3, Decimal("0.00003")      # above one line's maximum (gpt-4o-mini, 32 out)
    today = caps_mod.period(stack, engine)
    held = units.from_units(int(sredis.hget(scripts.KEYS[3], f"global@{today}") or 0))
    with engine.connect() as conn:
        pb_spent = conn.execute(sa.text("SELECT coalesce(sum(cost_usd), 0) FROM results WHERE job_id = :j"),
                                {"j": pb_job}).scalar()
    # binding: room for the later job's maxima once the holds are gone, none while they stand
    assert held - pb_spent > line_max * later_n, f"the batch's unused holds ${held - pb_spent} are too small"
    caps("global", (_ledger_today(engine) + line_max * later_n).quantize(units.UNIT))
    path = write_jsonl(Path(os.environ.get("TMPDIR", "/tmp")) / f"later-{uuid.uuid4().hex[:6]}.jsonl",
                       _lines(later_n, "lt", priority=6))
    job = _submit(path)
    note = wait_for(lambda: waits.wait_status(sredis, job), timeout=60, every=0.2,
                    what="the later job's reservations say why they wait")
    assert note["cap"] == "global", note
    assert any(h["job_id"] == pb_job for h in note["holders"]), note
    status = llmbatch("status", job, check=True).stdout
    print(f"\nstatus while it waited:\n{status}")
    assert "global cap" in status and pb_job in status, status
    assert _counts(engine, job).get("succeeded", 0) == 0
    fix()
    wait_for(lambda: _counts(engine, job).get("succeeded", 0) == later_n, timeout=120, every=0.5,
             what="the later job completed")
    assert not _holds_of(sredis, pb_job), "the provider batch's holds are still there"


def _settled_once(stack, engine, sredis, pb: str) -> None:
    """The scheduler finished the settle, and the spend is counted once: counters = ledger."""
    wait_for(lambda: engine.connect().execute(sa.text(
        "SELECT settled_at IS NOT NULL FROM provider_batches WHERE id = :id"), {"id": pb}).scalar(),
        timeout=90, every=0.5, what="the scheduler settled the provider batch")
    out = ledger.reconcile(engine, sredis, stack)
    assert out["drift_units"] == {} and not out.get("reason"), out


def test_a_settle_redis_refused_neither_stalls_a_later_job_nor_waits_without_a_reason(
        stack, engine, no_scheduler, caps, tmp_path):
    n = 100
    _, sredis = scripts.redis_clients(stack)
    job = _submit(write_jsonl(tmp_path / "pb.jsonl", _lines(n, "rf", max_tokens=400)), "--mode", "provider_batch",
                  "--tier", "background")
    pb = _sent_and_ended(stack, engine, job, n)
    assert len(_holds_of(sredis, job)) == n
    with _writes_refused(stack, sredis) as refusing:         # Redis refuses this scheduler's writes
        pb_ingest.poll_open(settings=refusing, engine=engine, dispatcher=lambda *a: None)
    assert _counts(engine, job).get("succeeded") == n        # the results are in the ledger …
    assert len(_holds_of(sredis, job)) == n                  # … and every hold is still there
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT settled_at FROM provider_batches WHERE id = :id"),
                            {"id": pb}).scalar() is None

    def reconcile():   # what the operator (or the upkeep) runs: it must drop the counted holds
        out = json.loads(llmbatch("budget", "reconcile", "--json", check=True).stdout)
        assert out["rebuilt"], out
    _later_job_waits_then_runs(stack, engine, caps, sredis, job, reconcile)
    _stack("up", "scheduler")                                # it finishes the settle: counted once
    _settled_once(stack, engine, sredis, pb)


_KILL_AFTER_COMMIT = """
import os, signal, sys
from pipeline.config import get_settings
from pipeline.stores import db
from schedules import pb_ingest
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)                      # the ingest committed; the settle never runs
pb_ingest._settle = die
pb_ingest.poll_open(settings=get_settings(), engine=db.get_engine(), dispatcher=lambda *a: None)
"""


def test_a_scheduler_killed_between_the_ingest_commit_and_the_settle_leaves_no_stall(
        stack, engine, no_scheduler, caps, tmp_path):
    n = 100
    _, sredis = scripts.redis_clients(stack)
    job = _submit(write_jsonl(tmp_path / "pb.jsonl", _lines(n, "kl", max_tokens=400)), "--mode", "provider_batch",
                  "--tier", "background")
    pb = _sent_and_ended(stack, engine, job, n)
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER_COMMIT], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-2000:])
    assert _counts(engine, job).get("succeeded") == n
    assert len(_holds_of(sredis, job)) == n

    def restart():   # the supervisor starts the scheduler again: its first tick settles
        _stack("up", "scheduler")
    _later_job_waits_then_runs(stack, engine, caps, sredis, job, restart)
    _settled_once(stack, engine, sredis, pb)


# ------------------------------------------------------------------ midnight

def _pb_job(engine, n: int, amount: Decimal) -> str:
    """A provider-batch job of ``n`` held background requests of ``amount`` (list price) each."""
    job = "job_mid_" + uuid.uuid4().hex[:10]
    batch = "b_" + uuid.uuid4().hex
    body = {"model": "gpt-4o-mini", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO jobs (job_id, status, accepted, mode) VALUES (:j, 'running', :n,"
                             " 'provider_batch')"), {"j": job, "n": n})
        # 'deferred' far ahead, not 'held': the stack's scheduler must not send what this test sends
        conn.execute(sa.text(
            "INSERT INTO batches (batch_id, tier, provider, model, size, status, mode, deferred_until)"
            " VALUES (:b, 'background', 'openai', 'gpt-4o-mini', :n, 'deferred', 'provider_batch',"
            " now() + interval '10 years')"), {"b": batch, "n": n})
        for i in range(n):
            conn.execute(sa.text(
                "INSERT INTO requests (job_id, custom_id, batch_id, line, provider, model, tier, tier_reason,"
                " priority, input_tokens, max_cost_usd, status, body)"
                " VALUES (:j, :c, :b, :i, 'openai', 'gpt-4o-mini', 'background', 'test', 0, 8, :a, 'held',"
                " CAST(:body AS jsonb))"),
                {"j": job, "c": f"m{i}", "b": batch, "i": i, "a": amount, "body": json.dumps(body)})
    return job


def _send(settings, engine, sredis, job: str) -> tuple[str, list[dict]]:
    """The scheduler's reserve + assign for ``job`` (no provider call: its lines are written here)."""
    today = caps_mod.period(settings, engine)
    with engine.begin() as conn:
        reqs = [Request.from_row(r) for r in conn.execute(sa.text(
            "SELECT r.*, b.mode AS path FROM requests r JOIN batches b USING (batch_id)"
            " WHERE r.job_id = :j AND r.status = 'held' ORDER BY r.line"), {"j": job}).mappings()]
        got = pb_reserve.reserve(loop.budget(settings, engine), reqs, today)
        assert not got.store_down
        fit = [r for r, _ in got.fit]
        pb_reserve.record_period(conn, fit, today)
        pb = "pb_" + uuid.uuid4().hex[:20]
        # never polled by a scheduler (polled_at ahead): this test ingests it
        conn.execute(sa.text(
            "INSERT INTO provider_batches (id, provider, model, status, requests, bytes, provider_batch_id,"
            " submitted_at, polled_at) VALUES (:id, 'openai', 'gpt-4o-mini', 'submitted', :n, 0, 'test',"
            " now(), now() + interval '1 day')"), {"id": pb, "n": len(fit)})
        pb_submit._assign(conn, pb, fit)
    return pb, fit


def _result_lines(fit: list[Request], output_tokens: int) -> list[dict]:
    return [{"custom_id": provider_custom_id(r),
             "response": {"status_code": 200, "request_id": "req_" + r.custom_id,
                          "body": {"id": "c", "object": "chat.completion", "model": "gpt-4o-mini",
                                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                                "finish_reason": "stop"}],
                                   "usage": {"prompt_tokens": 8, "completion_tokens": output_tokens,
                                             "total_tokens": 8 + output_tokens}}}} for r in fit]


def _without_leftovers(engine, sredis, settings) -> None:
    """Counters built, and the short re-holds of other tests' requests left 'running' gone: a
    rebuild re-holds them for ``REHOLD_GRACE_S`` in today's period, this test's day D."""
    ledger.rebuild(engine, sredis, settings)
    if not sredis.hlen(scripts.KEYS[4]):
        return
    time.sleep(scripts.REHOLD_GRACE_S + 0.5)   # nobody re-asserts them: they expire
    for rid in sredis.zrangebyscore(scripts.KEYS[5], "-inf", int(time.time() * 1000)):
        sredis.eval(scripts.RELEASE, len(scripts.KEYS), *scripts.KEYS, rid)


def _spent_by_period(engine, tier: str, days: list[date]) -> dict[date, Decimal]:
    with engine.connect() as conn:
        got = dict(conn.execute(sa.text(
            "SELECT r.budget_period, sum(r.cost_usd) FROM results r JOIN requests q USING (job_id, custom_id)"
            " WHERE r.budget_period = ANY(:d) AND q.tier = :t GROUP BY 1"), {"d": days, "t": tier}).all())
    return {d: got.get(d, Decimal(0)) for d in days}


def test_a_provider_batch_open_across_midnight_spends_each_day_within_its_cap(stack, engine, caps):
    settings = budget_settings(stack)                      # Redis database 15: the stack never sees it
    aredis, sredis = scripts.redis_clients(settings)
    sredis.flushdb()
    db_clock = DbClock(engine)
    # a day no other test spends in: the ledger of both days is this test's alone
    day_d = date(2031, 3, 4) + timedelta(days=uuid.uuid4().int % 3000)
    day_e = day_d + timedelta(days=1)
    amount = Decimal("0.00002")                             # one request's maximum, list price
    hold = (amount * (1 - get_price_book().resolve("gpt-4o-mini").batch_discount)).quantize(units.UNIT)
    cap = hold * 10                                         # the tier's cap, each day: binding below
    caps("tier:background", cap)
    try:
        db_clock.set(datetime.combine(day_d, datetime.min.time(), timezone.utc) + timedelta(hours=23, minutes=59))
        clock.forget()
        assert caps_mod.period(settings, engine) == day_d.isoformat()
        _without_leftovers(engine, sredis, settings)
        pb_job = _pb_job(engine, 12, amount)
        pb, fit = _send(settings, engine, sredis, pb_job)  # day D: 10 of 12 fit under D's cap
        assert len(fit) == 10, len(fit)

        # midnight passes while the provider batch runs
        db_clock.set(datetime.combine(day_e, datetime.min.time(), timezone.utc) + timedelta(minutes=1))
        clock.forget()
        assert caps_mod.period(settings, engine) == day_e.isoformat()
        rt_job, ids = insert_job(engine, None, 12, hold, prefix="job_mid_rt_")

        import asyncio

        async def fill_day_e() -> int:   # realtime work fills day D+1's cap to the full
            b = budget.Budget(settings, engine, aredis, sredis)
            n = 0
            for cid in ids:
                try:
                    res = await b.reserve(f"{rt_job}:{cid}", rt_job, "background", hold)
                except errors.BudgetExceeded:
                    break
                res.xid = commit_result(engine, rt_job, cid, hold)
                res.written = True
                await b.settle(res, hold)
                n += 1
            if b._beat:
                b._beat.cancel()
            return n
        filled = asyncio.run(fill_day_e())
        assert filled == 10, filled

        # a rebuild while the batch is still open keeps day D's holds in day D
        sredis.eval(scripts.INVALIDATE, len(scripts.KEYS), *scripts.KEYS, sredis.get(scripts.KEYS[0]))
        ledger.rebuild(engine, sredis, settings)
        assert int(sredis.hget(scripts.KEYS[3], f"tier:background@{day_d}") or 0) == units.to_units(hold) * 10

        # the batch ends on D+1 (8 tokens in, 16 out each, at the batch price)
        pb_ingest.ingest(pb, "openai", "completed", _result_lines(fit, 16), settings=settings,
                                engine=engine, dispatcher=lambda *a: None)
        spent = _spent_by_period(engine, "background", [day_d, day_e])
        print(f"\nmidnight: tier:background cap ${cap} per day; spent {day_d} ${spent[day_d]},"
              f" {day_e} ${spent[day_e]} (the provider batch reserved on {day_d}, ingested on {day_e})")
        assert 0 < spent[day_d] <= cap, spent
        assert 0 < spent[day_e] <= cap, spent
        assert spent[day_e] == hold * 10                    # D+1's own spend only: the cap was binding
        # the counters, the view and a rebuild all say the same
        live = {k.decode(): int(v) for k, v in sredis.hgetall(scripts.KEYS[2]).items()}
        assert live[f"tier:background@{day_e}"] == units.to_units(spent[day_e]), live
        assert live[f"tier:background@{day_d}"] == units.to_units(spent[day_d]), live
        assert not _holds_of(sredis, pb_job)
        with engine.connect() as conn:
            view = conn.execute(sa.text("SELECT period, spent_usd FROM budget_status"
                                        " WHERE scope = 'tier:background'")).one()
        assert view.period == day_e.isoformat() and view.spent_usd == spent[day_e], view
        out = ledger.reconcile(engine, sredis, settings)
        assert out["drift_units"] == {} and not out["rebuilt"], out
    finally:
        db_clock.reset()
        clock.forget()
        sredis.flushdb()
        with engine.begin() as conn:   # nothing of this test stays open for the next one
            conn.execute(sa.text("UPDATE jobs SET status = 'cancelled' WHERE job_id LIKE 'job_mid_%'"
                                 " AND status = 'running'"))


# ------------------------------------------------------------------ a wait that ends

def test_a_reservation_behind_live_holds_says_why_then_gives_up_after_budget_wait_max_s(stack, engine):
    """It used to wait without a limit, and nothing said why. The holds in front of it are its own
    job's here (a job cap: no cap another test shares), the most a cap can say about them."""
    settings = budget_settings(stack, budget_wait_max_s=1.0)     # Redis database 15
    aredis, sredis = scripts.redis_clients(settings)
    sredis.flushdb()
    amount = Decimal("0.0001")
    job, ids = insert_job(engine, amount * 2, 3, amount, prefix="job_wait_")

    async def main():
        b = budget.Budget(settings, engine, aredis, sredis)
        held = [await b.reserve(f"{job}:{c}", job, "background", amount) for c in ids[:2]]
        waiting = asyncio.create_task(b.reserve(f"{job}:{ids[2]}", job, "background", amount))
        note = None
        while note is None and not waiting.done():
            await asyncio.sleep(0.05)
            note = await asyncio.to_thread(waits.wait_status, sredis, job)
        with pytest.raises(errors.BudgetWaitedOut) as e:
            await waiting
        for r in held:
            await b.release(r)
        b._beat.cancel()
        return note, e.value
    import asyncio
    try:
        note, e = asyncio.run(main())
    finally:
        sredis.flushdb()
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE jobs SET status = 'cancelled' WHERE job_id = :j"), {"j": job})
    assert note and note["cap"] == f"job:{job}", note
    assert note["holders"] == [{"job_id": job, "holds": 2, "held_usd": str(amount * 2)}], note
    assert e.kind == "wait" and e.scope == f"job:{job}"
    assert f"job:{job} cap ${amount * 2}" in str(e) and "2 holds" in str(e) and "budget_wait_max_s" in str(e), str(e)
