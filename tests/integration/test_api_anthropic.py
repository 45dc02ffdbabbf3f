"""Anthropic's Message Batches on ``llmbatch api``, driven by the official ``anthropic`` SDK unchanged.

``messages.batches.create → retrieve until ended → results → list → delete``, the objects compared
field by field with the SDK's models and the shapes of Anthropic's Message Batches reference (``message_batch``,
``processing_status``, ``request_counts``, the four result types, an errored line's error nested
twice); cancel (``canceling`` → ``ended``, what never ran ``canceled``) and expiry (``expired``);
the list's ``before_id``/``after_id``/``limit``; Anthropic's auth (``x-api-key``,
``anthropic-version``) and error shape; isolation (404 for another project's ids, OpenAI's and
Anthropic's ids kept apart); a project's cap across its message batches.

Run with the stack up (``make up``; the ``api`` process included).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from datetime import datetime
from decimal import Decimal

import anthropic
import openai
import pytest
import sqlalchemy as sa
from anthropic.types.messages import MessageBatch, MessageBatchIndividualResponse

from pipeline.api import keys as api_keys
from pipeline.intake.formats import parse_request
from pipeline.money.pricing import get_price_book
from tests.integration.conftest import llmbatch, wait_for
from tests.integration.holds import RUNS, held_metadata, wait_held

MODEL = "claude-haiku-4-5"


def held(requests: list[dict]) -> dict:
    """The create's ``extra_body`` that holds a batch in progress whatever the hour
    (tests/integration/holds.py: one request runs, the others wait on the job's cap)."""
    return {"metadata": held_metadata(requests)}


def raw(method: str, url: str, headers: dict | None = None, body: bytes | None = None) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=body)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read().decode()
            return r.status, (json.loads(text) if r.headers.get_content_type() == "application/json" else text)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.fixture(scope="module")
def api(stack):
    base = f"http://127.0.0.1:{stack.api_port}"
    try:
        assert raw("GET", base + "/healthz")[0] == 200
    except Exception as e:
        pytest.fail(f"llmbatch api does not answer at {base}: {e} (make up starts it)")
    return base


def new_key(engine, project: str) -> str:
    with engine.begin() as conn:
        return api_keys.create_key(conn, project, "test")[1]


def client(api: str, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=api, api_key=key, max_retries=0, timeout=60)


def request(cid: str, text: str, **params) -> dict:
    return {"custom_id": cid, "params": {"model": MODEL, "max_tokens": 24,
                                         "messages": [{"role": "user", "content": text}], **params}}


def wait_ended(c: anthropic.Anthropic, batch_id: str, timeout: float = 300) -> MessageBatch:
    seen = []

    def ended():
        b = c.messages.batches.retrieve(batch_id)
        if not seen or seen[-1] != b.processing_status:
            seen.append(b.processing_status)
        return b.processing_status == "ended" and b
    b = wait_for(ended, timeout=timeout, every=1, what=f"{batch_id} ended")
    print(f"{batch_id}: {' -> '.join(seen)}; {b.request_counts.model_dump()}")
    return b


def wait_in_progress(engine, batch_id: str) -> None:
    """Until the batch's submit has ended (Anthropic shows in_progress from the start)."""
    def status():
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT status FROM api_batches WHERE batch_id = :b"), {"b": batch_id}).scalar()
    wait_for(lambda: status() == "in_progress", timeout=120, every=1, what=f"{batch_id} in progress")


def check_batch_shape(obj: dict) -> None:
    """A message batch as Anthropic writes it: exactly the SDK model's fields, RFC 3339 times."""
    assert set(obj) == set(MessageBatch.model_fields), sorted(obj)
    assert obj["type"] == "message_batch" and obj["id"].startswith("msgbatch_")
    assert obj["processing_status"] in ("in_progress", "canceling", "ended")
    assert set(obj["request_counts"]) == {"processing", "succeeded", "errored", "canceled", "expired"}
    for k in ("created_at", "expires_at", "ended_at", "cancel_initiated_at", "archived_at"):
        assert obj[k] is None or datetime.fromisoformat(obj[k].replace("Z", "+00:00")), (k, obj[k])


