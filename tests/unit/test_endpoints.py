"""The Endpoint interface, its registry, the price book's endpoints and the cache key (issue 20, item 4)."""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from pathlib import Path

import pytest

from pipeline.endpoints import caching as cache
from pipeline.money.bounds import request_bound
from pipeline.constants import ENDPOINT_URLS
from pipeline.endpoints import ENDPOINTS, Endpoint, endpoint_bound, endpoint_for
from pipeline.errors import ConfigError, LineError
from pipeline.money.pricing import PriceBook, Usage

PRICES = PriceBook.load()
CHAT_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Classify: broken parcel"}],
             "max_tokens": 50}
CLAUDE_BODY = {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}]}
ONE_OF_EACH = {
    "/v1/chat/completions": CHAT_BODY,
    "/v1/messages": CLAUDE_BODY,
    "/v1/responses": {"model": "gpt-4o-mini", "input": "Hi", "max_output_tokens": 50},
    "/v1/embeddings": {"model": "text-embedding-3-small", "input": "Hi"},
    "/v1/completions": {"model": "gpt-3.5-turbo-instruct", "prompt": "Hi"},
    "/v1/moderations": {"model": "omni-moderation-latest", "input": "Hi"},
}


def reason(fn, *args, **kw) -> str:
    with pytest.raises(LineError) as e:
        fn(*args, **kw)
    return e.value.reason


def test_endpoint_registry_holds_every_url_once_and_each_is_an_endpoint():
    assert sorted(ENDPOINTS) == sorted(ENDPOINT_URLS) == sorted(ONE_OF_EACH)
    for url, endpoint in ENDPOINTS.items():
        assert isinstance(endpoint, Endpoint) and endpoint.url == url and endpoint_for(url) is endpoint
        assert endpoint.line_format == ("anthropic" if url == "/v1/messages" else "openai")
        bound = endpoint_bound(url, ONE_OF_EACH[url], PRICES)
        assert bound.input_tokens > 0 and bound.max_cost_usd >= 0


@pytest.mark.parametrize("url", ["/v1/images/generations", "/v1/chat/completions/", "", None, 3])
def test_endpoint_for_an_unknown_url_names_the_known_ones(url):
    r = reason(endpoint_for, url)
    assert r.startswith("url must be one of /v1/chat/completions, /v1/messages, /v1/responses, /v1/embeddings")
    assert repr(url) in r


@pytest.mark.parametrize("url,model", [
    ("/v1/chat/completions", "text-embedding-3-small"), ("/v1/embeddings", "gpt-4o"),
    ("/v1/completions", "gpt-4o"), ("/v1/responses", "davinci-002"), ("/v1/moderations", "text-embedding-3-large"),
])
def test_endpoint_refuses_a_model_that_does_not_serve_it_naming_both(url, model):
    body = {**ONE_OF_EACH[url], "model": model}
    r = reason(endpoint_bound, url, body, PRICES)
    assert r.startswith(f"model {model} does not serve {url}; it serves ")


@pytest.mark.parametrize("url,model,provider", [("/v1/chat/completions", "claude-haiku-4-5", "anthropic"),
                                                ("/v1/messages", "gpt-4o", "openai")])
def test_endpoint_of_the_other_provider_keeps_the_old_reason(url, model, provider):
    body = {**ONE_OF_EACH[url], "model": model}
    assert reason(endpoint_bound, url, body, PRICES).startswith(f"model {model} is served by {provider}, not ")


def test_endpoint_chat_model_on_the_old_path_is_refused_too():
    """request_bound (the chat path the batcher uses today) checks the url as well."""
    body = {**CHAT_BODY, "model": "text-embedding-3-small"}
    assert "does not serve /v1/chat/completions" in reason(request_bound, "openai", body, PRICES)


