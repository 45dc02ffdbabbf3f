"""The retry loop: bounded, honours retry-after, never retries a permanent error."""

import asyncio

import pytest

from pipeline.config import load_settings
from pipeline.errors import PermanentProviderError, RetryableProviderError
from pipeline.providers.base import Answer
from pipeline.providers.retries import call_with_retries, classify_status, retry_after

SETTINGS = load_settings({"LLMBATCH_MAX_ATTEMPTS": "4", "LLMBATCH_CONFIG": "/nonexistent"})


class Scripted:
    name = "fake"

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.calls = 0

    async def call(self, body, *, headers):
        self.calls += 1
        out = self.outcomes.pop(0)
        if isinstance(out, Exception):
            raise out
        return out


OK = Answer(body={"ok": True}, status_code=200, request_id="req_1", latency_ms=1, headers={})


def run(provider, sleeps, attempts):
    async def fake_sleep(s):
        sleeps.append(s)
    return asyncio.run(call_with_retries(provider, {}, headers={}, settings=SETTINGS,
                                         on_attempt=attempts.append, sleep=fake_sleep))


def test_retry_after_is_honoured_then_success():
    p = Scripted(RetryableProviderError("slow down", 429, retry_after=7.5), OK)
    sleeps, attempts = [], []
    assert run(p, sleeps, attempts) is OK
    assert sleeps == [7.5]
    assert [a.status_code for a in attempts] == [429, 200]


def test_permanent_error_is_not_retried():
    p = Scripted(PermanentProviderError("bad request", 400), OK)
    with pytest.raises(PermanentProviderError):
        run(p, [], [])
    assert p.calls == 1


def test_attempts_are_bounded():
    p = Scripted(*[RetryableProviderError("boom", 500)] * 10)
    sleeps, attempts = [], []
    with pytest.raises(RetryableProviderError):
        run(p, sleeps, attempts)
    assert p.calls == 4 and len(attempts) == 4 and len(sleeps) == 3


@pytest.mark.parametrize("status, kind", [(400, PermanentProviderError), (401, PermanentProviderError),
                                          (403, PermanentProviderError), (404, PermanentProviderError),
                                          (422, PermanentProviderError), (408, RetryableProviderError),
                                          (409, RetryableProviderError), (429, RetryableProviderError),
                                          (500, RetryableProviderError), (503, RetryableProviderError),
                                          (529, RetryableProviderError)])
def test_status_classes(status, kind):
    assert type(classify_status(status, "m", None, {})) is kind


def test_retry_after_headers():
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after({"retry-after": "3"}) == 3.0
    assert retry_after({}) is None
