"""Input lines → canonical requests.

Two line formats are accepted, detected per line:

* OpenAI Batch API: ``{"custom_id", "method": "POST", "url": URL, "body": {...}}``, the url one
  of the OpenAI-format endpoints of :data:`pipeline.endpoints.ENDPOINTS` (chat completions,
  responses, embeddings, completions, moderations);
* Anthropic Message Batches: ``{"custom_id", "params": {"model", "max_tokens", "messages", ...}}``
  (the endpoint ``/v1/messages``).

The endpoint validates and bounds the body (pipeline/endpoints/); this module reads the line
around it.

plus optional pipeline fields on any line: ``priority`` (0–9), ``tier``,
``deadline`` (ISO 8601), ``metadata`` (object), ``cache`` (bool).

Every problem raises ``LineError`` with a reason a person understands; the
caller records it with the line number and goes on with the next line. This
module never touches Kafka or Postgres.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal

from pipeline.constants import TIERS
from pipeline.endpoints import ENDPOINTS
from pipeline.endpoints.chat import MESSAGES
from pipeline.errors import LineError, UnknownModelError
from pipeline.ids import refuse_control
from pipeline.money.pricing import PriceBook

#: the urls an OpenAI Batch API line may name
OPENAI_URLS = tuple(url for url, e in ENDPOINTS.items() if e.line_format == "openai")
ANTHROPIC_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_CUSTOM_ID = 512
PIPELINE_FIELDS = {"priority", "tier", "deadline", "metadata", "cache"}


@dataclass(frozen=True)
class Request:
    """One validated request, ready to publish."""

    custom_id: str
    provider: str          # a provider of the registry (pipeline/providers/registry.py)
    model: str
    body: dict             # the provider's own request body
    endpoint: str          # the url it is sent to (pipeline.endpoints.ENDPOINTS)
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
        value = json.loads(raw, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        if e.pos >= len(raw) or e.msg.startswith("Unterminated string"):
            raise LineError(f"not valid JSON: the line ends at column {len(raw) + 1} before the JSON "
                            f"is complete (truncated?)") from e
        raise LineError(f"not valid JSON: {e.msg.removesuffix(' at')} at column {e.colno}") from e
    except RecursionError as e:
        raise LineError("not usable JSON: arrays or objects are nested too deeply") from e
    if not isinstance(value, dict):
        raise LineError(f"expected a JSON object, got {_type_name(value)}")
    if SUSPECT_ESCAPE.search(raw):
        check_values(value)
    return value


def _no_constant(name: str):
    # Python's json reads NaN and Infinity, but they are not JSON: Postgres (jsonb)
    # and the providers refuse them, so such a line must stop here.
    raise LineError(f"not valid JSON: {name} is not a JSON number")


#: escapes that decode to characters Postgres jsonb or UTF-8 cannot store
SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")


#: deeper than any request body needs (content parts, tool schemas), far below Python's recursion
#: limit; deeper lines and messages are refused
MAX_DEPTH = 64


def check_values(root) -> None:
    """Reject what JSON allows but the pipeline cannot store: NUL characters and unpaired
    surrogates (from ``\\u0000``, ``\\ud800`` escapes), non-finite numbers, deep nesting.

    One walk for submit's lines and the batcher's messages, so both refuse with the same words.
    """
    stack = [(root, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                raise LineError(f"not usable JSON: nested more than {MAX_DEPTH} deep")
            if isinstance(v, dict):
                stack.extend((k, depth) for k in v)
                v = v.values()
            stack.extend((x, depth + 1) for x in v)
        elif isinstance(v, str):
            if "\x00" in v:
                raise LineError("a string contains the NUL character (\\u0000), which Postgres cannot store")
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise LineError(f"a string contains an unpaired UTF-16 surrogate "
                                f"({v[e.start]!r}), which is not valid Unicode") from e
        elif isinstance(v, float) and not math.isfinite(v):
            raise LineError("a number is too large to be finite (e.g. 1e400)")


def _require(obj: dict, key: str, kind, where: str):
    if key not in obj:
        raise LineError(f"missing field {where}{key}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = {str: "a string", dict: "an object", list: "an array", int: "an integer"}
        raise LineError(f"field {where}{key} must be {names.get(kind, kind)}, got {_type_name(value)}")
    return value


def pipeline_fields(obj: dict) -> dict:
    """The optional pipeline fields of a line (``PIPELINE_FIELDS``), checked; also what the HTTP API
    reads from a batch's ``llmbatch_*`` metadata (pipeline/api/shapes.py)."""
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
    refuse_control(cid, "custom_id")   # before the pattern: the reason names the character
    if pattern is not None and not pattern.match(cid):
        raise LineError(f"custom_id {cid!r} must match {pattern.pattern} (Anthropic's rule)")
    return cid


