"""``llmbatch api`` on the running stack, driven by the official ``openai`` SDK unchanged.

The flow a user already has (files.create → batches.create → batches.retrieve until it ends →
files.content of the output) for chat, responses and embeddings lines, its output lines compared
field by field with OpenAI's shapes; isolation between projects (404 on another project's ids,
401 without a live key); a project cap smaller than its batches' cost holding across them; hostile
uploads (every bad line named with its number, the rest runs, the service lives); an upload cut
off mid-way leaving nothing; and the service's peak memory on a large upload.

Run with the stack up (``make up``; the ``api`` process included).
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path

import openai
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from pipeline.api import keys as api_keys
from pipeline.intake.formats import parse_request
from pipeline.money.pricing import get_price_book
from tests.integration.conftest import llmbatch, wait_for, write_jsonl
from tests.integration.holds import RUNS, held_metadata, states, wait_held

EMBED_MODEL = "text-embedding-3-small"
ENDED = ("completed", "failed", "expired", "cancelled")
TYPED = {"/v1/chat/completions": ChatCompletion, "/v1/responses": Response,
         "/v1/embeddings": CreateEmbeddingResponse}


def raw(method: str, url: str, headers: dict | None = None) -> tuple[int, dict]:
    """A call without the SDK: (status, JSON body)."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def healthy(api: str) -> bool:
    return raw("GET", api + "/healthz")[0] == 200


@pytest.fixture(scope="module")
def api(stack):
    base = f"http://127.0.0.1:{stack.api_port}"
    try:
        assert healthy(base)
    except Exception as e:   # the stack is up (the stack fixture said so) but the api is not
        pytest.fail(f"llmbatch api does not answer at {base}: {e} (make up starts it)")
    return base


def new_key(engine, project: str) -> str:
    with engine.begin() as conn:
        return api_keys.create_key(conn, project, "test")[1]


def client(api: str, key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=api + "/v1", api_key=key or "none", max_retries=0, timeout=60)


def run_batch(c: openai.OpenAI, path: Path, endpoint: str, metadata: dict | None = None, timeout: float = 300):
    f = c.files.create(file=path.open("rb"), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h", metadata=metadata)
    assert b.status == "validating" and b.input_file_id == f.id and b.endpoint == endpoint
    seen = [b.status]
    deadline = time.monotonic() + timeout
    while b.status not in ENDED:
        assert time.monotonic() < deadline, f"batch {b.id} still {b.status} after {timeout} s"
        time.sleep(1)
        b = c.batches.retrieve(b.id)
        if b.status != seen[-1]:
            seen.append(b.status)
    return f, b, seen


def line_of(endpoint: str, i: int, tag: str) -> dict:
    text = f"{tag}: say something short about the number {i}"
    body = {"/v1/chat/completions": {"model": "gpt-4o-mini", "max_tokens": 24,
                                     "messages": [{"role": "user", "content": text}]},
            "/v1/responses": {"model": "gpt-4o-mini", "input": text, "max_output_tokens": 24},
            "/v1/embeddings": {"model": EMBED_MODEL, "input": text}}[endpoint]
    return {"custom_id": f"{tag}-{i}", "method": "POST", "url": endpoint, "body": body}


@pytest.mark.parametrize("endpoint", list(TYPED))
def test_the_openai_sdk_unchanged_runs_a_batch(stack, engine, api, tmp_path, endpoint):
    c = client(api, stack.api_first_key.reveal())   # the key the stack generated, project default
    tag = f"sdk{time.time_ns()}"
    path = write_jsonl(tmp_path / "in.jsonl", [line_of(endpoint, i, tag) for i in range(6)])
    t = time.monotonic()
    f, b, seen = run_batch(c, path, endpoint, metadata={"llmbatch_tier": "peak", "team": "a"})
    print(f"\n{endpoint}: file {f.id} {f.bytes} bytes; statuses {' -> '.join(seen)}; {b.request_counts};"
          f" upload to completed {time.monotonic() - t:.1f} s (niced, loaded machine)")
    assert b.status == "completed" and b.metadata == {"llmbatch_tier": "peak", "team": "a"}
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (6, 6, 0)
    assert b.created_at <= b.in_progress_at <= b.finalizing_at <= b.completed_at and b.error_file_id is None
    assert b.usage.input_tokens > 0
    out = [json.loads(x) for x in c.files.content(b.output_file_id).text.splitlines()]
    print(json.dumps(out[0])[:600])
    assert sorted(x["custom_id"] for x in out) == sorted(f"{tag}-{i}" for i in range(6))
    for line in out:   # OpenAI's batch output line (its error file uses the same shape)
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
        assert line["id"].startswith("batch_req_")
        assert set(line["response"]) == {"status_code", "request_id", "body"}
        assert line["response"]["status_code"] == 200 and isinstance(line["response"]["request_id"], str)
        body = TYPED[endpoint].model_validate(line["response"]["body"])
        if endpoint == "/v1/chat/completions":
            assert body.object == "chat.completion" and body.usage.prompt_tokens > 0
        elif endpoint == "/v1/responses":
            assert body.object == "response" and body.usage.input_tokens > 0
        else:
            assert body.object == "list" and body.data[0].object == "embedding" and body.usage.prompt_tokens > 0
    assert c.files.retrieve(b.output_file_id).purpose == "batch_output"
    assert b.id in [x.id for x in c.batches.list(limit=100).data]


def test_a_batch_nobody_reads_still_ends_with_its_files(stack, engine, api, tmp_path):
    c = client(api, new_key(engine, f"unread{time.time_ns() % 10**9}"))
    path = write_jsonl(tmp_path / "in.jsonl", [line_of("/v1/embeddings", i, f"unread{time.time_ns()}") for i in range(3)])
    f = c.files.create(file=path.open("rb"), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")

    def ended():
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT status = 'completed' AND output_file_id IS NOT NULL FROM api_batches"
                                        " WHERE batch_id = :b"), {"b": b.id}).scalar()
    wait_for(ended, timeout=120, every=1, what="completed without a read")


