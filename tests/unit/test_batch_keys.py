"""A provider's Batch API and its kind (pipeline/providers/batch_api.py, keys.py, request.py).

A provider batch goes out on a key chosen the way realtime chooses one (the live key with the
most headroom; a revoked key never), and the batch remembers that key's alias. A provider of kind
``anthropic`` not named "anthropic" is Anthropic's format everywhere: its requests' url, its
Batch API, through the simulator's named providers (``/p/<name>/…``)."""

from __future__ import annotations

import asyncio
import json

import pytest

from pipeline.config import get_settings
from pipeline.constants import ANTHROPIC_MESSAGES_URL, CHAT_URL
from pipeline.providers import batch_api
from pipeline.providers.keys import Keys, NoUsableKey, dead_key
from pipeline.providers.registry import KeySpec, get_registry
from pipeline.request import Request
from tests.unit.test_keys import Windows

#: a second Anthropic-kind provider beside the default one, with two keys
CLAUDE_EU = {"kind": "anthropic", "batch": "anthropic",
             "keys": [{"alias": "eu-main", "env": "EU_MAIN", "rpm": 300},
                      {"alias": "eu-spare", "env": "EU_SPARE", "rpm": 150}]}
SIM_KEYS = [{"key": "eu-main-SECRET", "alias": "eu-main"}, {"key": "eu-spare-SECRET", "alias": "eu-spare"}]


def _fresh() -> None:
    """The process's settings and registry are read again (both are built once per process)."""
    get_settings.cache_clear()
    get_registry.cache_clear()


async def _poll_until_ended(settings, provider: str, batch_id: str, key_alias: str) -> tuple[str, list]:
    for _ in range(200):
        state, done, lines, _ = await batch_api.poll(settings, provider, batch_id, key_alias=key_alias)
        if done:
            return state, lines
        await asyncio.sleep(0.05)
    raise AssertionError(f"batch {batch_id} did not end")


@pytest.fixture
def claude_eu(monkeypatch):
    """The process's settings name claude-eu (the registry the pipeline reads is built from them)."""
    def configure(base_url: str = "http://127.0.0.1:9/p/claude-eu"):
        monkeypatch.setenv("LLMBATCH_PROVIDERS", json.dumps({"claude-eu": {**CLAUDE_EU, "base_url": base_url}}))
        monkeypatch.setenv("EU_MAIN", "eu-main-SECRET")
        monkeypatch.setenv("EU_SPARE", "eu-spare-SECRET")
        _fresh()
        return get_settings()
    yield configure
    _fresh()


def test_an_anthropic_kind_provider_of_any_name_gets_the_messages_url(claude_eu):
    claude_eu()
    row = {"job_id": "j", "custom_id": "c", "provider": "claude-eu", "model": "claude-haiku-4-5", "tier": "peak"}
    assert Request.from_row(row).endpoint == ANTHROPIC_MESSAGES_URL
    assert Request.probe("j", "c", "claude-eu", {"model": "claude-haiku-4-5"}, "realtime").endpoint \
        == ANTHROPIC_MESSAGES_URL
    assert Request.from_row({**row, "provider": "openai"}).endpoint == CHAT_URL


def test_the_batch_key_is_the_live_one_with_the_most_headroom():
    a, b = KeySpec("eu-main", rpm=300), KeySpec("eu-spare", rpm=150)
    w = Windows(used={"eu-main": 200})           # eu-main: 1/3 free, eu-spare: all free
    keys = Keys(w)
    assert asyncio.run(keys.best("claude-eu", (a, b), "claude-haiku-4-5")) is b
    w.used["eu-spare"] = 140
    assert asyncio.run(keys.best("claude-eu", (a, b), "claude-haiku-4-5")) is a
    w.redis[dead_key("claude-eu", "eu-main")] = "401"   # revoked: never chosen, whatever its headroom
    keys = Keys(w)
    assert asyncio.run(keys.best("claude-eu", (a, b), "claude-haiku-4-5")) is b
    w.redis[dead_key("claude-eu", "eu-spare")] = "401"
    with pytest.raises(NoUsableKey):
        asyncio.run(Keys(w).best("claude-eu", (a, b), "claude-haiku-4-5"))


