"""Prices as data, and exact cost arithmetic.

The price book is ``pipeline/data/pricing.json`` (shipped in the package); a
user file of the same shape (``pricing_file`` setting) adds models or
overrides fields of existing ones without touching the package. Prices are
USD per 1M tokens, kept as exact decimal strings and read into ``Decimal``;
costs are exact ``Decimal`` USD, never rounded, never touched by a float.

File shape::

    {"models": {"gpt-4o": {"provider": "openai", "input": "2.50", "cached_input": "1.25",
                           "output": "10.00", "batch_discount": "0.5",
                           "context_window": 128000, "max_output_tokens": 16384,
                           "aliases": ["gpt-4o-2024-08-06"], "effective_date": "2026-11-23",
                           "source": "https://…"}}}

Optional per model: ``cache_write`` and ``cache_write_1h`` (Anthropic 5-minute
and 1-hour prompt-cache write prices; cache writes without them are priced at
the base input price), ``image_base`` + ``image_tile`` or
``image_patch_multiplier`` (OpenAI image input: tile or patch formula; an
OpenAI model with neither takes no images), ``endpoints`` (the request urls the model
serves; default: chat completions and responses for OpenAI, messages for Anthropic),
``dimensions`` (embedding models: the vector's length, the default and the most
``dimensions`` may ask for), ``flex`` (true: the model takes ``service_tier: "flex"``,
billed at the batch price; pipeline/paths/flex.py), ``encoding`` (the tiktoken vocabulary
that counts a model of an OpenAI-compatible provider whose own tokenizer tiktoken does not
know), ``batch`` (the Batch API that takes the model: ``"openai"`` (OpenAI's file format),
``"anthropic"`` (Message Batches) or ``"none"``; default: its provider kind's own, OpenAI's for
OpenAI-shaped kinds), ``batch_limits`` (``{"max_requests", "max_bytes"}`` of one provider batch;
default: the book's ``batch_limits`` for its batch format), ``min_cache_tokens`` (the shortest prompt
prefix the provider caches; below it a request is served uncached, silently), ``windows``
(time-of-day prices: pipeline/money/price_windows.py), ``limits_source``, ``note``. In a user file, an entry
for a model already known is merged field by field over it, so
``{"models": {"gpt-4o": {"input": "2.00"}}}`` changes one price.

Providers: every model belongs to one provider of the registry
(pipeline/providers/registry.py), named by ``provider``. The same model id served by
two providers is two entries, named ``provider/model``
(``"together/meta-llama-3.1-70b"``). A request may name a model qualified
(``together/meta-llama-3.1-70b``: that provider's) or not: an unqualified name
served by one provider is that provider's, one served by several is refused as
ambiguous, naming the candidates (``resolve``).
"""

from __future__ import annotations

import decimal
import difflib
import functools
import json
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from pathlib import Path

from pipeline.constants import (ANTHROPIC_MESSAGES_URL, CHAT_URL, EMBEDDINGS_URL, ENDPOINT_URLS,
                                MODERATIONS_URL, RESPONSES_URL)
from pipeline.errors import ConfigError, LineError, UnknownModelError
from pipeline.money.price_windows import PriceWindow, multiplier_at, parse_windows

_MTOK = Decimal(1_000_000)
#: what a model serves when its entry names no ``endpoints``, by its provider's kind
DEFAULT_ENDPOINTS = {"openai": (CHAT_URL, RESPONSES_URL), "azure-openai": (CHAT_URL, RESPONSES_URL),
                     "anthropic": (ANTHROPIC_MESSAGES_URL,)}
#: the providers and kinds a price book is read against when it is given none (the defaults)
DEFAULT_KINDS = {"openai": "openai", "anthropic": "anthropic"}
ENCODINGS = ("o200k_base", "cl100k_base")
#: endpoints that generate no output tokens: a model serving only these may have max_output_tokens 0
_NO_OUTPUT = {EMBEDDINGS_URL, MODERATIONS_URL}
#: the Batch API formats a model may name, and the one a kind has when its entry names none
BATCH_FORMATS = ("openai", "anthropic")
DEFAULT_BATCH = {"openai": "openai", "azure-openai": "openai", "anthropic": "anthropic"}
_REQUIRED = ("provider", "input", "cached_input", "output", "batch_discount",
             "context_window", "max_output_tokens", "effective_date", "source")


