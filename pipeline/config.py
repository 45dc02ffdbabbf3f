"""The one settings object. The environment is read here and nowhere else.

Every setting has an environment variable ``LLMBATCH_<NAME>`` (upper case).
An optional TOML file (``LLMBATCH_CONFIG``, default ``llmbatch.toml`` in the
working directory) supplies values the environment does not. Secrets are kept
in ``Secret`` so they never show in a repr or a log line.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


class Secret(str):
    """A string that hides itself in reprs and formatted output."""

    def __repr__(self) -> str:
        return "Secret('**********')" if self else "Secret('')"

    def reveal(self) -> str:
        return str.__str__(self)


def _tier_map(**values):
    return field(default_factory=lambda: dict(values))


@dataclass(frozen=True)
class Settings:
    # services (ports chosen so a system service on a default port does not collide)
    database_url: str = "postgresql+psycopg://llmbatch@127.0.0.1:55432/llmbatch"
    redis_url: str = "redis://127.0.0.1:56379/0"
    kafka_bootstrap: str = "127.0.0.1:59092"
    var_dir: Path = ROOT / "var"
    #: shifts every default port, to run a second local stack beside the first
    port_offset: int = 0

    # providers: with no key set, the built-in simulator answers
    openai_api_key: Secret = Secret("")
    anthropic_api_key: Secret = Secret("")
    simulator_url: str = "http://127.0.0.1:58080"
    openai_base_url: str = ""
    anthropic_base_url: str = ""
    provider_timeout_s: float = 60.0
    #: the SDKs' HTTP transport: "aiohttp" (their aiohttp backend; measured faster here) or "httpx"
    provider_http_client: str = "aiohttp"
    max_attempts: int = 5
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0

    # batcher
    consumer_group: str = "llmbatch-batcher"
    batch_max_size: dict = _tier_map(immediate=50, peak=200, offpeak=500, background=500)
    batch_linger_s: dict = _tier_map(immediate=0.005, peak=0.2, offpeak=0.5, background=0.5)
    sweep_after_s: float = 30.0
    cache_ttl_s: int = 7 * 24 * 3600

    # workers
    worker_concurrency: dict = _tier_map(immediate=2, peak=2, offpeak=1, background=1)
    inflight_per_batch: dict = _tier_map(immediate=64, peak=64, offpeak=64, background=32)
    batch_lease_s: float = 120.0
    visibility_timeout_s: int = 7200

    # limits (pipeline/budget.py, pipeline/ratelimit.py)
    #: daily caps in USD per UTC day, applied only by ``llmbatch budget apply-config`` (the caps in
    #: force live in Postgres, set with ``llmbatch budget set``); empty: no cap
    budget_global_daily_usd: str = ""
    budget_tier_daily_usd: dict = field(default_factory=dict)
    #: a reservation not renewed for this long (its worker died) is released; never less than
    #: provider_timeout_s + budget_reservation_margin_s (pipeline/budget.py reservation_ttl_s)
    budget_reservation_ttl_s: float = 180.0
    budget_reservation_margin_s: float = 30.0
    #: the scheduler compares the Redis budget counters with the Postgres ledger this often
    budget_reconcile_every_s: float = 30.0
    #: model -> "rpm:tpm" (either part may be empty): the provider's limits, shared by all workers
    rate_limits: dict = field(default_factory=dict)
    #: peak's share of a model's limit while immediate work waits
    rate_peak_share: float = 0.7
    #: a job with a fallback model sends a request to it rather than wait longer on the primary's window
    fallback_rate_wait_s: float = 2.0
    #: requests in flight per tier across every process and host (0: no cap beyond inflight_per_batch)
    inflight_per_tier: dict = _tier_map(immediate=0, peak=0, offpeak=0, background=0)

    # pricing
    pricing_file: Path | None = None

    # scheduler (schedules/): off-peak window, background fill, provider batches, upkeep
    #: "db": now() is real time unless a test set the sched_clock row (shared by every process);
    #: "system": real time only
    clock: str = "db"
    scheduler_tick_s: float = 1.0
    offpeak_open_cron: str = "0 22 * * *"
    offpeak_close_cron: str = "0 6 * * *"
    offpeak_timezone: str = "UTC"
    #: pacing: batches released per tick, and at most this many waiting in Celery per held tier
    release_per_tick: dict = _tier_map(offpeak=4, background=2)
    release_max_waiting: dict = _tier_map(offpeak=8, background=2)
    provider_batch_poll_s: float = 2.0
    #: per provider batch: requests and bytes (the providers' limits by default)
    provider_batch_max_requests: dict = _tier_map(openai=50_000, anthropic=100_000)
    provider_batch_max_bytes: dict = _tier_map(openai=200_000_000, anthropic=256_000_000)
    #: missed cron slots younger than this still run after a scheduler outage
    schedule_misfire_grace_s: float = 3600.0
    #: request and response bodies are purged this long after the request finished (0: never)
    retention_days: float = 30.0
    #: a batch 'dispatched' to Celery this long without a worker taking it is dispatched again
    stuck_dispatched_s: float = 900.0
    upkeep_every_s: float = 60.0

    # what users see: metrics, logs, the read-only SQL role, Flower
    metrics_host: str = "127.0.0.1"
    #: the batcher's /metrics port; worker-TIER adds 1..4 (immediate, peak, offpeak, background),
    #: the scheduler 5; 0 turns the endpoints off
    metrics_port: int = 9100
    log_format: str = "plain"          # plain | json
    log_level: str = "INFO"
    #: ``llmbatch sql`` connects with this; default: database_url as role llmbatch_reader
    reader_database_url: str = ""
    flower_url: str = "http://127.0.0.1:5555"

    @property
    def simulated(self) -> bool:
        """True when no provider key is set and the simulator answers."""
        return not (self.openai_api_key or self.anthropic_api_key)

    def base_url(self, provider: str) -> str:
        if provider == "openai":
            return self.openai_base_url or (
                "https://api.openai.com/v1" if self.openai_api_key else f"{self.simulator_url}/v1")
        if provider == "anthropic":
            return self.anthropic_base_url or (
                "https://api.anthropic.com" if self.anthropic_api_key else self.simulator_url)
        raise ConfigError(f"unknown provider {provider!r}")

    def api_key(self, provider: str) -> str:
        key = self.openai_api_key if provider == "openai" else self.anthropic_api_key
        return key.reveal() if key else "sk-simulator"

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url

    @property
    def reader_url(self) -> str:
        """The URL of the read-only role (``llmbatch sql``)."""
        if self.reader_database_url:
            return self.reader_database_url
        return re.sub(r"//[^@/]*@", "//llmbatch_reader@", self.database_url, count=1)

    @property
    def libpq_url(self) -> str:
        """The database URL as libpq/psycopg understands it."""
        return self.database_url.replace("postgresql+psycopg://", "postgresql://")


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
    coerced = {k: _coerce(v, getattr(base, k), k) for k, v in values.items()}
    offset = coerced.get("port_offset", 0)
    if offset:
        for name, port in (("database_url", 55432), ("redis_url", 56379), ("kafka_bootstrap", 59092),
                           ("simulator_url", 58080), ("flower_url", 5555)):
            if name not in coerced:
                coerced[name] = getattr(base, name).replace(str(port), str(port + offset))
        if "metrics_port" not in coerced:
            coerced["metrics_port"] = base.metrics_port + offset
    return dataclasses.replace(base, **coerced)


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, built once."""
    return load_settings()