def test_garbage_requests_answer_400_and_the_service_lives(stack, engine, api):
    key = new_key(engine, f"junk{time.time_ns() % 10**9}")
    for path, ctype, body in (("/v1/batches", "application/json", b"{not json"),
                              ("/v1/batches", "application/json", b"[]"),
                              ("/v1/files", "multipart/form-data", b"--x\r\n"),
                              ("/v1/files", "multipart/form-data; boundary=x", b"\x00\xff" * 1000),
                              ("/v1/files", "text/plain", b"hello")):
        req = urllib.request.Request(api + path, data=body, method="POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": ctype})
        try:
            urllib.request.urlopen(req, timeout=30)
            raise AssertionError(f"{path} {ctype} {body[:20]!r} was accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 400, (path, ctype, body[:20], e.code, e.read()[:200])
            assert set(json.load(e)["error"]) == {"message", "type", "param", "code"}
    assert healthy(api)


def test_list_pages_with_after_and_limit(stack, engine, api, tmp_path):
    c = client(api, new_key(engine, f"pages{time.time_ns() % 10**9}"))
    path = write_jsonl(tmp_path / "in.jsonl", [line_of("/v1/embeddings", 0, "pages")])
    f = c.files.create(file=path.open("rb"), purpose="batch")
    made = [c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h").id
            for _ in range(3)]
    first = c.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    rest = c.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in rest.data] == made[:1] and not rest.has_more
    for bad in ("0", "101", "x"):
        status, body = raw("GET", api + f"/v1/batches?limit={bad}", {"Authorization": f"Bearer {c.api_key}"})
        assert status == 400 and body["error"]["param"] == "limit"