@dataclass(frozen=True)
class ModelPrice:
    """One model's prices (USD per 1M tokens) and limits."""

    model: str
    provider: str
    input_per_mtok: Decimal
    cached_input_per_mtok: Decimal     # OpenAI cached input; Anthropic cache read
    output_per_mtok: Decimal
    batch_discount: Decimal            # fraction off, "0.5" = half price
    context_window: int
    max_output_tokens: int
    aliases: tuple[str, ...]
    effective_date: str                # the day the price was read from ``source`` and in effect
    source: str
    cache_write_per_mtok: Decimal | None = None      # Anthropic 5-minute cache write; None = input price
    cache_write_1h_per_mtok: Decimal | None = None   # Anthropic 1-hour cache write; None = input price
    image_base: int | None = None                    # OpenAI tile models: tokens per image (low detail)
    image_tile: int | None = None                    # OpenAI tile models: tokens per 512-px tile
    image_patch_multiplier: Decimal | None = None    # OpenAI patch models: tokens per 32-px patch
    endpoints: tuple[str, ...] = ()                  # request urls served; () = the provider's default
    dimensions: int | None = None                    # embedding models: default and largest vector length
    flex: bool = False                               # takes service_tier "flex" (at the batch price)
    kind: str = "openai"                             # the API shape of its provider (registry kind)
    encoding: str | None = None                      # tiktoken vocabulary for a model tiktoken does not know
    batch: str | None = None                         # Batch API format that takes it (None: no Batch API)
    batch_max_requests: int | None = None            # one provider batch holds at most this many requests
    batch_max_bytes: int | None = None               # ... and this many bytes of input
    min_cache_tokens: int | None = None              # shortest cacheable prompt prefix (None: not known)
    windows: tuple[PriceWindow, ...] = ()            # time-of-day prices (pipeline/money/price_windows.py)

    @property
    def cached_ratio(self) -> Decimal:
        """Cached input (OpenAI) or cache read (Anthropic) over the input price: 1 when input is free."""
        return self.cached_input_per_mtok / self.input_per_mtok if self.input_per_mtok else Decimal(1)

    def multiplier_at(self, at) -> Decimal:
        """The share of the list price in force for a call sent at ``at`` (1 outside every window)."""
        return multiplier_at(self.windows, at)

    @property
    def qualified(self) -> str:
        """``provider/model``: the name that picks this entry whatever else serves the model."""
        return f"{self.provider}/{self.model}"

    def require_endpoint(self, url: str) -> None:
        """LineError unless this model serves ``url`` (a request the provider would refuse)."""
        served = self.endpoints or DEFAULT_ENDPOINTS.get(self.kind, ())
        if url not in served:
            raise LineError(f"model {self.model} does not serve {url}; it serves {', '.join(served) or 'nothing'}")


@dataclass(frozen=True)
class Usage:
    """Tokens of one call, normalised across providers.

    ``input_tokens`` counts every prompt token (OpenAI ``prompt_tokens``
    semantics): cache reads and cache writes are included in it, and
    ``cached_input_tokens``, ``cache_write_tokens`` and
    ``cache_write_1h_tokens`` say how many of them were which.
    ``output_tokens`` includes reasoning tokens.
    """

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0        # Anthropic 5-minute cache writes (part of input_tokens)
    cache_write_1h_tokens: int = 0     # Anthropic 1-hour cache writes (part of input_tokens)


def _exact() -> decimal.Context:
    """A context where any rounding raises instead of happening."""
    ctx = decimal.Context(prec=80, rounding=decimal.ROUND_HALF_EVEN)
    ctx.traps[decimal.Inexact] = True
    ctx.traps[decimal.Rounded] = True
    return ctx


def _apply_batch(price: ModelPrice, amount: Decimal, batch: bool) -> Decimal:
    return amount * (1 - price.batch_discount) if batch else amount


