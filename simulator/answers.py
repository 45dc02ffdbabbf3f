"""Deterministic simulated answers with real token counts.

The answer to a request is derived from a sha256 of its model and prompt
(OpenAI: ``messages``; Anthropic: ``system`` + ``messages``): the text starts
``"Simulated answer <first 8 hex digits>:"`` and goes on with 12 to 59 words
chosen by the hash. Each word is one token in o200k_base and cl100k_base, so
lengths are stable. When the request's maximum output tokens is smaller than
the answer, the answer is cut to the longest prefix (whole words, then characters of
the next word) whose token count fits, and
the finish reason says so (``length`` / ``max_tokens``).

Token counts come from :mod:`pipeline.tokens`:
- OpenAI: ``prompt_tokens = count_chat_tokens(messages, model)``,
  ``completion_tokens = count_text_tokens(content, model)`` (exact);
- Anthropic: ``input_tokens = count_request("anthropic", model, body).tokens``
  (an estimate, as Claude's tokenizer is not public) and ``output_tokens`` the
  same estimate's encoding (o200k_base) applied to the answer text.
"""

from __future__ import annotations

import hashlib
import json

WORDS = (
    "the of and to in is it that for on with as was at by this from are be or an have not but "
    "all can has more one will out about what when which their there time up other into some "
    "only its over new also after could first any these two may way use well then them many "
    "most such make like"
).split()
assert len(WORDS) == 64
MIN_WORDS = 12
EXTRA_WORDS = 48

#: Maximum output tokens assumed for rate-limit accounting when an OpenAI
#: request does not set ``max_tokens`` / ``max_completion_tokens``.
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
    # then as many characters of the next piece as still fit (cut mid-word, like a
    # model stopped at a token boundary)
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


class Answer:
    __slots__ = ("text", "truncated", "input_tokens", "output_tokens", "cost")

    def __init__(self, text, truncated, input_tokens, output_tokens, cost):
        self.text = text
        self.truncated = truncated
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.cost = cost  # rate-limit cost: input tokens + max output tokens


def openai_answer(body: dict) -> Answer:
    """Raises ``UnknownModelError`` for a model without a tiktoken encoding."""
    from pipeline import tokens

    model = body["model"]
    messages = body["messages"]
    prompt = tokens.count_chat_tokens(messages, model)
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    text, truncated = capped_text(answer_pieces(prompt_digest(model, messages)), limit,
                                  lambda s: tokens.count_text_tokens(s, model))
    completion = tokens.count_text_tokens(text, model)
    cost = prompt + (limit if limit is not None else OPENAI_DEFAULT_MAX_OUTPUT)
    return Answer(text, truncated, prompt, completion, cost)


def anthropic_answer(body: dict) -> Answer:
    from pipeline import tokens

    model = body["model"]
    prompt = tokens.count_request("anthropic", model, body).tokens
    enc = tokens.get_encoding(tokens.ESTIMATE_ENCODING).encode_ordinary
    limit = body["max_tokens"]
    digest = prompt_digest(model, body.get("system"), body["messages"])
    text, truncated = capped_text(answer_pieces(digest), limit, lambda s: len(enc(s)))
    return Answer(text, truncated, prompt, len(enc(text)), prompt + limit)
