"""The money side of a fault scenario: the provider's bill against the pipeline's ledger and the cap.

Two sides, counted apart:

- the **provider's bill** for a job: what the simulator itself billed to the job's
  ``Idempotency-Key``s (``/_stats?key_prefix=<job>:``, simulator/stats.py), each call
  priced by the simulator's own table (simulator/prices.py) when it was billed. Never the
  pipeline's prediction, never pipeline/money's prices;
- the **pipeline's ledger** for the job: its settled costs (``results.cost_usd``) plus
  the calls that may have been billed and got no answer (``provider_calls`` 'unconfirmed',
  at their maximum; 'confirmed' at the provider's figure: sql/012_unconfirmed_spend.sql),
  the spend every cap counts (pipeline/money/ledger.py ``JOB_SPENT_SQL``).

``money_failures`` is the check, pure so that a unit test can break it on purpose
(tests/unit/test_fault_money.py):

1. nothing spent unseen: bill ≤ ledger + 1e-8 per ledger row (``numeric(18, 8)`` rounds
   each stored cost), for the job and for each request;
2. the cap holds on the bill: bill ≤ cap, with no tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

#: a ledger row (``numeric(18, 8)``) is its exact cost rounded to 1e-8; grant that much per row
ROUNDING_PER_ROW = Decimal("0.00000001")


@dataclass
class Bill:
    """The provider's bill for one job's keys (simulator/stats.py ``keys_with_prefix``)."""

    calls: int                      # calls that reached the provider with the job's keys
    billed_calls: int               # generations it billed
    usd: Decimal
    by_key: dict[str, Decimal] = field(default_factory=dict)
    unpriced_calls: int = 0
    calls_by_key: dict[str, int] = field(default_factory=dict)   # generations billed per key

    @classmethod
    def from_stats(cls, keys: dict) -> "Bill":
        return cls(keys["calls"], keys["billed_calls"], Decimal(keys["billed_usd"]),
                   {k: Decimal(v) for k, v in keys["billed_usd_by_key"].items()}, keys["unpriced_calls"],
                   {k: v["calls"] for k, v in keys["billed_by_key"].items()})


@dataclass
class Ledger:
    """The pipeline's ledger for one job: settled, unconfirmed and confirmed spend, per request key."""

    settled: Decimal = Decimal(0)        # results.cost_usd
    unconfirmed: Decimal = Decimal(0)    # provider_calls 'unconfirmed', at their maximum
    confirmed: Decimal = Decimal(0)      # provider_calls 'confirmed', at the provider's figure
    unconfirmed_calls: int = 0
    sent_left: int = 0                   # provider_calls still 'sent': counted by no cap
    by_key: dict[str, Decimal] = field(default_factory=dict)
    rows_by_key: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> Decimal:
        return self.settled + self.unconfirmed + self.confirmed

    @property
    def rows(self) -> int:
        return sum(self.rows_by_key.values())

    def add(self, key: str, usd: Decimal, kind: str) -> None:
        """One ledger row of request ``key``: ``kind`` 'settled', 'unconfirmed' or 'confirmed'."""
        setattr(self, kind, getattr(self, kind) + usd)
        if kind == "unconfirmed":
            self.unconfirmed_calls += 1
        self.by_key[key] = self.by_key.get(key, Decimal(0)) + usd
        self.rows_by_key[key] = self.rows_by_key.get(key, 0) + 1


def unseen_keys(bill: Bill, ledger: Ledger) -> dict[str, Decimal]:
    """Request keys billed more than the ledger holds for them (key -> USD unseen)."""
    out = {}
    for key, usd in bill.by_key.items():
        seen = ledger.by_key.get(key, Decimal(0)) + ROUNDING_PER_ROW * ledger.rows_by_key.get(key, 0)
        if usd > seen:
            out[key] = usd - ledger.by_key.get(key, Decimal(0))
    return out


def calls_without_a_row(bill: Bill, ledger: Ledger) -> int:
    """Billed generations with no ledger row of their own: per request, generations billed beyond
    its rows (a result, or an unconfirmed call). A repeated call whose first try is on record as
    unconfirmed spend has its row; one that is not has none, whatever ``attempts`` say."""
    return sum(max(0, n - ledger.rows_by_key.get(k, 0)) for k, n in bill.calls_by_key.items())


def money_failures(bill: Bill, ledger: Ledger, cap: Decimal | None) -> list[str]:
    """What breaks the money invariants (empty: they hold)."""
    out = []
    if bill.unpriced_calls:
        out.append(f"{bill.unpriced_calls} billed calls the simulator has no price for: the bill is unknown")
    slack = ROUNDING_PER_ROW * ledger.rows
    if bill.usd > ledger.total + slack:
        out.append(f"spent unseen: the provider billed ${bill.usd} for {bill.billed_calls} generations, the"
                   f" ledger holds ${ledger.total} (settled ${ledger.settled} + unconfirmed ${ledger.unconfirmed}"
                   f" + confirmed ${ledger.confirmed}, rounding ${slack}): ${bill.usd - ledger.total} unseen")
    unseen = unseen_keys(bill, ledger)
    if unseen:
        worst = sorted(unseen.items(), key=lambda kv: -kv[1])[:3]
        out.append(f"spent unseen on {len(unseen)} requests (${sum(unseen.values())}), e.g. {worst}")
    if cap is not None and bill.usd > cap:
        out.append(f"over the cap: the provider billed ${bill.usd} against a cap of ${cap}"
                   f" (${bill.usd - cap} over)")
    return out
