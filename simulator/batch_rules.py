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

import time

from simulator.caching import PromptCache

DAY_S = 24 * 3600
ANTHROPIC_RESULTS_KEEP_S = 29 * DAY_S
OUTPUT_KEEP_MIN_S, OUTPUT_KEEP_MAX_S = 3600, 30 * DAY_S
OUTPUT_KEEP_DEFAULT_S = OUTPUT_KEEP_MAX_S
ORGANIZATION = "org-simulator"


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
