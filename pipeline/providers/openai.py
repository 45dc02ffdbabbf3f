"""OpenAI (and OpenAI-compatible) endpoints through ``AsyncOpenAI``: chat completions,
responses, embeddings, completions, moderations, each at its own url.

The body is sent as the user wrote it (``client.post`` with the raw JSON), so
parameters the SDK's typed signature does not know yet still pass through, and
the response is kept as the provider's own JSON.
"""

from __future__ import annotations

import openai

from pipeline.config import Settings
from pipeline.constants import CHAT_URL
from pipeline.providers.base import Answer, post_raw


class OpenAIProvider:
    name = "openai"

    def __init__(self, settings: Settings):
        self.client = openai.AsyncOpenAI(
            api_key=settings.api_key("openai"), base_url=settings.base_url("openai"),
            max_retries=0, timeout=settings.provider_timeout_s,
            http_client=(openai.DefaultAioHttpClient(timeout=settings.provider_timeout_s)
                         if settings.provider_http_client == "aiohttp" else None))

    async def call(self, body: dict, *, headers: dict, url: str | None = None) -> Answer:
        # the client's base url ends in /v1, as the endpoint urls begin
        path = (url or CHAT_URL).removeprefix("/v1")
        return await post_raw(openai, self.client, path, body, headers, "x-request-id")
