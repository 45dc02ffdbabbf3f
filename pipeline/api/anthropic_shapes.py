"""Anthropic's Message Batches shapes, and the rules of a create call, as pure functions.

The batch itself is an ``api_batches`` row moved on by the OpenAI status machine
(pipeline/api/shapes.py ``next_status``); here its status is shown as Anthropic's
``processing_status`` (``in_progress``, ``canceling``, ``ended``), its times as RFC 3339 strings,
its counts as Anthropic's (every request ``processing`` until the batch ends, then each in the
bucket of its result), its results lines as Anthropic writes them (``succeeded``, ``errored``
with the error nested twice, ``canceled``, ``expired``) and its errors as
``{"type": "error", "error": {"type", "message"}}``. Nothing here touches Postgres or the disk.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta, timezone

from pipeline.api.shapes import ENDED, ApiError
from pipeline.intake.formats import ANTHROPIC_CUSTOM_ID
from pipeline.stores.export import anthropic_line

PREFIX = "msgbatch_"
#: at most this many requests in one batch (Anthropic's limit; the 256 MB one is the body's)
MAX_REQUESTS = 100_000
MAX_BODY_BYTES = 256 * 1024 * 1024
#: the list call's ``limit``: 1–1000, default 20
LIST_MAX, LIST_DEFAULT = 1000, 20
#: results are kept 29 days after the batch was created
RESULTS_KEPT = timedelta(days=29)
RESULT_TYPES = ("succeeded", "errored", "canceled", "expired")
#: a batch stopped before its end (its OpenAI-side status) → the result of what it never ran
STOPPED = {"cancelled": "canceled", "expired": "expired"}
#: an HTTP status → Anthropic's error type
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 409: "invalid_request_error", 413: "request_too_large",
                429: "rate_limit_error", 529: "overloaded_error"}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error")


def error_body(e: ApiError) -> dict:
    """An ``ApiError`` (raised here or by the OpenAI side's code) in Anthropic's error shape."""
    return {"type": "error", "error": {"type": error_type(e.status), "message": e.message},
            "request_id": "req_" + secrets.token_hex(12)}


def unauthorized(given: bool) -> ApiError:
    if given:
        return ApiError(401, "invalid x-api-key")
    return ApiError(401, "x-api-key header is required")


def not_found(batch_id: str) -> ApiError:
    """Also the answer for another project's id, an OpenAI batch's and a deleted one."""
    return ApiError(404, f"No message batch found with id '{batch_id}'.")


def rfc3339(when: datetime | None) -> str | None:
    if when is None:
        return None
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def processing_status(status: str) -> str:
    """The OpenAI-side status (pipeline/api/shapes.py) as Anthropic's ``processing_status``."""
    if status in ENDED:
        return "ended"
    return "canceling" if status == "cancelling" else "in_progress"


def ended_at(row: dict) -> datetime | None:
    return row.get("completed_at") or row.get("failed_at") or row.get("expired_at") or row.get("cancelled_at")


def request_counts(row: dict) -> dict:
    """All ``processing`` until the batch ends (Anthropic moves none before), then its results'."""
    counts = dict.fromkeys(("processing",) + RESULT_TYPES, 0)
    if row["status"] in ENDED and row.get("result_counts") is not None:
        counts.update({k: int(row["result_counts"].get(k, 0)) for k in RESULT_TYPES})
    else:
        counts["processing"] = int(row.get("request_total") or 0)
    return counts


def batch_object(row: dict, results_url: str) -> dict:
    """The ``message_batch`` object of an ``api_batches`` row; ``results_url`` is shown once it ended."""
    ended = processing_status(row["status"]) == "ended"
    return {"id": row["batch_id"], "type": "message_batch", "processing_status": processing_status(row["status"]),
            "request_counts": request_counts(row), "ended_at": rfc3339(ended_at(row)) if ended else None,
            "created_at": rfc3339(row["created_at"]), "expires_at": rfc3339(row["expires_at"]),
            "archived_at": None, "cancel_initiated_at": rfc3339(row.get("cancelling_at")),
            "results_url": results_url if ended else None}


def deleted_object(batch_id: str) -> dict:
    return {"id": batch_id, "type": "message_batch_deleted"}


def check_request(index: int, item, seen: set[str]) -> dict:
    """One item of ``requests``, checked as Anthropic checks it at once (its shape and
    ``custom_id``); its ``params`` are checked later, by the pipeline, each failure an
    ``errored`` result. ``ApiError`` 400 naming ``requests.N``. Returns the input line."""
    where = f"requests.{index}"
    if not isinstance(item, dict):
        raise ApiError(400, f"{where}: Input should be an object with custom_id and params.")
    cid = item.get("custom_id")
    if not isinstance(cid, str) or not ANTHROPIC_CUSTOM_ID.match(cid):
        raise ApiError(400, f"{where}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'.")
    if cid in seen:
        raise ApiError(400, f"{where}.custom_id: '{cid}' is used more than once; custom_ids must be unique"
                            f" within a batch.")
    params = item.get("params")
    if not isinstance(params, dict):
        raise ApiError(400, f"{where}.params: Field required (an object of Messages API parameters).")
    extra = sorted(set(item) - {"custom_id", "params"})
    if extra:
        raise ApiError(400, f"{where}.{extra[0]}: Extra inputs are not permitted.")
    seen.add(cid)
    return {"custom_id": cid, "params": params}


def _unrun(row: dict) -> bool:
    return row.get("response") is None and row.get("error") is None and row.get("status") != "failed"


def result_line(job_id: str, row: dict, ended: str) -> dict:
    """One results line for a request row joined with its result (``outcomes.iter_results``);
    ``ended`` is the batch's end status: what the batch never ran is ``canceled`` in a cancelled
    batch, ``expired`` in an expired one."""
    if ended in STOPPED and (_unrun(row) or row.get("status") == "cancelled"):
        return {"custom_id": row["custom_id"], "result": {"type": STOPPED[ended]}}
    return anthropic_line(job_id, row)


def unpublished_line(custom_id: str, ended: str, why: str) -> dict:
    """A request of the create call that never reached the pipeline (its batch failed as a whole,
    or was stopped while its file was read)."""
    if ended in STOPPED:
        return {"custom_id": custom_id, "result": {"type": STOPPED[ended]}}
    return rejected_line(custom_id, why)


def rejected_line(custom_id: str, reason: str) -> dict:
    """A request whose params the pipeline refused: ``errored``, as Anthropic reports a request
    that fails its asynchronous validation."""
    return {"custom_id": custom_id, "result": {"type": "errored", "error": {
        "type": "error", "error": {"type": "invalid_request_error", "message": reason}}}}


def check_limit(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= LIST_MAX:
        raise ApiError(400, f"limit: Input should be an integer from 1 to {LIST_MAX}, got {value!r}.")
    return int(value)
