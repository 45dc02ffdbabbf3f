"""Results in the providers' own output shapes, so their tools read ours."""

from __future__ import annotations

import hashlib


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
