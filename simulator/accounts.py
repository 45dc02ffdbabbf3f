"""Providers, keys and what each was billed: the accounts a real provider keeps.

- ``Provider``: a configured provider at run time (``providers.py`` is its
  config): which models it serves, at what price, counted how, with which
  limits per key, and whether a model takes flex processing.
- ``Accounts``: authenticates the key of each call (a provider with no keys
  listed accepts any key, as the simulator always did), revokes keys (an admin
  call, or ``revoke_after`` calls), and keeps per provider and per key: calls,
  429s, 401s, tokens, billed USD and the most calls in any 60 s window
  (``/_stats`` → ``providers``).

A key never leaves this module: it is known outside by its alias (the
config's ``alias``, or ``key-`` + 10 hex digits of its sha256), which is
what ``/_stats``, ``/_config`` and the log show.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from decimal import Decimal

from simulator import billing
from simulator.config import ModelLimit, SimulatorConfig
from simulator.limits import PeakWindow
from simulator.prices import Price, builtin_price, plain
from simulator.providers import BUILTIN, KeySpec, ProviderSpec, key_alias

log = logging.getLogger(__name__)

NO_KEY = "no-key"
EMBEDDING_DIMENSIONS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072,
                        "text-embedding-ada-002": 1536}
#: models of the legacy completions endpoint and their vocabulary
COMPLETION_MODELS = {"gpt-3.5-turbo-instruct": "cl100k_base", "davinci-002": "cl100k_base",
                     "babbage-002": "cl100k_base"}
MODERATION_MODELS = ("omni-moderation-latest", "text-moderation-latest")


@dataclass(frozen=True)
class Model:
    """A model as one provider serves it."""

    name: str
    price: Price | None
    encoding: str | None          # tiktoken vocabulary; None: the simulator cannot count it
    max_output: int | None        # output limit when a request sets none; None: billing's table
    dimensions: int | None        # embeddings models


class Provider:
    def __init__(self, name: str, spec: ProviderSpec, config: SimulatorConfig):
        self.name = name
        self.spec = spec
        self.kind = spec.kind
        self.family = "anthropic" if spec.kind == "anthropic" else "openai"
        self.builtin = name in BUILTIN
        self.config = config
        self.keys = {k.key: k for k in spec.keys}
        self._by_alias = {k.name: k for k in spec.keys}
        self.flex_models = tuple(spec.flex_models if spec.flex_models is not None else config.flex_models)

    def key_by_alias(self, alias: str) -> KeySpec | None:
        return self._by_alias.get(alias)

    def deployment(self, name: str | None) -> str | None:
        return self.spec.deployments.get(name)

    def model(self, name: str) -> Model | None:
        """The model as served here, or None when this provider does not serve it."""
        entry = self.spec.models.get(name)
        served = self.builtin or entry is not None or name in self.spec.deployments.values()
        if not served:
            return None
        fallback = builtin_price(self.family, name)
        price = entry.price(fallback) if entry is not None else fallback
        encoding = entry.encoding if entry is not None and entry.encoding else None
        if encoding is None and self.family == "openai":
            encoding = COMPLETION_MODELS.get(name) or billing.openai_encoding_name(name)
            if encoding is None and (name.startswith("text-embedding-") or name in MODERATION_MODELS):
                encoding = "cl100k_base"
            if encoding is None and not self.builtin:
                encoding = "o200k_base"
        dims = entry.dimensions if entry is not None and entry.dimensions else EMBEDDING_DIMENSIONS.get(name)
        return Model(name, price, encoding, entry.max_output if entry is not None else None, dims)

    def flex_eligible(self, model: str) -> bool:
        m = model.lower()
        return any(m == f or (m.startswith(f + "-") and m[len(f) + 1:][:1].isdigit()) for f in self.flex_models)

    def limit(self, key: KeySpec | None, model: str) -> ModelLimit:
        entry = self.spec.models.get(model)
        glob = self.config.limit_for(model)

        def pick(attr):
            for source in (key, entry, self.spec, glob):
                value = getattr(source, attr, None) if source is not None else None
                if value is not None:
                    return value
            return None
        return ModelLimit(pick("rpm"), pick("tpm"))


def build_providers(config: SimulatorConfig) -> dict[str, Provider]:
    specs = {"openai": ProviderSpec(kind="openai"), "anthropic": ProviderSpec(kind="anthropic"),
             **config.providers}
    return {name: Provider(name, spec, config) for name, spec in specs.items()}


class Tally:
    __slots__ = ("calls", "successes", "status", "tokens", "usd", "unpriced", "window", "flex_calls",
                 "flex_unavailable", "batch_lines")

    def __init__(self):
        self.calls = 0
        self.successes = 0
        self.status: dict[str, int] = {}
        self.tokens = 0
        self.usd = Decimal(0)
        self.unpriced = 0
        self.window = PeakWindow()
        self.flex_calls = 0
        self.flex_unavailable = 0
        self.batch_lines = 0

    def as_dict(self) -> dict:
        return {"calls": self.calls, "successes": self.successes, "429": self.status.get("429", 0),
                "401": self.status.get("401", 0), "errors": dict(sorted(self.status.items())),
                "tokens": self.tokens, "billed_usd": plain(self.usd), "unpriced_calls": self.unpriced,
                "peak_calls_60s": self.window.peak_requests, "flex_calls": self.flex_calls,
                "flex_unavailable_429": self.flex_unavailable, "batch_lines": self.batch_lines}


class Accounts:
    """Keys and per-provider / per-key tallies of one simulator."""

    def __init__(self, providers: dict[str, Provider]):
        self.providers = providers
        self.reset()

    def reset(self) -> None:
        self.revoked: set[tuple[str, str]] = set()          # (provider, key)
        self.key_calls: dict[tuple[str, str], int] = {}
        self.tallies: dict[str, Tally] = {}
        self.key_tallies: dict[str, dict[str, Tally]] = {}

    def configure(self, providers: dict[str, Provider]) -> None:
        self.providers = providers

    # ---- keys ---------------------------------------------------------------

    def authenticate(self, provider: Provider, key: str | None) -> tuple[str, KeySpec | None, bool]:
        """``(alias, key spec, ok)`` for the key a call presents; counts the call against the key."""
        alias = key_alias(key) if key else NO_KEY
        spec = provider.keys.get(key) if key else None
        if spec is not None:
            alias = spec.name
        elif provider.keys:
            return alias, None, False   # keys are listed and this is not one of them
        ident = (provider.name, key or "")
        if ident in self.revoked:
            return alias, spec, False
        n = self.key_calls.get(ident, 0) + 1
        self.key_calls[ident] = n
        if spec is not None and spec.revoke_after is not None and n > spec.revoke_after:
            self.revoked.add(ident)
            log.warning("simulator: key %s of provider %s revoked after %d calls", alias, provider.name,
                        spec.revoke_after)
            return alias, spec, False
        return alias, spec, True

    def revoke(self, key: str, provider: str | None = None, restore: bool = False) -> list[str]:
        """Revoke (or restore) ``key`` at one provider, or at every provider that lists it (none
        does: every provider that takes any key); returns the providers it applied to."""
        if provider:
            names = [provider]
        else:   # the providers that list the key; if none does, those that take any key
            names = [n for n, p in self.providers.items() if key in p.keys] or [
                n for n, p in self.providers.items() if not p.keys]
        done = []
        for name in names:
            p = self.providers.get(name)
            if p is None or (p.keys and key not in p.keys):
                continue
            ident = (name, key)
            if restore:
                self.revoked.discard(ident)
                self.key_calls.pop(ident, None)
            else:
                self.revoked.add(ident)
            done.append(name)
        if done:
            specs = [self.providers[n].keys[key] for n in done if key in self.providers[n].keys]
            alias = specs[0].name if specs else key_alias(key)
            log.warning("simulator: key %s %s at %s", alias, "restored" if restore else "revoked", ", ".join(done))
        return done

    # ---- tallies ------------------------------------------------------------

    def _tallies(self, provider: str, alias: str) -> tuple[Tally, Tally]:
        t = self.tallies.get(provider)
        if t is None:
            t = self.tallies[provider] = Tally()
        per = self.key_tallies.setdefault(provider, {})
        k = per.get(alias)
        if k is None:
            k = per[alias] = Tally()
        return t, k

    def arrive(self, provider: str, alias: str, flex: bool) -> None:
        now = time.monotonic()
        for t in self._tallies(provider, alias):
            t.calls += 1
            t.window.add(now, 0)
            if flex:
                t.flex_calls += 1

    def finish(self, provider: str, alias: str, status, flex_unavailable: bool = False) -> None:
        for t in self._tallies(provider, alias):
            if status == 200:
                t.successes += 1
            else:
                t.status[str(status)] = t.status.get(str(status), 0) + 1
            if flex_unavailable:
                t.flex_unavailable += 1

    def bill(self, provider: str, alias: str, tokens: int, usd: Decimal | None, batch: bool = False) -> None:
        for t in self._tallies(provider, alias):
            t.tokens += tokens
            if usd is None:
                t.unpriced += 1
            else:
                t.usd += usd
            if batch:
                t.batch_lines += 1

    def as_dict(self) -> dict:
        out = {}
        for name in sorted(set(self.tallies) | {n for n in self.providers}):
            p = self.providers.get(name)
            t = self.tallies.get(name) or Tally()
            revoked = sorted(p.keys[k].name if p and k in p.keys else key_alias(k)
                             for (n, k) in self.revoked if n == name)
            out[name] = {"kind": p.kind if p else None, **t.as_dict(),
                         "keys": {a: k.as_dict() for a, k in sorted(self.key_tallies.get(name, {}).items())},
                         "revoked_keys": revoked}
        return out
