"""The one settings object. The environment is read here and nowhere else.

Every setting has an environment variable ``LLMBATCH_<NAME>`` (upper case).
An optional TOML file (``LLMBATCH_CONFIG``, default ``llmbatch.toml`` in the
working directory) supplies values the environment does not. Below both, the
local stack's generated secrets file (``var_dir/secrets.env``, written 0600
by ``infra/stack.sh``) supplies the passwords of Postgres, Redis and Flower,
so every process, the CLI and the tests reach the password-protected stack
without anyone exporting anything. The default database and Redis URLs carry
those passwords; an explicit ``LLMBATCH_DATABASE_URL`` / ``LLMBATCH_REDIS_URL``
is used as given. Secrets are kept in ``Secret`` so they never show in a
repr, ``str()``, an f-string, ``format()`` or ``%s``; URLs with a password
are masked in the settings' repr.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import json
import os
import re
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


MASK = "**********"

#: the generated secrets of the local stack, under ``var_dir`` (``infra/stack.sh`` writes it)
SECRETS_FILE = "secrets.env"


class Secret(str):
    """A string that hides itself wherever it is turned into text: repr, ``str()``,
    f-strings, ``format()`` and ``%s``. ``reveal()`` is the one way to the value,
    so handing it to a client library is a visible, deliberate step."""

    def __repr__(self) -> str:
        return f"Secret('{MASK}')" if self else "Secret('')"

    def __str__(self) -> str:
        return MASK if self else ""

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def reveal(self) -> str:
        return str.__str__(self)


def mask_url(url: str) -> str:
    """``scheme://user:password@host`` with the password masked (for reprs and messages)."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", rf"\1{MASK}@", str.__str__(url))


def _tier_map(**values):
    return field(default_factory=lambda: dict(values))


