"""``/v1/embeddings``: exact offline counts, OpenAI's limits as LineErrors.

OpenAI's rules (API reference, "Create embeddings",
https://platform.openai.com/docs/api-reference/embeddings/create, and the
model pages, https://developers.openai.com/api/docs/models/text-embedding-3-small):

* ``input`` is a string, an array of strings, an array of token ids (one
  item) or an array of token-id arrays; no empty string; at most
  :data:`MAX_ITEMS` items; each item at most the model's input limit (8,192
  tokens: the price book's ``context_window``); at most
  :data:`MAX_REQUEST_TOKENS` summed over the items of one request.
* Billed: the input tokens only, counted per item with the model's encoding
  (cl100k_base for text-embedding-3-* and ada-002) and summed; a token array
  counts as its length. Output: 0 tokens.
* ``dimensions`` only for text-embedding-3 models, at most the model's
  vector length (the price book's ``dimensions``); ``encoding_format`` float or
  base64.

The count is exact for plain text: strings are encoded as ordinary text, so a
string holding special-token text (``<|endoftext|>``) is counted as its
characters, which is at least what OpenAI counts (``tokens_exact`` is then
False). Embeddings are deterministic, so every request is cacheable.
"""

from __future__ import annotations

from pipeline.money.bounds import Bound, finish_bound
from pipeline.constants import EMBEDDINGS_URL
from pipeline.endpoints._common import check_body, encoder, int_field, openai_usage, token_items
from pipeline.errors import LineError
from pipeline.money.pricing import ModelPrice, Usage

#: OpenAI: "any array must be 2048 dimensions or less"
MAX_ITEMS = 2048
#: OpenAI: "all embedding models enforce a maximum of 300,000 tokens summed across all inputs"
MAX_REQUEST_TOKENS = 300_000
#: the models whose vectors ``dimensions`` may shorten ("text-embedding-3 and later models")
SHORTENABLE = ("text-embedding-3-",)
_FIELDS = frozenset({"model", "input", "dimensions", "encoding_format", "user"})


class Embeddings:
    url = EMBEDDINGS_URL
    line_format = "openai"

    def validate(self, body: dict) -> None:
        check_body(body, self.url, _FIELDS, required=("input",))
        if body.get("encoding_format") not in (None, "float", "base64"):
            raise LineError(f"body.encoding_format must be float or base64, got {body['encoding_format']!r}"[:200])
        int_field(body, "dimensions", 1, 1 << 20, None)
        if body.get("user") is not None and not isinstance(body["user"], str):
            raise LineError("body.user must be a string")

    def bound(self, body: dict, price: ModelPrice, *, declared_input_tokens: int | None = None) -> Bound:
        self.validate(body)
        price.require_endpoint(self.url)
        counts, exact = self.count(body, price)
        dims = body.get("dimensions")
        if dims is not None:
            if not price.model.startswith(SHORTENABLE):
                raise LineError(f"body.dimensions is only for text-embedding-3 models, not {price.model}")
            if dims > price.dimensions:
                raise LineError(f"body.dimensions is {dims}, over {price.model}'s {price.dimensions}")
        return finish_bound(price, sum(counts), 0, exact, declared_input_tokens, one_prompt=False)

    def count(self, body: dict, price: ModelPrice) -> tuple[list[int], bool]:
        """The billed tokens of each input item, checked against OpenAI's limits, and whether
        the count is exact."""
        encode, n_vocab = encoder(body, price)
        items = token_items(body["input"], "input", encode, n_vocab)
        if len(items) > MAX_ITEMS:
            raise LineError(f"body.input has {len(items)} items, over OpenAI's {MAX_ITEMS} per request")
        counts: list[int] = []
        exact = True
        for i, item in enumerate(items):
            where = "body.input" if isinstance(body["input"], str) else f"body.input[{i}]"
            if isinstance(item, str):
                if not item:
                    raise LineError(f"{where} is an empty string, which OpenAI refuses")
                exact = exact and "<|" not in item
                item = len(encode(item))
            if item > price.context_window:
                raise LineError(f"{where} is {item} tokens, over {price.model}'s {price.context_window} per input")
            counts.append(item)
        if sum(counts) > MAX_REQUEST_TOKENS:
            raise LineError(f"body.input is {sum(counts)} tokens in all, over OpenAI's {MAX_REQUEST_TOKENS} "
                            f"per request: split it over several lines")
        return counts, exact

    def usage(self, response_body: dict) -> Usage | None:
        return openai_usage(response_body)   # {"prompt_tokens", "total_tokens"}: no output tokens

    def cacheable(self, body: dict) -> bool:
        return True


def input_count(body: dict) -> int:
    """The inputs of a body (a string or one token array: 1; an array of them: its length), what
    OpenAI counts against an embeddings batch's 50,000 inputs."""
    value = body.get("input")
    if isinstance(value, list) and value and not all(isinstance(t, int) for t in value):
        return len(value)
    return 1


EMBEDDINGS = Embeddings()
