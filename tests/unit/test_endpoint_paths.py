"""The endpoint of a request through the paths: what an answer costs (``answer_cost``), the url a
provider call posts to, provider-batch lines and packing, the ingest's usage, embedding vectors
apart from the JSON answer, and export in the provider's shape per endpoint."""

from __future__ import annotations

import array
import asyncio
import base64
import json
import struct
from decimal import Decimal

import pytest

from pipeline.constants import CHAT_URL, EMBEDDINGS_URL, MODERATIONS_URL, RESPONSES_URL
from pipeline.endpoints import ENDPOINTS, answer_cost, endpoint_of
from pipeline.money.pricing import cost, get_price_book, usage_from_openai
from pipeline.paths.provider_batch import outcome_of_line, request_line
from pipeline.providers.base import at_url
from pipeline.request import Request
from pipeline.stores import embeddings
from pipeline.stores.export import anthropic_line, answer_text, openai_line
from schedules.pb_submit import pack_by_endpoint

PRICES = get_price_book()
EMBEDDING = {"object": "list", "model": "text-embedding-3-small", "usage": {"prompt_tokens": 4, "total_tokens": 4},
             "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25, 0.0]},
                      {"object": "embedding", "index": 1, "embedding": [0.125, 1.0, -1.0]}]}
MODERATION = {"id": "modr-1", "model": "omni-moderation-latest",
              "results": [{"flagged": False, "categories": {}, "category_scores": {}}]}


def test_answer_cost_reads_usage_through_the_endpoint():
    price = PRICES.resolve("text-embedding-3-small")
    usage, spent = answer_cost(ENDPOINTS[EMBEDDINGS_URL], EMBEDDING, price)
    assert (usage.input_tokens, usage.output_tokens) == (4, 0)
    assert spent == cost(price, usage) == 4 * price.input_per_mtok / 10**6
    assert answer_cost(ENDPOINTS[EMBEDDINGS_URL], EMBEDDING, price, batch=True)[1] == spent / 2


def test_a_moderation_reports_no_usage_and_costs_nothing_without_being_missing():
    assert answer_cost(ENDPOINTS[MODERATIONS_URL], MODERATION, PRICES.resolve("omni-moderation-latest")) == (None, 0)


def test_a_paid_answer_without_usage_has_an_unknown_cost():
    body = {"object": "chat.completion", "choices": []}
    assert answer_cost(ENDPOINTS[CHAT_URL], body, PRICES.resolve("gpt-4o-mini")) == (None, None)


def test_rows_from_before_endpoints_are_chat():
    assert endpoint_of(None, "openai").url == CHAT_URL
    assert endpoint_of(None, "anthropic").url == "/v1/messages"
    assert endpoint_of(EMBEDDINGS_URL, "openai").url == EMBEDDINGS_URL


def test_a_provider_call_posts_to_the_requests_url():
    got = []

    class Recorder:
        name = "openai"

        async def call(self, body, *, headers, url=None):
            got.append(url)
            return "answer"

    provider = at_url(Recorder(), EMBEDDINGS_URL)
    assert provider.name == "openai"
    assert asyncio.run(provider.call({}, headers={})) == "answer" and got == [EMBEDDINGS_URL]


def test_the_openai_client_path_is_the_url_under_its_v1_base(monkeypatch):
    from pipeline.config import load_settings
    from pipeline.providers import openai as openai_provider
    from pipeline.providers.registry import build_registry

    sent = []

    async def post_raw(sdk, client, path, body, headers, rid, timeout=None):
        sent.append(path)

    monkeypatch.setattr(openai_provider, "post_raw", post_raw)
    spec = build_registry(load_settings({})).get("openai")
    for url in (None, EMBEDDINGS_URL, RESPONSES_URL):
        asyncio.run(openai_provider.call(None, spec, {}, {}, url))
    assert sent == ["/chat/completions", "/embeddings", "/responses"]


