"""The simulator's Batch API rules an operator meets (simulator/batch_rules.py): OpenAI's enqueued-token
limit per model, lines that expire, results kept for a time, each line billed once."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from pipeline.errors import ConfigError
from simulator import SimulatorConfig
from simulator.batch_rules import ANTHROPIC_RESULTS_KEEP_S, Queue, expire_from, output_keep_s
from tests.unit.test_simulator import CLAUDE, MODEL, _an_req, _jsonl, _oa_line, _upload, get_stats, run, serve

FAST = {"batch_processing_s": 0.2, "batch_stage_s": 0.02}


async def _until(get, done, what: str):
    for _ in range(400):
        got = await get()
        if done(got):
            return got
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: still {got}")


async def _openai_batch(oa, lines, **kw):
    fid = await _upload(oa, lines)
    return await oa.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h", **kw)


def _ended(b):
    return b.status in ("completed", "failed", "expired", "cancelled")


def test_a_batch_over_the_enqueued_token_limit_fails_with_token_limit_exceeded_until_room_frees():
    async def limited():
        async with serve(batch_processing_s=1.0, batch_stage_s=0.02,
                         batch_enqueued_tokens={MODEL: 300}) as (url, oa, an, http):
            first = await _openai_batch(oa, [_oa_line(i) for i in range(10)])     # ~ 12 tokens a line
            await _until(lambda: oa.batches.retrieve(first.id), lambda b: b.status == "in_progress", "first runs")
            second = await _openai_batch(oa, [_oa_line(100 + i) for i in range(20)])
            second = await _until(lambda: oa.batches.retrieve(second.id), _ended, "second")
            first = await _until(lambda: oa.batches.retrieve(first.id), _ended, "first")
            third = await _openai_batch(oa, [_oa_line(200 + i) for i in range(20)])   # room again
            third = await _until(lambda: oa.batches.retrieve(third.id), _ended, "third")
            stats = await get_stats(http, url)
            return first, second, third, stats

    first, second, third, stats = run(limited())
    assert first.status == "completed"
    assert second.status == "failed" and [e.code for e in second.errors.data] == ["token_limit_exceeded"]
    assert second.errors.data[0].message.startswith(f"Enqueued token limit reached for {MODEL} in organization")
    assert "Limit: 300 enqueued tokens" in second.errors.data[0].message
    assert second.output_file_id is None and second.request_counts.completed == 0
    assert third.status == "completed"
    assert stats["batch_requests"] == {MODEL: 30}, "the failed batch billed nothing"


def test_a_batch_alone_over_the_limit_always_fails():
    q = Queue()
    assert q.admit("m", 301, 300) is not None and q.enqueued == {}
    assert q.admit("m", 300, 300) is None and q.admit("m", 1, 300) is not None
    q.release("m", 300)
    assert q.admit("m", 1, 300) is None and q.admit("other", 10**9, None) is None


def test_expired_lines_are_reported_unbilled_and_only_they_are_missing():
    async def body():
        async with serve(batch_expire_share=0.1, **FAST) as (url, oa, an, http):
            b = await _openai_batch(oa, [_oa_line(i) for i in range(40)])
            b = await _until(lambda: oa.batches.retrieve(b.id), _ended, "openai")
            out = _jsonl((await oa.files.content(b.output_file_id)).text)
            err = _jsonl((await oa.files.content(b.error_file_id)).text)
            mb = await an.messages.batches.create(requests=[_an_req(i) for i in range(40)])
            mb = await _until(lambda: an.messages.batches.retrieve(mb.id), lambda x: x.processing_status == "ended",
                              "anthropic")
            results = [r async for r in await an.messages.batches.results(mb.id)]
            stats = await get_stats(http, url)
            return b, out, err, mb, results, stats

    b, out, err, mb, results, stats = run(body())
    assert b.status == "expired" and b.expired_at and b.request_counts.completed == 36
    assert len(out) == 36 and len(err) == 4 and {e["error"]["code"] for e in err} == {"batch_expired"}
    assert sorted(x["custom_id"] for x in out + err) == sorted(f"req-{i}" for i in range(40))
    assert mb.request_counts.expired == 4 and mb.request_counts.succeeded == 36
    assert sum(r.result.type == "expired" for r in results) == 4
    assert stats["batch_lines_billed"] == 72 and stats["batch_custom_ids_billed"] == 72
    assert stats["batch_custom_ids_billed_twice"] == []


def test_a_line_billed_in_two_batches_is_listed():
    async def body():
        async with serve(**FAST) as (url, oa, an, http):
            for _ in range(2):
                b = await _openai_batch(oa, [_oa_line(1), _oa_line(2)])
                await _until(lambda: oa.batches.retrieve(b.id), _ended, "batch")
            return await get_stats(http, url)

    stats = run(body())
    assert stats["batch_lines_billed"] == 4 and stats["batch_custom_ids_billed_twice"] == ["req-1", "req-2"]


def test_results_are_gone_after_the_providers_retention_by_the_simulators_clock():
    async def body():
        async with serve(**FAST) as (url, oa, an, http):
            b = await _openai_batch(oa, [_oa_line(i) for i in range(3)],
                                    extra_body={"output_expires_after": {"anchor": "created_at", "seconds": 7200}})
            b = await _until(lambda: oa.batches.retrieve(b.id), _ended, "openai")
            mb = await an.messages.batches.create(requests=[_an_req(i) for i in range(3)])
            await _until(lambda: an.messages.batches.retrieve(mb.id), lambda x: x.processing_status == "ended", "an")
            file_meta = await oa.files.retrieve(b.output_file_id)

            async def move(seconds):
                async with http.post(f"{url}/_config", json={"clock_offset_s": seconds}) as r:
                    assert r.status == 200
            await move(7200 - 60)
            kept = len(_jsonl((await oa.files.content(b.output_file_id)).text))
            await move(7200 + 60)
            with pytest.raises(openai.NotFoundError):
                await oa.files.content(b.output_file_id)
            await move(ANTHROPIC_RESULTS_KEEP_S - 60)
            an_kept = len([r async for r in await an.messages.batches.results(mb.id)])
            await move(ANTHROPIC_RESULTS_KEEP_S + 60)
            async with http.get(f"{url}/v1/messages/batches/{mb.id}/results") as r:
                an_gone = r.status
            with pytest.raises(openai.BadRequestError):
                await _openai_batch(oa, [_oa_line(9)], extra_body={"output_expires_after": {
                    "anchor": "created_at", "seconds": 60}})
            return file_meta, kept, an_kept, an_gone

    file_meta, kept, an_kept, an_gone = run(body())
    assert file_meta.expires_at == file_meta.created_at + 7200
    assert kept == 3 and an_kept == 3 and an_gone == 404


def test_settings_are_checked():
    assert output_keep_s(None) == 30 * 86400
    with pytest.raises(ValueError):
        output_keep_s({"anchor": "completed_at", "seconds": 7200})
    assert [expire_from(40, s) for s in (0, 0.1, 1)] == [40, 36, 0]
    for bad in ({"batch_expire_share": 1.5}, {"batch_enqueued_tokens": {MODEL: 0}},
                {"batch_enqueued_tokens": [1]}):
        with pytest.raises(ConfigError):
            SimulatorConfig(**bad).validate()
    assert json.loads(json.dumps(SimulatorConfig(batch_enqueued_tokens={CLAUDE: 5}).validate().batch_enqueued_tokens))


def test_a_batch_lines_bill_is_read_back_by_its_custom_ids():
    """A Batch API line has no idempotency key: ``POST /_stats/batch_lines`` gives what the named
    lines were billed, by the simulator's prices, so a benchmark can hold a job's provider batches
    to its cap against the provider's own count."""
    async def body():
        async with serve(**FAST) as (url, oa, an, http):
            before = (await get_stats(http, url))["providers"]
            b = await _openai_batch(oa, [_oa_line(i) for i in range(5)])
            await _until(lambda: oa.batches.retrieve(b.id), _ended, "openai")
            mb = await an.messages.batches.create(requests=[_an_req(i) for i in range(3)])
            await _until(lambda: an.messages.batches.retrieve(mb.id), lambda x: x.processing_status == "ended",
                         "anthropic")
            after = (await get_stats(http, url))["providers"]
            ask = [f"req-{i}" for i in range(5)] + [f"item_{i}" for i in range(3)] + ["req-99"]
            async with http.post(f"{url}/_stats/batch_lines", json={"custom_ids": ask}) as r:
                lines = await r.json()
            async with http.post(f"{url}/_stats/batch_lines", json={"custom_ids": "req-1"}) as r:
                bad = r.status
            return before, after, lines, bad

    from decimal import Decimal
    before, after, lines, bad = run(body())
    spent = {p: Decimal(after[p]["billed_usd"]) - Decimal(before.get(p, {}).get("billed_usd", "0"))
             for p in ("openai", "anthropic")}
    assert lines["lines_billed"] == 8 and lines["unpriced_lines"] == 0
    assert Decimal(lines["billed_usd"]) == spent["openai"] + spent["anthropic"] > 0
    assert bad == 400