def test_a_second_anthropic_kind_provider_runs_a_batch_on_the_key_it_was_given(claude_eu):
    """Created, polled and read back through the simulator's /p/claude-eu on the chosen key, which
    the simulator bills and the answer names."""
    from tests.unit.test_simulator_providers import PROVIDERS, serve, stats

    providers = {**PROVIDERS, "claude-eu": {**PROVIDERS["claude-eu"], "keys": SIM_KEYS}}

    async def body():
        async with serve(providers=providers) as (url, oa, http):
            settings = claude_eu(f"{url}/p/claude-eu")
            assert batch_api.batch_format("claude-eu") == "anthropic"
            lines = [{"custom_id": f"q{i}", "params": {"model": "claude-haiku-4-5", "max_tokens": 5,
                                                         "messages": [{"role": "user", "content": f"hi {i}"}]}}
                     for i in range(3)]
            info = await batch_api.create(settings, "pb_test", "claude-eu", b"", lines, key_alias="eu-spare")
            assert info["key_alias"] == "eu-spare" and info["provider_batch_id"].startswith("msgbatch_")
            state, results = await _poll_until_ended(settings, "claude-eu", info["provider_batch_id"], "eu-spare")
            assert state == "ended"
            assert sorted(r["custom_id"] for r in results) == ["q0", "q1", "q2"]
            assert {r["result"]["type"] for r in results} == {"succeeded"}
            s = await stats(http, url)
            assert set(s["claude-eu"]["keys"]) == {"eu-spare"}   # billed to the key it went out on
    asyncio.run(body())


def test_a_provider_batch_result_names_the_key_it_went_out_on():
    from pipeline.money.pricing import get_price_book
    from pipeline.paths.provider_batch import outcome_of_line
    req = Request.from_row({"job_id": "j", "custom_id": "c", "provider": "openai", "model": "gpt-4o-mini",
                            "tier": "offpeak", "endpoint": CHAT_URL, "path": "provider_batch",
                            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}})
    body = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9}}
    line = {"custom_id": "q", "response": {"status_code": 200, "request_id": "req_1", "body": body}, "error": None}
    outcome, attempt, _ = outcome_of_line(req, line, get_price_book(), "team-b")
    assert outcome.key_alias == "team-b" and attempt["key_alias"] == "team-b"
    assert outcome.to_row()["key_alias"] == "team-b"


def test_an_openai_format_batch_is_created_polled_and_found_on_its_key(monkeypatch):
    """The OpenAI Files + Batches side: the chosen key uploads, creates, lists and reads back."""
    from tests.unit.test_simulator_providers import serve, stats

    async def body():
        async with serve() as (url, oa, http):
            monkeypatch.setenv("LLMBATCH_PROVIDERS", json.dumps({"together": {
                "kind": "openai", "batch": "openai", "base_url": f"{url}/p/together/v1",
                "keys": [{"alias": "one", "env": "TK1"}, {"alias": "second", "env": "TK2"}]}}))
            monkeypatch.setenv("TK1", "tk-one-SECRET")
            monkeypatch.setenv("TK2", "tk-two-SECRET")
            _fresh()
            settings = get_settings()
            content = "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": CHAT_URL,
                                          "body": {"model": "llama-70b", "max_tokens": 5,
                                                   "messages": [{"role": "user", "content": f"hi {i}"}]}}) + "\n"
                              for i in range(4)).encode()
            info = await batch_api.create(settings, "pb_oa", "together", content, [], key_alias="second")
            assert info["key_alias"] == "second"
            found = await batch_api.find_openai(settings, "pb_oa", 0, "together", key_alias="second")
            assert found["provider_batch_id"] == info["provider_batch_id"]
            state, lines = await _poll_until_ended(settings, "together", info["provider_batch_id"], "second")
            assert state == "completed" and len(lines) == 4
            s = await stats(http, url)
            assert s["together"]["keys"]["second"]["batch_lines"] == 4 and "one" not in s["together"]["keys"]
    try:
        asyncio.run(body())
    finally:
        _fresh()
