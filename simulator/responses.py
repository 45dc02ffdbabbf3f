"""``POST /v1/responses``: OpenAI's Responses API, answered by the chat machinery and reshaped.

A request is turned into the chat request it amounts to, and answered and
counted exactly as chat completions are (``answers.py``, ``billing.py``):

- ``instructions`` → a leading ``developer`` message;
- ``input`` (a string → one user message; or items: messages with
  ``input_text`` / ``output_text`` / ``input_image`` parts, ``function_call``
  and ``function_call_output`` items; ``reasoning`` items count nothing);
- ``tools`` of type ``function`` (others: 400), ``tool_choice``;
- ``max_output_tokens`` (at least 16, as OpenAI requires) → the output limit,
  reasoning tokens included.

So the simulator's count of a Responses request is the cookbook formula of
its chat twin: the simulator's own rule, written down here for whoever has to
bound it.

The answer is a ``response`` object: ``output[]`` holds a ``reasoning`` item
(reasoning models), then a ``message`` with one ``output_text`` part, or a
``function_call`` item; ``status`` is ``incomplete`` with
``incomplete_details.reason: "max_output_tokens"`` when the limit cut it.
``usage``: ``input_tokens``, ``input_tokens_details.cached_tokens``,
``output_tokens``, ``output_tokens_details.reasoning_tokens``, ``total_tokens``.
"""

from __future__ import annotations

import time

from simulator import answers
from simulator.protocol import Problem, is_int, require

MIN_OUTPUT_TOKENS = 16
ROLES = ("user", "assistant", "system", "developer")
UNSUPPORTED = ("previous_response_id", "conversation", "background", "prompt")


class ResponseAnswer:
    __slots__ = ("chat", "body", "cost", "model")

    def __init__(self, chat: answers.Answer, body: dict):
        self.chat = chat                  # the chat twin's answer
        self.body = body                  # the Responses request (echoed fields)
        self.cost = chat.cost
        self.model = chat.model


def _parts(content, where: str):
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Problem(f"Invalid type for '{where}.content': expected a string or an array.",
                      f"{where}.content", "invalid_type")
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            out.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "refusal":
            out.append({"type": "text", "text": str(part.get("refusal", ""))})
        elif kind == "input_image":
            url = part.get("image_url") or part.get("file_id") or ""
            out.append({"type": "image_url", "image_url": {"url": str(url), "detail": part.get("detail", "auto")}})
        else:
            raise Problem(f"Invalid value: '{kind}'. The simulator supports input_text, output_text and "
                          f"input_image parts.", f"{where}.content[{j}].type", "invalid_value")
    return out


def chat_twin(body: dict) -> dict:
    """The chat completions request a Responses request amounts to; raises Problem."""
    messages = []
    if body.get("instructions") is not None:
        if not isinstance(body["instructions"], str):
            raise Problem("Invalid type for 'instructions': expected a string.", "instructions", "invalid_type")
        messages.append({"role": "developer", "content": body["instructions"]})
    value = body["input"]
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
    elif isinstance(value, list):
        for i, item in enumerate(value):
            where = f"input[{i}]"
            if not isinstance(item, dict):
                raise Problem(f"Invalid type for '{where}': expected an object.", where, "invalid_type")
            kind = item.get("type", "message")
            if kind == "message":
                if item.get("role") not in ROLES:
                    raise Problem(f"Invalid value: '{item.get('role')}'. Supported values are: "
                                  + ", ".join(f"'{r}'" for r in ROLES) + ".", f"{where}.role", "invalid_value")
                messages.append({"role": item["role"], "content": _parts(item.get("content"), where)})
            elif kind == "function_call":
                messages.append({"role": "assistant", "content": None, "tool_calls": [{
                    "id": str(item.get("call_id", "")), "type": "function",
                    "function": {"name": str(item.get("name", "")), "arguments": str(item.get("arguments", ""))}}]})
            elif kind == "function_call_output":
                out = item.get("output", "")
                messages.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")),
                                 "content": out if isinstance(out, str) else _parts(out, where)})
            elif kind != "reasoning":
                raise Problem(f"Invalid value: '{kind}'. The simulator supports message, function_call, "
                              f"function_call_output and reasoning items.", f"{where}.type", "invalid_value")
    else:
        raise Problem("Invalid type for 'input': expected a string or an array of input items.",
                      "input", "invalid_type")
    if not messages:
        raise Problem("Invalid 'input': empty array.", "input", "empty_array")
    chat = {"model": body["model"], "messages": messages}
    tools = []
    for i, tool in enumerate(body.get("tools") or ()):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else tool
            raise Problem(f"Invalid value: '{kind}'. The simulator supports tools of type 'function' only.",
                          f"tools[{i}].type", "invalid_value")
        tools.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")
                                                       if k in tool}})
    if tools:
        chat["tools"] = tools
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice is not None:
        chat["tool_choice"] = choice
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    for name in ("prompt_cache_key", "prompt_cache_retention"):   # they route and keep its prefix
        if body.get(name) is not None:
            chat[name] = body[name]
    return chat


