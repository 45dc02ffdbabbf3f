"""A job's fallback model: the cheaper model that answers when the primary cannot.

Opt-in per job (``llmbatch submit --fallback-model M``). A request switches to
the fallback, for one attempt at a time, when

* its primary model's maximum cost cannot be reserved under a cap, but the
  fallback's (lower) maximum can; or
* its primary model's rate window would make it wait longer than
  ``settings.fallback_rate_wait_s``, or the provider just answered 429 for it.

Only a model of the same provider that can take the request as written
(its ``max_tokens`` and prompt within the fallback's limits) is used; the
request body is sent unchanged apart from ``model``. The result row records the
model that answered (``results.model``); ``requests.model`` keeps the one asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from pipeline.errors import UnknownModelError
from pipeline.pricing import PriceBook, max_cost


@dataclass(frozen=True)
class Fallback:
    model: str
    max_cost_usd: Decimal


def _max_tokens(body: dict) -> int | None:
    value = body.get("max_completion_tokens") or body.get("max_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def fallback_for(req: dict, prices: PriceBook) -> Fallback | None:
    """The fallback a request may use, or None (none set, other provider, or it cannot serve it)."""
    name = req.get("fallback_model")
    if not name:
        return None
    try:
        price = prices.resolve(name)
    except UnknownModelError:
        return None
    if price.provider != req["provider"] or price.model == prices.resolve(req["model"]).model:
        return None
    out = _max_tokens(req.get("body") or {})
    input_tokens = int(req.get("input_tokens") or 0)
    if (out is not None and out > price.max_output_tokens) or input_tokens > price.context_window:
        return None
    return Fallback(name, max_cost(price, input_tokens, out))
