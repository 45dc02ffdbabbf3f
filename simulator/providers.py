"""Named providers of the simulator: configuration as data, one entry per provider.

Besides the built-in ``openai`` (routes ``/v1/...``) and ``anthropic``
(``/v1/messages...``), the simulator serves any number of named providers,
each under its own prefix::

    kind = "openai"        base URL http://HOST:PORT/p/<name>/v1
    kind = "anthropic"     base URL http://HOST:PORT/p/<name>
    kind = "azure-openai"  http://HOST:PORT/p/<name>/openai/deployments/<deployment>/chat/completions?api-version=…
                           (also /embeddings, /completions; the ``api-key`` header authenticates;
                           /p/<name>/openai/v1/... takes the deployment name as ``model``)

The built-in providers are also served as ``/p/openai/v1`` and ``/p/anthropic``.
A config file declares them (TOML; JSON alike)::

    [providers.together]
    kind = "openai"
    rpm = 600                                  # per key per model, unless the key or model says otherwise
    [providers.together.models."meta-llama-3.1-70b"]
    input = "0.88"                             # USD per 1M tokens (required for a named provider's model)
    output = "0.88"
    [[providers.together.keys]]
    key = "tk-one"                             # a key the provider accepts; once any key is listed,
    rpm = 300                                  # any other key is answered 401
    [[providers.together.keys]]
    key = "tk-two"
    rpm = 150
    revoke_after = 100                         # answers 401 from its 101st call on

    [providers.azure-east]
    kind = "azure-openai"
    deployments = { "prod-4o" = "gpt-4o" }     # deployment -> model (built-in price unless listed)

Per model (``models.<name>``): ``input``, ``output``, ``cached_input``,
``batch_discount`` (prices, exact decimal strings), ``rpm``, ``tpm``,
``encoding`` (the tiktoken vocabulary that counts it; default ``o200k_base``
for a model the simulator does not know), ``max_output`` (output limit when a
request sets none), ``dimensions`` (an embeddings model: its vector size).

Per provider: ``kind``, ``rpm``, ``tpm``, ``models``, ``keys``,
``deployments`` (Azure), ``flex_models`` (default: the simulator-wide list),
``batches`` (false: the provider has no batch API, and its batch routes
answer 404, as DeepSeek's would).

Per key: ``key``, ``alias`` (the non-secret name ``/_stats`` shows; default a
short hash of the key), ``rpm``, ``tpm``, ``revoke_after`` (calls).

A limit for (key, model) is the key's own, else the model's, else the
provider's, else the simulator-wide ``model_limits`` / ``rpm`` / ``tpm``.
Named providers serve only the models they list (an Azure provider: the
models its deployments map to); the built-in ones serve every model they can
count, as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from pipeline.errors import ConfigError
from simulator.prices import Price, builtin_price

KINDS = ("openai", "azure-openai", "anthropic")
BUILTIN = {"openai": "openai", "anthropic": "anthropic"}
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
ENCODINGS = ("o200k_base", "cl100k_base")
#: OpenAI's flex-eligible models (platform.openai.com/docs/guides/flex-processing: GPT-5, o3 and
#: o4-mini; the pricing page lists the GPT-5 family); dated snapshots of these are eligible too
DEFAULT_FLEX_MODELS = ("gpt-5", "gpt-5-mini", "gpt-5-nano", "o3", "o4-mini")


def key_alias(key: str) -> str:
    """The non-secret name of a key in ``/_stats`` and logs: a short hash."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:10]


@dataclass
class KeySpec:
    key: str
    alias: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    revoke_after: int | None = None

    @property
    def name(self) -> str:
        return self.alias or key_alias(self.key)


@dataclass
class ModelSpec:
    input: str | None = None
    output: str | None = None
    cached_input: str | None = None
    batch_discount: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    encoding: str | None = None
    max_output: int | None = None
    dimensions: int | None = None

    def price(self, fallback: Price | None) -> Price | None:
        if self.input is None:
            return fallback
        base = fallback or Price.of("0")
        return Price(Decimal(self.input),
                     Decimal(self.output) if self.output is not None else base.output,
                     Decimal(self.cached_input) if self.cached_input is not None else (
                         base.cached_input if fallback is not None else None),
                     Decimal(self.batch_discount) if self.batch_discount is not None else base.batch_discount)


@dataclass
class ProviderSpec:
    kind: str = "openai"
    rpm: int | None = None
    tpm: int | None = None
    models: dict[str, ModelSpec] = field(default_factory=dict)
    keys: list[KeySpec] = field(default_factory=list)
    deployments: dict[str, str] = field(default_factory=dict)
    flex_models: list[str] | None = None
    batches: bool = True


def _entry(cls, value, where: str):
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"simulator {where} must be a table, not {value!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(value) - known
    if unknown:
        raise ConfigError(f"unknown simulator settings in {where}: {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(known))})")
    return cls(**value)


