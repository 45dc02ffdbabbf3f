"""Alert rows that are not the budget's: a provider key out of the rotation (``key_alerts``).

The budget's alerts (``budget_alerts``) live with the caps in pipeline/money/budget.py.
Only a key's alias is ever written here.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection


def key_revoked(conn: Connection, provider: str, alias: str, status_code: int | None, reason: str) -> None:
    conn.execute(sa.text(
        "INSERT INTO key_alerts (provider, key_alias, status_code, reason) VALUES (:p, :a, :s, :r)"),
        {"p": provider, "a": alias, "s": status_code, "r": reason[:500]})


def key_alerts(conn: Connection, provider: str | None = None) -> list[dict]:
    """The revocations on record, oldest first (of one provider, or all)."""
    rows = conn.execute(sa.text(
        "SELECT provider, key_alias, status_code, reason, created_at FROM key_alerts"
        " WHERE CAST(:p AS text) IS NULL OR provider = :p ORDER BY id"), {"p": provider}).mappings()
    return [dict(r) for r in rows]