def parse_request(obj: dict, prices: PriceBook, anthropic_counter=None) -> Request:
    """Validate a decoded line of either format and price it.

    The line's endpoint validates the body and bounds it (``Endpoint.bound``,
    the rule the batcher applies again). ``anthropic_counter(body) -> int``,
    when given (an Anthropic key is set), is Anthropic's own count_tokens
    endpoint: it can raise the input count above the estimate, never lower it.
    """
    if "custom_id" not in obj and isinstance(obj.get("requests"), list):
        raise LineError("this line is a whole batch ({\"requests\": [...]}): put one request per line, "
                        "each {\"custom_id\", \"params\"} or {\"custom_id\", \"method\", \"url\", \"body\"}")
    if "params" in obj and "body" not in obj:
        line_format, endpoint = "anthropic", MESSAGES
        cid = _custom_id(obj, ANTHROPIC_CUSTOM_ID)
        body = _require(obj, "params", dict, "")
        where = "params."
    else:
        line_format = "openai"
        cid = _custom_id(obj, None)
        if "method" not in obj and "url" not in obj and "body" not in obj:
            raise LineError("missing fields method, url and body: an OpenAI line is {\"custom_id\", "
                            "\"method\": \"POST\", \"url\": \"/v1/chat/completions\", \"body\": {...}}; "
                            "an Anthropic line is {\"custom_id\", \"params\": {...}}")
        method = obj.get("method")
        if method != "POST":
            raise LineError(f"method must be \"POST\", got {method!r}")
        url = obj.get("url")
        if url not in OPENAI_URLS:
            raise LineError(f"url must be one of {', '.join(OPENAI_URLS)}, got {url!r}"[:300])
        endpoint = ENDPOINTS[url]
        body = _require(obj, "body", dict, "")
        where = "body."
    model = _require(body, "model", str, where)
    endpoint.validate(body)
    try:
        price = prices.resolve(model)   # "together/llama": that provider's; else the one provider serving it
    except UnknownModelError as e:
        raise UnknownModelError(e.reason, custom_id=cid) from None
    provider = price.provider
    if (price.kind == "anthropic") != (line_format == "anthropic"):
        fmt = "Anthropic (custom_id, params)" if price.kind == "anthropic" else "OpenAI (custom_id, method, url, body)"
        raise LineError(f"model {model} is served by {price.provider}: use the {fmt} line format")
    if model != price.model and model.startswith(price.provider + "/"):
        model = model[len(price.provider) + 1:]   # the provider is told its own model id
        body = {**body, "model": model}
    bound = endpoint.bound(body, price)   # first: a line that cannot be bounded costs no call
    declared = None
    # Anthropic's own count_tokens: the counter is the provider named anthropic's (its key, its models)
    if provider == "anthropic" and anthropic_counter is not None:
        declared = anthropic_counter(body)
        bound = endpoint.bound(body, price, declared_input_tokens=declared)
    return Request(
        custom_id=cid, provider=provider, model=model, body=body, endpoint=endpoint.url,
        input_tokens=bound.input_tokens,
        tokens_exact=bound.tokens_exact or (declared is not None and bound.input_tokens == declared),
        max_tokens=bound.max_output_tokens, max_cost_usd=bound.max_cost_usd,
        **pipeline_fields(obj),
    )