def test_a_project_sees_only_its_own_and_a_bad_key_gets_401(stack, engine, api, tmp_path):
    n = time.time_ns() % 10**9
    a, b = client(api, new_key(engine, f"iso-a{n}")), client(api, new_key(engine, f"iso-b{n}"))
    path = write_jsonl(tmp_path / "in.jsonl", [line_of("/v1/embeddings", i, "iso") for i in range(2)])
    f = a.files.create(file=path.open("rb"), purpose="batch")
    batch = a.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    for call in (lambda: b.files.retrieve(f.id), lambda: b.files.content(f.id), lambda: b.files.delete(f.id),
                 lambda: b.batches.retrieve(batch.id), lambda: b.batches.cancel(batch.id),
                 lambda: b.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h"),
                 lambda: b.batches.list(after=batch.id)):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["message"] and e.value.status_code == 404
    assert batch.id not in [x.id for x in b.batches.list().data]
    assert f.id not in [x.id for x in b.files.list()] and f.id in [x.id for x in a.files.list(purpose="batch")]
    assert a.batches.retrieve(batch.id).id == batch.id and a.files.retrieve(f.id).id == f.id
    # no key, a wrong key, a revoked key: 401 in OpenAI's shape, on every route
    for headers in ({}, {"Authorization": "Bearer lb-not-a-key"}, {"Authorization": "Basic abc"}):
        for method, url in (("GET", f"/v1/batches/{batch.id}"), ("GET", "/v1/batches"), ("POST", "/v1/files"),
                            ("GET", f"/v1/files/{f.id}/content"), ("POST", "/v1/batches")):
            status, body = raw(method, api + url, headers)
            assert status == 401, (method, url, headers, body)
            assert set(body["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        client(api, "lb-wrong").batches.list()
    key_id = next(k["key_id"] for k in llmbatch_keys() if k["project_id"] == f"iso-b{n}")
    assert llmbatch("keys", "revoke", key_id).returncode == 0
    with pytest.raises(openai.AuthenticationError):
        b.batches.list()
    assert a.batches.list().data   # A's key is untouched


def llmbatch_keys() -> list[dict]:
    out = llmbatch("keys", "list", "--json", check=True)
    return json.loads(out.stdout)


def test_keys_create_prints_a_key_once_and_stores_only_its_hash(stack, engine, api):
    project = f"cli{time.time_ns() % 10**9}"
    out = llmbatch("keys", "create", "--project", project, check=True)
    key = out.stdout.strip()
    assert key.startswith("lb-") and client(api, key).batches.list().data == []
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT key_sha256, hint FROM api_keys WHERE project_id = :p"),
                              {"p": project}).one()
    assert bytes(stored.key_sha256) == api_keys.key_hash(key) and stored.hint == key[:7]
    assert key not in json.dumps(llmbatch_keys(), default=str)
    # the read-only role of `llmbatch sql` reads the batches, never the key hashes
    import psycopg
    with psycopg.connect(stack.reader_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        conn.execute("SELECT count(*) FROM api_batches").fetchone()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT key_sha256 FROM api_keys").fetchone()


def test_bad_create_and_upload_answer_400_naming_the_problem(stack, engine, api, tmp_path):
    c = client(api, new_key(engine, f"bad{time.time_ns() % 10**9}"))
    path = write_jsonl(tmp_path / "in.jsonl", [line_of("/v1/embeddings", 0, "bad")])
    f = c.files.create(file=path.open("rb"), purpose="batch")
    for kwargs, param in (({"endpoint": "/v1/images"}, "endpoint"),
                          ({"metadata": {"llmbatch_tier": "soon"}}, "metadata"),
                          ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata")):
        with pytest.raises(openai.BadRequestError) as e:
            c.batches.create(**{"input_file_id": f.id, "endpoint": "/v1/embeddings", "completion_window": "24h",
                                **kwargs})
        assert e.value.body["param"] == param
    for name, content, words in (("empty.jsonl", b"", "empty"), ("array.jsonl", b'[{"a": 1}, {"b": 2}]\n', "array"),
                                 ("pretty.jsonl", b'{\n "custom_id": "a"\n}\n', "spread over several lines")):
        with pytest.raises(openai.BadRequestError) as e:
            c.files.create(file=(name, content), purpose="batch")
        assert words in e.value.body["message"] and name in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=path.open("rb"), purpose="fine-tune")
    assert e.value.body["param"] == "purpose"


# ---------------------------------------------------------------- hostile uploads

GOOD = st.integers(0, 10**6).map(lambda i: json.dumps(line_of("/v1/embeddings", i, "h")))
BAD = st.one_of(
    st.binary(min_size=1, max_size=60).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" ").decode("latin-1")),
    st.just('{"custom_id": "x"'),
    st.just("[1, 2, 3]"),
    st.just('"just a string"'),
    st.just(json.dumps({"custom_id": "u", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}})),
    st.just(json.dumps({"custom_id": "m", "method": "POST", "url": "/v1/embeddings", "body": {"model": "nope-9"}})),
    st.just(json.dumps({"custom_id": "n", "method": "POST", "url": "/v1/embeddings"})),
    st.just(json.dumps({"custom_id": "d", "params": {"model": "claude-3-5-haiku-latest", "max_tokens": 5,
                                                     "messages": [{"role": "user", "content": "hi"}]}})),
)


