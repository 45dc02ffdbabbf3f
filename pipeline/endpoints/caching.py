"""Which answers may be cached, and under which key: a property of the request, not of Redis.

A request is cacheable only when its answer is deterministic: ``temperature``
0, or ``cache: true`` on its line (``cache: false`` always opts out). The key
is the SHA-256 of the canonical request (provider, url and the whole body as
sorted JSON), so two requests share an answer only if the provider would see
the same request. The store is :class:`pipeline.stores.cache.ResponseCache`.
"""

from __future__ import annotations

import hashlib
import json

from pipeline.constants import ANTHROPIC_MESSAGES_URL, CHAT_URL


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
