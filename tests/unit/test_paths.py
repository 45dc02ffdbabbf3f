"""The typed request and outcome, and the paths behind one interface (pure: no services).

Each path's price and reservation; flex: the flex price when flex answered, list price when a
429 "resource unavailable" sent it on at standard, the reservation at the standard price; a line
that asks for flex itself is priced at the flex price (it was recorded at full price).
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from importlib import resources

import pytest

from pipeline.config import Settings
from pipeline.errors import LineError, RetryableProviderError
from pipeline.ids import request_key
from pipeline.money.bounds import Bound
from pipeline.money.pricing import Usage, cost, get_price_book
from pipeline.paths import base as sequence
from pipeline.paths.flex import FLEX, FlexCaller, is_unavailable
from pipeline.paths.provider_batch import PROVIDER_BATCH
from pipeline.paths.realtime import REALTIME
from pipeline.paths.registry import names, path_for, path_of, scheduler_paths, worker_paths
from pipeline.providers.base import Answer
from pipeline.request import Outcome, Request

PRICES = get_price_book()
BODY = {"model": "gpt-5-mini", "max_completion_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}


def row(**over) -> dict:
    r = {"job_id": "job_1", "custom_id": "c-1", "line": 3, "batch_id": "b_1", "provider": "openai",
         "model": "gpt-5-mini", "tier": "peak", "tier_reason": "priority 5", "priority": 5, "deadline": None,
         "body": BODY, "metadata": {"k": "v"}, "input_tokens": 12, "tokens_exact": True,
         "max_cost_usd": "0.00020300", "status": "queued", "mode": "flex", "published_at": None,
         "cache_key": None, "endpoint": "/v1/chat/completions", "path_reason": "the job's mode flex"}
    return {**r, **over}


# ------------------------------------------------------------------ Request and Outcome

def test_a_request_row_round_trips():
    req = Request.from_row(row())
    assert req.path == "flex" and req.endpoint == "/v1/chat/completions" and req.bound.input_tokens == 12
    assert req.max_cost_usd == Decimal("0.00020300")
    assert req.to_row("queued") == row()
    assert Request.from_row(req.to_row("held")) == req


def test_the_key_is_built_in_one_place():
    req = Request.from_row(row(custom_id="café 1"))
    assert req.key == request_key("job_1", "café 1")
    assert Outcome("job_1", "café 1", "m", "succeeded").key == req.key


def test_a_row_without_endpoint_or_mode_takes_the_providers_url_and_realtime():
    req = Request.from_row({k: v for k, v in row(provider="anthropic").items() if k not in ("endpoint", "mode")})
    assert req.endpoint == "/v1/messages" and req.path == "realtime"


def test_an_outcome_is_one_row():
    req = Request.from_row(row())
    failed = Outcome.failed(req, "provider_error", "bad", attempts=2, status_code=400)
    r = failed.to_row()
    assert r["status"] == "failed" and r["error"] == {"code": "provider_error", "message": "bad"}
    assert r["attempts"] == 2 and r["cost_usd"] == "0" and r["path"] == "flex" and r["status_code"] == 400
    assert "budget_period" not in r   # the clock's day, in write_outcomes
    done = Outcome("j", "c", "gpt-5-mini", "succeeded", usage=Usage(10, 5, 2), cost=Decimal("0.5"),
                   budget_period="2026-12-05")
    r = done.to_row()
    assert (r["input_tokens"], r["cached_input_tokens"], r["output_tokens"]) == (10, 2, 5)
    assert r["cost_usd"] == "0.5" and r["budget_period"] == "2026-12-05"
    assert json.loads(json.dumps(r)) == r   # the writer sends it as JSON


# ------------------------------------------------------------------ each path's price

USAGE = Usage(input_tokens=1000, output_tokens=500, cached_input_tokens=200)


@pytest.mark.parametrize("path,served,factor", [
    (REALTIME, None, 1), (REALTIME, "default", 1), (REALTIME, "flex", Decimal("0.5")),
    (FLEX, "flex", Decimal("0.5")), (FLEX, "default", 1),
    (PROVIDER_BATCH, None, Decimal("0.5")),
])
def test_each_paths_price(path, served, factor):
    price = PRICES.resolve("gpt-5-mini")
    assert path.price(price, USAGE, None, served) == cost(price, USAGE) * factor


def test_reservations_flex_at_the_standard_price_provider_batch_at_the_batch_price():
    req = Request.from_row(row())
    assert REALTIME.reservation(req) == FLEX.reservation(req) == Decimal("0.00020300")
    assert PROVIDER_BATCH.reservation(req) == Decimal("0.00010150")


def test_flex_holds_outlive_the_flex_timeout():
    s = Settings(flex_timeout_s=900.0, budget_reservation_margin_s=30.0)
    assert FLEX.hold_ttl_s(s) == 930.0 and REALTIME.hold_ttl_s(s) is None


def test_flex_serves_only_the_models_the_price_book_marks():
    assert FLEX.why_not(Request.from_row(row()), PRICES.resolve("gpt-5-mini")) is None
    why = FLEX.why_not(Request.from_row(row(model="gpt-4o-mini")), PRICES.resolve("gpt-4o-mini"))
    assert "does not take flex" in why
    with pytest.raises(LineError, match="the flex path cannot serve this request"):
        sequence.check_serves(FLEX, Request.from_row(row(model="gpt-4o-mini")), PRICES.resolve("gpt-4o-mini"))
    emb = Request.from_row(row(endpoint="/v1/embeddings"))
    assert "serves" in FLEX.why_not(emb, PRICES.resolve("gpt-5-mini"))


def test_the_registry_answers_what_callers_used_to_decide_by_name():
    assert names() == ("realtime", "flex", "provider_batch", "window")
    assert worker_paths() == ["realtime", "flex", "window"] and scheduler_paths() == ["provider_batch"]
    assert path_for(None) is REALTIME and path_for("flex") is FLEX
    with pytest.raises(LineError, match="mode must be one of"):
        path_for("cheapest")
    assert path_of("realtime", {**BODY, "service_tier": "flex"}) is FLEX
    assert path_of("provider_batch", {**BODY, "service_tier": "flex"}) is PROVIDER_BATCH
    assert REALTIME.initial_status("peak") == "queued" and FLEX.initial_status("offpeak") == "held"
    assert PROVIDER_BATCH.initial_status("peak") == "held"
    assert REALTIME.fast_lane and not FLEX.fast_lane and not PROVIDER_BATCH.fast_lane


def test_the_message_schema_takes_every_path():
    schema = json.loads(resources.files("pipeline").joinpath("data/request.schema.json").read_text())
    assert set(schema["properties"]["mode"]["enum"]) - {None} == set(names()) | {"auto"}


# ------------------------------------------------------------------ the price step

def _answer_body(tier: str | None) -> dict:
    body = {"object": "chat.completion", "model": "gpt-5-mini",
            "usage": {"prompt_tokens": 1000, "completion_tokens": 500}}
    return body if tier is None else {**body, "service_tier": tier}


def test_a_line_that_asks_for_flex_is_priced_at_the_flex_price():
    """It passed the bound, but its cost was recorded at the full price."""
    req = Request.from_row(row(mode="realtime", body={**BODY, "service_tier": "flex"}))
    full = cost(PRICES.resolve("gpt-5-mini"), Usage(1000, 500))
    path = path_of(req.path, req.body)
    out = sequence.answered(path, req, _answer_body("flex"), PRICES, attempts=1)
    assert out.cost == full / 2 and out.list_cost == full and out.lever == "flex" and out.service_tier == "flex"
    # even on the realtime path, an answer served by flex is at the flex price
    out = sequence.answered(REALTIME, req, _answer_body("flex"), PRICES, attempts=1)
    assert out.cost == full / 2


def test_a_flex_request_standard_answered_is_at_list_price_with_no_lever():
    req = Request.from_row(row())
    full = cost(PRICES.resolve("gpt-5-mini"), Usage(1000, 500))
    out = sequence.answered(FLEX, req, _answer_body("default"), PRICES, served="default", attempts=2)
    assert out.cost == full and out.lever is None and out.service_tier == "default" and out.path == "flex"


def test_no_usage_settles_the_whole_hold():
    req = Request.from_row(row())
    out = sequence.answered(FLEX, req, {"object": "chat.completion"}, PRICES, attempts=1)
    assert out.usage_missing and out.cost == 0
    assert sequence.settle_amount(out, 20300) == Decimal("0.000203")
    ok = sequence.answered(FLEX, req, _answer_body("flex"), PRICES, attempts=1)
    assert sequence.settle_amount(ok, 20300) == ok.cost


# ------------------------------------------------------------------ the flex call

class Raw:
    name = "openai"

    def __init__(self, *outcomes):
        self.outcomes, self.sent = list(outcomes), []

    async def call(self, body, *, headers, timeout=None, url=None):
        self.sent.append((body.get("service_tier"), timeout))
        out = self.outcomes.pop(0)
        if isinstance(out, Exception):
            raise out
        return out


OK = Answer(body=_answer_body(None), status_code=200, request_id="r", latency_ms=1, headers={})
UNAVAILABLE = RetryableProviderError(
    "Error code: 429 - {'error': {'message': 'Resource unavailable: flex processing has no capacity',"
    " 'type': 'resource_unavailable', 'code': 'resource_unavailable'}}", 429)


def test_flex_is_sent_with_its_long_timeout():
    raw = Raw(OK)
    caller = FlexCaller(raw, 900.0)
    asyncio.run(caller.call(BODY, headers={}))
    assert raw.sent == [("flex", 900.0)] and caller.served == "flex" and caller.unavailable == 0


def test_flex_unavailable_goes_on_at_standard_at_once():
    raw = Raw(UNAVAILABLE, OK)
    caller = FlexCaller(raw, 900.0)
    assert asyncio.run(caller.call({**BODY, "service_tier": "flex"}, headers={})) is OK
    assert raw.sent == [("flex", 900.0), (None, None)] and caller.served == "default" and caller.unavailable == 1


def test_a_rate_limit_is_not_flex_unavailability():
    limited = RetryableProviderError("Error code: 429 - rate limit reached for requests", 429)
    assert is_unavailable(UNAVAILABLE) and not is_unavailable(limited)
    raw = Raw(limited)
    with pytest.raises(RetryableProviderError):
        asyncio.run(FlexCaller(raw, 900.0).call(BODY, headers={}))
    assert raw.sent == [("flex", 900.0)]


def test_bound_is_carried_as_is():
    b = Bound(5, 7, Decimal("0.1"), False)
    req = Request("j", "c", "/v1/chat/completions", "openai", "gpt-5-mini", "flex", "peak", BODY, b)
    assert req.bound is b and req.max_cost_usd == Decimal("0.1")


def test_a_fallback_model_without_flex_is_sent_at_standard():
    raw = Raw(OK)
    caller = FlexCaller(raw, 900.0)
    asyncio.run(caller.call({**BODY, "model": "gpt-4o-mini", "service_tier": "flex"}, headers={}))
    assert raw.sent == [(None, None)] and caller.served == "default"


# ------------------------------------------------------------------ intake asks the path

def _message(model: str, mode: str | None, **body_extra) -> bytes:
    from pipeline.intake.formats import parse_request
    from pipeline.intake.producer import to_message
    line = {"custom_id": "x1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "max_completion_tokens": 50, "messages": [{"role": "user", "content": "hi"}],
                     **body_extra}}
    return to_message("job_1", 3, parse_request(line, PRICES), mode=mode or "realtime")


def test_the_batcher_asks_the_path():
    from pipeline.intake.messages import decode
    row = decode(_message("gpt-5-mini", "flex"))
    assert row["mode"] == "flex" and row["status"] in ("queued", "held")
    assert Request.from_row(row).path == "flex"
    assert decode(_message("gpt-5-mini", None, service_tier="flex"))["mode"] == "flex"
    assert decode(_message("gpt-5-mini", "provider_batch"))["status"] == "held"
    with pytest.raises(LineError, match="does not take flex"):
        decode(_message("gpt-4o-mini", "flex"))


def test_only_a_path_that_answers_at_once_takes_the_fast_lane():
    from pipeline.intake.formats import parse_request
    from pipeline.intake.producer import topic_for
    line = {"custom_id": "x1", "method": "POST", "url": "/v1/chat/completions", "priority": 9,
            "body": {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}]}}
    req = parse_request(line, PRICES)
    assert topic_for(req) == "llm.requests.immediate"
    assert topic_for(req, mode="flex") == topic_for(req, mode="provider_batch") == "llm.requests"
