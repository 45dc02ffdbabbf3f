"""``/v1/moderations``: free, but still validated and counted.

OpenAI's rules (API reference, "Moderations",
https://platform.openai.com/docs/api-reference/moderations/create, and the
model page https://developers.openai.com/api/docs/models/omni-moderation-latest:
"Moderation models are free"):

* ``input`` is a string, an array of strings, or an array of multi-modal
  items ``{"type": "text", "text"}`` / ``{"type": "image_url", "image_url":
  {"url"}}``; images only for omni-moderation models, the text-moderation
  models take text alone.
* The models: ``omni-moderation-latest`` (snapshot
  ``omni-moderation-2024-09-26``), ``text-moderation-latest`` and
  ``text-moderation-stable``.

The cost is $0 whatever the count, so the bound is $0; the input count is
kept for the limiter and the ledger and is an estimate (``tokens_exact``
False): the moderation models' tokenizer is not public, so text is counted
with o200k_base and an image at OpenAI's largest tile count for a vision model
(85 + 8 × 170 tokens). llmbatch asks for ``model`` on every line (OpenAI would
default it) so that the price book can check it. Answers are deterministic
classifications: cacheable.
"""

from __future__ import annotations

from pipeline.money.bounds import OPENAI_MAX_TILES, TOKENS_PER_IMAGE, TOKENS_PER_PART, Bound, finish_bound
from pipeline.constants import MODERATIONS_URL
from pipeline.endpoints._common import check_body, kind
from pipeline.errors import LineError
from pipeline.money.pricing import ModelPrice, Usage
from pipeline.money.tokens import get_encoding

#: an upper figure for one image (OpenAI's tile formula at its largest: 85 + 8 × 170)
IMAGE_TOKENS = 85 + OPENAI_MAX_TILES * 170
#: models that take text alone
TEXT_ONLY = ("text-moderation-",)
ESTIMATE_ENCODING = "o200k_base"
_FIELDS = frozenset({"model", "input"})


class Moderations:
    url = MODERATIONS_URL
    line_format = "openai"

    def validate(self, body: dict) -> None:
        check_body(body, self.url, _FIELDS)
        value = body.get("input")
        if isinstance(value, str):
            return
        if not isinstance(value, list) or not value:
            raise LineError("body.input must be a string or a non-empty array, got "
                            f"{'an empty array' if value == [] else kind(value)}")
        for i, item in enumerate(value):
            if isinstance(item, str):
                continue
            kind_ = item.get("type") if isinstance(item, dict) else None
            if kind_ == "text" and isinstance(item.get("text"), str):
                continue
            image = item.get("image_url") if kind_ == "image_url" else None
            if not (isinstance(image, dict) and isinstance(image.get("url"), str)):
                raise LineError(f"body.input[{i}] must be a string, {{\"type\": \"text\", \"text\"}} or "
                                f"{{\"type\": \"image_url\", \"image_url\": {{\"url\"}}}}")

    def bound(self, body: dict, price: ModelPrice, *, declared_input_tokens: int | None = None) -> Bound:
        self.validate(body)
        price.require_endpoint(self.url)
        value = body["input"]
        encode = get_encoding(ESTIMATE_ENCODING).encode_ordinary
        n = 0
        for i, item in enumerate([value] if isinstance(value, str) else value):
            if isinstance(item, dict) and item["type"] == "image_url":
                if price.model.startswith(TEXT_ONLY):
                    raise LineError(f"body.input[{i}]: {price.model} takes text only; images need "
                                    f"omni-moderation-latest")
                n += TOKENS_PER_IMAGE + IMAGE_TOKENS
            else:
                n += TOKENS_PER_PART + len(encode(item if isinstance(item, str) else item["text"]))
        # several inputs of one request are classified one by one: no context window over their sum
        return finish_bound(price, n, 0, False, declared_input_tokens, one_prompt=False)

    def usage(self, response_body: dict) -> Usage | None:
        return None   # a moderation answer reports no usage: it is free, settled at its $0 bound

    def cacheable(self, body: dict) -> bool:
        return True


MODERATIONS = Moderations()