def cost(price: ModelPrice, usage: Usage, *, batch: bool = False, multiplier: Decimal | None = None) -> Decimal:
    """Exact USD cost of ``usage`` at ``price`` (Batch API discount when ``batch``; ``multiplier``:
    a price window's share of the list price, in force when the call was sent)."""
    special = usage.cached_input_tokens + usage.cache_write_tokens + usage.cache_write_1h_tokens
    if min(usage.input_tokens, usage.output_tokens, usage.cached_input_tokens,
           usage.cache_write_tokens, usage.cache_write_1h_tokens) < 0:
        raise ValueError(f"negative token count in {usage}")
    if special > usage.input_tokens:
        raise ValueError(f"cached and cache-write tokens exceed input tokens in {usage}")
    with decimal.localcontext(_exact()):
        write_5m = price.cache_write_per_mtok if price.cache_write_per_mtok is not None else price.input_per_mtok
        write_1h = (price.cache_write_1h_per_mtok if price.cache_write_1h_per_mtok is not None
                    else price.input_per_mtok)
        total = ((usage.input_tokens - special) * price.input_per_mtok
                 + usage.cached_input_tokens * price.cached_input_per_mtok
                 + usage.cache_write_tokens * write_5m
                 + usage.cache_write_1h_tokens * write_1h
                 + usage.output_tokens * price.output_per_mtok) / _MTOK
        if multiplier is not None:
            total *= multiplier
        return _apply_batch(price, total, batch)


def max_cost(price: ModelPrice, input_tokens: int, max_tokens: int | None, *,
             batch: bool = False) -> Decimal:
    """The most a request can cost: all input uncached, ``max_tokens`` of output.

    ``max_tokens=None`` means the model's ``max_output_tokens``.
    """
    out = price.max_output_tokens if max_tokens is None else max_tokens
    if input_tokens < 0 or out < 0:
        raise ValueError("token counts must not be negative")
    with decimal.localcontext(_exact()):
        total = (input_tokens * price.input_per_mtok + out * price.output_per_mtok) / _MTOK
        return _apply_batch(price, total, batch)


def answered_price(prices: "PriceBook", response: dict | None, sent_model: str,
                   provider: str | None = None) -> ModelPrice:
    """The price of the model that answered: the ``model`` of the provider's response
    when the price book knows it for that provider (a dated id resolves through the aliases),
    otherwise the model the request was sent to. A producer's label is never the price."""
    answered = response.get("model") if isinstance(response, dict) else None
    if isinstance(answered, str) and prices.serves(answered, provider):
        return prices.resolve(answered, provider)
    return prices.resolve(sent_model, provider)


def _int(value) -> int:
    return int(value or 0)


def usage_from_openai(usage: dict) -> Usage:
    """From a chat.completion ``usage`` dict (``prompt_tokens``, ``completion_tokens``,
    ``prompt_tokens_details.cached_tokens``). Responses-API names (``input_tokens``,
    ``output_tokens``, ``input_tokens_details``) are understood too."""
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        inp, out = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
        details = usage.get("prompt_tokens_details") or {}
    else:
        inp, out = _int(usage.get("input_tokens")), _int(usage.get("output_tokens"))
        details = usage.get("input_tokens_details") or {}
    return Usage(input_tokens=inp, output_tokens=out, cached_input_tokens=_int(details.get("cached_tokens")))


def usage_from_anthropic(usage: dict) -> Usage:
    """From an Anthropic ``usage`` dict.

    Anthropic's ``input_tokens`` excludes cache reads and writes; here
    ``input_tokens = input + cache_read + cache_creation``,
    ``cached_input_tokens = cache_read``, and cache creation is split into
    5-minute and 1-hour writes when ``cache_creation`` gives the breakdown
    (otherwise all of it counts as 5-minute writes, the default TTL).
    """
    base = _int(usage.get("input_tokens"))
    read = _int(usage.get("cache_read_input_tokens"))
    created = _int(usage.get("cache_creation_input_tokens"))
    breakdown = usage.get("cache_creation") or {}
    write_1h = min(_int(breakdown.get("ephemeral_1h_input_tokens")), created)
    return Usage(input_tokens=base + read + created, output_tokens=_int(usage.get("output_tokens")),
                 cached_input_tokens=read, cache_write_tokens=created - write_1h,
                 cache_write_1h_tokens=write_1h)


