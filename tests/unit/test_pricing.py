"""Price book and exact cost arithmetic (no network, no services)."""

from __future__ import annotations

import json
from decimal import Decimal
from importlib import resources

import pytest

from pipeline.errors import ConfigError, LineError, UnknownModelError
from pipeline.money.pricing import (
    ModelPrice,
    PriceBook,
    Usage,
    cost,
    get_price_book,
    max_cost,
    usage_from_anthropic,
    usage_from_openai,
)

RAW = json.loads(resources.files("pipeline").joinpath("data", "pricing.json").read_text())["models"]
#: the package prices DeepSeek too, read when a provider named deepseek is configured
KINDS = {"openai": "openai", "anthropic": "anthropic", "deepseek": "openai"}
BOOK = PriceBook.load(kinds=KINDS)
M = 1_000_000

# Published USD per 1M tokens: (input, cached input / cache read, output).
PUBLISHED = {
    "gpt-4o": ("2.50", "1.25", "10.00"),
    "gpt-4o-mini": ("0.15", "0.075", "0.60"),
    "gpt-4.1": ("2.00", "0.50", "8.00"),
    "gpt-4.1-mini": ("0.40", "0.10", "1.60"),
    "gpt-4.1-nano": ("0.10", "0.025", "0.40"),
    "o1": ("15.00", "7.50", "60.00"),
    "o3": ("2.00", "0.50", "8.00"),
    "o3-mini": ("1.10", "0.55", "4.40"),
    "o4-mini": ("1.10", "0.275", "4.40"),
    "gpt-5": ("1.25", "0.125", "10.00"),
    "gpt-5-mini": ("0.25", "0.025", "2.00"),
    "gpt-5-nano": ("0.05", "0.005", "0.40"),
    "claude-3-5-haiku-latest": ("0.80", "0.08", "4.00"),
    "claude-3-5-sonnet-latest": ("3.00", "0.30", "15.00"),
    "claude-3-7-sonnet-latest": ("3.00", "0.30", "15.00"),
    "claude-sonnet-4-0": ("3.00", "0.30", "15.00"),
    "claude-opus-4-0": ("15.00", "1.50", "75.00"),
    "claude-opus-4-1": ("15.00", "1.50", "75.00"),
    "claude-sonnet-4-5": ("3.00", "0.30", "15.00"),
    "claude-haiku-4-5": ("1.00", "0.10", "5.00"),
    "claude-opus-4-5": ("5.00", "0.50", "25.00"),
    # embeddings, legacy completions and moderations: no cached-input price (it is the input price)
    "text-embedding-3-small": ("0.02", "0.02", "0"),
    "text-embedding-3-large": ("0.13", "0.13", "0"),
    "text-embedding-ada-002": ("0.10", "0.10", "0"),
    "gpt-3.5-turbo-instruct": ("1.50", "1.50", "2.00"),
    "davinci-002": ("2.00", "2.00", "2.00"),
    "babbage-002": ("0.40", "0.40", "0.40"),
    "omni-moderation-latest": ("0", "0", "0"),
    "text-moderation-latest": ("0", "0", "0"),
    # DeepSeek's peak prices (the list price; off-peak windows halve them)
    "deepseek-flash": ("0.30", "0.006", "1.20"),
    "deepseek-v4-pro": ("1.32", "0.044", "3.96"),
}
#: no Batch API discount is assumed: the model page says the Batch API is not supported
#: (gpt-3.5-turbo-instruct), lists no batch price (the base models) or the model is free
#: models OpenAI publishes no dated snapshot of (their model pages list the name alone)
UNDATED = {"text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002", "davinci-002",
           "babbage-002", "deepseek-v4-pro"}
NO_BATCH_DISCOUNT = {"gpt-3.5-turbo-instruct", "davinci-002", "babbage-002", "deepseek-flash", "deepseek-v4-pro",
                     "omni-moderation-latest",
                     "text-moderation-latest"}


def test_every_required_model_is_in_the_book():
    assert sorted(PUBLISHED) == BOOK.known_models() == sorted(RAW)


