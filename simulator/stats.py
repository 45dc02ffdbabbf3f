"""What the simulator has seen, as a provider would see it: ``GET /_stats``.

Counted per model, per tier tag (header ``X-LLMBatch-Tier``, ``untagged``
when absent), per model and tier, and in total:

- ``requests``: requests received on the synchronous endpoints (any outcome)
- ``successes`` and ``errors`` (status code, or ``timeout`` / ``hangup`` / ``client_closed``
  when no answer was sent -> count)
- ``in_flight`` now and ``peak_concurrency`` (most requests in flight at once)
- ``peak_requests_60s`` / ``peak_tokens_60s``: the most requests, and the most
  tokens (input + max output, the rate-limit cost), that arrived within any
  sliding 60 s window
- ``usage_tokens``: input + output tokens actually answered
- ``duplicates``: requests whose ``Idempotency-Key`` had been seen before

``GET /_stats?key_prefix=P`` adds ``keys``: the calls and distinct keys whose
``Idempotency-Key`` starts with ``P``. A test counts its own job's calls this way
(the pipeline's key is ``job:custom_id``), whatever else the stack is running.
"""

from __future__ import annotations

import time

from simulator.limits import PeakWindow

UNTAGGED = "untagged"
MAX_LISTED_DUPLICATE_KEYS = 100


class Counter:
    __slots__ = ("requests", "successes", "errors", "in_flight", "peak_concurrency",
                 "window", "usage_tokens", "duplicates")

    def __init__(self):
        self.requests = 0
        self.successes = 0
        self.errors: dict[str, int] = {}
        self.in_flight = 0
        self.peak_concurrency = 0
        self.window = PeakWindow()
        self.usage_tokens = 0
        self.duplicates = 0

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "successes": self.successes,
            "errors": dict(sorted(self.errors.items())),
            "in_flight": self.in_flight,
            "peak_concurrency": self.peak_concurrency,
            "peak_requests_60s": self.window.peak_requests,
            "peak_tokens_60s": self.window.peak_tokens,
            "usage_tokens": self.usage_tokens,
            "duplicates": self.duplicates,
        }


class Stats:
    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.started = time.time()
        self.total = Counter()
        self.by_model: dict[str, Counter] = {}
        self.by_tier: dict[str, Counter] = {}
        self.by_model_tier: dict[tuple[str, str], Counter] = {}
        self.key_calls: dict[str, int] = {}   # Idempotency-Key -> requests carrying it
        self.batch_requests: dict[str, int] = {}

    def counters(self, model: str, tier: str | None) -> tuple[Counter, ...]:
        tier = tier or UNTAGGED
        m = self.by_model.get(model)
        if m is None:
            m = self.by_model[model] = Counter()
        t = self.by_tier.get(tier)
        if t is None:
            t = self.by_tier[tier] = Counter()
        mt = self.by_model_tier.get((model, tier))
        if mt is None:
            mt = self.by_model_tier[(model, tier)] = Counter()
        return (self.total, m, t, mt)

    def start(self, counters, now: float, cost: int, idempotency_key: str | None) -> None:
        duplicate = False
        if idempotency_key:
            seen = self.key_calls.get(idempotency_key, 0)
            self.key_calls[idempotency_key] = seen + 1
            duplicate = seen > 0
        for c in counters:
            c.requests += 1
            c.in_flight += 1
            if c.in_flight > c.peak_concurrency:
                c.peak_concurrency = c.in_flight
            c.window.add(now, cost)
            if duplicate:
                c.duplicates += 1

    @staticmethod
    def finish(counters, status: int | str, usage_tokens: int = 0) -> None:
        """``status``: the HTTP status sent, or ``"timeout"`` / ``"hangup"`` / ``"client_closed"``."""
        key = None if status == 200 else str(status)
        for c in counters:
            c.in_flight -= 1
            if key is None:
                c.successes += 1
                c.usage_tokens += usage_tokens
            else:
                c.errors[key] = c.errors.get(key, 0) + 1

    def keys_with_prefix(self, prefix: str) -> dict:
        calls = [n for k, n in self.key_calls.items() if k.startswith(prefix)]
        return {"prefix": prefix, "calls": sum(calls), "distinct": len(calls)}

    def as_dict(self, key_prefix: str | None = None) -> dict:
        by_model_tier: dict[str, dict] = {}
        for (model, tier), c in sorted(self.by_model_tier.items()):
            by_model_tier.setdefault(model, {})[tier] = c.as_dict()
        duplicates = {k: n - 1 for k, n in self.key_calls.items() if n > 1}   # key -> extra sightings
        listed = sorted(duplicates.items(), key=lambda kv: -kv[1])[:MAX_LISTED_DUPLICATE_KEYS]
        return {
            "simulator": True,
            "since": self.started,
            "total": self.total.as_dict(),
            "by_model": {k: c.as_dict() for k, c in sorted(self.by_model.items())},
            "by_tier": {k: c.as_dict() for k, c in sorted(self.by_tier.items())},
            "by_model_tier": by_model_tier,
            "duplicate_keys": dict(listed),
            "distinct_duplicate_keys": len(duplicates),
            "batch_requests": dict(sorted(self.batch_requests.items())),
            **({"keys": self.keys_with_prefix(key_prefix)} if key_prefix is not None else {}),
        }
