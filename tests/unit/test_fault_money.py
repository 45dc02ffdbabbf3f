"""The fault suite's money check (tests/faults/money.py) fails when it should: a call the ledger
never saw, a bill one call over the cap; and passes within the ledger's rounding."""

from __future__ import annotations

from decimal import Decimal

from tests.faults.money import ROUNDING_PER_ROW, Bill, Ledger, calls_without_a_row, money_failures, unseen_keys

CALL = Decimal("0.00000765")   # one gpt-4o-mini call of the fault suite, billed to its limit


def _job(n: int) -> tuple[Bill, Ledger]:
    """n requests, each billed once and settled at the same cost."""
    led = Ledger()
    for i in range(n):
        led.add(f"job:{i}", CALL, "settled")
    return Bill(n, n, CALL * n, {f"job:{i}": CALL for i in range(n)}, 0, {f"job:{i}": 1 for i in range(n)}), led


def test_a_bill_in_the_ledger_and_within_the_cap_passes():
    bill, led = _job(10)
    assert money_failures(bill, led, CALL * 10) == []


def test_a_planted_unrecorded_call_is_spent_unseen():
    bill, led = _job(10)
    # a second call of request 3 reached the provider and was billed; the ledger has no row for it
    bill.calls, bill.billed_calls, bill.usd = 11, 11, bill.usd + CALL
    bill.by_key["job:3"] += CALL
    bill.calls_by_key["job:3"] += 1
    failures = money_failures(bill, led, None)
    assert any(f.startswith("spent unseen: the provider billed") for f in failures), failures
    assert unseen_keys(bill, led) == {"job:3": CALL}
    assert calls_without_a_row(bill, led) == 1


def test_the_same_call_as_unconfirmed_spend_is_seen():
    bill, led = _job(10)
    bill.calls, bill.billed_calls, bill.usd = 11, 11, bill.usd + CALL
    bill.by_key["job:3"] += CALL
    bill.calls_by_key["job:3"] += 1
    led.add("job:3", CALL + Decimal("0.00000010"), "unconfirmed")   # its maximum, not yet confirmed
    assert money_failures(bill, led, None) == []
    assert led.unconfirmed_calls == 1 and calls_without_a_row(bill, led) == 0


def test_unseen_on_one_request_is_caught_even_when_the_job_total_covers_it():
    bill, led = _job(10)
    led.add("job:7", CALL, "unconfirmed")          # counted on another request
    bill.by_key["job:3"] += CALL
    bill.usd += CALL
    failures = money_failures(bill, led, None)
    assert len(failures) == 1 and failures[0].startswith("spent unseen on 1 requests"), failures


def test_a_cap_one_call_too_small_fails():
    bill, led = _job(10)
    failures = money_failures(bill, led, CALL * 9)
    assert failures == [f"over the cap: the provider billed ${CALL * 10} against a cap of ${CALL * 9}"
                        f" (${CALL} over)"]


def test_the_ledger_rounds_each_row_to_1e8():
    bill, led = _job(10)
    bill.usd += 10 * ROUNDING_PER_ROW            # each stored row rounded down by up to 1e-8
    bill.by_key = {k: v + ROUNDING_PER_ROW for k, v in bill.by_key.items()}
    assert money_failures(bill, led, None) == []
    bill.usd += ROUNDING_PER_ROW / 10            # past the rounding: unseen
    assert money_failures(bill, led, None)


def test_an_unpriced_bill_is_a_failure():
    bill, led = _job(2)
    bill.unpriced_calls = 1
    assert money_failures(bill, led, None)
