"""Message decoding in the batcher: every hostile message is a ``LineError`` with its reason,
never another exception, and a well-formed one becomes a row priced from the price book."""

import json
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import LineError
from pipeline.intake import messages
from pipeline.intake.formats import parse_request
from pipeline.intake.messages import MAX_DEPTH, decode
from pipeline.intake.producer import to_message
from pipeline.money.bounds import request_bound
from pipeline.money.pricing import PriceBook

PRICES = PriceBook.load()
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def message(**change) -> dict:
    """A message as the producer sends it, with fields changed."""
    line = {"custom_id": "x1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "max_tokens": 50,
                     "messages": [{"role": "user", "content": "hi"}]}}
    m = json.loads(to_message("job_1", 3, parse_request(line, PRICES)))
    m.update(change)
    return m


def raw(m) -> bytes:
    return json.dumps(m, allow_nan=True, separators=(",", ":"), ensure_ascii=False).encode()


def nested(depth: int):
    v: list = []
    for _ in range(depth - 1):
        v = [v]
    return v


def deep_text(depth: int) -> bytes:
    """A message whose metadata is an array nested ``depth`` deep, as raw JSON (no recursion here)."""
    m = raw(message(metadata={"x": 0}))
    assert b'{"x":0}' in m
    return m.replace(b'{"x":0}', b'{"x":' + b"[" * depth + b"]" * depth + b"}")


def spliced(old: bytes, new: bytes) -> bytes:
    m = raw(message())
    assert old in m
    return m.replace(old, new)


HOSTILE = {
    "deadline without an offset": raw(message(deadline="2026-12-02T10:00:00")),
    "deadline not a date": raw(message(deadline="2026-13-45T99:00:00Z")),
    "NUL in content": raw(message(body={"model": "gpt-4o-mini",
                                        "messages": [{"role": "user", "content": "a\u0000b"}]})),
    "NUL in a key": raw(message(metadata={"k\u0000": 1})),
    "lone surrogate": b'{"v":1,"job_id":"j","custom_id":"c\\ud800","provider":"openai"}',
    "input_tokens true": raw(message(input_tokens=True)),
    "input_tokens 10**12": raw(message(input_tokens=10**12)),
    "input_tokens 5.0": raw(message(input_tokens=5.0)),
    "input_tokens negative": raw(message(input_tokens=-1)),
    "max_cost 1e12": raw(message(max_cost_usd="1e12")),
    "max_cost Infinity": raw(message(max_cost_usd="Infinity")),
    "max_cost -5": raw(message(max_cost_usd="-5")),
    "max_cost NaN": raw(message(max_cost_usd="NaN")),
    "max_cost a number": raw(message(max_cost_usd=0.1)),
    "NaN token in the body": spliced(b'"max_tokens":50', b'"max_tokens":50,"temperature":NaN'),
    "Infinity token": spliced(b'"max_tokens":50', b'"max_tokens":Infinity'),
    "1e400": spliced(b'"max_tokens":50', b'"max_tokens":50,"top_p":1e400'),
    "5000-digit integer": spliced(b'"max_tokens":50', b'"max_tokens":' + b"9" * 5000),
    "line abc": raw(message(line="abc")),
    "line 0": raw(message(line=0)),
    "line over int4": raw(message(line=2**31)),
    "array nested 100,000 deep": deep_text(100_000),
    "array nested just too deep": deep_text(MAX_DEPTH + 1),
    "empty custom_id": raw(message(custom_id="")),
    "empty job_id": raw(message(job_id="")),
    "100,001-character custom_id": raw(message(custom_id="c" * 100_001)),
    "metadata a string": raw(message(metadata="hi")),
    "published_at yesterday": raw(message(published_at="yesterday")),
    "model differs from body.model": raw(message(model="gpt-4o")),
    "unknown model": raw(message(model="gpt-99", body={"model": "gpt-99",
                                                       "messages": [{"role": "user", "content": "x"}]})),
    "provider mismatch": raw(message(provider="anthropic")),
    "max_tokens over the model's limit": raw(message(body={"model": "gpt-4o-mini", "max_tokens": 10**7,
                                                           "messages": [{"role": "user", "content": "x"}]})),
    "no messages": raw(message(body={"model": "gpt-4o-mini", "messages": []})),
    "not JSON": b"{not json",
    "a JSON array": b"[1, 2]",
    "empty value": None,
    "invalid UTF-8": b'{"v": 1, "job_id": "\xff\xfe"}',
    "version 2": raw(message(v=2)),
    "unknown provider": raw(message(provider="mistral")),
    "priority 11": raw(message(priority=11)),
    "priority 5.0": raw(message(priority=5.0)),
    "unknown tier": raw(message(tier="urgent")),
    "body a string": raw(message(body="text")),
    "tokens_exact a string": raw(message(tokens_exact="yes")),
    "unknown mode": raw(message(mode="fast")),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_message_is_a_line_error_with_a_reason(name):
    with pytest.raises(LineError) as e:
        decode(HOSTILE[name], NOW, PRICES)
    assert e.value.reason


def test_reasons_name_the_problem():
    def reason(name):
        with pytest.raises(LineError) as e:
            decode(HOSTILE[name], NOW, PRICES)
        return e.value.reason
    assert "deadline" in reason("deadline without an offset")
    assert "NUL" in reason("NUL in content")
    assert "NaN" in reason("NaN token in the body")
    assert "nested" in reason("array nested 100,000 deep")
    assert "body.model" in reason("model differs from body.model")
    assert "gpt-99" in reason("unknown model")
    assert "custom_id" in reason("empty custom_id")
    assert "max_cost_usd" in reason("max_cost NaN")


def test_a_well_formed_message_is_a_row():
    row = decode(raw(message(deadline="2026-12-01T12:05:00+00:00", metadata={"a": [1, {"b": 2}]})), NOW, PRICES)
    assert row["job_id"] == "job_1" and row["custom_id"] == "x1" and row["line"] == 3
    assert row["tier"] == "immediate" and "deadline" in row["tier_reason"]
    assert row["status"] == "queued"


def test_the_cost_is_recomputed_not_taken_from_the_producer():
    m = message(max_cost_usd="0.000000001")
    row = decode(raw(m), NOW, PRICES)
    bound = request_bound("openai", m["body"], PRICES, declared_input_tokens=m["input_tokens"])
    assert Decimal(row["max_cost_usd"]) == bound.max_cost_usd > Decimal("0.000000001")


def test_declared_tokens_can_only_raise_the_count():
    m = message(input_tokens=100_000)
    row = decode(raw(m), NOW, PRICES)
    assert row["input_tokens"] == 100_000
    small = decode(raw(message(input_tokens=0)), NOW, PRICES)
    assert small["input_tokens"] > 0


def test_a_deadline_with_an_offset_is_compared_in_utc():
    row = decode(raw(message(deadline="2026-12-01T13:05:00+01:00")), NOW, PRICES)
    assert row["tier"] == "immediate"


def test_nesting_up_to_the_limit_is_accepted():
    decode(deep_text(MAX_DEPTH - 2), NOW, PRICES)


def test_unicode_is_kept():
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "日本語 🎉 é"}]}
    row = decode(raw(message(body=body)), NOW, PRICES)
    assert row["body"]["messages"][0]["content"] == "日本語 🎉 é"


