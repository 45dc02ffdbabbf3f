"""``POST /v1/embeddings``: deterministic vectors in which similar texts land close together.

Input: a string, an array of strings, an array of token ids or an array of
token-id arrays (decoded with cl100k_base, so a text and its tokens embed
alike). OpenAI's limits are enforced with OpenAI's answers (400):

- at most 2,048 items, none empty: ``'$.input' is invalid…``;
- at most 8,192 tokens per item: the context-length message;
- at most 300,000 tokens in the request: ``max_tokens_per_request``.

Usage: ``prompt_tokens`` = ``total_tokens`` = the tokens of every item,
counted with tiktoken cl100k_base by this module (the embedding models'
vocabulary). Worst case bills the same: an embedding has no output to cut.

The vector: each lowercase word and each character trigram of every word is
a feature; a feature adds ±1 at 4 positions drawn from its blake2b hash (word
features weigh 2), and the sum is scaled to unit length. Texts that share
words and spellings share positions, so their cosine is high; unrelated texts
are close to orthogonal. Its size is the model's (text-embedding-3-small
1,536, -3-large 3,072, ada-002 1,536; a named provider's ``dimensions``), or
``dimensions`` (text-embedding-3 models only, at most the model's size).
``encoding_format: "base64"`` gives the little-endian float32 bytes in base64;
``float`` gives the values rounded to 9 decimal places (float32's precision).
Vectors are computed when the answer is written, never cached.
"""

from __future__ import annotations

import array
import base64
import hashlib
import math
import re
import sys

from simulator import billing
from simulator.protocol import Problem, is_int, require

MAX_ITEMS = 2048
MAX_ITEM_TOKENS = 8192
MAX_REQUEST_TOKENS = 300_000
HASHES_PER_FEATURE = 4
WORD_RE = re.compile(r"\w+", re.UNICODE)
INVALID_INPUT = "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference."
SHORTENABLE = ("text-embedding-3",)


class EmbeddingAnswer:
    __slots__ = ("model", "texts", "tokens", "cost", "dimensions", "base64")

    def __init__(self, model, texts, tokens, dimensions, b64):
        self.model = model
        self.texts = texts            # one text per item
        self.tokens = tokens          # tokens per item
        self.cost = sum(tokens)       # the rate-limit cost: there is no output
        self.dimensions = dimensions
        self.base64 = b64


def _items(value) -> list:
    """The input as a list of items (str or list of token ids); raises Problem."""
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, list) and value and all(is_int(x) for x in value):
        items = [value]                       # one array of token ids
    elif isinstance(value, list) and value:
        items = value
    else:
        raise Problem(INVALID_INPUT)
    if len(items) > MAX_ITEMS:
        raise Problem(INVALID_INPUT)
    for item in items:
        if isinstance(item, str):
            if not item:
                raise Problem(INVALID_INPUT)
        elif not (isinstance(item, list) and item and all(is_int(x) and x >= 0 for x in item)):
            raise Problem(INVALID_INPUT)
    return items


def validate(body: dict) -> None:
    require(body, "input")
    _items(body["input"])
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise Problem(f"Invalid value: '{fmt}'. Supported values are: 'float' and 'base64'.",
                      "encoding_format", "invalid_value")
    dims = body.get("dimensions")
    if dims is not None and not (is_int(dims) and dims >= 1):
        raise Problem(f"Invalid 'dimensions': expected an integer of at least 1, got {dims!r}.",
                      "dimensions", "invalid_value")


def answer(body: dict, model) -> EmbeddingAnswer:
    """``model``: the provider's Model (its dimensions); raises Problem or LookupError."""
    if model is None or not model.dimensions:
        raise LookupError(body["model"])
    enc = billing.encoding("cl100k_base")
    texts, counts = [], []
    for item in _items(body["input"]):
        if isinstance(item, str):
            n = len(enc.encode_ordinary(item))
            text = item
        else:
            n = len(item)
            try:
                text = enc.decode(item)
            except Exception:   # ids outside the vocabulary: embed the ids themselves
                text = " ".join(f"t{i}" for i in item)
        if n > MAX_ITEM_TOKENS:
            raise Problem(f"This model's maximum context length is {MAX_ITEM_TOKENS} tokens, however you "
                          f"requested {n} tokens ({n} in your prompt; 0 for the completion). Please reduce "
                          f"your prompt; or completion length.")
        texts.append(text)
        counts.append(n)
    total = sum(counts)
    if total > MAX_REQUEST_TOKENS:
        raise Problem(f"Requested {total} tokens, max {MAX_REQUEST_TOKENS} tokens per request",
                      kind="max_tokens_per_request", code="max_tokens_per_request")
    dims = body.get("dimensions")
    if dims is not None:
        if not model.name.startswith(SHORTENABLE):
            raise Problem("This model does not support specifying dimensions.", "dimensions", "invalid_value")
        if dims > model.dimensions:
            raise Problem(f"This model's maximum dimensions is {model.dimensions}, got {dims}.",
                          "dimensions", "invalid_value")
    return EmbeddingAnswer(model.name, texts, counts, dims or model.dimensions,
                           body.get("encoding_format") == "base64")


def usage(ans: EmbeddingAnswer, worst_case: bool = False) -> dict:
    return {"prompt_tokens": ans.cost, "total_tokens": ans.cost}


def _features(text: str):
    for word in WORD_RE.findall(text.lower()):
        yield "w:" + word, 2.0
        padded = f"<{word}>"
        for i in range(len(padded) - 2):
            yield "c:" + padded[i:i + 3], 1.0


def vector(text: str, dims: int) -> list[float]:
    """The unit vector of ``text`` in ``dims`` dimensions (deterministic)."""
    v = [0.0] * dims
    for feature, weight in _features(text):
        d = hashlib.blake2b(feature.encode(), digest_size=4 * HASHES_PER_FEATURE).digest()
        for j in range(HASHES_PER_FEATURE):
            h = int.from_bytes(d[4 * j:4 * j + 4], "little")
            v[(h >> 1) % dims] += weight if h & 1 else -weight
    norm = math.sqrt(sum(x * x for x in v))
    if norm == 0:   # no word characters at all: one position from the text's own hash
        v[int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little") % dims] = 1.0
        return v
    return [x / norm for x in v]


def _encoded(vec: list[float], b64: bool):
    if not b64:   # float32 carries about 8 significant digits; more would only swell batch output files
        return [round(x, 9) for x in vec]
    arr = array.array("f", vec)
    if sys.byteorder != "little":
        arr.byteswap()
    return base64.b64encode(arr.tobytes()).decode()


def reply(ans: EmbeddingAnswer, billed: dict, model: str) -> dict:
    return {"object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": _encoded(vector(t, ans.dimensions), ans.base64)}
                     for i, t in enumerate(ans.texts)],
            "model": model, "usage": billed}
