"""How the simulator counts and bills: its own rules, never the pipeline's.

The simulator is a witness: an underestimate in ``pipeline.money.bounds`` must show
up as a call billed above its reservation. So nothing here imports the
pipeline's counting or pricing; it uses tiktoken directly (the vocabulary
files are the ones ``make setup`` provisions) and the providers' published
rules, written out again on purpose.

OpenAI (chat completions):
- prompt: the cookbook formula (3 per message, role, content, name + 1,
  3 priming the reply), each text part counted on its own;
- tools and functions: the cookbook's function-token formula
  (``num_tokens_for_tools``: 7 per function, 3 per property, 12 at the end ...);
- ``response_format``: the tokens of its compact JSON + 8;
- images: tile models 85 + 170 per 512-px tile after fitting 2048 × 2048 and
  the shortest side at 768 (low: 85), gpt-4o-mini 2833 + 5667, o1/o3 75 + 150,
  gpt-5 70 + 140; patch models 32-px patches up to 1,536 × their multiplier;
  an URL's size is drawn from its hash, up to 4096 × 4096 (the simulator
  cannot fetch it);
- ``n`` choices each up to the output limit; the prompt is billed once;
- reasoning models (o-series, gpt-5) report reasoning tokens inside
  ``completion_tokens``.

Anthropic (messages):
- text: the simulator's Claude stand-in, ``ceil(1.2 × cl100k_base tokens)``
  per text, 4 per message, 5 for a system prompt: a tokenizer the pipeline
  does not use (it estimates from o200k_base), making more tokens than
  OpenAI's on English as Claude's does;
- tool definitions: the same count of their compact JSON, plus the tool-use
  system prompt (346 tokens with tool_choice auto/none, 313 with any/tool,
  the figures Anthropic publishes for Claude 4 models);
- images: (w × h) / 750 after scaling the long edge to 1,568 and the area to
  ~1,600 tokens (1.15 megapixels);
- ``thinking``: thinking tokens are output tokens within ``max_tokens``.

Other endpoints count by the rules written in their modules: embeddings
(``embeddings.py``: cl100k_base per item), legacy completions
(``completions.py``: the prompt's tokens, no chat overhead), Responses
(``responses.py``: its chat twin, by the rules above), moderations
(``moderations.py``: free). A named provider's model may name its vocabulary
(``providers.py``); what a bill costs in USD is ``prices.py``'s.

Worst case (``worst_case`` config, ``--worst-case``): every choice runs to its
limit (``max_tokens``, or the model's maximum output when none is set), and
input is billed at the highest rate that can apply (an Anthropic request with
``cache_control`` writes its whole prompt at the longest TTL it names; no
cache reads anywhere); legacy completions run every ``best_of`` generation
to ``max_tokens``; embeddings bill every input token (they do anyway).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import os
import struct
from pathlib import Path

#: output limits (tokens) when a request sets none: the providers' published maxima
_MAX_OUTPUT = (("gpt-4o", 16384), ("chatgpt-4o", 16384), ("gpt-4.1", 32768), ("gpt-5", 128000),
               ("o1", 100000), ("o3", 100000), ("o4", 100000), ("gpt-4", 8192), ("gpt-3.5", 4096),
               ("claude-3-5", 8192), ("claude-3-7", 64000), ("claude-opus-4-0", 32000),
               ("claude-opus-4-1", 32000), ("claude-opus-4-2", 32000), ("claude-opus-4", 64000),
               ("claude", 64000))
_REASONING = ("o1", "o3", "o4", "gpt-5")
#: OpenAI image rules: (prefix, (base, tile)) or (prefix, patch multiplier)
_TILES = (("gpt-4o-mini", (2833, 5667)), ("gpt-4o", (85, 170)), ("gpt-4.1-mini", 1.62),
          ("gpt-4.1-nano", 2.46), ("gpt-4.1", (85, 170)), ("o4-mini", 1.72), ("o1", (75, 150)),
          ("o3", (75, 150)), ("gpt-5-mini", 1.62), ("gpt-5-nano", 2.46), ("gpt-5", (70, 140)))
CLAUDE_FACTOR = 1.2
ANTHROPIC_TOOL_PROMPT = {"auto": 346, "none": 346, "any": 313, "tool": 313}


# --------------------------------------------------------------------------- tokenizers

@functools.cache
def encoding(name: str):
    """A tiktoken encoding, loaded offline: the vocabulary files are data the pipeline
    provisions (idempotent, hash-checked); the counting is tiktoken's and this module's."""
    import tiktoken

    from pipeline.money.tokens import default_cache_dir, provision

    cache_dir = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or default_cache_dir())
    provision(cache_dir)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
    return tiktoken.get_encoding(name)


def openai_encoding_name(model: str) -> str | None:
    m = model.lower()
    if m.startswith("ft:"):
        m = m[3:].split(":", 1)[0]
    if m.startswith(("gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5")) or (
            m[:1] == "o" and m[1:2].isdigit()):
        return "o200k_base"
    if m == "gpt-4" or m.startswith(("gpt-4-", "gpt-3.5")):
        return "cl100k_base"
    return None


def openai_counter(model: str, encoding_name: str | None = None):
    """A token counter for an OpenAI-kind model (``encoding_name`` overrides the name's vocabulary:
    a named provider's model), or None when the simulator cannot count it."""
    name = encoding_name or openai_encoding_name(model)
    if name is None:
        return None
    enc = encoding(name).encode_ordinary
    return lambda s: len(enc(s))


def claude_count(text: str) -> int:
    """The simulator's Claude stand-in: ceil(1.2 × cl100k_base tokens)."""
    if not text:
        return 0
    return math.ceil(len(encoding("cl100k_base").encode_ordinary(text)) * CLAUDE_FACTOR)


def max_output(model: str) -> int:
    m = model.lower()
    for prefix, limit in _MAX_OUTPUT:
        if m.startswith(prefix):
            return limit
    return 4096


def is_reasoning(model: str) -> bool:
    return model.lower().startswith(_REASONING)


# --------------------------------------------------------------------------- images

def _size_from_bytes(data: bytes) -> tuple[int, int] | None:
    if data.startswith(b"\x89PNG") and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:3] == b"GIF" and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data) and data[i] == 0xFF:
            marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                return w, h
            i += 2 + length
    return None


