"""workers/broker.py: a command Redis refused for lack of memory is sent again until Redis takes
it, with one log line when the wait starts and one when it ends; other errors pass as before."""

from __future__ import annotations

import logging
from unittest import mock

import pytest
from hypothesis import given, settings, strategies as st
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RConnectionError, OutOfMemoryError

from workers import broker


def _flaky(refusals: int):
    calls = {"n": 0}

    def do():
        calls["n"] += 1
        if calls["n"] <= refusals:
            raise OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
        return "OK"
    return do, calls


@settings(max_examples=25, deadline=None)
@given(refusals=st.integers(min_value=0, max_value=40))
def test_an_oom_refusal_is_waited_out_with_one_line_per_state_change(refusals):
    slept = []
    broker.STATE.since = None
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    broker.log.addHandler(handler)
    try:
        do, calls = _flaky(refusals)
        retry = broker.WaitOutOfMemory(NoBackoff(), 0)
        with mock.patch.object(broker.time, "sleep", slept.append):
            assert retry.call_with_retry(do, lambda e: None) == "OK"
    finally:
        broker.log.removeHandler(handler)
    assert calls["n"] == refusals + 1
    assert len(slept) == refusals and all(0 <= s <= broker.OOM_MAX_S for s in slept)
    messages = [r.getMessage() for r in records]
    if refusals:
        assert len(messages) == 2 and "out of memory" in messages[0] and "takes writes again" in messages[1], messages
    else:
        assert messages == []
    assert broker.STATE.since is None


def test_other_errors_keep_redis_py_policy():
    def down():
        raise RConnectionError("Connection refused")
    with pytest.raises(RConnectionError):
        broker.WaitOutOfMemory(NoBackoff(), 0).call_with_retry(down, lambda e: None)


def test_a_worker_shutting_down_stops_waiting(monkeypatch):
    from celery.worker import state
    monkeypatch.setattr(state, "should_stop", 0)
    monkeypatch.setattr(broker.time, "sleep", lambda s: None)
    do, calls = _flaky(1000)
    with pytest.raises(OutOfMemoryError):
        broker.WaitOutOfMemory(NoBackoff(), 0).call_with_retry(do, lambda e: None)
    assert calls["n"] == 1
    broker.STATE.since = None



def test_the_budget_and_limiter_call_a_full_redis_an_outage_not_a_script_bug():
    from pipeline import errors
    from pipeline.money import scripts
    from pipeline.providers import ratelimit
    err = scripts.store_error(OutOfMemoryError("command not allowed when used memory > 'maxmemory'."))
    assert type(err) is errors.BudgetUnavailable and "out of memory" in str(err)
    assert isinstance(OutOfMemoryError("x"), ratelimit._UNAVAILABLE)   # the limiter waits it out
