"""``/v1/completions`` (legacy): gpt-3.5-turbo-instruct, davinci-002, babbage-002.

OpenAI's rules (API reference, "Completions",
https://platform.openai.com/docs/api-reference/completions/create, and the
model pages, e.g. https://developers.openai.com/api/docs/models/davinci-002):

* ``prompt`` is a string, an array of strings, an array of token ids (one
  prompt) or an array of token-id arrays; every prompt is completed and billed.
* ``max_tokens`` (default 16) per choice; ``n`` (1–128) choices per prompt;
  ``best_of`` (1–20, at least ``n``) candidates generated server-side per
  prompt, all billed ("it can quickly consume your token quota"); ``logprobs``
  0–5; ``suffix`` text after the completion; each prompt plus ``max_tokens``
  within the model's context window.

The bound, each rule an over-estimate where OpenAI's count is not published:

* **Input**: per prompt, its cl100k_base tokens (a token array: its length)
  + :data:`PROMPT_OVERHEAD` (the ``<|endoftext|>`` document separator an
  empty prompt is completed from) + the ``suffix``'s tokens; summed.
* **Output**: ``max_tokens`` × max(``n``, ``best_of``) × the number of
  prompts. ``logprobs`` returns log probabilities of those same tokens and
  adds none. ``echo`` returns the prompt inside each choice's text; whether
  OpenAI bills the echoed prompt as completion tokens is not documented, so
  with ``echo`` each choice is bounded as if it were: + the prompt's tokens
  × max(``n``, ``best_of``) per prompt.
"""

from __future__ import annotations

from pipeline.money.bounds import MAX_N, Bound, finish_bound
from pipeline.endpoints.caching import is_cacheable
from pipeline.constants import COMPLETIONS_URL
from pipeline.endpoints._common import check_body, encoder, int_field, kind, openai_usage, token_items
from pipeline.errors import LineError
from pipeline.money.pricing import ModelPrice, Usage

#: OpenAI's default ``max_tokens`` on this endpoint
DEFAULT_MAX_TOKENS = 16
MAX_BEST_OF, MAX_LOGPROBS = 20, 5
#: per prompt: the document separator a prompt may be completed from
PROMPT_OVERHEAD = 1
_FIELDS = frozenset({"model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs",
                     "max_tokens", "n", "presence_penalty", "seed", "stop", "stream", "stream_options",
                     "suffix", "temperature", "top_p", "user"})


class Completions:
    url = COMPLETIONS_URL
    line_format = "openai"

    def validate(self, body: dict) -> None:
        check_body(body, self.url, _FIELDS, required=("prompt",))
        n = int_field(body, "n", 1, MAX_N, 1)
        best_of = int_field(body, "best_of", 1, MAX_BEST_OF, None)
        if best_of is not None and best_of < n:
            raise LineError(f"body.best_of ({best_of}) must be at least body.n ({n})")
        int_field(body, "logprobs", 0, MAX_LOGPROBS, None)
        if body.get("echo") is not None and not isinstance(body["echo"], bool):
            raise LineError(f"body.echo must be true or false, got {kind(body['echo'])}")
        if body.get("suffix") is not None and not isinstance(body["suffix"], str):
            raise LineError(f"body.suffix must be a string, got {kind(body['suffix'])}")

    def bound(self, body: dict, price: ModelPrice, *, declared_input_tokens: int | None = None) -> Bound:
        self.validate(body)
        price.require_endpoint(self.url)
        per_choice = int_field(body, "max_tokens", 0, price.max_output_tokens, DEFAULT_MAX_TOKENS)
        choices = max(int_field(body, "n", 1, MAX_N, 1), int_field(body, "best_of", 1, MAX_BEST_OF, 1))
        prompts = self.count(body, price)
        window = price.context_window
        for i, tokens in enumerate(prompts):
            if tokens + per_choice > window:
                where = "body.prompt" if len(prompts) == 1 else f"body.prompt[{i}]"
                raise LineError(f"{where} is {tokens} tokens; with max_tokens {per_choice} that is over "
                                f"{price.model}'s context window of {window} tokens")
        out = per_choice * choices * len(prompts)
        if body.get("echo"):
            out += choices * sum(prompts)
        # not exact: the separator and suffix allowances are over-estimates
        return finish_bound(price, sum(prompts), out, False, declared_input_tokens, one_prompt=False)

    def count(self, body: dict, price: ModelPrice) -> list[int]:
        """The input bound of each prompt: its tokens, the separator and the suffix."""
        encode, n_vocab = encoder(body, price)
        suffix = body.get("suffix") or ""
        extra = PROMPT_OVERHEAD + (len(encode(suffix)) if suffix else 0)
        return [(len(encode(item)) if isinstance(item, str) else item) + extra
                for item in token_items(body["prompt"], "prompt", encode, n_vocab)]

    def usage(self, response_body: dict) -> Usage | None:
        return openai_usage(response_body)

    def cacheable(self, body: dict) -> bool:
        return is_cacheable(body, None)


COMPLETIONS = Completions()
