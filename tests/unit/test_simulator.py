"""The simulator, driven in-process through the official SDKs (no external services)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
from datetime import datetime, timezone
from decimal import Decimal

import aiohttp
import anthropic
import openai
import pytest
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI

from pipeline.errors import ConfigError
from pipeline.money import tokens
from simulator import SimulatorConfig, billing, config_from_args, start
from simulator.config import ModelLimit
from simulator.limits import go_duration

MODEL = "gpt-4o-mini"
CLAUDE = "claude-haiku-4-5"
MSGS = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Summarise the plot of Hamlet in one line."}]


@contextlib.asynccontextmanager
async def serve(**options):
    runner, url = await start(SimulatorConfig(host="127.0.0.1", port=0, **options))
    oa = AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0, timeout=10)
    an = AsyncAnthropic(base_url=url, api_key="sk-test", max_retries=0, timeout=10)
    http = aiohttp.ClientSession()
    try:
        yield url, oa, an, http
    finally:
        await http.close()
        await oa.close()
        await an.close()
        await runner.cleanup()


async def get_stats(http, url) -> dict:
    async with http.get(f"{url}/_stats") as r:
        assert r.status == 200
        return await r.json()


def run(coro):
    return asyncio.run(coro)


# --------------------------------------------------------------------------- answers

def test_openai_answer_is_deterministic_with_exact_usage():
    async def body():
        async with serve() as (url, oa, an, http):
            raw = await oa.chat.completions.with_raw_response.create(model=MODEL, messages=MSGS)
            first = raw.parse()
            assert raw.headers["x-request-id"].startswith("req_")
            assert raw.headers["x-llmbatch-simulator"] == "1"
            again = await oa.chat.completions.create(model=MODEL, messages=MSGS)
            other = await oa.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Something else entirely"}])
            return first, again, other

    first, again, other = run(body())
    text = first.choices[0].message.content
    assert first.id.startswith("chatcmpl-") and first.object == "chat.completion"
    assert first.model == MODEL and first.choices[0].message.role == "assistant"
    assert re.match(r"^Simulated answer [0-9a-f]{8}: \w+", text)
    assert again.choices[0].message.content == text
    assert again.id != first.id
    assert other.choices[0].message.content != text
    assert first.choices[0].finish_reason == "stop"
    u = first.usage
    assert u.prompt_tokens == tokens.count_chat_tokens(MSGS, MODEL)
    assert u.completion_tokens == tokens.count_text_tokens(text, MODEL)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.completion_tokens > 10
    assert u.prompt_tokens_details.cached_tokens == 0
    assert u.completion_tokens_details.reasoning_tokens == 0


def test_max_tokens_caps_the_answer():
    async def body():
        async with serve() as (url, oa, an, http):
            full = await oa.chat.completions.create(model=MODEL, messages=MSGS)
            capped = await oa.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=7)
            capped2 = await oa.chat.completions.create(model=MODEL, messages=MSGS, max_completion_tokens=2)
            m_full = await an.messages.create(model=CLAUDE, max_tokens=1000, messages=MSGS[1:])
            m_capped = await an.messages.create(model=CLAUDE, max_tokens=6, messages=MSGS[1:])
            return full, capped, capped2, m_full, m_capped

    full, capped, capped2, m_full, m_capped = run(body())
    text = full.choices[0].message.content
    for c, limit in ((capped, 7), (capped2, 2)):
        assert c.choices[0].finish_reason == "length"
        assert 0 < c.usage.completion_tokens <= limit
        assert c.usage.completion_tokens == tokens.count_text_tokens(c.choices[0].message.content, MODEL)
        assert text.startswith(c.choices[0].message.content)
    assert capped.usage.completion_tokens == 7  # filled up to the limit, cut mid-word if need be
    assert m_full.stop_reason == "end_turn"
    assert m_capped.stop_reason == "max_tokens"
    assert 0 < m_capped.usage.output_tokens <= 6
    assert m_full.content[0].text.startswith(m_capped.content[0].text)


def test_anthropic_message_shape_and_usage():
    async def body():
        async with serve() as (url, oa, an, http):
            raw = await an.messages.with_raw_response.create(
                model=CLAUDE, max_tokens=500, system="Be brief.", messages=MSGS[1:])
            return raw.headers, await raw.parse()

    headers, m = run(body())
    assert headers["request-id"].startswith("req_")
    assert headers["x-llmbatch-simulator"] == "1"
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant"
    assert m.model == CLAUDE
    assert m.content[0].type == "text" and m.content[0].text.startswith("Simulated answer ")
    # the simulator's own Claude stand-in (billing.py), not the pipeline's estimate
    expected = billing.anthropic_prompt(
        {"model": CLAUDE, "max_tokens": 500, "system": "Be brief.", "messages": MSGS[1:]})
    assert m.usage.input_tokens == expected
    assert m.usage.output_tokens == billing.claude_count(m.content[0].text)
    assert m.usage.cache_read_input_tokens == 0 and m.usage.cache_creation_input_tokens == 0


# --------------------------------------------------------------------------- validation

def test_validation_errors_in_each_providers_shape():
    async def body():
        async with serve() as (url, oa, an, http):
            out = {}
            async with http.post(f"{url}/v1/chat/completions", json={"model": MODEL}) as r:
                out["oa_missing"] = (r.status, await r.json(), r.headers.get("x-llmbatch-simulator"))
            async with http.post(f"{url}/v1/chat/completions", data=b"{not json") as r:
                out["oa_json"] = (r.status, await r.json())
            async with http.post(f"{url}/v1/messages", json={"model": CLAUDE, "messages": MSGS[1:]}) as r:
                out["an_missing"] = (r.status, await r.json())
            with pytest.raises(openai.BadRequestError) as e:
                await oa.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])
            out["oa_sdk"] = e.value
            with pytest.raises(openai.NotFoundError) as e:
                await oa.chat.completions.create(model="no-such-model", messages=MSGS)
            out["oa_404"] = e.value
            with pytest.raises(anthropic.BadRequestError) as e:
                await an.messages.create(model=CLAUDE, max_tokens=0, messages=MSGS[1:])
            out["an_sdk"] = e.value
            out["stats"] = await get_stats(http, url)
            return out

    out = run(body())
    status, err, mark = out["oa_missing"]
    assert status == 400 and mark == "1"
    assert err == {"error": {"message": "Missing required parameter: 'messages'.",
                             "type": "invalid_request_error", "param": "messages",
                             "code": "missing_required_parameter"}}
    assert out["oa_json"][0] == 400 and out["oa_json"][1]["error"]["type"] == "invalid_request_error"
    status, err = out["an_missing"]
    assert status == 400
    assert err["type"] == "error"
    assert err["error"] == {"type": "invalid_request_error", "message": "max_tokens: Field required"}
    assert out["oa_sdk"].status_code == 400 and out["oa_sdk"].body["param"] == "messages[0].role"
    assert out["oa_404"].body["code"] == "model_not_found"
    assert out["an_sdk"].status_code == 400
    assert out["an_sdk"].body["error"]["type"] == "invalid_request_error"
    assert out["stats"]["total"]["errors"] == {"400": 5, "404": 1}
    assert out["stats"]["total"]["successes"] == 0


# --------------------------------------------------------------------------- injected errors

def test_injected_429_carries_retry_after_and_sdk_raises_rate_limit_error():
    async def body():
        async with serve(error_rates={"429": 1.0}, injected_retry_after_s=2.5) as (url, oa, an, http):
            with pytest.raises(openai.RateLimitError) as e1:
                await oa.chat.completions.create(model=MODEL, messages=MSGS)
            with pytest.raises(anthropic.RateLimitError) as e2:
                await an.messages.create(model=CLAUDE, max_tokens=10, messages=MSGS[1:])
            return e1.value, e2.value, await get_stats(http, url)

    e1, e2, stats = run(body())
    assert e1.response.headers["retry-after"] == "3"
    assert e1.response.headers["retry-after-ms"] == "2500"
    assert e1.body["code"] == "rate_limit_exceeded"
    assert e2.response.headers["retry-after"] == "3"
    assert e2.body["error"]["type"] == "rate_limit_error"
    assert stats["total"]["errors"] == {"429": 2}


def test_injected_500_and_529_shapes():
    async def body():
        async with serve(error_rates={"500": 0.5, "529": 0.5}, seed=3) as (url, oa, an, http):
            seen = []
            for _ in range(12):
                try:
                    await an.messages.create(model=CLAUDE, max_tokens=10, messages=MSGS[1:])
                    seen.append("ok")
                except anthropic.APIStatusError as e:
                    seen.append((e.status_code, e.body["error"]["type"]))
            with contextlib.suppress(openai.APIStatusError):
                for _ in range(12):
                    await oa.chat.completions.create(model=MODEL, messages=MSGS)
            return seen

    seen = run(body())
    assert "ok" not in seen
    assert set(seen) == {(500, "api_error"), (529, "overloaded_error")}


def test_error_draws_are_deterministic_per_seed():
    async def pattern(seed):
        async with serve(error_rates={"429": 0.5}, seed=seed) as (url, oa, an, http):
            out = []
            for _ in range(24):
                try:
                    await oa.chat.completions.create(model=MODEL, messages=MSGS)
                    out.append(0)
                except openai.RateLimitError:
                    out.append(1)
            async with http.post(f"{url}/_reset") as r:
                assert r.status == 200
            again = []
            for _ in range(24):
                try:
                    await oa.chat.completions.create(model=MODEL, messages=MSGS)
                    again.append(0)
                except openai.RateLimitError:
                    again.append(1)
            assert again == out  # reset reseeds
            return out

    a, b, c = run(pattern(7)), run(pattern(7)), run(pattern(8))
    assert a == b
    assert a != c
    assert 3 < sum(a) < 21


def test_timeout_and_hangup():
    async def body():
        async with serve(error_rates={"timeout": 1.0}, timeout_sleep_s=5) as (url, oa, an, http):
            with pytest.raises(openai.APITimeoutError):
                await oa.chat.completions.create(model=MODEL, messages=MSGS, timeout=0.3)
            await asyncio.sleep(0.05)
            s1 = await get_stats(http, url)
        async with serve(error_rates={"hangup": 1.0}) as (url, oa, an, http):
            with pytest.raises(openai.APIConnectionError) as e:
                await oa.chat.completions.create(model=MODEL, messages=MSGS)
            assert not isinstance(e.value, openai.APITimeoutError)
            s2 = await get_stats(http, url)
        return s1, s2

    s1, s2 = run(body())
    assert s1["total"]["errors"] == {"timeout": 1} and s1["total"]["in_flight"] == 0
    assert s2["total"]["errors"] == {"hangup": 1}


def test_a_generation_is_billed_when_its_client_went_away():
    """A provider bills what it generated: a client that timed out, or a line dropped after the
    generation, does not make the call free (it used to be counted with no usage at all)."""
    async def body():
        async with serve(hold_s=0.6, worst_case=True) as (url, oa, an, http):
            with pytest.raises(openai.APITimeoutError):
                await oa.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=40, timeout=0.2,
                                                 extra_headers={"Idempotency-Key": "jobA:r1"})
            mid = await get_stats(http, url)
            await asyncio.sleep(0.8)   # the generation finishes after its client has gone
            async with http.get(f"{url}/_stats?key_prefix=jobA:") as r:
                late = await r.json()
        async with serve(error_rates={"hangup": 1.0}, worst_case=True) as (url, oa, an, http):
            with pytest.raises(openai.APIConnectionError):
                await oa.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=40,
                                                 extra_headers={"Idempotency-Key": "jobB:r1"})
            async with http.get(f"{url}/_stats?key_prefix=jobB:") as r:
                hung = await r.json()
        return mid, late, hung

    mid, late, hung = run(body())
    assert mid["billed_calls"] == 0 and mid["unattended"] == 1   # still generating, client gone
    assert late["total"]["errors"] == {"client_closed": 1} and late["unattended"] == 0
    assert late["billed_calls"] == 1 and late["keys"]["billed_calls"] == 1
    assert late["keys"]["billed"]["completion_tokens"] == 40   # worst case: to its limit
    assert late["keys"]["billed_by_key"]["jobA:r1"]["calls"] == 1
    assert hung["keys"]["billed_calls"] == 1 and hung["keys"]["billed"]["completion_tokens"] == 40
    # the bill in USD, by the simulator's own prices: gpt-4o-mini $0.15 in, $0.60 out per 1M tokens
    b = late["keys"]["billed"]
    dollars = (Decimal(b["prompt_tokens"]) * Decimal("0.15") + 40 * Decimal("0.60")) / 10**6
    assert Decimal(late["keys"]["billed_usd"]) == dollars > 0
    assert late["keys"]["billed_usd_by_key"] == {"jobA:r1": late["keys"]["billed_usd"]}
    assert late["keys"]["unpriced_calls"] == 0


# --------------------------------------------------------------------------- limits

def test_rpm_limit_enforced_with_openai_headers():
    async def body():
        async with serve(rpm=5) as (url, oa, an, http):
            remaining = []
            for _ in range(5):
                raw = await oa.chat.completions.with_raw_response.create(model=MODEL, messages=MSGS)
                remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
                assert raw.headers["x-ratelimit-limit-requests"] == "5"
            with pytest.raises(openai.RateLimitError) as e:
                await oa.chat.completions.create(model=MODEL, messages=MSGS)
            # another model has its own window
            await oa.chat.completions.create(model="gpt-4o", messages=MSGS)
            return remaining, e.value, await get_stats(http, url)

    remaining, err, stats = run(body())
    assert remaining == [4, 3, 2, 1, 0]
    h = err.response.headers
    assert h["x-ratelimit-limit-requests"] == "5"
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert re.fullmatch(r"\d+(\.\d+)?s|\d+ms", h["x-ratelimit-reset-requests"])
    assert 55 <= int(h["retry-after"]) <= 60
    assert 55_000 <= int(h["retry-after-ms"]) <= 60_000
    assert err.body["type"] == "requests" and err.body["code"] == "rate_limit_exceeded"
    assert stats["by_model"][MODEL]["requests"] == 6
    assert stats["by_model"][MODEL]["errors"] == {"429": 1}
    assert stats["by_model"][MODEL]["peak_requests_60s"] == 6
    assert stats["by_model"]["gpt-4o"]["successes"] == 1


def test_tpm_limit_and_anthropic_headers():
    async def body():
        async with serve(tpm=10_000, model_limits={CLAUDE: ModelLimit(rpm=2, tpm=None)}) as (url, oa, an, http):
            ok = await an.messages.with_raw_response.create(model=CLAUDE, max_tokens=10, messages=MSGS[1:])
            await an.messages.create(model=CLAUDE, max_tokens=10, messages=MSGS[1:])
            with pytest.raises(anthropic.RateLimitError) as e:
                await an.messages.create(model=CLAUDE, max_tokens=10, messages=MSGS[1:])
            first = await oa.chat.completions.with_raw_response.create(
                model=MODEL, messages=MSGS, max_tokens=6000)
            with pytest.raises(openai.RateLimitError) as e2:
                await oa.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=6000)
            return ok.headers, e.value, first.headers, e2.value

    ok, err, first, err2 = run(body())
    assert ok["anthropic-ratelimit-requests-limit"] == "2"
    assert ok["anthropic-ratelimit-requests-remaining"] == "1"
    reset = datetime.fromisoformat(ok["anthropic-ratelimit-requests-reset"].replace("Z", "+00:00"))
    assert 50 < (reset - datetime.now(timezone.utc)).total_seconds() <= 61
    assert ok["anthropic-ratelimit-tokens-limit"] == "10000"  # tpm not overridden: the default
    assert err.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert int(err.response.headers["retry-after"]) >= 55
    prompt = tokens.count_chat_tokens(MSGS, MODEL)
    assert first["x-ratelimit-limit-tokens"] == "10000"
    assert first["x-ratelimit-remaining-tokens"] == str(10_000 - prompt - 6000)
    assert err2.body["type"] == "tokens"
    assert err2.response.headers["x-ratelimit-remaining-tokens"] == str(10_000 - prompt - 6000)


# --------------------------------------------------------------------------- stats

def test_stats_peak_concurrency_tiers_and_duplicate_keys():
    async def body():
        async with serve(latency_ms=300) as (url, oa, an, http):
            keys = [f"k{i}" for i in range(8)] + ["k1", "k2", "k2"]
            calls = [oa.chat.completions.create(
                model=MODEL, messages=MSGS,
                extra_headers={"Idempotency-Key": k, "X-LLMBatch-Tier": "peak"}) for k in keys]
            calls.append(an.messages.create(model=CLAUDE, max_tokens=5, messages=MSGS[1:]))
            await asyncio.gather(*calls)
            stats = await get_stats(http, url)
            prefixed = {}
            for prefix in ("k1", "k", "none"):
                async with http.get(f"{url}/_stats", params={"key_prefix": prefix}) as r:
                    prefixed[prefix] = (await r.json())["keys"]
            async with http.post(f"{url}/_reset") as r:
                assert r.status == 200
            async with http.get(f"{url}/healthz") as r:
                health = (r.status, r.headers["x-llmbatch-simulator"])
            return stats, prefixed, await get_stats(http, url), health

    stats, prefixed, after, health = run(body())
    t = stats["total"]
    assert t["requests"] == 12 and t["successes"] == 12
    assert t["peak_concurrency"] == 12 and t["in_flight"] == 0
    assert t["duplicates"] == 3
    assert stats["duplicate_keys"] == {"k2": 2, "k1": 1}
    assert "keys" not in stats
    counted = {p: {k: v[k] for k in ("prefix", "calls", "distinct", "billed_calls")} for p, v in prefixed.items()}
    assert counted == {"k1": {"prefix": "k1", "calls": 2, "distinct": 1, "billed_calls": 2},
                       "k": {"prefix": "k", "calls": 11, "distinct": 8, "billed_calls": 11},
                       "none": {"prefix": "none", "calls": 0, "distinct": 0, "billed_calls": 0}}
    peak = stats["by_tier"]["peak"]
    assert peak["requests"] == 11 and peak["peak_concurrency"] == 11 and peak["duplicates"] == 3
    assert stats["by_tier"]["untagged"]["requests"] == 1
    assert stats["by_model"][CLAUDE]["requests"] == 1
    assert stats["by_model_tier"][MODEL]["peak"]["requests"] == 11
    prompt = tokens.count_chat_tokens(MSGS, MODEL)
    assert stats["by_model"][MODEL]["peak_tokens_60s"] == 11 * (prompt + 4096)
    assert stats["by_model"][MODEL]["peak_requests_60s"] == 11
    assert after["total"]["requests"] == 0 and after["duplicate_keys"] == {}
    assert health == (200, "1")


def test_latency_is_applied():
    async def body():
        async with serve(latency="uniform", latency_ms=150, jitter_ms=50) as (url, oa, an, http):
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await oa.chat.completions.create(model=MODEL, messages=MSGS)
            return loop.time() - t0

    assert 0.1 <= run(body()) < 1.0


# --------------------------------------------------------------------------- config

def test_config_from_args_and_files(tmp_path):
    c = config_from_args(["--port", "58081", "--latency-ms", "5", "--error-rate", "429=0.2,500=0.05",
                          "--rpm", "6000", "--tpm", "100000", "--model-limit", "gpt-4o=10:",
                          "--seed", "4"])
    assert c.port == 58081 and c.latency_ms == 5 and c.seed == 4
    assert c.error_rates == {"429": 0.2, "500": 0.05}
    assert c.limit_for("gpt-4o") == ModelLimit(10, 100000)
    assert c.limit_for("other") == ModelLimit(6000, 100000)

    toml = tmp_path / "sim.toml"
    toml.write_text('[simulator]\nport = 1234\nrpm = 50\nerror_rates = {"529" = 0.1}\n'
                    '[simulator.model_limits.gpt-4o]\ntpm = 99\n')
    t = SimulatorConfig.from_file(toml)
    assert t.port == 1234 and t.error_rates == {"529": 0.1}
    assert t.limit_for("gpt-4o") == ModelLimit(50, 99)
    js = tmp_path / "sim.json"
    js.write_text(json.dumps({"latency": "normal", "latency_ms": 20, "jitter_ms": 5}))
    assert SimulatorConfig.from_file(js).latency == "normal"
    over = config_from_args(["--config", str(toml), "--port", "9"])
    assert over.port == 9 and over.rpm == 50

    for bad in (["--error-rate", "418=0.1"], ["--error-rate", "429=0.7,500=0.6"], ["--rpm", "0"]):
        with pytest.raises(ConfigError):
            config_from_args(bad)
    js.write_text(json.dumps({"nope": 1}))
    with pytest.raises(ConfigError):
        SimulatorConfig.from_file(js)


def test_go_durations():
    assert go_duration(0.012) == "12ms"
    assert go_duration(1.5) == "1.5s"
    assert go_duration(360) == "6m0s"
    assert go_duration(59.9996) == "1m0s"
    assert go_duration(0) == "0s"


# --------------------------------------------------------------------------- provider batch APIs

FAST_BATCH = {"batch_processing_s": 0.3, "batch_stage_s": 0.05}


def _oa_line(i, **body):
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Question number {i}"}],
                     "max_tokens": 40, **body}}


async def _upload(oa, lines) -> str:
    data = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()
    f = await oa.files.create(file=("input.jsonl", data), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(data) and f.id.startswith("file-")
    return f.id


async def _wait_openai(oa, batch_id, until=("completed", "failed", "cancelled")):
    seen = []
    for _ in range(200):
        b = await oa.batches.retrieve(batch_id)
        if not seen or seen[-1] != b.status:
            seen.append(b.status)
        if b.status in until:
            return b, seen
        await asyncio.sleep(0.02)
    raise AssertionError(f"batch stuck: {seen}")


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_openai_batch_lifecycle_end_to_end():
    async def body():
        async with serve(**FAST_BATCH) as (url, oa, an, http):
            lines = [_oa_line(i) for i in range(8)]
            lines[3]["body"]["messages"] = []  # refused by the API: goes to the error file
            fid = await _upload(oa, lines)
            b = await oa.batches.create(input_file_id=fid, endpoint="/v1/chat/completions",
                                        completion_window="24h", metadata={"job": "j1"})
            assert b.status == "validating" and b.metadata == {"job": "j1"}
            b, seen = await _wait_openai(oa, b.id)
            out = _jsonl((await oa.files.content(b.output_file_id)).text)
            err = _jsonl((await oa.files.content(b.error_file_id)).text)
            direct = await oa.chat.completions.create(**lines[5]["body"])
            page1 = await oa.batches.list(limit=1)
            stats = await get_stats(http, url)   # before the second batch can run
            # a second batch, so the list pages
            fid2 = await _upload(oa, [_oa_line(100)])
            b2 = await oa.batches.create(input_file_id=fid2, endpoint="/v1/chat/completions",
                                         completion_window="24h")
            first = await oa.batches.list(limit=1)
            second = await oa.batches.list(limit=1, after=first.data[0].id)
            return b, seen, out, err, direct, page1, b2, first, second, stats

    b, seen, out, err, direct, page1, b2, first, second, stats = run(body())
    assert seen[0] in ("validating", "in_progress") and seen[-1] == "completed"
    assert "in_progress" in seen
    assert b.request_counts.total == 8 and b.request_counts.completed == 7 and b.request_counts.failed == 1
    assert b.in_progress_at and b.finalizing_at and b.completed_at and b.model == MODEL
    ids = [x["custom_id"] for x in out]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(8) if i != 3)
    assert ids != [f"req-{i}" for i in range(8) if i != 3]  # not the input order
    for x in out:
        assert x["id"].startswith("batch_req_") and x["error"] is None
        assert x["response"]["status_code"] == 200 and x["response"]["request_id"].startswith("req_")
        assert x["response"]["body"]["object"] == "chat.completion"
    by_id = {x["custom_id"]: x["response"]["body"] for x in out}
    assert by_id["req-5"]["choices"][0]["message"]["content"] == direct.choices[0].message.content
    assert by_id["req-5"]["usage"]["prompt_tokens"] == direct.usage.prompt_tokens
    assert b.usage.input_tokens == sum(x["usage"]["prompt_tokens"] for x in by_id.values())
    assert [x["custom_id"] for x in err] == ["req-3"]
    assert err[0]["response"]["status_code"] == 400
    assert err[0]["response"]["body"]["error"]["param"] == "messages"
    assert page1.data[0].id == b.id
    assert first.data[0].id == b2.id and first.has_more is True
    assert second.data[0].id == b.id and second.has_more is False
    assert stats["batch_requests"] == {MODEL: 7}
    assert stats["total"]["requests"] == 1  # only the direct call


def test_openai_batch_with_invalid_file_fails_with_line_errors():
    async def body():
        async with serve(**FAST_BATCH) as (url, oa, an, http):
            bad_url = _oa_line(2)
            bad_url["url"] = "/v1/embeddings"
            fid = await _upload(oa, [_oa_line(1), "{not json", bad_url, _oa_line(1)])
            b = await oa.batches.create(input_file_id=fid, endpoint="/v1/chat/completions",
                                        completion_window="24h")
            b, _ = await _wait_openai(oa, b.id)
            with pytest.raises(openai.NotFoundError):
                await oa.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                                        completion_window="24h")
            with pytest.raises(openai.NotFoundError):
                await oa.batches.retrieve("batch_nope")
            return b

    b = run(body())
    assert b.status == "failed" and b.failed_at and b.output_file_id is None
    errors = [(e.code, e.line) for e in b.errors.data]
    assert errors == [("invalid_json_line", 2), ("invalid_url", 3), ("duplicate_custom_id", 4)]
    assert b.errors.data[1].param == "url"


def test_openai_batch_cancel_keeps_partial_output():
    async def body():
        async with serve(batch_processing_s=2.0, batch_stage_s=0.05) as (url, oa, an, http):
            fid = await _upload(oa, [_oa_line(i) for i in range(40)])
            b = await oa.batches.create(input_file_id=fid, endpoint="/v1/chat/completions",
                                        completion_window="24h")
            await _wait_openai(oa, b.id, until=("in_progress",))
            await asyncio.sleep(0.3)
            c = await oa.batches.cancel(b.id)
            b, _ = await _wait_openai(oa, b.id)
            out = _jsonl((await oa.files.content(b.output_file_id)).text)
            err = _jsonl((await oa.files.content(b.error_file_id)).text)
            fid2 = await _upload(oa, [_oa_line(1)])
            b2 = await oa.batches.create(input_file_id=fid2, endpoint="/v1/chat/completions",
                                         completion_window="24h")
            await _wait_openai(oa, b2.id)
            with pytest.raises(openai.BadRequestError):  # a completed batch cannot be cancelled
                await oa.batches.cancel(b2.id)
            return c, b, out, err

    c, b, out, err = run(body())
    assert c.status == "cancelling" and c.cancelling_at
    assert b.status == "cancelled" and b.cancelled_at
    assert 0 < b.request_counts.completed < 40 and b.request_counts.completed == len(out)
    assert all(x["error"] == {"code": "batch_cancelled", "message": x["error"]["message"]} for x in err)
    assert sorted(x["custom_id"] for x in out + err) == sorted(f"req-{i}" for i in range(40))


def _an_req(i, **params):
    return {"custom_id": f"item_{i}", "params": {
        "model": CLAUDE, "max_tokens": 30, "messages": [{"role": "user", "content": f"Question number {i}"}],
        **params}}


def test_anthropic_message_batch_end_to_end():
    async def body():
        async with serve(**FAST_BATCH) as (url, oa, an, http):
            reqs = [_an_req(i) for i in range(6)]
            del reqs[4]["params"]["max_tokens"]  # invalid: errored result
            mb = await an.messages.batches.create(requests=reqs)
            assert mb.processing_status == "in_progress" and mb.request_counts.processing == 6
            assert mb.results_url is None
            for _ in range(200):
                got = await an.messages.batches.retrieve(mb.id)
                if got.processing_status == "ended":
                    break
                await asyncio.sleep(0.02)
            results = [r async for r in await an.messages.batches.results(mb.id)]
            direct = await an.messages.create(**reqs[1]["params"])
            with pytest.raises(anthropic.BadRequestError) as bad:
                await an.messages.batches.create(requests=[_an_req("has space")])
            mb2 = await an.messages.batches.create(requests=[_an_req(9)])
            page = await an.messages.batches.list(limit=1)
            with pytest.raises(anthropic.NotFoundError):
                await an.messages.batches.retrieve("msgbatch_nope")
            return got, results, direct, bad.value, mb2, page

    got, results, direct, bad, mb2, page = run(body())
    assert got.processing_status == "ended" and got.ended_at is not None
    rc = got.request_counts
    assert (rc.processing, rc.succeeded, rc.errored, rc.canceled, rc.expired) == (0, 5, 1, 0, 0)
    assert got.results_url.endswith(f"/v1/messages/batches/{got.id}/results")
    ids = [r.custom_id for r in results]
    assert sorted(ids) == sorted(f"item_{i}" for i in range(6)) and ids != sorted(ids)
    by_id = {r.custom_id: r.result for r in results}
    assert by_id["item_4"].type == "errored"
    assert by_id["item_4"].error.error.type == "invalid_request_error"
    assert by_id["item_1"].type == "succeeded"
    assert by_id["item_1"].message.content[0].text == direct.content[0].text
    assert by_id["item_1"].message.usage.input_tokens == direct.usage.input_tokens
    assert bad.status_code == 400 and "custom_id" in bad.body["error"]["message"]
    assert page.data[0].id == mb2.id and page.has_more is True


def test_anthropic_message_batch_cancel():
    async def body():
        async with serve(batch_processing_s=2.0, batch_stage_s=0.05) as (url, oa, an, http):
            mb = await an.messages.batches.create(requests=[_an_req(i) for i in range(40)])
            await asyncio.sleep(0.3)
            c = await an.messages.batches.cancel(mb.id)
            for _ in range(200):
                got = await an.messages.batches.retrieve(mb.id)
                if got.processing_status == "ended":
                    break
                await asyncio.sleep(0.02)
            results = [r async for r in await an.messages.batches.results(mb.id)]
            return c, got, results

    c, got, results = run(body())
    assert c.processing_status == "canceling" and c.cancel_initiated_at is not None
    rc = got.request_counts
    assert rc.processing == 0 and rc.succeeded > 0 and rc.canceled > 0 and rc.succeeded + rc.canceled == 40
    kinds = [r.result.type for r in results]
    assert kinds.count("canceled") == rc.canceled and kinds.count("succeeded") == rc.succeeded


def test_runtime_config_turns_faults_on_and_off():
    async def body():
        async with serve(model_limits={MODEL: ModelLimit(100, None)}) as (url, oa, an, http):
            async with http.post(f"{url}/_config", json={"error_rate": "500=1.0"}) as r:
                assert r.status == 200
                assert (await r.json())["error_rates"] == {"500": 1.0}
            with pytest.raises(openai.InternalServerError):
                await oa.chat.completions.create(model=MODEL, messages=MSGS)
            async with http.post(f"{url}/_config", json={"latency": "sideways"}) as r:
                assert r.status == 400
            async with http.delete(f"{url}/_config") as r:
                restored = await r.json()
            assert restored["error_rates"] == {} and restored["model_limits"][MODEL]["rpm"] == 100
            await oa.chat.completions.create(model=MODEL, messages=MSGS)

    run(body())


def test_anthropic_count_tokens_gives_exact_counts_at_submit_when_a_key_is_set():
    import dataclasses

    from pipeline.config import Secret, load_settings
    from pipeline.intake.formats import parse_request
    from pipeline.money.pricing import PriceBook
    from pipeline.providers.anthropic import token_counter
    from pipeline.providers.registry import build_registry

    async def body():
        async with serve() as (url, oa, an, http):
            settings = dataclasses.replace(load_settings({}), anthropic_api_key=Secret("sk-ant-test"),
                                           anthropic_base_url=url)
            line = {"custom_id": "c1", "params": {"model": CLAUDE, "max_tokens": 20, "system": "Be brief.",
                                                   "messages": MSGS[1:]}}
            counter = token_counter(settings, build_registry(settings).get("anthropic"))
            req = await asyncio.to_thread(parse_request, line, PriceBook.load(), counter)
            billed = await an.messages.create(**line["params"])
            return req, billed.usage.input_tokens

    req, billed = run(body())
    # the count_tokens figure can only raise the estimate (one rule with the batcher, which
    # re-prices a message's declared count the same way): never below what is billed
    from pipeline.money.bounds import anthropic_input_tokens

    estimate = anthropic_input_tokens(line_params := {"model": CLAUDE, "max_tokens": 20, "system": "Be brief.",
                                                      "messages": MSGS[1:]})
    assert req.input_tokens == max(estimate, billed) >= billed > 0
    assert req.tokens_exact is (billed >= estimate)


# --------------------------------------------------------------------------- billing as the providers bill

def test_n_choices_are_answered_and_billed():
    async def body():
        async with serve() as (url, oa, an, http):
            one = await oa.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=50)
            four = await oa.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=50, n=4)
            async with http.post(f"{url}/v1/chat/completions",
                                 json={"model": MODEL, "messages": MSGS, "n": 129}) as r:
                refused = r.status
            return one, four, refused

    one, four, refused = run(body())
    assert len(four.choices) == 4 and [c.index for c in four.choices] == [0, 1, 2, 3]
    assert four.choices[0].message.content == one.choices[0].message.content
    assert len({c.message.content for c in four.choices}) > 1
    assert four.usage.prompt_tokens == one.usage.prompt_tokens          # the prompt is billed once
    assert four.usage.completion_tokens == sum(
        billing.openai_counter(MODEL)(c.message.content) for c in four.choices)
    assert refused == 400


TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Find an order.", "parameters": {
    "type": "object", "properties": {"order": {"type": "string"}}, "required": ["order"]}}}]


def test_tools_are_billed_and_answered_with_tool_calls():
    async def body():
        async with serve() as (url, oa, an, http):
            plain = await oa.chat.completions.create(model=MODEL, messages=MSGS)
            forced = await oa.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS,
                                                      tool_choice="required")
            claude = await an.messages.create(
                model=CLAUDE, max_tokens=200, messages=MSGS[1:], tool_choice={"type": "any"},
                tools=[{"name": "lookup", "description": "Find an order.", "input_schema": TOOLS[0]["function"][
                    "parameters"]}])
            return plain, forced, claude

    plain, forced, claude = run(body())
    call = forced.choices[0].message.tool_calls[0]
    assert forced.choices[0].finish_reason == "tool_calls" and call.function.name == "lookup"
    assert json.loads(call.function.arguments) == {"order": "simulated"}
    assert forced.usage.prompt_tokens > plain.usage.prompt_tokens + 10   # the definitions are billed
    assert claude.stop_reason == "tool_use" and claude.content[0].type == "tool_use"
    assert claude.usage.input_tokens > billing.ANTHROPIC_TOOL_PROMPT["any"]


def test_images_are_billed_by_the_published_formulas():
    import base64
    import struct
    import zlib

    chunk = b"IHDR" + struct.pack(">II", 1024, 1024) + b"\x08\x02\x00\x00\x00"
    data = base64.b64encode(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk
                            + struct.pack(">I", zlib.crc32(chunk))).decode()

    def msgs(detail):
        return [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, {
            "type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}", "detail": detail}}]}]

    async def body():
        async with serve() as (url, oa, an, http):
            text = await oa.chat.completions.create(model="gpt-4o", messages=[
                {"role": "user", "content": [{"type": "text", "text": "What is it?"}]}])
            high = await oa.chat.completions.create(model="gpt-4o", messages=msgs("high"))
            low = await oa.chat.completions.create(model="gpt-4o", messages=msgs("low"))
            img = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}
            claude = await an.messages.count_tokens(model=CLAUDE, messages=[{"role": "user", "content": [img]}])
            return text, high, low, claude

    text, high, low, claude = run(body())
    assert high.usage.prompt_tokens - text.usage.prompt_tokens == 85 + 170 * 4
    assert low.usage.prompt_tokens - text.usage.prompt_tokens == 85
    assert claude.input_tokens == 3 + 4 + math.ceil(1024 * 1024 / 750)


def test_anthropic_cache_writes_then_reads_within_the_ttl():
    system = [{"type": "text", "text": "policy " * 1500, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]

    async def body():
        async with serve() as (url, oa, an, http):
            first = await an.messages.create(model="claude-sonnet-4-5", max_tokens=20, system=system,
                                             messages=MSGS[1:])
            second = await an.messages.create(model="claude-sonnet-4-5", max_tokens=20, system=system,
                                              messages=[{"role": "user", "content": "Another question."}])
            long_prompt = [{"role": "user", "content": "context " * 1500}, {"role": "assistant", "content": "ok"},
                           {"role": "user", "content": "q1"}]
            oa1 = await oa.chat.completions.create(model=MODEL, messages=long_prompt)
            oa2 = await oa.chat.completions.create(model=MODEL, messages=long_prompt[:-1] + [
                {"role": "user", "content": "q2"}])
            return first, second, oa1, oa2

    first, second, oa1, oa2 = run(body())
    written = first.usage.cache_creation_input_tokens
    assert written > 1024 and first.usage.cache_creation.ephemeral_1h_input_tokens == written
    assert first.usage.cache_read_input_tokens == 0
    assert second.usage.cache_read_input_tokens == written and second.usage.cache_creation_input_tokens == 0
    assert oa1.usage.prompt_tokens_details.cached_tokens == 0
    cached = oa2.usage.prompt_tokens_details.cached_tokens
    assert cached >= 1024 and cached % 128 == 0 and cached < oa2.usage.prompt_tokens


def test_reasoning_and_thinking_tokens_are_output_within_the_limit():
    async def body():
        async with serve() as (url, oa, an, http):
            o = await oa.chat.completions.create(model="o4-mini", messages=MSGS, max_completion_tokens=400)
            t = await an.messages.create(model="claude-sonnet-4-5", max_tokens=3000, messages=MSGS[1:],
                                         thinking={"type": "enabled", "budget_tokens": 2000})
            return o, t

    o, t = run(body())
    r = o.usage.completion_tokens_details.reasoning_tokens
    assert r > 0 and o.usage.completion_tokens == r + billing.openai_counter("o4-mini")(o.choices[0].message.content)
    assert o.usage.completion_tokens <= 400
    assert t.content[0].type == "thinking" and t.usage.output_tokens <= 3000
    assert t.usage.output_tokens == billing.claude_count(t.content[0].thinking) + billing.claude_count(
        t.content[1].text)


def test_worst_case_mode_bills_every_limit_and_hold_keeps_calls_open():
    system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]

    async def body():
        async with serve() as (url, oa, an, http):
            async with http.post(f"{url}/_config", json={"worst_case": True, "hold_s": 0.3}) as r:
                assert r.status == 200 and (await r.json())["worst_case"] is True
            loop = asyncio.get_running_loop()
            start = loop.time()
            o = await oa.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=50, n=3)
            held = loop.time() - start
            none = await oa.chat.completions.create(model=MODEL, messages=MSGS)
            a = await an.messages.create(model="claude-sonnet-4-5", max_tokens=70, system=system, messages=MSGS[1:])
            return o, held, none, a

    o, held, none, a = run(body())
    assert o.usage.completion_tokens == 150 and len(o.choices) == 3
    assert held >= 0.3
    assert none.usage.completion_tokens == billing.max_output(MODEL) == 16384
    assert a.usage.output_tokens == 70 and a.usage.input_tokens == 0 and a.usage.cache_read_input_tokens == 0
    assert a.usage.cache_creation.ephemeral_1h_input_tokens == a.usage.cache_creation_input_tokens > 0


def test_worst_case_and_hold_from_the_command_line():
    c = config_from_args(["--worst-case", "--hold", "200"])
    assert c.worst_case is True and c.hold_s == 200.0
    assert config_from_args([]).worst_case is False
    with pytest.raises(ConfigError):
        config_from_args(["--hold", "-1"])
