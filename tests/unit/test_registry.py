"""Providers as data (pipeline/providers/registry.py) and which provider serves a model
(pipeline/money/pricing.py): defaults, configured entries, qualified and ambiguous names,
and the ConfigErrors a bad entry gets."""

from __future__ import annotations

import json

import pytest

from pipeline.config import Secret, load_settings
from pipeline.errors import ConfigError, UnknownModelError
from pipeline.intake.formats import parse_request
from pipeline.money.pricing import PriceBook
from pipeline.providers.base import KIND_MODULES, get_provider
from pipeline.providers.registry import build_registry

TOGETHER = {"kind": "openai", "base_url": "https://api.together.xyz/v1", "batch": "openai",
            "keys": [{"alias": "team-a", "env": "TOGETHER_A", "rpm": 300},
                     {"alias": "team-b", "env": "TOGETHER_B", "rpm": 150}]}
FIREWORKS = {"kind": "openai", "base_url": "https://api.fireworks.ai/inference/v1",
             "keys": [{"alias": "fw", "env": "FW_KEY"}]}
AZURE = {"kind": "azure-openai", "base_url": "https://east.openai.azure.com",
         "deployments": {"prod-4o": "gpt-4o"}, "keys": [{"alias": "east-1", "env": "AZ_KEY"}]}
ENV = {"TOGETHER_A": "tk-secret-a", "TOGETHER_B": "tk-secret-b", "FW_KEY": "fw-secret", "AZ_KEY": "az-secret"}
LLAMA = {"input": "0.88", "cached_input": "0.88", "output": "0.88", "batch_discount": "0.5",
         "context_window": 131072, "max_output_tokens": 4096, "encoding": "o200k_base",
         "effective_date": "2026-12-01", "source": "https://example.com/pricing"}


def registry(providers: dict, env: dict | None = None, **settings):
    env = {**ENV, **(env or {}), "LLMBATCH_PROVIDERS": json.dumps(providers)}
    return build_registry(load_settings({**env, **{f"LLMBATCH_{k.upper()}": v for k, v in settings.items()}}))


def book(tmp_path, models: dict, providers: dict) -> PriceBook:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": models}))
    return PriceBook.load(path, {p.name: p.kind for p in registry(providers)})


# ------------------------------------------------------------------ the registry

def test_openai_and_anthropic_exist_by_default_with_todays_behaviour():
    reg = build_registry(load_settings({}))
    assert reg.names() == ["anthropic", "openai"]
    oa, an = reg.get("openai"), reg.get("anthropic")
    assert (oa.kind, oa.batch, an.kind, an.batch) == ("openai", "openai", "anthropic", "anthropic")
    assert oa.base_url.endswith(":58080/v1") and an.base_url.endswith(":58080")   # no key: the simulator
    assert [k.alias for k in oa.keys] == ["default"] and oa.keys[0].reveal() == "sk-simulator"
    assert reg.simulated
    real = build_registry(load_settings({"OPENAI_API_KEY": "sk-real"}))
    assert real.get("openai").base_url == "https://api.openai.com/v1"
    assert real.get("openai").keys[0].reveal() == "sk-real" and not real.simulated
    moved = build_registry(load_settings({"LLMBATCH_OPENAI_BASE_URL": "http://proxy:1/v1"}))
    assert moved.get("openai").base_url == "http://proxy:1/v1"


def test_named_providers_from_json_with_keys_read_from_their_variables():
    reg = registry({"together": TOGETHER, "azure-east": AZURE})
    t = reg.get("together")
    assert [(k.alias, k.env, k.rpm) for k in t.keys] == [("team-a", "TOGETHER_A", 300), ("team-b", "TOGETHER_B", 150)]
    assert t.keys[0].reveal() == "tk-secret-a"
    assert "tk-secret" not in repr(t) and "tk-secret" not in repr(load_settings(
        {**ENV, "LLMBATCH_PROVIDERS": json.dumps({"together": TOGETHER})}))
    az = reg.get("azure-east")
    assert az.api_version and az.deployment_for("gpt-4o") == "prod-4o" and az.line_format == "openai"
    assert not reg.simulated


