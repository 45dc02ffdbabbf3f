"""The most a request can cost: the one function every reservation is based on.

``request_bound(provider, body, prices)`` returns the input tokens, the most
output tokens and the maximum cost in USD of one request body, or raises
``LineError`` when the request cannot be bounded. The producer prices a line
with it at submit (``pipeline.intake.formats.parse_request``), and the batcher
prices every message again with it: a producer's ``max_cost_usd`` is a hint
at most and is never reserved as given.

It must never return less than a provider can bill for the body. The rules,
each an over-estimate on purpose (tests/unit/test_bounds*.py check each one,
and a property test checks the whole against the simulator's worst case):

* **Output.** ``max_completion_tokens`` / ``max_tokens`` (the larger when both
  are set), or the model's ``max_output_tokens`` when neither is; a value over
  the model's limit is rejected, never clamped. OpenAI reasoning tokens are
  part of ``max_completion_tokens``; Anthropic ``thinking.budget_tokens`` is
  part of ``max_tokens`` and must be at least 1,024 and below it (as the API
  requires). OpenAI ``n`` choices bill ``n`` × the output; the prompt is
  billed once. ``n`` above :data:`MAX_N` is rejected.
* **Input text.** OpenAI: tiktoken counts, per message and per content part,
  plus one token per part. Anthropic (no public tokenizer):
  :func:`pipeline.money.tokens.estimate_claude_text` (o200k with a margin, see
  there), or the count_tokens figure when the producer has one.
* **Schemas** (tools, functions, ``response_format`` JSON schemas, tool calls
  and tool_use inputs in the history): the tokens of their JSON
  × :data:`SCHEMA_MARGIN_NUM` / :data:`SCHEMA_MARGIN_DEN` plus
  :data:`SCHEMA_ITEM_OVERHEAD` per item. Providers render schemas in their own
  (undocumented) form; the JSON text of a schema carries every name, type and
  description of that form plus quotes and braces, and the margin covers the
  wrapper text. Anthropic adds its tool-use system prompt
  (:data:`ANTHROPIC_TOOL_PROMPT`, above every figure Anthropic publishes).
* **Images** by the providers' published formulas (:func:`openai_image_tokens`,
  :func:`anthropic_image_tokens`); when the size is unknown (an URL, an
  unreadable header) the maximum for the model and detail.
* **Cache writes.** Anthropic ``cache_control`` anywhere (a block's, or the
  top-level one of automatic caching, whose breakpoint is the last block) prices
  the whole prompt at the most expensive write rate present (1-hour: 2 ×,
  5-minute: 1.25 ×), since a write covers the prompt up to its breakpoint.
* **Cannot be bounded** (rejected with the reason): content types, tool types
  and parameters whose price is not a function of the body (audio, files,
  documents, server tools, predicted outputs, ``service_tier: priority``).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from decimal import Decimal

from pipeline.constants import ANTHROPIC_MESSAGES_URL, CHAT_URL
from pipeline.errors import LineError, UnknownModelError
from pipeline.money.pricing import ModelPrice, PriceBook, Usage, cost
from pipeline.money.tokens import _openai_is_plain_text, encoding_name_for, estimate_claude_text, get_encoding

#: OpenAI's documented maximum of ``n``.
MAX_N = 128
#: margin on the JSON tokens of a schema: × 5/4, plus a fixed overhead per item
SCHEMA_MARGIN_NUM, SCHEMA_MARGIN_DEN = 5, 4
SCHEMA_ITEM_OVERHEAD = 24
#: once per OpenAI request with tools or functions (the "# Tools / namespace functions" wrapper)
OPENAI_TOOLS_OVERHEAD = 32
#: OpenAI chat framing, per the cookbook formula
TOKENS_PER_MESSAGE, TOKENS_PER_NAME, REPLY_PRIMING = 3, 1, 3
#: Anthropic framing per message and for the system prompt (Claude's is not published;
#: the message count_tokens reports for a one-word message is a few tokens): 5 each
ANTHROPIC_TOKENS_PER_MESSAGE = 5
#: per content part (separators between parts) and per image part (its container)
TOKENS_PER_PART, TOKENS_PER_IMAGE = 1, 16
#: Anthropic's tool-use system prompt: the largest figure it publishes is 530 tokens (Claude 3 Opus, auto)
ANTHROPIC_TOOL_PROMPT = 600
#: Anthropic images: (w × h) / 750 tokens, scaled down above ~1,600; this is ~1,600 with a 9 % margin
ANTHROPIC_IMAGE_MAX = 1750
ANTHROPIC_IMAGE_LONG_EDGE = 1568
#: OpenAI tile models: fit in 2048 × 2048, shortest side at most 768, 512-px tiles: at most 4 × 2
OPENAI_MAX_TILES = 8
OPENAI_MAX_PATCHES = 1536
#: Anthropic thinking budget: the API's minimum
MIN_THINKING_BUDGET = 1024

_OPENAI_REJECTED = {
    "audio": "audio output is billed per audio token and cannot be bounded here",
    "prediction": "predicted outputs bill rejected prediction tokens beyond max_tokens",
    "web_search_options": "web search is billed per call, not per token",
}
_ANTHROPIC_REJECTED = {
    "mcp_servers": "MCP server tools cannot be bounded",
    "container": "code-execution containers are billed by time",
}


@dataclass(frozen=True)
class Bound:
    input_tokens: int
    max_output_tokens: int
    max_cost_usd: Decimal
    tokens_exact: bool


def request_bound(provider: str, body: dict, prices: PriceBook, *,
                  declared_input_tokens: int | None = None) -> Bound:
    """Bound one request body of ``provider`` (a registry name); ``declared_input_tokens`` (a
    producer's exact count, e.g. from Anthropic's count_tokens) can only raise the input count,
    never lower it."""
    if not isinstance(body, dict):
        raise LineError("the request body must be an object")
    model = body.get("model")
    if not isinstance(model, str):
        raise LineError("body.model missing or not a string")
    price = prices.resolve(model, provider)   # UnknownModelError is a LineError
    return price_bound(provider, body, price, declared_input_tokens=declared_input_tokens)


def price_bound(provider: str, body: dict, price: ModelPrice, *,
                declared_input_tokens: int | None = None) -> Bound:
    """:func:`request_bound` with the body's model already resolved to ``price``."""
    model = body["model"]
    if price.provider != provider:
        raise UnknownModelError(f"model {model} is served by {price.provider}, not {provider}")
    price.require_endpoint(ANTHROPIC_MESSAGES_URL if price.kind == "anthropic" else CHAT_URL)
    if price.kind == "anthropic":
        tokens, ttls = _anthropic_input(body)
        out = _anthropic_output(body, price)
        exact = False
    else:   # the OpenAI shape: openai, azure-openai
        tokens, out, ttls = _openai_input(body, price), _openai_output(body, price), ()
        exact = _openai_is_plain_text(body) and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in body["messages"])
    return finish_bound(price, tokens, out, exact, declared_input_tokens, ttls)