def test_batch_lines_carry_their_url_and_a_provider_batch_holds_one():
    body = {"model": "text-embedding-3-small", "input": "x"}
    req = Request.from_row({"job_id": "j", "custom_id": "c", "provider": "openai", "model": body["model"],
                            "endpoint": EMBEDDINGS_URL, "tier": "offpeak", "body": body})
    assert json.loads(request_line(req))["url"] == EMBEDDINGS_URL
    reqs = [{"endpoint": u, "body": {"input": "x"}} for u in [CHAT_URL] * 3 + [RESPONSES_URL] * 2 + [EMBEDDINGS_URL] * 5]
    chunks = pack_by_endpoint(reqs, [10] * 10, max_requests=2, max_bytes=10**6)
    assert chunks == [(0, 2), (2, 3), (3, 5), (5, 7), (7, 9), (9, 10)]
    assert all(len({r["endpoint"] for r in reqs[a:b]}) == 1 for a, b in chunks)
    assert pack_by_endpoint([], [], 2, 10) == []


def test_an_embeddings_provider_batch_holds_at_most_its_limit_of_inputs():
    emb = [{"endpoint": EMBEDDINGS_URL, "body": {"input": x}}
           for x in (["a"] * 3, "b", [1, 2, 3], [[1, 2], [3]], ["c"] * 4)]   # 3, 1, 1, 2, 4 inputs
    assert pack_by_endpoint(emb, [1] * 5, max_requests=5, max_bytes=100) == [(0, 3), (3, 4), (4, 5)]
    chat = [{"endpoint": CHAT_URL, "body": {"input": ["a"] * 9}}] * 5     # other urls count requests
    assert pack_by_endpoint(chat, [1] * 5, max_requests=5, max_bytes=100) == [(0, 5)]


def test_ingest_reads_usage_through_the_requests_endpoint():
    row = {"job_id": "j", "custom_id": "c", "provider": "openai", "model": "text-embedding-3-small",
           "endpoint": EMBEDDINGS_URL, "tier": "offpeak", "attempts": 0, "path": "provider_batch"}
    line = {"custom_id": "q", "response": {"status_code": 200, "request_id": "r", "body": EMBEDDING}, "error": None}
    outcome, attempt, _ = outcome_of_line(Request.from_row(row), line, PRICES)
    outcome = outcome.to_row()
    assert outcome["input_tokens"] == 4 and outcome["output_tokens"] == 0 and not outcome["usage_missing"]
    assert Decimal(outcome["cost_usd"]) == cost(PRICES.resolve("text-embedding-3-small"),
                                                usage_from_openai(EMBEDDING["usage"]), batch=True)
    mod = Request.from_row(dict(row, model="omni-moderation-latest", endpoint=MODERATIONS_URL))
    line = {"custom_id": "q", "response": {"status_code": 200, "request_id": "r", "body": MODERATION}, "error": None}
    outcome, _, _ = outcome_of_line(mod, line, PRICES)
    outcome = outcome.to_row()
    assert Decimal(outcome["cost_usd"]) == 0 and outcome["usage_missing"] is False and outcome["status"] == "succeeded"


# --------------------------------------------------------------------------- embeddings storage

def _decode(value: bytes) -> list[float]:
    ndim, nulls, oid, n, low = struct.unpack(">5i", value[:20])
    assert (ndim, nulls, oid, low) == (1, 0, 700, 1)
    values = struct.unpack(f">{'if' * n}", value[20:])
    assert values[0::2] == (4,) * n
    return list(values[1::2])


def test_split_takes_the_vectors_out_and_leaves_the_outcome_as_it_was():
    outcome = {"job_id": "j", "custom_id": "c", "status": "succeeded", "response": EMBEDDING}
    other = {"job_id": "j", "custom_id": "d", "status": "succeeded", "response": MODERATION}
    rows, vectors = embeddings.split([outcome, other])
    assert rows[1] is other and outcome["response"] is EMBEDDING   # the cache still gets the whole answer
    assert [d["embedding"] for d in rows[0]["response"]["data"]] == [None, None]
    assert rows[0]["response"]["usage"] == EMBEDDING["usage"]
    assert [(i, _decode(v)) for i, v in vectors[("j", "c")]] == [(0, [0.5, -0.25, 0.0]), (1, [0.125, 1.0, -1.0])]


