"""``/v1/responses``: the chat rules of :mod:`pipeline.money.bounds` on the Responses shape.

OpenAI's rules (API reference, "Create a model response",
https://platform.openai.com/docs/api-reference/responses/create):

* ``input`` is a string (one user message) or an array of items: messages
  (role user, assistant, system or developer; content a string or parts
  ``input_text``, ``input_image``, and in assistant history ``output_text`` /
  ``refusal``), ``function_call`` and ``function_call_output`` items.
* ``instructions``: a system (developer) message; ``tools``: function tools
  and built-in ones; ``max_output_tokens``: "an upper bound for the number of
  tokens that can be generated for a response, including visible output
  tokens and reasoning tokens"; ``text.format``: text, json_object or a JSON
  schema; ``reasoning``: effort and summary settings.

The bound, each rule an over-estimate where OpenAI's count is not published
(the same margins as chat completions, :mod:`pipeline.money.bounds`):

* **Input**: the model's tiktoken count of every text, plus the chat framing
  (3 per message and its role, 1 per content part, 3 priming the reply);
  images by the vision formula (an URL or file id: the maximum for the detail);
  function calls, function tools, ``tool_choice`` and a JSON-schema
  ``text.format`` by their JSON tokens × 5/4 + 24 each, plus 32 once with tools.
* **Output**: ``max_output_tokens``, or the model's maximum when absent; a
  value over the model's limit is refused. Reasoning is inside it.
* **Cannot be bounded** (refused with the reason): built-in tools (web
  search, file search, code interpreter, computer use, image generation, MCP,
  shells) are billed per call or by the time they run; ``previous_response_id``
  and ``conversation`` bring a stored history of unknown size; a stored
  ``prompt`` template has text of unknown size; ``background`` responses are
  billed after the call returns; ``service_tier: "priority"`` costs more than
  the standard price. ``service_tier: "flex"`` is allowed: flex is priced
  below standard, and the bound stays at the standard price. Files, audio,
  item references and reasoning items in the input are refused too.
"""

from __future__ import annotations

from pipeline.money.bounds import (OPENAI_TOOLS_OVERHEAD, REPLY_PRIMING, SCHEMA_ITEM_OVERHEAD, TOKENS_PER_MESSAGE,
                                   TOKENS_PER_PART, Bound, _positive, content_tokens, finish_bound,
                                   openai_image_part, schema_tokens, text_part)
from pipeline.endpoints.caching import is_cacheable
from pipeline.constants import RESPONSES_URL
from pipeline.endpoints._common import check_body, kind, openai_usage
from pipeline.errors import LineError
from pipeline.money.pricing import ModelPrice, Usage
from pipeline.money.tokens import count_text_tokens, encoding_name_for

ROLES = ("user", "assistant", "system", "developer")
_FIELDS = frozenset({"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls",
                     "max_output_tokens", "max_tool_calls", "reasoning", "text", "temperature", "top_p",
                     "top_logprobs", "truncation", "store", "metadata", "user", "safety_identifier",
                     "prompt_cache_key", "prompt_cache_retention", "service_tier", "include", "stream",
                     "stream_options"})
_REJECTED = {
    "previous_response_id": "the stored conversation it continues is billed as input, and its size is unknown here",
    "conversation": "the stored conversation is billed as input, and its size is unknown here",
    "prompt": "a stored prompt template's text lives on OpenAI's side, of a size unknown here",
    "background": "a background response is billed after the call returns, outside the reservation",
}
_SERVICE_TIERS = (None, "auto", "default", "flex")
_BUILT_IN = ("built-in tools are billed per call or by the time they run, on top of tokens: "
             "only function tools are priced")


