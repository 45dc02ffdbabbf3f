"""Money as integers: USD ↔ units of 10^-8 USD (the scale of the ledger's ``numeric(18, 8)``
columns), rounded up so a reservation never under-holds, never a float; and what a cap or a
reservation may be (``parse_cap``, ``reservation_units``, ``job_cap_units``).
"""

from __future__ import annotations

import logging
from decimal import Decimal, ROUND_CEILING

from pipeline.errors import ConfigError, InvalidAmount

log = logging.getLogger(__name__)


UNIT = Decimal("0.00000001")          # 10^-8 USD, the scale of the ledger columns
#: Lua compares amounts as doubles: exact below 2^53 units (about 90 million USD).
MAX_CAP_USD = Decimal(50_000_000)
NO_CAP = "-1"


def to_units(usd: Decimal | str) -> int:
    """USD → integer 10^-8 units, rounded up (a reservation never under-holds)."""
    return int(Decimal(str(usd)).quantize(UNIT, rounding=ROUND_CEILING) / UNIT)


def from_units(units: int | str) -> Decimal:
    return (Decimal(int(units)) * UNIT).normalize() if int(units) else Decimal(0)


def parse_cap(value, name: str = "cap") -> Decimal | None:
    """A cap in USD: finite, 0 … ``MAX_CAP_USD``; ``None``/``""`` is no cap. ``ConfigError`` names the problem."""
    if value is None or value == "":
        return None
    try:
        cap = Decimal(str(value).strip())
    except ArithmeticError as e:
        raise ConfigError(f"{name}: not a decimal amount: {value!r}") from e
    if not cap.is_finite():
        raise ConfigError(f"{name}: {value!r} is not a finite amount")
    if cap < 0 or cap > MAX_CAP_USD:
        raise ConfigError(f"{name}: ${cap} is outside 0 … {MAX_CAP_USD}")
    return cap


_parse_cap = parse_cap


def reservation_units(amount) -> int:
    """The units to hold for ``amount`` USD; ``InvalidAmount`` unless it is finite, ≥ 0 and ≤ ``MAX_CAP_USD``.

    A negative reservation would hold nothing (a call outside every cap), and a malformed one
    must fail only its own request, never reach Redis. A free request's $0 (a moderation)
    holds the smallest unit: its call is reserved and on record like any other, and settles to $0.
    """
    try:
        d = Decimal(str(amount).strip())
    except ArithmeticError as e:
        raise InvalidAmount(f"maximum cost {amount!r} is not an amount: the request cannot be reserved") from e
    if d.is_zero():
        return 1
    if not d.is_finite() or d < 0 or d > MAX_CAP_USD:
        raise InvalidAmount(f"maximum cost {amount!r} is not a positive finite amount up to ${MAX_CAP_USD}:"
                            f" the request cannot be reserved")
    return to_units(d)


def job_cap_units(cap) -> str:
    """A job's cap as stored (``jobs.budget_usd``) → counter units; NULL is no cap.

    Defensive: a negative or non-finite cap written by an older version, or by
    hand, holds everything (cap 0) instead of meaning "no cap".
    """
    if cap is None:
        return NO_CAP
    try:
        return str(to_units(parse_cap(cap, "job cap")))
    except (ConfigError, ArithmeticError, TypeError):
        log.error("job cap %r is not a valid amount: treated as $0 (nothing runs until it is set again)", cap)
        return "0"
