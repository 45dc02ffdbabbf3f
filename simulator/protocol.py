"""Request validation and response shapes of the two provider APIs.

Shared by the synchronous endpoints and the batch endpoints, so a request in
a batch is validated and answered exactly as it would be on its own.
"""

from __future__ import annotations

import json
import time

from simulator import caching
from simulator.answers import Answer

OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
ANTHROPIC_ROLES = ("user", "assistant")


class Problem(Exception):
    """A request the API refuses: status, message, and (OpenAI) param and code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status
        self.kind = kind


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise Problem("We could not parse the JSON body of your request. (HINT: This likely means "
                      "you aren't using your HTTP library correctly.)") from None
    if not isinstance(body, dict):
        raise Problem("The request body must be a JSON object.")
    return body


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value) -> bool:
    return is_int(value) and value >= 1


def require(body: dict, field: str) -> None:
    """OpenAI's 400 for a body without a ``model`` string or without ``field``."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise Problem("Missing required parameter: 'model'.", "model", "missing_required_parameter")
    if field not in body:
        raise Problem(f"Missing required parameter: '{field}'.", field, "missing_required_parameter")


# --------------------------------------------------------------------------- OpenAI

def validate_openai_chat(body: dict) -> None:
    if "model" not in body:
        raise Problem("Missing required parameter: 'model'.", "model", "missing_required_parameter")
    if not isinstance(body["model"], str) or not body["model"]:
        raise Problem("Invalid type for 'model': expected a non-empty string.", "model", "invalid_type")
    if "messages" not in body:
        raise Problem("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise Problem("Invalid type for 'messages': expected an array.", "messages", "invalid_type")
    if not messages:
        raise Problem("Invalid 'messages': empty array. Expected an array with minimum length 1, "
                      "but got an empty array instead.", "messages", "empty_array")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise Problem(f"Invalid type for 'messages[{i}]': expected an object.",
                          f"messages[{i}]", "invalid_type")
        role = msg.get("role")
        if role is None:
            raise Problem(f"Missing required parameter: 'messages[{i}].role'.",
                          f"messages[{i}].role", "missing_required_parameter")
        if role not in OPENAI_ROLES:
            raise Problem(f"Invalid value: '{role}'. Supported values are: "
                          + ", ".join(f"'{r}'" for r in OPENAI_ROLES) + ".",
                          f"messages[{i}].role", "invalid_value")
        content = msg.get("content")
        if content is None and not (role == "assistant" and (msg.get("tool_calls") or msg.get("function_call"))):
            raise Problem(f"Missing required parameter: 'messages[{i}].content'.",
                          f"messages[{i}].content", "missing_required_parameter")
        if content is not None and not isinstance(content, (str, list)):
            raise Problem(f"Invalid type for 'messages[{i}].content': expected one of a string "
                          f"or array of objects.", f"messages[{i}].content", "invalid_type")
    for name in ("max_tokens", "max_completion_tokens"):
        if body.get(name) is not None and not _positive_int(body[name]):
            raise Problem(f"Invalid '{name}': expected an integer of at least 1, got {body[name]!r}.",
                          name, "invalid_value")
    n = body.get("n")
    if n is not None and not (_positive_int(n) and n <= 128):
        raise Problem(f"Invalid 'n': integer above maximum value. Expected a value <= 128, but got {n!r} "
                      f"instead.", "n", "invalid_value")
    if body.get("stream"):
        raise Problem("The simulator does not support streaming (stream=true).", "stream", "invalid_value")


def openai_error(p: Problem) -> dict:
    return {"error": {"message": p.message, "type": p.kind, "param": p.param, "code": p.code}}


def openai_error_body(message: str, kind: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _openai_message(choice) -> dict:
    msg = {"role": "assistant", "content": choice.text, "refusal": None, "annotations": []}
    if choice.tool_call is not None:
        msg["tool_calls"] = [{"id": f"call_{abs(hash(choice.tool_call['name'])) % 10**12:012d}",
                              "type": "function", "function": dict(choice.tool_call)}]
    return msg


def _finish(choice) -> str:
    if choice.tool_call is not None:
        return "tool_calls"
    return "length" if choice.truncated else "stop"


def chat_completion(answer: Answer, usage: dict, model: str, completion_id: str,
                    service_tier: str = "default") -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, "message": _openai_message(c), "logprobs": None, "finish_reason": _finish(c)}
                    for i, c in enumerate(answer.choices)],
        "usage": usage,
        "service_tier": service_tier,
        "system_fingerprint": "fp_llmbatch_simulator",
    }


# --------------------------------------------------------------------------- Anthropic

def validate_anthropic_message(body: dict) -> None:
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            raise Problem(f"{name}: Field required", name)
    if not isinstance(body["model"], str) or not body["model"]:
        raise Problem("model: Input should be a valid string", "model")
    if not _positive_int(body["max_tokens"]):
        raise Problem("max_tokens: Input should be a valid integer greater than or equal to 1", "max_tokens")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise Problem("messages: Input should be a valid list", "messages")
    if not messages:
        raise Problem("messages: at least one message is required", "messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise Problem(f"messages.{i}: Input should be a valid dictionary", f"messages.{i}")
        if msg.get("role") not in ANTHROPIC_ROLES:
            raise Problem(f"messages.{i}.role: Input should be 'user' or 'assistant'", f"messages.{i}.role")
        content = msg.get("content")
        if content is None:
            raise Problem(f"messages.{i}.content: Field required", f"messages.{i}.content")
        if not isinstance(content, (str, list)):
            raise Problem(f"messages.{i}.content: Input should be a valid string or list",
                          f"messages.{i}.content")
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise Problem("system: Input should be a valid string or list", "system")
    if body.get("stream"):
        raise Problem("stream: the simulator does not support streaming", "stream")
    refused = caching.check_anthropic_breakpoints(body)
    if refused:
        raise Problem(refused, "cache_control")
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if not _positive_int(budget) or budget < 1024 or budget >= body["max_tokens"]:
            raise Problem("thinking.budget_tokens: must be at least 1024 and less than max_tokens",
                          "thinking.budget_tokens")


def anthropic_error(p: Problem, request_id: str | None = None) -> dict:
    return anthropic_error_body(p.kind, p.message, request_id)


def anthropic_error_body(kind: str, message: str, request_id: str | None = None) -> dict:
    body = {"type": "error", "error": {"type": kind, "message": message}}
    if request_id:
        body["request_id"] = request_id
    return body


def anthropic_message(answer: Answer, usage: dict, model: str, message_id: str) -> dict:
    choice = answer.choices[0]
    content = []
    if choice.thinking is not None:
        content.append({"type": "thinking", "thinking": choice.thinking, "signature": "simulated"})
    if choice.tool_call is not None:
        content.append({"type": "tool_use", "id": f"toolu_{message_id[-12:]}", "name": choice.tool_call["name"],
                        "input": choice.tool_call["input"]})
        stop = "tool_use"
    else:
        content.append({"type": "text", "text": choice.text})
        stop = "max_tokens" if choice.truncated else "end_turn"
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage,
    }
