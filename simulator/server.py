"""The simulator's HTTP server (aiohttp.web): OpenAI, Anthropic and named providers, as the SDKs expect.

Endpoints (``routes.py`` has the table):

- OpenAI ``POST /v1/chat/completions``, ``/v1/responses``, ``/v1/embeddings``,
  ``/v1/completions``, ``/v1/moderations`` (``endpoints.py``), Anthropic
  ``POST /v1/messages``; every named provider under ``/p/<name>/…``
  (``providers.py``), Azure deployments included;
- OpenAI Files + Batches and Anthropic Message Batches (see ``batches.py``),
  per provider;
- control (``control.py``): ``GET /_stats`` (``?key_prefix=`` counts the calls
  of one job's keys; ``providers`` per provider and key), ``POST /_reset``,
  ``GET /healthz``, ``GET|POST|DELETE /_config``, ``POST /_admin/keys/revoke``
  and ``/_admin/keys/restore``.

Order of events for one synchronous request:

1. route: the provider (404 if unknown), an Azure deployment (404
   ``DeploymentNotFound``) and ``api-version`` (404);
2. authenticate the key (401 in the provider's shape: unknown when the
   provider lists keys, revoked at run time or after ``revoke_after`` calls);
3. parse and validate (400 in the provider's error shape; a model the
   provider does not serve is a 404 ``model_not_found``, as OpenAI answers);
   ``service_tier: "flex"`` on a model that does not take it is a 400;
4. count it in ``/_stats`` (arrival, in flight, 60 s windows, duplicates,
   per provider and key);
5. a flex call draws "resource unavailable" (``flex_unavailable_rate``: 429,
   not billed); then an injected error (seeded RNG, one draw per request in
   arrival order); an injected 429 is answered at once and does not use the
   rate limit;
6. the rate limiter of (provider, key, model) admits the request (or 429 with
   the provider's headers);
7. wait the drawn latency; answer, or fail as drawn (500, 529, timeout, hangup).

Billing follows a provider's: a generation is billed when it finishes, whether the
client is still there or not (it timed out and closed the connection; the line was
dropped after the generation). ``/_stats`` reports what was billed, per
idempotency key, and in USD per provider and API key (``prices.py``).

Every response carries ``x-llmbatch-simulator: 1``; answers also carry the
rate-limit headers of the provider when limits are configured.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import secrets
import time
from datetime import datetime, timezone
from decimal import Decimal

from aiohttp import web

from pipeline.constants import SIMULATOR_LABEL
from simulator import billing
from simulator.accounts import Accounts, Provider, build_providers
from simulator.caching import PromptCache
from simulator.config import ERROR_KINDS, SimulatorConfig
from simulator.dialects import DIALECTS
from simulator.endpoints import MESSAGES, Endpoint, model_of, tokens_of
from simulator.limits import RateLimiter, retry_headers
from simulator.prices import time_multiplier, usd
from simulator.protocol import Problem, parse_json
from simulator.stats import Stats

SIMULATOR_HEADER = "x-llmbatch-simulator"
TIER_HEADER = "X-LLMBatch-Tier"
IDEMPOTENCY_HEADER = "Idempotency-Key"
NO_MODEL = "(none)"
ANSWER_CACHE_SIZE = 50_000
#: Azure's operation names, as its 429 messages give them
OPERATIONS = {"/v1/chat/completions": "ChatCompletions_Create", "/v1/completions": "Completions_Create",
              "/v1/embeddings": "Embeddings_Create", "/v1/responses": "Responses_Create"}

SIMULATOR_KEY = web.AppKey("simulator", object)
#: the alias of the key that made a request (batch stores bill batches to it)
ALIAS_KEY = web.RequestKey("alias", str)


def json_response(body, status: int = 200, headers: dict | None = None) -> web.Response:
    h = {"Content-Type": "application/json"}
    if headers:
        h.update(headers)
    return web.Response(body=json.dumps(body).encode(), status=status, headers=h)


class Call:
    """Where one request is going: provider, endpoint, dialect, key alias."""

    __slots__ = ("provider", "endpoint", "dialect", "alias", "key_spec", "deployment")

    def __init__(self, provider: Provider, endpoint: Endpoint | None, deployment: str | None = None):
        self.provider = provider
        self.endpoint = endpoint
        self.dialect = DIALECTS[provider.kind]
        self.deployment = deployment
        self.alias = "no-key"
        self.key_spec = None


class Simulator:
    """State of one simulator: config, providers and keys, stats, limits, RNGs, answers cache, batches."""

    def __init__(self, config: SimulatorConfig):
        from simulator.batches import BatchStore

        self.config = config.validate()
        self.startup_config = self.config
        self.stats = Stats()
        self.providers = build_providers(self.config)
        self.accounts = Accounts(self.providers)
        self.limiter = RateLimiter(self._limit_of)
        self._answers: dict = {}
        self.prompt_cache = PromptCache()
        self._run = secrets.token_hex(4)
        self._ids = itertools.count(1)
        self._unattended: set[asyncio.Task] = set()   # generations whose client went away
        self._reseed()
        self._store_cls = BatchStore
        self.stores: dict[str, BatchStore] = {}

    def store(self, provider: Provider):
        """The Files / Batches of one provider (each provider is its own account)."""
        s = self.stores.get(provider.name)
        if s is None:
            s = self.stores[provider.name] = self._store_cls(self, provider)
        return s

    @property
    def batches(self):
        """The built-in OpenAI provider's batch store (the one the default routes serve)."""
        return self.store(self.providers["openai"])

    def _limit_of(self, ident):
        provider, alias, model = ident
        p = self.providers.get(provider)
        return p.limit(p.key_by_alias(alias) if p else None, model) if p else self.config.limit_for(model)

    # ---- randomness ------------------------------------------------------

    def _reseed(self) -> None:
        seed = self.config.seed
        self._error_rng = random.Random(f"{seed}:errors")
        self._latency_rng = random.Random(f"{seed}:latency")
        self._flex_rng = random.Random(f"{seed}:flex")
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

    def reset(self) -> None:
        self.prompt_cache.clear()
        self.stats.reset()
        self.accounts.reset()
        self.limiter.reset()
        self._reseed()

    def configure(self, config: SimulatorConfig) -> None:
        self.config = config.validate()
        self.providers = build_providers(self.config)
        self.accounts.configure(self.providers)
        self.limiter = RateLimiter(self._limit_of)
        self._answers.clear()
        for store in self.stores.values():
            store.provider = self.providers.get(store.provider.name, store.provider)
        self._reseed()

    @property
    def unattended(self) -> int:
        """Generations still running whose client went away: billed when they finish."""
        return len(self._unattended)

    # ---- answers and bills ---------------------------------------------------

    def now(self) -> datetime:
        """The simulator's clock: real time plus ``clock_offset_s`` (tests move it)."""
        return datetime.fromtimestamp(time.time() + self.config.clock_offset_s, tz=timezone.utc)

    def evaluate(self, call: Call, body: dict, raw: bytes | None = None):
        """Validate and answer one request body at ``call``'s provider; raises Problem. Batches use it too."""
        endpoint, provider = call.endpoint, call.provider
        endpoint.validate(body)
        name = model_of(endpoint, body) or ""
        if raw is None:
            raw = json.dumps(body, sort_keys=True).encode()
        key = (provider.name, endpoint.path, raw)
        cached = self._answers.get(key)
        if cached is None:
            try:
                cached = endpoint.answer(body, provider.model(name), provider)
            except LookupError:
                raise Problem(f"The model `{name}` does not exist or you do not have access to it.",
                              "model", "model_not_found", status=404) from None
            if len(self._answers) >= ANSWER_CACHE_SIZE:
                self._answers.clear()
            self._answers[key] = cached
        return cached

    def charge(self, call: Call, answer, model: str, tier: str, idempotency_key: str | None,
               batch: bool = False, started: float | None = None, batch_line: str | None = None) -> dict:
        """Bill one generation: its usage (worst case if configured), per idempotency key, and in USD
        per provider and key. Returns the usage the answer reports. ``started``: when the generation
        began (monotonic): it reads only prompt-cache entries written before then. ``batch_line``: a
        Batch API line's custom_id, its bill kept by it (a batch line carries no idempotency key)."""
        billed = call.endpoint.bill(answer, self.config.worst_case, self.prompt_cache.as_of(started))
        info = call.provider.model(model)
        price = info.price if info is not None else None
        # time-of-day prices by the simulator's own clock when the call arrived (batches: none)
        share = Decimal(1) if batch else time_multiplier(model, self.now())
        dollars = usd(price, billed, tier, share) if price is not None else None
        if not batch:
            self.stats.bill(idempotency_key, billed, dollars)
        elif batch_line is not None:
            self.stats.batch_line_billed(batch_line, dollars)
        self.accounts.bill(call.provider.name, call.alias, tokens_of(billed), dollars, batch=batch)
        return billed

    # ---- routing and keys ----------------------------------------------------

    def route(self, request: web.Request, provider_name: str | None, family: str | None):
        """``(provider, error response)`` for a request: the provider named in the path (or fixed)."""
        name = provider_name or request.match_info.get("provider", "")
        provider = self.providers.get(name)
        if provider is None or (family is not None and provider.family != family):
            return None, json_response({"error": {"message": f"Unknown provider or route: {request.path} "
                                                  f"(simulator providers: {', '.join(sorted(self.providers))})",
                                                  "type": "invalid_request_error", "param": None,
                                                  "code": "unknown_url"}}, 404)
        return provider, None

    def authenticate(self, call: Call, request: web.Request, rid: str) -> web.Response | None:
        alias, spec, ok = self.accounts.authenticate(call.provider, call.dialect.key(request.headers))
        call.alias, call.key_spec = alias, spec
        if ok:
            return None
        return json_response(call.dialect.unauthorized(alias, rid), 401, {call.dialect.request_id_header: rid})

    # ---- the synchronous endpoints -----------------------------------------

    async def handle(self, request: web.Request, endpoint: Endpoint, provider_name: str | None = None,
                     azure: str | None = None) -> web.StreamResponse:
        """``azure``: ``"deployment"`` (the deployment is in the path) or ``"v1"`` (in ``model``)."""
        provider, err = self.route(request, provider_name, endpoint.family)
        if err is not None:
            return err
        if (azure is None) != (provider.kind != "azure-openai"):
            return json_response(DIALECTS[provider.kind].not_found(f"No such route for a {provider.kind} "
                                                                   f"provider: {request.path}"), 404)
        call = Call(provider, endpoint, request.match_info.get("deployment"))
        dialect = call.dialect
        raw = await request.read()
        rid = self.new_id("req_")
        rid_header = {dialect.request_id_header: rid}
        if azure == "deployment":
            if not request.query.get("api-version"):
                return json_response({"error": {"code": "404", "message": "Resource not found"}}, 404, rid_header)
            if provider.deployment(call.deployment) is None:
                return json_response(dialect.not_found(
                    "The API deployment for this resource does not exist. If you created the deployment within "
                    "the last 5 minutes, please wait a moment and try again."), 404, rid_header)
        denied = self.authenticate(call, request, rid)
        problem = answer = None
        model = NO_MODEL
        flex = False
        try:
            body = parse_json(raw)
            if azure == "deployment":
                body = {**body, "model": provider.deployment(call.deployment)}
            elif azure == "v1" and isinstance(body.get("model"), str):
                if provider.deployment(body["model"]) is None:
                    raise Problem("The API deployment for this resource does not exist.", "model",
                                  "DeploymentNotFound", status=404)
                body = {**body, "model": provider.deployment(body["model"])}
            model = model_of(endpoint, body) or NO_MODEL
            flex = body.get("service_tier") == "flex"
            if denied is None:
                answer = self.evaluate(call, body, raw if azure is None else None)
                if flex and not (endpoint.flex and provider.flex_eligible(model)):
                    raise Problem(f"Invalid value: 'flex'. Flex processing is not available for model "
                                  f"'{model}' on this endpoint.", "service_tier", "invalid_value")
        except Problem as p:
            problem = p
        tier = "flex" if flex else "standard"
        headers_in = request.headers
        idem = headers_in.get(IDEMPOTENCY_HEADER)
        counters = self.stats.counters(model, headers_in.get(TIER_HEADER))
        self.stats.start(counters, time.monotonic(), answer.cost if answer else 0, idem)
        self.accounts.arrive(provider.name, call.alias, flex)
        status: int | str = "client_closed"
        usage = 0
        unavailable = False
        try:
            if denied is not None:
                status = 401
                return denied
            if problem is not None:
                status = problem.status
                body = dialect.problem(problem, rid)
                if problem.code == "DeploymentNotFound":
                    body = dialect.not_found(problem.message)
                return json_response(body, status, rid_header)
            if flex and self.config.flex_unavailable_rate and \
                    self._flex_rng.random() < self.config.flex_unavailable_rate:
                status, unavailable = 429, True
                h = {**rid_header, **retry_headers(self.config.injected_retry_after_s)}
                return json_response(dialect.flex_unavailable(rid), 429, h)
            kind = self.draw_error()
            if kind == "429":
                status = 429
                h = {**rid_header, **retry_headers(self.config.injected_retry_after_s)}
                return json_response(dialect.error(429, rid), 429, h)
            lim = self.limiter.check((provider.name, call.alias, model), answer.cost)
            headers = rid_header
            if lim is not None:
                headers = {**rid_header, **dialect.limit_headers(lim)}
                if not lim.ok:
                    status = 429
                    return json_response(dialect.limit_error(lim, model, OPERATIONS.get(endpoint.path, "")),
                                         429, headers)
            started = time.monotonic()
            delay = self.draw_latency() + self.config.hold_s
            generates = kind in (None, "hangup")   # 500, 529 and 504 answer without a generation
            if delay:
                done_at = time.monotonic() + delay
                try:
                    await asyncio.sleep(delay)
                except asyncio.CancelledError:
                    if generates:   # the client went away: the generation runs on, and is billed
                        self._bill_later(call, answer, model, tier, idem, done_at - time.monotonic(), started)
                    raise
            if kind is not None:
                if kind == "500":
                    status = 500
                    return json_response(dialect.error(500, rid), 500, headers)
                if kind == "529":
                    status = dialect.overloaded_status
                    return json_response(dialect.error(529, rid), status, headers)
                if kind == "timeout":
                    status = "timeout"  # stays so if the client gives up first
                    await asyncio.sleep(self.config.timeout_sleep_s)
                    status = 504
                    return json_response(dialect.error(504, rid), 504, headers)
                if kind == "hangup":
                    status = "hangup"
                    self.charge(call, answer, model, tier, idem, started=started)   # generated, then dropped
                    return self._hang_up(request)
            status = 200
            billed = self.charge(call, answer, model, tier, idem, started=started)
            reply = endpoint.reply(answer, billed, model, self.new_id, tier)
            usage = tokens_of(billed)
            return json_response(reply, 200, headers)
        finally:
            self.stats.finish(counters, status, usage)
            self.accounts.finish(provider.name, call.alias, status, unavailable)

    def _bill_later(self, call: Call, answer, model: str, tier: str, key: str | None, remaining_s: float,
                    started: float | None = None) -> None:
        """A generation whose client has gone: it finishes anyway, and is billed when it does."""
        async def finish():
            if remaining_s > 0:
                await asyncio.sleep(remaining_s)
            self.charge(call, answer, model, tier, key, started=started)
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

    async def count_tokens(self, request: web.Request, provider_name: str | None = None) -> web.Response:
        """Anthropic's count_tokens: the same count the simulator bills for the prompt."""
        provider, err = self.route(request, provider_name, "anthropic")
        if err is not None:
            return err
        call = Call(provider, MESSAGES)
        denied = self.authenticate(call, request, self.new_id("req_"))
        if denied is not None:
            return denied
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) \
                or not isinstance(body.get("messages"), list):
            return json_response({"type": "error", "error": {"type": "invalid_request_error",
                                  "message": "model and messages are required"}}, status=400)
        return json_response({"input_tokens": billing.anthropic_prompt(body)})


async def _mark(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[SIMULATOR_HEADER] = "1"


def build_app(config: SimulatorConfig | None = None) -> web.Application:
    """The simulator as an aiohttp application (``app[SIMULATOR_KEY]`` is its state)."""
    from simulator.routes import add_routes

    sim = Simulator(config or SimulatorConfig())
    app = web.Application(client_max_size=256 * 1024 * 1024)
    app[SIMULATOR_KEY] = sim
    app.on_response_prepare.append(_mark)
    add_routes(app, sim)

    async def shutdown(app):
        for store in list(sim.stores.values()):
            await store.shutdown()
    app.on_shutdown.append(shutdown)
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
    named = ", ".join(f"{n} ({p.kind}, {len(p.keys)} keys)" for n, p in config.providers.items())
    return (f"llmbatch SIMULATOR — {SIMULATOR_LABEL} — listening on http://{config.host}:{config.port} "
            f"(latency {config.latency} {config.latency_ms}±{config.jitter_ms} ms, errors {errors}, "
            f"limits {limits}, seed {config.seed}"
            + (f", providers under /p/<name>: {named}" if named else "")
            + (f", flex unavailable {config.flex_unavailable_rate:.0%}" if config.flex_unavailable_rate else "")
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
