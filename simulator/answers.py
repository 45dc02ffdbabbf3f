"""Deterministic simulated answers, billed by the simulator's own rules (``billing.py``).

The answer to a request is derived from a sha256 of its model and prompt
(OpenAI: ``messages``; Anthropic: ``system`` + ``messages``) and the choice
index: the text starts ``"Simulated answer <first 8 hex digits>:"`` and goes
on with 12 to 59 words chosen by the hash. When the request's maximum output
tokens is smaller than the answer, the answer is cut to the longest prefix
(whole words, then characters of the next word) whose token count fits, and
the finish reason says so (``length`` / ``max_tokens``).

What an answer holds: its choices (text, or a tool call, with the output
tokens the choice bills), the prompt tokens, and what prompt caching needs
(``segments`` for Anthropic breakpoints, a prefix key for OpenAI). How much a
call bills is decided per call by :func:`usage` (prompt caching has state;
worst-case mode bills every limit), so the answer itself can be memoised.

- ``n`` choices (OpenAI): each its own text, each billed; the prompt once.
- Tools: with tools and ``tool_choice`` not ``none``, a choice is a tool call
  when the choice is forced (``required``, a named function, Anthropic
  ``any``/``tool``) or, under ``auto``, when its hash says so.
- Reasoning models (o-series, gpt-5) spend hidden reasoning tokens inside the
  limit; Anthropic ``thinking`` returns a thinking block within ``max_tokens``.
"""

from __future__ import annotations

import hashlib
import json

from simulator import billing, caching
from simulator.caching import PromptCache

WORDS = (
    "the of and to in is it that for on with as was at by this from are be or an have not but "
    "all can has more one will out about what when which their there time up other into some "
    "only its over new also after could first any these two may way use well then them many "
    "most such make like"
).split()
assert len(WORDS) == 64
MIN_WORDS = 12
EXTRA_WORDS = 48

#: Maximum output tokens assumed for rate-limit accounting when an OpenAI request does
#: not set ``max_tokens`` / ``max_completion_tokens`` (billing, in worst case, uses the
#: model's maximum output instead)
OPENAI_DEFAULT_MAX_OUTPUT = 4096


def prompt_digest(model: str, *parts) -> bytes:
    blob = json.dumps([model, *parts], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).digest()


def answer_pieces(digest: bytes) -> list[str]:
    """The full answer as pieces (words with their leading space) for a prompt digest."""
    n = MIN_WORDS + digest[8] % EXTRA_WORDS
    stream = hashlib.shake_256(digest).digest(n)
    pieces = ["Simulated", " answer", f" {digest[:4].hex()}:"]
    pieces.extend(" " + WORDS[b & 63] for b in stream)
    pieces[-1] += "."
    return pieces


def capped_text(pieces: list[str], max_tokens: int | None, count) -> tuple[str, bool]:
    """``(text, truncated)``: the answer, cut to fit ``max_tokens`` per ``count(text)``."""
    full = "".join(pieces)
    if max_tokens is None or count(full) <= max_tokens:
        return full, False
    lo, hi = 0, len(pieces) - 1  # largest k with count(pieces[:k]) <= max_tokens; k < len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count("".join(pieces[:mid])) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    prefix = "".join(pieces[:lo])
    nxt = pieces[lo]
    a, b = 0, len(nxt) - 1
    while a < b:
        mid = (a + b + 1) // 2
        if count(prefix + nxt[:mid]) <= max_tokens:
            a = mid
        else:
            b = mid - 1
    return prefix + nxt[:a], True


class Choice:
    __slots__ = ("text", "truncated", "tool_call", "reasoning_tokens", "thinking", "output_tokens")

    def __init__(self, text, truncated, output_tokens, tool_call=None, reasoning_tokens=0, thinking=None):
        self.text = text
        self.truncated = truncated
        self.tool_call = tool_call          # {"name", "arguments" (OpenAI JSON text) / "input" (dict)}
        self.reasoning_tokens = reasoning_tokens
        self.thinking = thinking            # Anthropic thinking text
        self.output_tokens = output_tokens  # all billed output of this choice (reasoning included)


