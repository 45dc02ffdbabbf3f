"""One interface for every path, and the one sequence they all follow.

A ``Path`` says what it is (``name``, ``lever``: the savings ledger's name for
what it saves; ``runs_in``: our workers call per request, or the scheduler sends a
provider batch), whether it can serve a request (``serves`` / ``why_not``), what a
usage costs on it (``price``), what to hold before its call (``reservation``,
``hold_ttl_s``) and when it is likely done (``expected_done``, for the cost
engine). Its ``call`` is the only step it writes itself: realtime and flex wrap
the provider a worker calls (``caller``), provider batch creates, polls and
ingests in the scheduler (``provider_batch.py``).

The sequence is the same on every path, and each step is here once:

1. **reserve** (``reserve``): the path's reservation, held in the one async
   ``Budget`` (pipeline/money/budget.py) under the request's key, before anything
   is sent: the workers (workers/limited.py) and the scheduler's provider batches
   (schedules/pb_submit.py) alike;
2. **call**: the path's own;
3. **price** (``answered``): usage as the endpoint reads it, the price of the model
   that answered, the path's price for the tier that answered, and the list price
   beside it: an ``Outcome``;
4. **write outcome** (``write``): result, attempts and state in one transaction
   (``pipeline.stores.outcomes``);
5. **settle** (``settle_amount``): only once that write is durable (a rebuild of
   the counters from the ledger then misses nothing), to the outcome's cost, or
   to the whole hold when the answer reported no usage.

It must never let a call go out without a reservation, nor price a request at
another path's price.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from pipeline.config import Settings
from pipeline.constants import DISPATCHED_TIERS
from pipeline.endpoints import answer_cost, endpoint_for
from pipeline.errors import LineError
from pipeline.money.budget import Budget, Reservation
from pipeline.money import savings as levers
from pipeline.money.pricing import ModelPrice, PriceBook, Usage, answered_price, cost
from pipeline.money.units import from_units
from pipeline.request import Outcome, Request
from pipeline.stores import outcomes as outcome_store

#: service tiers an answer may name for the standard price
STANDARD_TIERS = (None, "default", "auto", "standard", "standard_only")


class Path:
    """A way to the provider. Subclasses set the attributes and override what differs."""

    #: the name a job, a batch and a message carry (``jobs.mode``, ``batches.mode``, ``mode``)
    name: str = ""
    #: the savings ledger's name for what this path saves against realtime (None: nothing)
    lever: str | None = None
    #: ``worker``: released and dispatched to our workers, who call per request;
    #: ``scheduler``: held for the scheduler, which sends it in provider batches
    runs_in: str = "worker"
    #: an immediate request on this path may take the producer's fast lane
    fast_lane: bool = False

    # ---- what the path is

    def why_not(self, req: Request, price: ModelPrice) -> str | None:
        """Why this path cannot serve ``req`` (whose model is priced ``price``), or None."""
        return None

    def serves(self, req: Request, provider: str, price: ModelPrice) -> bool:
        return price.provider == provider and self.why_not(req, price) is None

    #: held batches of this path wait for the off-peak window of their tier (schedules/release.py);
    #: False: for something else (a price window: pipeline/paths/window.py)
    waits_for_tier_window: bool = True
    #: the service tier a quote assumes answers (flex: "flex")
    quoted_tier: str | None = None

    def price(self, price: ModelPrice, usage: Usage, at: datetime | None = None,
              served: str | None = None) -> Decimal:
        """What ``usage`` costs on this path for a call sent at ``at`` (the price window in force then,
        pipeline/money/price_windows.py); ``served``: the service tier that answered.
        A flex answer is at the flex (batch) price whichever path asked for it."""
        return cost(price, usage, batch=served == "flex", multiplier=price.multiplier_at(at))

    def discount(self, served: str | None = None) -> str | None:
        """The lever whose Batch API discount an answer on this path got (``served``: the tier that
        answered), or None: the savings ledger's split (pipeline/money/savings.py)."""
        return "flex" if served == "flex" else None

    def reservation(self, req: Request) -> Decimal:
        """What to hold before the call: the request's maximum at list price."""
        return req.bound.max_cost_usd

    def hold_ttl_s(self, settings: Settings) -> float | None:
        """How long a hold of this path outlives its last renewal (None: the budget's own)."""
        return None

    def planned_start(self, req: Request, price: ModelPrice, now: datetime, by: datetime) -> datetime:
        """When a request given this path at ``now`` is expected to be sent, to finish by ``by``."""
        return now

    def expected_done(self, req: Request, now: datetime, price: ModelPrice | None = None,
                      by: datetime | None = None) -> datetime:
        """When a request given this path at ``now`` is expected to be answered."""
        start = self.planned_start(req, price, now, by or now) if price is not None else now
        return start + timedelta(minutes=1)

    def quote(self, req: Request, price: ModelPrice, now: datetime, by: datetime) -> Decimal:
        """What ``req`` would cost at most on this path, sent when it plans to (for the chooser)."""
        return self.price(price, quote_usage(req), self.planned_start(req, price, now, by), self.quoted_tier)

    def initial_status(self, tier: str) -> str:
        """``queued`` (dispatched at once) or ``held`` (the scheduler releases or sends it)."""
        return "queued" if self.runs_in == "worker" and tier in DISPATCHED_TIERS else "held"

    # ---- the call step of a worker path

    def caller(self, provider, settings: Settings):
        """The provider as this path calls it (the worker wraps it in the limits)."""
        return provider

    def __repr__(self) -> str:
        return f"<path {self.name}>"


