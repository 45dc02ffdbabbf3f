"""OpenAI's Files and Batches shapes, and the rules read from a request, as pure functions.

Nothing here touches Postgres, Kafka or the disk: the objects are built from rows, the create
call's body is checked and turned into a job's options (``parse_create``), and a batch's next
status is decided from its job (``next_status``). Errors are ``ApiError``, which the app answers
in OpenAI's error shape (``error_body``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from pipeline.constants import JOB_FINISHED, JOB_OPEN
from pipeline.errors import ConfigError, LineError
from pipeline.intake.formats import OPENAI_URLS, pipeline_fields
from pipeline.money.units import parse_cap
from pipeline.paths.registry import AUTO, modes

#: OpenAI's batch statuses; ``validating`` → ``in_progress`` → ``finalizing`` → ``completed``,
#: or ``failed``, ``expired``, ``cancelling`` → ``cancelled``
STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling",
            "cancelled")
ENDED = ("completed", "failed", "expired", "cancelled")
COMPLETION_WINDOW = "24h"
WINDOW = timedelta(hours=24)
MAX_METADATA = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
#: ``output_expires_after.seconds``: one hour to 30 days (anchor ``created_at``)
OUTPUT_EXPIRES_MIN_S, OUTPUT_EXPIRES_MAX_S = 3600, 30 * 24 * 3600
#: the job's own options, given in ``metadata`` so unmodified clients can set them (docs/API.md)
LLMBATCH_KEYS = ("llmbatch_tier", "llmbatch_priority", "llmbatch_deadline", "llmbatch_budget_usd",
                 "llmbatch_on_budget", "llmbatch_mode")
#: errors.data lists at most this many rejected lines (``llmbatch rejections JOB`` lists them all)
MAX_ERRORS_LISTED = 1000


class ApiError(Exception):
    """An answer other than 2xx, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def error_body(e: ApiError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def not_found(kind: str, ident: str) -> ApiError:
    """Also the answer for another project's id: it does not exist for the caller."""
    return ApiError(404, f"No {kind} found with id '{ident}'.", code=None)


def unauthorized(given: bool) -> ApiError:
    if given:
        return ApiError(401, "Incorrect API key provided. Keys are made with `llmbatch keys create`.",
                        code="invalid_api_key")
    return ApiError(401, "You didn't provide an API key. Give it as a Bearer token in the Authorization"
                         " header (Authorization: Bearer KEY).", code=None)


def ts(when: datetime | None) -> int | None:
    return int(when.timestamp()) if when is not None else None


def file_object(row: dict) -> dict:
    return {"id": row["file_id"], "object": "file", "bytes": row["bytes"], "created_at": ts(row["created_at"]),
            "expires_at": ts(row.get("expires_at")), "filename": row["filename"], "purpose": row["purpose"],
            "status": "processed", "status_details": None}


@dataclass(frozen=True)
class CreateBatch:
    input_file_id: str
    endpoint: str
    metadata: dict | None
    output_expires_s: int | None
    #: keyword arguments of ``submit_file`` read from the ``llmbatch_*`` metadata
    options: dict


def parse_create(body) -> CreateBatch:
    """The body of ``POST /v1/batches``, checked; ``ApiError`` 400 naming the parameter."""
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object.")
    fid = body.get("input_file_id")
    if not isinstance(fid, str) or not fid:
        raise ApiError(400, "Missing required parameter: 'input_file_id'.", param="input_file_id")
    endpoint = body.get("endpoint")
    if endpoint not in OPENAI_URLS:
        raise ApiError(400, f"Invalid 'endpoint': {endpoint!r}; one of {', '.join(OPENAI_URLS)}.",
                       param="endpoint")
    if body.get("completion_window") != COMPLETION_WINDOW:
        raise ApiError(400, f"Invalid 'completion_window': {body.get('completion_window')!r}; only '24h'.",
                       param="completion_window")
    metadata = body.get("metadata")
    if metadata is not None:
        check_metadata(metadata)
    return CreateBatch(fid, endpoint, metadata, _output_expires(body.get("output_expires_after")),
                       job_options(metadata or {}))


def check_metadata(metadata) -> None:
    if not isinstance(metadata, dict):
        raise ApiError(400, "Invalid 'metadata': expected an object of strings.", param="metadata")
    if len(metadata) > MAX_METADATA:
        raise ApiError(400, f"Invalid 'metadata': {len(metadata)} pairs, at most {MAX_METADATA}.",
                       param="metadata")
    for k, v in metadata.items():
        if len(k) > MAX_METADATA_KEY or not isinstance(v, str) or len(v) > MAX_METADATA_VALUE:
            raise ApiError(400, f"Invalid 'metadata' pair {k!r}: keys up to {MAX_METADATA_KEY} characters,"
                                f" values strings up to {MAX_METADATA_VALUE}.", param=f"metadata.{k}")


def _output_expires(value) -> int | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("anchor") != "created_at":
        raise ApiError(400, "Invalid 'output_expires_after': {\"anchor\": \"created_at\", \"seconds\": N}.",
                       param="output_expires_after")
    s = value.get("seconds")
    if not isinstance(s, int) or isinstance(s, bool) or not OUTPUT_EXPIRES_MIN_S <= s <= OUTPUT_EXPIRES_MAX_S:
        raise ApiError(400, f"Invalid 'output_expires_after.seconds': {s!r}; from {OUTPUT_EXPIRES_MIN_S}"
                            f" (1 hour) to {OUTPUT_EXPIRES_MAX_S} (30 days).", param="output_expires_after.seconds")
    return s


def job_options(metadata: dict) -> dict:
    """``submit_file``'s options from the ``llmbatch_*`` metadata (docs/API.md); other keys are the
    client's own. Checked by the pipeline's own rules: a line's fields (pipeline/intake/formats.py),
    a cap (pipeline/money/units.py), a path (pipeline/paths/registry.py)."""
    unknown = sorted(k for k in metadata if k.startswith("llmbatch_") and k not in LLMBATCH_KEYS)
    if unknown:
        raise ApiError(400, f"Unknown llmbatch option {unknown[0]!r}; known: {', '.join(LLMBATCH_KEYS)}.",
                       param=f"metadata.{unknown[0]}")
    fields = {}
    for name in ("tier", "priority", "deadline"):
        value = metadata.get(f"llmbatch_{name}")
        if value is not None:
            fields[name] = int(value) if name == "priority" and re.fullmatch(r"\d{1,2}", value) else value
    try:
        out = pipeline_fields(fields)
    except LineError as e:
        raise ApiError(400, f"Invalid metadata: {e.reason}.", param="metadata") from None
    if "llmbatch_budget_usd" in metadata:
        try:
            out["budget_usd"] = parse_cap(metadata["llmbatch_budget_usd"], "llmbatch_budget_usd")
        except ConfigError as e:
            raise ApiError(400, f"Invalid metadata: {e}.", param="metadata.llmbatch_budget_usd") from None
    on_budget = metadata.get("llmbatch_on_budget", "defer")
    if on_budget not in ("defer", "fail"):
        raise ApiError(400, "Invalid metadata: llmbatch_on_budget is 'defer' or 'fail'.",
                       param="metadata.llmbatch_on_budget")
    out["on_budget"] = on_budget
    mode = metadata.get("llmbatch_mode", AUTO)
    if mode not in modes():
        raise ApiError(400, f"Invalid metadata: llmbatch_mode {mode!r}; one of {', '.join(modes())}.",
                       param="metadata.llmbatch_mode")
    out["mode"] = mode
    return out


#: a rejection's reason → OpenAI's error code (``errors.data[].code``)
_CODES = ((re.compile(r"JSON|UTF-8"), "invalid_json_line"),
          (re.compile(r"duplicate custom_id"), "duplicate_custom_id"),
          (re.compile(r"url .* not the batch's endpoint"), "mismatched_endpoint"),
          (re.compile(r"unknown model|not in the price book", re.I), "model_not_found"),
          (re.compile(r"more than the .* a line may have"), "line_too_large"))


def rejection_error(row: dict) -> dict:
    """A rejected line (``rejections`` row) as an ``errors.data[]`` entry."""
    reason = row["reason"]
    code = next((c for rx, c in _CODES if rx.search(reason)), "invalid_request")
    return {"code": code, "line": row["line"], "message": reason, "param": None}


def batch_object(row: dict, counts: dict | None, rejections: list[dict], usage: dict | None = None) -> dict:
    """The OpenAI batch object of an ``api_batches`` row, its job's counts and rejected lines."""
    errors = None
    data = [rejection_error(r) for r in rejections]
    if row.get("failure"):
        data.insert(0, {"code": "invalid_file", "line": None, "message": row["failure"], "param": None})
    if data:
        errors = {"object": "list", "data": data}
    counts = counts or {}
    out = {"id": row["batch_id"], "object": "batch", "endpoint": row["endpoint"], "errors": errors,
           "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
           "status": row["status"], "output_file_id": row.get("output_file_id"),
           "error_file_id": row.get("error_file_id"),
           "request_counts": {"total": int(counts.get("total") or 0),
                              "completed": int(counts.get("completed") or 0),
                              "failed": int(counts.get("failed") or 0)},
           "metadata": row.get("metadata")}
    for stage in ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
                  "expired_at", "cancelling_at", "cancelled_at"):
        out[stage] = ts(row.get(stage))
    if usage is not None:
        out["usage"] = usage
    return out


