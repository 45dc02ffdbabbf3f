"""Prompt-cache placement end to end on the stack, against the simulator's own bill.

A job whose lines share a ~1,500-token system prompt, on three models, with
the simulator answering after 200–400 ms (calls in flight together miss, as at
a provider):

- gpt-4o-mini: every line carries the group's ``prompt_cache_key``; the
  group's first request runs alone, and every other line reads its prefix;
- claude-sonnet-4-5 (minimum 1,024 tokens): the first line goes unmarked, the
  second writes the system prompt, the rest read it;
- claude-haiku-4-5 (minimum 4,096): never marked, nothing written or read;
- the ledger equals what the simulator billed, per provider, to the rounding
  of ``results.cost_usd``.
"""

from __future__ import annotations

import json
import uuid
from decimal import Decimal

import sqlalchemy as sa

from tests.integration.conftest import llmbatch, wait_for, write_jsonl
from tests.integration.execution_helpers import sim_stats, simulator_config

N = 12
ROUNDING = Decimal("0.000000005")
SYSTEM = "You are the support desk of Northwind Traders. " + " ".join(
    f"Rule {i}: quote policy section {i % 13}.{i % 7} and the limit of {7 + i % 23} days." for i in range(75))


def _lines(tag: str) -> list[dict]:
    out = []
    for model in ("gpt-4o-mini", "claude-sonnet-4-5", "claude-haiku-4-5"):
        for i in range(N):
            q = f"{tag} question {i}: where is order {1000 + i}?"
            cid = f"{model.replace('.', '_')}-{i}"
            if model.startswith("claude"):
                out.append({"custom_id": cid, "params": {"model": model, "max_tokens": 24, "system": SYSTEM,
                                                         "messages": [{"role": "user", "content": q}]}})
            else:
                out.append({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                            "body": {"model": model, "max_tokens": 24, "messages": [
                                {"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]}})
    return out


def _finished(engine, job: str) -> bool:
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT count(*) FROM requests WHERE job_id = :j AND status IN ('succeeded', 'failed', 'cancelled')"),
            {"j": job}).scalar() == 3 * N


def test_shared_system_prompt_is_cached_where_the_provider_would_and_the_ledger_matches(stack, engine, tmp_path):
    before = sim_stats(stack)["providers"]
    with simulator_config(stack, latency="uniform", latency_ms=300, jitter_ms=100):
        path = write_jsonl(tmp_path / "pc.jsonl", _lines(uuid.uuid4().hex[:8]))
        job = json.loads(llmbatch("submit", path, "--json", check=True).stdout)["job_id"]
        wait_for(lambda: _finished(engine, job), timeout=180, every=0.5, what="the prompt-cache job")
        after = sim_stats(stack)["providers"]
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT q.status, q.model, q.provider, q.body, r.response -> 'usage', r.cost_usd, q.batch_id"
            " FROM requests q"
            " JOIN results r USING (job_id, custom_id) WHERE q.job_id = :j"), {"j": job}).all()
    assert [r[0] for r in rows] == ["succeeded"] * 3 * N, rows[:2]
    by_model = {m: [(b, u) for _, model, _, b, u, _, _ in rows if model == m]
                for m in ("gpt-4o-mini", "claude-sonnet-4-5", "claude-haiku-4-5")}
    # a group's first request in each batch runs alone; batches of one model may run at once
    batches = {m: len({r[6] for r in rows if r[1] == m}) for m in by_model}

    oa = by_model["gpt-4o-mini"]
    assert len({b["prompt_cache_key"] for b, _ in oa}) == 1
    cached = [u["prompt_tokens_details"]["cached_tokens"] for _, u in oa]
    misses = cached.count(0)
    assert 1 <= misses <= batches["gpt-4o-mini"], (cached, batches)
    assert all(c >= 1024 and c % 128 == 0 for c in cached if c), cached

    sonnet = by_model["claude-sonnet-4-5"]
    writes = [u for _, u in sonnet if u["cache_creation_input_tokens"]]
    reads = [u for _, u in sonnet if u["cache_read_input_tokens"]]
    assert sum(isinstance(b["system"], list) for b, _ in sonnet) == N - 1   # all but the first line marked
    assert 1 <= len(writes) <= batches["claude-sonnet-4-5"] and len(reads) == N - 1 - len(writes), \
        (len(writes), len(reads), batches)

    haiku = by_model["claude-haiku-4-5"]
    assert all(isinstance(b["system"], str) for b, _ in haiku)                # below its 4,096 minimum
    assert all(u["cache_creation_input_tokens"] == u["cache_read_input_tokens"] == 0 for _, u in haiku)

    for provider in ("openai", "anthropic"):
        ledger = sum(r[5] for r in rows if r[2] == provider)
        billed = Decimal(after[provider]["billed_usd"]) - Decimal(before.get(provider, {}).get("billed_usd", "0"))
        n = sum(1 for r in rows if r[2] == provider)
        assert abs(ledger - billed) <= n * ROUNDING, f"{provider}: ledger ${ledger} vs simulator ${billed}"