class Answer:
    __slots__ = ("provider", "model", "choices", "input_tokens", "limit", "segments", "cache_prefixes",
                 "cache_ttl_s", "cost")

    def __init__(self, provider, model, choices, input_tokens, limit, cost, segments=(), cache_prefixes=(),
                 cache_ttl_s=0.0):
        self.provider = provider
        self.model = model
        self.choices = choices
        self.input_tokens = input_tokens    # the whole prompt, before any cache
        self.limit = limit                  # output tokens per choice the call may bill
        self.cost = cost                    # rate-limit cost: input tokens + n × limit
        self.segments = segments            # Anthropic: (tokens, ttl, prefix key) in cache order
        self.cache_prefixes = cache_prefixes  # OpenAI: (key, tokens) of each cacheable prefix, shortest first
        self.cache_ttl_s = cache_ttl_s          # OpenAI: how long they stay (prompt_cache_retention)

    # the first choice, for callers that know there is one
    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def truncated(self) -> bool:
        return self.choices[0].truncated

    @property
    def output_tokens(self) -> int:
        return sum(c.output_tokens for c in self.choices)


def _required_args(schema) -> dict:
    props = (schema or {}).get("properties") or {} if isinstance(schema, dict) else {}
    req = (schema or {}).get("required") or [] if isinstance(schema, dict) else []
    return {k: "simulated" for k in req if k in props}


def _openai_tool(body: dict, digest: bytes) -> dict | None:
    tools = [t["function"] for t in body.get("tools") or () if isinstance(t, dict) and "function" in t]
    tools += [f for f in body.get("functions") or () if isinstance(f, dict)]
    if not tools:
        return None
    choice = body.get("tool_choice", body.get("function_call", "auto"))
    if choice == "none":
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or choice).get("name")
        tool = next((t for t in tools if t.get("name") == name), tools[0])
    elif choice == "required" or digest[10] & 1:
        tool = tools[digest[11] % len(tools)]
    else:
        return None
    return {"name": str(tool.get("name", "tool")),
            "arguments": json.dumps(_required_args(tool.get("parameters")))}


