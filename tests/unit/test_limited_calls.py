"""What ``Limited`` puts on the record of calls that may be billed (pipeline/money/calls.py), per outcome.

A call goes on record before it is sent; an answer takes it off; no answer after it was
sent (timeout, dropped connection, cancelled mid-call) makes it unconfirmed spend. A call
the gate refused was never sent: its hold is released, nothing is spent.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from pipeline.errors import PermanentProviderError, RetryableProviderError
from pipeline.money.units import to_units
from tests.unit.test_fallback import OK, FakeBudget, FakeLimiter, Provider, request
from workers.gate import RequestCancelled
from workers.limited import Limited


class Record:
    """A fake ``CallRecord``: what was sent, answered and left unconfirmed."""

    def __init__(self, refuse: Exception | None = None):
        self.refuse, self.sent, self.answered_ids, self.unconfirmed_ids = refuse, [], [], []

    async def sending(self, req, res, call_id):
        if self.refuse is not None:
            raise self.refuse
        assert res is not None   # never on record, never sent, without a reservation
        self.sent.append(call_id)

    def answered(self, call_id):
        self.answered_ids.append(call_id)

    async def unconfirmed(self, req, res, call_id, why):
        self.unconfirmed_ids.append((call_id, res.units, why))


BILLABLE = [RetryableProviderError("timeout: the provider did not answer in time"),
            RetryableProviderError("connection error: Server disconnected"),
            asyncio.CancelledError()]
ANSWERED = [RetryableProviderError("rate limited", 429), RetryableProviderError("overloaded", 529),
            PermanentProviderError("bad request", 400), OK]


def _call(outcome, record):
    budget = FakeBudget(Decimal(1))
    lim = Limited(Provider(outcome), request(fallback_model=None), budget, FakeLimiter(), calls=record)

    async def go():
        try:
            await lim.call(request().body, headers={})
        except (Exception, asyncio.CancelledError):
            pass
    asyncio.run(go())
    return lim, budget


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(BILLABLE + ANSWERED), min_size=1, max_size=5))
def test_every_call_sent_is_answered_or_unconfirmed_never_forgotten(outcomes):
    record = Record()
    budget = FakeBudget(Decimal(1))
    lim = Limited(Provider(*outcomes), request(fallback_model=None), budget, FakeLimiter(), calls=record)

    async def go():
        for _ in outcomes:   # each attempt of the request, as call_with_retries makes them
            try:
                await lim.call(request().body, headers={})
            except (Exception, asyncio.CancelledError):
                pass
    asyncio.run(go())
    assert len(set(record.sent)) == len(outcomes)   # one id per call
    unconfirmed = [c for c, _, _ in record.unconfirmed_ids]
    assert sorted(record.answered_ids + unconfirmed) == sorted(record.sent)
    billable = [i for i, o in enumerate(outcomes) if any(o is b for b in BILLABLE)]
    assert unconfirmed == [record.sent[i] for i in billable]
    assert len(budget.released) == sum(1 for o in outcomes if o is not OK) - len(billable)


@pytest.mark.parametrize("outcome", BILLABLE)
def test_a_call_without_an_answer_is_spent_at_its_maximum(outcome):
    record = Record()
    lim, budget = _call(outcome, record)
    [(call_id, units, why)] = record.unconfirmed_ids
    assert call_id == record.sent[0] and units == to_units(budget.reserved[0])
    assert not budget.released and not record.answered_ids


def test_a_call_the_gate_refused_was_never_sent_and_spends_nothing():
    record = Record(refuse=RequestCancelled("job j1 was cancelled"))
    provider = Provider()
    budget = FakeBudget(Decimal(1))
    lim = Limited(provider, request(fallback_model=None), budget, FakeLimiter(), calls=record)
    with pytest.raises(RequestCancelled):
        asyncio.run(lim.call(request().body, headers={}))
    assert provider.models == [] and len(budget.released) == 1
    assert not record.unconfirmed_ids and not record.answered_ids
