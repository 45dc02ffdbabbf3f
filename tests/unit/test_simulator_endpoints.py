"""The simulator's embeddings, completions, responses and moderations endpoints, realtime and in
Batch API files, checked against the OpenAI SDK's typed models of each response."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import math
import struct

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from openai.types import Completion, CreateEmbeddingResponse, ModerationCreateResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from simulator import SimulatorConfig, billing, start
from simulator.endpoints import worst_usage

CL100K = billing.encoding("cl100k_base")


def toks(text: str) -> int:
    return len(CL100K.encode_ordinary(text))


@contextlib.asynccontextmanager
async def serve(**options):
    runner, url = await start(SimulatorConfig(host="127.0.0.1", port=0, batch_processing_s=0.2,
                                              batch_stage_s=0.02, **options))
    oa = AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0, timeout=10)
    http = aiohttp.ClientSession()
    try:
        yield url, oa, http
    finally:
        await http.close()
        await oa.close()
        await runner.cleanup()


async def post(http, url, path, body) -> tuple[int, dict]:
    async with http.post(url + path, json=body, headers={"Authorization": "Bearer sk-test"}) as r:
        return r.status, await r.json()


def run(coro):
    return asyncio.run(coro)


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# --------------------------------------------------------------------------- embeddings

def test_embeddings_shape_size_usage_and_closeness():
    texts = ["The cat sat on the mat.", "The cat sat on a mat!", "Quarterly revenue grew by eleven percent."]

    async def body():
        async with serve() as (url, oa, http):
            small = await oa.embeddings.create(model="text-embedding-3-small", input=texts)
            large = await oa.embeddings.create(model="text-embedding-3-large", input=texts[0])
            ada = await oa.embeddings.create(model="text-embedding-ada-002", input=texts[0])
            short = await oa.embeddings.create(model="text-embedding-3-small", input=texts[0], dimensions=256)
            status, raw = await post(http, url, "/v1/embeddings", {"model": "text-embedding-3-small",
                                                                   "input": texts[:2]})
            tokens = await oa.embeddings.create(model="text-embedding-3-small",
                                                input=[CL100K.encode_ordinary(texts[0])])
            again = await oa.embeddings.create(model="text-embedding-3-small", input=texts)
            return small, large, ada, short, (status, raw), tokens, again

    small, large, ada, short, (status, raw), tokens, again = run(body())
    assert status == 200
    CreateEmbeddingResponse.model_validate(raw)
    assert raw["object"] == "list" and [d["index"] for d in raw["data"]] == [0, 1]
    assert [len(d.embedding) for d in small.data] == [1536] * 3
    assert len(large.data[0].embedding) == 3072 and len(ada.data[0].embedding) == 1536
    assert len(short.data[0].embedding) == 256
    assert small.usage.prompt_tokens == small.usage.total_tokens == sum(toks(t) for t in texts)
    vecs = [d.embedding for d in small.data]
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-5 for v in vecs)   # the SDK asks for float32 base64
    assert cosine(vecs[0], vecs[1]) > 0.6 > 0.2 > abs(cosine(vecs[0], vecs[2]))
    assert [d.embedding for d in again.data] == vecs                    # deterministic
    assert tokens.data[0].embedding == vecs[0]                          # its tokens embed as the text does
    assert tokens.usage.prompt_tokens == toks(texts[0])


def test_embeddings_base64_is_little_endian_float32():
    async def body():
        async with serve() as (url, oa, http):
            _, floats = await post(http, url, "/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"})
            _, b64 = await post(http, url, "/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi",
                                                              "encoding_format": "base64"})
            return floats, b64

    floats, b64 = run(body())
    raw = base64.b64decode(b64["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(decoded) == 1536
    assert all(abs(a - b) < 1e-6 for a, b in zip(decoded, floats["data"][0]["embedding"]))


def test_embeddings_limits_answer_openais_400s():
    long_item = "word " * 8200
    medium = "word " * 8000

    async def body():
        async with serve() as (url, oa, http):
            out = {}
            out["items"] = await post(http, url, "/v1/embeddings",
                                      {"model": "text-embedding-3-small", "input": ["x"] * 2049})
            out["empty"] = await post(http, url, "/v1/embeddings", {"model": "text-embedding-3-small", "input": ""})
            out["item"] = await post(http, url, "/v1/embeddings",
                                     {"model": "text-embedding-3-small", "input": [long_item]})
            out["request"] = await post(http, url, "/v1/embeddings",
                                        {"model": "text-embedding-3-small", "input": [medium] * 38})
            out["ok"] = await post(http, url, "/v1/embeddings",
                                   {"model": "text-embedding-3-small", "input": ["x"] * 2048})
            out["dims"] = await post(http, url, "/v1/embeddings",
                                     {"model": "text-embedding-ada-002", "input": "x", "dimensions": 8})
            out["model"] = await post(http, url, "/v1/embeddings", {"model": "gpt-4o", "input": "x"})
            return out

    out = run(body())
    invalid = "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference."
    for name in ("items", "empty"):
        assert out[name] == (400, {"error": {"message": invalid, "type": "invalid_request_error",
                                             "param": None, "code": None}})
    status, err = out["item"]
    assert status == 400 and err["error"]["message"].startswith("This model's maximum context length is 8192 tokens")
    status, err = out["request"]
    assert status == 400 and err["error"]["code"] == "max_tokens_per_request"
    assert err["error"]["message"] == f"Requested {38 * toks(medium)} tokens, max 300000 tokens per request"
    assert out["ok"][0] == 200 and len(out["ok"][1]["data"]) == 2048
    assert out["dims"][0] == 400 and out["dims"][1]["error"]["param"] == "dimensions"
    assert out["model"][0] == 404 and out["model"][1]["error"]["code"] == "model_not_found"


# --------------------------------------------------------------------------- completions

def test_completions_shape_defaults_best_of_and_echo():
    async def body():
        async with serve() as (url, oa, http):
            one = await oa.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once upon a time")
            status, raw = await post(http, url, "/v1/completions", {
                "model": "gpt-3.5-turbo-instruct", "prompt": ["Tell me", "Ask me"], "n": 2, "best_of": 3,
                "max_tokens": 5, "echo": True})
            with pytest.raises(openai.NotFoundError) as chat:
                await oa.completions.create(model="gpt-4o-mini", prompt="x")
            bad = await post(http, url, "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "x",
                                                            "n": 3, "best_of": 2})
            return one, (status, raw), chat.value, bad

    one, (status, raw), chat, bad = run(body())
    assert one.object == "text_completion" and len(one.choices) == 1
    assert one.usage.prompt_tokens == toks("Once upon a time")
    assert one.usage.completion_tokens == toks(one.choices[0].text) <= 16     # max_tokens defaults to 16
    assert one.choices[0].finish_reason == "length"
    assert status == 200
    Completion.model_validate(raw)
    assert [c["index"] for c in raw["choices"]] == [0, 1, 2, 3]
    assert raw["choices"][0]["text"].startswith("Tell me") and raw["choices"][2]["text"].startswith("Ask me")
    u = raw["usage"]
    assert u["prompt_tokens"] == toks("Tell me") + toks("Ask me")
    # best_of=3 generations per prompt are billed, n=2 returned; each is cut to 5 tokens
    assert 4 * 5 < u["completion_tokens"] <= 6 * 5 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert "chat model" in chat.body["message"]
    assert bad[0] == 400 and bad[1]["error"]["param"] == "best_of"


# --------------------------------------------------------------------------- responses

def test_responses_object_usage_reasoning_and_tools():
    tool = {"type": "function", "name": "lookup", "description": "Look a word up",
            "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}

    async def body():
        async with serve() as (url, oa, http):
            plain = await oa.responses.create(model="gpt-4o-mini", input="Say hello", instructions="Be brief.")
            status, raw = await post(http, url, "/v1/responses", {
                "model": "o4-mini", "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
                "max_output_tokens": 300})
            called = await oa.responses.create(model="gpt-4o-mini", input="define cat", tools=[tool],
                                               tool_choice="required")
            cut = await oa.responses.create(model="gpt-4o-mini", input="Say hello", max_output_tokens=16)
            chat = await oa.chat.completions.create(model="gpt-4o-mini", messages=[
                {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Say hello"}])
            low = await post(http, url, "/v1/responses", {"model": "gpt-4o-mini", "input": "x",
                                                          "max_output_tokens": 8})
            web = await post(http, url, "/v1/responses", {"model": "gpt-4o-mini", "input": "x",
                                                          "tools": [{"type": "web_search"}]})
            return plain, (status, raw), called, cut, chat, low, web

    plain, (status, raw), called, cut, chat, low, web = run(body())
    assert plain.object == "response" and plain.status == "completed"
    assert plain.output[0].type == "message" and plain.output_text.startswith("Simulated answer")
    # the Responses request counts as its chat twin does
    assert plain.usage.input_tokens == chat.usage.prompt_tokens
    assert plain.usage.output_tokens == chat.usage.completion_tokens
    assert plain.usage.input_tokens_details.cached_tokens == 0
    assert status == 200
    r = Response.model_validate(raw)
    assert r.output[0].type == "reasoning" and r.usage.output_tokens_details.reasoning_tokens > 0
    assert r.usage.output_tokens >= r.usage.output_tokens_details.reasoning_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert called.output[-1].type == "function_call" and json.loads(called.output[-1].arguments) == {"word": "simulated"}
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens <= 16
    assert low[0] == 400 and low[1]["error"]["param"] == "max_output_tokens"
    assert web[0] == 400 and web[1]["error"]["param"] == "tools[0].type"


# --------------------------------------------------------------------------- moderations

def test_moderations_results_flags_and_models():
    async def body():
        async with serve() as (url, oa, http):
            omni = await post(http, url, "/v1/moderations", {"input": ["a nice day", "I will kill you"]})
            text = await post(http, url, "/v1/moderations", {"model": "text-moderation-latest", "input": "hello"})
            multi = await oa.moderations.create(model="omni-moderation-latest", input=[
                {"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}])
            stats = await (await http.get(url + "/_stats")).json()
            return omni, text, multi, stats

    omni, text, multi, stats = run(body())
    assert omni[0] == 200
    m = ModerationCreateResponse.model_validate(omni[1])
    assert m.id.startswith("modr-") and len(m.results) == 2
    assert not m.results[0].flagged and m.results[1].flagged and m.results[1].categories.violence
    assert m.results[1].category_scores.violence > 0.5 > m.results[0].category_scores.violence
    assert text[0] == 200 and "illicit" not in text[1]["results"][0]["categories"]
    assert len(text[1]["results"][0]["categories"]) == 11
    assert len(multi.results) == 1 and "image" in multi.results[0].category_applied_input_types.violence
    assert stats["providers"]["openai"]["billed_usd"] == "0"


# --------------------------------------------------------------------------- batch output lines

LINES = {
    "/v1/chat/completions": ({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}, ChatCompletion),
    "/v1/responses": ({"model": "gpt-4o-mini", "input": "Hi"}, Response),
    "/v1/embeddings": ({"model": "text-embedding-3-small", "input": ["Hi", "there"]}, CreateEmbeddingResponse),
    "/v1/completions": ({"model": "gpt-3.5-turbo-instruct", "prompt": "Hi"}, Completion),
    "/v1/moderations": ({"model": "omni-moderation-latest", "input": "Hi"}, ModerationCreateResponse),
}


#: the completions models have no Batch API (gpt-3.5-turbo-instruct's model page: Batch not
#: supported; simulator/prices.py NO_BATCH): a batch of them fails validation instead
BATCHED = sorted(set(LINES) - {"/v1/completions"})


def test_a_completions_batch_of_a_model_without_a_batch_api_fails_validation_naming_each_line():
    body = LINES["/v1/completions"][0]

    async def go():
        async with serve() as (url, oa, http):
            blob = "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                                       "body": body}) + "\n" for i in range(2))
            f = await oa.files.create(file=("in.jsonl", io.BytesIO(blob.encode())), purpose="batch")
            batch = await oa.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
            for _ in range(200):
                batch = await oa.batches.retrieve(batch.id)
                if batch.status in ("completed", "failed"):
                    break
                await asyncio.sleep(0.05)
            stats = await (await http.get(url + "/_stats")).json()
            return batch, stats

    batch, stats = run(go())
    assert batch.status == "failed"
    assert [(e.code, e.line) for e in batch.errors.data] == [("model_not_supported", 1), ("model_not_supported", 2)]
    assert stats["providers"]["openai"].get("batch_lines", 0) == 0


@pytest.mark.parametrize("endpoint", BATCHED)
def test_batch_output_lines_are_openais_shape_for_every_endpoint(endpoint):
    body, model_type = LINES[endpoint]

    async def go():
        async with serve() as (url, oa, http):
            blob = "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": endpoint, "body": body}) + "\n"
                           for i in range(3))
            f = await oa.files.create(file=("in.jsonl", io.BytesIO(blob.encode())), purpose="batch")
            batch = await oa.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")
            for _ in range(200):
                batch = await oa.batches.retrieve(batch.id)
                if batch.status in ("completed", "failed"):
                    break
                await asyncio.sleep(0.05)
            content = await oa.files.content(batch.output_file_id)
            realtime = await post(http, url, endpoint, body)
            stats = await (await http.get(url + "/_stats")).json()
            return batch, [json.loads(x) for x in content.text.splitlines()], realtime, stats

    batch, lines, (status, realtime), stats = run(go())
    assert batch.status == "completed" and batch.request_counts.completed == 3
    assert sorted(x["custom_id"] for x in lines) == ["c0", "c1", "c2"]
    for line in lines:
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
        assert line["id"].startswith("batch_req_")
        assert set(line["response"]) == {"status_code", "request_id", "body"}
        assert line["response"]["status_code"] == 200
        model_type.model_validate(line["response"]["body"])
        # the same body answered in realtime: same fields, same usage
        assert set(line["response"]["body"]) == set(realtime)
        assert line["response"]["body"].get("usage") == realtime.get("usage")
    assert status == 200
    assert stats["providers"]["openai"]["batch_lines"] == 3


def test_an_embeddings_batch_holds_at_most_50000_inputs():
    async def go():
        async with serve() as (url, oa, http):
            line = {"method": "POST", "url": "/v1/embeddings",
                    "body": {"model": "text-embedding-3-small", "input": ["a"] * 2000}}
            blob = "".join(json.dumps({"custom_id": f"c{i}", **line}) + "\n" for i in range(26))
            f = await oa.files.create(file=("in.jsonl", io.BytesIO(blob.encode())), purpose="batch")
            batch = await oa.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
            for _ in range(200):
                batch = await oa.batches.retrieve(batch.id)
                if batch.status in ("completed", "failed"):
                    return batch
                await asyncio.sleep(0.05)

    batch = run(go())
    assert batch.status == "failed" and batch.errors.data[0].code == "too_many_inputs"


# --------------------------------------------------------------------------- worst case

def test_worst_case_covers_the_new_endpoints():
    comp = {"model": "gpt-3.5-turbo-instruct", "prompt": ["a", "b"], "n": 2, "best_of": 3, "max_tokens": 40}
    assert worst_usage("/v1/completions", comp)["completion_tokens"] == 2 * 3 * 40
    assert worst_usage("/v1/completions", {"model": "babbage-002", "prompt": "a"})["completion_tokens"] == 16
    emb = {"model": "text-embedding-3-small", "input": ["one two", "three"]}
    assert worst_usage("/v1/embeddings", emb) == {"prompt_tokens": toks("one two") + toks("three"),
                                                  "total_tokens": toks("one two") + toks("three")}
    resp = worst_usage("/v1/responses", {"model": "gpt-4o-mini", "input": "x", "max_output_tokens": 100})
    assert resp["output_tokens"] == 100 and resp["input_tokens_details"]["cached_tokens"] == 0
    assert worst_usage("/v1/responses", {"model": "gpt-4o-mini", "input": "x"})["output_tokens"] == 16384
    assert worst_usage("/v1/moderations", {"input": "x"}) == {}
    assert worst_usage("/v1/embeddings", {"model": "nope", "input": "x"}) is None

    async def go():
        async with serve(worst_case=True) as (url, oa, http):
            return await oa.completions.create(**comp)

    assert run(go()).usage.completion_tokens == 2 * 3 * 40