def image_dimensions(ref: str, b64: str | None = None) -> tuple[int, int]:
    """The size of an image: read from its bytes, or (an URL, unreadable data) drawn from its hash."""
    raw = b64
    if raw is None and ref.startswith("data:") and "," in ref:
        raw = ref.split(",", 1)[1]
    if raw is not None:
        try:
            size = _size_from_bytes(base64.b64decode(raw[:4096], validate=False))
        except ValueError:
            size = None
        if size and size[0] > 0 and size[1] > 0:
            return size
    d = hashlib.sha256(ref.encode()).digest()
    return 1 + int.from_bytes(d[:2], "big") % 4096, 1 + int.from_bytes(d[2:4], "big") % 4096


def openai_image(model: str, size: tuple[int, int], detail: str) -> int:
    rule = next((r for p, r in _TILES if model.lower().startswith(p)), (85, 170))
    w, h = size
    if isinstance(rule, float):   # patch models: 32-px patches, scaled down to at most 1,536
        return math.ceil(min(1536, math.ceil(w / 32) * math.ceil(h / 32)) * rule)
    base, tile = rule
    if detail == "low":
        return base
    if max(w, h) > 2048:
        s = 2048 / max(w, h)
        w, h = int(w * s), int(h * s)
    if min(w, h) > 768:
        s = 768 / min(w, h)
        w, h = int(w * s), int(h * s)
    return base + tile * math.ceil(w / 512) * math.ceil(h / 512)


def anthropic_image(size: tuple[int, int]) -> int:
    w, h = size
    if max(w, h) > 1568:
        s = 1568 / max(w, h)
        w, h = w * s, h * s
    if w * h > 1_150_000:
        s = math.sqrt(1_150_000 / (w * h))
        w, h = w * s, h * s
    return max(1, math.ceil(int(w) * int(h) / 750))


# --------------------------------------------------------------------------- OpenAI prompt

def _cookbook_tools(functions: list, count) -> int:
    """The OpenAI cookbook's ``num_tokens_for_tools`` (gpt-4o constants)."""
    func_init, prop_init, prop_key, enum_init, enum_item, func_end = 7, 3, 3, -3, 3, 12
    n = 0
    for f in functions:
        n += func_init
        name, desc = str(f.get("name", "")), str(f.get("description", "")).rstrip(".")
        n += count(f"{name}:{desc}")
        props = (f.get("parameters") or {}).get("properties") or {}
        if props:
            n += prop_init
            for key, spec in props.items():
                spec = spec if isinstance(spec, dict) else {}
                n += prop_key
                ptype, pdesc = str(spec.get("type", "")), str(spec.get("description", "")).rstrip(".")
                if isinstance(spec.get("enum"), list):
                    n += enum_init
                    for item in spec["enum"]:
                        n += enum_item + count(str(item))
                n += count(f"{key}:{ptype}:{pdesc}")
                # nested schemas: the cookbook stops at one level; the simulator bills the rest as JSON
                rest = {k: v for k, v in spec.items() if k not in ("type", "description", "enum")}
                if rest:
                    n += count(json.dumps(rest, separators=(",", ":"), ensure_ascii=False))
    return n + func_end if functions else 0