def test_named_providers_from_the_toml_file(tmp_path):
    toml = tmp_path / "llmbatch.toml"
    toml.write_text('[providers.vllm]\nkind = "openai"\nbase_url = "http://gpu-box:8000/v1"\n'
                    '[providers.openai]\nkeys = [{alias = "a", env = "OA_A"}, {alias = "b", env = "OA_B", rpm = 150}]\n')
    reg = build_registry(load_settings({"LLMBATCH_CONFIG": str(toml), "OA_A": "sk-a", "OA_B": "sk-b"}))
    assert reg.get("vllm").keys[0].alias == "default"          # no key needed: one anonymous key
    assert [k.alias for k in reg.get("openai").keys] == ["a", "b"]
    assert reg.get("openai").kind == "openai"                     # the default's other fields stay


@pytest.mark.parametrize("entry, env, message", [
    ({"kind": "gemini", "base_url": "https://x"}, {}, "kind must be one of"),
    ({"kind": "openai"}, {}, "base_url must be an http"),
    ({"kind": "openai", "base_url": "https://x", "keys": []}, {}, "non-empty list"),
    ({"kind": "openai", "base_url": "https://x", "keys": [{"alias": "a", "env": "UNSET_VAR"}]}, {},
     r"UNSET_VAR \(key 'a'\) is not set"),
    ({"kind": "openai", "base_url": "https://x", "keys": [{"alias": "a", "env": "V"}, {"alias": "a", "env": "W"}]},
     {"V": "1", "W": "2"}, "each alias must be unique"),
    ({"kind": "openai", "base_url": "https://x", "keys": [{"alias": "a", "env": "V", "rpm": 0}]}, {"V": "1"},
     "rpm must be a positive integer"),
    ({"kind": "openai", "base_url": "https://x", "keys": [{"alias": "a", "key": "sk-inline"}]}, {},
     "unknown fields key"),
    ({"kind": "openai", "base_url": "https://x", "batch": "anthropic"}, {}, "cannot take anthropic batches"),
    ({"kind": "azure-openai", "base_url": "https://x"}, {}, "needs deployments"),
    ({"kind": "openai", "base_url": "https://x", "deployments": {"d": "m"}}, {}, "for kind azure-openai only"),
    ({"kind": "openai", "base_url": "https://x", "rpm": 5}, {}, "unknown fields rpm"),
])
def test_bad_entries_are_config_errors_naming_the_field(entry, env, message):
    with pytest.raises(ConfigError, match=message):
        registry({"p1": entry}, env)


def test_bad_names_and_kinds():
    with pytest.raises(ConfigError, match="lowercase"):
        registry({"Together AI": TOGETHER})
    with pytest.raises(ConfigError, match="built-in provider 'anthropic' has kind 'anthropic'"):
        registry({"anthropic": {"kind": "openai"}})
    with pytest.raises(ConfigError, match="LLMBATCH_PROVIDERS|providers"):
        load_settings({"LLMBATCH_PROVIDERS": "[1, 2]"})


def test_get_provider_is_a_registry_lookup_by_kind():
    reg = registry({"together": TOGETHER, "azure-east": AZURE})
    assert set(KIND_MODULES) == {"openai", "azure-openai", "anthropic"}
    for name, module in (("together", "pipeline.providers.openai"), ("azure-east", "pipeline.providers.openai"),
                         ("anthropic", "pipeline.providers.anthropic")):
        p = get_provider(name, load_settings({}), reg)
        assert p.api.__name__ == module and p.spec is reg.get(name)
    az = get_provider("azure-east", load_settings({}), reg).client()
    assert type(az).__name__ == "AsyncAzureOpenAI"
    from pipeline.errors import PermanentProviderError
    with pytest.raises(PermanentProviderError, match="unknown provider 'nope'"):
        get_provider("nope", load_settings({}), reg)


def test_secret_type_hides_a_key_everywhere():
    s = Secret("tk-secret-a")
    assert "tk-secret" not in f"{s} {s!r} {[s]}" and "tk-secret" not in "%s" % s


# ------------------------------------------------------------------ which provider serves a model

