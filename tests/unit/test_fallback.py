"""A job's fallback model: which requests may use it, and when an attempt switches to it."""

import asyncio
import contextlib
from decimal import Decimal

import pytest

from pipeline.config import load_settings
from pipeline.request import Request
from pipeline.errors import BudgetExceeded
from pipeline.errors import RetryableProviderError
from pipeline.money.budget import Reservation
from pipeline.money.pricing import get_price_book
from pipeline.money.units import to_units
from pipeline.providers.base import Answer
from workers.fallback import Fallback, fallback_for
from workers.limited import Limited

PRICES = get_price_book()
OK = Answer(body={"ok": True}, status_code=200, request_id="req_1", latency_ms=1, headers={})


def request(**over) -> Request:
    req = {"job_id": "j1", "custom_id": "c1", "provider": "openai", "model": "gpt-4o", "tier": "peak",
           "endpoint": "/v1/chat/completions",   # every stored row names its url (migration 024)
           "input_tokens": 1000, "max_cost_usd": "0.0125", "fallback_model": "gpt-4o-mini",
           "body": {"model": "gpt-4o", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]}}
    return Request.from_row({**req, **over})


# ------------------------------------------------------------------ which requests

def test_fallback_is_priced_for_the_request_as_written():
    fb = fallback_for(request(), PRICES)
    mini = PRICES.resolve("gpt-4o-mini")
    assert fb == Fallback("gpt-4o-mini", (1000 * mini.input_per_mtok + 1000 * mini.output_per_mtok) / 1_000_000)
    assert fb.max_cost_usd < Decimal("0.0125")


