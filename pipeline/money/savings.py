"""The savings ledger's arithmetic: a request's list price, and what each lever saved of it.

The list price of a request is its usage at the model's realtime price with no cache:
every input token at the input price (cache reads and writes too), no Batch API or flex
discount, no price window. What was paid is the path's price of the same usage
(pipeline/paths/base.py ``answered``). The difference is split between the levers, in
the order they apply:

1. ``prompt_cache``: cache reads at the cached-input price, writes at theirs (a write
   costs more than input, so this lever alone can be negative: an honest ledger says so);
2. ``batch`` or ``flex``: the Batch API discount, on the price after the prompt cache;
3. ``price_window``: whatever the paid price differs by beyond those (the price in force
   when the call was sent, pipeline/paths/ ``Path.price`` with its ``at``).

A request answered without a call (``cache``: the exact cache at intake or in a worker;
``coalesce``: the answer of an identical request in flight at the same time) saved its
whole list price. The parts always add up to list price minus paid, exactly: nothing here
rounds. It must never invent a saving: a lever that did not apply saves nothing and is
left out.
"""

from __future__ import annotations

from decimal import Decimal

from pipeline.money.pricing import ModelPrice, Usage, cost

#: the levers, in the order the ledger reports them (the columns of the ``savings_daily`` view)
LEVERS = ("cache", "coalesce", "batch", "flex", "prompt_cache", "price_window")
#: levers that answer without a provider call: they save the whole list price
NO_CALL = ("cache", "coalesce")


def list_price(price: ModelPrice, usage: Usage) -> Decimal:
    """``usage`` at list price: realtime, no cache (cached and cache-write tokens as plain input)."""
    return cost(price, Usage(usage.input_tokens, usage.output_tokens))


def split(price: ModelPrice, usage: Usage, paid: Decimal, discount: str | None = None) -> dict[str, Decimal]:
    """What each lever saved of ``usage``'s list price, given what was ``paid`` for it.

    ``discount``: the lever whose Batch API discount the answer got (``batch``, ``flex``),
    None when it was billed at the standard price. Only levers that saved (or cost) something
    are in the result; its values add up to ``list_price(price, usage) - paid``.
    """
    if discount is not None and discount not in LEVERS:
        raise ValueError(f"unknown lever {discount!r}; the levers are {', '.join(LEVERS)}")
    listed = list_price(price, usage)
    billed = cost(price, usage)   # the prompt cache as the provider bills it
    out = {"prompt_cache": listed - billed}
    after = billed
    if discount is not None:
        discounted = cost(price, usage, batch=True)
        out[discount] = billed - discounted
        after = discounted
    out["price_window"] = after - paid
    return {lever: amount for lever, amount in out.items() if amount != 0}


def without_call(lever: str, listed: Decimal) -> dict[str, Decimal]:
    """The savings of a request answered without a call (``cache`` or ``coalesce``): all of it."""
    if lever not in NO_CALL:
        raise ValueError(f"{lever!r} is not a lever that answers without a call ({', '.join(NO_CALL)})")
    return {lever: listed} if listed else {}


def main_lever(savings: dict[str, Decimal]) -> str | None:
    """The lever that saved the most (``results.lever``), or None when nothing saved."""
    best = max(savings.items(), key=lambda kv: kv[1], default=None)
    return best[0] if best is not None and best[1] > 0 else None


def as_json(savings: dict[str, Decimal]) -> dict[str, str]:
    """``results.savings``: exact decimals as strings, in ledger order."""
    return {lever: str(savings[lever]) for lever in LEVERS if lever in savings}