def next_status(status: str, job: dict | None, *, running: int, now: datetime, expires_at: datetime,
                submitting: bool = False) -> str:
    """Where a batch goes next, from its status, its job (``status``, ``accepted``; None: no job
    row yet), how many of its requests a worker still holds and whether its submit still runs.
    ``finalizing`` is where the output files are written; the caller moves it on to ``completed``
    once they are. A batch being stopped (``cancelling``, ``expiring``) ends once its job is
    stopped and nothing of it runs, its submit included."""
    if status in ENDED:
        return status
    if status == "cancelling" or status == "expiring":
        done = not submitting and (job is None or (job["status"] not in JOB_OPEN and not running))
        return ("cancelled" if status == "cancelling" else "expired") if done else status
    if job is None or job["status"] == "submitting":
        return status if now < expires_at else "expiring"
    if status == "validating":
        if not job.get("accepted"):
            return "failed"
        status = "in_progress"
    if status == "in_progress":
        if job["status"] in JOB_FINISHED:
            return "finalizing"
        if job["status"] == "cancelled":       # cancelled outside the API (llmbatch cancel)
            return "cancelling"
        if now >= expires_at:
            return "expiring"
    return status


def public_status(status: str) -> str:
    """``expiring`` is ours (the job is being stopped at its window's end): OpenAI shows it in progress."""
    return "in_progress" if status == "expiring" else status


def error_for_unrun(status: str) -> dict:
    """The error of a request the batch never ran, as OpenAI writes it in the error file."""
    if status == "expired":
        return {"code": "batch_expired", "message": "This request could not be executed before the completion"
                                                    " window expired."}
    return {"code": "batch_cancelled", "message": "This request was not executed because the batch was"
                                                  " cancelled."}


def is_output_line(line: dict) -> bool:
    """An output-file line (a 2xx answer) rather than an error-file line."""
    r = line.get("response")
    return line.get("error") is None and r is not None and 200 <= int(r.get("status_code") or 0) < 300


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
