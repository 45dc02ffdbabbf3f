"""What an operator of the providers' Batch APIs runs into, as the simulator enforces it (batches.py).

- **OpenAI's batch queue**: per organisation and model, the prompt tokens of the batches not yet
  ended (validating, in progress, finalizing) may not go over a limit (its rate-limits page: "batch
  queue limit", in enqueued tokens). A batch that would go over it fails at validation with
  ``token_limit_exceeded`` and the message OpenAI gives ("Enqueued token limit reached for MODEL in
  organization ORG. Limit: N enqueued tokens. Please try again once some in_progress batches have been
  completed."). The limits are the simulator's ``batch_enqueued_tokens`` (model -> tokens; none: no
  limit); the tokens are the simulator's own count of each line's prompt.
- **Lines that expire**: ``batch_expire_share`` of a batch's lines (the last in its run order) are
  not run within the window. OpenAI's batch then ends ``expired``: what ran is in the output file,
  the rest in the error file with ``batch_expired``; Anthropic's results say ``expired``. Neither is
  billed.
- **Retention**: Anthropic keeps results 29 days after the batch was created; OpenAI deletes an
  output or error file ``output_expires_after.seconds`` after the file's creation (1 hour to 30
  days; when the batch sets none, 30 days here: an assumption, OpenAI documents no default).
  Both by the simulator's clock (real time + ``clock_offset_s``), so a test moves it.
- **Each line billed once**: every line a Batch API bills is counted by its custom_id
  (``Stats.batch_line_billed``); ``/_stats`` shows the custom_ids billed more than once.
"""

from __future__ import annotations

import json
import time

from simulator.caching import PromptCache
from simulator.prices import NO_BATCH

DAY_S = 24 * 3600
ANTHROPIC_RESULTS_KEEP_S = 29 * DAY_S
OUTPUT_KEEP_MIN_S, OUTPUT_KEEP_MAX_S = 3600, 30 * DAY_S
OUTPUT_KEEP_DEFAULT_S = OUTPUT_KEEP_MAX_S
ORGANIZATION = "org-simulator"
OPENAI_MAX_REQUESTS = 50_000
EMBEDDING_MAX_INPUTS = 50_000


def sim_time(sim) -> float:
    """The simulator's clock in unix seconds (``Simulator.now``)."""
    return time.time() + sim.config.clock_offset_s


def output_keep_s(value) -> int:
    """Seconds an OpenAI batch's output files live, from the create call's ``output_expires_after``;
    ValueError with OpenAI's reason when it is not valid."""
    if value is None:
        return OUTPUT_KEEP_DEFAULT_S
    if not isinstance(value, dict) or value.get("anchor") != "created_at":
        raise ValueError("output_expires_after.anchor must be 'created_at'")
    seconds = value.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not OUTPUT_KEEP_MIN_S <= seconds <= OUTPUT_KEEP_MAX_S:
        raise ValueError(f"output_expires_after.seconds must be an integer from {OUTPUT_KEEP_MIN_S}"
                         f" to {OUTPUT_KEEP_MAX_S}")
    return seconds


def expire_from(n: int, share: float) -> int:
    """The position in the run order from which a batch of ``n`` lines expires (``n``: none does)."""
    return n - int(round(n * share))


class Queue:
    """OpenAI's enqueued tokens per model, for one account (a provider's batch store)."""

    def __init__(self):
        self.enqueued: dict[str, int] = {}

    def admit(self, model: str, tokens: int, limit: int | None) -> str | None:
        """Enqueue ``tokens`` of ``model``; the error message when the limit leaves no room."""
        used = self.enqueued.get(model, 0)
        if limit is not None and used + tokens > limit:
            return (f"Enqueued token limit reached for {model} in organization {ORGANIZATION}. Limit: {limit:,}"
                    " enqueued tokens. Please try again once some in_progress batches have been completed.")
        self.enqueued[model] = used + tokens
        return None

    def release(self, model: str, tokens: int) -> None:
        left = self.enqueued.get(model, 0) - tokens
        if left > 0:
            self.enqueued[model] = left
        else:
            self.enqueued.pop(model, None)


def prompt_tokens(sim, call, items) -> int:
    """The prompt tokens of a batch's lines ``(custom_id, body)``, by the simulator's own count (each
    line answered and billed with an empty prompt cache; lines the API refuses count 0)."""
    from simulator.protocol import Problem

    total = 0
    for _, body in items:
        try:
            usage = call.endpoint.bill(sim.evaluate(call, body), False, PromptCache())
        except Problem:
            continue
        total += usage.get("prompt_tokens", usage.get("input_tokens", 0))
    return total


def validate_openai_lines(content: bytes, endpoint: str):
    """An OpenAI batch input file checked as the Batch API validates it: ``(items, errors, model)``;
    items are ``(custom_id, body)`` in input order."""
    items, errors, seen, models = [], [], set(), set()

    def err(code, line, message, param=None):
        errors.append({"code": code, "line": line, "message": message, "param": param})

    lines = content.decode("utf-8", errors="replace").splitlines()
    for no, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except ValueError:
            err("invalid_json_line", no, "This line is not parseable as valid JSON.")
            continue
        if not isinstance(obj, dict):
            err("invalid_json_line", no, "This line is not a JSON object.")
            continue
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            err("missing_required_parameter", no, "Missing required parameter: 'custom_id'.", "custom_id")
            continue
        if cid in seen:
            err("duplicate_custom_id", no, f"The custom_id '{cid}' is used more than once in this file.",
                "custom_id")
            continue
        seen.add(cid)
        if obj.get("method") != "POST":
            err("invalid_method", no, "Only the POST method is supported.", "method")
            continue
        if obj.get("url") != endpoint:
            err("invalid_url", no, f"The url must be '{endpoint}', as the batch's endpoint.", "url")
            continue
        b = obj.get("body")
        if not isinstance(b, dict):
            err("missing_required_parameter", no, "Missing required parameter: 'body'.", "body")
            continue
        if isinstance(b.get("model"), str) and b["model"].lower() in NO_BATCH:
            err("model_not_supported", no, f"The model '{b['model']}' is not supported by the Batch API.",
                "body.model")
            continue
        if isinstance(b.get("model"), str):
            models.add(b["model"])
            if len(models) > 1:
                err("mismatched_model", no, "All requests in a batch must use the same model.", "body.model")
                continue
        items.append((cid, b))
    if not items and not errors:
        err("empty_file", None, "The input file has no requests.")
    if len(items) > OPENAI_MAX_REQUESTS:
        err("too_many_requests", None, f"A batch may hold at most {OPENAI_MAX_REQUESTS} requests.")
    if endpoint == "/v1/embeddings":
        inputs = sum(len(b["input"]) if isinstance(b.get("input"), list) and b["input"]
                     and not isinstance(b["input"][0], int) else 1 for _, b in items)
        if inputs > EMBEDDING_MAX_INPUTS:
            err("too_many_inputs", None, f"An embeddings batch may hold at most {EMBEDDING_MAX_INPUTS} "
                                         f"inputs in all; this file has {inputs}.")
    return items, errors, (next(iter(models)) if len(models) == 1 else None)