@hsettings(max_examples=int(os.environ.get("LLMBATCH_API_FUZZ_EXAMPLES", "6")), deadline=None,
           suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.booleans(), st.data()), min_size=2, max_size=14))
def test_hostile_uploads_name_every_bad_line_and_the_rest_runs(stack, api, tmp_path_factory, picks):
    from pipeline.stores import db
    engine = db.get_engine()
    c = client(api, new_key(engine, "fuzz"))
    lines, bad = [], set()
    used = set()
    for good, data in picks:
        if good:
            text = data.draw(GOOD)
            cid = json.loads(text)["custom_id"]
            if cid in used:      # a repeat is a duplicate custom_id: bad by the rules
                bad.add(len(lines) + 1)
            used.add(cid)
        else:
            text = data.draw(BAD)
            if not text.strip():
                continue         # a blank line is no request
            bad.add(len(lines) + 1)
        lines.append(text)
    if len(bad) == len(lines):
        lines.append(json.dumps(line_of("/v1/embeddings", -1, "h")))
    path = tmp_path_factory.mktemp("fuzz") / "in.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="latin-1")
    try:
        f = c.files.create(file=path.open("rb"), purpose="batch")
    except openai.BadRequestError as e:   # the whole file unusable: named, nothing made
        assert e.value.body["param"] == "file" if hasattr(e, "value") else True
        assert healthy(api)
        return
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    wait_for(lambda: c.batches.retrieve(b.id).status in ENDED, timeout=240, every=1, what=f"{b.id} ended")
    b = c.batches.retrieve(b.id)
    named = {e.line for e in (b.errors.data if b.errors else [])}
    assert named == bad, (named, bad, lines)
    assert all(e.message for e in b.errors.data) if b.errors else True
    assert b.request_counts.total == len(lines) - len(bad)
    assert b.status == "completed" and b.request_counts.completed == b.request_counts.total
    assert healthy(api)


