"""A Kafka request message → a ``requests`` row, or a ``LineError`` saying why not.

Every message on ``llm.requests`` and ``llm.requests.immediate`` passes here
before anything else touches it, in this order:

1. ``parse``: strict UTF-8 and JSON (no ``NaN``/``Infinity``, no number that
   is not finite, nesting at most ``MAX_DEPTH`` deep, checked without
   recursion; no NUL character or unpaired surrogate in any string: Postgres
   jsonb refuses them, and one such message used to fail a whole flush). The
   walk over every value (``formats.check_values``) runs only when the text
   could hold what it looks for: a ``\\u`` escape of a NUL or a surrogate, or
   more brackets than ``MAX_DEPTH``; a number that is not finite is refused as
   it is read;
2. ``validate``: the published JSON Schema (``pipeline/data/request.schema.json``)
   with its format checker (RFC 3339 date-times, UTC offset required). A
   compiled validator (jsonschema-rs, about 100 times faster than jsonschema's
   for this schema) answers first; only a message it refuses, or one with a
   float where the schema wants an integer, is checked again by jsonschema,
   which decides and names the field. Either way the verdict is jsonschema's;
3. ``to_row``: the maximum cost is recomputed from the price book by the
   message's endpoint (``endpoint``, the url; chat or Anthropic messages when
   absent): ``Endpoint.bound``. The producer's ``max_cost_usd`` is a hint at
   most and is never what is stored or reserved; the path (``mode``) is
   asked whether it serves the request (pipeline/paths/registry.py ``path_of``).

This module never touches Kafka, Redis or Postgres, and never lets an
exception other than ``LineError`` out of ``decode``'s data checks: the
batcher dead-letters a message on any exception anyway, but the reason
should be one a person reads.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from importlib import resources

import jsonschema
import jsonschema_rs
from jsonschema import Draft202012Validator

from pipeline.constants import EMBEDDINGS_URL
from pipeline.endpoints import endpoint_of
from pipeline.endpoints.caching import cache_key
from pipeline.errors import LineError, UnknownModelError
from pipeline.ids import refuse_control
from pipeline.intake.formats import SUSPECT_ESCAPE, MAX_DEPTH, check_values
from pipeline.intake.tiers import TierRules, classify
from pipeline.money.pricing import PriceBook, get_price_book
from pipeline.paths.base import check_serves
from pipeline.paths.registry import AUTO, choose_path
from pipeline.request import Request

#: a reason longer than this is cut: it goes into a Kafka header and a log line
MAX_REASON = 300
SUPPORTED_VERSION = 1
#: deterministic, yet cached only when a line asks (``"cache": true``): an embedding answer is
#: kilobytes of vector in Redis, the Celery broker, which never evicts (20,000 cached answers of
#: the simulator took 194 MB), to save a few millionths of a dollar each
CACHED_ON_REQUEST = (EMBEDDINGS_URL,)


def _strict_integer(checker, instance) -> bool:
    # JSON Schema calls 5.0 an integer; Postgres' integer columns do not take it
    return isinstance(instance, int) and not isinstance(instance, bool)


@functools.cache
def _schema() -> dict:
    return json.loads(resources.files("pipeline").joinpath("data/request.schema.json").read_text())


@functools.cache
def validator() -> Draft202012Validator:
    """The reference: jsonschema, whose verdict and words every refusal carries."""
    schema = _schema()
    Draft202012Validator.check_schema(schema)
    checker = Draft202012Validator.TYPE_CHECKER.redefine("integer", _strict_integer)
    cls = jsonschema.validators.extend(Draft202012Validator, type_checker=checker)
    return cls(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


@functools.cache
def _fast():
    """``(is_valid, integer fields)``: the compiled validator and the top-level fields the schema
    types as integers (JSON Schema calls 5.0 an integer, the reference does not)."""
    schema = _schema()
    ints = tuple(name for name, prop in schema.get("properties", {}).items()
                 if "integer" in (prop.get("type") if isinstance(prop.get("type"), list) else [prop.get("type")]))
    # the reference's own format checks, not the compiled ones: they differ at the edges (year 0000
    # is a date-time to jsonschema-rs, not to RFC 3339), and the fast path must never admit more
    checker = Draft202012Validator.FORMAT_CHECKER
    formats = {name: functools.partial(checker.conforms, format=name) for name in _formats(schema)}
    return jsonschema_rs.validator_for(schema, formats=formats, validate_formats=True).is_valid, ints


def _formats(node) -> set[str]:
    """Every ``format`` the schema names."""
    if isinstance(node, dict):
        return ({node["format"]} if isinstance(node.get("format"), str) else set()).union(
            *(_formats(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_formats(v) for v in node))
    return set()


def _cut(text: str) -> str:
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 1] + "…"


def _no_constant(name: str):
    raise LineError(f"not valid JSON: {name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise LineError("a number is too large to be finite (e.g. 1e400)")
    return value


def parse(value: bytes | None) -> dict:
    """Strict JSON of one message; raises ``LineError``."""
    if value is None:
        raise LineError("empty message (no value)")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LineError(f"not valid UTF-8 (byte {e.start})") from e
    try:
        m = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except json.JSONDecodeError as e:
        raise LineError(_cut(f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")) from e
    except RecursionError as e:   # the C decoder's own guard, far deeper than MAX_DEPTH
        raise LineError(f"not usable JSON: nested more than {MAX_DEPTH} deep") from e
    except ValueError as e:       # e.g. an integer of more than 4,300 digits
        raise LineError(_cut(f"not usable JSON: {e}")) from e
    if not isinstance(m, dict):
        raise LineError(f"message is not a JSON object but {type(m).__name__}")
    # strict JSON has no raw control character in a string, and valid UTF-8 no surrogate:
    # a NUL or a lone surrogate can only come from an escape; nesting needs brackets
    if SUSPECT_ESCAPE.search(text) or text.count("[") + text.count("{") > MAX_DEPTH:
        check_values(m)
    return m


def validate(m: dict) -> None:
    """The JSON Schema, with formats; raises ``LineError`` naming the field.

    An id with a control character is refused first, in the words submit uses:
    it would reach headers, Redis keys and log lines (pipeline/ids.py).
    """
    for name in ("job_id", "custom_id"):
        if isinstance(m.get(name), str):
            refuse_control(m[name], name)
    is_valid, ints = _fast()
    try:
        if is_valid(m) and not any(isinstance(m.get(name), float) for name in ints):
            return
    except Exception:   # a value the compiled validator cannot take (an integer past 64 bits): ask the reference
        pass
    error = jsonschema.exceptions.best_match(validator().iter_errors(m))
    if error is None:
        return
    where = "/".join(str(p) for p in error.absolute_path) or "message"
    message = error.message
    if error.validator == "format":
        message = f"{_cut(repr(error.instance))} is not an RFC 3339 {error.validator_value} (with a UTC offset)"
    raise LineError(_cut(f"{where}: {message}"))


def _timestamp(value: str | None, field: str) -> datetime | None:
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError as e:
        raise LineError(_cut(f"{field}: {value!r} is not a usable date-time: {e}")) from e
    if t.tzinfo is None:   # the schema's format check already refuses this
        raise LineError(f"{field}: {value!r} has no UTC offset")
    return t


def to_row(m: dict, now: datetime, prices: PriceBook, *, offpeak_opens: datetime | None = None,
           rules: TierRules | None = None) -> dict:
    """A validated message → a ``requests`` row (``batch_id`` still None).

    ``offpeak_opens``/``rules``: the window's next opening and the deadline margin, so a
    deadline is classified against the window (pipeline/intake/tiers.py ``classify``)."""
    if m["v"] != SUPPORTED_VERSION:
        raise LineError(f"unsupported message version {m['v']!r} (this batcher reads v {SUPPORTED_VERSION})")
    body = m["body"]
    if m["model"] != body["model"]:
        raise LineError(_cut(f"model {m['model']!r} differs from body.model {body['model']!r}"))
    price = prices.resolve(body["model"], m["provider"])   # that provider's entry (UnknownModelError)
    if price.provider != m["provider"]:
        raise UnknownModelError(f"model {body['model']} is served by {price.provider}, not {m['provider']}")
    endpoint = endpoint_of(m.get("endpoint"), price.kind)
    endpoint.validate(body)
    if endpoint.line_format != ("anthropic" if price.kind == "anthropic" else "openai"):
        raise LineError(_cut(f"endpoint {endpoint.url} is not one of provider {m['provider']}'s"))
    bound = endpoint.bound(body, price, declared_input_tokens=m["input_tokens"])
    deadline = _timestamp(m.get("deadline"), "deadline")
    published = _timestamp(m.get("published_at"), "published_at")
    tier, reason = classify(m.get("priority"), m.get("tier"), deadline, now, rules or TierRules(),
                            offpeak_opens=offpeak_opens)
    priority = m.get("priority")
    # the line's ``cache`` flag decides; without one, the endpoint (deterministic answers only)
    cacheable = (m["cache"] if m.get("cache") is not None
                 else endpoint.cacheable(body) and endpoint.url not in CACHED_ON_REQUEST)
    exact = bound.tokens_exact or (bound.input_tokens == m["input_tokens"] and m.get("tokens_exact", True))
    req = Request(
        job_id=m["job_id"], custom_id=m["custom_id"], endpoint=endpoint.url,
        provider=m["provider"], model=m["model"], path="", tier=tier, body=body,
        # recomputed, never the producer's: a reservation is only as good as this number
        bound=replace(bound, tokens_exact=bool(exact)),
        priority=priority if priority is not None else 5, deadline=deadline, metadata=m.get("metadata"),
        cache_key=cache_key(m["provider"], body, endpoint.url) if cacheable else None,
        line=m.get("line"), tier_reason=reason, published_at=published)
    # the path asked for (a body that asks for flex itself takes flex), or under ``auto`` the cheapest
    # that meets the deadline (pipeline/paths/chooser.py); then whether it can serve the request
    path, why = choose_path(m.get("mode") or AUTO, req, price, now, tier_opens=offpeak_opens,
                            margin=timedelta(seconds=(rules or TierRules()).deadline_margin_s))
    req = replace(req, path=path.name, path_reason=why)
    check_serves(path, req, price)
    return req.to_row(path.initial_status(tier))


def decode(value: bytes | None, now: datetime | None = None, prices: PriceBook | None = None, *,
           offpeak_opens: datetime | None = None, rules: TierRules | None = None) -> dict:
    """Parse, validate and price one message; raises ``LineError`` with the reason."""
    m = parse(value)
    validate(m)
    return to_row(m, now or datetime.now(timezone.utc), prices or get_price_book(),
                  offpeak_opens=offpeak_opens, rules=rules)
