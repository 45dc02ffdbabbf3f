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
- ``batch_lines_billed``, ``batch_custom_ids_billed``: Batch API lines billed, and their distinct
  custom_ids; ``batch_custom_ids_billed_twice``: those billed more than once (at most 100 listed)
- ``billed``: what the provider bills, in its usage fields summed (``billed_calls`` generations).
  A generation the simulator finished is billed whether or not its client was still there
  (a client timeout, a hang-up): a real provider bills it all the same

``GET /_stats?key_prefix=P`` adds ``keys``: the calls and distinct keys whose
``Idempotency-Key`` starts with ``P``, and what those keys were billed (``billed_calls``,
``billed``: usage fields summed; ``billed_by_key``; ``billed_usd``, ``billed_usd_by_key``: each
call priced when it is billed, by the simulator's own table (``prices.py``) at the tier it was
served, and ``unpriced_calls`` it has no price for). A test counts its own job's calls and bill
this way (the pipeline's key is ``job:<hash of custom_id>``), whatever else the stack is running.

``unattended``: generations still running whose client went away; they are billed when they
finish, so a bill read while it is above 0 is not final.

Per provider and per API key (calls, 429s, 401s, tokens, USD, peak calls in
60 s, flex): ``providers`` in the same answer, kept by ``accounts.py``.
"""

from __future__ import annotations

import time
from decimal import Decimal

from simulator.limits import PeakWindow
from simulator.prices import plain

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
        self.billed_calls = 0
        self.billed: dict[str, int] = {}      # usage field -> billed total, all calls
        self.key_billed: dict[str, dict[str, int]] = {}   # Idempotency-Key -> usage field -> total
        self.key_usd: dict[str, Decimal] = {}    # Idempotency-Key -> USD billed (priced calls)
        self.key_unpriced: dict[str, int] = {}   # Idempotency-Key -> calls billed with no price
        self.batch_requests: dict[str, int] = {}
        self.batch_billed: dict[str, int] = {}   # custom_id of a Batch API line -> times billed
        self.batch_usd: dict[str, Decimal] = {}   # custom_id of a Batch API line -> USD billed

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

    def bill(self, idempotency_key: str | None, usage: dict, usd: Decimal | None = None) -> None:
        """Count one generation's bill (the provider's usage object, and ``usd`` it costs by the
        simulator's prices, None when unpriced), per key and in total."""
        fields = dict(_flatten(usage))
        self.billed_calls += 1
        _add(self.billed, fields)
        if idempotency_key:
            per = self.key_billed.setdefault(idempotency_key, {})
            per["calls"] = per.get("calls", 0) + 1
            _add(per, fields)
            if usd is None:
                self.key_unpriced[idempotency_key] = self.key_unpriced.get(idempotency_key, 0) + 1
            else:
                self.key_usd[idempotency_key] = self.key_usd.get(idempotency_key, Decimal(0)) + usd

    def batch_line_billed(self, custom_id: str, usd: Decimal | None = None) -> None:
        """A Batch API line billed (batch_rules.py: each line billed once, counted by custom_id), and
        what it cost by the simulator's prices (None when unpriced)."""
        self.batch_billed[custom_id] = self.batch_billed.get(custom_id, 0) + 1
        if usd is not None:
            self.batch_usd[custom_id] = self.batch_usd.get(custom_id, Decimal(0)) + usd

    def batch_lines(self, custom_ids: list[str]) -> dict:
        """What the Batch API billed for these lines (``POST /_stats/batch_lines``): a test or a
        benchmark names its own lines, whatever else the simulator runs."""
        billed = [c for c in custom_ids if c in self.batch_billed]
        return {"lines_billed": sum(self.batch_billed[c] for c in billed),
                "billed_usd": plain(sum((self.batch_usd.get(c, Decimal(0)) for c in billed), Decimal(0))),
                "unpriced_lines": sum(1 for c in billed if c not in self.batch_usd)}

    def keys_with_prefix(self, prefix: str) -> dict:
        calls = [n for k, n in self.key_calls.items() if k.startswith(prefix)]
        billed = {k: v for k, v in self.key_billed.items() if k.startswith(prefix)}
        total: dict[str, int] = {}
        for v in billed.values():
            _add(total, {f: n for f, n in v.items() if f != "calls"})
        usd = {k: v for k, v in self.key_usd.items() if k.startswith(prefix)}
        return {"prefix": prefix, "calls": sum(calls), "distinct": len(calls),
                "billed_calls": sum(v["calls"] for v in billed.values()), "billed": total,
                "billed_by_key": dict(sorted(billed.items())),
                "billed_usd": plain(sum(usd.values(), Decimal(0))),
                "billed_usd_by_key": {k: plain(v) for k, v in sorted(usd.items())},
                "unpriced_calls": sum(n for k, n in self.key_unpriced.items() if k.startswith(prefix))}

    def as_dict(self, key_prefix: str | None = None, unattended: int = 0) -> dict:
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
            "batch_lines_billed": sum(self.batch_billed.values()),
            "batch_custom_ids_billed": len(self.batch_billed),
            "batch_custom_ids_billed_twice": sorted(k for k, n in self.batch_billed.items() if n > 1)[:100],
            "billed_calls": self.billed_calls,
            "billed": dict(sorted(self.billed.items())),
            "unattended": unattended,
            **({"keys": self.keys_with_prefix(key_prefix)} if key_prefix is not None else {}),
        }


def _flatten(usage: dict, prefix: str = ""):
    """Integer leaves of a usage object as (dotted name, value): ``prompt_tokens_details.cached_tokens``."""
    for k, v in usage.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        elif isinstance(v, int) and not isinstance(v, bool):
            yield f"{prefix}{k}", v


def _add(into: dict[str, int], fields: dict[str, int]) -> None:
    for f, n in fields.items():
        into[f] = into.get(f, 0) + n