def test_qualified_and_ambiguous_names(tmp_path):
    prices = book(tmp_path, {"together/meta-llama-3.1-70b": LLAMA,
                             "fireworks/meta-llama-3.1-70b": {**LLAMA, "input": "0.90", "output": "0.90"},
                             "mixtral-8x7b": {**LLAMA, "provider": "together"}},
                  {"together": TOGETHER, "fireworks": FIREWORKS})
    t = prices.resolve("together/meta-llama-3.1-70b")
    f = prices.resolve("fireworks/meta-llama-3.1-70b")
    assert (t.provider, t.model, str(t.input_per_mtok)) == ("together", "meta-llama-3.1-70b", "0.88")
    assert (f.provider, f.model, str(f.input_per_mtok)) == ("fireworks", "meta-llama-3.1-70b", "0.90")
    with pytest.raises(UnknownModelError, match="ambiguous.*fireworks/meta-llama-3.1-70b, together/meta-llama-3.1-70b"):
        prices.resolve("meta-llama-3.1-70b")
    assert prices.resolve("meta-llama-3.1-70b", "fireworks") is f     # a stored request names its provider
    assert prices.resolve("mixtral-8x7b").provider == "together"        # one provider serves it: that one
    assert prices.resolve("gpt-4o-mini").provider == "openai"           # the defaults are untouched
    with pytest.raises(UnknownModelError, match="not served by provider 'together'"):
        prices.resolve("gpt-4o-mini", "together")
    with pytest.raises(UnknownModelError, match="names provider 'together', not 'fireworks'"):
        prices.resolve("together/mixtral-8x7b", "fireworks")


def test_a_model_of_an_unconfigured_provider_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="provider 'deepseek' is not configured.*providers.deepseek"):
        book(tmp_path, {"deepseek-chat": {**LLAMA, "provider": "deepseek"}}, {})
    with pytest.raises(ConfigError, match="the name says provider 'together', the entry 'fireworks'"):
        book(tmp_path, {"together/x": {**LLAMA, "provider": "fireworks"}}, {"together": TOGETHER, "fireworks": FIREWORKS})
    with pytest.raises(ConfigError, match="encoding must be one of"):
        book(tmp_path, {"together/x": {**LLAMA, "encoding": "llama3"}}, {"together": TOGETHER})


def test_an_azure_deployment_model_is_priced_as_its_own_entry(tmp_path):
    prices = book(tmp_path, {"azure-east/gpt-4o": {"input": "2.75", "cached_input": "1.375", "output": "11.00",
                                                  "batch_discount": "0.5", "context_window": 128000,
                                                  "max_output_tokens": 16384, "effective_date": "2026-12-01",
                                                  "source": "https://azure.microsoft.com/pricing"}},
                  {"azure-east": AZURE})
    assert prices.resolve("azure-east/gpt-4o").kind == "azure-openai"
    with pytest.raises(UnknownModelError, match="ambiguous"):
        prices.resolve("gpt-4o")
    assert prices.resolve("gpt-4o", "openai").provider == "openai"


def test_intake_takes_the_provider_from_the_name_and_sends_the_providers_own_id(tmp_path):
    prices = book(tmp_path, {"together/meta-llama-3.1-70b": LLAMA,
                             "fireworks/meta-llama-3.1-70b": {**LLAMA, "input": "0.90"}},
                  {"together": TOGETHER, "fireworks": FIREWORKS})

    def line(model):
        return {"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}}
    req = parse_request(line("fireworks/meta-llama-3.1-70b"), prices)
    assert (req.provider, req.model, req.body["model"]) == ("fireworks", "meta-llama-3.1-70b", "meta-llama-3.1-70b")
    assert req.max_cost_usd > 0
    with pytest.raises(UnknownModelError, match="ambiguous"):
        parse_request(line("meta-llama-3.1-70b"), prices)
    from pipeline.errors import LineError
    with pytest.raises(LineError, match="served by together: use the OpenAI"):
        parse_request({"custom_id": "c2", "params": {"model": "together/meta-llama-3.1-70b", "max_tokens": 5,
                                                     "messages": [{"role": "user", "content": "hi"}]}}, prices)