def test_base64_vectors_are_stored_as_the_same_floats_and_exported_as_base64_again():
    floats = [0.1, -2.5, 3.25]
    b64 = base64.b64encode(array.array("f", floats).tobytes()).decode()
    body = dict(EMBEDDING, data=[{"object": "embedding", "index": 0, "embedding": b64}])
    _, vectors = embeddings.split([{"job_id": "j", "custom_id": "c", "response": body}])
    stored = _decode(vectors[("j", "c")][0][1])
    assert stored == array.array("f", floats).tolist()
    kept = dict(body, data=[{"object": "embedding", "index": 0, "embedding": None}])
    assert embeddings.attach(kept, [stored], "base64") == body


def test_failed_and_odd_answers_are_kept_whole():
    odd = dict(EMBEDDING, data=[{"object": "embedding", "index": 0, "embedding": ["x"]}])
    rows, vectors = embeddings.split([{"job_id": "j", "custom_id": "c", "status": "succeeded", "response": odd},
                                      {"job_id": "j", "custom_id": "d", "status": "failed", "response": None}])
    assert vectors == {} and rows[0]["response"] is odd


def test_vectors_read_back_from_postgres_text_and_attach_in_index_order():
    text = "{{0.5,-0.25,0},{0.125,1,-1}}"   # array_agg(vector ORDER BY idx)::text
    vectors = embeddings.read_vectors(text)
    assert vectors == [[0.5, -0.25, 0.0], [0.125, 1.0, -1.0]]
    assert all(isinstance(x, float) for v in vectors for x in v)
    assert str(embeddings.read_vectors("{{-0,1e-07}}")) == "[[-0.0, 1e-07]]"   # the sign of zero kept
    kept = embeddings.split([{"job_id": "j", "custom_id": "c", "response": EMBEDDING}])[0][0]["response"]
    assert embeddings.attach(kept, vectors) == EMBEDDING
    assert embeddings.read_vectors(None) is None and embeddings.attach(MODERATION, None) is MODERATION


# --------------------------------------------------------------------------- export per endpoint

def _row(body, endpoint):
    return {"custom_id": "a", "line": 1, "status": "succeeded", "status_code": 200, "response": body,
            "error": None, "provider_request_id": "req_1", "endpoint": endpoint}


def test_export_writes_the_openai_batch_output_line_of_every_endpoint():
    for body, url in ((EMBEDDING, EMBEDDINGS_URL), (MODERATION, MODERATIONS_URL)):
        line = openai_line("job", _row(body, url))
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
        assert line["response"] == {"status_code": 200, "request_id": "req_1", "body": body}


def test_answer_text_of_responses_and_text_completions():
    response = {"object": "response", "output": [
        {"type": "reasoning", "summary": []},
        {"type": "message", "content": [{"type": "output_text", "text": "Hi "}, {"type": "output_text", "text": "there"}]}]}
    assert answer_text(response) == "Hi there"
    assert answer_text({"object": "text_completion", "choices": [{"text": "once", "index": 0}]}) == "once"
    assert answer_text(EMBEDDING) is None and answer_text(MODERATION) is None


def test_the_anthropic_shape_is_for_messages_only():
    with pytest.raises(ValueError, match="/v1/embeddings answer has no Anthropic results shape"):
        anthropic_line("job", _row(EMBEDDING, EMBEDDINGS_URL))


def test_a_fallback_is_bounded_by_the_requests_endpoint():
    from workers.fallback import fallback_for

    row = {"job_id": "j", "custom_id": "c", "tier": "peak", "provider": "openai", "model": "text-embedding-3-large",
           "endpoint": EMBEDDINGS_URL, "fallback_model": "text-embedding-3-small", "input_tokens": 3,
           "body": {"model": "text-embedding-3-large", "input": "one two three"}}
    req = Request.from_row(row)
    fallback = fallback_for(req, PRICES)
    small = PRICES.resolve("text-embedding-3-small")
    assert fallback.model == "text-embedding-3-small" and fallback.max_cost_usd == 3 * small.input_per_mtok / 10**6
    assert fallback_for(Request.from_row(dict(row, fallback_model="gpt-4o-mini")), PRICES) is None   # does not serve the url