def finish_bound(price: ModelPrice, tokens: int, out: int, exact: bool,
                 declared_input_tokens: int | None = None, cache_ttls=(), *, one_prompt: bool = True) -> Bound:
    """The :class:`Bound` of counted ``tokens`` in and ``out`` at most: a declared count may
    raise the input, never lower it, and a prompt over the context window is refused
    (``one_prompt=False``: the caller checked each of several prompts against it)."""
    if declared_input_tokens is not None:
        if not isinstance(declared_input_tokens, int) or declared_input_tokens < 0:
            raise LineError(f"declared input tokens must be a non-negative integer, got {declared_input_tokens!r}")
        tokens = max(tokens, declared_input_tokens)
    if one_prompt and tokens > price.context_window:
        raise LineError(f"prompt is {tokens} tokens, over {price.model}'s context window of "
                        f"{price.context_window} tokens")
    return Bound(tokens, out, bound_cost(price, tokens, out, cache_ttls), exact)


def bound_cost(price: ModelPrice, input_tokens: int, output_tokens: int, cache_ttls=()) -> Decimal:
    """The cost of ``input_tokens`` at the most expensive input rate that can apply
    (base, or a cache write of a TTL in ``cache_ttls``), plus ``output_tokens``."""
    options = [Usage(input_tokens, output_tokens)]
    if "5m" in cache_ttls:
        options.append(Usage(input_tokens, output_tokens, cache_write_tokens=input_tokens))
    if "1h" in cache_ttls:
        options.append(Usage(input_tokens, output_tokens, cache_write_1h_tokens=input_tokens))
    return max(cost(price, u) for u in options)


# --------------------------------------------------------------------------- output

