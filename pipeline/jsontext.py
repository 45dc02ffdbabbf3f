"""JSON text of what llmbatch stores and prints: one encoder, so money reads the same everywhere.

``json.dumps(..., default=str)`` writes ``Decimal("0E-8")`` as ``"0E-8"``:
exact, but not what a person, ``jq`` or a spreadsheet reads as zero. Here a
Decimal is a plain decimal string (``"0"``, ``"0.0235"``: no exponent, no
trailing zeros, still exact), a date or time is ISO 8601, and anything else
without a JSON form (a UUID, a path) is its ``str``.
"""

from __future__ import annotations

import json
from decimal import Decimal


def plain(amount: Decimal) -> str:
    """``0``, ``0.0235``, ``100``: never ``0E-8`` or ``1.20000000``."""
    if amount == 0:
        return "0"
    return format(amount.normalize(), "f")


def default(o):
    """``json.dumps``' fallback for the values llmbatch's rows hold."""
    if isinstance(o, Decimal):
        return plain(o)
    if hasattr(o, "isoformat"):
        return o.isoformat()
    return str(o)


def dumps(value, **options) -> str:
    """``json.dumps`` with :func:`default`; ``options`` as json.dumps takes them."""
    return json.dumps(value, default=default, **options)
