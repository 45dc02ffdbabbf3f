"""The savings ledger's arithmetic (pure): list price is realtime with no cache, and what each lever
saved adds up to list price minus what was paid, exactly, on every path."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, strategies as st

from pipeline.money.pricing import Usage, cost, get_price_book
from pipeline.money.savings import LEVERS, list_price, main_lever, split, without_call
from pipeline.paths import base as sequence
from pipeline.paths.flex import FLEX
from pipeline.paths.provider_batch import PROVIDER_BATCH
from pipeline.paths.realtime import REALTIME
from pipeline.request import Request
from tests.unit.test_paths import row

PRICES = get_price_book()
MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-5-mini", "claude-haiku-4-5", "claude-sonnet-4-5"]


@st.composite
def usages(draw):
    inp = draw(st.integers(0, 2_000_000))
    cached = draw(st.integers(0, inp))
    w5 = draw(st.integers(0, inp - cached))
    w1 = draw(st.integers(0, inp - cached - w5))
    return Usage(inp, draw(st.integers(0, 200_000)), cached, w5, w1)


@given(model=st.sampled_from(MODELS), usage=usages(), discount=st.sampled_from([None, "batch", "flex"]),
       window=st.sampled_from(["1", "0.5", "0.75", "1.2"]))
def test_the_levers_add_up_to_list_price_minus_paid_exactly(model, usage, discount, window):
    price = PRICES.resolve(model)
    paid = cost(price, usage, batch=discount is not None) * Decimal(window)
    saved = split(price, usage, paid, discount)
    assert sum(saved.values(), Decimal(0)) == list_price(price, usage) - paid
    assert set(saved) <= set(LEVERS) and all(v != 0 for v in saved.values())
    if window == "1":
        assert "price_window" not in saved   # never a saving that did not happen
    if discount is None:
        assert not {"batch", "flex"} & set(saved)


def test_list_price_counts_cached_and_written_tokens_as_plain_input():
    price = PRICES.resolve("gpt-4o")
    assert list_price(price, Usage(10_000, 100, 8_000)) == cost(price, Usage(10_000, 100))
    assert list_price(price, Usage(10_000, 100, 8_000)) > cost(price, Usage(10_000, 100, 8_000))


def test_a_prompt_cache_that_only_wrote_cost_more_and_the_ledger_says_so():
    price = PRICES.resolve("claude-sonnet-4-5")
    usage = Usage(5_000, 100, cache_write_tokens=4_000)
    saved = split(price, usage, cost(price, usage))
    assert saved["prompt_cache"] < 0 and main_lever(saved) is None


def test_a_batch_with_cache_reads_saves_on_both_levers():
    price = PRICES.resolve("claude-haiku-4-5")
    usage = Usage(10_000, 500, cached_input_tokens=8_000)
    paid = cost(price, usage, batch=True)
    saved = split(price, usage, paid, "batch")
    assert set(saved) == {"prompt_cache", "batch"} and saved["batch"] == cost(price, usage) / 2
    assert main_lever(saved) in ("prompt_cache", "batch")


def test_unknown_levers_are_refused():
    price = PRICES.resolve("gpt-4o")
    with pytest.raises(ValueError):
        split(price, Usage(1, 1), Decimal(0), "coupon")
    with pytest.raises(ValueError):
        without_call("batch", Decimal(1))


# ------------------------------------------------------------------ on the paths' outcomes

def _body(prompt=1000, completion=500, cached=0, tier=None):
    b = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-5-mini",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                   "prompt_tokens_details": {"cached_tokens": cached}}}
    if tier:
        b["service_tier"] = tier
    return b


def test_each_paths_outcome_carries_its_savings():
    price = PRICES.resolve("gpt-5-mini")
    full = cost(price, Usage(2000, 500))
    rt = sequence.answered(REALTIME, Request.from_row(row(mode="realtime")), _body(2000), PRICES, attempts=1)
    assert rt.list_cost == full == rt.cost and rt.savings == {} and rt.lever is None
    cached = sequence.answered(REALTIME, Request.from_row(row(mode="realtime")), _body(2000, cached=1024),
                               PRICES, attempts=1)
    assert cached.list_cost == full and cached.savings == {"prompt_cache": full - cached.cost}
    assert cached.lever == "prompt_cache"
    flex = sequence.answered(FLEX, Request.from_row(row()), _body(2000, tier="flex"), PRICES, attempts=1)
    assert flex.savings == {"flex": full / 2} and flex.lever == "flex"
    pb = sequence.answered(PROVIDER_BATCH, Request.from_row(row(mode="provider_batch")), _body(2000, cached=1024),
                           PRICES, attempts=1)
    assert set(pb.savings) == {"prompt_cache", "batch"} and sum(pb.savings.values()) == full - pb.cost


def test_an_answer_without_a_call_saves_its_whole_list_price_and_is_a_cache_hit():
    req = Request.from_row(row(mode="realtime", cache_key="k"))
    out = sequence.without_call(req, _body(2000, cached=1024), PRICES, "coalesce")
    full = cost(PRICES.resolve("gpt-5-mini"), Usage(2000, 500))
    assert out.cost == 0 and out.list_cost == full and out.savings == {"coalesce": full} and out.from_cache
    r = out.to_row()
    assert r["savings"] == {"coalesce": str(full)} and r["saved_usd"] == str(full) and r["from_cache"] is True
    assert r["lever"] == "coalesce" and r["cache_key"] == "k"


def test_an_answer_that_cannot_be_priced_is_a_miss():
    req = Request.from_row(row(mode="realtime", cache_key="k"))
    assert sequence.without_call(req, {"id": "x"}, PRICES, "cache") is None
    assert sequence.without_call(req, "not a dict", PRICES, "cache") is None


# ------------------------------------------------------------------ status and report

def test_status_says_spent_against_list_price_and_by_lever():
    from llmbatch.cli.views import savings_line
    line = savings_line({"list_cost_usd": "2.00", "cost_usd": "0.50", "saved_usd": "1.50",
                         "by_lever": {"batch": "1.00", "coalesce": "0.50", "flex": "0"}})
    assert line == "list price $2  saved $1.5 (75.0%): coalesce $0.5, batch $1"
    assert savings_line({"list_cost_usd": "0", "cost_usd": "0", "saved_usd": "0", "by_lever": {}}) is None


def test_the_report_shows_spent_against_list_price(tmp_path):
    from datetime import datetime, timezone

    from llmbatch.cli import report
    t0 = datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)
    rows = [{"bucket": t0, "tier": "peak", "model": "gpt-4o-mini", "requests": 2, "input_tokens": 1,
             "output_tokens": 1, "cost_usd": Decimal("0.01"), "list_cost_usd": Decimal("0.03")}]
    data = {"step": "minute", "rows": rows, "savings": {"coalesce": Decimal("0.015"), "batch": Decimal("0.005")}}
    assert report.savings_table(data) == [["list price", Decimal("0.03")], ["spent", Decimal("0.01")],
                                          ["saved", Decimal("0.02")], ["saved by coalesce", Decimal("0.015")],
                                          ["saved by batch", Decimal("0.005")]]
    assert report.chart(data, tmp_path / "c.png", "test").stat().st_size > 1000


def test_dollars_saved_are_counted_by_lever_and_a_cost_is_not():
    from pipeline import metrics

    def value(lever):
        return metrics.REGISTRY.get_sample_value("llmbatch_saved_usd_total", {"lever": lever}) or 0.0
    before = value("coalesce"), value("prompt_cache")
    metrics.record_savings([{"savings": {"coalesce": "0.25", "prompt_cache": "-0.01"}}, {"savings": None}, {}])
    # a Prometheus counter is a float: what other tests in the process added makes the sum inexact
    assert value("coalesce") - before[0] == pytest.approx(0.25, abs=1e-12) and value("prompt_cache") == before[1]


def test_a_fallback_models_answer_is_not_cached_under_the_requests_key():
    req = Request.from_row(row(mode="realtime", cache_key="k"))
    own = sequence.answered(REALTIME, req, _body(), PRICES, attempts=1)
    other = sequence.answered(REALTIME, req, _body(), PRICES, model="gpt-4o-mini", attempts=1)
    assert own.cache_key == "k" and other.cache_key is None
