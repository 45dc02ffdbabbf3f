"""``llmbatch doctor``: check every service and setting, say what is wrong and how to fix it.

Each check returns a ``Check`` (name, ok, detail, fix, kind). It only reads:
nothing here starts, writes or repairs anything. ``kind`` is ``service`` for
something unreachable (exit 3) and ``setup`` for a wrong setting or file
(exit 1).
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.config import Settings
from pipeline.constants import DLQ_TOPIC, IMMEDIATE_TOPIC, REQUESTS_PARTITIONS, REQUESTS_TOPIC, TIERS

UP = "make up   (or: llmbatch up)"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    kind: str = "service"   # service | setup
    required: bool = True   # a failing optional check is a warning

    def as_dict(self) -> dict:
        return asdict(self)


def _try(name: str, fn, fix: str, kind: str = "service", required: bool = True) -> Check:
    try:
        detail = fn()
        return Check(name, True, detail or "ok", kind=kind, required=required)
    except Exception as e:  # the reason is the finding
        return Check(name, False, f"{type(e).__name__}: {e}".strip()[:300], fix, kind, required)


def check_settings(settings: Settings) -> list[Check]:
    out = []
    problems = []
    for name in ("batch_max_size", "batch_linger_s", "worker_concurrency", "inflight_per_batch"):
        value = getattr(settings, name)
        extra = set(value) - set(TIERS)
        if extra:
            problems.append(f"{name} names unknown tiers {sorted(extra)}")
        if any(v <= 0 for k, v in value.items() if name != "batch_linger_s"):
            problems.append(f"{name} has a value <= 0")
    if settings.log_format not in ("plain", "json"):
        problems.append(f"log_format is {settings.log_format!r} (plain or json)")
    if settings.pricing_file and not Path(settings.pricing_file).is_file():
        problems.append(f"pricing_file {settings.pricing_file} does not exist")
    out.append(Check("settings", not problems, "; ".join(problems) or "valid",
                     "fix the LLMBATCH_* variables or llmbatch.toml (README: Configuration)", "setup"))
    out.append(_providers_check(settings))
    return out


def _providers_check(settings: Settings) -> Check:
    """The registry's providers, each with its kind and its keys by alias (set or not); never a key."""
    from pipeline.errors import ConfigError
    from pipeline.providers.registry import build_registry
    try:
        reg = build_registry(settings, secret_required=False)
    except ConfigError as e:
        return Check("providers", False, str(e), "fix the providers setting (docs/CONFIGURATION.md)", "setup")
    unset = [f"{p.name}/{k.alias} ({k.env})" for p in reg for k in p.keys if k.env and not k.secret]
    if reg.simulated and not unset:
        return Check("providers", True, "simulator (no OPENAI_API_KEY / ANTHROPIC_API_KEY or provider key set): "
                     + ", ".join(reg.names()), kind="setup")
    listed = "; ".join(f"{p.name} ({p.kind}): " + ", ".join(k.alias + ("" if k.secret or not k.env else " unset")
                                                            for k in p.keys) for p in reg)
    return Check("providers", not unset, listed, f"set {', '.join(unset)}" if unset else "", "setup")


