"""What a provider is, and how one is called: the ``Provider`` protocol, its ``Answer``, the raw
POST through an official SDK client (``post_raw``), ``get_provider``: a registry entry
(pipeline/providers/registry.py) made callable, one per provider per event loop, with one
SDK client per key, and a provider held to one endpoint's url (``at_url``). Which module
speaks a provider's API is a table by its kind (``KIND_MODULES``), never a branch on its
name. Retries are not here: pipeline/providers/retries.py.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from dataclasses import dataclass
from typing import Protocol

from pipeline.config import Settings
from pipeline.errors import ConfigError, PermanentProviderError, RetryableProviderError
from pipeline.providers.registry import KeySpec, ProviderSpec, Registry, get_registry
from pipeline.providers.retries import classify_status

try:  # the SDKs' HTTP layer: httpx2 in current releases, httpx before
    from httpx2 import Response as http_response
except ImportError:  # pragma: no cover
    from httpx import Response as http_response


@dataclass
class Answer:
    """A successful provider response."""

    body: dict
    status_code: int
    request_id: str | None
    latency_ms: int
    headers: dict


class Provider(Protocol):
    name: str

    async def call(self, body: dict, *, headers: dict, key: KeySpec | None = None,
                   url: str | None = None, timeout: float | None = None) -> Answer:
        """POST ``body`` to the endpoint ``url`` (``/v1/embeddings``; None: the provider's chat url),
        on ``key`` (None: the provider's first), within ``timeout`` (None: the client's)."""


class AtUrl:
    """A provider whose every call goes to one endpoint's url: the request's, so whoever
    wraps it (limits, the gate, retries, a path's caller) calls ``call(body, headers=...)``
    as for chat; what else they pass (the key chosen, a timeout) goes on with it."""

    def __init__(self, provider: Provider, url: str):
        self.provider, self.url, self.name = provider, url, provider.name

    def __getattr__(self, name):   # the provider's registry entry (``spec``) and the like
        return getattr(self.provider, name)

    async def call(self, body: dict, *, headers: dict, **kw) -> Answer:
        return await self.provider.call(body, headers=headers, url=self.url, **kw)


def at_url(provider: Provider, url: str | None) -> Provider:
    return provider if url is None else AtUrl(provider, url)


async def post_raw(sdk, client, path: str, body: dict, headers: dict, request_id_header: str,
                   timeout: float | None = None) -> Answer:
    """POST the body as written through an official SDK client; map its errors to ours.

    ``sdk`` is the ``openai`` or ``anthropic`` module: both name their
    exceptions alike, so one mapping serves both providers. ``timeout``: this call's
    own client timeout (a flex call's is long), else the client's.
    """
    started = time.monotonic()
    options = {"headers": headers} if timeout is None else {"headers": headers, "timeout": timeout}
    try:
        resp = await client.post(path, body=body, cast_to=http_response, options=options)
    except sdk.APIStatusError as e:
        raise classify_status(e.status_code, e.message, e.request_id, e.response.headers) from e
    except sdk.APITimeoutError as e:
        raise RetryableProviderError("timeout: the provider did not answer in time") from e
    except sdk.APIConnectionError as e:
        raise RetryableProviderError(f"connection error: {e}") from e
    return Answer(body=resp.json(), status_code=resp.status_code, request_id=resp.headers.get(request_id_header),
                  latency_ms=int((time.monotonic() - started) * 1000), headers=dict(resp.headers))


#: the module that speaks each kind's API (``make_client(spec, key, settings)``, ``call(...)``)
KIND_MODULES = {"openai": "pipeline.providers.openai", "azure-openai": "pipeline.providers.openai",
                "anthropic": "pipeline.providers.anthropic"}


class ProviderClient:
    """One provider of the registry, called through its kind's SDK: a client per key, made
    when the key is first used. The call goes out on the key it is given (the one
    pipeline/providers/keys.py chose), else on the provider's first key."""

    def __init__(self, spec: ProviderSpec, settings: Settings):
        self.spec, self.settings = spec, settings
        self.name, self.kind = spec.name, spec.kind
        self.api = importlib.import_module(KIND_MODULES[spec.kind])
        self._clients: dict[str, object] = {}

    def client(self, key: KeySpec | None = None):
        key = key or self.spec.keys[0]
        c = self._clients.get(key.alias)
        if c is None:
            c = self._clients[key.alias] = self.api.make_client(self.spec, key, self.settings)
        return c

    async def call(self, body: dict, *, headers: dict, key: KeySpec | None = None, url: str | None = None,
                   timeout: float | None = None) -> Answer:
        return await self.api.call(self.client(key), self.spec, body, headers, url, timeout)


_clients: dict[tuple, ProviderClient] = {}


def get_provider(name: str, settings: Settings, registry: Registry | None = None) -> ProviderClient:
    """The provider ``name`` of the registry: one client set per provider per event loop
    (workers keep one loop). An unknown name is a permanent error of the request."""
    try:
        loop = id(asyncio.get_running_loop())
    except RuntimeError:
        loop = None
    client = _clients.get((name, loop))
    if client is None:
        try:
            spec = (registry or get_registry()).get(name)
        except ConfigError as e:
            raise PermanentProviderError(str(e)) from e
        client = _clients[(name, loop)] = ProviderClient(spec, settings)
    return client
