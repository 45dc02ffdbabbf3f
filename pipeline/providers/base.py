"""What a provider is, and how one is called: the ``Provider`` protocol, its ``Answer``, the raw
POST through an official SDK client (``post_raw``), one client per provider per process
(``get_provider``) and a provider held to one endpoint's url (``at_url``). Retries are not
here: pipeline/providers/retries.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from pipeline.config import Settings
from pipeline.errors import PermanentProviderError, RetryableProviderError
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

    async def call(self, body: dict, *, headers: dict, url: str | None = None) -> Answer:
        """POST ``body`` to the endpoint ``url`` (``/v1/embeddings``; None: the provider's chat url)."""


class AtUrl:
    """A provider whose every call goes to one endpoint's url: the request's, so whoever
    wraps it (limits, the gate, retries) calls ``call(body, headers=...)`` as for chat."""

    def __init__(self, provider: Provider, url: str):
        self.provider, self.url, self.name = provider, url, provider.name

    async def call(self, body: dict, *, headers: dict) -> Answer:
        return await self.provider.call(body, headers=headers, url=self.url)


def at_url(provider: Provider, url: str | None) -> Provider:
    return provider if url is None else AtUrl(provider, url)


async def post_raw(sdk, client, path: str, body: dict, headers: dict, request_id_header: str) -> Answer:
    """POST the body as written through an official SDK client; map its errors to ours.

    ``sdk`` is the ``openai`` or ``anthropic`` module: both name their
    exceptions alike, so one mapping serves both providers.
    """
    started = time.monotonic()
    try:
        resp = await client.post(path, body=body, cast_to=http_response, options={"headers": headers})
    except sdk.APIStatusError as e:
        raise classify_status(e.status_code, e.message, e.request_id, e.response.headers) from e
    except sdk.APITimeoutError as e:
        raise RetryableProviderError("timeout: the provider did not answer in time") from e
    except sdk.APIConnectionError as e:
        raise RetryableProviderError(f"connection error: {e}") from e
    return Answer(body=resp.json(), status_code=resp.status_code, request_id=resp.headers.get(request_id_header),
                  latency_ms=int((time.monotonic() - started) * 1000), headers=dict(resp.headers))


_clients: dict[str, Provider] = {}


def get_provider(name: str, settings: Settings) -> Provider:
    """One client per provider per process (and per event loop: workers keep one loop)."""
    if name not in _clients:
        if name == "openai":
            from pipeline.providers.openai import OpenAIProvider
            _clients[name] = OpenAIProvider(settings)
        elif name == "anthropic":
            from pipeline.providers.anthropic import AnthropicProvider
            _clients[name] = AnthropicProvider(settings)
        else:
            raise PermanentProviderError(f"unknown provider {name!r}")
    return _clients[name]
