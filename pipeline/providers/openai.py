"""OpenAI chat completions through ``AsyncOpenAI``.

The body is sent as the user wrote it (``client.post`` with the raw JSON), so
parameters the SDK's typed signature does not know yet still pass through, and
the response is kept as the provider's own JSON.
"""

from __future__ import annotations

import time

import openai

from pipeline.config import Settings
from pipeline.providers import http_response
from pipeline.errors import RetryableProviderError
from pipeline.providers import Answer, classify_status


class OpenAIProvider:
    name = "openai"

    def __init__(self, settings: Settings):
        self.client = openai.AsyncOpenAI(
            api_key=settings.api_key("openai"), base_url=settings.base_url("openai"),
            max_retries=0, timeout=settings.provider_timeout_s,
            http_client=(openai.DefaultAioHttpClient(timeout=settings.provider_timeout_s)
                         if settings.provider_http_client == "aiohttp" else None))

    async def call(self, body: dict, *, headers: dict) -> Answer:
        started = time.monotonic()
        try:
            resp = await self.client.post(
                "/chat/completions", body=body, cast_to=http_response, options={"headers": headers})
        except openai.APIStatusError as e:
            raise classify_status(e.status_code, e.message, e.request_id, e.response.headers) from e
        except openai.APITimeoutError as e:
            raise RetryableProviderError("timeout: the provider did not answer in time") from e
        except openai.APIConnectionError as e:
            raise RetryableProviderError(f"connection error: {e}") from e
        return Answer(body=resp.json(), status_code=resp.status_code,
                      request_id=resp.headers.get("x-request-id"),
                      latency_ms=int((time.monotonic() - started) * 1000), headers=dict(resp.headers))
