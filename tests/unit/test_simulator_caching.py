"""The simulator's prompt caching: cached tokens only where the provider would report them."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import anthropic
import pytest

from simulator import answers, billing, caching
from simulator.prices import ANTHROPIC_PRICES, usd
from tests.unit.test_simulator import FAST_BATCH, serve, run

POLICY = "Follow the house style guide. Cite the clause you rely on, and answer in plain words. " * 60
USER = [{"role": "user", "content": "Summarise clause 4."}]


def _oa(system=POLICY, question="Summarise clause 4.", **extra):
    return {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": system},
                                                 {"role": "user", "content": question}], "max_tokens": 30, **extra}


def _an(model="claude-sonnet-4-5", system=POLICY, ttl=None, question="Summarise clause 4.", **extra):
    cc = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
    return {"model": model, "max_tokens": 30, "system": [{"type": "text", "text": system, "cache_control": cc}],
            "messages": [{"role": "user", "content": question}], **extra}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _bill(body, cache):
    ans = answers.openai_answer(body) if body["model"].startswith("gpt") else answers.anthropic_answer(body)
    return answers.usage(ans, worst_case=False, cache=cache)


# --------------------------------------------------------------------------- OpenAI

def test_openai_reads_a_repeated_prefix_in_128_token_steps_from_1024_on():
    cache = caching.PromptCache()
    first = _bill(_oa(), cache)
    second = _bill(_oa(question="Summarise clause 5."), cache)
    short = [_bill(_oa(system="Be terse.", question=q), cache) for q in ("a", "b")]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 1024 and cached % 128 == 0 and cached < second["prompt_tokens"]
    assert [s["prompt_tokens_details"]["cached_tokens"] for s in short] == [0, 0]   # under 1,024 tokens


def test_openai_prefix_is_found_only_under_the_same_prompt_cache_key():
    cache = caching.PromptCache()
    _bill(_oa(prompt_cache_key="group-a"), cache)
    other = _bill(_oa(question="q2", prompt_cache_key="group-b"), cache)
    none = _bill(_oa(question="q3"), cache)
    same = _bill(_oa(question="q4", prompt_cache_key="group-a"), cache)
    assert other["prompt_tokens_details"]["cached_tokens"] == 0
    assert none["prompt_tokens_details"]["cached_tokens"] == 0
    assert same["prompt_tokens_details"]["cached_tokens"] >= 1024


def test_openai_prefix_expires_after_five_minutes_unless_kept_24h():
    clock = Clock()
    cache = caching.PromptCache(clock)
    _bill(_oa(), cache)
    _bill(_oa(prompt_cache_retention="24h", prompt_cache_key="k"), cache)
    clock.now += 301
    late = _bill(_oa(question="later"), cache)
    kept = _bill(_oa(question="later", prompt_cache_retention="24h", prompt_cache_key="k"), cache)
    assert late["prompt_tokens_details"]["cached_tokens"] == 0
    assert kept["prompt_tokens_details"]["cached_tokens"] >= 1024


def test_calls_in_flight_together_all_miss_and_a_batch_reads_what_its_earlier_lines_wrote():
    async def body():
        async with serve(latency_ms=200, **FAST_BATCH) as (url, oa, an, http):
            together = await asyncio.gather(*[
                oa.chat.completions.create(**_oa(question=f"q{i}")) for i in range(3)])
            after = await oa.chat.completions.create(**_oa(question="q9"))
            import io
            import json
            blob = "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                       "body": _oa(question=f"batch {i}", prompt_cache_key="b")}) + "\n"
                           for i in range(4))
            f = await oa.files.create(file=("in.jsonl", io.BytesIO(blob.encode())), purpose="batch")
            b = await oa.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
            for _ in range(200):
                b = await oa.batches.retrieve(b.id)
                if b.status == "completed":
                    break
                await asyncio.sleep(0.05)
            lines = [json.loads(x) for x in (await oa.files.content(b.output_file_id)).text.splitlines()]
            return together, after, lines

    together, after, lines = run(body())
    assert [c.usage.prompt_tokens_details.cached_tokens for c in together] == [0, 0, 0]
    assert after.usage.prompt_tokens_details.cached_tokens >= 1024
    cached = sorted(x["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] for x in lines)
    assert cached[0] == 0 and all(c >= 1024 for c in cached[1:])   # the first line run writes, the rest read


# --------------------------------------------------------------------------- Anthropic

def test_anthropic_haiku_4_5_does_not_cache_a_prefix_below_4096_tokens():
    cache = caching.PromptCache()
    body = _an(model="claude-haiku-4-5")
    assert 1024 < billing.anthropic_prompt(body) < 4096
    for q in ("a", "b"):
        u = _bill({**body, "messages": [{"role": "user", "content": q}]}, cache)
        assert u["cache_creation_input_tokens"] == 0 and u["cache_read_input_tokens"] == 0
    assert caching.anthropic_min_tokens("claude-haiku-4-5-20251001") == 4096
    assert caching.anthropic_min_tokens("claude-sonnet-4-5") == 1024
    assert caching.anthropic_min_tokens("claude-3-5-haiku-latest") == 2048


def test_anthropic_writes_then_reads_and_markers_do_not_change_the_key_or_the_answer():
    cache = caching.PromptCache()
    first = _bill(_an(ttl="1h"), cache)
    plain = {"model": "claude-sonnet-4-5", "max_tokens": 30, "system": POLICY,
             "messages": [{"role": "user", "content": "Summarise clause 5."}]}
    marked_last = {**plain, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Summarise clause 6.", "cache_control": {"type": "ephemeral"}}]}]}
    second = _bill(marked_last, cache)   # its breakpoint is on the question: the system entry is found by lookback
    unmarked = _bill(plain, cache)       # no breakpoint: no read
    assert first["cache_creation"]["ephemeral_1h_input_tokens"] == first["cache_creation_input_tokens"] > 1024
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]
    assert second["cache_creation"]["ephemeral_5m_input_tokens"] > 0   # the question, written after the read
    assert unmarked["cache_read_input_tokens"] == 0 and unmarked["cache_creation_input_tokens"] == 0
    a = answers.anthropic_answer(plain)
    b = answers.anthropic_answer({**plain, "system": [{"type": "text", "text": POLICY,
                                                       "cache_control": {"type": "ephemeral"}}]})
    assert a.text == b.text


def test_anthropic_refuses_five_breakpoints_and_a_1h_after_a_5m():
    block = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}

    async def body():
        async with serve() as (url, oa, an, http):
            with pytest.raises(anthropic.BadRequestError) as five:
                await an.messages.create(model="claude-sonnet-4-5", max_tokens=5, system=[block] * 3,
                                         messages=[{"role": "user", "content": [block, block]}])
            with pytest.raises(anthropic.BadRequestError) as order:
                await an.messages.create(
                    model="claude-sonnet-4-5", max_tokens=5, system=[block],
                    messages=[{"role": "user", "content": [
                        {**block, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}])
            return five.value, order.value

    five, order = run(body())
    assert "maximum of 4" in five.body["error"]["message"]
    assert "1h" in order.body["error"]["message"]


def test_anthropic_cache_in_a_message_batch_stacks_with_the_batch_discount():
    reqs = [{"custom_id": f"r{i}", "params": _an(ttl="1h", question=f"Question {i}")} for i in range(4)]

    async def body():
        async with serve(**FAST_BATCH) as (url, oa, an, http):
            mb = await an.messages.batches.create(requests=reqs)
            for _ in range(200):
                mb = await an.messages.batches.retrieve(mb.id)
                if mb.processing_status == "ended":
                    break
                await asyncio.sleep(0.02)
            results = [r async for r in await an.messages.batches.results(mb.id)]
            async with http.get(f"{url}/_stats") as r:
                return results, await r.json()

    results, stats = run(body())
    usages = [r.result.message.usage.model_dump() for r in results]
    writes = [u for u in usages if u["cache_creation_input_tokens"]]
    reads = [u for u in usages if u["cache_read_input_tokens"]]
    assert len(writes) == 1 and len(reads) == 3
    price = ANTHROPIC_PRICES["claude-sonnet-4-5"]
    expected = sum(usd(price, u, "batch") for u in usages)
    assert Decimal(stats["providers"]["anthropic"]["billed_usd"]) == expected
    full = sum(usd(price, {"input_tokens": u["input_tokens"] + u["cache_read_input_tokens"],
                           "output_tokens": u["output_tokens"]}, "batch") for u in usages)
    assert expected < full
