"""Money the ledger never sees: a call that may have been billed is spent, by the provider's bill.

Three ways a call reaches the provider without an answer reaching the ledger: the client
times out while the provider still generates, the line drops after the generation, the
worker is killed mid-call. The provider bills each (the simulator does, as a provider
would: simulator/server.py), so the pipeline must count each at its maximum cost, as
unconfirmed spend, for good. The judge here is the simulator's own bill (``/_stats``
``billed`` of the job's keys, priced with the published prices below, not the pipeline's
price book) against the job's cap; every job could spend several times its cap.

The batches run in this process (``workers.execute.run_batch``) with short timeouts,
leases and hold lifetimes, against the stack's Postgres, Redis (budget in database 15)
and simulator; the kill -9 case runs its first worker as a child process and kills it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from decimal import Decimal

import pytest
import sqlalchemy as sa

from pipeline import errors
from pipeline.money import admin, budget, ledger, scripts, units
from pipeline.money.bounds import request_bound
from pipeline.money.pricing import get_price_book
from pipeline.providers import base
from pipeline.stores import jobs
from tests.integration.conftest import wait_for
from tests.integration.execution_helpers import (budget_settings, calls_of, make_batch, requests_of, scalar,
                                                simulator_config)
from workers import execute, limited

MODEL = "gpt-4o-mini"
#: gpt-4o-mini's published prices per token (https://platform.openai.com/docs/pricing): the witness's own
PRICE_IN, PRICE_OUT = Decimal("0.15") / 10**6, Decimal("0.60") / 10**6
MAX_TOKENS = 1000


def _bill(settings, job: str) -> tuple[int, Decimal]:
    """(generations billed, USD) for ``job``'s keys, from the simulator's own bill."""
    url = f"{settings.simulator_url}/_stats?" + urllib.parse.urlencode({"key_prefix": f"{job}:"})
    keys = json.load(urllib.request.urlopen(url, timeout=10))["keys"]
    b = keys["billed"]
    cached = b.get("prompt_tokens_details.cached_tokens", 0)
    usd = ((b.get("prompt_tokens", 0) - cached) * PRICE_IN + cached * PRICE_IN / 2
           + b.get("completion_tokens", 0) * PRICE_OUT)
    return keys["billed_calls"], usd


def _capped_batch(engine, n: int, fits: float, tier: str = "offpeak") -> tuple[str, str, Decimal, Decimal]:
    """A job of ``n`` requests whose cap takes ``fits`` of their maximum costs: (job, batch, max, cap)."""
    # 'running' with no lease: the scheduler re-holds queued off-peak batches while its window is shut,
    # and the sweep re-dispatches only leases run out long ago; the test's own worker claims it
    job, batch = make_batch(engine, n, tier=tier, model=MODEL, batch_status="running")
    body = {"model": MODEL, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": f"unconfirmed spend {job}"}]}
    bound = request_bound("openai", body, get_price_book())
    cap = (bound.max_cost_usd * Decimal(str(fits))).quantize(Decimal("0.00000001"))
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE requests SET body = CAST(:b AS jsonb), input_tokens = :t, max_cost_usd = :m"
                             " WHERE job_id = :j"),
                     {"b": json.dumps(body), "t": bound.input_tokens, "m": bound.max_cost_usd, "j": job})
        conn.execute(sa.text("UPDATE jobs SET budget_usd = :c WHERE job_id = :j"), {"c": cap, "j": job})
        conn.execute(sa.text("UPDATE batches SET lease_until = now() - interval '1 second' WHERE batch_id = :b"),
                     {"b": batch})
    assert n * bound.max_cost_usd >= 3 * cap   # the job alone could spend three caps: an overspend shows
    return job, batch, bound.max_cost_usd, cap


@pytest.fixture
def process(stack, monkeypatch):
    """A worker process of its own: its settings reach its provider client, budget and limiter."""
    monkeypatch.setattr(base, "_clients", {})
    monkeypatch.setattr(limited, "_budgets", {})
    monkeypatch.setattr(limited, "_limiters", {})

    def make(**changes):
        settings = budget_settings(stack, max_attempts=3, backoff_base_s=0.05, backoff_max_s=0.2, **changes)
        scripts.redis_clients(settings)[1].flushdb()
        return settings
    yield make
    scripts.redis_clients(budget_settings(stack))[1].flushdb()


def _run(engine, batch: str, settings, owner: str = "test-worker") -> dict:
    return asyncio.run(execute.run_batch(batch, owner=owner, settings=settings, engine=engine))


def _unconfirmed(engine, job: str) -> Decimal:
    return scalar(engine, "SELECT coalesce(sum(unconfirmed_usd), 0) FROM unconfirmed_spend WHERE job_id = :j", j=job)


def _settle_bill(settings, job: str) -> tuple[int, Decimal]:
    """Wait until every call of the job that reached the simulator has finished generating and is billed."""
    wait_for(lambda: _bill(settings, job)[0] >= calls_of(settings, job), timeout=30, what="the provider's bill")
    return _bill(settings, job)


def _report(case: str, job: str, calls: int, billed: Decimal, cap: Decimal, unconfirmed: Decimal) -> None:
    print(f"\nMONEY {case}: job {job} calls {calls} billed ${billed} cap ${cap} "
          f"({billed / cap:.2f} x cap) unconfirmed ${unconfirmed}")


def test_timed_out_calls_are_spent_at_their_maximum(stack, engine, process):
    """Issue 24 #1a: with the provider holding each call past the client's timeout, every hold that
    expired let another cap's worth of calls out (8 x the cap); the ledger said $0."""
    settings = process(provider_timeout_s=2.0, budget_reservation_ttl_s=1.0, budget_reservation_margin_s=0.5)
    job, batch, each, cap = _capped_batch(engine, 8, 2.5)
    with simulator_config(stack, hold_s=4.0, latency_ms=0, worst_case=True):
        _run(engine, batch, settings)
        calls, billed = _settle_bill(settings, job)
    unconfirmed = _unconfirmed(engine, job)
    _report("timeout", job, calls, billed, cap, unconfirmed)
    assert calls >= 2 and billed <= cap, f"the provider billed ${billed} for {calls} calls under a ${cap} cap"
    assert unconfirmed >= billed and unconfirmed == calls * each   # every billed call is spent in the ledger
    # the retries asked for a reservation of their own, and the cap refused them: nothing ran twice
    assert {r["status"] for r in requests_of(engine, job).values()} == {"deferred"}
    # status, budget show and the views show it apart from confirmed spend
    with engine.connect() as conn:
        st = jobs.job_status(conn, job)
        view = conn.execute(sa.text("SELECT confirmed_usd, unconfirmed_usd FROM budget_spend WHERE scope = :s"),
                            {"s": f"job:{job}"}).one()
    assert Decimal(st["unconfirmed_usd"]) == unconfirmed and st["unconfirmed_calls"] == calls
    assert Decimal(st["cost_usd"]) == 0
    assert (view.confirmed_usd, view.unconfirmed_usd) == (0, unconfirmed)
    shown = admin.show(engine, scripts.redis_clients(settings)[1], settings)
    assert Decimal(next(j for j in shown["jobs"] if j["job_id"] == job)["unconfirmed_usd"]) == unconfirmed
    assert Decimal(shown["tiers"]["offpeak"]["unconfirmed_usd"]) >= unconfirmed


