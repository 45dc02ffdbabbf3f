"""Which answers may be cached, and under which key: a property of the request, not of Redis.

A request is cacheable only when its answer is deterministic: ``temperature``
0, or ``cache: true`` on its line (``cache: false`` always opts out). The key
is the SHA-256 of the canonical request (provider, url and the whole body as
sorted JSON), so two requests share an answer only if the provider would see
the same request. Prompt-cache placement is no part of it (``cache_control``
markers, ``prompt_cache_key``, and a text marked by turning it into one text
block): it changes what a call costs, never its answer. The store is :class:`pipeline.stores.cache.ResponseCache`.
"""

from __future__ import annotations

import hashlib
import json

from pipeline import jsontext
from pipeline.constants import ANTHROPIC_MESSAGES_URL, CHAT_URL


def is_cacheable(body: dict, flag: bool | None) -> bool:
    if flag is not None:
        return flag
    return body.get("temperature") == 0


#: urls whose keys predate endpoints: the url stays out of their key, so the answers cached
#: before it was added stay hits (a provider has one of them, so provider + body was unique)
_URL_IMPLIED = (CHAT_URL, ANTHROPIC_MESSAGES_URL)


_PLACEMENT = ("prompt_cache_key", "prompt_cache_retention")


def _unmarked(content):
    if not isinstance(content, list):
        return content
    blocks = [{k: v for k, v in b.items() if k != "cache_control"} if isinstance(b, dict) else b for b in content]
    if len(blocks) == 1 and isinstance(blocks[0], dict) and set(blocks[0]) == {"type", "text"} \
            and blocks[0]["type"] == "text":
        return blocks[0]["text"]
    return blocks


def _without_placement(body: dict) -> dict:
    """The body as the model reads it: prompt-cache placement taken out (bodies without any are
    returned as they are, so their keys never change)."""
    if "cache_control" not in jsontext.dumps(body) and not any(k in body for k in _PLACEMENT):
        return body
    out = {k: v for k, v in body.items() if k not in _PLACEMENT}
    if isinstance(out.get("tools"), list):
        out["tools"] = [{k: v for k, v in t.items() if k != "cache_control"} if isinstance(t, dict) else t
                        for t in out["tools"]]
    if "system" in out:
        out["system"] = _unmarked(out["system"])
    if isinstance(out.get("messages"), list):
        out["messages"] = [{**m, "content": _unmarked(m.get("content"))} if isinstance(m, dict) and "content" in m
                           else m for m in out["messages"]]
    return out


def cache_key(provider: str, body: dict, url: str | None = None) -> str:
    """The key of a request: provider, url and body. ``url`` None means the provider's chat url."""
    doc = {"provider": provider, "body": _without_placement(body)}
    if url is not None and url not in _URL_IMPLIED:
        doc["url"] = url   # the same body on two urls (a moderation and an embedding of one text) differs
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