def test_an_upload_cut_off_midway_leaves_nothing(stack, engine, api):
    project = f"cut{time.time_ns() % 10**9}"
    key = new_key(engine, project)
    boundary = "xyzzy"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode()
    line = (json.dumps(line_of("/v1/embeddings", 1, "cut")) + "\n").encode()
    host, port = api.rsplit("/", 1)[-1].split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall((f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {50 * 10**6}\r\n\r\n").encode())
    s.sendall(head)
    for _ in range(3 * 10**6 // len(line)):   # 3 MB of the 50 announced, then the client is gone
        s.sendall(line)
    s.close()
    time.sleep(3)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM api_files WHERE project_id = :p"), {"p": project}).scalar() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM api_batches WHERE project_id = :p"),
                            {"p": project}).scalar() == 0
    d = Path(stack.api_files_dir or stack.var_dir / "api-files") / project
    assert not d.exists() or list(d.iterdir()) == []
    assert healthy(api)


# ---------------------------------------------------------------- a project's cap

def test_a_project_cap_holds_across_its_batches(stack, engine, api, tmp_path):
    """A daily cap of about four requests' maximum, two batches of twelve lines each: the cap binds
    (some lines are refused budget_exceeded) and the project's spend stays within it."""
    project = f"cap{time.time_ns() % 10**9}"
    c = client(api, new_key(engine, project))
    prompt = "Summarise the following text in one word. " + "The weather is mild and the sea is calm. " * 30
    lines = [[{"custom_id": f"{k}-{i}", "method": "POST", "url": "/v1/chat/completions",
               "body": {"model": "gpt-4o-mini", "max_tokens": 8,
                        "messages": [{"role": "user", "content": f"{k} {i}. {prompt}"}]}} for i in range(12)]
             for k in ("one", "two")]
    one_max = parse_request(lines[0][0], get_price_book()).max_cost_usd
    cap = (one_max * 4).quantize(Decimal("0.00000001"))
    assert llmbatch("budget", "set", "--project", project, "--usd", str(cap)).returncode == 0
    meta = {"llmbatch_on_budget": "fail", "llmbatch_tier": "peak"}
    files = [c.files.create(file=write_jsonl(tmp_path / f"{k}.jsonl", ls).open("rb"), purpose="batch")
             for k, ls in zip(("one", "two"), lines)]
    made = [c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                             metadata=meta) for f in files]
    for b in made:
        wait_for(lambda: c.batches.retrieve(b.id).status in ENDED, timeout=300, every=1, what=f"{b.id} ended")
    ended = [c.batches.retrieve(b.id) for b in made]
    with engine.connect() as conn:
        spent = conn.execute(sa.text(
            "SELECT coalesce(sum(r.cost_usd), 0) FROM results r JOIN jobs j USING (job_id)"
            " WHERE j.project_id = :p"), {"p": project}).scalar()
    done = sum(b.request_counts.completed for b in ended)
    refused = []
    for b in ended:
        if b.error_file_id:
            refused += [json.loads(x) for x in c.files.content(b.error_file_id).text.splitlines()]
    print(f"\ncap ${cap} (4 x max ${one_max}); spent ${spent}; {done} of 24 ran; {len(refused)} refused")
    assert 0 < spent <= cap
    assert 0 < done < 24 and refused and all(x["error"]["code"] == "budget_exceeded" for x in refused)
    assert all(x.status == "completed" for x in ended)
    # the counters rebuilt from the ledger hold the project's day as the ledger does
    from pipeline.money.ledger import ledger_snapshot
    from pipeline.money.units import to_units
    snap = ledger_snapshot(engine, stack)
    assert snap["caps"][f"project:{project}"] == str(to_units(cap))
    assert [v for k, v in snap["spent"].items() if k.startswith(f"project:{project}@")] == [str(to_units(spent))]


# ---------------------------------------------------------------- memory of a large upload

def _rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_a_large_upload_streams_through_bounded_memory(stack, engine, api, tmp_path):
    """A file of LLMBATCH_API_UPLOAD_MB (default 100) MB: the service's peak RSS grows far less than
    the file (it is copied in 1 MB chunks), and the whole file arrives."""
    mb = int(os.environ.get("LLMBATCH_API_UPLOAD_MB", "100"))
    pid = int((stack.var_dir / "run" / "api.pid").read_text())
    path = tmp_path / "big.jsonl"
    line = line_of("/v1/embeddings", 0, "big")
    with path.open("w") as f:
        i = 0
        while f.tell() < mb * 10**6:
            line["custom_id"] = f"big-{i}"
            line["body"]["input"] = f"line {i} " + "lorem ipsum dolor sit amet " * 100
            f.write(json.dumps(line) + "\n")
            i += 1
    c = client(api, new_key(engine, f"big{time.time_ns() % 10**9}"))
    before = _rss_kb(pid, "VmHWM")
    t = time.monotonic()
    up = c.files.create(file=path.open("rb"), purpose="batch")
    took = time.monotonic() - t
    after, now = _rss_kb(pid, "VmHWM"), _rss_kb(pid, "VmRSS")
    print(f"\nupload of {path.stat().st_size / 1e6:.0f} MB ({i} lines) in {took:.1f} s (niced, loaded machine);"
          f" api peak RSS {before / 1024:.0f} -> {after / 1024:.0f} MB (now {now / 1024:.0f} MB)")
    assert up.bytes == path.stat().st_size
    assert (after - before) / 1024 < mb / 4, "the upload was held in memory"
    # its submit (read, validated, counted and published by the service, as `llmbatch submit` does):
    # the time to in_progress and the peak RSS; then cancelled, so the machine is not kept busy
    t = time.monotonic()
    b = c.batches.create(input_file_id=up.id, endpoint="/v1/embeddings", completion_window="24h",
                         metadata={"llmbatch_tier": "background"})
    b = wait_for(lambda: (x := c.batches.retrieve(b.id)).status != "validating" and x, timeout=1200, every=1,
                 what="in_progress")
    took = time.monotonic() - t
    peak = _rss_kb(pid, "VmHWM")
    c.batches.cancel(b.id)
    print(f"batch of {i} lines: {b.status} after {took:.1f} s (niced, loaded machine); api peak RSS"
          f" {peak / 1024:.0f} MB")
    assert b.status == "in_progress" and b.request_counts.total == i
    assert (peak - before) / 1024 < mb / 2, "the submit held the file in memory"


