"""Anthropic's Message Batches shapes (pipeline/api/anthropic_shapes.py) and the webhooks' signing
(pipeline/api/webhooks.py), without services: objects are what the official anthropic SDK's typed
models hold (field for field), a create call's requests are checked as Anthropic checks them, a
result line has Anthropic's types, and an event's headers verify with the openai SDK and with
the Standard Webhooks library."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import openai
import pytest
from anthropic.types.messages import DeletedMessageBatch, MessageBatch, MessageBatchIndividualResponse
from anthropic.types.shared import ErrorResponse
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from pipeline.api import anthropic_shapes as shapes
from pipeline.api import webhooks
from pipeline.api.shapes import ApiError
from pipeline.config import Settings

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc)
URL = "http://api/v1/messages/batches/msgbatch_1/results"


def _row(**over):
    row = {"batch_id": "msgbatch_1", "status": "in_progress", "request_total": 7, "result_counts": None,
           "created_at": NOW, "expires_at": NOW + timedelta(hours=24), "cancelling_at": None,
           "completed_at": None, "failed_at": None, "expired_at": None, "cancelled_at": None}
    row.update(over)
    return row


def test_a_batch_in_progress_is_what_the_sdk_reads_field_for_field():
    obj = shapes.batch_object(_row(), URL)
    assert set(obj) == set(MessageBatch.model_fields)
    b = MessageBatch.model_validate(obj)
    assert b.type == "message_batch" and b.processing_status == "in_progress" and b.results_url is None
    assert b.request_counts.model_dump() == {"processing": 7, "succeeded": 0, "errored": 0, "canceled": 0,
                                             "expired": 0}
    assert b.created_at == NOW and b.expires_at == NOW + timedelta(hours=24) and b.ended_at is None
    assert obj["created_at"] == "2026-12-05T12:00:00Z"   # RFC 3339, as Anthropic writes it


@pytest.mark.parametrize("status,shown", [("validating", "in_progress"), ("finalizing", "in_progress"),
                                          ("expiring", "in_progress"), ("cancelling", "canceling"),
                                          ("completed", "ended"), ("failed", "ended"), ("expired", "ended"),
                                          ("cancelled", "ended")])
def test_every_status_is_a_processing_status_the_sdk_knows(status, shown):
    assert MessageBatch.model_validate(shapes.batch_object(_row(status=status), URL)).processing_status == shown


def test_an_ended_batch_counts_its_results_and_names_its_results_url():
    counts = {"succeeded": 3, "errored": 2, "canceled": 1, "expired": 1}
    b = MessageBatch.model_validate(shapes.batch_object(
        _row(status="cancelled", result_counts=counts, cancelling_at=NOW, cancelled_at=NOW + timedelta(minutes=1)),
        URL))
    assert b.request_counts.model_dump() == {"processing": 0, **counts}
    assert b.results_url == URL and b.cancel_initiated_at == NOW and b.ended_at == NOW + timedelta(minutes=1)


def test_deleted_and_error_objects_are_the_sdks():
    assert DeletedMessageBatch.model_validate(shapes.deleted_object("msgbatch_1")).type == "message_batch_deleted"
    # 413's request_too_large is in Anthropic's errors page, not (yet) in the SDK's union of types
    assert shapes.error_body(ApiError(413, "big"))["error"]["type"] == "request_too_large"
    for status, kind in ((400, "invalid_request_error"), (401, "authentication_error"), (404, "not_found_error"),
                         (503, "api_error")):
        body = shapes.error_body(ApiError(status, "why"))
        e = ErrorResponse.model_validate(body)
        assert e.type == "error" and e.error.type == kind and e.error.message == "why"
    assert shapes.unauthorized(False).status == shapes.unauthorized(True).status == 401


def test_requests_are_checked_naming_their_index():
    seen: set[str] = set()
    ok = shapes.check_request(0, {"custom_id": "a-1", "params": {"model": "m"}}, seen)
    assert ok == {"custom_id": "a-1", "params": {"model": "m"}} and seen == {"a-1"}
    for item, where in (({"custom_id": "a-1", "params": {}}, "requests.3.custom_id"),   # a duplicate
                        ({"custom_id": "bad id!", "params": {}}, "requests.3.custom_id"),
                        ({"custom_id": "x" * 65, "params": {}}, "requests.3.custom_id"),
                        ({"custom_id": "b"}, "requests.3.params"),
                        ({"custom_id": "b", "params": {}, "body": {}}, "requests.3.body"),
                        ("b", "requests.3")):
        with pytest.raises(ApiError) as e:
            shapes.check_request(3, item, seen)
        assert e.value.status == 400 and e.value.message.startswith(where), e.value.message


def _result(**row):
    return MessageBatchIndividualResponse.model_validate(shapes.result_line("job", {"custom_id": "c", **row},
                                                                            row.pop("ended", "completed")))


def test_result_lines_have_anthropics_four_types():
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
               "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
               "usage": {"input_tokens": 3, "output_tokens": 1}}
    ok = shapes.result_line("job", {"custom_id": "c", "status": "succeeded", "response": message,
                                    "endpoint": "/v1/messages"}, "completed")
    assert MessageBatchIndividualResponse.model_validate(ok).result.type == "succeeded"
    failed = shapes.result_line("job", {"custom_id": "c", "status": "failed", "status_code": 400, "response": None,
                                        "error": {"code": "x", "message": "bad"}, "endpoint": "/v1/messages"},
                                "completed")
    # the error nested twice (Anthropic's Message Batches reference): result.error = {type: error, error: {type, message}}
    assert failed["result"] == {"type": "errored", "error": {"type": "error", "error": {
        "type": "invalid_request_error", "message": "bad"}}}
    assert MessageBatchIndividualResponse.model_validate(failed).result.error.error.type == "invalid_request_error"
    unrun = {"custom_id": "c", "status": "queued", "response": None, "error": None, "endpoint": "/v1/messages"}
    assert shapes.result_line("job", unrun, "cancelled")["result"] == {"type": "canceled"}
    assert shapes.result_line("job", unrun, "expired")["result"] == {"type": "expired"}
    cancelled = {**unrun, "status": "cancelled"}   # cancelled by the window's end: expired
    assert shapes.result_line("job", cancelled, "expired")["result"] == {"type": "expired"}
    rejected = shapes.rejected_line("c", "unknown model 'x'")
    assert MessageBatchIndividualResponse.model_validate(rejected).result.error.error.message == "unknown model 'x'"
    assert shapes.unpublished_line("c", "cancelled", "why")["result"] == {"type": "canceled"}
    assert shapes.unpublished_line("c", "failed", "why")["result"]["type"] == "errored"


def test_the_list_limit_is_1_to_1000():
    assert shapes.check_limit("1") == 1 and shapes.check_limit("1000") == 1000
    for bad in ("0", "1001", "-1", "x", ""):
        with pytest.raises(ApiError):
            shapes.check_limit(bad)


EVENT = {"event_id": "evt_1", "type": "batch.completed", "created_at": NOW, "batch_id": "batch_1"}


def test_an_event_is_openais_shape_and_its_signature_verifies():
    secret = webhooks.new_secret()
    body = webhooks.event_body(EVENT)
    now = datetime.now(timezone.utc)
    headers = webhooks.signed_headers(secret, "evt_1", body, now)
    event = openai.OpenAI(api_key="x").webhooks.unwrap(body, headers, secret=secret)   # verifies, then parses
    assert event.type == "batch.completed" and event.data.id == "batch_1" and event.id == "evt_1"
    assert event.created_at == int(NOW.timestamp()) and event.object == "event"
    Webhook(secret).verify(body, headers)   # the Standard Webhooks library agrees
    with pytest.raises(WebhookVerificationError):
        Webhook(webhooks.new_secret()).verify(body, headers)   # another secret
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace("batch_1", "batch_2"), headers)   # another body


def test_retries_back_off_doubling_up_to_the_cap():
    s = Settings(api_webhook_retry_s=2.0, api_webhook_retry_max_s=60.0)
    waits = [webhooks.backoff_s(n, s) for n in range(1, 9)]
    assert 1.6 <= waits[0] <= 2.4 and 3.2 <= waits[1] <= 4.8 and all(w <= 72.0 for w in waits)
    assert 48.0 <= waits[-1] <= 72.0


def test_a_webhook_url_is_http():
    assert webhooks.check_url("https://example.test/hook")
    for bad in ("ftp://x/y", "example.test", "http://"):
        with pytest.raises(Exception):
            webhooks.check_url(bad)