def check_postgres(settings: Settings) -> list[Check]:
    import sqlalchemy as sa

    from pipeline.stores import db

    def reach():
        with db.get_engine().connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return settings.database_url.split("@")[-1]

    first = _try("postgres", reach, f"start it: {UP}; or set LLMBATCH_DATABASE_URL")
    if not first.ok:
        return [first]

    def migrations():
        with db.get_engine().connect() as conn:
            done = set(conn.execute(sa.text("SELECT version FROM schema_migrations")).scalars())
            states = conn.execute(sa.text("SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure(:f)"),
                                  {"f": f"{db.STATES_FUNCTION}(text)"}).scalar()
        missing = [p.stem for p in db.migration_files() if p.stem not in done]
        if missing:
            raise RuntimeError(f"not applied: {', '.join(missing)}")
        if states != db.states_function_body():
            raise RuntimeError(f"{db.STATES_FUNCTION}() is not this code's pipeline/constants.py STATE_SETS")
        return f"{len(done)} applied"

    def reader():
        import psycopg
        url = settings.reader_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1 FROM job_summary LIMIT 1")
            ro = conn.execute("SELECT has_table_privilege('jobs', 'INSERT')").fetchone()[0]
            limit, temp = conn.execute(
                "SELECT rolconnlimit, has_database_privilege(current_database(), 'TEMP')"
                " FROM pg_roles WHERE rolname = current_user").fetchone()
            timeout = conn.execute("SHOW statement_timeout").fetchone()[0]
            temp_files = conn.execute("SHOW temp_file_limit").fetchone()[0]
        if ro:
            raise RuntimeError("llmbatch_reader can INSERT into jobs: it must be read-only")
        # without these a reader can take every connection or fill the disk (sql/016_reader_limits.sql)
        loose = [what for what, bad in (("no connection limit", limit < 0), ("TEMP on the database", temp),
                                        ("no statement_timeout", timeout == "0"),
                                        ("no temp_file_limit", temp_files == "-1")) if bad]
        if loose:
            raise RuntimeError(f"llmbatch_reader has {', '.join(loose)}")
        return (f"llmbatch_reader reads, cannot write; {limit} connections,"
                f" statement_timeout {timeout}, temp_file_limit {temp_files}, no TEMP")

    return [first,
            _try("migrations", migrations, "llmbatch db upgrade", "setup"),
            _try("read-only role", reader,
                 "as a Postgres superuser: CREATE ROLE llmbatch_reader LOGIN (if missing), then in the"
                 " database \\i sql/016_reader_limits.sql; then llmbatch db upgrade",
                 "setup")]


class RedisFull(RuntimeError):
    """Redis answers but refuses writes: used memory is over maxmemory (policy noeviction)."""


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def check_redis(settings: Settings) -> Check:
    def ping():
        import redis
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=2)
        client.ping()
        mem = client.info("memory")
        used, limit = int(mem["used_memory"]), int(mem.get("maxmemory", 0))
        policy = mem.get("maxmemory_policy", "?")
        where = settings.redis_url.split("@")[-1]
        if not limit:
            return f"{where}; used memory {_mib(used)}, no maxmemory"
        if used > limit:   # what Redis itself checks before each write
            raise RedisFull(f"{where} is out of memory: used {_mib(used)} > maxmemory {_mib(limit)}"
                            f" (policy {policy}): it refuses writes, so no batch is taken, acknowledged"
                            " or budgeted; workers wait until it has room")
        return f"{where}; used memory {_mib(used)} of maxmemory {_mib(limit)} ({used / limit:.0%}, policy {policy})"
    check = _try("redis", ping, f"start it: {UP}; or set LLMBATCH_REDIS_URL")
    if check.detail.startswith(RedisFull.__name__):
        check.detail = check.detail.removeprefix(RedisFull.__name__ + ": ")
        check.fix = ("give it memory: redis-cli CONFIG SET maxmemory <bytes> (and infra/redis.conf), or find"
                     " what fills it: redis-cli --bigkeys")
    return check


def check_kafka(settings: Settings) -> Check:
    def topics():
        from pipeline.intake.kafka import make_admin
        # the admin sees every topic; a service's producer sees only the ones it may write
        admin = bool(settings.kafka_admin_password)
        md = make_admin(settings, "admin" if admin else "producer").list_topics(timeout=5)
        wanted = (REQUESTS_TOPIC, IMMEDIATE_TOPIC) + ((DLQ_TOPIC,) if admin else ())
        missing = [t for t in wanted if t not in md.topics]
        if missing:
            raise RuntimeError(f"topics missing: {', '.join(missing)}")
        n = len(md.topics[REQUESTS_TOPIC].partitions)
        if n < REQUESTS_PARTITIONS:
            raise RuntimeError(f"{REQUESTS_TOPIC} has {n} partitions, expected {REQUESTS_PARTITIONS}")
        return f"{settings.kafka_bootstrap}: {REQUESTS_TOPIC} ({n} partitions), {IMMEDIATE_TOPIC}, {DLQ_TOPIC}"
    return _try("kafka", topics, f"start it (creates the topics): {UP}; or set LLMBATCH_KAFKA_BOOTSTRAP"
                " (and the Kafka user and password: LLMBATCH_KAFKA_USER, LLMBATCH_KAFKA_PASSWORD)")


def check_simulator(settings: Settings) -> Check:
    def health():
        urllib.request.urlopen(f"{settings.simulator_url}/healthz", timeout=2).read()
        return settings.simulator_url
    # only needed when it answers for a provider
    return _try("simulator", health, f"start it: {UP}; or set LLMBATCH_SIMULATOR_URL",
                required=settings.simulated)


