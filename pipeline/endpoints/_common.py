"""What several endpoints share: the body's shape, integer fields, token lists, usage.

Private to :mod:`pipeline.endpoints`; every reason names the field it is about.
"""

from __future__ import annotations

from pipeline.errors import LineError
from pipeline.money.pricing import ModelPrice, Usage, usage_from_openai
from pipeline.money.tokens import encoding_name_for, get_encoding

_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
          float: "a number", type(None): "null"}


def kind(value) -> str:
    return _KINDS.get(type(value), type(value).__name__)


def require_model(body, where: str = "body.") -> str:
    """The body's ``model``; LineError when the body is not an object or names no model."""
    if not isinstance(body, dict):
        raise LineError(f"the request body must be an object, got {kind(body)}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise LineError(f"{where}model must be a model name, got {kind(model)}")
    return model


def check_body(body, url: str, allowed: frozenset[str], rejected: dict[str, str] | None = None,
               required: tuple[str, ...] = ()) -> None:
    """A body of ``url``: it names its model, holds the ``required`` fields, and only fields
    llmbatch can price (see :func:`check_fields`)."""
    require_model(body)
    check_fields(body, allowed, rejected or {}, url)
    for key in required:
        if key not in body:
            raise LineError(f"missing field body.{key}")


def check_fields(body: dict, allowed: frozenset[str], rejected: dict[str, str], url: str) -> None:
    """Refuse fields whose price is not a function of the body (``rejected``: field → why),
    and fields this endpoint does not know: an unknown field may be a priced feature."""
    for key, why in rejected.items():
        if body.get(key) not in (None, False):
            raise LineError(f"body.{key} cannot be bounded: {why}")
    unknown = sorted(k for k in body if k not in allowed and k not in rejected)
    if unknown:
        raise LineError(f"body.{unknown[0]} is not a {url} field llmbatch can price "
                        f"(known: {', '.join(sorted(allowed))})"[:300])


def int_field(body: dict, key: str, low: int, high: int, default: int | None) -> int | None:
    """An integer field from ``low`` to ``high``, or ``default`` when absent or null."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise LineError(f"body.{key} must be an integer from {low} to {high}, got {value!r}"[:200])
    return value


def encoder(body: dict, price: ModelPrice):
    """``(encode, vocabulary size)`` of the model's tiktoken encoding (the body's name, else the
    price book's canonical one)."""
    name = encoding_name_for(body["model"]) or encoding_name_for(price.model) or price.encoding
    if name is None:
        raise LineError(f"no tiktoken encoding known for model {price.model!r}")
    enc = get_encoding(name)
    return enc.encode_ordinary, enc.n_vocab


def token_items(value, field: str, encode, n_vocab: int) -> list[int | str]:
    """The items of an OpenAI "string, array of strings, array of tokens, or array of token
    arrays" field, each as its token count (token arrays: their length) or, for a string,
    the string itself for the caller to count. A flat array of integers is one item."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise LineError(f"body.{field} must be a string or a non-empty array, got "
                        f"{'an empty array' if value == [] else kind(value)}")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return [_token_array(value, field, n_vocab)]
    items: list[int | str] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            items.append(item)
        elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            items.append(_token_array(item, f"{field}[{i}]", n_vocab))
        else:
            raise LineError(f"body.{field}[{i}] must be a string or a non-empty array of token ids, "
                            f"got {kind(item)}; one array cannot mix strings and tokens")
    return items


def _token_array(tokens: list[int], field: str, n_vocab: int) -> int:
    bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise LineError(f"body.{field} holds token id {bad}, outside the encoding's 0 to {n_vocab - 1}")
    return len(tokens)


def openai_usage(response_body) -> Usage | None:
    """The usage of an OpenAI response body, or None when it reports none."""
    usage = response_body.get("usage") if isinstance(response_body, dict) else None
    return usage_from_openai(usage) if isinstance(usage, dict) else None
