"""The most a request can cost: the one function every reservation is based on.

``request_bound(provider, body, prices)`` returns the input tokens, the most
output tokens and the maximum cost in USD of one request body, or raises
``LineError`` when the request cannot be bounded. The producer prices a line
with it at submit, and the batcher prices every message again with it: a
producer's ``max_cost_usd`` is a hint at most and is never reserved as given.

Work in progress (issue "Caps that cannot leak"): ``n``, tools,
``response_format``, images, reasoning and thinking budgets and cache-write
multipliers are to be added here; the tests in tests/unit/test_bounds.py say
which are covered.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from pipeline.errors import LineError, UnknownModelError
from pipeline.pricing import PriceBook, max_cost
from pipeline.tokens import count_request


@dataclass(frozen=True)
class Bound:
    input_tokens: int
    max_output_tokens: int
    max_cost_usd: Decimal
    tokens_exact: bool


def _out_limit(provider: str, body: dict, limit: int, model: str) -> int:
    key = "max_completion_tokens" if provider == "openai" and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    value = body.get(key)
    if value is None:
        return limit
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise LineError(f"{key} must be a positive integer, got {value!r}"[:200])
    if value > limit:
        raise LineError(f"{key} is {value}, over {model}'s output limit of {limit} tokens")
    return value


def request_bound(provider: str, body: dict, prices: PriceBook, *,
                  declared_input_tokens: int | None = None) -> Bound:
    """Bound one request body of ``provider``; ``declared_input_tokens`` (a producer's exact
    count, e.g. from Anthropic's count_tokens) can only raise the input count, never lower it."""
    model = body.get("model")
    if not isinstance(model, str):
        raise LineError("body.model missing or not a string")
    price = prices.resolve(model)   # UnknownModelError is a LineError
    if price.provider != provider:
        raise UnknownModelError(f"model {model} is served by {price.provider}, not {provider}")
    count = count_request(provider, model, body)
    tokens = count.tokens
    if declared_input_tokens is not None:
        tokens = max(tokens, declared_input_tokens)
    if tokens > price.context_window:
        raise LineError(f"prompt is {tokens} tokens, over {model}'s context window of "
                        f"{price.context_window} tokens")
    out = _out_limit(provider, body, price.max_output_tokens, model)
    return Bound(tokens, out, max_cost(price, tokens, out), count.exact)
