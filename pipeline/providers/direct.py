"""A provider call without the SDK in its path: aiohttp (the SDKs' own HTTP backend here) posts
the body as written (``provider_http_client = "direct"``, the default, for the ``openai`` kind).

Why: under bench/e2e.py's load the SDK's request path was the worker's largest cost. Its options
model, its httpx2 request and URL building and its adapter onto aiohttp cost about 1,000 µs of
CPU a call, against about 270 µs for the same POST through aiohttp alone, on the same simulator
(bench/README.md "Profiles"). Nothing of what the pipeline keeps changes: what the SDK did for
this call is done here the same way, and tests/integration/test_direct_calls.py holds the two
side by side:

- ``Authorization: Bearer KEY``, the body as JSON, redirects followed (the SDK's aiohttp client
  has ``follow_redirects=True``), up to 1,000 connections kept 5 s;
- the client timeout per operation (connect, each read), as the SDK's;
- an HTTP error becomes the SDK's message, ``Error code: N`` and `` - MESSAGE`` when the body is
  JSON with an error message, classified by pipeline/providers/retries.py ``classify_status``,
  with the ``retry-after`` headers; a timeout and a connection error word theirs as
  pipeline/providers/base.py ``post_raw`` does;
- the answer: the JSON body, status, the request id header, header names in lower case.

Azure OpenAI (its deployments, ``api-key`` and ``api-version``) and Anthropic keep their SDK.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from pipeline.errors import RetryableProviderError
from pipeline.providers.base import Answer
from pipeline.providers.retries import classify_status


class DirectClient:
    """One key of one provider: a session made on first use, inside the running event loop."""

    def __init__(self, base_url: str, api_key: str, timeout_s: float):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json",
                         "Accept": "application/json", "User-Agent": "llmbatch"}
        self._session: aiohttp.ClientSession | None = None

    def _timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, connect=seconds, sock_connect=seconds, sock_read=seconds)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # the SDK's limits (openai DEFAULT_CONNECTION_LIMITS): 1,000 connections, idle ones kept 5 s
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1000, limit_per_host=0, keepalive_timeout=5.0),
                headers=self._headers, timeout=self._timeout(self.timeout_s))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(self, path: str, body: dict, headers: dict, request_id_header: str,
                   timeout: float | None = None) -> Answer:
        started = time.monotonic()
        kw = {"timeout": self._timeout(timeout)} if timeout is not None else {}
        try:
            async with self.session().post(self.base_url + path, data=json.dumps(body).encode(),
                                           headers=headers or None, **kw) as resp:
                raw = await resp.read()
                status, got = resp.status, resp.headers
        except asyncio.TimeoutError as e:   # aiohttp's own timeouts are TimeoutErrors too
            raise RetryableProviderError("timeout: the provider did not answer in time") from e
        except aiohttp.ClientError as e:
            raise RetryableProviderError(f"connection error: {e}") from e
        request_id = got.get(request_id_header)
        if not 200 <= status < 300:   # the SDK raises on any other status
            raise classify_status(status, _message(status, raw), request_id, got)
        return Answer(body=json.loads(raw), status_code=status, request_id=request_id,
                      latency_ms=int((time.monotonic() - started) * 1000),
                      headers={k.lower(): v for k, v in got.items()})


def _message(status: int, raw: bytes) -> str:
    """What the SDK's status error says (openai ``_make_status_error_from_response``)."""
    out = f"Error code: {status}"
    try:
        body = json.loads(raw.decode(errors="replace").strip())
    except ValueError:
        return out
    error = body.get("error", body) if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return f"{out} - {message}" if isinstance(message, str) and message else out
