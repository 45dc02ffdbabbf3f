"""Anthropic messages through ``AsyncAnthropic`` (raw JSON in and out, like the OpenAI provider)."""

from __future__ import annotations

import anthropic

from pipeline.config import Settings
from pipeline.errors import InfrastructureError, LineError
from pipeline.providers.base import Answer, post_raw


class AnthropicProvider:
    name = "anthropic"

    def __init__(self, settings: Settings):
        self.client = anthropic.AsyncAnthropic(
            api_key=settings.api_key("anthropic"), base_url=settings.base_url("anthropic"),
            max_retries=0, timeout=settings.provider_timeout_s,
            http_client=(anthropic.DefaultAioHttpClient(timeout=settings.provider_timeout_s)
                         if settings.provider_http_client == "aiohttp" else None))

    async def call(self, body: dict, *, headers: dict, url: str | None = None) -> Answer:
        return await post_raw(anthropic, self.client, url or "/v1/messages", body, headers, "request-id")


def token_counter(settings: Settings):
    """Anthropic's count_tokens endpoint as ``counter(body) -> int`` (used at submit when a key is set).

    Only the fields count_tokens accepts are sent; a refusal becomes a
    LineError with the provider's message, so the line is rejected, not guessed.
    """
    client = anthropic.Anthropic(api_key=settings.api_key("anthropic"), base_url=settings.base_url("anthropic"),
                                 max_retries=2, timeout=settings.provider_timeout_s)
    fields = ("model", "messages", "system", "tools", "tool_choice", "thinking")

    def count(body: dict) -> int:
        try:
            return client.messages.count_tokens(**{k: body[k] for k in fields if k in body}).input_tokens
        except anthropic.APIStatusError as e:
            raise LineError(f"Anthropic count_tokens refused the request: {e.message}") from e
        except anthropic.APIError as e:
            raise InfrastructureError(f"Anthropic count_tokens unreachable: {e}") from e
    return count
