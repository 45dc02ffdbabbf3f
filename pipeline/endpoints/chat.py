"""``/v1/chat/completions`` (OpenAI) and Anthropic messages: thin adapters.

The rules are :mod:`pipeline.money.bounds`' (``request_bound`` as it was before
endpoints existed) and the message checks below (intake's before endpoints existed); nothing
here changes them. Cacheable as :func:`pipeline.endpoints.caching.is_cacheable` decides for a
line without a ``cache`` flag: ``temperature`` 0.
"""

from __future__ import annotations

from pipeline.money.bounds import Bound, price_bound
from pipeline.endpoints.caching import is_cacheable
from pipeline.constants import ANTHROPIC_MESSAGES_URL, CHAT_URL
from pipeline.endpoints._common import kind, openai_usage, require_model
from pipeline.errors import LineError, UnknownModelError
from pipeline.money.pricing import ModelPrice, Usage, usage_from_anthropic


ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
ANTHROPIC_ROLES = {"user", "assistant"}


def check_messages(messages: list, where: str, line_format: str = "openai") -> None:
    """The messages of a chat or Anthropic body: roles the format takes, content as it allows
    (``line_format``: the endpoint's, ``openai`` or ``anthropic``)."""
    if not messages:
        raise LineError(f"field {where}messages must not be empty")
    roles = ROLES if line_format == "openai" else ANTHROPIC_ROLES
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise LineError(f"{where}messages[{i}] must be an object, got {kind(m)}")
        role = m.get("role")
        if role not in roles:
            hint = " (Anthropic takes the system prompt in params.system)" if role == "system" else ""
            raise LineError(f"{where}messages[{i}].role must be one of {', '.join(sorted(roles))}, "
                            f"got {role!r}{hint}")
        content = m.get("content")
        if content is None and (line_format == "anthropic" or role != "assistant"):
            raise LineError(f"{where}messages[{i}] has no content")
        if content is not None and not isinstance(content, (str, list)):
            raise LineError(f"{where}messages[{i}].content must be a string or an array, got {kind(content)}")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict):
                    raise LineError(f"{where}messages[{i}].content[{j}] must be an object "
                                    f"(a content part such as {{\"type\": \"text\", \"text\": ...}}), "
                                    f"got {kind(part)}")


class _Messages:
    url: str
    line_format: str
    where: str

    def validate(self, body: dict) -> None:
        require_model(body, self.where)
        if "messages" not in body:
            raise LineError(f"missing field {self.where}messages")
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise LineError(f"field {self.where}messages must be an array, got {kind(messages)}")
        check_messages(messages, self.where, self.line_format)

    def bound(self, body: dict, price: ModelPrice, *, declared_input_tokens: int | None = None) -> Bound:
        self.validate(body)
        if ("anthropic" if price.kind == "anthropic" else "openai") != self.line_format:
            # the API shape is the provider's kind (pipeline/providers/registry.py), not its name
            raise UnknownModelError(f"model {body['model']} is served by {price.provider}, not {self.line_format}")
        return price_bound(price.provider, body, price, declared_input_tokens=declared_input_tokens)

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
