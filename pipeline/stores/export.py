"""Results in the providers' own output shapes, so their tools read ours.

An OpenAI Batch API output line (``openai_line``) holds the body the endpoint answered:
a ``chat.completion``, a ``response``, a ``text_completion``, an embedding ``list`` (its
vectors put back from the ``embeddings`` table by ``outcomes.iter_results``) or a
moderation. The Anthropic results shape exists for messages alone: a row of another
endpoint cannot be written in it (chat completions are converted, as before).
"""

from __future__ import annotations

import csv
import hashlib

from pipeline import jsontext
from pipeline.constants import ANTHROPIC_MESSAGES_URL, CHAT_URL, REQUEST_TERMINAL


def openai_line(job_id: str, row: dict) -> dict:
    """One line of an OpenAI Batch output file for a request row joined with its result."""
    rid = "batch_req_" + hashlib.sha256(f"{job_id}:{row['custom_id']}".encode()).hexdigest()[:24]
    if row.get("response") is not None:
        return {"id": rid, "custom_id": row["custom_id"],
                "response": {"status_code": row["status_code"], "request_id": row["provider_request_id"],
                             "body": row["response"]},
                "error": None}
    error = row.get("error") or {"code": row["status"], "message": f"request is {row['status']}"}
    response = None
    if row.get("status_code"):
        response = {"status_code": row["status_code"], "request_id": row["provider_request_id"],
                    "body": {"error": error}}
    return {"id": rid, "custom_id": row["custom_id"], "response": response, "error": error}


# ------------------------------------------------------------------ Anthropic

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                 "content_filter": "refusal"}


def answer_text(body) -> str | None:
    """The answer's text, from an OpenAI chat completion, response or text completion, or an
    Anthropic message; None for answers with no text (embeddings, moderations)."""
    if not isinstance(body, dict):
        return None
    if body.get("type") == "message":
        return "".join(b.get("text", "") for b in body.get("content") or [] if b.get("type") == "text")
    if body.get("object") == "response":
        return "".join(part.get("text", "") for item in body.get("output") or [] if item.get("type") == "message"
                       for part in item.get("content") or [] if part.get("type") == "output_text")
    choices = body.get("choices") or []
    if choices:
        if body.get("object") == "text_completion":
            return choices[0].get("text")
        return (choices[0].get("message") or {}).get("content")
    return None


def _as_anthropic_message(body: dict) -> dict:
    """An Anthropic ``message`` for a response body (converted when it is an OpenAI completion)."""
    if body.get("type") == "message":
        return body
    choice = (body.get("choices") or [{}])[0]
    usage = body.get("usage") or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"id": body.get("id"), "type": "message", "role": "assistant", "model": body.get("model"),
            "content": [{"type": "text", "text": (choice.get("message") or {}).get("content") or ""}],
            "stop_reason": _STOP_REASONS.get(choice.get("finish_reason"), choice.get("finish_reason")),
            "stop_sequence": None,
            "usage": {"input_tokens": (usage.get("prompt_tokens") or 0) - cached,
                      "cache_read_input_tokens": cached,
                      "output_tokens": usage.get("completion_tokens") or 0}}


def anthropic_line(job_id: str, row: dict) -> dict:
    """One line of an Anthropic Message Batches results file (messages and chat completions only)."""
    if row.get("endpoint", CHAT_URL) not in (CHAT_URL, ANTHROPIC_MESSAGES_URL):
        raise ValueError(f"{row['custom_id']}: a {row['endpoint']} answer has no Anthropic results shape; "
                         f"use the openai format")
    if row.get("response") is not None:
        return {"custom_id": row["custom_id"],
                "result": {"type": "succeeded", "message": _as_anthropic_message(row["response"])}}
    if row.get("status") == "cancelled":
        return {"custom_id": row["custom_id"], "result": {"type": "canceled"}}
    error = row.get("error") or {"code": row["status"], "message": f"request is {row['status']} (not finished)"}
    if error.get("code") == "deadline_missed":   # not run by its deadline (schedules/deadlines.py)
        return {"custom_id": row["custom_id"], "result": {"type": "expired"}}
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 429: "rate_limit_error", 529: "overloaded_error"}.get(
                row.get("status_code"), "api_error")
    return {"custom_id": row["custom_id"],
            "result": {"type": "errored",
                       "error": {"type": "error",
                                 "error": {"type": kind, "message": error.get("message") or error.get("code")}}}}


# ------------------------------------------------------------------ CSV

CSV_COLUMNS = ("custom_id", "line", "status", "status_code", "model", "answer", "input_tokens",
               "cached_input_tokens", "output_tokens", "cost_usd", "error_code", "error_message",
               "provider_request_id")


def csv_row(job_id: str, row: dict) -> list:
    """One CSV row (columns ``CSV_COLUMNS``): the answer's text, tokens, cost, error."""
    error = row.get("error") or {}
    return [row["custom_id"], row.get("line"), row["status"], row.get("status_code"), row.get("model"),
            answer_text(row.get("response")), row.get("input_tokens"), row.get("cached_input_tokens"),
            row.get("output_tokens"), None if row.get("cost_usd") is None else jsontext.plain(row["cost_usd"]),
            error.get("code"), error.get("message"),
            row.get("provider_request_id")]


def finished_only(rows):
    """Rows of requests in a terminal state (``results --partial``): an unfinished request is
    not written, rather than written as an error it does not have."""
    for row in rows:
        if row.get("status") in REQUEST_TERMINAL:
            yield row


FORMATS = {"openai": openai_line, "anthropic": anthropic_line, "csv": csv_row}


def write_results(rows, job_id: str, out, fmt: str = "openai") -> int:
    """Write ``rows`` (``outcomes.iter_results``) to ``out`` in ``fmt``; returns the count."""
    n = 0
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow(csv_row(job_id, row))
            n += 1
        return n
    line = FORMATS[fmt]
    for row in rows:
        out.write(jsontext.dumps(line(job_id, row)) + "\n")
        n += 1
    return n