# ---------------------------------------------------------------- cancel, expiry, expired output

def held_batch(c: openai.OpenAI, engine, tmp_path: Path, n: int = 4, tag: str = "held"):
    """A batch held in progress by its job's cap, whatever the hour (tests/integration/holds.py): one
    line has run, the other ``n - 1`` wait until something stops the batch."""
    lines = [line_of("/v1/embeddings", i, f"{tag}{time.time_ns()}") for i in range(n)]
    f = c.files.create(file=write_jsonl(tmp_path / f"{tag}.jsonl", lines).open("rb"), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h",
                         metadata=held_metadata(lines))
    wait_for(lambda: c.batches.retrieve(b.id).status == "in_progress", timeout=120, every=1, what="in_progress")
    wait_held(engine, b.id, n)
    return b


def _wait_end(c, batch_id, timeout=240):
    return wait_for(lambda: (x := c.batches.retrieve(batch_id)).status in ENDED and x, timeout=timeout, every=1,
                    what=f"{batch_id} ended")


def _error_lines(c, b) -> list[dict]:
    return [json.loads(x) for x in c.files.content(b.error_file_id).text.splitlines()] if b.error_file_id else []


def test_a_cancelled_batch_ends_cancelled_with_its_unrun_lines_in_the_error_file(stack, engine, api, tmp_path):
    c = client(api, new_key(engine, f"cancel{time.time_ns() % 10**9}"))
    b = held_batch(c, engine, tmp_path)
    x = c.batches.cancel(b.id)
    assert x.status in ("cancelling", "cancelled") and x.cancelling_at
    b = _wait_end(c, b.id)
    assert b.status == "cancelled" and b.cancelled_at >= b.cancelling_at
    assert len(c.files.content(b.output_file_id).text.splitlines()) == RUNS   # the line the hold let run
    errs = _error_lines(c, b)
    assert len(errs) == 4 - RUNS and {e["error"]["code"] for e in errs} == {"batch_cancelled"}
    assert all(e["response"] is None and e["id"].startswith("batch_req_") for e in errs)
    with pytest.raises(openai.ConflictError):
        c.batches.cancel(b.id)


def test_a_batch_cancelled_while_its_file_is_read_runs_nothing(stack, engine, api, tmp_path):
    """Cancelled at once, while the service still reads its file: no line beyond the one its hold lets
    run (if the batcher wrote it before the cancel) ever runs, and the rest end cancelled."""
    c = client(api, new_key(engine, f"early{time.time_ns() % 10**9}"))
    lines = [line_of("/v1/embeddings", i, f"early{time.time_ns()}") for i in range(200)]
    f = c.files.create(file=write_jsonl(tmp_path / "early.jsonl", lines).open("rb"), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h",
                         metadata=held_metadata(lines))
    assert c.batches.cancel(b.id).status == "cancelling"
    b = _wait_end(c, b.id)
    assert b.status == "cancelled" and b.request_counts.completed <= RUNS
    with engine.connect() as conn:
        job = conn.execute(sa.text("SELECT job_id FROM api_batches WHERE batch_id = :b"), {"b": b.id}).scalar()
        ran = conn.execute(sa.text("SELECT count(*) FROM results WHERE job_id = :j"), {"j": job}).scalar()
    assert ran <= RUNS and set(states(engine, b.id)) <= {"succeeded", "cancelled"}


