"""Providers as data: every provider is an entry of configuration, none is a class.

A ``ProviderSpec`` says how to reach one provider: its ``kind`` (the API shape:
``openai`` — any OpenAI-compatible endpoint —, ``azure-openai`` — deployments, the
``api-key`` header, ``api-version`` — or ``anthropic``), its base URL, its keys
(``KeySpec``: a non-secret ``alias``, the environment variable ``env`` holding the
secret, optional ``rpm``/``tpm`` per model), its Batch API (``openai`` format,
``anthropic``'s, or none) and, for Azure, its deployments (deployment → model).

Configured in ``llmbatch.toml``::

    [providers.together]
    kind = "openai"
    base_url = "https://api.together.xyz/v1"
    batch = "openai"
    keys = [{alias = "team-a", env = "TOGETHER_KEY_A", rpm = 300},
            {alias = "team-b", env = "TOGETHER_KEY_B", rpm = 150}]

or as JSON in ``LLMBATCH_PROVIDERS`` (the same tables). ``openai`` and ``anthropic``
exist by default with today's behaviour: their one key (alias ``default``) is
``openai_api_key`` / ``anthropic_api_key`` (``OPENAI_API_KEY`` / ``ANTHROPIC_API_KEY``),
their base URL ``openai_base_url`` / ``anthropic_base_url``, and with no key set the
simulator answers. An entry named ``openai`` or ``anthropic`` changes those fields it gives.

The secret of a key is read from its environment variable by ``load_settings``
(pipeline/config.py, the one place the environment is read) and kept as a ``Secret``;
only the alias is ever stored, logged or put in a metric label. Which provider serves
a model is the price book's business (pipeline/money/pricing.py), not this module's.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from pipeline.config import Secret, Settings, get_settings
from pipeline.errors import ConfigError

KINDS = ("openai", "azure-openai", "anthropic")
BATCH_FORMATS = ("openai", "anthropic")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: the key a provider that needs none (a local vLLM) or an unset default key is sent with
NO_KEY = "sk-simulator"
#: the alias of the default providers' one key
DEFAULT_ALIAS = "default"
DEFAULT_AZURE_API_VERSION = "2024-10-21"
_FIELDS = {"kind", "base_url", "keys", "batch", "api_version", "deployments"}
_KEY_FIELDS = {"alias", "env", "rpm", "tpm", "secret"}


@dataclass(frozen=True)
class KeySpec:
    """One key of a provider: ``alias`` is its only name outside this process."""

    alias: str
    env: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    secret: Secret = field(default=Secret(""), repr=False, compare=False)

    def reveal(self) -> str:
        """The secret, for an SDK client (or the placeholder when none is needed)."""
        return self.secret.reveal() if self.secret else NO_KEY


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    kind: str
    base_url: str
    keys: tuple[KeySpec, ...]
    batch: str | None = None
    api_version: str | None = None
    deployments: dict = field(default_factory=dict)   # deployment -> model (azure-openai)

    @property
    def line_format(self) -> str:
        """The input line format this provider's requests come in: ``anthropic`` or ``openai``."""
        return "anthropic" if self.kind == "anthropic" else "openai"

    def key(self, alias: str) -> KeySpec:
        for k in self.keys:
            if k.alias == alias:
                return k
        raise ConfigError(f"provider {self.name!r} has no key {alias!r}")

    def deployment_for(self, model: str) -> str:
        """The Azure deployment that serves ``model`` (a deployment name serves itself)."""
        if model in self.deployments:
            return model
        for dep, served in self.deployments.items():
            if served == model:
                return dep
        raise ConfigError(f"provider {self.name!r} has no deployment of model {model!r}")


