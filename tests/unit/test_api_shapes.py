"""The HTTP API's shapes and rules (pipeline/api/shapes.py, keys.py), without services: the objects
are what the official openai SDK's typed models accept, the create call's body is checked naming
the parameter, the llmbatch options come from metadata by the pipeline's own rules, and a batch's
status follows its job."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings as hsettings, strategies as st
from openai.types import Batch, FileObject

from pipeline.api import keys, upload
from pipeline.api.upload import FormStream
from pipeline.api.shapes import (
    ApiError, batch_object, error_body, file_object, is_output_line, next_status, parse_create,
    public_status, rejection_error, unauthorized,
)
from pipeline.stores.export import openai_line

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc)
GOOD = {"input_file_id": "file-abc", "endpoint": "/v1/chat/completions", "completion_window": "24h"}


def _row(**over):
    row = {"batch_id": "batch_1", "endpoint": "/v1/chat/completions", "input_file_id": "file-abc",
           "completion_window": "24h", "status": "in_progress", "output_file_id": None, "error_file_id": None,
           "metadata": {"team": "x"}, "failure": None, "created_at": NOW, "expires_at": NOW + timedelta(hours=24),
           "in_progress_at": NOW}
    row.update(over)
    return row


def test_a_batch_object_is_what_the_sdk_reads():
    obj = batch_object(_row(), {"total": 3, "completed": 2, "failed": 1},
                       [{"line": 4, "custom_id": None, "reason": "invalid JSON: Expecting value"}],
                       usage={"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5,
                              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 15})
    b = Batch.model_validate(obj)
    assert b.request_counts.total == 3 and b.request_counts.failed == 1
    assert b.errors.data[0].line == 4 and b.errors.data[0].code == "invalid_json_line"
    assert b.created_at == int(NOW.timestamp()) and b.in_progress_at == b.created_at and b.completed_at is None
    assert b.metadata == {"team": "x"} and b.usage.total_tokens == 15


@pytest.mark.parametrize("status", ["validating", "in_progress", "finalizing", "completed", "failed", "expired",
                                    "cancelling", "cancelled"])
def test_every_status_is_one_the_sdk_knows(status):
    assert Batch.model_validate(batch_object(_row(status=status), None, [])).status == status


def test_expiring_shows_as_in_progress():
    assert public_status("expiring") == "in_progress" and public_status("completed") == "completed"


def test_a_file_object_is_what_the_sdk_reads():
    f = FileObject.model_validate(file_object({"file_id": "file-1", "bytes": 12, "created_at": NOW,
                                               "filename": "in.jsonl", "purpose": "batch"}))
    assert f.id == "file-1" and f.bytes == 12 and f.purpose == "batch" and f.status == "processed"


def test_errors_are_openais_shape():
    body = error_body(ApiError(400, "bad", param="endpoint", code="x"))
    assert body == {"error": {"message": "bad", "type": "invalid_request_error", "param": "endpoint", "code": "x"}}
    assert unauthorized(True).status == unauthorized(False).status == 401
    assert unauthorized(True).code == "invalid_api_key"


def test_a_good_create_body_and_its_options():
    spec = parse_create({**GOOD, "metadata": {"llmbatch_tier": "offpeak", "llmbatch_priority": "3",
                                              "llmbatch_budget_usd": "20", "llmbatch_deadline": "2026-12-06T18:00:00Z",
                                              "llmbatch_mode": "realtime", "llmbatch_on_budget": "fail", "mine": "y"},
                         "output_expires_after": {"anchor": "created_at", "seconds": 7200}})
    o = spec.options
    assert o["tier"] == "offpeak" and o["priority"] == 3 and o["budget_usd"] == Decimal("20")
    assert o["deadline"] == datetime(2026, 12, 6, 18, tzinfo=timezone.utc)
    assert o["mode"] == "realtime" and o["on_budget"] == "fail" and spec.output_expires_s == 7200
    assert parse_create(GOOD).options == {"on_budget": "defer", "mode": "auto"}


@pytest.mark.parametrize("change,param", [
    ({"endpoint": "/v1/images"}, "endpoint"),
    ({"completion_window": "1h"}, "completion_window"),
    ({"input_file_id": None}, "input_file_id"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k": 1}}, "metadata.k"),
    ({"metadata": {"k": "v" * 513}}, "metadata.k"),
    ({"metadata": {"llmbatch_tier": "soon"}}, "metadata"),
    ({"metadata": {"llmbatch_priority": "12"}}, "metadata"),
    ({"metadata": {"llmbatch_deadline": "tomorrow"}}, "metadata"),
    ({"metadata": {"llmbatch_budget_usd": "lots"}}, "metadata.llmbatch_budget_usd"),
    ({"metadata": {"llmbatch_budget_usd": "-1"}}, "metadata.llmbatch_budget_usd"),
    ({"metadata": {"llmbatch_mode": "fastest"}}, "metadata.llmbatch_mode"),
    ({"metadata": {"llmbatch_on_budget": "drop"}}, "metadata.llmbatch_on_budget"),
    ({"metadata": {"llmbatch_colour": "red"}}, "metadata.llmbatch_colour"),
    ({"output_expires_after": {"anchor": "created_at", "seconds": 60}}, "output_expires_after.seconds"),
    ({"output_expires_after": {"anchor": "completed_at", "seconds": 7200}}, "output_expires_after"),
])
def test_a_bad_create_body_is_400_naming_the_parameter(change, param):
    with pytest.raises(ApiError) as e:
        parse_create({**GOOD, **change})
    assert e.value.status == 400 and e.value.param == param


def test_sixteen_metadata_pairs_are_allowed():
    assert parse_create({**GOOD, "metadata": {f"k{i}": "v" for i in range(16)}}).metadata


def _job(status, accepted=3):
    return {"status": status, "accepted": accepted}


@pytest.mark.parametrize("status,job,running,now,expected", [
    ("validating", None, 0, NOW, "validating"),
    ("validating", _job("submitting"), 0, NOW, "validating"),
    ("validating", _job("running"), 0, NOW, "in_progress"),
    ("validating", _job("failed", accepted=0), 0, NOW, "failed"),
    ("validating", _job("completed"), 0, NOW, "finalizing"),
    ("in_progress", _job("running"), 2, NOW, "in_progress"),
    ("in_progress", _job("paused_budget"), 0, NOW, "in_progress"),
    ("in_progress", _job("completed_with_errors"), 0, NOW, "finalizing"),
    ("in_progress", _job("failed"), 0, NOW, "finalizing"),       # every request failed: completed, error file
    ("in_progress", _job("cancelled"), 0, NOW, "cancelling"),    # `llmbatch cancel` outside the API
    ("in_progress", _job("running"), 0, NOW + timedelta(hours=25), "expiring"),
    ("expiring", _job("cancelled"), 1, NOW + timedelta(hours=25), "expiring"),
    ("expiring", _job("cancelled"), 0, NOW + timedelta(hours=25), "expired"),
    ("cancelling", _job("cancelled"), 2, NOW, "cancelling"),     # calls in flight finish first
    ("cancelling", _job("cancelled"), 0, NOW, "cancelled"),
    ("cancelling", _job("completed"), 0, NOW, "cancelled"),
    ("completed", _job("completed"), 0, NOW, "completed"),
])
def test_a_batch_follows_its_job(status, job, running, now, expected):
    assert next_status(status, job, running=running, now=now, expires_at=NOW + timedelta(hours=24)) == expected


def test_output_and_error_lines_split_as_openai_does():
    ok = openai_line("job_1", {"custom_id": "a", "status": "succeeded", "status_code": 200,
                               "provider_request_id": "req_1", "response": {"object": "chat.completion"}})
    bad = openai_line("job_1", {"custom_id": "b", "status": "failed", "status_code": 400,
                                "provider_request_id": "req_2", "response": None,
                                "error": {"code": "invalid_request", "message": "no"}})
    unrun = openai_line("job_1", {"custom_id": "c", "status": "cancelled", "response": None,
                                  "error": {"code": "batch_cancelled", "message": "not run"}})
    assert is_output_line(ok) and not is_output_line(bad) and not is_output_line(unrun)
    assert unrun["error"]["code"] == "batch_cancelled" and unrun["response"] is None


@pytest.mark.parametrize("reason,code", [
    ("not valid JSON: Expecting value at column 1", "invalid_json_line"),
    ("expected a JSON object, got an array", "invalid_json_line"),
    ("not valid UTF-8 (byte 0: b'\\x87')", "invalid_json_line"),
    ("unknown model 'nope-9'; known models: gpt-5, gpt-4o", "model_not_found"),
    ("duplicate custom_id 'a': custom_id must be unique in a job", "duplicate_custom_id"),
    ("url '/v1/embeddings' is not the batch's endpoint /v1/chat/completions: every line of a batch names its endpoint",
     "mismatched_endpoint"),
    ("something else entirely", "invalid_request"),
])
def test_a_rejected_line_is_named_with_its_line_and_a_code(reason, code):
    assert rejection_error({"line": 7, "reason": reason}) == {"code": code, "line": 7, "message": reason,
                                                              "param": None}


def test_keys_are_random_and_only_their_hash_is_kept():
    a, b = keys.new_key(), keys.new_key()
    assert a != b and a.startswith("lb-") and len(a) >= 40
    assert keys.key_hash(a) != keys.key_hash(b) and len(keys.key_hash(a)) == 32


@pytest.mark.parametrize("project,ok", [("default", True), ("team-a_1", True), ("", False), ("A", False),
                                        ("a/b", False), ("x" * 64, False)])
def test_project_ids(project, ok):
    if ok:
        assert keys.check_project(project) == project
    else:
        with pytest.raises(Exception):
            keys.check_project(project)


def test_a_batch_being_stopped_waits_for_its_submit():
    kw = dict(running=0, now=NOW, expires_at=NOW + timedelta(hours=24))
    assert next_status("cancelling", None, submitting=True, **kw) == "cancelling"
    assert next_status("cancelling", None, **kw) == "cancelled"
    assert next_status("cancelling", _job("cancelled"), submitting=True, **kw) == "cancelling"
    assert next_status("expiring", _job("submitting"), **kw) == "expiring"


# ---------------------------------------------------------------- the streamed upload

BOUNDARY = "b0und4ry"


def _multipart(content: bytes, purpose: str = "batch", filename: str = "in.jsonl") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode() + content + f"\r\n--{BOUNDARY}--\r\n".encode()


@given(st.binary(max_size=5000), st.lists(st.integers(1, 700), max_size=30))
@hsettings(max_examples=60, deadline=None)
def test_the_file_part_reaches_disk_whole_however_the_body_is_cut(tmp_path_factory, content, cuts):
    target = tmp_path_factory.mktemp("up") / ".file-x.part"
    form = FormStream(f"multipart/form-data; boundary={BOUNDARY}", target)
    body, at = _multipart(content), 0
    for n in cuts:
        form.write(body[at:at + n])
        at += n
    form.write(body[at:])
    form.finish()
    assert target.read_bytes() == content and form.size == len(content)
    assert form.fields == {"purpose": "batch"} and form.filename == "in.jsonl"


def test_a_body_that_ends_inside_the_file_is_refused(tmp_path):
    target = tmp_path / ".file-t.part"
    form = FormStream(f"multipart/form-data; boundary={BOUNDARY}", target)
    body = _multipart(b'{"custom_id": "a"}\n' * 50)
    form.write(body[:-len(BOUNDARY) - 10])
    with pytest.raises(ApiError) as e:
        form.finish()
    assert "ends inside the file" in e.value.message
    form.discard()
    assert not target.exists()


def test_an_upload_that_is_not_multipart_or_too_big_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    with pytest.raises(ApiError) as e:
        FormStream("application/json", tmp_path / "x")
    assert e.value.status == 400
    monkeypatch.setattr(upload, "MAX_UPLOAD_BYTES", 100)
    target = tmp_path / ".file-y.part"
    form = FormStream(f"multipart/form-data; boundary={BOUNDARY}", target)
    with pytest.raises(ApiError) as e:
        form.write(_multipart(b"x" * 101))
    assert e.value.param == "file" and "100" in e.value.message
    form.discard()
    assert not target.exists()


@given(st.binary(max_size=3000))
@hsettings(max_examples=200, deadline=None)
def test_any_body_is_read_or_refused_400_never_a_crash(tmp_path_factory, body):
    target = tmp_path_factory.mktemp("junk") / ".file-z.part"
    form = FormStream(f"multipart/form-data; boundary={BOUNDARY}", target)
    try:
        form.write(body)
        form.finish()
    except ApiError as e:
        assert e.status == 400
    finally:
        form.discard()
    assert not target.exists()


def test_routes_answer_in_openais_error_shape_without_services():
    """Unknown routes, a service fault and Postgres down: OpenAI's error shape, never HTML or a bare 500."""
    from fastapi.testclient import TestClient
    from pipeline.api import app as app_mod
    from pipeline.config import load_settings

    nowhere = load_settings({"LLMBATCH_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:9/none",
                             "LLMBATCH_VAR_DIR": "/nonexistent"})   # port 9 (discard): refused at once
    client = TestClient(app_mod.create_app(nowhere), raise_server_exceptions=False)
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = client.get("/v1/batches", headers={"Authorization": "Bearer lb-x"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    assert client.get("/healthz").json() == {"status": "ok"}
