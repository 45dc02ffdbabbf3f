"""Fixtures for tests against the real local stack (Kafka, Postgres, Redis, workers, simulator)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipeline.config import get_settings
from pipeline.stores import db
from tests.conftest import require

LLMBATCH = str(Path(sys.executable).parent / "llmbatch")


def _check(fn) -> tuple[bool, str]:
    try:
        fn()
        return True, "ok"
    except Exception as e:  # the reason goes into the failure message
        return False, f"{type(e).__name__}: {e}"


@pytest.fixture(scope="session")
def stack():
    """The running stack; fails under CI (skips locally) when a part is missing."""
    settings = get_settings()

    def pg():
        with db.get_engine().connect() as conn:
            conn.execute(sa.text("SELECT 1 FROM jobs LIMIT 1"))

    def redis_():
        import redis
        redis.Redis.from_url(settings.redis_url, socket_timeout=2).ping()

    def kafka():
        from confluent_kafka.admin import AdminClient
        topics = AdminClient(kafka_conf(settings)).list_topics(timeout=5).topics
        assert "llm.requests" in topics, f"topic llm.requests missing: {sorted(topics)}"

    def simulator():
        urllib.request.urlopen(f"{settings.simulator_url}/healthz", timeout=2).read()

    def workers():
        from workers.app import app
        replies = app.control.ping(timeout=2.0) or []
        names = " ".join(k for r in replies for k in r)
        for tier in ("immediate", "peak"):
            assert f"{tier}@" in names, f"no {tier} worker answered ping: {names!r}"

    for name, fn in (("Postgres", pg), ("Redis", redis_), ("Kafka", kafka), ("simulator", simulator),
                     ("Celery workers", workers)):
        require(name, *_check(fn))
    for proc in ("batcher",):
        pid_file = settings.var_dir / "run" / f"{proc}.pid"
        require(proc, pid_file.exists(), f"{pid_file.name} missing")
    return settings


@pytest.fixture
def engine(stack):
    return db.get_engine()


def write_jsonl(path: Path, lines) -> Path:
    with path.open("w") as f:
        for line in lines:
            f.write(line if isinstance(line, str) else json.dumps(line))
            f.write("\n")
    return path


def chat_line(custom_id: str, text: str, model: str = "gpt-4o-mini", max_tokens: int = 32, **extra) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "max_tokens": max_tokens,
                     "messages": [{"role": "user", "content": text}]}, **extra}


def llmbatch(*args, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([LLMBATCH, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"llmbatch {args} exited {proc.returncode}: {proc.stderr}")
    return proc


def kafka_conf(settings, role: str = "admin", **extra) -> dict:
    """A confluent-kafka client configuration that logs in (SASL/SCRAM) as ``role``: the
    stack's ``admin`` (every topic and group; tests read the DLQ with it), the pipeline's
    ``producer`` (writes the request topics) or the ``batcher``. Every test client is made
    from this one helper, so the tests use Kafka as the pipeline's own principals do."""
    from pipeline.intake.kafka import client_conf
    return {**client_conf(settings, role), **extra}


def simulator_call(url: str, method: str = "GET", body=None, timeout: float = 10) -> dict:
    """One call to the simulator's control API (``/_config``, ``/_stats``, ``/_admin``), naming the
    test running in ``X-Caller`` so the simulator's log of configuration changes says who asked."""
    who = os.environ.get("PYTEST_CURRENT_TEST", "outside a test").encode("ascii", "replace").decode()
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "X-Caller": who})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


def wait_for(predicate, timeout: float = 60, every: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what} not met within {timeout} s")


def wait_for_progress(predicate, progress, stall: float = 120, limit: float = 1800, every: float = 0.5,
                      what: str = "condition"):
    """Wait for ``predicate`` as long as ``progress()`` keeps changing: fail when it has not
    changed for ``stall`` seconds, or after ``limit`` in all. A starved machine makes the stack
    slow, not stuck; a wall-clock limit alone failed a cancel test at load average 20+ while the
    batcher was still reading the job's messages (CI run 13)."""
    started = last_change = time.monotonic()
    seen = progress()
    while True:
        value = predicate()
        if value:
            return value
        now = time.monotonic()
        current = progress()
        if current != seen:
            seen, last_change = current, now
        if now - last_change > stall or now - started > limit:
            raise AssertionError(f"{what} not met: no progress for {now - last_change:.0f} s "
                                 f"({now - started:.0f} s in all), last progress {seen!r}")
        time.sleep(every)