@dataclass(frozen=True)
class Settings:
    """Every setting of every process.

    Each field carries its one-line meaning in a ``#:`` comment just above it;
    ``python -m pipeline.config_docs`` turns them into docs/CONFIGURATION.md (pipeline/config_docs.py)
    (tests/unit/test_config_docs.py fails when a field has none, or the file
    is out of date). A plain ``#`` comment after a blank line starts a section.
    """

    # services (ports chosen so a system service on a default port does not collide)
    #: Postgres, the system of record (SQLAlchemy URL, psycopg 3 driver)
    database_url: str = "postgresql+psycopg://llmbatch@127.0.0.1:55432/llmbatch"
    #: how long submit and the CLI wait for Postgres or Kafka to answer before they give up
    #: (a restart takes seconds; a service that is not there is said once, then the command fails)
    outage_patience_s: float = 60.0
    #: a pipeline session idle inside a transaction longer than this is ended by Postgres, so a
    #: stalled process (stopped, hung) lets go of its row locks and a cancel does not wait on it
    #: for ever; far above the longest wait inside a healthy transaction (no provider call, budget
    #: hold or file is made while one is open; a stream of results read by a paused reader
    #: holds no row lock and is exempt)
    db_idle_transaction_s: float = 60.0
    #: Redis: Celery broker, budget counters, rate windows, response cache
    redis_url: str = "redis://127.0.0.1:56379/0"
    #: password of the role llmbatch, put into database_url when that names none (generated into var/secrets.env)
    database_password: Secret = Secret("")
    #: password of the read-only role llmbatch_reader (generated into var/secrets.env)
    reader_password: Secret = Secret("")
    #: Redis ``requirepass``, put into redis_url when that names none (generated into var/secrets.env)
    redis_password: Secret = Secret("")
    #: Kafka bootstrap servers (host:port, comma-separated)
    kafka_bootstrap: str = "127.0.0.1:59092"
    #: Kafka's security protocol: ``SASL_PLAINTEXT`` (the local stack), ``SASL_SSL`` across hosts
    kafka_security_protocol: str = "SASL_PLAINTEXT"
    #: Kafka's SASL mechanism (the broker's listener accepts SCRAM-SHA-512)
    kafka_sasl_mechanism: str = "SCRAM-SHA-512"
    #: the Kafka user this process produces requests as (a service: the one ``llmbatch kafka add-producer`` made)
    kafka_user: str = "llmbatch-submit"
    #: kafka_user's password; empty: derived from kafka_producer_key (the pipeline's own producers)
    kafka_password: Secret = Secret("")
    #: the batcher's Kafka password (user llmbatch-batcher; generated into var/secrets.env)
    kafka_batcher_password: Secret = Secret("")
    #: the Kafka admin's password (user llmbatch-admin: topics, users, ACLs; generated into var/secrets.env)
    kafka_admin_password: Secret = Secret("")
    #: the key producers' passwords derive from; the batcher checks each message's signature with it
    #: (generated into var/secrets.env)
    kafka_producer_key: Secret = Secret("")
    #: where the local stack keeps its state: data, logs, pids, metrics, reports, tokenizer files
    var_dir: Path = ROOT / "var"
    #: shifts every default port, to run a second local stack beside the first
    port_offset: int = 0

    # providers: with no key set, the built-in simulator answers
    #: OpenAI API key (``OPENAI_API_KEY`` works too); set, OpenAI itself answers instead of the simulator
    openai_api_key: Secret = Secret("")
    #: Anthropic API key (``ANTHROPIC_API_KEY`` works too); set, Anthropic itself answers
    anthropic_api_key: Secret = Secret("")
    #: the provider simulator, used for every provider whose key is not set
    simulator_url: str = "http://127.0.0.1:58080"
    #: override OpenAI's endpoint (a proxy, Azure, the simulator); empty: the key decides
    openai_base_url: str = ""
    #: override Anthropic's endpoint; empty: the key decides
    anthropic_base_url: str = ""
    #: named providers and their keys, as data (pipeline/providers/registry.py): a TOML table
    #: ``[providers.NAME]`` or JSON; ``openai`` and ``anthropic`` exist by default
    providers: dict = field(default_factory=dict)
    #: client timeout of one provider call, in seconds
    provider_timeout_s: float = 60.0
    #: client timeout of one flex call (``--mode flex``), in seconds: flex answers slowly, and OpenAI
    #: recommends 15 minutes; a flex hold outlives its last renewal this long plus the reservation margin
    flex_timeout_s: float = 900.0
    #: how provider calls go out: "direct" (OpenAI-kind calls through aiohttp alone, no SDK in the
    #: path: a quarter of the CPU; Azure and Anthropic through their SDK's aiohttp backend),
    #: "aiohttp" (every call through its SDK, on the SDK's aiohttp backend) or "httpx" (the SDKs' default)
    provider_http_client: str = "direct"
    #: provider attempts per request, the first included; then it fails ``attempts_exhausted``
    max_attempts: int = 5
    #: first retry delay (doubling, full jitter) when the provider gave no retry-after
    backoff_base_s: float = 0.5
    #: longest retry delay without retry-after (a provider's retry-after is honoured up to 10 times this)
    backoff_max_s: float = 30.0

    # submit (pipeline/intake/producer.py)
    #: the longest line submit reads, in bytes: a longer one is refused with its line number before it
    #: is parsed, so a submit's memory is bounded by this, not by the file (Kafka's message limit is 16 MiB)
    max_line_bytes: int = 16 * 1024 * 1024

    # batcher
    #: the batcher's Kafka consumer group (the fast lane's group is this + ``.immediate``)
    consumer_group: str = "llmbatch-batcher"
    #: requests per batch, per tier
    batch_max_size: dict = _tier_map(immediate=50, peak=200, offpeak=500, background=500)
    #: seconds a batch waits to fill before it is written, per tier; immediate none: the fast lane takes
    #: every message waiting at once, so a burst still shares a batch, and a lone request waits for nothing
    batch_linger_s: dict = _tier_map(immediate=0.0, peak=0.2, offpeak=0.5, background=0.5)
    #: a batch ``queued`` this long and never dispatched, or ``running`` with an expired lease, is dispatched again
    sweep_after_s: float = 30.0
    #: seconds a cached answer of a deterministic request stays in Redis
    cache_ttl_s: int = 7 * 24 * 3600
    #: mark the prefixes a submitted job's lines share for the providers' prompt caches
    #: (pipeline/endpoints/prompt_cache.py); a line's own cache_control or prompt_cache_key always wins
    prompt_cache_placement: bool = True
    #: seconds the other requests of a prefix group wait for its first one to finish (it writes the
    #: provider's prompt cache they then read) before they are sent anyway
    prompt_cache_warm_s: float = 30.0

    # workers
    #: worker processes per tier (``llmbatch worker --tier T``; ``--concurrency`` overrides)
    worker_concurrency: dict = _tier_map(immediate=2, peak=2, offpeak=1, background=1)
    #: the CPU niceness of each tier's worker processes (0 to 19): on a busy machine the kernel runs
    #: immediate work first and bulk work in the time left, instead of sharing the cores equally
    worker_nice: dict = _tier_map(immediate=0, peak=5, offpeak=10, background=15)
    #: provider calls in flight at once inside one batch, per tier
    inflight_per_batch: dict = _tier_map(immediate=64, peak=64, offpeak=64, background=32)
    #: seconds a worker's lease on a batch lasts unrenewed (renewed every third of it); then another may take it
    batch_lease_s: float = 120.0
    #: Celery's Redis visibility timeout: an unacknowledged batch message is redelivered after this long
    visibility_timeout_s: int = 7200
    #: single flight (workers/coalesce.py): identical deterministic requests in flight at once are sent
    #: once, across processes and hosts; the others take the answer at cost 0, as cache hits
    coalesce: bool = True
    #: seconds a single-flight claim lives unrenewed (renewed every third of it while its call runs):
    #: how long waiters of an owner that died wait before one of them calls instead. Long enough to
    #: outlast a stalled event loop (measured: renewals 12 s late at a load average of 25 on 2 cores)
    coalesce_claim_s: float = 30.0
    #: the longest a request waits for an identical one's answer before it calls by itself
    coalesce_wait_max_s: float = 600.0

    # limits (pipeline/money/budget.py, pipeline/providers/ratelimit.py)
    #: daily caps in USD per UTC day, applied only by ``llmbatch budget apply-config`` (the caps in
    #: force live in Postgres, set with ``llmbatch budget set``); empty: no cap
    budget_global_daily_usd: str = ""
    #: daily cap in USD per tier (``peak=5,offpeak=20``); ``llmbatch budget set`` overrides them
    budget_tier_daily_usd: dict = field(default_factory=dict)
    #: a reservation not renewed for this long (its worker died) is released; never less than
    #: provider_timeout_s + budget_reservation_margin_s (pipeline/money/caps.py reservation_ttl_s)
    budget_reservation_ttl_s: float = 180.0
    #: added to provider_timeout_s for the shortest a dead worker's hold can live: a call may still bill that long
    budget_reservation_margin_s: float = 30.0
    #: the scheduler compares the Redis budget counters with the Postgres ledger this often
    budget_reconcile_every_s: float = 30.0
    #: a reservation that only other live holds stand in front of waits this long (``llmbatch status``
    #: names the cap, what it holds and for which jobs), then its request is deferred a minute with that reason
    budget_wait_max_s: float = 300.0
    #: model -> "rpm:tpm" (either part may be empty): the provider's limits, shared by all workers
    rate_limits: dict = field(default_factory=dict)
    #: peak's share of a model's limit while immediate work waits
    rate_peak_share: float = 0.7
    #: a job with a fallback model sends a request to it rather than wait longer on the primary's window
    fallback_rate_wait_s: float = 2.0
    #: requests in flight per tier across every process and host (0: no cap beyond inflight_per_batch)
    inflight_per_tier: dict = _tier_map(immediate=0, peak=0, offpeak=0, background=0)

    # pricing
    #: your own price file (JSON, in the shape of pipeline/data/pricing.json): adds or overrides models
    pricing_file: Path | None = None

    # scheduler (schedules/): off-peak window, background fill, provider batches, upkeep
    #: the one clock of the scheduler and the daily caps' periods (pipeline/clock.py): "db": real time
    #: unless a test set the sched_clock row (shared by every process, and by Postgres' budget_day()); "system": real time only
    clock: str = "db"
    #: seconds between scheduler ticks (window, background fill, provider batches)
    scheduler_tick_s: float = 1.0
    #: cron (5 fields, crontab meaning) at which the off-peak window opens
    offpeak_open_cron: str = "0 22 * * *"
    #: cron at which the off-peak window closes
    offpeak_close_cron: str = "0 6 * * *"
    #: time zone of the off-peak crons (IANA name)
    offpeak_timezone: str = "UTC"
    #: seconds allowed to run a request with a deadline: held work is released this long before its
    #: deadline, window or not, and off-peak is chosen only when the window opens before that
    deadline_margin_s: float = 900.0
    #: pacing: batches released per tick, per held tier
    release_per_tick: dict = _tier_map(offpeak=4, background=2)
    #: pacing: at most this many released batches waiting in Celery, per held tier
    release_max_waiting: dict = _tier_map(offpeak=8, background=2)
    #: seconds between polls of an open provider batch
    provider_batch_poll_s: float = 2.0
    #: a provider batch still open this long before the deadline of a request in it is cancelled, and
    #: what it did not run goes to realtime (held provider-batch work so near its deadline goes to
    #: realtime unsent): time for the cancel, the ingest and the realtime calls
    provider_batch_deadline_lead_s: float = 1800.0
    #: seconds one attempt to create a provider batch may take; a creation the provider has not
    #: confirmed is looked for at the provider and sent again only after this long with none found
    provider_batch_create_timeout_s: float = 120.0
    #: per provider batch, by Batch API format (a provider's ``batch``): requests (OpenAI's and Anthropic's limits)
    provider_batch_max_requests: dict = _tier_map(openai=50_000, anthropic=100_000)
    #: per provider batch, by Batch API format: bytes of JSONL (OpenAI's and Anthropic's limits)
    provider_batch_max_bytes: dict = _tier_map(openai=200_000_000, anthropic=256_000_000)
    #: the provider's batch queue limit per model: prompt tokens of provider batches not yet ended (OpenAI's
    #: "batch queue limit" of your organisation's tier, e.g. ``gpt-4o=90000,gpt-4o-mini=2000000``); a batch is sent
    #: only when ours still open for that model leave room, else its lines wait held. A model not listed
    #: has no known limit: a batch the provider fails for it (token_limit_exceeded) is held again, unbilled
    provider_batch_queue_tokens: dict = _tier_map()
    #: after a token_limit_exceeded, that model's provider batches wait for one of ours to end, or this long
    provider_batch_queue_retry_s: float = 600.0
    #: times a line a provider batch did not run (expired, or a retryable error) goes into a new provider
    #: batch, when its deadline leaves time for one; after that (or without the time) it goes to realtime
    provider_batch_resubmits: int = 2
    #: OpenAI: seconds its batch output and error files are kept (``output_expires_after``, 1 h to 30 days)
    provider_batch_output_keep_s: int = 2_592_000
    #: results of a provider batch not copied into Postgres this long before the provider deletes them
    #: (Anthropic: 29 days after creation; OpenAI: provider_batch_output_keep_s) raise an alert
    provider_batch_copy_margin_s: float = 259_200.0
    #: missed cron slots younger than this still run after a scheduler outage
    schedule_misfire_grace_s: float = 3600.0
    #: request and response bodies are purged this long after the request finished (0: never)
    retention_days: float = 30.0
    #: ``llmbatch purge`` deletes the rows (requests, results, attempts, ...) of jobs that ended this
    #: many days ago; the job's row stays with its totals (pipeline/stores/retention.py). 0: never; at least 1
    purge_jobs_after_days: float = 0.0
    #: a batch 'dispatched' to Celery this long without a worker taking it is dispatched again
    stuck_dispatched_s: float = 900.0
    #: seconds between upkeep runs (retention, stuck batches, budget periods)
    upkeep_every_s: float = 60.0

    # what users see: metrics, logs, the read-only SQL role, Flower
    #: where the /metrics endpoints listen (``0.0.0.0`` in compose)
    metrics_host: str = "127.0.0.1"
    #: the batcher's /metrics port; worker-TIER adds 1..4 (immediate, peak, offpeak, background),
    #: the scheduler 5; 0 turns the endpoints off
    metrics_port: int = 9100
    #: log line format: ``plain`` or ``json``
    log_format: str = "plain"
    #: log level name; not read by any process yet (they take ``llmbatch --log-level`` / ``worker --loglevel``)
    log_level: str = "INFO"
    #: ``llmbatch sql`` connects with this; default: database_url as role llmbatch_reader
    reader_database_url: str = ""
    #: Flower's address, for ``llmbatch doctor``
    flower_url: str = "http://127.0.0.1:5555"
    #: Flower's basic-auth user (generated into var/secrets.env by the local stack; no default)
    flower_user: str = ""
    #: Flower's basic-auth password (generated into var/secrets.env by the local stack; no default)
    flower_password: Secret = Secret("")

    # the HTTP front door, ``llmbatch api`` (pipeline/api/: OpenAI Files and Batches)
    #: where ``llmbatch api`` listens (``0.0.0.0`` in compose)
    api_host: str = "127.0.0.1"
    #: its port (shifted by port_offset like every default port)
    api_port: int = 58600
    #: where it keeps uploaded files and the output files it writes; empty: ``var_dir``/api-files
    api_files_dir: Path | None = None
    #: the local stack's first API key (generated into var/secrets.env, registered, hashed, in project
    #: ``default`` by ``make up``); the service never reads it: keys live hashed in Postgres
    api_first_key: Secret = Secret("")
    #: signs the jobs page's session cookie (pipeline/api/web.py; generated into var/secrets.env by the
    #: local stack; no default: without it the page answers 503 and the API works on)
    api_session_secret: Secret = Secret("")
    #: a webhook receiver has this long to answer an event (pipeline/api/webhooks.py)
    api_webhook_timeout_s: float = 10.0
    #: the wait after a webhook's first failed attempt; it doubles after each one
    api_webhook_retry_s: float = 2.0
    #: the longest wait between two attempts of a webhook event
    api_webhook_retry_max_s: float = 3600.0
    #: an event not delivered this many hours after it was made is given up (OpenAI retries for 72)
    api_webhook_give_up_h: float = 72.0

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_url") and isinstance(value, str) and not isinstance(value, Secret):
                value = mask_url(value)
            parts.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(parts)})"

    @property
    def simulated(self) -> bool:
        """True when no provider key is set and the simulator answers."""
        return not (self.openai_api_key or self.anthropic_api_key or any(
            k.get("secret") for p in (self.providers or {}).values() if isinstance(p, dict)
            for k in (p.get("keys") or []) if isinstance(k, dict)))

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url

    @property
    def reader_url(self) -> str:
        """The URL of the read-only role (``llmbatch sql``): ``reader_database_url``, or
        ``database_url`` with its user replaced by llmbatch_reader (and its password), also
        when ``database_url`` names no user (libpq would then log in as the OS user)."""
        if self.reader_database_url:
            return self.reader_database_url
        return with_user(self.database_url, "llmbatch_reader", self.reader_password)

    @property
    def libpq_url(self) -> str:
        """The database URL as libpq/psycopg understands it."""
        return self.database_url.replace("postgresql+psycopg://", "postgresql://")


