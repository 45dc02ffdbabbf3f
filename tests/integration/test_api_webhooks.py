"""Webhooks of ``llmbatch api`` on the running stack: a receiver in the test gets one signed event
per batch end (OpenAI's ``batch.completed|failed|cancelled|expired`` shape, verified with the
openai SDK's ``webhooks.unwrap`` and the project's secret), for OpenAI batches and Anthropic
message batches alike; a receiver that is down gets the event once it is back, and a receiver
answering 500 gets it again; every attempt is recorded in Postgres.

Run with the stack up (``make up``; the ``api`` process included).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anthropic
import openai
import pytest
import sqlalchemy as sa

from pipeline.api import keys as api_keys
from pipeline.api import webhooks
from tests.integration.conftest import llmbatch, wait_for
from tests.integration.holds import held_metadata

EMBED = b'{"custom_id": "%s", "method": "POST", "url": "/v1/embeddings", "body": {"model": "text-embedding-3-small", "input": "%s"}}\n'


class Receiver:
    """An HTTP server in a thread that keeps every POST (headers, body) and answers 200, or the
    codes queued in ``answers`` first."""

    def __init__(self, port: int = 0):
        self.got: list[tuple[dict, bytes]] = []
        self.answers: list[int] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                code = outer.answers.pop(0) if outer.answers else 200
                if code == 200:
                    outer.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(code)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def api(stack):
    return f"http://127.0.0.1:{stack.api_port}"


def project_with_hook(engine, name: str, url: str) -> tuple[str, str, str]:
    """A new project with a key and a webhook: (project, key, secret)."""
    project = f"{name}{time.time_ns() % 10**9}"
    with engine.begin() as conn:
        key = api_keys.create_key(conn, project, "test")[1]
        secret = webhooks.register(conn, project, url)
    return project, key, secret


def verified(got: list[tuple[dict, bytes]], secret: str) -> list:
    """Each received event, its signature verified (and parsed) by the openai SDK."""
    sdk = openai.OpenAI(api_key="unused", webhook_secret=secret)
    return [sdk.webhooks.unwrap(body, headers) for headers, body in got]


def attempts(engine, batch_id: str) -> list[tuple]:
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT a.attempt, a.status_code, a.error FROM api_webhook_attempts a JOIN api_webhook_events e"
            " USING (event_id) WHERE e.batch_id = :b ORDER BY a.attempt"), {"b": batch_id}).all()


def test_one_signed_event_per_batch_end(stack, engine, api):
    receiver = Receiver()
    try:
        project, key, secret = project_with_hook(engine, "hook", receiver.url)
        oa = openai.OpenAI(base_url=api + "/v1", api_key=key, max_retries=0)
        an = anthropic.Anthropic(base_url=api, api_key=key, max_retries=0)
        tag = f"h{time.time_ns()}"
        good = oa.files.create(file=("a.jsonl", EMBED % (b"a", tag.encode()) + EMBED % (b"b", tag.encode())),
                               purpose="batch")
        bad = oa.files.create(file=("b.jsonl", b'{"custom_id": "x", "method": "POST", "url": "/v1/embeddings",'
                                               b' "body": {"model": "no-such-model", "input": "x"}}\n'), purpose="batch")
        want = {
            oa.batches.create(input_file_id=good.id, endpoint="/v1/embeddings", completion_window="24h").id:
                "batch.completed",
            oa.batches.create(input_file_id=bad.id, endpoint="/v1/embeddings", completion_window="24h").id:
                "batch.failed",
            an.messages.batches.create(requests=[{"custom_id": "m1", "params": {
                "model": "claude-haiku-4-5", "max_tokens": 16,
                "messages": [{"role": "user", "content": tag}]}}]).id: "batch.completed",
        }
        # held in progress whatever the hour by their jobs' caps (tests/integration/holds.py)
        held = oa.batches.create(input_file_id=good.id, endpoint="/v1/embeddings", completion_window="24h",
                                 metadata=held_metadata([json.loads(x) for x in (EMBED % (b"a", tag.encode()),
                                                                                 EMBED % (b"b", tag.encode()))]))
        want[held.id] = "batch.cancelled"
        late_requests = [{"custom_id": cid, "params": {"model": "claude-haiku-4-5", "max_tokens": 16,
                                                       "messages": [{"role": "user", "content": tag}]}}
                         for cid in ("m2", "m3")]   # two: the hold lets one run
        late = an.messages.batches.create(requests=late_requests, extra_body={"metadata": held_metadata(late_requests)})
        want[late.id] = "batch.expired"
        wait_for(lambda: oa.batches.retrieve(held.id).status == "in_progress", timeout=120, every=1, what="held")
        oa.batches.cancel(held.id)
        with engine.begin() as conn:   # the message batch's 24 hours are over
            conn.execute(sa.text("UPDATE api_batches SET expires_at = now() WHERE batch_id = :b"), {"b": late.id})
        wait_for(lambda: len(receiver.got) >= len(want), timeout=300, every=1, what="an event per batch")
        time.sleep(8)   # more rounds of the mover and the sender: still one event per batch
        events = verified(receiver.got, secret)
        for e in events:
            print(f"\n{e.model_dump_json()}")
        assert sorted((e.data.id, e.type) for e in events) == sorted(want.items())
        assert len({e.id for e in events}) == len(events) and all(e.object == "event" for e in events)
        for headers, _ in receiver.got:
            assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= set(headers)
        with pytest.raises(openai.InvalidWebhookSignatureError):   # another secret does not verify
            verified(receiver.got[:1], webhooks.new_secret())
        for batch_id in want:
            assert [(n, code) for n, code, _ in attempts(engine, batch_id)] == [(1, 200)]
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM api_webhook_events WHERE project_id = :p"
                                        " AND delivered_at IS NOT NULL"), {"p": project}).scalar() == len(want)
    finally:
        receiver.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_receiver_that_is_down_gets_the_event_when_it_is_back(stack, engine, api):
    port = free_port()
    project, key, secret = project_with_hook(engine, "down", f"http://127.0.0.1:{port}/hook")
    oa = openai.OpenAI(base_url=api + "/v1", api_key=key, max_retries=0)
    f = oa.files.create(file=("a.jsonl", EMBED % (b"a", b"down")), purpose="batch")
    b = oa.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    wait_for(lambda: len(attempts(engine, b.id)) >= 2, timeout=300, every=1, what="two failed attempts")
    failed = attempts(engine, b.id)
    assert all(code is None and error for _, code, error in failed), failed
    receiver = Receiver(port)   # back
    try:
        wait_for(lambda: receiver.got, timeout=120, every=0.5, what="the event, once the receiver is back")
        time.sleep(5)
        [event] = verified(receiver.got, secret)
        assert event.type == "batch.completed" and event.data.id == b.id
        tried = attempts(engine, b.id)
        print(f"\nattempts: {tried}")
        assert tried[-1][1] == 200 and all(code is None for _, code, _ in tried[:-1]) and len(tried) >= 3
    finally:
        receiver.close()


def test_a_receiver_answering_500_gets_the_event_again(stack, engine, api):
    receiver = Receiver()
    receiver.answers = [500, 503]
    try:
        project, key, secret = project_with_hook(engine, "flaky", receiver.url)
        an = anthropic.Anthropic(base_url=api, api_key=key, max_retries=0)
        b = an.messages.batches.create(requests=[{"custom_id": "m1", "params": {
            "model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "flaky"}]}}])
        wait_for(lambda: receiver.got, timeout=300, every=0.5, what="the event after two 5xx")
        [event] = verified(receiver.got, secret)
        assert event.data.id == b.id and event.type == "batch.completed"
        assert [(n, code) for n, code, _ in attempts(engine, b.id)] == [(1, 500), (2, 503), (3, 200)]
    finally:
        receiver.close()


def test_without_a_webhook_no_event_and_the_cli_sets_one(stack, engine, api):
    project = f"nohook{time.time_ns() % 10**9}"
    with engine.begin() as conn:
        key = api_keys.create_key(conn, project, "test")[1]
    oa = openai.OpenAI(base_url=api + "/v1", api_key=key, max_retries=0)
    f = oa.files.create(file=("a.jsonl", EMBED % (b"a", b"nohook")), purpose="batch")
    b = oa.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    wait_for(lambda: oa.batches.retrieve(b.id).status == "completed", timeout=300, every=1, what="completed")
    with engine.connect() as conn:
        assert not conn.execute(sa.text("SELECT count(*) FROM api_webhook_events WHERE batch_id = :b"),
                                {"b": b.id}).scalar()
    out = llmbatch("webhooks", "set", "--project", project, "--url", "https://example.test/hook")
    assert out.returncode == 0 and out.stdout.strip().startswith("whsec_")
    shown = llmbatch("webhooks", "show", "--project", project)
    assert json.loads(shown.stdout)["url"] == "https://example.test/hook" and "whsec_" not in shown.stdout
    assert llmbatch("webhooks", "set", "--project", project, "--url", "ftp://x").returncode == 2
    assert llmbatch("webhooks", "remove", "--project", project).returncode == 0