def test_a_batch_past_its_window_expires_with_batch_expired_lines(stack, engine, api, tmp_path):
    c = client(api, new_key(engine, f"exp{time.time_ns() % 10**9}"))
    b = held_batch(c, engine, tmp_path, tag="exp")
    with engine.begin() as conn:   # 24 hours on: the completion window is over
        conn.execute(sa.text("UPDATE api_batches SET expires_at = now() - interval '1 second' WHERE batch_id = :b"),
                     {"b": b.id})
    b = _wait_end(c, b.id)
    assert b.status == "expired" and b.expired_at and b.cancelled_at is None
    errs = _error_lines(c, b)
    assert len(errs) == 4 - RUNS and {e["error"]["code"] for e in errs} == {"batch_expired"}


def test_output_files_expire_as_asked(stack, engine, api, tmp_path):
    from pipeline.api import files as api_files
    c = client(api, new_key(engine, f"outexp{time.time_ns() % 10**9}"))
    path = write_jsonl(tmp_path / "in.jsonl", [line_of("/v1/embeddings", 0, f"outexp{time.time_ns()}")])
    f = c.files.create(file=path.open("rb"), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h",
                         output_expires_after={"anchor": "created_at", "seconds": 3600})
    b = _wait_end(c, b.id)
    out = c.files.retrieve(b.output_file_id)
    assert out.expires_at == b.created_at + 3600
    with engine.begin() as conn:   # an hour on
        disk = conn.execute(sa.text("UPDATE api_files SET expires_at = now() - interval '1 second'"
                                    " WHERE file_id = :f RETURNING path"), {"f": out.id}).scalar()
    with pytest.raises(openai.NotFoundError):
        c.files.content(out.id)
    assert api_files.purge_expired(engine) >= 1 and not Path(disk).exists()