@pytest.mark.parametrize("provider,body", [
    ("openai", CHAT_BODY),
    ("openai", {**CHAT_BODY, "n": 3, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
    ("anthropic", CLAUDE_BODY),
    ("anthropic", {**CLAUDE_BODY, "system": [{"type": "text", "text": "Be brief", "cache_control": {"type": "ephemeral"}}]}),
])
def test_endpoint_chat_and_messages_adapters_change_nothing(provider, body):
    url = "/v1/chat/completions" if provider == "openai" else "/v1/messages"
    assert endpoint_bound(url, body, PRICES) == request_bound(provider, body, PRICES)
    assert (endpoint_bound(url, body, PRICES, declared_input_tokens=10_000)
            == request_bound(provider, body, PRICES, declared_input_tokens=10_000))


@pytest.mark.parametrize("url,body,field", [
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": "hi"}, "body.messages"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "robot", "content": "x"}]}, "body.messages[0].role"),
    ("/v1/messages", {"model": "claude-haiku-4-5", "messages": [{"role": "system", "content": "x"}]}, "params.messages[0].role"),
    ("/v1/messages", {**CLAUDE_BODY, "system": 3}, "params.system"),
    ("/v1/chat/completions", {"messages": []}, "body.model"),
    ("/v1/messages", {"messages": []}, "params.model"),
])
def test_endpoint_chat_validate_names_the_field(url, body, field):
    assert field in reason(ENDPOINTS[url].validate, body)


def test_endpoint_usage_reads_each_answer_shape():
    assert ENDPOINTS["/v1/chat/completions"].usage(
        {"usage": {"prompt_tokens": 9, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 0}}}
    ) == Usage(9, 3)
    assert ENDPOINTS["/v1/messages"].usage(
        {"usage": {"input_tokens": 9, "output_tokens": 3, "cache_read_input_tokens": 4}}) == Usage(13, 3, 4)
    assert ENDPOINTS["/v1/responses"].usage(
        {"object": "response", "usage": {"input_tokens": 9, "output_tokens": 30,
                                         "input_tokens_details": {"cached_tokens": 2}}}) == Usage(9, 30, 2)
    assert ENDPOINTS["/v1/embeddings"].usage(
        {"object": "list", "data": [], "usage": {"prompt_tokens": 8, "total_tokens": 8}}) == Usage(8, 0)
    assert ENDPOINTS["/v1/completions"].usage(
        {"object": "text_completion", "usage": {"prompt_tokens": 5, "completion_tokens": 7}}) == Usage(5, 7)
    assert ENDPOINTS["/v1/moderations"].usage({"id": "modr-1", "results": [{"flagged": False}]}) is None
    for endpoint in ENDPOINTS.values():
        assert endpoint.usage({}) is None and endpoint.usage(None) is None


def test_endpoint_cacheable_only_when_deterministic():
    for url in ("/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/completions"):
        body = ONE_OF_EACH[url]
        assert not ENDPOINTS[url].cacheable(body) and ENDPOINTS[url].cacheable({**body, "temperature": 0})
    assert ENDPOINTS["/v1/embeddings"].cacheable(ONE_OF_EACH["/v1/embeddings"])
    assert ENDPOINTS["/v1/moderations"].cacheable(ONE_OF_EACH["/v1/moderations"])


# --------------------------------------------------------------------------- cache key

def old_cache_key(provider: str, body: dict) -> str:
    """The key before endpoints existed, written out again."""
    return hashlib.sha256(json.dumps({"provider": provider, "body": body}, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode()).hexdigest()


def test_endpoint_cache_key_of_chat_and_messages_is_unchanged():
    for provider, body, url in (("openai", CHAT_BODY, "/v1/chat/completions"),
                                ("anthropic", CLAUDE_BODY, "/v1/messages")):
        assert cache.cache_key(provider, body) == cache.cache_key(provider, body, url) == old_cache_key(provider, body)


def test_endpoint_cache_key_includes_every_other_url():
    body = {"model": "m", "input": "the same text"}
    keys = {cache.cache_key("openai", body, url) for url in ("/v1/embeddings", "/v1/moderations", "/v1/responses",
                                                             "/v1/completions")}
    assert len(keys) == 4 and old_cache_key("openai", body) not in keys


# --------------------------------------------------------------------------- the price book

def book(tmp_path: Path, **entry) -> PriceBook:
    base = {"provider": "openai", "input": "0.02", "cached_input": "0.02", "output": "0", "batch_discount": "0.5",
            "context_window": 8192, "max_output_tokens": 0, "effective_date": "2026-12-05",
            "source": "https://example.com"}
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": {"my-embedder": {**base, **entry}}}))
    return PriceBook.load(path)


def test_endpoint_fields_in_the_price_book():
    small = PRICES.resolve("text-embedding-3-small")
    assert small.endpoints == ("/v1/embeddings",) and small.dimensions == 1536 and small.max_output_tokens == 0
    assert PRICES.resolve("text-embedding-3-large").dimensions == 3072
    assert PRICES.resolve("gpt-4o").endpoints == ("/v1/chat/completions", "/v1/responses")
    assert PRICES.resolve("claude-haiku-4-5").endpoints == ("/v1/messages",)
    assert PRICES.resolve("davinci-002").endpoints == ("/v1/completions",)
    assert PRICES.resolve("text-moderation-stable").model == "text-moderation-latest"
    for name in ("omni-moderation-latest", "text-moderation-latest"):
        price = PRICES.resolve(name)
        assert price.input_per_mtok == price.output_per_mtok == Decimal(0)


def test_endpoint_fields_a_user_file_may_set(tmp_path):
    price = book(tmp_path, endpoints=["/v1/embeddings"], dimensions=768).resolve("my-embedder")
    assert price.endpoints == ("/v1/embeddings",) and price.dimensions == 768


@pytest.mark.parametrize("entry,message", [
    ({"endpoints": ["/v1/embeddings"]}, "an embedding model needs dimensions, a positive integer, got None"),
    ({"endpoints": ["/v1/embeddings"], "dimensions": 0}, "needs dimensions, a positive integer, got 0"),
    ({"endpoints": ["/v1/embeddings"], "dimensions": "768"}, "needs dimensions, a positive integer, got '768'"),
    ({"endpoints": ["/v1/moderations"], "dimensions": 768}, "dimensions is only for models that serve /v1/embeddings"),
    ({"endpoints": []}, "endpoints must be a non-empty list of distinct urls from /v1/chat/completions"),
    ({"endpoints": "/v1/embeddings", "dimensions": 8}, "endpoints must be a non-empty list"),
    ({"endpoints": ["/v1/images"]}, "got ['/v1/images']"),
    ({"endpoints": ["/v1/moderations", "/v1/moderations"]}, "distinct urls"),
    ({"endpoints": ["/v1/completions"]}, "max_output_tokens may be 0 only for a model serving embeddings"),
    ({}, "max_output_tokens may be 0 only"),   # default endpoints: chat and responses generate
])
def test_endpoint_fields_wrong_in_the_price_book_are_config_errors(tmp_path, entry, message):
    with pytest.raises(ConfigError) as e:
        book(tmp_path, **entry)
    assert "model 'my-embedder'" in str(e.value) and message in str(e.value)
