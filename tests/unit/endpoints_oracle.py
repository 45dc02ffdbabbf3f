"""The worst a provider can bill for a body, written from OpenAI's docs alone.

The endpoint tests compare :mod:`pipeline.endpoints` against these figures.
Nothing here calls the pipeline's counting: tiktoken is loaded directly (the
pipeline only provisions its vocabulary files, as for the simulator), and
each formula is the docs' rule read on its own, at its most expensive where
the docs leave a choice open:

* a string is billed at the larger of tiktoken's two readings of special-token
  text (as text, or as the special token);
* a token array at its length;
* prices straight from pipeline/data/pricing.json's strings, per 1M tokens.
"""

from __future__ import annotations

import json
import os
from decimal import Decimal
from importlib import resources
from pathlib import Path

import tiktoken

from pipeline.money.tokens import default_cache_dir, provision

RAW = json.loads(resources.files("pipeline").joinpath("data", "pricing.json").read_text())["models"]


def encoding(name: str):
    cache_dir = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or default_cache_dir())
    provision(cache_dir)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
    return tiktoken.get_encoding(name)


CL100K = encoding("cl100k_base")
O200K = encoding("o200k_base")


def tokens(text: str, enc=CL100K) -> int:
    return max(len(enc.encode(text, disallowed_special=())), len(enc.encode(text, allowed_special="all")))


def item_tokens(item, enc=CL100K) -> int:
    return tokens(item, enc) if isinstance(item, str) else len(item)


def items(value) -> list:
    """The items of a string / strings / token array / token arrays field."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(t, int) for t in value):
        return [value]
    return list(value)


def billed(model: str, input_tokens: int, output_tokens: int) -> Decimal:
    entry = RAW[model]
    return (input_tokens * Decimal(entry["input"]) + output_tokens * Decimal(entry["output"])) / 10**6


def embeddings_worst(body: dict) -> tuple[int, Decimal]:
    """Embeddings bill the input tokens of every item, nothing else."""
    n = sum(item_tokens(i) for i in items(body["input"]))
    return n, billed(body["model"], n, 0)


def completions_worst(body: dict) -> tuple[int, int, Decimal]:
    """Every prompt (and the suffix with it) is prompt tokens; every one of the best_of / n
    candidates of every prompt may run to max_tokens (default 16), and with echo the prompt
    it repeats may be billed as completion tokens too."""
    prompts = items(body["prompt"])
    suffix = tokens(body["suffix"]) if body.get("suffix") else 0
    candidates = max(body.get("n") or 1, body.get("best_of") or 1)
    max_tokens = 16 if body.get("max_tokens") is None else body["max_tokens"]
    prompt_tokens = sum(item_tokens(p) + suffix for p in prompts)
    completion = sum(candidates * (max_tokens + (item_tokens(p) if body.get("echo") else 0)) for p in prompts)
    return prompt_tokens, completion, billed(body["model"], prompt_tokens, completion)


def responses_worst(body: dict, enc) -> tuple[int, int, Decimal]:
    """The cookbook's older, larger framing: 4 tokens per message around its texts, 3 priming the
    reply; a function call's name and arguments + 10; a function tool's name, description and
    JSON parameters + 12, and 12 more once for the tool list; a JSON-schema format's JSON + 12
    (JSON with its characters as they are: the model reads the schema rendered as text, not the
    \\u escapes a client may send).
    Output: max_output_tokens, else the model's maximum (reasoning included in both)."""
    def text(v) -> int:
        return tokens(v, enc) if isinstance(v, str) else sum(tokens(p.get("text") or p.get("refusal") or "", enc)
                                                             for p in v)
    n = 3
    if body.get("instructions"):
        n += 4 + tokens(body["instructions"], enc)
    value = body["input"]
    for item in ([{"role": "user", "content": value}] if isinstance(value, str) else value):
        kind = item.get("type", "message")
        if kind == "message":
            n += 4 + text(item["content"])
        elif kind == "function_call":
            n += tokens(item["name"], enc) + tokens(item["arguments"], enc) + 10
        else:
            n += (tokens(item["output"], enc) if isinstance(item["output"], str) else text(item["output"])) + 10
    for tool in body.get("tools") or ():
        n += (tokens(tool["name"], enc) + tokens(tool.get("description", ""), enc)
              + tokens(json.dumps(tool.get("parameters", {}), ensure_ascii=False), enc) + 12)
    if body.get("tools"):
        n += 12
    fmt = (body.get("text") or {}).get("format")
    if fmt and fmt.get("type") == "json_schema":
        n += tokens(json.dumps(fmt, ensure_ascii=False), enc) + 12
    out = body.get("max_output_tokens") or RAW[body["model"]]["max_output_tokens"]
    return n, out, billed(body["model"], n, out)
