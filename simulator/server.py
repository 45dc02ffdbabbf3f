"""The simulator's HTTP server (aiohttp.web): OpenAI and Anthropic, as the SDKs expect.

Endpoints:

- ``POST /v1/chat/completions`` (OpenAI) and ``POST /v1/messages`` (Anthropic)
- OpenAI Files + Batches and Anthropic Message Batches (see ``batches.py``)
- ``GET /_stats`` (``?key_prefix=`` counts the calls of one job's keys), ``POST /_reset``, ``GET /healthz``
- ``GET /_config``; ``POST /_config`` with SimulatorConfig fields (JSON) changes
  latency, ``hold_s``, ``worst_case``, injected errors or limits of the running simulator (tests turn faults
  on and off without restarting it); ``DELETE /_config`` restores the startup config

Order of events for one synchronous request:

1. parse and validate (400 in the provider's error shape; an OpenAI model with
   no tiktoken encoding is a 404 ``model_not_found``, as OpenAI answers);
2. count it in ``/_stats`` (arrival, in flight, 60 s windows, duplicates);
3. draw an injected error (seeded RNG, one draw per request in arrival order);
   an injected 429 is answered at once and does not use the rate limit;
4. the rate limiter admits the request (or 429 with the provider's headers);
5. wait the drawn latency; answer, or fail as drawn (500, 529, timeout, hangup).

Billing follows a provider's: a generation is billed when it finishes, whether the
client is still there or not (it timed out and closed the connection; the line was
dropped after the generation). ``/_stats`` reports what was billed, per key.

Every response carries ``x-llmbatch-simulator: 1``; answers also carry the
rate-limit headers of the provider when limits are configured.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
import secrets
import time

from aiohttp import web

from pipeline.constants import SIMULATOR_LABEL
from simulator import billing, protocol
from simulator.answers import PromptCache, anthropic_answer, openai_answer, usage
from pipeline.errors import LLMBatchError
from simulator.config import ERROR_KINDS, SimulatorConfig, config_from_options
from simulator.limits import RateLimiter, retry_headers
from simulator.protocol import Problem
from simulator.stats import Stats

SIMULATOR_HEADER = "x-llmbatch-simulator"
TIER_HEADER = "X-LLMBatch-Tier"
IDEMPOTENCY_HEADER = "Idempotency-Key"
NO_MODEL = "(none)"
ANSWER_CACHE_SIZE = 50_000

SIMULATOR_KEY = web.AppKey("simulator", object)


def _json_response(body, status: int = 200, headers: dict | None = None) -> web.Response:
    h = {"Content-Type": "application/json"}
    if headers:
        h.update(headers)
    return web.Response(body=json.dumps(body).encode(), status=status, headers=h)


class _OpenAI:
    name = "openai"
    request_id_header = "x-request-id"
    validate = staticmethod(protocol.validate_openai_chat)
    answer = staticmethod(openai_answer)

    @staticmethod
    def problem(p: Problem, rid: str) -> dict:
        return protocol.openai_error(p)

    @staticmethod
    def error(status: int, rid: str) -> dict:
        if status == 429:
            return protocol.openai_error_body(
                "Rate limit reached (simulated). Please try again later.", "requests", "rate_limit_exceeded")
        if status == 503:
            return protocol.openai_error_body(
                "The engine is currently overloaded, please try again later. (simulated)", "server_error")
        if status == 504:
            return protocol.openai_error_body("Request timed out. (simulated)", "timeout")
        return protocol.openai_error_body(
            "The server had an error while processing your request. Sorry about that! (simulated)",
            "server_error")

    @staticmethod
    def limit_error(lim, model: str) -> dict:
        what = lim.reason
        limit = lim.rpm if what == "requests" else lim.tpm
        return protocol.openai_error_body(
            f"Rate limit reached for {model} on {what} per min (RPM/TPM): Limit {limit}. "
            f"Please try again in {lim.retry_after_s:.3f}s. (simulated)", what, "rate_limit_exceeded")

    @staticmethod
    def limit_headers(lim) -> dict:
        return lim.openai_headers()

    @staticmethod
    def ok(answer, model: str, sim: "Simulator") -> dict:
        return protocol.chat_completion(answer, sim.bill(answer), model, sim.new_id("chatcmpl-"))

    overloaded_status = 503


class _Anthropic:
    name = "anthropic"
    request_id_header = "request-id"
    validate = staticmethod(protocol.validate_anthropic_message)
    answer = staticmethod(anthropic_answer)

    @staticmethod
    def problem(p: Problem, rid: str) -> dict:
        kind = "not_found_error" if p.status == 404 else p.kind
        return protocol.anthropic_error_body(kind, p.message, rid)

    @staticmethod
    def error(status: int, rid: str) -> dict:
        kind, message = {
            429: ("rate_limit_error", "Number of requests has exceeded your rate limit (simulated)."),
            529: ("overloaded_error", "Overloaded (simulated)"),
            504: ("timeout_error", "Request timed out (simulated)"),
        }.get(status, ("api_error", "Internal server error (simulated)"))
        return protocol.anthropic_error_body(kind, message, rid)

    @staticmethod
    def limit_error(lim, model: str) -> dict:
        what = "requests" if lim.reason == "requests" else "tokens"
        return protocol.anthropic_error_body(
            "rate_limit_error",
            f"This request would exceed the rate limit for your organization of "
            f"{lim.rpm if what == 'requests' else lim.tpm} {what} per minute for {model} (simulated).")

    @staticmethod
    def limit_headers(lim) -> dict:
        return lim.anthropic_headers()

    @staticmethod
    def ok(answer, model: str, sim: "Simulator") -> dict:
        return protocol.anthropic_message(answer, sim.bill(answer), model, sim.new_id("msg_"))

    overloaded_status = 529


OPENAI = _OpenAI()
ANTHROPIC = _Anthropic()


class Simulator:
    """State of one simulator: config, stats, limits, RNGs, answers cache, batches."""

    def __init__(self, config: SimulatorConfig):
        self.config = config.validate()
        self.startup_config = self.config
        self.stats = Stats()
        self.limiter = RateLimiter(config.limit_for)
        self._answers: dict = {}
        self.prompt_cache = PromptCache()
        self._run = secrets.token_hex(4)
        self._ids = itertools.count(1)
        self._unattended: set[asyncio.Task] = set()   # generations whose client went away
        self._reseed()
        from simulator.batches import BatchStore

        self.batches = BatchStore(self)

    # ---- randomness ------------------------------------------------------

    def _reseed(self) -> None:
        seed = self.config.seed
        self._error_rng = random.Random(f"{seed}:errors")
        self._latency_rng = random.Random(f"{seed}:latency")
        self._thresholds = []
        acc = 0.0
        for kind in ERROR_KINDS:
            rate = self.config.error_rates.get(kind, 0.0)
            if rate > 0:
                acc += rate
                self._thresholds.append((acc, kind))

    def draw_error(self) -> str | None:
        if not self._thresholds:
            return None
        r = self._error_rng.random()
        for acc, kind in self._thresholds:
            if r < acc:
                return kind
        return None

    def draw_latency(self) -> float:
        c = self.config
        if c.latency == "fixed" or c.jitter_ms == 0:
            ms = c.latency_ms
        elif c.latency == "uniform":
            ms = self._latency_rng.uniform(c.latency_ms - c.jitter_ms, c.latency_ms + c.jitter_ms)
        else:
            ms = self._latency_rng.gauss(c.latency_ms, c.jitter_ms)
        return ms / 1000.0 if ms > 0 else 0.0

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{self._run}{next(self._ids):012x}"

    def bill(self, answer) -> dict:
        """The usage this call bills (prompt caching has state; worst case bills every limit)."""
        return usage(answer, worst_case=self.config.worst_case, cache=self.prompt_cache)

    def reset(self) -> None:
        self.prompt_cache.clear()
        self.stats.reset()
        self.limiter.reset()
        self._reseed()

    # ---- answers ---------------------------------------------------------

    def answer(self, dialect, raw: bytes, body: dict):
        key = (dialect.name, raw)
        cached = self._answers.get(key)
        if cached is None:
            cached = dialect.answer(body)
            if len(self._answers) >= ANSWER_CACHE_SIZE:
                self._answers.clear()
            self._answers[key] = cached
        return cached

    def evaluate(self, dialect, body: dict, raw: bytes | None = None):
        """Validate and answer one request body; raises Problem. Used by batches too."""
        dialect.validate(body)
        if raw is None:
            raw = json.dumps(body, sort_keys=True).encode()
        try:
            return self.answer(dialect, raw, body)
        except LookupError:
            raise Problem(f"The model `{body['model']}` does not exist or you do not have access to it.",
                          "model", "model_not_found", status=404) from None

    # ---- the synchronous endpoints -----------------------------------------

    async def handle(self, request: web.Request, dialect) -> web.StreamResponse:
        raw = await request.read()
        rid = self.new_id("req_")
        rid_header = {dialect.request_id_header: rid}
        problem = None
        answer = None
        model = NO_MODEL
        try:
            body = protocol.parse_json(raw)
            if isinstance(body.get("model"), str) and body["model"]:
                model = body["model"]
            answer = self.evaluate(dialect, body, raw)
        except Problem as p:
            problem = p
        headers_in = request.headers
        counters = self.stats.counters(model, headers_in.get(TIER_HEADER))
        self.stats.start(counters, time.monotonic(), answer.cost if answer else 0,
                         headers_in.get(IDEMPOTENCY_HEADER))
        status: int | str = "client_closed"
        usage = 0
        try:
            if problem is not None:
                status = problem.status
                return _json_response(dialect.problem(problem, rid), status, rid_header)
            kind = self.draw_error()
            if kind == "429":
                status = 429
                h = {**rid_header, **retry_headers(self.config.injected_retry_after_s)}
                return _json_response(dialect.error(429, rid), 429, h)
            lim = self.limiter.check(model, answer.cost)
            headers = rid_header
            if lim is not None:
                headers = {**rid_header, **dialect.limit_headers(lim)}
                if not lim.ok:
                    status = 429
                    return _json_response(dialect.limit_error(lim, model), 429, headers)
            delay = self.draw_latency() + self.config.hold_s
            generates = kind in (None, "hangup")   # 500, 529 and 504 answer without a generation
            key = headers_in.get(IDEMPOTENCY_HEADER)
            if delay:
                done_at = time.monotonic() + delay
                try:
                    await asyncio.sleep(delay)
                except asyncio.CancelledError:
                    if generates:   # the client went away: the generation runs on, and is billed
                        self._bill_later(answer, key, done_at - time.monotonic())
                    raise
            if kind is not None:
                if kind == "500":
                    status = 500
                    return _json_response(dialect.error(500, rid), 500, headers)
                if kind == "529":
                    status = dialect.overloaded_status
                    return _json_response(dialect.error(529, rid), status, headers)
                if kind == "timeout":
                    status = "timeout"  # stays so if the client gives up first
                    await asyncio.sleep(self.config.timeout_sleep_s)
                    status = 504
                    return _json_response(dialect.error(504, rid), 504, headers)
                if kind == "hangup":
                    status = "hangup"
                    self.stats.bill(key, self.bill(answer))   # generated, then the line dropped
                    return self._hang_up(request)
            status = 200
            reply = dialect.ok(answer, model, self)
            billed = reply["usage"]
            self.stats.bill(key, billed)
            usage = (billed.get("total_tokens") or billed.get("input_tokens", 0) + billed.get("output_tokens", 0)
                     + billed.get("cache_creation_input_tokens", 0) + billed.get("cache_read_input_tokens", 0))
            return _json_response(reply, 200, headers)
        finally:
            self.stats.finish(counters, status, usage)

    def _bill_later(self, answer, key: str | None, remaining_s: float) -> None:
        """A generation whose client has gone: it finishes anyway, and is billed when it does."""
        async def finish():
            if remaining_s > 0:
                await asyncio.sleep(remaining_s)
            self.stats.bill(key, self.bill(answer))
        task = asyncio.get_running_loop().create_task(finish())
        self._unattended.add(task)
        task.add_done_callback(self._unattended.discard)

    @staticmethod
    def _hang_up(request: web.Request) -> web.StreamResponse:
        """Close the connection without an answer (the client sees a dropped connection)."""
        transport = request.transport
        if transport is not None:
            transport.abort()
        raise asyncio.CancelledError  # aiohttp drops a cancelled handler without writing

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.handle(request, OPENAI)

    async def count_tokens(self, request: web.Request) -> web.Response:
        """Anthropic's count_tokens: the same count the simulator bills for the prompt."""
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) \
                or not isinstance(body.get("messages"), list):
            return _json_response({"type": "error", "error": {"type": "invalid_request_error",
                                   "message": "model and messages are required"}}, status=400)
        return _json_response({"input_tokens": billing.anthropic_prompt(body)})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self.handle(request, ANTHROPIC)

    # ---- control endpoints -------------------------------------------------

    async def get_stats(self, request: web.Request) -> web.Response:
        return _json_response(self.stats.as_dict(request.query.get("key_prefix")))

    async def get_metrics(self, request: web.Request) -> web.Response:
        """Prometheus text of the ``/_stats`` counters per model (Prometheus scrapes it)."""
        def esc(v: str) -> str:
            return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        lines = ["# HELP llmbatch_simulator_requests_total Requests the simulator received, by model",
                 "# TYPE llmbatch_simulator_requests_total counter",
                 *(f'llmbatch_simulator_requests_total{{model="{esc(m)}"}} {c.requests}'
                   for m, c in sorted(self.stats.by_model.items())),
                 "# HELP llmbatch_simulator_errors_total Error answers the simulator gave, by model and kind",
                 "# TYPE llmbatch_simulator_errors_total counter",
                 *(f'llmbatch_simulator_errors_total{{model="{esc(m)}",kind="{esc(k)}"}} {n}'
                   for m, c in sorted(self.stats.by_model.items()) for k, n in sorted(c.errors.items())),
                 "# HELP llmbatch_simulator_in_flight Requests being answered now", "# TYPE llmbatch_simulator_in_flight gauge",
                 f"llmbatch_simulator_in_flight {self.stats.total.in_flight}"]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json_response({"reset": True})

    def configure(self, config: SimulatorConfig) -> None:
        self.config = config.validate()
        self.limiter = RateLimiter(self.config.limit_for)
        self._reseed()

    async def get_config(self, request: web.Request) -> web.Response:
        return _json_response(dataclasses.asdict(self.config))

    async def post_config(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
            self.configure(config_from_options(None, **{**dataclasses.asdict(self.config), **changes}))
        except (ValueError, TypeError, LLMBatchError) as e:
            return _json_response({"error": str(e)}, status=400)
        return _json_response(dataclasses.asdict(self.config))

    async def delete_config(self, request: web.Request) -> web.Response:
        self.configure(self.startup_config)
        return _json_response(dataclasses.asdict(self.config))

    async def healthz(self, request: web.Request) -> web.Response:
        return _json_response({"ok": True, "simulator": True})


async def _mark(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[SIMULATOR_HEADER] = "1"


def build_app(config: SimulatorConfig | None = None) -> web.Application:
    """The simulator as an aiohttp application (``app[SIMULATOR_KEY]`` is its state)."""
    sim = Simulator(config or SimulatorConfig())
    app = web.Application(client_max_size=256 * 1024 * 1024)
    app[SIMULATOR_KEY] = sim
    app.on_response_prepare.append(_mark)
    app.router.add_post("/v1/chat/completions", sim.chat_completions)
    app.router.add_post("/v1/messages", sim.messages)
    app.router.add_post("/v1/messages/count_tokens", sim.count_tokens)
    sim.batches.add_routes(app)
    app.router.add_get("/_stats", sim.get_stats)
    app.router.add_get("/metrics", sim.get_metrics)
    app.router.add_post("/_reset", sim.post_reset)
    app.router.add_get("/_config", sim.get_config)
    app.router.add_post("/_config", sim.post_config)
    app.router.add_delete("/_config", sim.delete_config)
    app.router.add_get("/healthz", sim.healthz)
    app.on_shutdown.append(sim.batches.shutdown)
    return app


def warm_up() -> None:
    """Load the tokenizers now, so the first request is not slow."""
    for name in ("o200k_base", "cl100k_base"):
        billing.encoding(name)


def banner(config: SimulatorConfig) -> str:
    limits = "unlimited" if config.rpm is None and config.tpm is None and not config.model_limits else (
        f"rpm={config.rpm or 'unlimited'} tpm={config.tpm or 'unlimited'}"
        + "".join(f" {m}={l.rpm}:{l.tpm}" for m, l in config.model_limits.items()))
    errors = ",".join(f"{k}={v}" for k, v in config.error_rates.items()) or "none"
    return (f"llmbatch SIMULATOR — {SIMULATOR_LABEL} — listening on http://{config.host}:{config.port} "
            f"(latency {config.latency} {config.latency_ms}±{config.jitter_ms} ms, errors {errors}, "
            f"limits {limits}, seed {config.seed}"
            + (", WORST CASE: every call billed to its limits" if config.worst_case else "")
            + (f", each call held {config.hold_s} s" if config.hold_s else "") + ")")


def run(config: SimulatorConfig) -> None:
    """Serve forever (until interrupted)."""
    warm_up()
    app = build_app(config)
    print(banner(config), flush=True)
    web.run_app(app, host=config.host, port=config.port, print=None, access_log=None,
                handler_cancellation=True, shutdown_timeout=1.0, backlog=4096)


async def start(config: SimulatorConfig) -> tuple[web.AppRunner, str]:
    """Start in the running loop (tests, benchmarks); returns the runner and base URL.

    ``port=0`` picks a free port. Stop with ``await runner.cleanup()``.
    """
    app = build_app(config)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=4096)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://{config.host}:{port}"
