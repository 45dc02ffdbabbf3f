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

from pipeline.endpoints import endpoint_for
from pipeline.errors import LineError
from pipeline.money.pricing import PriceBook
from pipeline.request import Request


@dataclass(frozen=True)
class Fallback:
    model: str
    max_cost_usd: Decimal


def fallback_for(req: Request, prices: PriceBook) -> Fallback | None:
    """The fallback a request may use, or None (none set, other provider, or it cannot serve it).

    Its maximum is the same true bound as every other reservation (the request's endpoint's
    ``bound`` of the body with the fallback's model: ``n``, tools, images, cache writes), never
    a cheaper formula of its own; a model that does not serve the request's url is none.
    """
    name = req.fallback_model
    if not name:
        return None
    try:
        price = prices.resolve(name, req.provider)
        if price.provider != req.provider or price.model == prices.resolve(req.model, req.provider).model:
            return None
        bound = endpoint_for(req.endpoint).bound({**req.body, "model": name}, price,
                                                 declared_input_tokens=req.bound.input_tokens)
    except LineError:   # unknown, or cannot take the request as written (limits, content)
        return None
    return Fallback(name, bound.max_cost_usd)
