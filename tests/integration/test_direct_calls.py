"""An OpenAI-kind call without the SDK in its path (pipeline/providers/direct.py) answers and fails
as the same call through the SDK: side by side on the stack's simulator, every case the pipeline
reads (answer, request id, headers; 429 with retry-after, 500, 400, 404, a hang-up, a timeout, a
refused connection).

One difference, on purpose: the SDK's aiohttp backend words every failed connection as a timeout
(its transport maps aiohttp's ``ClientConnectionError`` to ``httpx.ConnectTimeout``); the direct
call says "connection error" for those. Both are retryable with no status: the call may have been
billed, which is all the pipeline reads from them (workers/limited.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import pytest

from pipeline.errors import PermanentProviderError, ProviderError, RetryableProviderError
from pipeline.providers.base import ProviderClient
from pipeline.providers.direct import DirectClient
from pipeline.providers.registry import build_registry
from tests.integration.execution_helpers import simulator_config

BODY = {"model": "gpt-4o-mini", "max_tokens": 8, "messages": [{"role": "user", "content": "Say hi."}]}


def both(settings, spec=None, **changes):
    """The same provider through the SDK (``aiohttp``) and directly."""
    spec = spec or build_registry(settings).get("openai")
    out = {}
    for how in ("aiohttp", "direct"):
        out[how] = ProviderClient(spec, dataclasses.replace(settings, provider_http_client=how, **changes))
    return out


def outcome(client: ProviderClient, body: dict = BODY):
    async def go():
        try:
            return await client.call(body, headers={})
        except ProviderError as e:
            return e
        finally:
            c = client.client()
            await c.close()
    return asyncio.run(go())


def failure(e) -> tuple:
    assert isinstance(e, ProviderError), e
    return type(e), str(e), e.status_code, e.request_id is not None, getattr(e, "retry_after", None)


def test_the_direct_client_is_what_the_openai_kind_uses_by_default(stack):
    assert stack.provider_http_client == "direct"
    clients = both(stack)
    assert isinstance(clients["direct"].client(), DirectClient)
    assert not isinstance(clients["aiohttp"].client(), DirectClient)


def test_an_answer_is_the_same_through_either(stack):
    a, d = (outcome(c) for c in both(stack).values())
    assert (a.status_code, d.status_code) == (200, 200)
    assert a.body.keys() == d.body.keys() and a.body["usage"] == d.body["usage"]
    assert a.request_id and d.request_id and a.request_id != d.request_id
    assert set(a.headers) == set(d.headers) and all(k == k.lower() for k in d.headers)


@pytest.mark.parametrize("injected", ["429", "500"])
def test_an_injected_error_is_the_same_error_through_either(stack, injected):
    with simulator_config(stack, error_rate=f"{injected}=1", injected_retry_after_s=0.25):
        a, d = (outcome(c) for c in both(stack).values())
    assert isinstance(a, RetryableProviderError) and failure(a) == failure(d) and a.status_code == int(injected)
    if injected == "429":
        assert d.retry_after == 0.25


def lost(e) -> tuple:
    """What the pipeline reads of a call that got no answer: retryable, no status."""
    assert isinstance(e, RetryableProviderError), e
    assert str(e).startswith(("timeout:", "connection error:")), e
    return type(e), e.status_code


def test_a_hang_up_a_timeout_and_a_closed_port_are_calls_without_an_answer_through_either(stack):
    with simulator_config(stack, error_rate="hangup=1"):
        a, d = (outcome(c) for c in both(stack).values())
    assert lost(a) == lost(d) == (RetryableProviderError, None)
    assert str(d) == "connection error: Server disconnected"
    with simulator_config(stack, latency_ms=3000):
        a, d = (outcome(c) for c in both(stack, provider_timeout_s=0.5).values())
    assert failure(a) == failure(d) and str(d).startswith("timeout:")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = dataclasses.replace(build_registry(stack).get("openai"), base_url=f"http://127.0.0.1:{port}/v1")
    a, d = (outcome(c) for c in both(stack, spec).values())
    assert lost(a) == lost(d) and str(d).startswith("connection error:")


def test_a_refused_request_and_an_unknown_model_are_the_same_permanent_errors(stack):
    bad_body = {"model": "gpt-4o-mini", "max_tokens": 8}   # no messages: the API's 400
    unknown = {**BODY, "model": "gpt-nonexistent"}
    for body, status in ((bad_body, 400), (unknown, 404)):
        a, d = (outcome(c, body) for c in both(stack).values())
        assert isinstance(a, PermanentProviderError) and failure(a) == failure(d) and a.status_code == status, (a, d)
        assert str(d).startswith(f"Error code: {status} - ")