def test_the_fallbacks_maximum_is_the_same_true_bound_as_the_primarys():
    """n choices, tools and the rest count for the fallback too: its reservation was once a
    plain input + max_tokens formula, which n=4 overran four times over."""
    from pipeline.money.bounds import request_bound
    body = {"model": "gpt-4o", "max_tokens": 1000, "n": 4, "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
    fb = fallback_for(request(body=body), PRICES)
    bound = request_bound("openai", {**body, "model": "gpt-4o-mini"}, PRICES, declared_input_tokens=1000)
    assert fb.max_cost_usd == bound.max_cost_usd
    mini = PRICES.resolve("gpt-4o-mini")
    assert fb.max_cost_usd >= 4 * 1000 * mini.output_per_mtok / 1_000_000


@pytest.mark.parametrize("over, why", [
    ({"fallback_model": None}, "the job has none"),
    ({"fallback_model": "claude-3-5-haiku-latest"}, "another provider"),
    ({"fallback_model": "gpt-4o-2024-08-06"}, "an alias of the primary itself"),
    ({"fallback_model": "no-such-model"}, "unknown"),
    ({"body": {"model": "gpt-4o", "max_tokens": 10**6, "messages": []}}, "max_tokens over the fallback's"),
    ({"input_tokens": 10**7}, "prompt over the fallback's context window"),
])
def test_no_fallback_where_it_cannot_serve(over, why):
    assert fallback_for(request(**over), PRICES) is None, why


# ------------------------------------------------------------------ when an attempt switches

class FakeBudget:
    """Refuses any amount above ``room``; records what was reserved and released."""

    settings = None

    def __init__(self, room: Decimal):
        self.room, self.reserved, self.released = room, [], []

    async def reserve(self, rid, job_id, tier, amount, **kw):
        if amount > self.room:
            raise BudgetExceeded(f"job:{job_id}", Decimal(0), self.room)
        self.reserved.append(amount)
        return Reservation(rid, "g", [], to_units(amount), "2026-11-28")

    async def release(self, res):
        self.released.append(res)


class FakeLimiter:
    """The primary's window is ``primary_wait_s`` away; every other model admits at once.
    One key, never revoked (the key choice has tests of its own: test_keys.py)."""

    settings = load_settings({})

    def __init__(self, primary_wait_s: float = 0.0):
        self.primary_wait_s, self.admitted, self.blocked = primary_wait_s, [], []

    async def eval(self, script, keys, *args):   # the revocation marks: none
        return [None] * len(keys)

    @contextlib.asynccontextmanager
    async def lease(self, tier):
        yield 0.0

    async def admit(self, provider, model, tier, tokens, max_wait_s=None, **key):
        wait = self.primary_wait_s if model == "gpt-4o" else 0.0
        if max_wait_s is not None and wait > max_wait_s:
            return None
        self.admitted.append(model)
        return wait

    async def stamp(self, *args, **key):
        pass

    async def block(self, provider, model, seconds, **key):
        self.blocked.append((model, seconds))

    async def observe_headers(self, provider, model, headers, **key):
        pass


class Provider:
    name = "openai"

    def __init__(self, *outcomes):
        self.outcomes, self.models = list(outcomes), []

    async def call(self, body, *, headers, key=None):
        self.models.append(body["model"])
        out = self.outcomes.pop(0) if self.outcomes else OK
        if isinstance(out, Exception):
            raise out
        return out


def limited(provider, budget, limiter, req=None):
    req = req or request()
    return Limited(provider, req, budget, limiter, fallback_for(req, PRICES), fallback_wait_s=2.0)


def test_primary_answers_when_it_can():
    p, lim = Provider(), FakeLimiter()
    call = limited(p, FakeBudget(Decimal(1)), lim)
    asyncio.run(call.call(request().body, headers={}))
    assert p.models == ["gpt-4o"] and call.model == "gpt-4o" and lim.admitted == ["gpt-4o"]


def test_over_budget_for_the_primary_reserves_and_calls_the_fallback():
    p, budget = Provider(), FakeBudget(Decimal("0.005"))   # below gpt-4o's maximum, above mini's
    call = limited(p, budget, FakeLimiter())
    asyncio.run(call.call(request().body, headers={}))
    assert p.models == ["gpt-4o-mini"] and call.model == "gpt-4o-mini"
    assert budget.reserved == [fallback_for(request(), PRICES).max_cost_usd]


def test_over_budget_for_both_is_still_budget_exceeded():
    p = Provider()
    call = limited(p, FakeBudget(Decimal("0.00001")), FakeLimiter())
    with pytest.raises(BudgetExceeded):
        asyncio.run(call.call(request().body, headers={}))
    assert p.models == []


def test_no_fallback_set_means_budget_exceeded():
    p = Provider()
    req = request(fallback_model=None)
    call = limited(p, FakeBudget(Decimal("0.005")), FakeLimiter(), req)
    with pytest.raises(BudgetExceeded):
        asyncio.run(call.call(req.body, headers={}))


def test_a_primary_window_further_off_than_the_wait_goes_to_the_fallback():
    p, lim = Provider(), FakeLimiter(primary_wait_s=30.0)
    call = limited(p, FakeBudget(Decimal(1)), lim)
    asyncio.run(call.call(request().body, headers={}))
    assert p.models == ["gpt-4o-mini"] and lim.admitted == ["gpt-4o-mini"]


def test_a_short_wait_on_the_primary_keeps_the_primary():
    p, lim = Provider(), FakeLimiter(primary_wait_s=1.0)
    call = limited(p, FakeBudget(Decimal(1)), lim)
    asyncio.run(call.call(request().body, headers={}))
    assert p.models == ["gpt-4o"]


def test_a_429_on_the_primary_sends_the_next_attempt_to_the_fallback():
    p, lim, budget = Provider(RetryableProviderError("slow down", 429, retry_after=300)), FakeLimiter(), \
        FakeBudget(Decimal(1))
    call = limited(p, budget, lim)
    with pytest.raises(RetryableProviderError) as err:
        asyncio.run(call.call(request().body, headers={}))
    assert err.value.retry_after is None          # the fallback does not wait out the primary's 300 s
    assert lim.blocked == [("gpt-4o", 300)]       # but every worker's primary calls do
    assert len(budget.released) == 1
    asyncio.run(call.call(request().body, headers={}))
    assert p.models == ["gpt-4o", "gpt-4o-mini"] and call.model == "gpt-4o-mini"
