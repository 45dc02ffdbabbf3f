"""The simulator's own time-of-day prices and Batch API refusals (simulator/prices.py,
simulator/batches.py), written from the providers' pages and not from the pipeline's price book:
the price book and the simulator must agree, each read on its own."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from pipeline.money.pricing import PriceBook, Usage, cost
from simulator.batch_rules import validate_openai_lines
from simulator.prices import NO_BATCH, OPENAI_PRICES, time_multiplier, usd

BOOK = PriceBook.load(kinds={"openai": "openai", "anthropic": "anthropic", "deepseek": "openai"})


def test_the_simulator_bills_deepseek_half_off_peak_by_its_own_table():
    usage = {"prompt_tokens": 2_000_000, "completion_tokens": 1_000_000,
             "prompt_tokens_details": {"cached_tokens": 1_000_000}}
    price = OPENAI_PRICES["deepseek-flash"]
    peak = datetime(2026, 12, 7, 2, 30, tzinfo=timezone.utc)       # Monday 10:30 Beijing
    lunch = datetime(2026, 12, 7, 4, 30, tzinfo=timezone.utc)      # Monday 12:30 Beijing
    saturday = datetime(2026, 12, 12, 2, 30, tzinfo=timezone.utc)
    assert usd(price, usage, "standard", time_multiplier("deepseek-flash", peak)) == Decimal("1.506")
    assert usd(price, usage, "standard", time_multiplier("deepseek-flash", lunch)) == Decimal("0.753")
    assert time_multiplier("deepseek-flash", saturday) == Decimal("0.5")
    assert time_multiplier("gpt-4o", peak) == 1


def test_the_price_book_and_the_simulator_agree_on_every_hour_of_a_week():
    """Each read on its own (the book in Beijing time, the simulator in UTC): the same bill."""
    price = BOOK.resolve("deepseek-v4-pro")
    usage = Usage(1_000_000, 1_000_000, cached_input_tokens=500_000)
    sim_usage = {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000,
                 "prompt_tokens_details": {"cached_tokens": 500_000}}
    start = datetime(2026, 12, 7, tzinfo=timezone.utc)
    for quarter in range(7 * 24 * 4):
        at = start + timedelta(minutes=15 * quarter)
        book = cost(price, usage, multiplier=price.multiplier_at(at))
        assert book == usd(OPENAI_PRICES["deepseek-v4-pro"], sim_usage, "standard",
                           time_multiplier("deepseek-v4-pro", at)), at


@pytest.mark.parametrize("model", sorted(NO_BATCH))
def test_a_batch_line_of_a_model_without_a_batch_api_is_refused(model):
    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
            "body": {"model": model, "prompt": "hi", "max_tokens": 5}}
    items, errors, _ = validate_openai_lines(json.dumps(line).encode(), "/v1/completions")
    assert not items and errors[0]["code"] == "model_not_supported" and errors[0]["line"] == 1
    # the book says the same: no Batch API, so --mode provider_batch is refused at submit
    assert BOOK.resolve(model).batch is None