def validate(body: dict) -> None:
    require(body, "input")
    mot = body.get("max_output_tokens")
    if mot is not None and not (is_int(mot) and mot >= MIN_OUTPUT_TOKENS):
        raise Problem(f"Invalid 'max_output_tokens': integer below minimum value. Expected a value >= "
                      f"{MIN_OUTPUT_TOKENS}, but got {mot!r} instead.", "max_output_tokens", "integer_below_min_value")
    for name in UNSUPPORTED:
        if body.get(name) is not None:
            raise Problem(f"The simulator does not support '{name}'.", name, "invalid_value")
    if body.get("stream"):
        raise Problem("The simulator does not support streaming (stream=true).", "stream", "invalid_value")
    chat_twin(body)


def answer(body: dict, model) -> ResponseAnswer:
    if model is None or model.encoding is None:
        raise LookupError(body["model"])
    return ResponseAnswer(answers.openai_answer(chat_twin(body), model.encoding, model.max_output), body)


def usage(ans: ResponseAnswer, worst_case: bool, cache) -> dict:
    u = answers.usage(ans.chat, worst_case=worst_case, cache=cache)
    return {"input_tokens": u["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
                                     "cache_write_tokens": 0},
            "output_tokens": u["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": u["completion_tokens_details"]["reasoning_tokens"]},
            "total_tokens": u["total_tokens"]}


def reply(ans: ResponseAnswer, billed: dict, model: str, new_id, tier: str) -> dict:
    body, choice = ans.body, ans.chat.choices[0]
    output = []
    if billed["output_tokens_details"]["reasoning_tokens"]:
        output.append({"id": new_id("rs_"), "type": "reasoning", "summary": []})
    if choice.tool_call is not None:
        output.append({"id": new_id("fc_"), "type": "function_call", "status": "completed",
                       "call_id": new_id("call_"), "name": choice.tool_call["name"],
                       "arguments": choice.tool_call["arguments"]})
    else:
        output.append({"id": new_id("msg_"), "type": "message", "status": "incomplete" if choice.truncated
                       else "completed", "role": "assistant",
                       "content": [{"type": "output_text", "text": choice.text, "annotations": [], "logprobs": []}]})
    now = int(time.time())
    return {
        "id": new_id("resp_"), "object": "response", "created_at": now,
        "status": "incomplete" if choice.truncated else "completed",
        "completed_at": None if choice.truncated else now, "background": False, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if choice.truncated else None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": None, "model": model, "output": output, "parallel_tool_calls": True,
        "previous_response_id": None, "prompt_cache_key": body.get("prompt_cache_key"),
        "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None},
        "safety_identifier": None, "service_tier": tier if tier == "flex" else "default", "store": True,
        "temperature": body.get("temperature", 1.0), "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
        "top_logprobs": 0, "top_p": body.get("top_p", 1.0), "truncation": "disabled",
        "usage": billed, "user": None, "metadata": body.get("metadata") or {},
    }
