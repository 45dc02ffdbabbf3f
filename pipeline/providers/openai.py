"""The OpenAI API shape through ``AsyncOpenAI``: OpenAI itself, any OpenAI-compatible endpoint
(kind ``openai``: Together, Fireworks, vLLM, …) and Azure OpenAI (kind ``azure-openai``:
``AsyncAzureOpenAI``, the ``api-key`` header, ``api-version``, the model's deployment in the path).
Every endpoint (chat completions, responses, embeddings, completions, moderations) at its own url.

The body is sent as the user wrote it (``client.post`` with the raw JSON), so
parameters the SDK's typed signature does not know yet still pass through, and
the response is kept as the provider's own JSON.
"""

from __future__ import annotations

import openai

from pipeline.config import Settings
from pipeline.constants import CHAT_URL
from pipeline.providers.base import Answer, post_raw
from pipeline.providers.direct import DirectClient
from pipeline.providers.registry import KeySpec, ProviderSpec


def make_client(spec: ProviderSpec, key: KeySpec, settings: Settings):
    """One client for one key of the provider: the SDK's (retries off: pipeline/providers/retries.py),
    or for the ``openai`` kind with ``provider_http_client = "direct"`` aiohttp alone
    (pipeline/providers/direct.py)."""
    if spec.kind == "openai" and settings.provider_http_client == "direct":
        return DirectClient(spec.base_url, key.reveal(), settings.provider_timeout_s)
    common = dict(api_key=key.reveal(), max_retries=0, timeout=settings.provider_timeout_s,
                  http_client=(openai.DefaultAioHttpClient(timeout=settings.provider_timeout_s)
                               if settings.provider_http_client in ("aiohttp", "direct") else None))
    if spec.kind == "azure-openai":
        return openai.AsyncAzureOpenAI(azure_endpoint=spec.base_url, api_version=spec.api_version, **common)
    return openai.AsyncOpenAI(base_url=spec.base_url, **common)


async def call(client, spec: ProviderSpec, body: dict, headers: dict, url: str | None = None,
               timeout: float | None = None) -> Answer:
    """POST ``body`` to the endpoint ``url`` (default chat completions); an Azure deployment
    is named by the body's model (the SDK puts it in the path). ``timeout``: this call's own
    client timeout (a flex call's), else the client's."""
    if spec.deployments:
        body = {**body, "model": spec.deployment_for(body["model"])}
    if isinstance(client, DirectClient):
        return await client.post((url or CHAT_URL).removeprefix("/v1"), body, headers, "x-request-id", timeout)
    return await post_raw(openai, client, (url or CHAT_URL).removeprefix("/v1"), body, headers, "x-request-id",
                          timeout)