class Responses:
    url = RESPONSES_URL
    line_format = "openai"

    def validate(self, body: dict) -> None:
        check_body(body, self.url, _FIELDS, _REJECTED)
        if body.get("service_tier") not in _SERVICE_TIERS:
            raise LineError(f"body.service_tier {body['service_tier']!r} cannot be bounded: only auto, default "
                            f"and flex are priced (priority costs more than the standard price)"[:200])
        value = body.get("input")
        if not isinstance(value, (str, list)) or value == []:
            raise LineError(f"body.input must be a string or a non-empty array of items, got "
                            f"{'an empty array' if value == [] else kind(value)}")
        if body.get("instructions") is not None and not isinstance(body["instructions"], str):
            raise LineError(f"body.instructions must be a string, got {kind(body['instructions'])}")
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise LineError(f"body.tools must be an array, got {kind(tools)}")
        for j, tool in enumerate(tools or ()):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                name = tool.get("type") if isinstance(tool, dict) else kind(tool)
                raise LineError(f"body.tools[{j}] of type {name!r} cannot be bounded: {_BUILT_IN}"[:300])
        for key in ("reasoning", "text"):
            if body.get(key) is not None and not isinstance(body[key], dict):
                raise LineError(f"body.{key} must be an object, got {kind(body[key])}")
        fmt = (body.get("text") or {}).get("format")
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object",
                                                                                     "json_schema")):
            raise LineError(f"body.text.format {fmt!r} cannot be bounded (text, json_object and json_schema "
                            f"are priced)"[:200])

    def bound(self, body: dict, price: ModelPrice, *, declared_input_tokens: int | None = None) -> Bound:
        self.validate(body)
        price.require_endpoint(self.url)
        out = _positive(body, "max_output_tokens", price.max_output_tokens, price.model) or price.max_output_tokens
        return finish_bound(price, self.input_tokens(body, price), out, False, declared_input_tokens)

    def input_tokens(self, body: dict, price: ModelPrice) -> int:
        """The input bound of a valid body."""
        name = body["model"] if encoding_name_for(body["model"]) else price.model

        def count(text: str) -> int:
            return count_text_tokens(text, name)   # UnknownModelError without an encoding

        n = REPLY_PRIMING
        if body.get("instructions") is not None:   # an empty one is still a developer message
            n += TOKENS_PER_MESSAGE + count("developer") + count(body["instructions"])
        value = body["input"]
        items = [{"role": "user", "content": value}] if isinstance(value, str) else value
        for i, item in enumerate(items):
            n += _item(item, f"body.input[{i}]" if isinstance(value, list) else "body.input", price, count)
        tools = body.get("tools") or []
        if tools:
            n += OPENAI_TOOLS_OVERHEAD + sum(schema_tokens(t, count) for t in tools)
            if body.get("tool_choice") is not None:
                n += schema_tokens(body["tool_choice"], count)
        fmt = (body.get("text") or {}).get("format")
        if fmt is not None:
            n += schema_tokens(fmt, count)
        return n

    def usage(self, response_body: dict) -> Usage | None:
        return openai_usage(response_body)   # input_tokens, output_tokens (reasoning included)

    def cacheable(self, body: dict) -> bool:
        return is_cacheable(body, None)


def _item(item, where: str, price: ModelPrice, count) -> int:
    if not isinstance(item, dict):
        raise LineError(f"{where} must be an object (a message or a function call item), got {kind(item)}")
    kind_ = item.get("type", "message" if "role" in item else None)
    if kind_ == "message":
        role = item.get("role")
        if role not in ROLES:
            raise LineError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}"[:200])
        return TOKENS_PER_MESSAGE + count(role) + _content(item.get("content"), f"{where}.content", price, count)
    if kind_ == "function_call":
        if not isinstance(item.get("name"), str) or not isinstance(item.get("arguments"), str):
            raise LineError(f"{where}: a function_call item needs a name and arguments (a JSON string)")
        return schema_tokens({k: item.get(k) for k in ("call_id", "name", "arguments")}, count)
    if kind_ == "function_call_output":
        output = item.get("output")
        text = count(output) if isinstance(output, str) else _content(output, f"{where}.output", price, count)
        return SCHEMA_ITEM_OVERHEAD + count(str(item.get("call_id", ""))) + text
    raise LineError(f"{where} of type {kind_!r} cannot be bounded: messages, function_call and "
                    f"function_call_output items are priced (item references and reasoning items are "
                    f"expanded on OpenAI's side)"[:300])


def _content(value, where: str, price: ModelPrice, count) -> int:
    def image(part: dict, at: str) -> int:
        url, file_id = part.get("image_url"), part.get("file_id")
        ref = url if isinstance(url, str) else f"file:{file_id}" if isinstance(file_id, str) else None
        return TOKENS_PER_PART + openai_image_part(price, ref, part.get("detail", "auto"), at,
                                                   "input_image needs an image_url or file_id")

    return content_tokens(value, where, count, {
        "input_text": text_part("text", count), "output_text": text_part("text", count),
        "refusal": text_part("refusal", count), "input_image": image},
        "input_text, input_image, output_text and refusal parts are priced; files and audio are not",
        shape=f"a string or an array of content parts, got {kind(value)}", null_ok=False)


RESPONSES = Responses()