def check_workers(settings: Settings) -> Check:
    def ping():
        from workers.app import app
        replies = app.control.ping(timeout=2.0) or []
        names = sorted(k for r in replies for k in r)
        missing = [t for t in TIERS if not any(n.startswith(f"{t}@") for n in names)]
        if missing:
            raise RuntimeError(f"no worker answered for tier(s) {', '.join(missing)}"
                               f" (answered: {', '.join(names) or 'none'})")
        return f"{len(names)} answered: {', '.join(names)}"
    return _try("workers", ping, "start them: llmbatch up worker-immediate worker-peak worker-offpeak"
                " worker-background (or: llmbatch worker --tier T)")


def check_tokenizer(settings: Settings) -> Check:
    def files():
        from pipeline.money import tokens
        d = tokens.default_cache_dir()
        bad = []
        for name, (url, expected) in tokens._registry().items():
            path = d / tokens.cache_file_name(url)
            if not path.is_file():
                bad.append(f"{name} missing")
            elif hashlib.sha256(path.read_bytes()).hexdigest() != expected:
                bad.append(f"{name} damaged (sha256 differs from tiktoken's)")
        if bad:
            raise RuntimeError(f"{d}: {', '.join(bad)}")
        return f"{', '.join(tokens._registry())} present and verified"
    return _try("tokenizer files", files, "python -m pipeline.money.tokens provision", "setup")


def check_flower(settings: Settings) -> Check:
    def auth():
        try:
            urllib.request.urlopen(settings.flower_url + "/", timeout=3)
        except urllib.error.HTTPError as e:
            if e.code != 401:
                raise
        else:
            raise RuntimeError(f"{settings.flower_url} answers without credentials: basic auth is off")
        if not (settings.flower_user and settings.flower_password):
            return f"{settings.flower_url}: up, basic auth on (no credentials configured here to try)"
        import base64
        token = base64.b64encode(f"{settings.flower_user}:{settings.flower_password.reveal()}".encode()).decode()
        req = urllib.request.Request(settings.flower_url + "/", headers={"Authorization": f"Basic {token}"})
        try:
            urllib.request.urlopen(req, timeout=3).read(0)
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{settings.flower_url} refuses the configured credentials ({e.code})") from e
        return f"{settings.flower_url}: up, basic auth on, the configured credentials work"
    return _try("flower", auth, f"start it: {UP} (credentials: LLMBATCH_FLOWER_USER / LLMBATCH_FLOWER_PASSWORD,"
                " generated into var/secrets.env)", required=False)


def check_api(settings: Settings) -> Check:
    """The HTTP API (pipeline/api/): its /readyz says whether Postgres, Redis and Kafka answer it."""
    url = f"http://127.0.0.1:{settings.api_port}/readyz"

    def ready():
        try:
            body = json.load(urllib.request.urlopen(url, timeout=8))
        except urllib.error.HTTPError as e:
            body = json.load(e)
            raise RuntimeError(f"{url}: not ready: {body.get('checks')}") from None
        return f"{url}: {body['status']}"
    return _try("api", ready, f"start it: {UP} (the process `api`; log var/log/api.log)", required=False)


def run_checks(settings: Settings) -> list[Check]:
    redis_check, workers = check_redis(settings), check_workers(settings)
    if not redis_check.ok and not workers.ok:   # the workers wait for Redis: starting more would not help
        workers.fix = "fix redis first (above): the workers wait for it and answer again once it is back"
    return [*check_settings(settings), *check_postgres(settings), redis_check,
            check_kafka(settings), check_simulator(settings), workers,
            check_tokenizer(settings), check_flower(settings), check_api(settings)]


def exit_code(checks: list[Check]) -> int:
    failed = [c for c in checks if not c.ok and c.required]
    if any(c.kind == "service" for c in failed):
        return 3
    return 1 if failed else 0


def render(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
        lines.append(f"{mark} {c.name:<16} {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"     {'':<16} fix: {c.fix}")
    bad = [c for c in checks if not c.ok and c.required]
    lines.append("all checks passed" if not bad else f"{len(bad)} problem(s): {', '.join(c.name for c in bad)}")
    return "\n".join(lines)