def openai_prompt(body: dict, encoding_name: str | None = None) -> int:
    model = body["model"]
    count = openai_counter(model, encoding_name)
    n = 3
    for msg in body["messages"]:
        n += 3
        for key, value in msg.items():
            if key == "content":
                if isinstance(value, str):
                    n += count(value)
                elif isinstance(value, list):
                    for part in value:
                        if not isinstance(part, dict):
                            continue
                        if part.get("type") == "text":
                            n += count(str(part.get("text", "")))
                        elif part.get("type") == "refusal":
                            n += count(str(part.get("refusal", "")))
                        elif part.get("type") == "image_url":
                            img = part.get("image_url")
                            url = img.get("url", "") if isinstance(img, dict) else str(img)
                            detail = img.get("detail", "auto") if isinstance(img, dict) else "auto"
                            n += openai_image(model, image_dimensions(url), detail)
            elif key == "tool_calls" and isinstance(value, list):
                for call in value:
                    fn = call.get("function", {}) if isinstance(call, dict) else {}
                    n += 4 + count(str(fn.get("name", ""))) + count(str(fn.get("arguments", "")))
            elif key == "function_call" and isinstance(value, dict):
                n += 4 + count(str(value.get("name", ""))) + count(str(value.get("arguments", "")))
            elif isinstance(value, str):
                n += count(value) + (1 if key == "name" else 0)
    functions = [t.get("function", {}) for t in body.get("tools") or () if isinstance(t, dict)]
    functions += [f for f in body.get("functions") or () if isinstance(f, dict)]
    n += _cookbook_tools(functions, count)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        n += 8 + count(json.dumps(fmt.get("json_schema", {}), separators=(",", ":"), ensure_ascii=False))
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        n += 8
    return n


# --------------------------------------------------------------------------- Anthropic prompt

def _claude_blocks(value) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return claude_count(value)
    n = 0
    for block in value if isinstance(value, list) else ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            n += claude_count(str(block.get("text", "")))
        elif kind == "image":
            src = block.get("source") or {}
            ref = src.get("url") or src.get("data") or ""
            n += anthropic_image(image_dimensions(str(ref), src.get("data")))
        elif kind == "tool_use":
            n += 5 + claude_count(str(block.get("name", ""))) + claude_count(
                json.dumps(block.get("input", {}), separators=(",", ":"), ensure_ascii=False))
        elif kind == "tool_result":
            n += 5 + _claude_blocks(block.get("content"))
        elif kind == "thinking":
            n += claude_count(str(block.get("thinking", "")))
        elif kind == "redacted_thinking":
            n += claude_count(str(block.get("data", "")))
    return n


def _bare(block):
    return {k: v for k, v in block.items() if k != "cache_control"} if isinstance(block, dict) else block


def claude_content(value):
    """Content as the model sees it: a string is one text block, and ``cache_control`` is no part of
    it (where the markers sit changes neither the answer nor the cache key)."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if isinstance(value, list):
        return [_bare(b) for b in value]
    return value


def anthropic_segments(body: dict) -> list[tuple[int, str | None, str]]:
    """The prompt in cache order (tools, system, messages) as ``(tokens, ttl, prefix_key)``
    per piece: ``ttl`` is the piece's cache_control TTL (a breakpoint) or None; the key is
    the content up to the piece (``claude_content``), whatever the markers."""
    pieces: list[tuple[int, str | None, object]] = []

    def ttl_of(block) -> str | None:
        cc = block.get("cache_control") if isinstance(block, dict) else None
        return (cc.get("ttl") or "5m") if isinstance(cc, dict) else None

    tools = body.get("tools") or []
    if tools:
        choice = (body.get("tool_choice") or {}).get("type", "auto")
        pieces.append((ANTHROPIC_TOOL_PROMPT.get(choice, 346), None, "tool-prompt"))
        for tool in tools:
            clean = {k: v for k, v in tool.items() if k != "cache_control"}
            pieces.append((claude_count(json.dumps(clean, separators=(",", ":"), ensure_ascii=False)),
                           ttl_of(tool), clean))
    system = body.get("system")
    if system:
        pieces.append((5, None, "system"))
        for block in [system] if isinstance(system, str) else system:
            pieces.append((_claude_blocks([block] if isinstance(block, dict) else block),
                           ttl_of(block), claude_content(block if isinstance(block, str) else [block])))
    last_block = None
    for msg in body["messages"]:
        pieces.append((4, None, msg.get("role")))
        content = msg.get("content")
        for block in [content] if isinstance(content, str) else content or ():
            last_block = len(pieces)
            pieces.append((_claude_blocks([block] if isinstance(block, dict) else block),
                           ttl_of(block), claude_content(block if isinstance(block, str) else [block])))
    auto = ttl_of(body)   # automatic caching: a top-level cache_control marks the last block
    if auto is not None and last_block is not None and pieces[last_block][1] is None:
        tokens, _, part = pieces[last_block]
        pieces[last_block] = (tokens, auto, part)
    out, h = [], hashlib.sha256(body["model"].encode())
    for tokens, ttl, part in pieces:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        out.append((tokens, ttl, h.copy().hexdigest()))
    return out


def anthropic_prompt(body: dict) -> int:
    return 3 + sum(t for t, _, _ in anthropic_segments(body))