def test_calls_the_provider_hung_up_on_are_spent_at_their_maximum(stack, engine, process):
    """Issue 24 #1b: a provider dropping every connection after its generation: 2.7 x the cap and
    rising, the ledger $0."""
    settings = process(provider_timeout_s=5.0, budget_reservation_ttl_s=1.0, budget_reservation_margin_s=0.5)
    job, batch, each, cap = _capped_batch(engine, 8, 2.5)
    with simulator_config(stack, latency_ms=100, error_rates={"hangup": 1.0}, worst_case=True):
        _run(engine, batch, settings)
        calls, billed = _settle_bill(settings, job)
    unconfirmed = _unconfirmed(engine, job)
    _report("hangup", job, calls, billed, cap, unconfirmed)
    assert calls >= 2 and billed <= cap, f"the provider billed ${billed} for {calls} calls under a ${cap} cap"
    assert unconfirmed >= billed and unconfirmed == calls * each


_DOOMED = """
import asyncio, dataclasses, json, sys
from pipeline.config import get_settings
from workers import execute
settings = dataclasses.replace(get_settings(), **json.loads(sys.argv[2]))
async def main():
    await execute.prepare(settings)   # as a worker process does before its first batch
    await execute.run_batch(sys.argv[1], owner="doomed-worker", settings=settings)
asyncio.run(main())
"""