def with_user(url: str, user: str, password: str = "") -> str:
    """``url`` with its user (and password) replaced; the rest kept as written."""
    parts = urllib.parse.urlsplit(str.__str__(url))
    host = parts.netloc.rpartition("@")[2]
    auth = urllib.parse.quote(user, safe="")
    if password:
        auth += ":" + urllib.parse.quote(str.__str__(password), safe="")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{auth}@{host}"))


def read_secrets_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of the stack's secrets file (``#`` comments, optional quotes)."""
    out: dict[str, str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip().strip("'\"")
    return out


def _coerce(value, current, name: str):
    try:
        if isinstance(current, bool):
            return str(value).lower() in ("1", "true", "yes", "on")
        if isinstance(current, int) and not isinstance(current, bool):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, Decimal):
            return Decimal(str(value))
        if isinstance(current, Secret):
            return Secret(value)
        if name == "providers" and isinstance(value, str):   # LLMBATCH_PROVIDERS: JSON
            value = json.loads(value) if value.strip() else {}
            if not isinstance(value, dict):
                raise ValueError("expected a JSON object of name -> provider")
            return value
        if isinstance(current, dict):
            if isinstance(value, dict):
                return {**current, **value}
            pairs = (p.split("=", 1) for p in str(value).split(",") if p)
            kind = type(next(iter(current.values()))) if current else str
            return {**current, **{k.strip(): kind(v) for k, v in pairs}}
        if isinstance(current, Path) or name.endswith(("_dir", "_file")):
            return Path(value) if value else None
        return value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"setting {name}: cannot use {value!r}: {e}") from e


