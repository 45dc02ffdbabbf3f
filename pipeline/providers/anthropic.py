"""The Anthropic API shape (kind ``anthropic``) through ``AsyncAnthropic``: raw JSON in and out, like
the OpenAI shape (pipeline/providers/openai.py)."""

from __future__ import annotations

import anthropic

from pipeline.config import Settings
from pipeline.constants import ANTHROPIC_MESSAGES_URL
from pipeline.errors import InfrastructureError, LineError
from pipeline.providers.base import Answer, post_raw
from pipeline.providers.registry import KeySpec, ProviderSpec


def make_client(spec: ProviderSpec, key: KeySpec, settings: Settings):
    """One SDK client for one key of the provider (SDK retries off: pipeline/providers/retries.py)."""
    return anthropic.AsyncAnthropic(
        api_key=key.reveal(), base_url=spec.base_url, max_retries=0, timeout=settings.provider_timeout_s,
        http_client=(anthropic.DefaultAioHttpClient(timeout=settings.provider_timeout_s)
                     if settings.provider_http_client in ("aiohttp", "direct") else None))


async def call(client, spec: ProviderSpec, body: dict, headers: dict, url: str | None = None,
               timeout: float | None = None) -> Answer:
    return await post_raw(anthropic, client, url or ANTHROPIC_MESSAGES_URL, body, headers, "request-id", timeout)


def token_counter(settings: Settings, spec: ProviderSpec):
    """Anthropic's count_tokens endpoint as ``counter(body) -> int`` (used at submit when a key is set).

    Only the fields count_tokens accepts are sent; a refusal becomes a
    LineError with the provider's message, so the line is rejected, not guessed.
    """
    client = anthropic.Anthropic(api_key=spec.keys[0].reveal(), base_url=spec.base_url,
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