def test_a_worker_killed_mid_call_leaves_its_calls_spent_for_the_rerun(stack, engine, process):
    """Issue 24 #1c: kill -9 of a worker with a cap's worth of calls in flight; after its lease and
    holds expired, the batch's re-run spent the cap again (1.9 x the cap)."""
    settings = process(provider_timeout_s=6.0, budget_reservation_ttl_s=1.0, budget_reservation_margin_s=0.0,
                       batch_lease_s=5.0)
    job, batch, each, cap = _capped_batch(engine, 30, 9.5)
    changes = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
               if f.name in ("redis_url", "provider_timeout_s", "budget_reservation_ttl_s",
                             "budget_reservation_margin_s", "batch_lease_s", "max_attempts")}
    with simulator_config(stack, latency_ms=3000, worst_case=True):
        doomed = subprocess.Popen([sys.executable, "-c", _DOOMED, batch, json.dumps(changes)],
                                  env=os.environ.copy())
        try:
            wait_for(lambda: calls_of(settings, job) >= 9, timeout=120,
                     what="a cap's worth of calls in flight")
        finally:
            os.kill(doomed.pid, signal.SIGKILL)
            doomed.wait()
        wait_for(lambda: scalar(engine, "SELECT lease_until < now() FROM batches WHERE batch_id = :b", b=batch),
                 timeout=30, what="the dead worker's lease to run out")
        _run(engine, batch, settings, owner="rescuer")
        calls, billed = _settle_bill(settings, job)
    unconfirmed = _unconfirmed(engine, job)
    _report("kill-9", job, calls, billed, cap, unconfirmed)
    assert calls >= 9 and billed <= cap, f"the provider billed ${billed} for {calls} calls under a ${cap} cap"
    assert unconfirmed >= billed and unconfirmed == calls * each


def test_the_reconcile_counts_a_dead_workers_calls_nobody_took_back(stack, engine, process):
    """A worker killed mid-call whose batch is not run again: once no call can still be running, the
    budget upkeep makes its calls unconfirmed spend, and the counters count them."""
    from schedules import upkeep
    settings = process(provider_timeout_s=1.0, budget_reservation_ttl_s=1.0, budget_reservation_margin_s=0.0)
    job, batch, each, cap = _capped_batch(engine, 8, 2.5)
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO provider_calls (call_id, hold_id, job_id, custom_id, tier, batch_id, owner, max_cost_usd,"
            " created_at) SELECT :j || chr(58) || c || '~dead.1', :j || chr(58) || c || '~dead', :j, c, 'offpeak', :b,"
            " 'dead-worker', :m, now() - make_interval(secs => :age) FROM unnest(CAST(:cids AS text[])) AS c"),
            {"j": job, "b": batch, "m": each, "age": 5, "cids": ["r0", "r1"]})
        conn.execute(sa.text(   # and one sent just now: a live worker's call in flight, not touched
            "INSERT INTO provider_calls (call_id, hold_id, job_id, custom_id, tier, batch_id, owner, max_cost_usd)"
            " VALUES (:c, :h, :j, 'r2', 'offpeak', :b, 'live-worker', :m)"),
            {"c": f"{job}:r2~live.1", "h": f"{job}:r2~live", "j": job, "b": batch, "m": each})
    sredis = scripts.redis_clients(settings)[1]
    ledger.rebuild(engine, sredis, settings)
    upkeep.budget_reconcile(settings=settings, engine=engine)
    assert _unconfirmed(engine, job) == 2 * each
    assert scalar(engine, "SELECT state FROM provider_calls WHERE call_id = :c", c=f"{job}:r2~live.1") == "sent"
    spent = units.from_units(int(sredis.hget(scripts.KEYS[2], f"job:{job}") or 0))
    assert spent == 2 * each   # counted once: by the settle, or by the rebuild that read the ledger, not both
    with pytest.raises(errors.BudgetExceeded):   # the cap (2.5 calls) takes no third call
        asyncio.run(budget.Budget(settings, engine, *scripts.redis_clients(settings))
                    .reserve(f"{job}:r2~x", job, "offpeak", each))
