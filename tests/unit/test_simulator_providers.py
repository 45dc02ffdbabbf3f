"""Named providers, keys, prices and flex in the simulator, driven through the official SDKs."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from decimal import Decimal

import aiohttp
import anthropic
import openai
import pytest
from anthropic import AsyncAnthropic
from openai import AsyncAzureOpenAI, AsyncOpenAI

from pipeline.errors import ConfigError
from simulator import SimulatorConfig, start
from simulator.providers import key_alias

KEYS = ("tk-one-SECRET", "tk-two-SECRET", "tk-three-SECRET", "ak-1-SECRET", "az-1-SECRET")
PROVIDERS = {
    "together": {"kind": "openai",
                 "models": {"llama-70b": {"input": "0.88", "output": "0.90", "batch_discount": "0.5"},
                            "gte-small": {"input": "0.01", "dimensions": 384}},
                 "keys": [{"key": "tk-one-SECRET", "rpm": 3}, {"key": "tk-two-SECRET", "rpm": 2, "alias": "second"},
                          {"key": "tk-three-SECRET", "revoke_after": 2}]},
    "claude-eu": {"kind": "anthropic", "models": {"claude-haiku-4-5": {"input": "2", "output": "10"}},
                  "keys": [{"key": "ak-1-SECRET"}]},
    "azure-east": {"kind": "azure-openai", "deployments": {"prod-4o": "gpt-4o-mini", "emb": "text-embedding-3-small"},
                   "keys": [{"key": "az-1-SECRET", "rpm": 2}]},
}
MSG = [{"role": "user", "content": "Name a colour."}]
M = Decimal(1_000_000)


@contextlib.asynccontextmanager
async def serve(**options):
    options.setdefault("providers", PROVIDERS)
    runner, url = await start(SimulatorConfig(host="127.0.0.1", port=0, batch_processing_s=0.2,
                                              batch_stage_s=0.02, **options))
    http = aiohttp.ClientSession()
    clients = []

    def oa(prefix="/v1", key="sk-test"):
        c = AsyncOpenAI(base_url=url + prefix, api_key=key, max_retries=0, timeout=10)
        clients.append(c)
        return c
    try:
        yield url, oa, http
    finally:
        for c in clients:
            await c.close()
        await http.close()
        await runner.cleanup()


async def stats(http, url) -> dict:
    async with http.get(url + "/_stats") as r:
        return (await r.json())["providers"]


def run(coro):
    return asyncio.run(coro)


def test_named_openai_provider_serves_its_models_at_its_prices():
    async def body():
        async with serve() as (url, oa, http):
            c = oa("/p/together/v1", "tk-one-SECRET")
            r = await c.chat.completions.create(model="llama-70b", messages=MSG)
            e = await c.embeddings.create(model="gte-small", input="hello there")
            with pytest.raises(openai.NotFoundError) as missing:
                await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
            with pytest.raises(openai.AuthenticationError) as unknown:
                await oa("/p/together/v1", "tk-nope").chat.completions.create(model="llama-70b", messages=MSG)
            with pytest.raises(openai.NotFoundError):
                await oa("/p/nobody/v1").chat.completions.create(model="llama-70b", messages=MSG)
            builtin = await oa().chat.completions.create(model="gpt-4o-mini", messages=MSG)
            same = await oa("/p/openai/v1").chat.completions.create(model="gpt-4o-mini", messages=MSG)
            return r, e, missing.value, unknown.value, builtin, same, await stats(http, url)

    r, e, missing, unknown, builtin, same, st = run(body())
    assert r.model == "llama-70b" and r.choices[0].message.content.startswith("Simulated answer")
    assert len(e.data[0].embedding) == 384
    assert missing.body["code"] == "model_not_found"
    assert unknown.status_code == 401 and unknown.body["code"] == "invalid_api_key"
    assert "tk-nope" not in json.dumps(unknown.body)
    t = st["together"]
    want = (r.usage.prompt_tokens * Decimal("0.88") + r.usage.completion_tokens * Decimal("0.90")
            + e.usage.prompt_tokens * Decimal("0.01")) / M
    assert Decimal(t["billed_usd"]) == want
    assert t["calls"] == 4 and t["401"] == 1 and t["errors"]["404"] == 1
    one = t["keys"][key_alias("tk-one-SECRET")]
    assert one["calls"] == 3 and one["successes"] == 2 and one["tokens"] == r.usage.total_tokens + e.usage.total_tokens
    # the built-in provider bills gpt-4o-mini at its published price: $0.15 in, $0.60 out
    u = builtin.usage
    assert Decimal(st["openai"]["billed_usd"]) == 2 * (u.prompt_tokens * Decimal("0.15")
                                                       + u.completion_tokens * Decimal("0.60")) / M
    assert same.choices[0].message.content == builtin.choices[0].message.content


def test_limits_hold_per_key_per_model_with_headers_and_peaks():
    async def body():
        async with serve() as (url, oa, http):
            one, two = oa("/p/together/v1", "tk-one-SECRET"), oa("/p/together/v1", "tk-two-SECRET")
            raws = [await one.chat.completions.with_raw_response.create(model="llama-70b", messages=MSG)
                    for _ in range(3)]
            with pytest.raises(openai.RateLimitError) as over:
                await one.chat.completions.create(model="llama-70b", messages=MSG)
            for _ in range(2):
                await two.chat.completions.create(model="llama-70b", messages=MSG)
            with pytest.raises(openai.RateLimitError):
                await two.chat.completions.create(model="llama-70b", messages=MSG)
            # another model under the same key has its own window
            await one.embeddings.create(model="gte-small", input="x")
            return raws, over.value, await stats(http, url)

    raws, over, st = run(body())
    assert [r.headers["x-ratelimit-remaining-requests"] for r in raws] == ["2", "1", "0"]
    assert raws[0].headers["x-ratelimit-limit-requests"] == "3"
    assert over.body["code"] == "rate_limit_exceeded" and int(over.response.headers["retry-after"]) >= 1
    keys = st["together"]["keys"]
    one, two = keys[key_alias("tk-one-SECRET")], keys["second"]
    assert (one["calls"], one["429"], one["peak_calls_60s"]) == (5, 1, 5)
    assert (two["calls"], two["429"], two["successes"]) == (3, 1, 2)
    assert st["together"]["429"] == 2 and st["together"]["peak_calls_60s"] == 8


def test_keys_are_revoked_by_admin_call_or_after_n_calls_and_never_shown(caplog):
    caplog.set_level(logging.DEBUG)

    async def body():
        async with serve() as (url, oa, http):
            one = oa("/p/together/v1", "tk-one-SECRET")
            await one.chat.completions.create(model="llama-70b", messages=MSG)
            async with http.post(url + "/_admin/keys/revoke", json={"key": "tk-one-SECRET"}) as r:
                revoked = (r.status, await r.json())
            with pytest.raises(openai.AuthenticationError) as e1:
                await one.chat.completions.create(model="llama-70b", messages=MSG)
            three = oa("/p/together/v1", "tk-three-SECRET")
            for _ in range(2):
                await three.chat.completions.create(model="llama-70b", messages=MSG)
            with pytest.raises(openai.AuthenticationError):
                await three.chat.completions.create(model="llama-70b", messages=MSG)
            an = AsyncAnthropic(base_url=url + "/p/claude-eu", api_key="ak-1-SECRET", max_retries=0)
            await an.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=MSG)
            await http.post(url + "/_admin/keys/revoke", json={"key": "ak-1-SECRET", "provider": "claude-eu"})
            with pytest.raises(anthropic.AuthenticationError) as e2:
                await an.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=MSG)
            await an.close()
            async with http.post(url + "/_admin/keys/restore", json={"key": "tk-one-SECRET"}) as r:
                restored = r.status
            again = await one.chat.completions.create(model="llama-70b", messages=MSG)
            st = await stats(http, url)
            cfg = await (await http.get(url + "/_config")).text()
            metrics = await (await http.get(url + "/metrics")).text()
            return revoked, e1.value, e2.value, restored, again, st, cfg, metrics

    revoked, e1, e2, restored, again, st, cfg, metrics = run(body())
    assert revoked == (200, {"revoked": ["together"]})
    assert e1.status_code == 401 and e1.body["code"] == "invalid_api_key" and e1.body["type"] == "invalid_request_error"
    assert e2.status_code == 401 and e2.body["error"]["type"] == "authentication_error"
    assert restored == 200 and again.choices
    t = st["together"]
    assert t["401"] == 2 and t["keys"][key_alias("tk-three-SECRET")]["401"] == 1
    assert t["revoked_keys"] == [key_alias("tk-three-SECRET")]
    assert st["claude-eu"]["revoked_keys"] == [key_alias("ak-1-SECRET")]
    shown = cfg + json.dumps(st) + metrics + caplog.text
    assert key_alias("tk-three-SECRET") in caplog.text            # the revocation is logged, by alias
    for key in KEYS:
        assert key not in shown


def test_named_anthropic_provider_bills_its_own_price():
    async def body():
        async with serve() as (url, oa, http):
            an = AsyncAnthropic(base_url=url + "/p/claude-eu", api_key="ak-1-SECRET", max_retries=0)
            m = await an.messages.create(model="claude-haiku-4-5", max_tokens=100, messages=MSG)
            with pytest.raises(anthropic.AuthenticationError):
                await AsyncAnthropic(base_url=url + "/p/claude-eu", api_key="bad", max_retries=0).messages.create(
                    model="claude-haiku-4-5", max_tokens=100, messages=MSG)
            await an.close()
            return m, await stats(http, url)

    m, st = run(body())
    assert Decimal(st["claude-eu"]["billed_usd"]) == (m.usage.input_tokens * 2 + m.usage.output_tokens * 10) / M
    assert st["claude-eu"]["kind"] == "anthropic" and st["claude-eu"]["401"] == 1


def test_azure_deployments_api_key_and_error_shapes():
    async def body():
        async with serve() as (url, oa, http):
            az = AsyncAzureOpenAI(azure_endpoint=url + "/p/azure-east", api_key="az-1-SECRET",
                                  api_version="2024-10-21", max_retries=0)
            r = await az.chat.completions.create(model="prod-4o", messages=MSG)
            e = await az.embeddings.create(model="emb", input="hello")
            await az.chat.completions.create(model="prod-4o", messages=MSG)
            with pytest.raises(openai.RateLimitError) as limited:
                await az.chat.completions.create(model="prod-4o", messages=MSG)
            with pytest.raises(openai.NotFoundError) as missing:
                await az.chat.completions.create(model="nope", messages=MSG)
            bad = AsyncAzureOpenAI(azure_endpoint=url + "/p/azure-east", api_key="wrong", api_version="2024-10-21",
                                   max_retries=0)
            with pytest.raises(openai.AuthenticationError) as denied:
                await bad.chat.completions.create(model="prod-4o", messages=MSG)
            async with http.post(url + "/p/azure-east/openai/deployments/prod-4o/chat/completions",
                                 json={"messages": MSG}, headers={"api-key": "az-1-SECRET"}) as resp:
                no_version = (resp.status, await resp.json())
            await az.close()
            await bad.close()
            return r, e, limited.value, missing.value, denied.value, no_version, await stats(http, url)

    r, e, limited, missing, denied, no_version, st = run(body())
    assert r.model == "gpt-4o-mini" and r.object == "chat.completion"
    assert len(e.data[0].embedding) == 1536
    assert limited.body["code"] == "429" and "ChatCompletions_Create" in limited.body["message"]
    assert "retry after" in limited.body["message"] and limited.response.headers["retry-after"]
    assert missing.body["code"] == "DeploymentNotFound"
    assert denied.body == {"code": "401", "message": denied.body["message"]}
    assert denied.body["message"].startswith("Access denied due to invalid subscription key")
    assert no_version == (404, {"error": {"code": "404", "message": "Resource not found"}})
    u, eu = r.usage, e.usage   # two chat calls with the same answer, one embedding
    assert Decimal(st["azure-east"]["billed_usd"]) == (2 * (u.prompt_tokens * Decimal("0.15") + u.completion_tokens
                                                            * Decimal("0.60")) + eu.prompt_tokens * Decimal("0.02")) / M


def test_named_provider_batches_bill_the_batch_price_to_the_key():
    async def body():
        async with serve() as (url, oa, http):
            c = oa("/p/together/v1", "tk-two-SECRET")
            blob = "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                       "body": {"model": "llama-70b", "messages": MSG}}) + "\n" for i in range(4))
            f = await c.files.create(file=("in.jsonl", io.BytesIO(blob.encode())), purpose="batch")
            b = await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
            for _ in range(200):
                b = await c.batches.retrieve(b.id)
                if b.status == "completed":
                    break
                await asyncio.sleep(0.05)
            lines = [json.loads(x) for x in (await c.files.content(b.output_file_id)).text.splitlines()]
            default = await oa().batches.list()
            return lines, default, await stats(http, url)

    lines, default, st = run(body())
    assert len(lines) == 4 and not default.data          # each provider has its own batches
    usage = [x["response"]["body"]["usage"] for x in lines]
    full = sum(u["prompt_tokens"] * Decimal("0.88") + u["completion_tokens"] * Decimal("0.90") for u in usage) / M
    key = st["together"]["keys"]["second"]
    assert key["batch_lines"] == 4 and Decimal(key["billed_usd"]) == full / 2


# --------------------------------------------------------------------------- flex

def test_flex_is_billed_at_half_price_echoed_and_refused_for_other_models():
    async def body():
        async with serve() as (url, oa, http):
            c = oa()
            std = await c.chat.completions.create(model="gpt-5-mini", messages=MSG, max_completion_tokens=200)
            flex = await c.chat.completions.create(model="gpt-5-mini", messages=MSG, max_completion_tokens=200,
                                                   service_tier="flex")
            resp = await c.responses.create(model="o4-mini", input="hi", service_tier="flex")
            with pytest.raises(openai.BadRequestError) as refused:
                await c.chat.completions.create(model="gpt-4o-mini", messages=MSG, service_tier="flex")
            with pytest.raises(openai.BadRequestError):
                await c.embeddings.create(model="text-embedding-3-small", input="x", extra_body={"service_tier": "flex"})
            return std, flex, resp, refused.value, await stats(http, url)

    std, flex, resp, refused, st = run(body())
    assert flex.service_tier == "flex" and std.service_tier == "default" and resp.service_tier == "flex"
    assert flex.usage == std.usage
    price = lambda u, i, o: (u.prompt_tokens * Decimal(i) + u.completion_tokens * Decimal(o)) / M  # noqa: E731
    r = resp.usage
    want = (price(std.usage, "0.25", "2.00") + price(flex.usage, "0.25", "2.00") / 2
            + (r.input_tokens * Decimal("1.10") + r.output_tokens * Decimal("4.40")) / M / 2)
    assert Decimal(st["openai"]["billed_usd"]) == want
    assert refused.body["param"] == "service_tier"
    assert st["openai"]["flex_calls"] == 4


def test_flex_unavailable_answers_429_unbilled_at_the_configured_rate():
    async def body():
        async with serve(flex_unavailable_rate=0.3, seed=7) as (url, oa, http):
            c = oa()
            errors = []
            for _ in range(200):
                try:
                    await c.chat.completions.create(model="gpt-5-nano", messages=MSG, service_tier="flex",
                                                    max_completion_tokens=50)
                except openai.RateLimitError as e:
                    errors.append(e)
            plain = await c.chat.completions.create(model="gpt-5-nano", messages=MSG, max_completion_tokens=50)
            return errors, plain, await stats(http, url)

    errors, plain, st = run(body())
    assert 40 <= len(errors) <= 80
    assert errors[0].body["code"] == "resource_unavailable" and errors[0].body["type"] == "resource_unavailable"
    o = st["openai"]
    assert o["flex_unavailable_429"] == len(errors) == o["429"] and o["flex_calls"] == 200
    u = plain.usage
    one = (u.prompt_tokens * Decimal("0.05") + u.completion_tokens * Decimal("0.40")) / M
    # every served flex call billed at half price, the 429s not at all, the standard call in full
    assert Decimal(o["billed_usd"]) == (200 - len(errors)) * one / 2 + one


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("providers,message", [
    ({"x": {"kind": "gemini"}}, "kind must be one of"),
    ({"x": {"kind": "openai", "models": {"m": {"output": "1"}}}}, "needs a price"),
    ({"x": {"kind": "azure-openai"}}, "needs deployments"),
    ({"x": {"kind": "azure-openai", "deployments": {"d": "mystery"}}}, "has no built-in price"),
    ({"x": {"keys": [{"key": "k-SECRET"}, {"key": "k-SECRET"}]}}, "listed twice"),
    ({"x": {"keys": [{"key": "k-SECRET", "rpm": 0}]}}, "positive integer"),
    ({"x": {"models": {"m": {"input": "cheap"}}}}, "decimal number"),
    ({"x": {"colour": "red"}}, "unknown simulator settings in providers.x: colour"),
    ({"Bad Name": {}}, "must be lowercase"),
    ({"openai": {"kind": "anthropic"}}, "built-in provider"),
])
def test_provider_config_errors_are_clear_and_never_show_a_key(providers, message):
    with pytest.raises(ConfigError) as e:
        SimulatorConfig(providers=providers).validate()
    assert message in str(e.value) and "SECRET" not in str(e.value)


def test_flex_settings_and_providers_from_a_file_and_the_command_line(tmp_path):
    from simulator import config_from_args

    path = tmp_path / "sim.toml"
    path.write_text('[simulator]\nflex_unavailable_rate = 0.25\n'
                    '[simulator.providers.vllm]\nkind = "openai"\n'
                    '[simulator.providers.vllm.models."qwen-7b"]\ninput = "0.1"\noutput = "0.2"\nrpm = 60\n')
    cfg = SimulatorConfig.from_file(path)
    assert cfg.flex_unavailable_rate == 0.25 and cfg.providers["vllm"].models["qwen-7b"].rpm == 60
    cli = config_from_args(["--config", str(path), "--flex-unavailable-rate", "0.5", "--flex-models", "a,b"])
    assert cli.flex_unavailable_rate == 0.5 and cli.flex_models == ["a", "b"] and "vllm" in cli.providers
    with pytest.raises(ConfigError, match="flex_unavailable_rate"):
        SimulatorConfig(flex_unavailable_rate=1.5).validate()


def test_a_provider_without_a_batch_api_answers_404_on_its_batch_routes():
    async def body():
        providers = {"deepseek": {"batches": False, "models": {"ds-chat": {"input": "0.27", "output": "1.10"}}}}
        async with serve(providers=providers) as (url, oa, http):
            c = oa("/p/deepseek/v1")
            ok = await c.chat.completions.create(model="ds-chat", messages=MSG)
            with pytest.raises(openai.NotFoundError):
                await c.batches.list()
            return ok

    assert run(body()).model == "ds-chat"
    with pytest.raises(ConfigError, match="batches must be true or false"):
        SimulatorConfig(providers={"x": {"batches": "no"}}).validate()


def test_runtime_config_adds_a_provider_and_turns_flex_unavailability_on():
    async def body():
        async with serve(providers={}) as (url, oa, http):
            with pytest.raises(openai.NotFoundError):
                await oa("/p/late/v1").chat.completions.create(model="m", messages=MSG)
            async with http.post(url + "/_config", json={
                    "providers": {"late": {"models": {"m": {"input": "1", "output": "1"}}}},
                    "flex_unavailable_rate": 1.0}) as r:
                assert r.status == 200
            ok = await oa("/p/late/v1").chat.completions.create(model="m", messages=MSG)
            with pytest.raises(openai.RateLimitError):
                await oa().chat.completions.create(model="gpt-5", messages=MSG, service_tier="flex")
            async with http.post(url + "/_config", json={"flex_unavailable_rate": 3}) as r:
                bad = r.status
            return ok, bad

    ok, bad = run(body())
    assert ok.model == "m" and bad == 400


def test_azure_v1_and_responses_routes_take_the_deployment_as_model():
    async def body():
        async with serve() as (url, oa, http):
            v1 = oa("/p/azure-east/openai/v1", "az-1-SECRET")
            chat = await v1.chat.completions.create(model="prod-4o", messages=MSG)
            resp = await v1.responses.create(model="prod-4o", input="hi")
            async with http.post(url + "/p/azure-east/openai/deployments/prod-4o/moderations?api-version=x",
                                 json={"input": "x"}, headers={"api-key": "az-1-SECRET"}) as r:
                no_moderations = r.status
            with pytest.raises(openai.NotFoundError) as missing:
                await v1.chat.completions.create(model="gpt-4o-mini", messages=MSG)
            with pytest.raises(openai.NotFoundError):   # an openai-kind provider has no Azure routes
                await oa("/p/together/openai/v1", "tk-one-SECRET").chat.completions.create(
                    model="llama-70b", messages=MSG)
            return chat, resp, no_moderations, missing.value

    chat, resp, no_moderations, missing = run(body())
    assert chat.model == "gpt-4o-mini" and resp.model == "gpt-4o-mini" and resp.status == "completed"
    assert no_moderations == 404 and missing.body["code"] == "DeploymentNotFound"


def test_a_provider_with_keys_refuses_a_call_without_one():
    async def body():
        async with serve() as (url, oa, http):
            async with http.post(url + "/p/together/v1/chat/completions",
                                 json={"model": "llama-70b", "messages": MSG}) as r:
                oa_missing = (r.status, await r.json())
            async with http.post(url + "/p/claude-eu/v1/messages",
                                 json={"model": "claude-haiku-4-5", "max_tokens": 5, "messages": MSG}) as r:
                an_missing = (r.status, await r.json())
            async with http.post(url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MSG}) as r:
                open_provider = r.status     # the built-in provider lists no keys: any call is served
            return oa_missing, an_missing, open_provider

    oa_missing, an_missing, open_provider = run(body())
    assert oa_missing[0] == 401 and oa_missing[1]["error"]["message"].startswith("You didn't provide an API key")
    assert an_missing[0] == 401 and an_missing[1]["error"] == {"type": "authentication_error",
                                                               "message": "x-api-key header is required"}
    assert open_provider == 200
