"""Prompt caching as the providers do it: what is cached, for how long, and what a call reads or writes.

The simulator reports cached tokens only where the provider would, so that the
pipeline's savings are measured, never assumed. The rules, as the providers
publish them (read December 2026):

OpenAI (developers.openai.com/api/docs/guides/prompt-caching):
- automatic, for prompts of 1,024 tokens or more; a hit covers the longest
  prefix seen before, in 128-token steps from 1,024 on;
- requests are routed by a hash of the prompt's start and ``prompt_cache_key``:
  a prefix is found only under the same key (or again with none);
- the simulator's prefixes end at message boundaries, tools and
  ``response_format`` first (they come first in the rendered prompt), and the
  whole prompt is one of them;
- in memory a prefix stays 5 to 10 minutes after its last use: the simulator
  keeps it 5 (the low end: savings are never overstated);
  ``prompt_cache_retention: "24h"`` keeps it 24 hours.

Anthropic (docs.claude.com/en/docs/build-with-claude/prompt-caching):
- only at ``cache_control`` breakpoints (tools, system blocks, message content
  blocks, or a top-level one: automatic caching, at the last block), at most 4
  per request (400 beyond), and a 1-hour breakpoint may not follow a 5-minute
  one (400);
- a hit is looked for at each breakpoint and at the block boundaries up to
  20 blocks before it; the longest hit is read (0.1 × input), and the prompt
  from there to each later breakpoint is written (1.25 × for the 5-minute
  TTL, 2 × for ``"ttl": "1h"``); a read refreshes the entry for its TTL;
- a prefix below the model's minimum (:data:`ANTHROPIC_MIN_TOKENS`) is
  silently not cached: no write, no read, no error;
- the cache key is the content: where the markers sit, and whether a system
  prompt is a string or one text block, does not change it.

An entry is written when its call is billed (the end of its generation), so
calls running at once all miss: the first of a group must finish before the
others can read it, as with the providers. Batches share the cache with the
synchronous endpoints (the discounts stack; ``prices.py``).
"""

from __future__ import annotations

import time

#: Anthropic's minimum cacheable prompt per model family (tokens), docs.claude.com/en/docs/build-with-claude/
#: prompt-caching, "Cache limitations" (read December 2026); the longest matching prefix of the model id wins
ANTHROPIC_MIN_TOKENS = (
    ("claude-opus-4-6", 4096), ("claude-opus-4-5", 4096), ("claude-haiku-4-5", 4096),
    ("claude-3-5-haiku", 2048), ("claude-3-haiku", 2048),
    ("claude-sonnet-4", 1024), ("claude-opus-4", 1024), ("claude-3-7-sonnet", 1024),
    ("claude-3-5-sonnet", 1024), ("claude-3-opus", 1024),
)
ANTHROPIC_DEFAULT_MIN = 1024
ANTHROPIC_MAX_BREAKPOINTS = 4
#: block boundaries looked at before each breakpoint for a hit
ANTHROPIC_LOOKBACK = 20
ANTHROPIC_TTL_S = {"5m": 300.0, "1h": 3600.0}

OPENAI_MIN_TOKENS, OPENAI_STEP = 1024, 128
OPENAI_TTL_S = {"in_memory": 300.0, "24h": 86400.0}


def anthropic_min_tokens(model: str) -> int:
    m = model.lower()
    best = max((p for p, _ in ANTHROPIC_MIN_TOKENS if m.startswith(p)), key=len, default=None)
    return dict(ANTHROPIC_MIN_TOKENS)[best] if best else ANTHROPIC_DEFAULT_MIN


def openai_ttl_s(retention) -> float:
    return OPENAI_TTL_S["24h"] if retention == "24h" else OPENAI_TTL_S["in_memory"]