def test_the_anthropic_sdk_unchanged_runs_a_batch(stack, engine, api):
    c = client(api, stack.api_first_key.reveal())   # the key the stack generated (project default)
    tag = f"asdk{time.time_ns()}"
    reqs = [request(f"{tag}-{i}", f"{tag}: say something short about {i}") for i in range(5)]
    reqs.append({"custom_id": f"{tag}-bad", "params": {"model": MODEL, "max_tokens": 8, "messages": []}})
    t = time.monotonic()
    b = c.messages.batches.create(requests=reqs)
    print(f"\ncreate: {b.model_dump_json()}")
    assert b.processing_status == "in_progress" and b.request_counts.processing == 6 and b.results_url is None
    assert (b.expires_at - b.created_at).total_seconds() == 24 * 3600
    b = wait_ended(c, b.id)
    print(f"create to ended {time.monotonic() - t:.1f} s (niced, loaded machine); {b.model_dump_json()}")
    assert b.request_counts.model_dump() == {"processing": 0, "succeeded": 5, "errored": 1, "canceled": 0,
                                             "expired": 0}
    assert b.ended_at >= b.created_at and b.cancel_initiated_at is None and b.archived_at is None
    assert b.results_url == f"{api}/v1/messages/batches/{b.id}/results"
    status, obj = raw("GET", f"{api}/v1/messages/batches/{b.id}",
                      {"x-api-key": c.api_key, "anthropic-version": "2023-06-01"})
    assert status == 200
    check_batch_shape(obj)
    results = list(c.messages.batches.results(b.id))
    assert all(isinstance(r, MessageBatchIndividualResponse) for r in results)
    assert sorted(r.custom_id for r in results) == sorted(r["custom_id"] for r in reqs)
    # the raw lines, field by field (Anthropic's Message Batches reference): {"custom_id", "result": {"type": "succeeded", "message": {…usage}}}
    status, text = raw("GET", b.results_url, {"x-api-key": c.api_key, "anthropic-version": "2023-06-01"})
    lines = {x["custom_id"]: x for x in map(json.loads, text.splitlines())}
    print(json.dumps(lines[f"{tag}-0"])[:600])
    print(json.dumps(lines[f"{tag}-bad"])[:600])
    for cid, line in lines.items():
        assert set(line) == {"custom_id", "result"}
        if cid.endswith("-bad"):
            assert set(line["result"]) == {"type", "error"} and line["result"]["type"] == "errored"
            err = line["result"]["error"]   # nested twice: {type: error, error: {type, message}}
            assert err["type"] == "error" and set(err["error"]) == {"type", "message"}
            assert err["error"]["type"] == "invalid_request_error" and "messages" in err["error"]["message"]
        else:
            assert set(line["result"]) == {"type", "message"} and line["result"]["type"] == "succeeded"
            m = anthropic.types.Message.model_validate(line["result"]["message"])
            assert m.type == "message" and m.role == "assistant" and m.content[0].type == "text"
            assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0
    assert b.id in [x.id for x in c.messages.batches.list(limit=1000).data]
    gone = c.messages.batches.delete(b.id)
    assert gone.id == b.id and gone.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        c.messages.batches.retrieve(b.id)
    assert b.id not in [x.id for x in c.messages.batches.list(limit=1000).data]


def test_cancel_ends_the_batch_with_its_unrun_requests_canceled(stack, engine, api):
    c = client(api, new_key(engine, f"acancel{time.time_ns() % 10**9}"))
    reqs = [request(f"c-{i}", f"cancel {i}") for i in range(4)]
    b = c.messages.batches.create(requests=reqs, extra_body=held(reqs))
    wait_in_progress(engine, b.id)
    wait_held(engine, b.id, 4)
    x = c.messages.batches.cancel(b.id)
    assert x.processing_status in ("canceling", "ended") and x.cancel_initiated_at is not None
    b = wait_ended(c, b.id)
    assert b.request_counts.canceled == 4 - RUNS and b.request_counts.succeeded == RUNS
    assert b.ended_at >= b.cancel_initiated_at
    types = sorted(r.result.type for r in c.messages.batches.results(b.id))
    assert types == ["canceled"] * (4 - RUNS) + ["succeeded"] * RUNS


