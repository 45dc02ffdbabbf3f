"""Server-side rate limits of the simulator, and the headers that report them.

Model: a **sliding 60-second window** per model. Each accepted request is
logged with its time and its token cost; a request is refused (429) when the
window already holds ``rpm`` requests, or when the tokens in the window plus
this request's cost exceed ``tpm``. Refused requests are not logged, so they do
not use up the limit.

Token cost, as real providers count it before the answer exists: input tokens
+ the request's maximum output tokens (``max_tokens`` /
``max_completion_tokens``; when absent, a default of 4096 for OpenAI).

Reset times: ``reset-requests`` is the time until the oldest request leaves
the window (so a slot frees); ``reset-tokens`` is the time until enough tokens
leave the window for the request just seen (or the oldest entry, on success).
``retry-after`` on a 429 is that time rounded up to whole seconds (at least 1),
and ``retry-after-ms`` gives it in milliseconds.
"""

from __future__ import annotations

import math
import time
from collections import deque
from datetime import datetime, timezone

WINDOW_S = 60.0


def go_duration(seconds: float) -> str:
    """Format like OpenAI's reset headers (Go durations): ``12ms``, ``1.5s``, ``6m0s``."""
    ms = round(seconds * 1000)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms / 1000:g}s"
    minutes, rest = divmod(ms, 60_000)
    return f"{minutes}m{rest / 1000:g}s"


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class LimitResult:
    """Outcome of one admission check; turns itself into headers."""

    __slots__ = ("ok", "reason", "rpm", "tpm", "remaining_requests", "remaining_tokens",
                 "reset_requests_s", "reset_tokens_s", "retry_after_s")

    def __init__(self, ok, reason, rpm, tpm, remaining_requests, remaining_tokens,
                 reset_requests_s, reset_tokens_s, retry_after_s):
        self.ok = ok
        self.reason = reason
        self.rpm = rpm
        self.tpm = tpm
        self.remaining_requests = remaining_requests
        self.remaining_tokens = remaining_tokens
        self.reset_requests_s = reset_requests_s
        self.reset_tokens_s = reset_tokens_s
        self.retry_after_s = retry_after_s

    def openai_headers(self) -> dict[str, str]:
        h = {}
        if self.rpm is not None:
            h["x-ratelimit-limit-requests"] = str(self.rpm)
            h["x-ratelimit-remaining-requests"] = str(self.remaining_requests)
            h["x-ratelimit-reset-requests"] = go_duration(self.reset_requests_s)
        if self.tpm is not None:
            h["x-ratelimit-limit-tokens"] = str(self.tpm)
            h["x-ratelimit-remaining-tokens"] = str(self.remaining_tokens)
            h["x-ratelimit-reset-tokens"] = go_duration(self.reset_tokens_s)
        if not self.ok:
            h.update(retry_headers(self.retry_after_s))
        return h

    def anthropic_headers(self) -> dict[str, str]:
        h = {}
        now = time.time()
        if self.rpm is not None:
            h["anthropic-ratelimit-requests-limit"] = str(self.rpm)
            h["anthropic-ratelimit-requests-remaining"] = str(self.remaining_requests)
            h["anthropic-ratelimit-requests-reset"] = rfc3339(now + self.reset_requests_s)
        if self.tpm is not None:
            h["anthropic-ratelimit-tokens-limit"] = str(self.tpm)
            h["anthropic-ratelimit-tokens-remaining"] = str(self.remaining_tokens)
            h["anthropic-ratelimit-tokens-reset"] = rfc3339(now + self.reset_tokens_s)
        if not self.ok:
            h.update(retry_headers(self.retry_after_s))
        return h


def retry_headers(seconds: float) -> dict[str, str]:
    return {"retry-after": str(max(1, math.ceil(seconds))),
            "retry-after-ms": str(max(1, math.ceil(seconds * 1000)))}


class _Window:
    __slots__ = ("events", "tokens")

    def __init__(self):
        self.events: deque = deque()  # (monotonic time, token cost)
        self.tokens = 0

    def prune(self, now: float) -> None:
        events = self.events
        cutoff = now - WINDOW_S
        while events and events[0][0] <= cutoff:
            self.tokens -= events.popleft()[1]


class RateLimiter:
    """Sliding-window RPM/TPM per model. ``limit_for(model)`` gives a ModelLimit."""

    def __init__(self, limit_for):
        self._limit_for = limit_for
        self._windows: dict[str, _Window] = {}
        self._limits: dict = {}

    def reset(self) -> None:
        self._windows.clear()

    def check(self, model: str, cost: int, now: float | None = None) -> LimitResult | None:
        """Admit (and log) or refuse one request. ``None`` when the model has no limits."""
        lim = self._limits.get(model)
        if lim is None:
            lim = self._limits[model] = self._limit_for(model)
        rpm, tpm = lim.rpm, lim.tpm
        if rpm is None and tpm is None:
            return None
        now = time.monotonic() if now is None else now
        w = self._windows.get(model)
        if w is None:
            w = self._windows[model] = _Window()
        w.prune(now)
        events = w.events
        oldest_reset = (events[0][0] + WINDOW_S - now) if events else 0.0
        if rpm is not None and len(events) + 1 > rpm:
            return LimitResult(False, "requests", rpm, tpm, 0,
                               max(0, tpm - w.tokens) if tpm is not None else 0,
                               oldest_reset, self._tokens_reset(w, 0, tpm, now, oldest_reset),
                               oldest_reset)
        if tpm is not None and w.tokens + cost > tpm:
            wait = self._tokens_reset(w, cost, tpm, now, oldest_reset)
            return LimitResult(False, "tokens", rpm, tpm,
                               max(0, rpm - len(events)) if rpm is not None else 0,
                               max(0, tpm - w.tokens), oldest_reset, wait, wait)
        events.append((now, cost))
        w.tokens += cost
        oldest_reset = events[0][0] + WINDOW_S - now
        return LimitResult(True, None, rpm, tpm,
                           (rpm - len(events)) if rpm is not None else 0,
                           max(0, tpm - w.tokens) if tpm is not None else 0,
                           oldest_reset, oldest_reset if tpm is not None else 0.0, 0.0)

    @staticmethod
    def _tokens_reset(w: _Window, cost: int, tpm: int | None, now: float, oldest_reset: float) -> float:
        """Seconds until the window has room for ``cost`` more tokens."""
        if tpm is None:
            return 0.0
        if cost > tpm:
            return WINDOW_S  # can never fit; the caller says so in the message
        excess = w.tokens + cost - tpm
        if excess <= 0:
            return oldest_reset
        freed = 0
        for t, tok in w.events:
            freed += tok
            if freed >= excess:
                return max(0.0, t + WINDOW_S - now)
        return WINDOW_S


class PeakWindow:
    """Requests and tokens arriving in the last 60 s, and the highest seen."""

    __slots__ = ("events", "tokens", "peak_requests", "peak_tokens")

    def __init__(self):
        self.events: deque = deque()
        self.tokens = 0
        self.peak_requests = 0
        self.peak_tokens = 0

    def add(self, now: float, tokens: int) -> None:
        events = self.events
        cutoff = now - WINDOW_S
        while events and events[0][0] <= cutoff:
            self.tokens -= events.popleft()[1]
        events.append((now, tokens))
        self.tokens += tokens
        if len(events) > self.peak_requests:
            self.peak_requests = len(events)
        if self.tokens > self.peak_tokens:
            self.peak_tokens = self.tokens
