"""``/v1/chat/completions`` (OpenAI) and Anthropic messages: thin adapters.

The rules are :mod:`pipeline.bounds`' (``request_bound`` as it was before
endpoints existed) and :mod:`pipeline.formats`' message checks; nothing here
changes them. Cacheable as :func:`pipeline.cache.is_cacheable` decides for a
line without a ``cache`` flag: ``temperature`` 0.
"""

from __future__ import annotations

from pipeline.bounds import Bound, price_bound
from pipeline.cache import is_cacheable
from pipeline.constants import ANTHROPIC_MESSAGES_URL, CHAT_URL
from pipeline.endpoints._common import kind, openai_usage, require_model
from pipeline.errors import LineError
from pipeline.pricing import ModelPrice, Usage, usage_from_anthropic


class _Messages:
    url: str
    line_format: str
    where: str

    def validate(self, body: dict) -> None:
        # imported here: intake (pipeline.formats) is the caller meant to hold endpoints
        from pipeline.formats import _check_messages

        require_model(body, self.where)
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise LineError(f"field {self.where}messages must be an array, got {kind(messages)}")
        _check_messages(messages, self.where, self.line_format)

    def bound(self, body: dict, price: ModelPrice, *, declared_input_tokens: int | None = None) -> Bound:
        self.validate(body)
        return price_bound(self.line_format, body, price, declared_input_tokens=declared_input_tokens)

    def cacheable(self, body: dict) -> bool:
        return is_cacheable(body, None)


class ChatCompletions(_Messages):
    url, line_format, where = CHAT_URL, "openai", "body."

    def usage(self, response_body: dict) -> Usage | None:
        return openai_usage(response_body)


class AnthropicMessages(_Messages):
    url, line_format, where = ANTHROPIC_MESSAGES_URL, "anthropic", "params."

    def validate(self, body: dict) -> None:
        super().validate(body)
        if "system" in body and not isinstance(body["system"], (str, list)):
            raise LineError(f"params.system must be a string or an array, got {kind(body['system'])}")

    def usage(self, response_body: dict) -> Usage | None:
        usage = response_body.get("usage") if isinstance(response_body, dict) else None
        return usage_from_anthropic(usage) if isinstance(usage, dict) else None


CHAT = ChatCompletions()
MESSAGES = AnthropicMessages()