def test_a_batch_past_its_window_ends_with_its_requests_expired(stack, engine, api):
    c = client(api, new_key(engine, f"aexp{time.time_ns() % 10**9}"))
    reqs = [request(f"e-{i}", f"expire {i}") for i in range(3)]
    b = c.messages.batches.create(requests=reqs, extra_body=held(reqs))
    wait_in_progress(engine, b.id)
    wait_held(engine, b.id, 3)
    with engine.begin() as conn:   # 24 hours on
        conn.execute(sa.text("UPDATE api_batches SET expires_at = now() - interval '1 second' WHERE batch_id = :b"),
                     {"b": b.id})
    b = wait_ended(c, b.id)
    assert b.request_counts.expired == 3 - RUNS and b.cancel_initiated_at is None
    types = sorted(r.result.type for r in c.messages.batches.results(b.id))
    assert types == ["expired"] * (3 - RUNS) + ["succeeded"] * RUNS
    with pytest.raises(anthropic.BadRequestError):   # ended: nothing left to cancel
        c.messages.batches.cancel(b.id)
    assert c.messages.batches.delete(b.id).type == "message_batch_deleted"


def test_an_unfinished_batch_has_no_results_and_cannot_be_deleted(stack, engine, api):
    c = client(api, new_key(engine, f"aopen{time.time_ns() % 10**9}"))
    reqs = [request("o-1", "open"), request("o-2", "open")]   # two: the hold lets one run
    b = c.messages.batches.create(requests=reqs, extra_body=held(reqs))
    with pytest.raises(anthropic.AnthropicError):   # the SDK itself refuses: no results_url yet
        c.messages.batches.results(b.id)
    status, body = raw("GET", f"{api}/v1/messages/batches/{b.id}/results",
                       {"x-api-key": c.api_key, "anthropic-version": "2023-06-01"})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError):
        c.messages.batches.delete(b.id)
    c.messages.batches.cancel(b.id)


def test_the_list_pages_with_after_id_before_id_and_limit(stack, engine, api):
    c = client(api, new_key(engine, f"apages{time.time_ns() % 10**9}"))
    reqs = [request("p-1", "page"), request("p-2", "page")]   # two: the hold lets one run
    made = [c.messages.batches.create(requests=reqs, extra_body=held(reqs)).id for _ in range(3)]
    newest = made[::-1]
    first = c.messages.batches.list(limit=2)
    assert [b.id for b in first.data] == newest[:2] and first.has_more
    assert (first.first_id, first.last_id) == (newest[0], newest[1])
    rest = c.messages.batches.list(limit=2, after_id=first.last_id)
    assert [b.id for b in rest.data] == newest[2:] and not rest.has_more
    back = c.messages.batches.list(limit=1, before_id=newest[2])
    assert [b.id for b in back.data] == [newest[1]] and back.has_more
    assert [b.id for b in c.messages.batches.list(limit=2)] == newest   # the SDK's auto-paging
    for bad in ("0", "1001", "x"):
        status, body = raw("GET", f"{api}/v1/messages/batches?limit={bad}",
                           {"x-api-key": c.api_key, "anthropic-version": "2023-06-01"})
        assert status == 400 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    for b in made:
        c.messages.batches.cancel(b)


def test_bad_bodies_answer_400_in_anthropics_shape(stack, engine, api):
    key = new_key(engine, f"abad{time.time_ns() % 10**9}")
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    for body, says in ((b"{not json", "not valid JSON"), (b"[]", "requests"), (b'{"requests": []}', "requests"),
                       (json.dumps({"requests": [request("a", "x"), request("a", "y")]}).encode(),
                        "requests.1.custom_id"),
                       (json.dumps({"requests": [request("no spaces", "x")]}).encode(), "requests.0.custom_id"),
                       (json.dumps({"requests": [{"custom_id": "a"}]}).encode(), "requests.0.params")):
        status, out = raw("POST", f"{api}/v1/messages/batches", headers, body)
        assert status == 400, (body[:40], out)
        assert out["type"] == "error" and out["error"]["type"] == "invalid_request_error"
        assert says in out["error"]["message"], out
    with engine.connect() as conn:   # nothing kept of a refused create
        assert not conn.execute(sa.text("SELECT count(*) FROM api_batches WHERE project_id LIKE 'abad%'")).scalar()


