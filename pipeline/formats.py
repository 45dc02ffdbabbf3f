"""Input lines → canonical requests.

Two line formats are accepted, detected per line:

* OpenAI Batch API: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``
* Anthropic Message Batches: ``{"custom_id", "params": {"model", "max_tokens", "messages", ...}}``

plus optional pipeline fields on any line: ``priority`` (0–9), ``tier``,
``deadline`` (ISO 8601), ``metadata`` (object), ``cache`` (bool).

Every problem raises ``LineError`` with a reason a person understands; the
caller records it with the line number and goes on with the next line. This
module never touches Kafka or Postgres.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal

from pipeline.constants import TIERS
from pipeline.errors import LineError, UnknownModelError
from pipeline.pricing import PriceBook, max_cost
from pipeline.tokens import count_request

OPENAI_URLS = ("/v1/chat/completions",)
ANTHROPIC_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_CUSTOM_ID = 512
ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
PIPELINE_FIELDS = {"priority", "tier", "deadline", "metadata", "cache"}


@dataclass(frozen=True)
class Request:
    """One validated request, ready to publish."""

    custom_id: str
    provider: str          # "openai" | "anthropic"
    model: str
    body: dict             # the provider's own request body
    input_tokens: int
    tokens_exact: bool
    max_tokens: int
    max_cost_usd: Decimal
    priority: int | None = None
    tier: str | None = None
    deadline: datetime | None = None
    metadata: dict | None = None
    cache: bool | None = None


def _type_name(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def parse_json_line(raw: bytes | str) -> dict:
    """Decode one line; raises LineError for anything but a JSON object."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LineError(f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from e
    raw = raw.lstrip("\ufeff").strip()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        if e.pos >= len(raw):
            raise LineError(f"not valid JSON: the line ends at column {e.colno} before the JSON "
                            f"is complete (truncated?)") from e
        raise LineError(f"not valid JSON: {e.msg} at column {e.colno}") from e
    if not isinstance(value, dict):
        raise LineError(f"expected a JSON object, got {_type_name(value)}")
    return value


def _require(obj: dict, key: str, kind, where: str):
    if key not in obj:
        raise LineError(f"missing field {where}{key}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = {str: "a string", dict: "an object", list: "an array", int: "an integer"}
        raise LineError(f"field {where}{key} must be {names.get(kind, kind)}, got {_type_name(value)}")
    return value


def _check_messages(messages: list, where: str) -> None:
    if not messages:
        raise LineError(f"field {where}messages must not be empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise LineError(f"{where}messages[{i}] must be an object, got {_type_name(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise LineError(f"{where}messages[{i}].role must be one of {', '.join(sorted(ROLES))}, got {role!r}")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise LineError(f"{where}messages[{i}].content must be a string or an array, got {_type_name(content)}")


def _pipeline_fields(obj: dict) -> dict:
    out: dict = {}
    if obj.get("priority") is not None:
        p = obj["priority"]
        if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p <= 9:
            raise LineError(f"priority must be an integer from 0 to 9, got {p!r}")
        out["priority"] = p
    if obj.get("tier") is not None:
        t = obj["tier"]
        if t == "off-peak":
            t = "offpeak"
        if t not in TIERS:
            raise LineError(f"tier must be one of {', '.join(TIERS)}, got {t!r}")
        out["tier"] = t
    if obj.get("deadline") is not None:
        d = obj["deadline"]
        try:
            parsed = datetime.fromisoformat(d) if isinstance(d, str) else None
        except ValueError:
            parsed = None
        if parsed is None:
            raise LineError(f"deadline must be an ISO 8601 date-time such as 2026-01-31T18:00:00Z, got {d!r}")
        out["deadline"] = parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    if obj.get("metadata") is not None:
        if not isinstance(obj["metadata"], dict):
            raise LineError(f"metadata must be an object, got {_type_name(obj['metadata'])}")
        out["metadata"] = obj["metadata"]
    if obj.get("cache") is not None:
        if not isinstance(obj["cache"], bool):
            raise LineError(f"cache must be true or false, got {obj['cache']!r}")
        out["cache"] = obj["cache"]
    return out


def _custom_id(obj: dict, pattern: re.Pattern | None) -> str:
    cid = _require(obj, "custom_id", str, "")
    if not cid or len(cid) > MAX_CUSTOM_ID:
        raise LineError(f"custom_id must be 1 to {MAX_CUSTOM_ID} characters")
    if pattern is not None and not pattern.match(cid):
        raise LineError(f"custom_id {cid!r} must match {pattern.pattern} (Anthropic's rule)")
    return cid


def _max_tokens(body: dict, key: str, limit: int, model: str, required: bool) -> int:
    if key not in body or body[key] is None:
        if required:
            raise LineError(f"missing field params.{key}")
        return limit
    value = body[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise LineError(f"{key} must be an integer, got {_type_name(value)}")
    if value <= 0:
        raise LineError(f"{key} must be at least 1, got {value}")
    if value > limit:
        raise LineError(f"{key} is {value}, over {model}'s output limit of {limit} tokens")
    return value


def parse_request(obj: dict, prices: PriceBook) -> Request:
    """Validate a decoded line of either format and price it."""
    if "params" in obj and "body" not in obj:
        provider = "anthropic"
        cid = _custom_id(obj, ANTHROPIC_CUSTOM_ID)
        body = _require(obj, "params", dict, "")
        where = "params."
    else:
        provider = "openai"
        cid = _custom_id(obj, None)
        method = obj.get("method")
        if method != "POST":
            raise LineError(f"method must be \"POST\", got {method!r}")
        url = obj.get("url")
        if url not in OPENAI_URLS:
            raise LineError(f"url must be one of {', '.join(OPENAI_URLS)}, got {url!r}")
        body = _require(obj, "body", dict, "")
        where = "body."
    model = _require(body, "model", str, where)
    messages = _require(body, "messages", list, where)
    _check_messages(messages, where)
    try:
        price = prices.resolve(model)
    except UnknownModelError as e:
        raise UnknownModelError(e.reason, custom_id=cid) from None
    if price.provider != provider:
        fmt = "Anthropic (custom_id, params)" if price.provider == "anthropic" else "OpenAI (custom_id, method, url, body)"
        raise LineError(f"model {model} is served by {price.provider}: use the {fmt} line format")
    if provider == "openai":
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        out_tokens = _max_tokens(body, key, price.max_output_tokens, model, required=False)
    else:
        if "system" in body and not isinstance(body["system"], (str, list)):
            raise LineError(f"params.system must be a string or an array, got {_type_name(body['system'])}")
        out_tokens = _max_tokens(body, "max_tokens", price.max_output_tokens, model, required=True)
    count = count_request(provider, model, body)
    if count.tokens > price.context_window:
        raise LineError(f"prompt is {count.tokens} tokens, over {model}'s context window of "
                        f"{price.context_window} tokens")
    return Request(
        custom_id=cid, provider=provider, model=model, body=body,
        input_tokens=count.tokens, tokens_exact=count.exact, max_tokens=out_tokens,
        max_cost_usd=max_cost(price, count.tokens, out_tokens),
        **_pipeline_fields(obj),
    )