def usage_for(kind: str, usage: dict) -> Usage:
    """A provider's ``usage`` dict, read in its kind's shape (Anthropic's, or OpenAI's)."""
    return usage_from_anthropic(usage) if kind == "anthropic" else usage_from_openai(usage)


# --------------------------------------------------------------------------- the price book

def _dec(entry: dict, key: str, where: str) -> Decimal:
    raw = entry[key]
    if isinstance(raw, float) or isinstance(raw, bool):
        raise ConfigError(f"{where}: {key} must be a decimal string, not a float ({raw!r})")
    try:
        value = Decimal(str(raw))
    except decimal.InvalidOperation as e:
        raise ConfigError(f"{where}: {key} is not a number: {raw!r}") from e
    if not value.is_finite() or value < 0:
        raise ConfigError(f"{where}: {key} must be a finite, non-negative number: {raw!r}")
    return value


def _parse_entry(name: str, entry: dict, origin: str, kinds: dict[str, str],
                 limits: dict | None = None) -> ModelPrice:
    where = f"{origin}: model {name!r}"
    prefix, slash, model_id = name.partition("/")
    if slash and prefix in kinds:   # "together/meta-llama-3.1-70b": that provider's entry
        entry = {"provider": prefix, **entry}
        if entry["provider"] != prefix:
            raise ConfigError(f"{where}: the name says provider {prefix!r}, the entry {entry['provider']!r}")
        name = model_id
    missing = [k for k in _REQUIRED if k not in entry]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")
    if entry["provider"] not in kinds:
        raise ConfigError(f"{where}: provider {entry['provider']!r} is not configured (configured: "
                          f"{', '.join(sorted(kinds))}; add it under [providers.{entry['provider']}])")
    kind = kinds[entry["provider"]]
    encoding = entry.get("encoding")
    if encoding is not None and encoding not in ENCODINGS:
        raise ConfigError(f"{where}: encoding must be one of {', '.join(ENCODINGS)}, not {encoding!r}")
    discount = _dec(entry, "batch_discount", where)
    if discount > 1:
        raise ConfigError(f"{where}: batch_discount is a fraction off, at most 1: {discount}")
    try:
        context_window, max_out = int(entry["context_window"]), int(entry["max_output_tokens"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: context_window and max_output_tokens must be integers") from e
    served = _endpoint_fields(entry, where, kind)
    if context_window <= 0 or max_out < 0 or (max_out == 0 and not _NO_OUTPUT.issuperset(served["endpoints"])):
        raise ConfigError(f"{where}: context_window and max_output_tokens must be positive "
                          f"(max_output_tokens may be 0 only for a model serving embeddings or moderations alone)")
    if not isinstance(entry.get("flex", False), bool):
        raise ConfigError(f"{where}: flex must be true or false, got {entry['flex']!r}")
    aliases = entry.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise ConfigError(f"{where}: aliases must be a list of strings")
    return ModelPrice(
        model=name, provider=entry["provider"],
        input_per_mtok=_dec(entry, "input", where),
        cached_input_per_mtok=_dec(entry, "cached_input", where),
        output_per_mtok=_dec(entry, "output", where),
        batch_discount=discount,
        context_window=context_window, max_output_tokens=max_out,
        aliases=tuple(aliases), effective_date=str(entry["effective_date"]), source=str(entry["source"]),
        cache_write_per_mtok=_dec(entry, "cache_write", where) if entry.get("cache_write") is not None else None,
        cache_write_1h_per_mtok=(_dec(entry, "cache_write_1h", where)
                                 if entry.get("cache_write_1h") is not None else None),
        flex=bool(entry.get("flex", False)), **_image_fields(entry, where), **served, kind=kind,
        encoding=encoding, **_batch_fields(entry, where, kind, limits or {}),
        min_cache_tokens=_positive(entry, "min_cache_tokens", where),
        windows=parse_windows(entry.get("windows"), where),
    )


def _positive(entry: dict, key: str, where: str) -> int | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _batch_fields(entry: dict, where: str, kind: str, limits: dict) -> dict:
    raw = entry.get("batch", DEFAULT_BATCH.get(kind, "openai"))
    if raw not in (*BATCH_FORMATS, "none"):
        raise ConfigError(f"{where}: batch must be one of {', '.join(BATCH_FORMATS)} or none, got {raw!r}")
    if raw == "none":
        return {"batch": None}
    own = entry.get("batch_limits") or {}
    if not isinstance(own, dict):
        raise ConfigError(f"{where}: batch_limits must be an object, got {own!r}")
    merged = {**(limits.get(raw) or {}), **own}
    return {"batch": raw, "batch_max_requests": _positive(merged, "max_requests", where),
            "batch_max_bytes": _positive(merged, "max_bytes", where)}


def _endpoint_fields(entry: dict, where: str, kind: str) -> dict:
    raw = entry.get("endpoints")
    if raw is None:
        endpoints = DEFAULT_ENDPOINTS[kind]
    elif (not isinstance(raw, list) or not raw or len(set(map(str, raw))) != len(raw)
            or not all(isinstance(u, str) and u in ENDPOINT_URLS for u in raw)):
        raise ConfigError(f"{where}: endpoints must be a non-empty list of distinct urls from "
                          f"{', '.join(ENDPOINT_URLS)}, got {raw!r}"[:300])
    else:
        endpoints = tuple(raw)
    dims = entry.get("dimensions")
    if EMBEDDINGS_URL in endpoints:
        if not isinstance(dims, int) or isinstance(dims, bool) or dims <= 0:
            raise ConfigError(f"{where}: an embedding model needs dimensions, a positive integer, got {dims!r}")
    elif dims is not None:
        raise ConfigError(f"{where}: dimensions is only for models that serve {EMBEDDINGS_URL}")
    return {"endpoints": endpoints, "dimensions": dims}


def _image_fields(entry: dict, where: str) -> dict:
    out: dict = {}
    tiles = [entry.get(k) for k in ("image_base", "image_tile")]
    if any(v is not None for v in tiles):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in tiles):
            raise ConfigError(f"{where}: image_base and image_tile must both be positive integers")
        out["image_base"], out["image_tile"] = tiles
    if entry.get("image_patch_multiplier") is not None:
        if out:
            raise ConfigError(f"{where}: give image_base/image_tile or image_patch_multiplier, not both")
        out["image_patch_multiplier"] = _dec(entry, "image_patch_multiplier", where)
    return out


def _read_doc(text: str, origin: str) -> dict:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{origin}: not valid JSON: {e}") from e
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, dict) or not all(isinstance(v, dict) for v in models.values()):
        raise ConfigError(f'{origin}: expected {{"models": {{name: {{...}}}}}}')
    limits = doc.get("batch_limits", {})
    if not isinstance(limits, dict) or not all(isinstance(v, dict) for v in limits.values()):
        raise ConfigError(f'{origin}: batch_limits must map a batch format to {{"max_requests", "max_bytes"}}')
    return doc


