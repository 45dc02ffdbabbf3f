"""Result export shapes: OpenAI batch output, Anthropic message batch results, CSV."""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal

from pipeline.stores.export import anthropic_line, answer_text, openai_line, write_results

OPENAI_BODY = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                            "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
                         "prompt_tokens_details": {"cached_tokens": 2}}}
ANTHROPIC_BODY = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
                  "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}],
                  "stop_reason": "end_turn", "usage": {"input_tokens": 5, "output_tokens": 2}}


def ok_row(body=OPENAI_BODY, **over):
    return {"custom_id": "a", "line": 1, "status": "succeeded", "status_code": 200, "response": body,
            "error": None, "provider_request_id": "req_1", "cost_usd": Decimal("0.0001"),
            "model": body["model"], "input_tokens": 12, "cached_input_tokens": 2, "output_tokens": 3, **over}


def failed_row(**over):
    return {"custom_id": "b", "line": 2, "status": "failed", "status_code": 429, "response": None,
            "error": {"code": "attempts_exhausted", "message": "rate limited"}, "provider_request_id": None,
            "cost_usd": Decimal(0), "model": "gpt-4o-mini", "input_tokens": None,
            "cached_input_tokens": None, "output_tokens": None, **over}


def test_openai_success_and_error():
    line = openai_line("job", ok_row())
    assert line["custom_id"] == "a" and line["error"] is None
    assert line["response"]["body"] == OPENAI_BODY and line["response"]["status_code"] == 200
    err = openai_line("job", failed_row())
    assert err["error"]["code"] == "attempts_exhausted" and err["response"]["status_code"] == 429


def test_anthropic_succeeded_keeps_an_anthropic_message():
    line = anthropic_line("job", ok_row(ANTHROPIC_BODY))
    assert line == {"custom_id": "a", "result": {"type": "succeeded", "message": ANTHROPIC_BODY}}


def test_anthropic_succeeded_converts_an_openai_completion():
    msg = anthropic_line("job", ok_row())["result"]["message"]
    assert msg["type"] == "message" and msg["role"] == "assistant"
    assert msg["content"] == [{"type": "text", "text": "hello"}]
    assert msg["stop_reason"] == "end_turn"
    assert msg["usage"] == {"input_tokens": 10, "cache_read_input_tokens": 2, "output_tokens": 3}


def test_anthropic_errored_and_canceled():
    err = anthropic_line("job", failed_row())["result"]
    assert err["type"] == "errored"
    assert err["error"] == {"type": "error", "error": {"type": "rate_limit_error", "message": "rate limited"}}
    pending = anthropic_line("job", failed_row(status="queued", status_code=None, error=None))["result"]
    assert pending["type"] == "errored" and "not finished" in pending["error"]["error"]["message"]
    assert anthropic_line("job", failed_row(status="cancelled", error=None))["result"] == {"type": "canceled"}


def test_answer_text_of_both_shapes():
    assert answer_text(OPENAI_BODY) == "hello"
    assert answer_text(ANTHROPIC_BODY) == "hi there"
    assert answer_text(None) is None


def test_csv_has_a_header_and_one_row_per_request():
    out = io.StringIO()
    assert write_results([ok_row(), failed_row()], "job", out, "csv") == 2
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["custom_id"] for r in rows] == ["a", "b"]
    assert rows[0]["answer"] == "hello" and rows[0]["cost_usd"] == "0.0001" and rows[0]["output_tokens"] == "3"
    assert rows[1]["error_code"] == "attempts_exhausted" and rows[1]["answer"] == ""


def test_jsonl_formats_write_one_json_object_per_line():
    for fmt in ("openai", "anthropic"):
        out = io.StringIO()
        write_results([ok_row(), failed_row()], "job", out, fmt)
        lines = out.getvalue().splitlines()
        assert len(lines) == 2 and all(json.loads(x)["custom_id"] for x in lines)
