"""Ids from input cannot hurt: the request key is printable ASCII, and control characters are refused."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from pipeline.errors import LineError
from pipeline.ids import request_key
from pipeline.intake import messages
from pipeline.intake.formats import parse_request
from pipeline.money.pricing import PriceBook

PRICES = PriceBook.load()
#: what RFC 9110 allows in a header value, and what http.client and the SDKs send: printable ASCII
HEADER_SAFE = set(map(chr, range(0x21, 0x7f)))
HOSTILE = ["a\n2026-12-05 05:40:00,000 CRITICAL pipeline.money.budget FORGED", "esc\x1b[2J", "cr\rinside",
           "tab\there", "nel\x85x", "del\x7f", "ls\u2028x"]

any_text = st.text(min_size=1, max_size=80)


@settings(max_examples=300, deadline=None)
@given(job=any_text, cid=any_text)
def test_the_key_is_printable_ascii_whatever_the_ids(job, cid):
    key = request_key(job, cid)
    assert set(key) <= HEADER_SAFE, key
    key.encode("ascii")   # what an HTTP client does with a header value


@settings(max_examples=300, deadline=None)
@given(cids=st.lists(any_text, min_size=2, max_size=20, unique=True))
def test_distinct_custom_ids_give_distinct_keys(cids):
    assert len({request_key("job_1", c) for c in cids}) == len(cids)


@settings(max_examples=200, deadline=None)
@given(jobs=st.lists(any_text, min_size=2, max_size=10, unique=True), cid=any_text)
def test_distinct_jobs_give_distinct_keys(jobs, cid):
    assert len({request_key(j, cid) for j in jobs}) == len(jobs)


def test_the_key_starts_with_the_job_id_a_provider_groups_by():
    assert request_key("job_0a1b2c", "café-1").startswith("job_0a1b2c:")
    assert request_key("exec-12ab.x~y", "r0").startswith("exec-12ab.x~y:")


def openai_line(cid: str) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}}


@pytest.mark.parametrize("cid", ["café-1", "日本-2", "with space", "emoji 👩‍👩‍👧", "quote\"'`", "a:b~c"])
def test_a_printable_custom_id_is_accepted(cid):
    assert parse_request(openai_line(cid), PRICES).custom_id == cid


@pytest.mark.parametrize("cid", HOSTILE)
def test_a_custom_id_with_a_control_character_is_refused_at_submit(cid):
    with pytest.raises(LineError) as e:
        parse_request(openai_line(cid), PRICES)
    assert "control character" in e.value.reason and "\n" not in e.value.reason and "\x1b" not in e.value.reason


def _message(**over) -> bytes:
    m = {"v": 1, "job_id": "job_ok", "custom_id": "r1", "provider": "openai", "model": "gpt-4o-mini",
         "body": {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
         "input_tokens": 8, "max_cost_usd": "0.0001"}
    return json.dumps({**m, **over}).encode()


@pytest.mark.parametrize("field", ["job_id", "custom_id"])
@pytest.mark.parametrize("value", HOSTILE)
def test_the_batcher_refuses_a_control_character_in_an_id(field, value):
    with pytest.raises(LineError) as e:
        messages.decode(_message(**{field: value}))
    assert e.value.reason.startswith(f"{field} contains a control character")


def test_the_published_schema_refuses_them_too():
    v = messages.validator()
    assert list(v.iter_errors(json.loads(_message(custom_id="a\nb"))))
    assert not list(v.iter_errors(json.loads(_message(custom_id="日本-2"))))
