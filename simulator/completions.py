"""``POST /v1/completions``: OpenAI's legacy text completions, answered and billed by the simulator.

- ``prompt``: a string, an array of strings, an array of token ids or an
  array of token-id arrays; each prompt is answered on its own.
- ``max_tokens`` defaults to 16 (OpenAI's default); each choice is cut to it
  (``finish_reason: "length"``).
- ``best_of`` generations are made per prompt and all are billed; the first
  ``n`` are returned (``best_of`` ≥ ``n``, at most 20).
- ``echo`` puts the prompt before the completion (the prompt is not billed twice).
- Choices are numbered prompt by prompt: prompt ``i``, choice ``j`` → index ``i·n + j``.

Usage: ``prompt_tokens`` = the tokens of every prompt (the model's
vocabulary, no chat overhead), ``completion_tokens`` = every generation's
tokens. Worst case: every generation runs to ``max_tokens``.

The built-in OpenAI provider serves the completion models
(gpt-3.5-turbo-instruct, davinci-002, babbage-002) and answers a chat model
with OpenAI's 404; a named OpenAI-compatible provider serves every model it
lists here, as vLLM or Together do.
"""

from __future__ import annotations

import time

from simulator import billing
from simulator.answers import answer_pieces, capped_text, prompt_digest
from simulator.protocol import Problem, is_int, require

DEFAULT_MAX_TOKENS = 16
MAX_BEST_OF = 20


class CompletionAnswer:
    __slots__ = ("model", "prompts", "prompt_tokens", "choices", "generated", "best_of", "limit", "cost", "echo")

    def __init__(self, model, prompts, prompt_tokens, choices, generated, best_of, limit, echo=False):
        self.model = model
        self.echo = echo
        self.prompts = prompts              # prompt texts (echo)
        self.prompt_tokens = prompt_tokens
        self.choices = choices              # returned: (prompt index, text, truncated)
        self.generated = generated          # output tokens of every generation (billed)
        self.best_of = best_of
        self.limit = limit
        self.cost = prompt_tokens + len(prompts) * best_of * limit


def _prompts(value) -> list:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(is_int(x) for x in value):
        return [value]
    if isinstance(value, list) and value and all(
            isinstance(x, str) or (isinstance(x, list) and all(is_int(t) for t in x)) for x in value):
        return value
    raise Problem("Invalid type for 'prompt': expected a string, an array of strings, an array of tokens "
                  "or an array of token arrays.", "prompt", "invalid_type")


def validate(body: dict) -> None:
    require(body, "prompt")
    _prompts(body["prompt"])
    mt = body.get("max_tokens")
    if mt is not None and not (is_int(mt) and mt >= 0):
        raise Problem(f"Invalid 'max_tokens': expected a non-negative integer, got {mt!r}.",
                      "max_tokens", "invalid_value")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not (is_int(n) and 1 <= n <= 128):
        raise Problem(f"Invalid 'n': expected an integer from 1 to 128, got {n!r}.", "n", "invalid_value")
    best_of = body.get("best_of")
    if best_of is not None:
        if not (is_int(best_of) and 1 <= best_of <= MAX_BEST_OF):
            raise Problem(f"Invalid 'best_of': expected an integer from 1 to {MAX_BEST_OF}, got {best_of!r}.",
                          "best_of", "invalid_value")
        if best_of < n:
            raise Problem("best_of must be greater than or equal to n.", "best_of", "invalid_value")
    if body.get("stream"):
        raise Problem("The simulator does not support streaming (stream=true).", "stream", "invalid_value")


def answer(body: dict, model, builtin: bool) -> CompletionAnswer:
    from simulator.accounts import COMPLETION_MODELS

    name = body["model"]
    if model is None or model.encoding is None:
        raise LookupError(name)
    if builtin and name not in COMPLETION_MODELS:
        raise Problem("This is a chat model and not supported in the v1/completions endpoint. "
                      "Did you mean to use v1/chat/completions?", "model", None, status=404)
    enc = billing.encoding(model.encoding)

    def count(s: str) -> int:
        return len(enc.encode_ordinary(s))

    limit = body.get("max_tokens")
    if limit is None:
        limit = DEFAULT_MAX_TOKENS
    n = body.get("n") or 1
    best_of = body.get("best_of") or n
    texts, prompt_tokens, choices, generated = [], 0, [], []
    for pi, p in enumerate(_prompts(body["prompt"])):
        if isinstance(p, list):
            prompt_tokens += len(p)
            try:
                text = enc.decode(p)
            except Exception:
                text = ""
        else:
            prompt_tokens += count(p)
            text = p
        texts.append(text)
        for g in range(best_of):
            digest = prompt_digest(name, "completion", p, g)
            out, cut = capped_text(answer_pieces(digest), limit, count) if limit else ("", True)
            generated.append(count(out))
            if g < n:
                choices.append((pi, out, cut))
    return CompletionAnswer(name, texts, prompt_tokens, choices, generated, best_of, limit, bool(body.get("echo")))


def usage(ans: CompletionAnswer, worst_case: bool = False) -> dict:
    out = len(ans.prompts) * ans.best_of * ans.limit if worst_case else sum(ans.generated)
    return {"prompt_tokens": ans.prompt_tokens, "completion_tokens": out,
            "total_tokens": ans.prompt_tokens + out}


def reply(ans: CompletionAnswer, billed: dict, model: str, new_id) -> dict:
    return {
        "id": new_id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"text": (ans.prompts[pi] if ans.echo else "") + text, "index": i, "logprobs": None,
                     "finish_reason": "length" if cut else "stop"}
                    for i, (pi, text, cut) in enumerate(ans.choices)],
        "usage": billed, "system_fingerprint": "fp_llmbatch_simulator",
    }