def load_settings(env: dict | None = None) -> Settings:
    """Build settings from defaults, the TOML file and the environment (in that order)."""
    env = os.environ if env is None else env
    base = Settings()
    values: dict = {}
    config_file = Path(env.get("LLMBATCH_CONFIG", "llmbatch.toml"))
    if config_file.is_file():
        with config_file.open("rb") as f:
            values.update(tomllib.load(f))
    for f in dataclasses.fields(Settings):
        key = f"LLMBATCH_{f.name.upper()}"
        if key in env:
            values[f.name] = env[key]
    # the providers' own variable names work too
    for name, var in (("openai_api_key", "OPENAI_API_KEY"), ("anthropic_api_key", "ANTHROPIC_API_KEY")):
        if name not in values and env.get(var):
            values[name] = env[var]
    unknown = set(values) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    # the stack's generated secrets: below the environment and the TOML file
    var_dir = Path(values["var_dir"]) if values.get("var_dir") else base.var_dir
    for key, value in read_secrets_file(var_dir / SECRETS_FILE).items():
        name = key.removeprefix("LLMBATCH_").lower()
        if key.startswith("LLMBATCH_") and name in _SECRET_SETTINGS and name not in values:
            values[name] = value
    coerced = {k: _coerce(v, getattr(base, k), k) for k, v in values.items()}
    if "providers" in coerced:
        coerced["providers"] = _provider_secrets(coerced["providers"], env)
    offset = coerced.get("port_offset", 0)
    if offset:
        for name, port in (("database_url", 55432), ("redis_url", 56379), ("kafka_bootstrap", 59092),
                           ("simulator_url", 58080), ("flower_url", 5555)):
            if name not in coerced:
                coerced[name] = getattr(base, name).replace(str(port), str(port + offset))
        if "metrics_port" not in coerced:
            coerced["metrics_port"] = base.metrics_port + offset
        if "api_port" not in coerced:
            coerced["api_port"] = base.api_port + offset
    # an explicit URL wins; the default ones carry the passwords
    if "database_url" not in values and coerced.get("database_password"):
        url = coerced.get("database_url", base.database_url)
        coerced["database_url"] = with_user(url, "llmbatch", coerced["database_password"])
    if "redis_url" not in values and coerced.get("redis_password"):
        url = coerced.get("redis_url", base.redis_url)
        coerced["redis_url"] = with_user(url, "", coerced["redis_password"])
    # the pipeline's own producers (and a service that holds the key) derive their password
    if not coerced.get("kafka_password") and coerced.get("kafka_producer_key"):
        coerced["kafka_password"] = Secret(producer_password(coerced["kafka_producer_key"],
                                                             coerced.get("kafka_user", base.kafka_user)))
    return dataclasses.replace(base, **coerced)