def _positive(body: dict, key: str, limit: int, model: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        shown = f" ({value!r})" if isinstance(value, (float, str)) and len(repr(value)) < 40 else ""
        kind = {str: "a string", float: "a number", list: "an array", dict: "an object",
                bool: "a boolean"}.get(type(value), type(value).__name__)
        raise LineError(f"{key} must be an integer, got {kind}{shown}")
    if value <= 0:
        raise LineError(f"{key} must be at least 1, got {value}")
    if value > limit:
        raise LineError(f"{key} is {value}, over {model}'s output limit of {limit} tokens")
    return value


def _openai_output(body: dict, price: ModelPrice) -> int:
    limits = [v for v in (_positive(body, "max_completion_tokens", price.max_output_tokens, price.model),
                          _positive(body, "max_tokens", price.max_output_tokens, price.model)) if v]
    per_choice = max(limits) if limits else price.max_output_tokens
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise LineError(f"n must be an integer from 1 to {MAX_N}, got {n!r}"[:200])
    return per_choice * n


def _anthropic_output(body: dict, price: ModelPrice) -> int:
    if body.get("max_tokens") is None:
        raise LineError("missing field params.max_tokens")
    out = _positive(body, "max_tokens", price.max_output_tokens, price.model)
    thinking = body.get("thinking")
    if thinking is not None:
        kind = thinking.get("type") if isinstance(thinking, dict) else None
        if kind == "enabled":
            budget = thinking.get("budget_tokens")
            if not isinstance(budget, int) or isinstance(budget, bool) or not MIN_THINKING_BUDGET <= budget < out:
                raise LineError(f"thinking.budget_tokens must be an integer from {MIN_THINKING_BUDGET} to "
                                f"max_tokens - 1 ({out - 1}), got {budget!r}"[:200])
        elif kind not in ("disabled", "adaptive"):
            raise LineError(f"thinking.type must be enabled, adaptive or disabled, got {kind!r}"[:200])
    return out   # thinking tokens are output tokens within max_tokens


# --------------------------------------------------------------------------- schemas

def _json_tokens(value, count) -> int:
    return count(json.dumps(value, ensure_ascii=False, sort_keys=True))


def schema_tokens(value, count) -> int:
    """The bound for one schema-like item: its JSON tokens with the documented margin."""
    raw = _json_tokens(value, count)
    return -(-raw * SCHEMA_MARGIN_NUM // SCHEMA_MARGIN_DEN) + SCHEMA_ITEM_OVERHEAD


# --------------------------------------------------------------------------- images

def image_size(data: str | bytes) -> tuple[int, int] | None:
    """Width and height from a PNG, GIF or JPEG header, or None when unreadable."""
    if isinstance(data, str):
        head = data.split(",", 1)[1] if data.startswith("data:") and "," in data else data
        try:
            data = base64.b64decode(head[:65536 - 65536 % 4], validate=False)
        except (binascii.Error, ValueError):
            return None
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
    elif data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        w, h = struct.unpack("<HH", data[6:10])
    elif data[:2] == b"\xff\xd8":
        w = h = 0
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            length = struct.unpack(">H", data[i + 2:i + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                break
            i += 2 + length
    else:
        return None
    return (w, h) if w > 0 and h > 0 else None


def openai_image_tokens(price: ModelPrice, size: tuple[int, int] | None, detail: str) -> int:
    """OpenAI's published formula for one image on ``price``'s model.

    Tile models (``image_base``/``image_tile``): low detail = base; otherwise
    fit in 2048 × 2048, shortest side scaled down to 768, base + tile per
    512-px tile. Patch models (``image_patch_multiplier``): 32-px patches, at
    most 1,536, × the multiplier; ``detail`` has no effect there, so the bound
    is the cap. Unknown size: the maximum for the detail.
    """
    if price.image_patch_multiplier is not None:
        return math.ceil(OPENAI_MAX_PATCHES * price.image_patch_multiplier)
    base, tile = price.image_base, price.image_tile
    if detail == "low":
        return base
    if size is None:
        return base + tile * OPENAI_MAX_TILES
    w, h = size
    scale = min(1.0, 2048 / max(w, h))
    w, h = w * scale, h * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    tiles = min(math.ceil(w / 512 - 1e-9), 4) * min(math.ceil(h / 512 - 1e-9), 4)
    return base + tile * min(tiles, OPENAI_MAX_TILES)


def anthropic_image_tokens(size: tuple[int, int] | None) -> int:
    """Anthropic's published rule: (w × h) / 750, the image scaled down first when its long
    edge is over 1,568 px or it is over ~1,600 tokens; unknown size: the maximum."""
    if size is None:
        return ANTHROPIC_IMAGE_MAX
    w, h = size
    return min(math.ceil(w * h / 750), ANTHROPIC_IMAGE_MAX)


def openai_image_part(price: ModelPrice, url, detail, where: str, needs: str) -> int:
    """The bound of one OpenAI image part at ``url`` (a ``data:`` URL is measured; any other
    reference is the maximum for the detail); ``needs`` says what a part lacking ``url`` misses."""
    if price.image_base is None and price.image_patch_multiplier is None:
        raise LineError(f"{where}: {price.model} does not take image input")
    if not isinstance(url, str) or detail not in ("auto", "low", "high"):
        raise LineError(f"{where}: {needs} and detail auto, low or high")
    size = image_size(url) if url.startswith("data:") else None
    return TOKENS_PER_IMAGE + openai_image_tokens(price, size, detail)


def content_tokens(value, where: str, count, parts: dict, priced: str, *, shape: str = "a string or an array",
                   null_ok: bool = True, each=None) -> int:
    """The input bound of one message's content, the one walk over content parts every API shares.

    A string is ``count``ed whole (None is nothing when ``null_ok``); an array is walked part by
    part: ``parts`` maps a part's ``type`` to its bound, ``(part, where) -> tokens``, or None when
    the part lacks what makes it countable. A part of any other type (or one that is not an
    object) is refused, naming what is ``priced``; ``each(part, where)`` sees every part first
    (Anthropic's ``cache_control``). ``shape`` says what the content must be when it is neither.
    """
    if value is None and null_ok:
        return 0
    if isinstance(value, str):
        return count(value)
    if not isinstance(value, list):
        raise LineError(f"{where} must be {shape}")
    n = 0
    for j, part in enumerate(value):
        at = f"{where}[{j}]"
        if each is not None:
            each(part, at)
        kind = part.get("type") if isinstance(part, dict) else None
        tokens = parts[kind](part, at) if isinstance(kind, str) and kind in parts else None
        if tokens is None:
            raise LineError(f"{at} of type {kind!r} cannot be bounded ({priced})"[:300])
        n += tokens
    return n


def text_part(field: str, count):
    """The bound of a part whose text is in ``field``: one token for the part, and its text."""
    def bound(part: dict, where: str) -> int | None:
        return TOKENS_PER_PART + count(part[field]) if isinstance(part.get(field), str) else None
    return bound


# --------------------------------------------------------------------------- OpenAI input

def _openai_input(body: dict, price: ModelPrice) -> int:
    model = price.model
    name = encoding_name_for(body["model"]) or encoding_name_for(model) or price.encoding
    if name is None:
        raise UnknownModelError(f"no tiktoken encoding known for OpenAI model {model!r} "
                                f"(a provider's own model: give its price entry an encoding)")
    encode = get_encoding(name).encode_ordinary

    def count(text: str) -> int:
        return len(encode(text))

    for key, why in _OPENAI_REJECTED.items():
        if body.get(key) is not None:
            raise LineError(f"body.{key} cannot be bounded: {why}")
    if body.get("modalities") not in (None, ["text"]):
        raise LineError(f"body.modalities {body['modalities']!r} cannot be bounded: only text output is priced")
    if body.get("service_tier") not in (None, "auto", "default", "flex"):
        raise LineError(f"service_tier {body['service_tier']!r} is not priced in the price book")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise LineError("body.messages must be a non-empty array")
    n = REPLY_PRIMING
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise LineError(f"messages[{i}] must be an object")
        n += TOKENS_PER_MESSAGE
        for key, value in msg.items():
            if key == "content":
                n += _openai_content(value, price, count, i)
            elif key in ("tool_calls", "function_call"):
                n += schema_tokens(value, count)
            elif key == "audio" and value is not None:
                raise LineError(f"messages[{i}].audio cannot be bounded")
            elif isinstance(value, str):
                n += count(value) + (TOKENS_PER_NAME if key == "name" else 0)
            elif value is not None:
                n += schema_tokens(value, count)
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise LineError("body.tools must be an array")
        for j, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type", "function") != "function":
                kind = tool.get("type") if isinstance(tool, dict) else tool
                raise LineError(f"tools[{j}] of type {kind!r} cannot be bounded: only function tools are priced")
            n += schema_tokens(tool, count)
    functions = body.get("functions")
    if functions is not None:
        if not isinstance(functions, list):
            raise LineError("body.functions must be an array")
        n += sum(schema_tokens(f, count) for f in functions)
    if tools or functions:
        n += OPENAI_TOOLS_OVERHEAD
        if body.get("tool_choice") is not None:
            n += schema_tokens(body["tool_choice"], count)
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise LineError(f"response_format {fmt!r} cannot be bounded"[:200])
        n += schema_tokens(fmt, count)
    return n


def _openai_content(value, price: ModelPrice, count, i: int) -> int:
    def image(part: dict, where: str) -> int:
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        detail = image.get("detail", "auto") if isinstance(image, dict) else "auto"
        return openai_image_part(price, url, detail, where, "image_url needs a url")

    return content_tokens(value, f"messages[{i}].content", count,
                          {"text": text_part("text", count), "refusal": text_part("refusal", count),
                           "image_url": image}, "text and image_url parts are priced")


# --------------------------------------------------------------------------- Anthropic input

_TTLS = {None: "5m", "5m": "5m", "1h": "1h"}


def _cache_ttl(block: dict, where: str, ttls: set) -> None:
    cc = block.get("cache_control")
    if cc is None:
        return
    if not isinstance(cc, dict) or cc.get("type") != "ephemeral" or cc.get("ttl") not in _TTLS:
        raise LineError(f"{where}.cache_control must be {{\"type\": \"ephemeral\"}} with ttl 5m or 1h, "
                        f"got {cc!r}"[:200])
    ttls.add(_TTLS[cc.get("ttl")])


def _anthropic_blocks(value, where: str, ttls: set) -> int:
    def block(part, at: str) -> None:
        if not isinstance(part, dict):
            raise LineError(f"{at} must be a content block object")
        _cache_ttl(part, at, ttls)

    def image(part: dict, at: str) -> int:
        src = part.get("source")
        if not isinstance(src, dict) or src.get("type") not in ("base64", "url"):
            raise LineError(f"{at}: an image source must be base64 or url")
        size = image_size(src.get("data", "")) if src.get("type") == "base64" else None
        return TOKENS_PER_IMAGE + anthropic_image_tokens(size)

    count = estimate_claude_text
    return content_tokens(value, where, count, {
        "text": text_part("text", count), "image": image,
        "tool_use": lambda part, at: schema_tokens({"name": part.get("name"), "input": part.get("input")}, count),
        "tool_result": lambda part, at: SCHEMA_ITEM_OVERHEAD + _anthropic_blocks(part.get("content"),
                                                                                 f"{at}.content", ttls),
        "thinking": text_part("thinking", count), "redacted_thinking": text_part("data", count),
    }, "text, image, tool_use, tool_result and thinking blocks are priced",
        shape="a string or an array of content blocks", each=block)


def anthropic_input_tokens(body: dict) -> int:
    """The input-token bound of an Anthropic messages body (any Claude model)."""
    return _anthropic_input(body)[0]


def _anthropic_input(body: dict) -> tuple[int, tuple[str, ...]]:
    for key, why in _ANTHROPIC_REJECTED.items():
        if body.get(key) is not None:
            raise LineError(f"params.{key} cannot be bounded: {why}")
    if body.get("service_tier") not in (None, "auto", "standard_only"):
        raise LineError(f"service_tier {body['service_tier']!r} is not priced in the price book")
    ttls: set[str] = set()
    _cache_ttl(body, "params", ttls)   # automatic caching: a write at the last cacheable block
    n = REPLY_PRIMING
    system = body.get("system")
    if system:
        n += ANTHROPIC_TOKENS_PER_MESSAGE + _anthropic_blocks(system, "params.system", ttls)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise LineError("params.messages must be a non-empty array")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise LineError(f"params.messages[{i}] must be an object")
        n += ANTHROPIC_TOKENS_PER_MESSAGE + _anthropic_blocks(msg.get("content"), f"params.messages[{i}].content",
                                                              ttls)
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise LineError("params.tools must be an array")
        for j, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
                kind = tool.get("type") if isinstance(tool, dict) else tool
                raise LineError(f"params.tools[{j}] of type {kind!r} cannot be bounded: "
                                f"only custom (client) tools are priced"[:200])
            _cache_ttl(tool, f"params.tools[{j}]", ttls)
            n += schema_tokens({k: v for k, v in tool.items() if k != "cache_control"}, estimate_claude_text)
        if tools:
            n += ANTHROPIC_TOOL_PROMPT
            if body.get("tool_choice") is not None:
                n += schema_tokens(body["tool_choice"], estimate_claude_text)
    return n, tuple(sorted(ttls))