def _positive(value, where: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ConfigError(f"simulator {where} must be a positive integer, not {value!r}")


def _decimal(value, where: str) -> str | None:
    if value is None:
        return None
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(f"simulator {where} must be a decimal number, not {value!r}") from None
    if not d.is_finite() or d < 0:
        raise ConfigError(f"simulator {where} must be a number >= 0, not {value!r}")
    return str(value)


def parse_providers(value) -> dict[str, ProviderSpec]:
    """Providers from a config mapping (``name -> table``), validated; raises ConfigError."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError("simulator providers must be a table of name -> provider")
    out: dict[str, ProviderSpec] = {}
    for name, raw in value.items():
        where = f"providers.{name}"
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ConfigError(f"simulator provider name {name!r} must be lowercase letters, digits, '-' or '_'")
        spec = _entry(ProviderSpec, raw, where)
        spec = dataclasses.replace(
            spec,
            models={m: _entry(ModelSpec, v, f"{where}.models.{m}") for m, v in (spec.models or {}).items()},
            keys=[_entry(KeySpec, k, f"{where}.keys[{i}]") for i, k in enumerate(spec.keys or [])],
            deployments=dict(spec.deployments or {}))
        _validate(name, spec, where)
        out[name] = spec
    return out


def _validate(name: str, spec: ProviderSpec, where: str) -> None:
    if spec.kind not in KINDS:
        raise ConfigError(f"simulator {where}.kind must be one of {', '.join(KINDS)}, not {spec.kind!r}")
    if name in BUILTIN and spec.kind != BUILTIN[name]:
        raise ConfigError(f"simulator {where}: the built-in provider {name!r} has kind {BUILTIN[name]!r}")
    _positive(spec.rpm, f"{where}.rpm")
    _positive(spec.tpm, f"{where}.tpm")
    for model, m in spec.models.items():
        mw = f"{where}.models.{model}"
        for attr in ("input", "output", "cached_input", "batch_discount"):
            setattr(m, attr, _decimal(getattr(m, attr), f"{mw}.{attr}"))
        if m.batch_discount is not None and Decimal(m.batch_discount) > 1:
            raise ConfigError(f"simulator {mw}.batch_discount must be within 0..1")
        for attr in ("rpm", "tpm", "max_output", "dimensions"):
            _positive(getattr(m, attr), f"{mw}.{attr}")
        if m.encoding is not None and m.encoding not in ENCODINGS:
            raise ConfigError(f"simulator {mw}.encoding must be one of {', '.join(ENCODINGS)}")
        if name not in BUILTIN and m.input is None and builtin_price(spec.kind, model) is None:
            raise ConfigError(f"simulator {mw} needs a price: set input (and output) in USD per 1M tokens")
    seen: set[str] = set()
    for i, k in enumerate(spec.keys):
        kw = f"{where}.keys[{i}]"
        if not isinstance(k.key, str) or not k.key:
            raise ConfigError(f"simulator {kw}.key must be a non-empty string")
        if k.key in seen:
            raise ConfigError(f"simulator {kw}: the same key is listed twice")   # never print the key
        seen.add(k.key)
        for attr in ("rpm", "tpm", "revoke_after"):
            _positive(getattr(k, attr), f"{kw}.{attr}")
    if spec.kind == "azure-openai":
        if not spec.deployments:
            raise ConfigError(f"simulator {where}: an azure-openai provider needs deployments = {{name = model}}")
        for dep, model in spec.deployments.items():
            if not isinstance(model, str) or not model:
                raise ConfigError(f"simulator {where}.deployments.{dep} must name a model")
            if model not in spec.models and builtin_price("openai", model) is None:
                raise ConfigError(f"simulator {where}.deployments.{dep}: model {model!r} has no built-in price; "
                                  f"list it under {where}.models with its prices")
    elif spec.deployments:
        raise ConfigError(f"simulator {where}: deployments are for kind azure-openai only")
    if not isinstance(spec.batches, bool):
        raise ConfigError(f"simulator {where}.batches must be true or false, not {spec.batches!r}")
    if spec.flex_models is not None and (not isinstance(spec.flex_models, list)
                                         or not all(isinstance(x, str) for x in spec.flex_models)):
        raise ConfigError(f"simulator {where}.flex_models must be a list of model names")
    if spec.flex_models and spec.kind == "anthropic":
        raise ConfigError(f"simulator {where}: flex processing is an OpenAI service tier")


def redacted(providers: dict[str, ProviderSpec]) -> dict:
    """The providers as ``GET /_config`` shows them: each key replaced by its alias."""
    out = {}
    for name, spec in providers.items():
        d = dataclasses.asdict(spec)
        d["keys"] = [{**k, "key": KeySpec(**k).name} for k in d["keys"]]
        out[name] = d
    return out
