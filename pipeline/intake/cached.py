"""Requests the response cache already answers: looked up for a whole flush at once, and
turned into result rows that cost nothing and say what they saved.

Only the batcher uses this. A Redis that is away, or an entry that cannot be read, is a
miss, never an error: the request is then called as if nothing were cached.
"""

from __future__ import annotations

import json
import logging

import redis

from pipeline.intake.outages import Dependency
from pipeline.money.pricing import get_price_book
from pipeline.paths.base import without_call
from pipeline.request import Request
from pipeline.stores.cache import PREFIX, ResponseCache

log = logging.getLogger(__name__)


class CachedAnswers:
    """One ``MGET`` per flush for the cache keys of its items."""

    def __init__(self, cache: ResponseCache, redis_dep: Dependency, stats: dict):
        self.cache, self.redis, self.stats = cache, redis_dep, stats

    def answers(self, items) -> dict:
        """``{cache key: answer}`` of the items' keys the cache holds."""
        keys = sorted({it.row["cache_key"] for it in items if it.row["cache_key"]})
        if not keys or not self.redis.may_try():
            return {}
        try:
            values = self.cache.redis.mget([PREFIX + k for k in keys])
        except redis.RedisError as e:
            self.redis.failed(e)
            return {}
        self.redis.ok()
        out = {}
        for k, v in zip(keys, values):
            if v is not None:
                try:
                    out[k] = json.loads(v)
                except ValueError:
                    log.warning("cache entry %s is not JSON: ignored", k)
        self.stats["cache_misses"] += len(keys) - len(out)
        return out


def cached_result(row: dict, answer: dict | None) -> dict | None:
    """The result row of a request answered from the cache: cost 0, its list price saved
    (``pipeline.paths.base.without_call``, the one place a call-less answer is built)."""
    if not isinstance(answer, dict):
        return None
    try:
        req = Request.from_row(row)
    except Exception as e:   # pragma: no cover - decode made the row
        log.warning("request %s/%s unreadable (%s): a miss", row["job_id"], row["custom_id"], e)
        return None
    outcome = without_call(req, answer, get_price_book(), "cache")
    if outcome is None:   # an entry we cannot price is a miss
        log.warning("cache entry for %s/%s unusable (no usage): a miss", row["job_id"], row["custom_id"])
        return None
    return outcome.to_row()
