"""Limits against real services: budget caps under concurrency, Redis loss, expiry, pause and resume."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from decimal import Decimal

import pytest
import sqlalchemy as sa

from pipeline import errors
from pipeline.money import budget, ledger, scripts, units
from pipeline.money.pricing import get_price_book
from tests.integration.conftest import chat_line, llmbatch, wait_for, write_jsonl
from tests.integration.execution_helpers import budget_settings, commit_result, insert_job

AMOUNT = Decimal("0.0001")


def _job(engine, cap: Decimal, n: int) -> tuple[str, list[str]]:
    return insert_job(engine, cap, n, AMOUNT, prefix="job_limits_")


def _ledger(engine, job: str) -> Decimal:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT coalesce(sum(cost_usd), 0) FROM results WHERE job_id = :j"),
                            {"j": job}).scalar()


def test_concurrent_reservations_hold_the_cap_through_a_redis_flush(stack, engine):
    """300 requests, 64 at once, a cap worth 40 of them, FLUSHDB midway: spend ≤ cap, ≥ 90 % used."""
    settings = budget_settings(stack)
    cap = AMOUNT * 40
    job, ids = _job(engine, cap, 300)
    aredis, sredis = scripts.redis_clients(settings)
    sredis.flushdb()
    b = budget.Budget(settings, engine, aredis, sredis)
    outcome = {"ok": 0, "refused": 0}
    rng = random.Random(7)

    async def one(cid: str, sem: asyncio.Semaphore):
        async with sem:
            with engine.begin() as conn:
                conn.execute(sa.text("UPDATE requests SET status = 'running' WHERE job_id = :j AND custom_id = :c"),
                             {"j": job, "c": cid})
            try:
                res = await b.reserve(f"{job}:{cid}", job, "background", AMOUNT)
            except errors.BudgetExceeded:
                outcome["refused"] += 1
                return
            await asyncio.sleep(rng.uniform(0, 0.02))
            spent = (AMOUNT * Decimal(rng.randint(50, 100)) / 100).quantize(units.UNIT)
            def write():
                # as the OutcomeWriter does, in its thread right after the commit
                res.xid, res.written = commit_result(engine, job, cid, spent), True
            await asyncio.to_thread(write)
            await b.settle(res, spent)
            outcome["ok"] += 1

    async def flush_midway():
        while outcome["ok"] < 15:
            await asyncio.sleep(0.005)
        await aredis.flushdb()

    async def main():
        sem = asyncio.Semaphore(64)
        await asyncio.gather(flush_midway(), *(one(c, sem) for c in ids))
    asyncio.run(main())

    spent = _ledger(engine, job)
    assert spent <= cap, f"overspent: {spent} > {cap}"
    assert spent >= cap * Decimal("0.9"), f"cap under-used: {spent} of {cap}"
    assert outcome["ok"] + outcome["refused"] == 300 and outcome["refused"] > 0
    # a settle that crossed the flush counts its spend unless the rebuild's ledger already held it
    # (budget.SETTLE), so the live counter is the ledger, and nothing is left held
    assert int(sredis.hget(scripts.KEYS[2], f"job:{job}")) == units.to_units(spent)
    assert int(sredis.hget(scripts.KEYS[3], f"job:{job}") or 0) == 0
    ledger.reconcile(engine, sredis, stack)
    assert int(sredis.hget(scripts.KEYS[2], f"job:{job}")) == units.to_units(spent)
    with engine.connect() as conn:
        alerts = conn.execute(sa.text("SELECT threshold FROM budget_alerts WHERE scope = :s"),
                              {"s": f"job:{job}"}).scalars().all()
    assert sorted(set(alerts)) == [80, 100]
    sredis.flushdb()


def test_a_dead_workers_reservation_expires(stack, engine):
    settings = dataclasses.replace(budget_settings(stack), budget_reservation_ttl_s=0.3, provider_timeout_s=0.1,
                                   budget_reservation_margin_s=0.2)
    job, _ = _job(engine, AMOUNT * 2, 2)
    aredis, sredis = scripts.redis_clients(settings)
    sredis.flushdb()

    async def main():
        dead = budget.Budget(settings, engine, aredis, sredis)
        await dead.reserve(f"{job}:r0", job, "background", AMOUNT * 2)   # never settled: its worker "died"
        dead._beat.cancel()                                                # and stopped renewing its holds
        b = budget.Budget(settings, engine, aredis, sredis)
        started = asyncio.get_running_loop().time()
        res = await b.reserve(f"{job}:r1", job, "background", AMOUNT * 2)  # waits for the expiry
        waited = asyncio.get_running_loop().time() - started
        await b.release(res)
        return waited
    waited = asyncio.run(main())
    assert 0.2 <= waited < 5
    sredis.flushdb()


def test_budget_store_down_fails_closed(stack, engine):
    settings = dataclasses.replace(stack, redis_url="redis://127.0.0.1:1/0")
    job, _ = _job(engine, AMOUNT, 1)
    aredis, sredis = scripts.redis_clients(settings)

    async def main():
        b = budget.Budget(settings, engine, aredis, sredis)
        await b.reserve(f"{job}:r0", job, "background", AMOUNT)
    with pytest.raises(errors.BudgetUnavailable, match="unreachable") as caught:
        asyncio.run(main())
    assert not isinstance(caught.value, errors.BudgetScriptError)


def test_a_script_error_is_not_called_an_outage(stack):
    """Redis that answers with a script error is a bug to report, not a store to wait for."""
    settings = budget_settings(stack)
    aredis, sredis = scripts.redis_clients(settings)

    async def main():
        b = budget.Budget(settings, None, aredis, sredis)
        # a script that hands Redis a bad argument, as a bug would: Redis answers with an error
        await b._eval("return redis.call('HINCRBY', KEYS[3], 'probe', ARGV[1])", "not-a-number")
    with pytest.raises(errors.BudgetScriptError, match="script error") as caught:
        asyncio.run(main())
    assert "unreachable" not in str(caught.value)
    sredis.flushdb()


def _lines(n: int, tag: str):
    return [chat_line(f"{tag}{i}", f"Budget question {tag}{i}: name a prime above {i}.", priority=6)
            for i in range(n)]


def test_job_cap_pauses_the_job_and_raising_it_resumes(stack, engine, tmp_path):
    path = write_jsonl(tmp_path / "capped.jsonl", _lines(12, "p"))
    # gpt-4o-mini, ~20 input tokens + 32 output: a max cost near $0.000022; room for about three
    proc = llmbatch("submit", path, "--budget-usd", "0.00007", "--wait", "--json", timeout=120)
    st = json.loads(proc.stdout)
    assert proc.returncode == 1 and st["status"] == "paused_budget", proc.stderr
    assert st["budget"]["deferred"] > 0
    assert st["counts"]["succeeded"] + st["budget"]["deferred"] == 12
    assert Decimal(st["cost_usd"]) <= Decimal("0.00007")
    job = st["job_id"]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM budget_alerts WHERE scope = :s AND threshold = 100"),
                            {"s": f"job:{job}"}).scalar() >= 1
    shown = json.loads(llmbatch("budget", "show", "--json", check=True).stdout)
    mine = next(j for j in shown["jobs"] if j["job_id"] == job)
    assert mine["status"] == "paused_budget" and mine["deferred"] == st["budget"]["deferred"]

    llmbatch("budget", "set", "--job", job, "--usd", "1", check=True)

    def done():
        s = json.loads(llmbatch("status", job, "--json", check=True).stdout)
        return s if s["status"] == "completed" else None
    final = wait_for(done, timeout=60, every=0.5)
    assert final["counts"]["succeeded"] == 12 and final["budget"]["deferred"] == 0


def test_on_budget_fail_fails_with_budget_exceeded(stack, engine, tmp_path):
    path = write_jsonl(tmp_path / "fail.jsonl", _lines(8, "f"))
    proc = llmbatch("submit", path, "--budget-usd", "0.00005", "--on-budget", "fail", "--wait", "--json",
                    timeout=120)
    st = json.loads(proc.stdout)
    assert st["counts"]["failed"] > 0 and proc.returncode == 1
    assert st["status"] == ("failed" if st["counts"]["succeeded"] == 0 else "completed_with_errors")
    assert Decimal(st["cost_usd"]) <= Decimal("0.00005")
    with engine.connect() as conn:
        codes = conn.execute(sa.text(
            "SELECT DISTINCT error->>'code' FROM results WHERE job_id = :j AND error IS NOT NULL"),
            {"j": st["job_id"]}).scalars().all()
    assert codes == ["budget_exceeded"]


def test_fallback_model_answers_what_the_primary_cap_cannot_take(stack, engine, tmp_path):
    lines = [chat_line(f"fb{i}", f"Fallback question {i}: name a prime above {i}.", model="gpt-4o", priority=6)
             for i in range(12)]
    path = write_jsonl(tmp_path / "fallback.jsonl", lines)
    # gpt-4o's maximum here is about $0.00037 a line, gpt-4o-mini's about $0.000022: the cap cannot
    # take one gpt-4o call, and takes all twelve on the fallback
    cap = Decimal("0.0003")
    proc = llmbatch("submit", path, "--budget-usd", cap, "--fallback-model", "gpt-4o-mini", "--wait", "--json",
                    timeout=120)
    st = json.loads(proc.stdout)
    assert proc.returncode == 0 and st["status"] == "completed", proc.stderr
    assert st["counts"]["succeeded"] == 12 and Decimal(st["cost_usd"]) <= cap
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT x.model, r.model, x.input_tokens, x.output_tokens, x.cost_usd, x.response->>'model'"
            " FROM results x JOIN requests r USING (job_id, custom_id) WHERE x.job_id = :j"),
            {"j": st["job_id"]}).all()
    assert {(answered, asked) for answered, asked, *_ in rows} == {("gpt-4o-mini", "gpt-4o")}
    assert st["budget"]["answered_by_fallback"] == 12
    mini = get_price_book().resolve("gpt-4o-mini")
    for _, _, tin, tout, spent, provider_model in rows:
        assert provider_model.startswith("gpt-4o-mini")        # the provider was asked for the fallback
        assert spent == (tin * mini.input_per_mtok + tout * mini.output_per_mtok) / 1_000_000


def test_submit_refuses_an_unknown_fallback_model(stack, tmp_path):
    path = write_jsonl(tmp_path / "fb-unknown.jsonl", _lines(1, "u"))
    proc = llmbatch("submit", path, "--fallback-model", "gpt-5-nonexistent")
    assert proc.returncode == 2 and "--fallback-model: unknown model 'gpt-5-nonexistent'" in proc.stderr