def test_small_costs_in_exponent_form_are_a_valid_hint():
    # Python writes Decimal("0.00000015") as "1.5E-7": older producers sent that
    decode(raw(message(max_cost_usd="1.5E-7")), NOW, PRICES)
    m = message()
    assert "E" not in m["max_cost_usd"].upper()


#: values a producer could put in any top-level field: each JSON type, and the edges the
#: schema draws (integers as floats, bools, control characters, date-times without offsets)
_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0.0, 1.0, 5.0, 9.0, 2.0**31]),
    st.text(max_size=70), st.sampled_from(["", "a\n", "a\u2028b", "immediate", "realtime", "flex", "openai",
                                           "/v1/embeddings", "0.5", "1e12", "1.5E-7", "2026-12-02T10:00:00Z",
                                           "2026-12-02T10:00:00", "2026-02-30T10:00:00+01:00",
                                           "2026-12-02t10:00:00z", "2026-12-02T23:59:60Z"]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=400, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(sorted(messages._schema()["properties"]) + ["extra"]),
                               _VALUES, min_size=1, max_size=3))
def test_the_compiled_validator_admits_only_what_jsonschema_admits(changes):
    """The fast validator decides alone only when it admits; so it must never admit a message
    the reference (jsonschema, strict integers) refuses, and ``validate`` agrees with the reference."""
    m = message(**changes)
    reference = not any(True for _ in messages.validator().iter_errors(m))
    try:
        messages.validate(m)
        admitted = True
    except LineError:
        admitted = False
    controls = any(isinstance(m.get(k), str) and any(ord(c) < 32 or 127 <= ord(c) < 160 or c in "\u2028\u2029"
                                                     for c in m[k]) for k in ("job_id", "custom_id"))
    assert admitted == (reference and not controls)


def test_the_walk_still_refuses_what_hides_behind_escapes_and_brackets():
    """``parse`` walks the values only when the text could hide a NUL, a surrogate or deep nesting:
    each of those, spelled as the text can spell it, is still refused."""
    for text in (rb'{"a":"\\u0000 is text, \u0000 is not"}', rb'{"a":["\udfff"]}',
                 b'{"a":' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}", b'{"a":[1,-1e999]}'):
        with pytest.raises(LineError):
            messages.parse(text)
    assert messages.parse(rb'{"a":"\\u0000 is six characters"}') == {"a": r"\u0000 is six characters"}


def test_a_date_time_only_the_reference_refuses_is_refused_by_both():
    """jsonschema-rs calls year 0000 a date-time, RFC 3339 (the reference's check) does not; found
    by the property test above. The fast path uses the reference's format checks."""
    m = message(published_at="0000-01-01T00:00:00Z")
    assert any(True for _ in messages.validator().iter_errors(m))
    with pytest.raises(LineError, match="published_at"):
        messages.validate(m)
