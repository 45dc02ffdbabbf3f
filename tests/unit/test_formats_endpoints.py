"""Every url of pipeline.endpoints through ``parse_request``: the endpoint validates and bounds
the body, the request carries its url, and the message and the batcher's row keep it."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from pipeline.constants import (ANTHROPIC_MESSAGES_URL, CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL,
                                MODERATIONS_URL, RESPONSES_URL)
from pipeline.endpoints import ENDPOINTS
from pipeline.endpoints.caching import cache_key
from pipeline.errors import LineError
from pipeline.intake import messages
from pipeline.intake.formats import OPENAI_URLS, parse_request
from pipeline.intake.producer import to_message
from pipeline.money.pricing import PriceBook

PRICES = PriceBook.load()

BODIES = {
    CHAT_URL: {"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]},
    RESPONSES_URL: {"model": "gpt-4o-mini", "input": "Say hi", "max_output_tokens": 20},
    EMBEDDINGS_URL: {"model": "text-embedding-3-small", "input": ["one fish", "two fish"]},
    COMPLETIONS_URL: {"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon", "max_tokens": 8},
    MODERATIONS_URL: {"model": "omni-moderation-latest", "input": "I like turtles"},
}


def line(url: str, body: dict | None = None, **extra) -> dict:
    return {"custom_id": "c1", "method": "POST", "url": url, "body": body or BODIES[url], **extra}


def test_every_openai_url_of_the_registry_is_accepted_and_only_those():
    assert set(OPENAI_URLS) == set(BODIES) == {u for u, e in ENDPOINTS.items() if e.line_format == "openai"}


@pytest.mark.parametrize("url", sorted(BODIES))
def test_each_url_is_parsed_bounded_by_its_endpoint_and_carries_its_url(url):
    req = parse_request(line(url), PRICES)
    bound = ENDPOINTS[url].bound(BODIES[url], PRICES.resolve(BODIES[url]["model"]))
    assert req.endpoint == url and req.provider == "openai"
    assert (req.input_tokens, req.max_tokens, req.max_cost_usd) == (bound.input_tokens, bound.max_output_tokens,
                                                                   bound.max_cost_usd)


def test_figures_per_endpoint():
    emb = parse_request(line(EMBEDDINGS_URL), PRICES)
    assert emb.max_tokens == 0 and emb.input_tokens == 4 and emb.tokens_exact   # 2 + 2 tokens, no output
    assert emb.max_cost_usd == 4 * PRICES.resolve("text-embedding-3-small").input_per_mtok / 10**6
    mod = parse_request(line(MODERATIONS_URL), PRICES)
    assert mod.max_cost_usd == 0 and mod.input_tokens > 0 and not mod.tokens_exact
    comp = parse_request(line(COMPLETIONS_URL), PRICES)
    assert comp.max_tokens == 8


def test_anthropic_lines_are_messages():
    req = parse_request({"custom_id": "a", "params": {"model": "claude-haiku-4-5", "max_tokens": 5,
                                                      "messages": [{"role": "user", "content": "Hi"}]}}, PRICES)
    assert req.endpoint == ANTHROPIC_MESSAGES_URL


@pytest.mark.parametrize("url, body, expected", [
    (EMBEDDINGS_URL, {"model": "text-embedding-3-small"}, "missing field body.input"),
    (EMBEDDINGS_URL, {"model": "text-embedding-3-small", "input": ""}, "empty string"),
    (EMBEDDINGS_URL, {"model": "gpt-4o-mini", "input": "x"}, "gpt-4o-mini"),
    (CHAT_URL, {"model": "text-embedding-3-small", "messages": [{"role": "user", "content": "x"}]},
     "text-embedding-3-small"),
    (RESPONSES_URL, {"model": "gpt-4o-mini", "input": "x", "tools": [{"type": "web_search"}]},
     "cannot be bounded"),
    (COMPLETIONS_URL, {"model": "gpt-3.5-turbo-instruct"}, "missing field body.prompt"),
    (MODERATIONS_URL, {"model": "omni-moderation-latest", "input": []}, "non-empty array"),
    (MODERATIONS_URL, {"model": "omni-moderation-latest", "input": "x", "messages": []},
     "body.messages is not a /v1/moderations field"),
])
def test_refusals_are_the_endpoints_and_name_the_field(url, body, expected):
    with pytest.raises(LineError) as e:
        parse_request(line(url, body), PRICES)
    assert expected in e.value.reason


def test_no_messages_needed_outside_chat():
    for url in (RESPONSES_URL, EMBEDDINGS_URL, COMPLETIONS_URL, MODERATIONS_URL):
        assert "messages" not in BODIES[url]
        parse_request(line(url), PRICES)


def _row(value: bytes) -> dict:
    return messages.decode(value, datetime.now(timezone.utc), PRICES)


@pytest.mark.parametrize("url", sorted(BODIES))
def test_the_message_carries_the_url_and_the_batcher_bounds_it_again(url):
    req = parse_request(line(url, cache=True), PRICES)
    value = to_message("job_x", 1, req)
    m = json.loads(value)
    assert m["endpoint"] == url
    messages.validate(m)   # the published schema takes it
    row = _row(value)
    assert row["endpoint"] == url and row["max_cost_usd"] == str(req.max_cost_usd)
    assert row["cache_key"] == cache_key("openai", BODIES[url], url)


def test_the_batcher_recomputes_the_bound_by_the_messages_endpoint():
    req = parse_request(line(EMBEDDINGS_URL), PRICES)
    m = json.loads(to_message("job_x", 1, req))
    m["max_cost_usd"] = "0"                      # a producer's hint is never what is stored
    assert _row(json.dumps(m).encode())["max_cost_usd"] == str(req.max_cost_usd)
    m["endpoint"] = CHAT_URL                      # an embeddings body under the chat url is refused
    with pytest.raises(LineError, match="messages"):
        _row(json.dumps(m).encode())
    m["endpoint"] = "/v1/images"
    with pytest.raises(LineError, match="endpoint"):
        messages.validate(m)
    m["endpoint"] = ANTHROPIC_MESSAGES_URL        # not one of openai's
    with pytest.raises(LineError):
        _row(json.dumps(m).encode())


def test_a_message_without_endpoint_is_chat_as_before():
    req = parse_request(line(CHAT_URL), PRICES)
    m = json.loads(to_message("job_x", 1, req))
    del m["endpoint"]
    assert _row(json.dumps(m).encode())["endpoint"] == CHAT_URL


def test_the_schema_lists_every_url():
    schema = messages.validator().schema
    assert set(schema["properties"]["endpoint"]["enum"]) == set(ENDPOINTS) | {None}
    assert schema["properties"]["body"]["required"] == ["model"]


def test_embeddings_are_cached_only_when_a_line_asks():
    """20,000 cached embedding answers took 194 MB of Redis (the Celery broker, noeviction) to save $0.009."""
    req = parse_request(line(EMBEDDINGS_URL), PRICES)
    assert _row(to_message("job_x", 1, req))["cache_key"] is None
    mod = parse_request(line(MODERATIONS_URL), PRICES)
    assert _row(to_message("job_x", 1, mod))["cache_key"] is not None   # small answers: cached by default
