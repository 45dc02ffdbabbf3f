"""Exact-match response cache in Redis, by the keys of :mod:`pipeline.endpoints.caching`.

Workers store successful answers; the batcher answers hits at once, at cost 0.
"""

from __future__ import annotations

import json

import redis

from pipeline.constants import REDIS_PREFIX

PREFIX = REDIS_PREFIX + "cache:"


class ResponseCache:
    def __init__(self, url: str, ttl_s: int):
        self.redis = redis.Redis.from_url(url, socket_timeout=5)
        self.ttl_s = ttl_s

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        """Cached answers by key; a Redis outage is a miss, never an error."""
        if not keys:
            return {}
        try:
            values = self.redis.mget([PREFIX + k for k in keys])
        except redis.RedisError:
            return {}
        return {k: json.loads(v) for k, v in zip(keys, values) if v is not None}

    def put_many(self, items: dict[str, dict]) -> None:
        if not items:
            return
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for k, answer in items.items():
                    pipe.set(PREFIX + k, json.dumps(answer, separators=(",", ":")), ex=self.ttl_s)
                pipe.execute()
        except redis.RedisError:
            pass  # a cache that cannot store is only a slower pipeline
