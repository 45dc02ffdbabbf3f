"""One interface for every request url llmbatch can price: :class:`Endpoint`.

An endpoint knows one url's request body: how to validate it, the most it can
cost (:class:`pipeline.money.bounds.Bound`, never less than the provider bills),
the usage its answer reports, and whether its answer may be cached. Callers
hold an ``Endpoint`` from :func:`endpoint_for` and never branch on the url.

Public: :class:`Endpoint`, :data:`ENDPOINTS`, :func:`endpoint_for`,
:func:`endpoint_of`, :func:`endpoint_bound`, :func:`answer_cost` (what an answer cost, for the worker, the
provider-batch ingest and the cache alike). The modules behind them:

* ``chat``: ``/v1/chat/completions`` and Anthropic messages (``/v1/messages``),
  thin adapters over :func:`pipeline.money.bounds.price_bound` (unchanged rules);
* ``responses``, ``embeddings``, ``completions``, ``moderations``: one module
  each, its counting rule and OpenAI's limits in its docstring, with the source.

Adding an endpoint is one module and one registry line:

1. write ``pipeline/endpoints/<name>.py`` with a class that has the
   attributes and methods of :class:`Endpoint` and one instance of it; its
   ``bound`` calls ``validate``, then ``price.require_endpoint(self.url)``
   (a model serves only the urls the price book lists), and ends in
   :func:`pipeline.money.bounds.finish_bound`; refuse what cannot be bounded with a
   :class:`~pipeline.errors.LineError` that names the field and says why;
2. add the url to ``pipeline.constants.ENDPOINT_URLS`` and the instance to
   ``_ALL`` below; list the url in the ``endpoints`` of the models in
   ``pipeline/data/pricing.json`` that serve it;
3. give it a worst-case property test (tests/unit/test_endpoints_*.py).

What this package must never do: return a bound below what the provider can
bill for the body, or guess where it can refuse.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Protocol, runtime_checkable

from pipeline.money.bounds import Bound
from pipeline.endpoints.chat import CHAT, MESSAGES
from pipeline.endpoints.completions import COMPLETIONS
from pipeline.endpoints.embeddings import EMBEDDINGS
from pipeline.endpoints.moderations import MODERATIONS
from pipeline.endpoints.responses import RESPONSES
from pipeline.errors import LineError
from pipeline.money.pricing import ModelPrice, PriceBook, Usage, cost

__all__ = ["ENDPOINTS", "Endpoint", "answer_cost", "endpoint_bound", "endpoint_for", "endpoint_of"]


@runtime_checkable
class Endpoint(Protocol):
    """One request url. Every method takes the provider's own request or response body."""

    #: the request url, e.g. ``"/v1/embeddings"``
    url: str
    #: the line format its requests come in: ``"openai"`` (custom_id, method, url, body)
    #: or ``"anthropic"`` (custom_id, params)
    line_format: str

    def validate(self, body: dict) -> None:
        """Raise LineError, naming the field, for a body this endpoint cannot take or price."""

    def bound(self, body: dict, price: ModelPrice, *, declared_input_tokens: int | None = None) -> Bound:
        """The most the body can cost at ``price`` (its model's); a declared count only raises it."""

    def usage(self, response_body: dict) -> Usage | None:
        """The billed usage an answer reports, or None when it reports none."""

    def cacheable(self, body: dict) -> bool:
        """Whether the answer is deterministic, so a cached one may stand in for a call."""


_ALL: tuple[Endpoint, ...] = (CHAT, MESSAGES, RESPONSES, EMBEDDINGS, COMPLETIONS, MODERATIONS)
#: url → endpoint
ENDPOINTS: dict[str, Endpoint] = {e.url: e for e in _ALL}


def endpoint_for(url) -> Endpoint:
    """The endpoint of ``url``; LineError naming the known urls otherwise."""
    endpoint = ENDPOINTS.get(url) if isinstance(url, str) else None
    if endpoint is None:
        raise LineError(f"url must be one of {', '.join(ENDPOINTS)}, got {url!r}"[:300])
    return endpoint


def endpoint_of(url: str | None, kind: str) -> Endpoint:
    """The endpoint of a message's or a request row's url; without one (messages and rows from
    before endpoints), the chat endpoint of its provider's ``kind`` (a registry kind, never its
    name): Anthropic messages, else chat completions."""
    if url is None:
        return MESSAGES if kind == "anthropic" else CHAT
    return endpoint_for(url)


def endpoint_bound(url: str, body: dict, prices: PriceBook, *,
                   declared_input_tokens: int | None = None) -> Bound:
    """Validate a body of ``url``, resolve its model in ``prices`` and bound it."""
    endpoint = endpoint_for(url)
    endpoint.validate(body)
    return endpoint.bound(body, prices.resolve(body["model"]), declared_input_tokens=declared_input_tokens)


def answer_cost(endpoint: Endpoint, response_body, price: ModelPrice, *,
                batch: bool = False) -> tuple[Usage | None, Decimal | None]:
    """``(usage, cost)`` of an answer of ``endpoint`` at ``price`` (the Batch API price when
    ``batch``). An answer that reports no usage costs $0 when its model is free (moderations
    report none, and are free), and an unknown cost (None) otherwise: its caller keeps the
    maximum as spent and calls the answer ``usage_missing``."""
    usage = endpoint.usage(response_body)
    if usage is not None:
        return usage, cost(price, usage, batch=batch)
    rates = (price.input_per_mtok, price.cached_input_per_mtok, price.output_per_mtok,
             price.cache_write_per_mtok or 0, price.cache_write_1h_per_mtok or 0)
    return None, (Decimal(0) if not any(rates) else None)
