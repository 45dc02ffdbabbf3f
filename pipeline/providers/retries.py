"""The one place a provider call is retried.

The SDKs' own retries are off (``max_retries=0``): hidden retries multiply a
429 storm. ``call_with_retries`` retries connection errors, timeouts, 408,
409, 429, 5xx and 529 with exponential backoff and jitter, honouring
``retry-after-ms`` / ``retry-after``, for a bounded number of attempts. A
permanent error (400, 401, 403, 404, 422) ends the request at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Awaitable, Callable

from pipeline.config import Settings
from pipeline.errors import PermanentProviderError, ProviderError, RetryableProviderError

if TYPE_CHECKING:   # annotations only: base.py imports this module
    from pipeline.providers.base import Answer, Provider

RETRYABLE_STATUS = {408, 409, 429, 529}


def retry_after(headers) -> float | None:
    """Seconds the provider asked us to wait, from ``retry-after-ms`` or ``retry-after``."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def classify_status(status: int, message: str, request_id: str | None, headers) -> ProviderError:
    if status in RETRYABLE_STATUS or status >= 500:
        return RetryableProviderError(message, status, request_id, retry_after(headers))
    return PermanentProviderError(message, status, request_id)


def backoff(attempt: int, settings: Settings, asked: float | None) -> float:
    """Delay before the next attempt: the provider's ask, else exponential with full jitter."""
    if asked is not None:
        return min(asked, settings.backoff_max_s * 10)
    cap = min(settings.backoff_max_s, settings.backoff_base_s * 2 ** (attempt - 1))
    return random.uniform(cap / 2, cap)


@dataclass
class AttemptRecord:
    attempt: int
    status_code: int | None
    error: str | None
    latency_ms: int
    request_id: str | None


async def call_with_retries(provider: Provider, body: dict, *, headers: dict, settings: Settings,
                            first_attempt: int = 1,
                            on_attempt: Callable[[AttemptRecord], None] | None = None,
                            sleep: Callable[[float], Awaitable] = asyncio.sleep) -> Answer:
    """Call until success, a permanent error, or ``settings.max_attempts`` attempts in all.

    Raises the last ``ProviderError`` when the attempts run out.
    """
    attempt = first_attempt
    while True:
        started = time.monotonic()
        try:
            answer = await provider.call(body, headers=headers)
        except ProviderError as e:
            if on_attempt:
                on_attempt(AttemptRecord(attempt, e.status_code, str(e)[:500],
                                         int((time.monotonic() - started) * 1000), e.request_id))
            if isinstance(e, PermanentProviderError) or attempt >= settings.max_attempts:
                raise
            await sleep(backoff(attempt, settings, getattr(e, "retry_after", None)))
            attempt += 1
            continue
        if on_attempt:
            on_attempt(AttemptRecord(attempt, answer.status_code, None, answer.latency_ms, answer.request_id))
        return answer