@pytest.mark.parametrize("model", sorted(RAW))
def test_file_entry_is_complete(model):
    entry = RAW[model]
    for key in ("provider", "input", "cached_input", "output", "batch_discount", "context_window",
                "max_output_tokens", "aliases", "effective_date", "source"):
        assert key in entry, key
    for key in ("input", "cached_input", "output", "batch_discount"):
        assert isinstance(entry[key], str), f"{key} must be an exact decimal string"
    assert entry["source"].startswith("https://")
    assert entry["provider"] in KINDS


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_cost_matches_published_price(model):
    inp, cached, out = (Decimal(x) for x in PUBLISHED[model])
    price = BOOK.resolve(model)
    assert (price.input_per_mtok, price.cached_input_per_mtok, price.output_per_mtok) == (inp, cached, out)
    # one million of each kind costs exactly the published price
    assert cost(price, Usage(M, 0)) == inp
    assert cost(price, Usage(0, M)) == out
    assert cost(price, Usage(M, 0, cached_input_tokens=M)) == cached
    # a mixed call: 1,234 prompt tokens of which 1,000 cached, 567 output tokens
    mixed = cost(price, Usage(1234, 567, cached_input_tokens=1000))
    assert mixed == (234 * inp + 1000 * cached + 567 * out) / M
    assert isinstance(mixed, Decimal)
    # batch: the discount off everything; all other prices here are half price with a Batch API
    if model in NO_BATCH_DISCOUNT:
        assert price.batch_discount == 0 and cost(price, Usage(M, M), batch=True) == inp + out
        return
    assert price.batch_discount == Decimal("0.5")
    assert cost(price, Usage(M, M), batch=True) == (inp + out) / 2
    assert cost(price, Usage(1234, 567, cached_input_tokens=1000), batch=True) == mixed / 2


def test_exact_values_hard_coded():
    mini = BOOK.resolve("gpt-4o-mini")
    # 234 * 0.15 + 1000 * 0.075 + 567 * 0.60 = 450.30 per million
    assert cost(mini, Usage(1234, 567, cached_input_tokens=1000)) == Decimal("0.0004503")
    assert cost(mini, Usage(1, 1)) == Decimal("0.00000075")
    assert cost(BOOK.resolve("gpt-5-nano"), Usage(1, 0, cached_input_tokens=1)) == Decimal("0.000000005")
    assert cost(BOOK.resolve("o1"), Usage(0, 0)) == 0
    # big numbers stay exact
    assert cost(BOOK.resolve("claude-opus-4-1"), Usage(10**12, 10**12)) == Decimal(90_000_000)


@pytest.mark.parametrize("model", sorted(RAW))
def test_aliases_and_dated_ids_resolve_to_the_same_price(model):
    price = BOOK.resolve(model)
    assert price.model == model
    assert price.aliases == tuple(RAW[model]["aliases"]) and (price.aliases or model in UNDATED)
    for alias in price.aliases:
        assert BOOK.resolve(alias) is price


@pytest.mark.parametrize("alias,model", [
    ("gpt-4o-2024-08-06", "gpt-4o"), ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    ("gpt-4.1-2025-04-14", "gpt-4.1"), ("o3-2025-04-16", "o3"), ("gpt-5-2025-08-07", "gpt-5"),
    ("claude-haiku-4-5-20251001", "claude-haiku-4-5"), ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("claude-opus-4-5-20251101", "claude-opus-4-5"), ("claude-opus-4-1-20250805", "claude-opus-4-1"),
    ("claude-sonnet-4-20250514", "claude-sonnet-4-0"), ("claude-3-7-sonnet-20250219", "claude-3-7-sonnet-latest"),
    ("claude-3-5-haiku-20241022", "claude-3-5-haiku-latest"),
])
def test_known_dated_ids(alias, model):
    assert BOOK.resolve(alias).model == model


def test_unknown_model_lists_the_closest_known_ones():
    with pytest.raises(UnknownModelError) as info:
        BOOK.resolve("gpt-9000")
    err = info.value
    assert isinstance(err, LineError)
    assert err.reason.startswith("unknown model 'gpt-9000'; known models: ")
    assert "gpt-4o-mini" in err.reason and err.reason.endswith(f" and {len(BOOK.known_models()) - 8} more")
    assert len(err.reason) <= 400   # the closest 8 names, not the whole book
    with pytest.raises(UnknownModelError) as info:
        BOOK.resolve("claude-haiku-4.5")
    assert "claude-haiku-4-5" in info.value.reason
    # a fine-tuned model is billed differently: not silently priced as its base
    with pytest.raises(UnknownModelError):
        BOOK.resolve("ft:gpt-4o-mini-2024-07-18:org::abc")


def test_limits():
    assert BOOK.resolve("gpt-4o").context_window == 128000
    assert BOOK.resolve("gpt-4o").max_output_tokens == 16384
    assert BOOK.resolve("gpt-4.1").context_window == 1047576
    assert BOOK.resolve("gpt-5").max_output_tokens == 128000
    assert BOOK.resolve("claude-haiku-4-5").context_window == 200000
    assert BOOK.resolve("claude-opus-4-1").max_output_tokens == 32000


def test_max_cost():
    p = BOOK.resolve("gpt-4o")
    assert max_cost(p, 1000, 500) == Decimal("0.0075")                  # 1000*2.50 + 500*10
    assert max_cost(p, 1000, None) == Decimal("0.16634")                # 16384 output tokens
    assert max_cost(p, 1000, None, batch=True) == Decimal("0.08317")
    assert max_cost(p, 0, 0) == 0
    h = BOOK.resolve("claude-haiku-4-5")
    assert max_cost(h, 2000, 1000) == Decimal("0.007")                  # 2000*1 + 1000*5
    assert max_cost(h, 2000, None) == Decimal("0.322")                  # 64000*5 = 320000
    with pytest.raises(ValueError):
        max_cost(p, -1, 10)