class PromptCache:
    """Prompt-cache entries: prefix key -> (expiry, ttl, written at), in monotonic seconds.

    ``as_of(start)`` is the cache as a call that started at ``start`` sees it:
    only entries written before then (a call in flight meanwhile wrote too late).
    """

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.entries: dict[str, tuple[float, float, float]] = {}
        self.start: float | None = None

    def as_of(self, start: float | None) -> "PromptCache":
        view = PromptCache(self.clock)
        view.entries, view.start = self.entries, start
        return view

    def hit(self, key: str) -> bool:
        entry = self.entries.get(key)
        now = self.clock()
        return entry is not None and entry[0] > now and entry[2] <= (now if self.start is None else self.start)

    def put(self, key: str, ttl_s: float) -> None:
        now = self.clock()
        old = self.entries.get(key)
        if old and old[0] > now:
            self.entries[key] = (now + max(ttl_s, old[1]), max(ttl_s, old[1]), old[2])
        else:
            self.entries[key] = (now + ttl_s, ttl_s, now)

    def refresh(self, key: str) -> None:
        """A read keeps the entry for its own TTL from now."""
        entry = self.entries.get(key)
        if entry is not None:
            self.entries[key] = (self.clock() + entry[1], entry[1], entry[2])

    def clear(self) -> None:
        self.entries.clear()


def openai_cached(prefixes, prompt_tokens: int, ttl_s: float, cache: PromptCache) -> int:
    """Cached tokens of an OpenAI call whose cacheable prefixes are ``prefixes`` ((key, tokens), shortest
    first); every prefix of 1,024 tokens or more is then cached for ``ttl_s``."""
    cached = 0
    for key, tokens in prefixes:
        if tokens >= OPENAI_MIN_TOKENS and cache.hit(key):
            cached = max(cached, min(tokens, prompt_tokens - 1) // OPENAI_STEP * OPENAI_STEP)
    for key, tokens in prefixes:
        if tokens >= OPENAI_MIN_TOKENS:
            cache.put(key, ttl_s)
    return cached if cached >= OPENAI_MIN_TOKENS else 0


def anthropic_cached(model: str, segments, cache: PromptCache) -> tuple[int, int, int]:
    """``(read, write_5m, write_1h)`` tokens of an Anthropic call; ``segments`` is the prompt in cache
    order as ``(tokens, ttl or None, prefix key)`` (``billing.anthropic_segments``)."""
    cums, cum = [], 3
    for tokens, _, _ in segments:
        cum += tokens
        cums.append(cum)
    marks = [i for i, (_, ttl, _) in enumerate(segments) if ttl is not None]
    minimum = anthropic_min_tokens(model)
    read, read_at = 0, -1
    for i in reversed(marks):
        for j in range(i, max(-1, i - ANTHROPIC_LOOKBACK - 1), -1):
            if cums[j] >= minimum and cache.hit(segments[j][2]):
                if cums[j] > read:
                    read, read_at = cums[j], j
                break
    if read_at >= 0:
        cache.refresh(segments[read_at][2])
    write_5m = write_1h = 0
    done = read
    for i in marks:
        if i <= read_at or cums[i] < minimum:
            continue   # already read, or below the minimum: silently not cached
        ttl = segments[i][1]
        if ttl == "1h":
            write_1h += cums[i] - done
        else:
            write_5m += cums[i] - done
        done = cums[i]
        cache.put(segments[i][2], ANTHROPIC_TTL_S.get(ttl, ANTHROPIC_TTL_S["5m"]))
    return read, write_5m, write_1h


def check_anthropic_breakpoints(body: dict) -> str | None:
    """Why Anthropic would refuse the body's ``cache_control`` markers (400), or None."""
    ttls = []

    def look(blocks):
        for block in blocks if isinstance(blocks, list) else ():
            cc = block.get("cache_control") if isinstance(block, dict) else None
            if cc is not None:
                ttls.append((cc.get("ttl") if isinstance(cc, dict) else None) or "5m")

    look(body.get("tools"))
    look(body.get("system"))
    for msg in body.get("messages") or ():
        if isinstance(msg, dict):
            look(msg.get("content"))
    if body.get("cache_control") is not None:   # automatic caching: one of the slots, at the last block
        look([body])
    if len(ttls) > ANTHROPIC_MAX_BREAKPOINTS:
        return f"A maximum of {ANTHROPIC_MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {len(ttls)}."
    if any(a == "5m" and b == "1h" for a, b in zip(ttls, ttls[1:])) or (
            "5m" in ttls and "1h" in ttls[ttls.index("5m"):]):
        return "a ttl='1h' cache_control block must not come after a ttl='5m' cache_control block"
    return None