def _provider_secrets(providers: dict, env) -> dict:
    """The providers' tables with each key's secret read from the variable its ``env`` names.

    Read here, where the environment is read, and kept as a ``Secret``: the registry
    (pipeline/providers/registry.py) validates the tables and never sees the environment."""
    if not isinstance(providers, dict):
        raise ConfigError("setting providers: expected a table of name -> provider")
    out = {}
    for name, table in providers.items():
        keys = table.get("keys") if isinstance(table, dict) else None
        if isinstance(keys, list):
            table = {**table, "keys": [
                {**k, "secret": Secret(env.get(k["env"], ""))} if isinstance(k, dict) and isinstance(
                    k.get("env"), str) else k for k in keys]}
        out[name] = table
    return out


def producer_password(key: str, user: str) -> str:
    """The Kafka password of producer ``user``: HMAC-SHA256 of its name under the producer key.

    Derived, not stored: the batcher recomputes it to check a message's signature
    (pipeline/intake/kafka.py), so nothing but the key has to be kept anywhere.
    """
    return hmac.new(str.__str__(key).encode(), b"kafka-producer:" + user.encode(), hashlib.sha256).hexdigest()


#: settings the stack's secrets file may set (anything else in it is for infra/stack.sh alone)
_SECRET_SETTINGS = frozenset({"database_password", "reader_password", "redis_password",
                              "flower_user", "flower_password", "kafka_batcher_password",
                              "kafka_admin_password", "kafka_producer_key", "api_first_key",
                              "api_session_secret"})


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, built once."""
    return load_settings()