def test_usage_from_openai():
    u = usage_from_openai({"prompt_tokens": 1234, "completion_tokens": 567, "total_tokens": 1801,
                           "prompt_tokens_details": {"cached_tokens": 1000},
                           "completion_tokens_details": {"reasoning_tokens": 300}})
    assert u == Usage(1234, 567, 1000)
    assert usage_from_openai({"prompt_tokens": 5, "completion_tokens": 2}) == Usage(5, 2, 0)
    assert usage_from_openai({"prompt_tokens": 5, "completion_tokens": 2,
                              "prompt_tokens_details": None}) == Usage(5, 2, 0)
    assert usage_from_openai({"input_tokens": 5, "output_tokens": 2,
                              "input_tokens_details": {"cached_tokens": 3}}) == Usage(5, 2, 3)


def test_usage_from_anthropic_and_cost():
    raw = {"input_tokens": 100, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 500,
           "output_tokens": 50}
    u = usage_from_anthropic(raw)
    assert u == Usage(1600, 50, cached_input_tokens=1000, cache_write_tokens=500)
    h = BOOK.resolve("claude-haiku-4-5")
    # 100*1.00 + 1000*0.10 + 500*1.25 (5-minute write) + 50*5.00 = 1075 per million
    assert cost(h, u) == Decimal("0.001075")
    assert cost(h, u, batch=True) == Decimal("0.0005375")
    split = usage_from_anthropic({**raw, "cache_creation": {"ephemeral_5m_input_tokens": 300,
                                                            "ephemeral_1h_input_tokens": 200}})
    assert split == Usage(1600, 50, 1000, cache_write_tokens=300, cache_write_1h_tokens=200)
    # 100 + 100 + 300*1.25 + 200*2.00 + 250 = 1225 per million
    assert cost(h, split) == Decimal("0.001225")
    assert usage_from_anthropic({"input_tokens": 7, "output_tokens": 3,
                                 "cache_read_input_tokens": None,
                                 "cache_creation_input_tokens": None}) == Usage(7, 3)


def test_cache_writes_without_a_write_price_cost_the_input_price():
    p = BOOK.resolve("gpt-4o")
    assert p.cache_write_per_mtok is None
    assert cost(p, Usage(M, 0, cache_write_tokens=M)) == p.input_per_mtok


def test_inconsistent_usage_is_refused():
    p = BOOK.resolve("gpt-4o")
    with pytest.raises(ValueError):
        cost(p, Usage(10, 0, cached_input_tokens=11))
    with pytest.raises(ValueError):
        cost(p, Usage(-1, 0))


def test_user_file_overrides_and_adds(tmp_path):
    user = tmp_path / "prices.json"
    user.write_text(json.dumps({"models": {
        "gpt-4o": {"input": "2.00"},
        "my-model": {"provider": "openai", "input": "1", "cached_input": "0.5", "output": "3",
                     "batch_discount": "0", "context_window": 8192, "max_output_tokens": 1024,
                     "aliases": ["my-model-2026-01-01"], "effective_date": "2026-01-01",
                     "source": "internal contract"},
    }}))
    book = PriceBook.load(user)
    gpt4o = book.resolve("gpt-4o-2024-08-06")
    assert gpt4o.input_per_mtok == Decimal("2.00")
    assert gpt4o.output_per_mtok == Decimal("10.00") and gpt4o.context_window == 128000
    mine = book.resolve("my-model-2026-01-01")
    assert mine.model == "my-model" and mine.batch_discount == 0
    assert cost(mine, Usage(M, M), batch=True) == Decimal(4)
    assert "my-model" in book.known_models()
    # the package book is untouched
    assert PriceBook.load().resolve("gpt-4o").input_per_mtok == Decimal("2.50")


@pytest.mark.parametrize("models,match", [
    ({"gpt-4o": {"input": 2.5}}, "decimal string"),
    ({"x": {"provider": "openai", "input": "1"}}, "missing"),
    ({"gpt-4o": {"provider": "mistral"}}, "provider"),
    ({"gpt-4o": {"batch_discount": "1.5"}}, "batch_discount"),
    ({"gpt-4o": {"input": "-1"}}, "non-negative"),
    ({"gpt-4o": {"aliases": ["gpt-4o-mini"]}}, "names both"),
])
def test_bad_user_file_is_a_config_error(tmp_path, models, match):
    user = tmp_path / "prices.json"
    user.write_text(json.dumps({"models": models}))
    with pytest.raises(ConfigError, match=match):
        PriceBook.load(user)


def test_unreadable_user_file(tmp_path):
    with pytest.raises(ConfigError):
        PriceBook.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        PriceBook.load(bad)


def test_get_price_book_is_cached():
    book = get_price_book()
    assert book is get_price_book()
    assert isinstance(book.resolve("gpt-4o"), ModelPrice)
