"""A flex request in a worker: reserved at the standard price, sent as flex, priced by the tier that
answered; a flex 429 "resource unavailable" goes on at standard under the same hold (no services)."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from pipeline.config import Settings
from pipeline.money.pricing import Usage, cost, get_price_book
from pipeline.request import Request
from tests.unit.test_fallback import FakeBudget, FakeLimiter
from tests.unit.test_paths import OK, UNAVAILABLE, Raw, row
from workers import execute
from workers.writer import OutcomeWriter

FULL = cost(get_price_book().resolve("gpt-5-mini"), Usage(1000, 500))


def run(monkeypatch, raw, **over):
    monkeypatch.setattr(execute, "get_provider", lambda name, settings: raw)
    monkeypatch.setattr(execute, "limiter_for", lambda settings, budget: FakeLimiter())
    writer = OutcomeWriter(engine=None, batch_id="b_1")
    writer.budget = FakeBudget(Decimal(1))
    writer.budget.settings = Settings()
    req = Request.from_row(row(**over))
    state = asyncio.run(execute.run_request(req, Settings(flex_timeout_s=600.0), writer))
    return state, writer


def test_flex_answered_is_at_the_flex_price_and_reserved_at_standard(monkeypatch):
    state, writer = run(monkeypatch, Raw(OK))
    (outcome,), ((res, settle),) = writer.outcomes, writer.settles
    assert state == "succeeded" and outcome.service_tier == "flex" and outcome.lever == "flex"
    assert outcome.cost == FULL / 2 and outcome.list_cost == FULL and settle == outcome.cost
    assert writer.budget.reserved == [Decimal("0.00020300")]   # the standard maximum


def test_flex_unavailable_is_answered_at_standard_under_the_same_hold(monkeypatch):
    raw = Raw(UNAVAILABLE, OK)
    state, writer = run(monkeypatch, raw)
    (outcome,) = writer.outcomes
    assert state == "succeeded" and raw.sent == [("flex", 600.0), (None, None)]
    assert outcome.service_tier == "default" and outcome.cost == FULL and outcome.lever is None
    assert writer.budget.reserved == [Decimal("0.00020300")] and writer.budget.released == []


def test_a_realtime_line_asking_for_flex_is_priced_at_the_flex_price(monkeypatch):
    flex_answer = type(OK)(body={**OK.body, "service_tier": "flex"}, status_code=200, request_id="r",
                           latency_ms=1, headers={})
    raw = Raw(flex_answer)
    state, writer = run(monkeypatch, raw, mode="realtime",
                        body={"model": "gpt-5-mini", "service_tier": "flex", "messages": []})
    (outcome,) = writer.outcomes
    assert state == "succeeded" and outcome.cost == FULL / 2
