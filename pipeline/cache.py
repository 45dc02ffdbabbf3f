"""Exact-match response cache in Redis.

A request is cacheable only when its answer is deterministic: ``temperature``
0, or ``cache: true`` on its line (``cache: false`` always opts out). The key
is the SHA-256 of the canonical request — provider, url and the whole body
(model, messages, every generation parameter) as sorted JSON — so two requests
share an answer only if the provider would see the same request. Chat and
Anthropic messages keys leave the url out, as they did before other urls
existed, so their cached answers stay valid. Workers store
successful answers; the batcher answers hits at once, at cost 0.
"""

from __future__ import annotations

import hashlib
import json

import redis

from pipeline.constants import ANTHROPIC_MESSAGES_URL, CHAT_URL, REDIS_PREFIX

PREFIX = REDIS_PREFIX + "cache:"


def is_cacheable(body: dict, flag: bool | None) -> bool:
    if flag is not None:
        return flag
    return body.get("temperature") == 0


#: urls whose keys predate endpoints: the url stays out of their key, so the answers cached
#: before it was added stay hits (a provider has one of them, so provider + body was unique)
_URL_IMPLIED = (CHAT_URL, ANTHROPIC_MESSAGES_URL)


def cache_key(provider: str, body: dict, url: str | None = None) -> str:
    """The key of a request: provider, url and body. ``url`` None means the provider's chat url."""
    doc = {"provider": provider, "body": body}
    if url is not None and url not in _URL_IMPLIED:
        doc["url"] = url   # the same body on two urls (a moderation and an embedding of one text) differs
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


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