def test_a_service_killed_mid_submit_leaves_no_half_batch(stack, engine, api, tmp_path):
    """kill -9 of the service while it publishes a batch's lines: the restarted service submits the
    file again under the same job (every line once), or, if the upkeep closed the job first, fails
    the batch and cancels its job. Never a batch in progress with part of its file."""
    import subprocess
    n = int(os.environ.get("LLMBATCH_API_KILL_LINES", "20000"))
    c = client(api, new_key(engine, f"kill{time.time_ns() % 10**9}"))
    tag = f"kill{time.time_ns()}"
    lines = [line_of("/v1/embeddings", i, tag) for i in range(n)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    f = c.files.create(file=path.open("rb"), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h",
                         metadata=held_metadata(lines))   # held: one line runs, whatever the hour
    with engine.connect() as conn:
        job = conn.execute(sa.text("SELECT job_id FROM api_batches WHERE batch_id = :b"), {"b": b.id}).scalar()

    def read_so_far():
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT lines_read FROM jobs WHERE job_id = :j AND status = 'submitting'"),
                                {"j": job}).scalar() or 0
    wait_for(lambda: read_so_far() >= n // 10, timeout=300, every=0.2, what="the submit under way")
    subprocess.run(["bash", str(Path(__file__).resolve().parents[2] / "infra" / "stack.sh"), "kill", "api"],
                   check=True, capture_output=True, timeout=60)
    wait_for(lambda: _answers(api), timeout=120, every=0.5, what="the service back")
    try:
        b = wait_for(lambda: (x := c.batches.retrieve(b.id)).status != "validating" and x, timeout=900, every=2,
                     what="the batch past validating")
        with engine.connect() as conn:
            status = conn.execute(sa.text("SELECT status FROM jobs WHERE job_id = :j"), {"j": job}).scalar()
        print(f"\nafter kill -9 at {n // 10}+ of {n} lines: batch {b.status}, job {status}")
        if b.status == "failed":
            assert status == "cancelled" and "service stopped" in b.errors.data[0].message
        else:
            assert b.status == "in_progress" and b.request_counts.total == n

            def rows():
                with engine.connect() as conn:
                    return conn.execute(sa.text("SELECT count(*) FROM requests WHERE job_id = :j"),
                                        {"j": job}).scalar()
            wait_for(lambda: rows() == n, timeout=600, every=2, what=f"{n} request rows")
    finally:
        c.batches.cancel(b.id) if c.batches.retrieve(b.id).status not in ENDED else None


def _answers(api: str) -> bool:
    try:
        return healthy(api)
    except OSError:
        return False


def test_readers_at_once_write_a_batchs_files_once(stack, engine, api, tmp_path):
    """Eight clients polling one batch as it ends (and the service's own mover): one output file."""
    from concurrent.futures import ThreadPoolExecutor
    project = f"race{time.time_ns() % 10**9}"
    c = client(api, new_key(engine, project))
    path = write_jsonl(tmp_path / "in.jsonl", [line_of("/v1/embeddings", i, f"race{time.time_ns()}") for i in range(20)])
    f = c.files.create(file=path.open("rb"), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")

    def poll(_):
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            x = c.batches.retrieve(b.id)
            if x.status in ENDED:
                return x.output_file_id
        raise AssertionError("not ended")
    with ThreadPoolExecutor(8) as pool:
        seen = set(pool.map(poll, range(8)))
    with engine.connect() as conn:
        outputs = conn.execute(sa.text("SELECT count(*) FROM api_files WHERE project_id = :p"
                                       " AND purpose = 'batch_output'"), {"p": project}).scalar()
    assert len(seen) == 1 and None not in seen and outputs == 1
    # the readers that lost the race dropped the files they wrote (the service's mover may be one)
    from pipeline.api.files import files_dir
    from pipeline.config import get_settings

    def left_over() -> list[str]:
        with engine.connect() as conn:
            live = set(conn.execute(sa.text("SELECT file_id FROM api_files WHERE project_id = :p"),
                                    {"p": project}).scalars())
        return sorted(p.name for p in (files_dir(get_settings()) / project).iterdir() if p.name not in live)
    wait_for(lambda: not left_over(), timeout=30, every=0.5, what="no file but the batch's own on disk")


def test_a_batchs_files_are_written_with_no_lock_held(stack, engine, api, tmp_path, monkeypatch):
    """A batch's output and error files are written before its row is locked to record them: a
    cancel or another client's read of the batch never waits on the disk."""
    from pipeline.api import batches as api_batches
    from pipeline.config import get_settings
    from tests.integration.api_service import api_stopped, probe_lock_while_writing
    project = f"nolock{time.time_ns() % 10**9}"
    c = client(api, new_key(engine, project))
    lines = [line_of("/v1/embeddings", i, f"nolock{time.time_ns()}") for i in range(5)]
    _, b, _ = run_batch(c, write_jsonl(tmp_path / "in.jsonl", lines), "/v1/embeddings")
    assert b.status == "completed"
    with api_stopped():
        with engine.begin() as conn:   # back to just before its end: its job done, its files not written
            conn.execute(sa.text(
                "UPDATE api_batches SET status = 'finalizing', output_file_id = NULL, error_file_id = NULL,"
                " completed_at = NULL WHERE batch_id = :b"), {"b": b.id})
        seen = probe_lock_while_writing(monkeypatch, engine, b.id)
        row = api_batches.advance(engine, get_settings(), None, project, b.id)
    assert seen == {"lock": "free"}, f"the batch's row was locked while its files were written: {seen}"
    assert row["status"] == "completed" and row["output_file_id"] and row["output_file_id"] != b.output_file_id
    assert len(c.files.content(row["output_file_id"]).text.splitlines()) == len(lines)