def test_auth_and_isolation(stack, engine, api, tmp_path):
    n = time.time_ns() % 10**9
    ka, kb = new_key(engine, f"aiso-a{n}"), new_key(engine, f"aiso-b{n}")
    a, b = client(api, ka), client(api, kb)
    reqs = [request("i-1", "isolation"), request("i-2", "isolation")]   # two: the hold lets one run
    batch = a.messages.batches.create(requests=reqs, extra_body=held(reqs))
    for call in (lambda: b.messages.batches.retrieve(batch.id), lambda: b.messages.batches.cancel(batch.id),
                 lambda: b.messages.batches.delete(batch.id), lambda: b.messages.batches.list(after_id=batch.id)):
        with pytest.raises(anthropic.NotFoundError) as e:
            call()
        assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    assert batch.id not in [x.id for x in b.messages.batches.list().data]
    # OpenAI's and Anthropic's batches are apart: neither side's routes know the other's ids
    oa = openai.OpenAI(base_url=api + "/v1", api_key=ka, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        oa.batches.retrieve(batch.id)
    assert batch.id not in [x.id for x in oa.batches.list(limit=100).data]
    lines = [{"custom_id": cid, "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "text-embedding-3-small", "input": "x"}} for cid in ("x", "y")]
    f = oa.files.create(file=("in.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()), purpose="batch")
    ob = oa.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h",
                           metadata=held_metadata(lines))
    with pytest.raises(anthropic.NotFoundError):
        a.messages.batches.retrieve(ob.id)
    assert all(x.purpose == "batch" for x in oa.files.list())   # a message batch's own files are not shown
    # no key, a wrong key, a revoked key: 401 authentication_error; no anthropic-version: 400
    with engine.begin() as conn:
        key_id, revoked = api_keys.create_key(conn, f"aiso-a{n}", "revoked")
        api_keys.revoke_key(conn, key_id)
    for headers in ({"anthropic-version": "2023-06-01"}, {"x-api-key": "lb-nope", "anthropic-version": "2023-06-01"},
                    {"x-api-key": revoked, "anthropic-version": "2023-06-01"}):
        for method, url in (("GET", f"/v1/messages/batches/{batch.id}"), ("GET", "/v1/messages/batches"),
                            ("POST", "/v1/messages/batches"), ("GET", f"/v1/messages/batches/{batch.id}/results"),
                            ("POST", f"/v1/messages/batches/{batch.id}/cancel"),
                            ("DELETE", f"/v1/messages/batches/{batch.id}")):
            status, body = raw(method, api + url, headers, b"{}" if method == "POST" else None)
            assert status == 401 and body["type"] == "error", (method, url, headers, body)
            assert body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        client(api, revoked).messages.batches.list()
    status, body = raw("GET", f"{api}/v1/messages/batches", {"x-api-key": ka})
    assert status == 400 and "anthropic-version" in body["error"]["message"]
    for x in (lambda: a.messages.batches.cancel(batch.id), lambda: oa.batches.cancel(ob.id)):
        x()


def test_a_project_cap_holds_across_its_message_batches(stack, engine, api):
    """A daily cap of about three requests' maximum over two batches of eight: the cap binds, the
    project's spend stays within it, the requests refused are errored results."""
    project = f"acap{time.time_ns() % 10**9}"
    c = client(api, new_key(engine, project))
    prompt = "Summarise the following text in one word. " + "The weather is mild and the sea is calm. " * 30
    batches = [[request(f"{k}-{i}", f"{k} {i}. {prompt}", max_tokens=8) for i in range(8)] for k in ("one", "two")]
    one_max = parse_request(batches[0][0], get_price_book()).max_cost_usd
    cap = (one_max * 3).quantize(Decimal("0.00000001"))
    assert llmbatch("budget", "set", "--project", project, "--usd", str(cap)).returncode == 0
    meta = {"metadata": {"llmbatch_on_budget": "fail", "llmbatch_tier": "peak"}}
    made = [c.messages.batches.create(requests=reqs, extra_body=meta) for reqs in batches]
    ended = [wait_ended(c, b.id) for b in made]
    with engine.connect() as conn:
        spent = conn.execute(sa.text(
            "SELECT coalesce(sum(r.cost_usd), 0) FROM results r JOIN jobs j USING (job_id)"
            " WHERE j.project_id = :p"), {"p": project}).scalar()
    done = sum(b.request_counts.succeeded for b in ended)
    errored = [r for b in ended for r in c.messages.batches.results(b.id) if r.result.type == "errored"]
    print(f"\ncap ${cap} (3 x max ${one_max}); spent ${spent}; {done} of 16 succeeded; {len(errored)} errored")
    assert 0 < spent <= cap and 0 < done < 16 and done + len(errored) == 16
    assert all("budget" in r.result.error.error.message for r in errored), errored[0].result.error


def _rss_kb(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status").read().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_a_large_batch_streams_through_bounded_memory(stack, engine, api):
    """A create call of LLMBATCH_API_MESSAGES_MB (default 50) MB: the body is spooled to disk and
    read back by ijson, so the service's peak RSS grows far less than the body; then the time to
    in_progress (its submit), and a cancel so the machine is not kept busy."""
    mb = int(os.environ.get("LLMBATCH_API_MESSAGES_MB", "50"))
    pid = int((stack.var_dir / "run" / "api.pid").read_text())
    reqs, size = [], 0
    while size < mb * 10**6:
        r = request(f"big-{len(reqs)}", f"line {len(reqs)} " + "lorem ipsum dolor sit amet " * 100)
        size += len(json.dumps(r)) + 2
        reqs.append(r)
    c = client(api, new_key(engine, f"abig{time.time_ns() % 10**9}"))
    before = _rss_kb(pid, "VmHWM")
    t = time.monotonic()
    b = c.messages.batches.create(requests=reqs, extra_body={"metadata": {"llmbatch_tier": "background"}},
                                  timeout=600)
    took = time.monotonic() - t
    after = _rss_kb(pid, "VmHWM")
    print(f"\ncreate of {size / 1e6:.0f} MB ({len(reqs)} requests) answered in {took:.1f} s (niced, loaded machine);"
          f" api peak RSS {before / 1024:.0f} -> {after / 1024:.0f} MB")
    assert b.request_counts.processing == len(reqs)
    assert (after - before) / 1024 < mb / 4, "the body was held in memory"
    t = time.monotonic()
    wait_in_progress(engine, b.id)
    took = time.monotonic() - t
    peak = _rss_kb(pid, "VmHWM")
    c.messages.batches.cancel(b.id)
    print(f"its submit: in progress after {took:.1f} s more (niced, loaded machine); api peak RSS {peak / 1024:.0f} MB")
    with engine.connect() as conn:
        accepted = conn.execute(sa.text("SELECT j.accepted FROM jobs j JOIN api_batches b USING (job_id)"
                                        " WHERE b.batch_id = :b"), {"b": b.id}).scalar()
    assert accepted == len(reqs)
    assert (peak - before) / 1024 < mb / 2, "the submit held the body in memory"


def test_a_batchs_results_are_written_with_no_lock_held(stack, engine, api, monkeypatch):
    """A message batch's results file is written before its row is locked to record it: a cancel or
    another client's read never waits on the disk."""
    from pipeline.api import anthropic_batches
    from pipeline.config import get_settings
    from tests.integration.api_service import api_stopped, probe_lock_while_writing
    project = f"anolock{time.time_ns() % 10**9}"
    c = client(api, new_key(engine, project))
    reqs = [request(f"n-{i}", f"nolock {time.time_ns()} {i}") for i in range(4)]
    b = wait_ended(c, c.messages.batches.create(requests=reqs).id)
    with api_stopped():
        with engine.begin() as conn:   # back to just before its first read after it ended
            first = conn.execute(sa.text("SELECT output_file_id FROM api_batches WHERE batch_id = :b"),
                                 {"b": b.id}).scalar()
            conn.execute(sa.text("UPDATE api_batches SET result_counts = NULL, output_file_id = NULL"
                                 " WHERE batch_id = :b"), {"b": b.id})
        seen = probe_lock_while_writing(monkeypatch, engine, b.id)
        row = anthropic_batches.retrieve(engine, get_settings(), None, project, b.id)
    assert seen == {"lock": "free"}, f"the batch's row was locked while its results were written: {seen}"
    assert row["result_counts"]["succeeded"] == len(reqs) and row["output_file_id"] not in (None, first)
    assert sorted(r.custom_id for r in c.messages.batches.results(b.id)) == sorted(r["custom_id"] for r in reqs)