class Registry:
    """The configured providers by name."""

    def __init__(self, providers: dict[str, ProviderSpec]):
        self._providers = dict(providers)

    def get(self, name: str) -> ProviderSpec:
        try:
            return self._providers[name]
        except KeyError:
            raise ConfigError(f"unknown provider {name!r}; configured: {', '.join(sorted(self._providers))}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._providers

    def __iter__(self):
        return iter(self._providers.values())

    def names(self) -> list[str]:
        return sorted(self._providers)

    @property
    def simulated(self) -> bool:
        """True when no key of any provider is set: the simulator answers everything."""
        return not any(k.secret for p in self for k in p.keys)


def _defaults(settings: Settings) -> dict[str, dict]:
    sim = settings.simulator_url.rstrip("/")
    return {
        "openai": {"kind": "openai", "batch": "openai",
                   "base_url": settings.openai_base_url or (
                       "https://api.openai.com/v1" if settings.openai_api_key else f"{sim}/v1"),
                   "keys": [{"alias": DEFAULT_ALIAS, "secret": settings.openai_api_key}]},
        "anthropic": {"kind": "anthropic", "batch": "anthropic",
                      "base_url": settings.anthropic_base_url or (
                          "https://api.anthropic.com" if settings.anthropic_api_key else sim),
                      "keys": [{"alias": DEFAULT_ALIAS, "secret": settings.anthropic_api_key}]},
    }


def _positive(value, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{where} must be a positive integer, not {value!r}")
    return value


def _key(raw, where: str, secret_required: bool) -> KeySpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table {{alias, env, rpm, tpm}}, not {type(raw).__name__}")
    unknown = set(raw) - _KEY_FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown fields {', '.join(sorted(unknown))} (known: alias, env, rpm, tpm)")
    alias, env = raw.get("alias"), raw.get("env")
    if not isinstance(alias, str) or not ALIAS_RE.match(alias):
        raise ConfigError(f"{where}.alias must be a short non-secret name (letters, digits, . _ -), not {alias!r}")
    if env is not None and (not isinstance(env, str) or not ENV_RE.match(env)):
        raise ConfigError(f"{where}.env must name an environment variable, not {env!r}")
    secret = raw.get("secret") or Secret("")
    secret = secret if isinstance(secret, Secret) else Secret(secret)   # Secret(Secret) would keep the mask
    if secret_required and env is not None and not secret:
        raise ConfigError(f"{where}: the environment variable {env} (key {alias!r}) is not set")
    return KeySpec(alias=alias, env=env, rpm=_positive(raw.get("rpm"), f"{where}.rpm"),
                   tpm=_positive(raw.get("tpm"), f"{where}.tpm"), secret=secret)


def _spec(name: str, raw: dict, secret_required: bool) -> ProviderSpec:
    where = f"providers.{name}"
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"provider name {name!r} must be lowercase letters, digits, '-' or '_'")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown fields {', '.join(sorted(unknown))} (known: {', '.join(sorted(_FIELDS))})")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind must be one of {', '.join(KINDS)}, not {kind!r}")
    base_url = raw.get("base_url")
    if not isinstance(base_url, str) or not re.match(r"^https?://", base_url):
        raise ConfigError(f"{where}.base_url must be an http(s) URL, not {base_url!r}")
    keys_raw = raw.get("keys")
    if keys_raw is None:
        keys_raw = [{"alias": DEFAULT_ALIAS}]   # no key needed (a local server): one anonymous key
    if not isinstance(keys_raw, list) or not keys_raw:
        raise ConfigError(f"{where}.keys must be a non-empty list of {{alias, env, rpm, tpm}}")
    keys = tuple(_key(k, f"{where}.keys[{i}]", secret_required) for i, k in enumerate(keys_raw))
    aliases = [k.alias for k in keys]
    if len(set(aliases)) != len(aliases):
        raise ConfigError(f"{where}.keys: each alias must be unique, got {', '.join(aliases)}")
    envs = [k.env for k in keys if k.env]
    if len(set(envs)) != len(envs):
        raise ConfigError(f"{where}.keys: two keys read the same environment variable")
    batch = raw.get("batch")
    if batch not in (None, *BATCH_FORMATS):
        raise ConfigError(f"{where}.batch must be one of {', '.join(BATCH_FORMATS)} or absent, not {batch!r}")
    if batch is not None and (batch == "anthropic") != (kind == "anthropic"):
        raise ConfigError(f"{where}: a {kind} provider cannot take {batch} batches")
    deployments = raw.get("deployments") or {}
    if not isinstance(deployments, dict) or not all(
            isinstance(d, str) and d and isinstance(m, str) and m for d, m in deployments.items()):
        raise ConfigError(f"{where}.deployments must be a table of deployment = model")
    api_version = raw.get("api_version")
    if kind == "azure-openai":
        if not deployments:
            raise ConfigError(f"{where}: an azure-openai provider needs deployments = {{deployment = model}}")
        if batch is not None:
            raise ConfigError(f"{where}: llmbatch sends no Batch API jobs to Azure deployments (batch must be absent)")
        api_version = api_version or DEFAULT_AZURE_API_VERSION
    elif deployments or api_version:
        raise ConfigError(f"{where}: deployments and api_version are for kind azure-openai only")
    return ProviderSpec(name=name, kind=kind, base_url=base_url.rstrip("/"), keys=keys, batch=batch,
                        api_version=api_version, deployments=dict(deployments))


def build_registry(settings: Settings, *, secret_required: bool = True) -> Registry:
    """The registry of ``settings``: the default providers, then the ``providers`` setting over them.

    ``secret_required=False`` accepts keys whose variable is unset (for ``llmbatch doctor``)."""
    raw = settings.providers or {}
    if not isinstance(raw, dict):
        raise ConfigError("providers must be a table of name -> provider")
    tables = _defaults(settings)
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"providers.{name} must be a table, not {type(entry).__name__}")
        base = tables.get(name, {})
        if base and "kind" in entry and entry["kind"] != base["kind"]:
            raise ConfigError(f"providers.{name}: the built-in provider {name!r} has kind {base['kind']!r}")
        tables[name] = {**base, **entry}
    return Registry({name: _spec(name, table, secret_required) for name, table in tables.items()})


@functools.cache
def get_registry() -> Registry:
    """The process-wide registry, built once from the process's settings."""
    return build_registry(get_settings())