def _read_models(text: str, origin: str) -> dict[str, dict]:
    return _read_doc(text, origin)["models"]


def _provider_of(name: str, entry: dict) -> str | None:
    prefix, slash, _ = name.partition("/")
    return entry.get("provider") or (prefix if slash else None)


class PriceBook:
    """Model prices by provider and name, alias or dated id."""

    def __init__(self, prices: dict[str, ModelPrice]):
        self._prices = dict(prices)
        self._providers = {p.provider for p in self._prices.values()}
        #: name or alias -> the entries (one per provider) it names
        self._index: dict[str, dict[str, ModelPrice]] = {}
        for price in self._prices.values():
            for key in (price.model, *price.aliases):
                by_provider = self._index.setdefault(key, {})
                other = by_provider.get(price.provider)
                if other is not None and other.model != price.model:
                    raise ConfigError(f"price book: {key!r} names both {other.qualified!r} and {price.qualified!r}")
                by_provider[price.provider] = price

    @classmethod
    def load(cls, user_file: Path | None = None, kinds: dict[str, str] | None = None) -> "PriceBook":
        """The package price book, then ``user_file`` (if given) adding or overriding models.

        ``kinds``: the configured providers (name -> kind); by default openai and anthropic."""
        kinds = kinds or DEFAULT_KINDS
        origin = "pipeline/data/pricing.json"
        text = resources.files("pipeline").joinpath("data", "pricing.json").read_text(encoding="utf-8")
        doc = _read_doc(text, origin)
        limits = {k: v for k, v in doc.get("batch_limits", {}).items() if k in BATCH_FORMATS}
        # the package prices providers a deployment may not configure (DeepSeek): those entries wait
        # for their provider; a user file's entries are all read strictly
        entries = {name: entry for name, entry in doc["models"].items() if _provider_of(name, entry) in kinds}
        origins = dict.fromkeys(entries, origin)
        if user_file is not None:
            user_file = Path(user_file)
            try:
                user_text = user_file.read_text(encoding="utf-8")
            except OSError as e:
                raise ConfigError(f"pricing file {user_file}: cannot read: {e}") from e
            for name, entry in _read_models(user_text, str(user_file)).items():
                entries[name] = {**entries.get(name, doc["models"].get(name, {})), **entry}
                origins[name] = str(user_file)
        return cls({name: _parse_entry(name, entry, origins[name], kinds, limits)
                    for name, entry in entries.items()})

    def _split(self, model: str) -> tuple[str | None, str]:
        """``provider/model`` -> (provider, model) when the prefix is a provider of the book."""
        prefix, slash, rest = model.partition("/")
        return (prefix, rest) if slash and prefix in self._providers else (None, model)

    def _candidates(self, model: str) -> dict[str, ModelPrice]:
        return self._index.get(model) or self._index.get(model.strip().lower()) or {}

    def resolve(self, model: str, provider: str | None = None) -> ModelPrice:
        """The price of a model name, alias or dated id, qualified (``together/llama``) or not.

        ``provider``: the provider the request is for (a stored request's), which an
        unqualified name is looked up in. Without it, an unqualified name must be served by
        exactly one provider. UnknownModelError otherwise, naming the candidates."""
        qualifier, name = self._split(model)
        if qualifier is not None and provider is not None and qualifier != provider:
            raise UnknownModelError(f"model {model!r} names provider {qualifier!r}, not {provider!r}")
        provider = qualifier or provider
        found = self._candidates(name)
        if provider is not None:
            price = found.get(provider)
            if price is None and found:
                raise UnknownModelError(f"model {name!r} is not served by provider {provider!r}; it is served by "
                                        f"{', '.join(sorted(found))}")
        elif len(found) > 1:
            raise UnknownModelError(f"model {model!r} is ambiguous: served by {len(found)} providers; name one of "
                                    f"{', '.join(sorted(p.qualified for p in found.values()))}")
        else:
            price = next(iter(found.values()), None)
        if price is None:
            # the closest names first, at most 8: a long price book must not make a reason nobody reads
            names = difflib.get_close_matches(model, self.known_models(), n=8, cutoff=0)
            more = len(self._prices) - len(names)
            raise UnknownModelError(f"unknown model {model!r}; known models: {', '.join(names)}"
                                    + (f" and {more} more" if more else ""))
        return price

    def serves(self, model: str, provider: str | None = None) -> bool:
        """True when ``resolve(model, provider)`` finds one entry."""
        qualifier, name = self._split(model)
        found = self._candidates(name)
        want = qualifier or provider
        return want in found if want is not None else len(found) == 1

    def known_models(self) -> list[str]:
        """Canonical model names as the files write them, sorted (aliases resolve to them)."""
        return sorted(self._prices)

    def __contains__(self, model: str) -> bool:
        return self.serves(model)

    def __iter__(self):
        return iter(self._prices[name] for name in self.known_models())


@functools.cache
def get_price_book() -> PriceBook:
    """The process-wide price book (package file plus the ``pricing_file`` setting)."""
    from pipeline.config import get_settings
    from pipeline.providers.registry import build_registry

    settings = get_settings()   # the kinds alone: pricing needs no key (a submit has none to read)
    return PriceBook.load(settings.pricing_file, {p.name: p.kind for p in build_registry(settings, secret_required=False)})