def openai_answer(body: dict, encoding: str | None = None, max_output: int | None = None) -> Answer:
    """Raises ``LookupError`` for a model without a tiktoken encoding. ``encoding`` and
    ``max_output`` override what the model's name implies (a named provider's model)."""
    model = body["model"]
    count = billing.openai_counter(model, encoding)
    if count is None:
        raise LookupError(model)
    messages = body["messages"]
    prompt = billing.openai_prompt(body, encoding)
    given = [v for v in (body.get("max_completion_tokens"), body.get("max_tokens")) if v is not None]
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    n = body.get("n") or 1
    reasoning = billing.is_reasoning(model)
    choices = []
    for i in range(n):
        digest = prompt_digest(model, messages) if i == 0 else prompt_digest(model, messages, i)
        spent = 0
        if reasoning:
            spent = 16 + digest[9] % 112
            if limit is not None:
                spent = min(spent, limit // 2)
        room = None if limit is None else limit - spent
        call = _openai_tool(body, digest)
        if call is not None:
            used = 4 + count(call["name"]) + count(call["arguments"])
            if room is None or used <= room:
                choices.append(Choice(None, False, used + spent, tool_call=call, reasoning_tokens=spent))
                continue
        text, truncated = capped_text(answer_pieces(digest), room, count)
        choices.append(Choice(text, truncated, count(text) + spent, reasoning_tokens=spent))
    per_choice = limit if given else (max_output or billing.max_output(model))
    rate_cost = prompt + (limit if given else OPENAI_DEFAULT_MAX_OUTPUT) * n
    return Answer("openai", model, choices, prompt, per_choice, rate_cost,
                  cache_prefixes=openai_prefixes(body, prompt, encoding),
                  cache_ttl_s=caching.openai_ttl_s(body.get("prompt_cache_retention")))


def openai_prefixes(body: dict, prompt: int, encoding: str | None) -> tuple:
    """``(key, tokens)`` of the prompt's cacheable prefixes: tools and response format, then the
    messages up to each boundary (the whole prompt last), under the request's ``prompt_cache_key``."""
    if prompt < caching.OPENAI_MIN_TOKENS:
        return ()
    messages = body["messages"]
    head = (body["model"], body.get("prompt_cache_key"), body.get("tools"), body.get("response_format"))
    out = []
    tokens = billing.openai_prompt({**body, "messages": []}, encoding)   # priming, tools, format
    for k in range(1, len(messages) + 1):   # one message at a time: linear in the conversation
        tokens += billing.openai_prompt({"model": body["model"], "messages": messages[k - 1:k]}, encoding) - 3
        if k == len(messages):
            tokens = prompt
        if tokens >= caching.OPENAI_MIN_TOKENS:
            out.append((prompt_digest(*head, messages[:k]).hex(), tokens))
    return tuple(out)


def _anthropic_tool(body: dict, digest: bytes) -> dict | None:
    tools = [t for t in body.get("tools") or () if isinstance(t, dict)]
    if not tools:
        return None
    choice = body.get("tool_choice") or {"type": "auto"}
    kind = choice.get("type", "auto")
    if kind == "none":
        return None
    if kind == "tool":
        tool = next((t for t in tools if t.get("name") == choice.get("name")), tools[0])
    elif kind == "any" or digest[10] & 1:
        tool = tools[digest[11] % len(tools)]
    else:
        return None
    return {"name": str(tool.get("name", "tool")), "input": _required_args(tool.get("input_schema"))}


def anthropic_answer(body: dict) -> Answer:
    model = body["model"]
    limit = body["max_tokens"]
    segments = billing.anthropic_segments(body)
    prompt = 3 + sum(t for t, _, _ in segments)
    digest = prompt_digest(model, billing.claude_content(body.get("system")),
                           [{**m, "content": billing.claude_content(m.get("content"))} for m in body["messages"]])
    count = billing.claude_count
    thinking, spent = None, 0
    if isinstance(body.get("thinking"), dict) and body["thinking"].get("type") in ("enabled", "adaptive"):
        budget = body["thinking"].get("budget_tokens") or limit
        thinking, _ = capped_text(answer_pieces(digest[::-1]), min(budget, limit - 1), count)
        spent = count(thinking)
    room = limit - spent
    call = _anthropic_tool(body, digest)
    if call is not None:
        used = 5 + count(call["name"]) + count(json.dumps(call["input"]))
        if used <= room:
            choice = Choice(None, False, used + spent, tool_call=call, thinking=thinking)
            return Answer("anthropic", model, [choice], prompt, limit, prompt + limit, segments=segments)
    text, truncated = capped_text(answer_pieces(digest), room, count)
    choice = Choice(text, truncated, count(text) + spent, thinking=thinking)
    return Answer("anthropic", model, [choice], prompt, limit, prompt + limit, segments=segments)


# --------------------------------------------------------------------------- billing a call

def usage(answer: Answer, *, worst_case: bool, cache: PromptCache) -> dict:
    """What this call bills, in the provider's usage shape; updates ``cache``."""
    if answer.provider == "openai":
        return _openai_usage(answer, worst_case, cache)
    return _anthropic_usage(answer, worst_case, cache)


def _openai_usage(answer: Answer, worst_case: bool, cache: PromptCache) -> dict:
    reasoning = billing.is_reasoning(answer.model)
    if worst_case:
        out = answer.limit * len(answer.choices)
        visible = sum(c.output_tokens - c.reasoning_tokens for c in answer.choices)
        reasoning_tokens = out - visible if reasoning else 0
        cached = 0
    else:
        out = answer.output_tokens
        reasoning_tokens = sum(c.reasoning_tokens for c in answer.choices)
        cached = caching.openai_cached(answer.cache_prefixes, answer.input_tokens, answer.cache_ttl_s, cache)
    return {
        "prompt_tokens": answer.input_tokens,
        "completion_tokens": out,
        "total_tokens": answer.input_tokens + out,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    }


def _anthropic_usage(answer: Answer, worst_case: bool, cache: PromptCache) -> dict:
    total = answer.input_tokens
    read = write_5m = write_1h = 0
    if worst_case:
        out = answer.limit
        ttls = {ttl for _, ttl, _ in answer.segments if ttl is not None}
        if ttls:   # the whole prompt written at the longest TTL named
            if "1h" in ttls:
                write_1h = total
            else:
                write_5m = total
    else:
        out = answer.output_tokens
        read, write_5m, write_1h = caching.anthropic_cached(answer.model, answer.segments, cache)
    return {
        "input_tokens": total - read - write_5m - write_1h,
        "output_tokens": out,
        "cache_creation_input_tokens": write_5m + write_1h,
        "cache_read_input_tokens": read,
        "cache_creation": {"ephemeral_5m_input_tokens": write_5m, "ephemeral_1h_input_tokens": write_1h},
        "service_tier": "standard",
    }