def quote_usage(req: Request) -> Usage:
    """The usage a quote prices: the request's bound (at least a token each way)."""
    return Usage(max(req.bound.input_tokens, 1), max(req.bound.max_output_tokens, 1))


def check_serves(path: Path, req: Request, price: ModelPrice) -> None:
    """LineError, naming the path and the reason, when ``path`` cannot serve ``req``."""
    why = path.why_not(req, price)
    if why is not None:
        raise LineError(f"the {path.name} path cannot serve this request: {why}"[:300])


# ---- 1. reserve

async def reserve(budget: Budget, path: Path, req: Request, rid: str | None = None, *,
                  amount: Decimal | None = None, wait: bool = True, period: str | None = None,
                  track: bool = True) -> Reservation | None:
    """Hold the path's reservation for ``req`` (``amount``: a fallback model's instead), under ``rid``
    (default: the request's key). See ``Budget.reserve`` for ``wait``, ``period`` and ``track``."""
    return await budget.reserve(rid or req.key, req.job_id, req.tier,
                                path.reservation(req) if amount is None else amount,
                                ttl_s=path.hold_ttl_s(budget.settings), wait=wait, period=period, track=track)


# ---- 3. price

def answered(path: Path, req: Request, body: dict, prices: PriceBook, *, model: str | None = None,
             served: str | None = None, attempts: int, status_code: int | None = 200,
             provider_request_id: str | None = None, latency_ms: int | None = None,
             key_alias: str | None = None, budget_period: str | None = None,
             at: datetime | None = None) -> Outcome:
    """The succeeded outcome of an answer: usage as the endpoint reads it, priced at the model that
    answered (``model``: the one it was sent to, when not the request's) on ``path`` for the tier
    that answered (``served``; else the one the answer names), in the price window in force when the
    call was sent (``at``; None: no window), beside its list price (realtime, no cache) and what each
    lever saved of it (pipeline/money/savings.py). No usage: $0 when the model is free
    (moderations report none), else cost unknown, recorded 0 with ``usage_missing`` (the hold then
    stays spent at its maximum: ``settle_amount``)."""
    if served is None and isinstance(body, dict) and isinstance(body.get("service_tier"), str):
        served = body["service_tier"]
    price = answered_price(prices, body, model or req.model, req.provider)
    # the endpoint reads its answer's usage; a free answer without one (moderations) costs $0
    usage, known = answer_cost(endpoint_for(req.endpoint), body, price)
    saved: dict[str, Decimal] = {}
    if usage is not None:
        spent, listed = path.price(price, usage, at, served), levers.list_price(price, usage)
        saved = levers.split(price, usage, spent, path.discount(served))
    else:
        spent = listed = known if known is not None else Decimal(0)
    return Outcome(req.job_id, req.custom_id, model or req.model, "succeeded", attempts=attempts,
                   response=body, usage=usage, cost=spent, list_cost=listed, path=path.name,
                   lever=_lever_name(levers.main_lever(saved)), service_tier=served, key_alias=key_alias,
                   latency_ms=latency_ms, status_code=status_code, provider_request_id=provider_request_id,
                   usage_missing=known is None, budget_period=budget_period,
                   # a fallback model's answer is not the answer to this request's key: never cached
                   cache_key=req.cache_key if (model or req.model) == req.model else None,
                   savings=saved)


def _lever_name(lever: str | None) -> str | None:
    """``results.lever`` of the lever that saved the most: the savings ledger's ``price_window`` is
    the price-window lever, named ``window`` there like the window path's own lever."""
    return "window" if lever == "price_window" else lever


def without_call(req: Request, body, prices: PriceBook, lever: str) -> Outcome | None:
    """The succeeded outcome of ``req`` answered with ``body`` without a call of its own: ``cache``
    (the exact cache) or ``coalesce`` (an identical request in flight at the same time). Nothing
    spent, its whole list price saved; a cache hit on record. None when the answer cannot be priced
    (no usage on a model that is not free): the caller treats it as a miss and calls."""
    if not isinstance(body, dict):
        return None
    try:
        price = answered_price(prices, body, req.model, req.provider)
        usage, known = answer_cost(endpoint_for(req.endpoint), body, price)
    except Exception:   # an answer we cannot read is a miss
        return None
    if known is None:
        return None
    listed = levers.list_price(price, usage) if usage is not None else known
    return Outcome(req.job_id, req.custom_id, req.model, "succeeded",
                   response=body, usage=usage, cost=Decimal(0), list_cost=listed, path=req.path, lever=lever,
                   provider_request_id=body.get("id"), cache_key=req.cache_key, latency_ms=0,
                   status_code=200, savings=levers.without_call(lever, listed), from_cache=True)


# ---- 4. write outcome

def write(conn, outcomes: list[Outcome], attempts: list[dict]) -> None:
    """Results, attempts and terminal states in the caller's transaction."""
    outcome_store.write_outcomes(conn, [o.to_row() for o in outcomes], attempts)


# ---- 5. settle

def settle_amount(outcome: Outcome | None, held_units: int) -> Decimal:
    """What a hold settles to once its outcome is durable: the outcome's cost, or the whole hold
    when the cost is unknown (no usage reported) or there is no outcome."""
    if outcome is None or outcome.usage_missing:
        return from_units(held_units)
    return outcome.cost
