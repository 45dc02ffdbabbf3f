"""``make up`` on a fresh machine rides out a start that fails for a passing reason, and says why.

A landing once failed because Kafka's first start exited within seconds: the stack gave up
at the supervisor's first restart (which would have worked) and showed only the restart's log.
Two passing causes are planted here, on Kafka of a second stack of its own (ports above the
kernel's ephemeral range, its own var dir), with the main stack untouched:

- a client socket holding one of the service's ports (the default ports lie in the ephemeral
  range, so any outgoing connection may be given one as its local end);
- the data directory's lock held by another process for a few seconds.

And a cause that does not pass (the lock held for good) fails the start, naming the error.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import ROOT

pytestmark = pytest.mark.integration

OFFSET = 6420                       # Kafka on 65512 / 65513: above 60999, never a client's port
CONTROLLER_PORT = 59093 + OFFSET


@pytest.fixture(scope="module")
def side_stack(tmp_path_factory):
    """A second stack's environment (its Kafka only), stopped at the end whatever happens."""
    var = tmp_path_factory.mktemp("side") / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMBATCH_")}
    env.update(LLMBATCH_PORT_OFFSET=str(OFFSET), LLMBATCH_VAR_DIR=str(var))
    try:
        yield env, var
    finally:
        stack(env, "down", timeout=120)


@pytest.fixture
def formatted(side_stack):
    """The side stack with Kafka's storage formatted (its directory there to lock), Kafka stopped;
    an earlier test's start has usually done it."""
    env, var = side_stack
    if not (var / "kafka" / "sasl").exists():
        up = stack(env, "up", "kafka")
        down = stack(env, "down", "kafka", timeout=120)
        assert up.returncode == 0 and down.returncode == 0, up.stdout + up.stderr + down.stdout + down.stderr
    return side_stack


def stack(env, *args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "infra" / "stack.sh"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def up_holding(env, hold, release_when) -> tuple[int, str]:
    """``stack.sh up kafka`` while ``hold()`` holds something, then Kafka stopped again. The hold
    is released once ``release_when(out)`` is true of the output so far (or when the start ends),
    so it outlasts however slow the start is, and nothing hangs on timing."""
    release = hold()
    proc = subprocess.Popen(["bash", str(ROOT / "infra" / "stack.sh"), "up", "kafka"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if release is not None and release_when("".join(lines)):
                release()
                release = None
            time.sleep(0.2)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if release is not None:
            release()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        stack(env, "down", "kafka", timeout=120)
    return proc.returncode, "".join(lines)


def client_socket_on(port: int):
    """A socket bound to ``port`` and not listening, as an outgoing connection's local end is
    (no SO_REUSEADDR, as a client leaves it): a server cannot bind the port while it lives."""
    def hold():
        s = socket.socket()
        s.bind(("127.0.0.1", port))
        return s.close
    return hold


def lock_of(path: Path):
    """Kafka's directory lock (a POSIX record lock, as Java's FileChannel.tryLock takes it)."""
    def hold():
        f = path.open("a")
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f.close
    return hold


def kafka_log(var: Path) -> str:
    try:
        return (var / "log" / "kafka.log").read_text(errors="replace")
    except FileNotFoundError:
        return ""


def test_a_client_socket_on_a_port_delays_the_start_and_is_named(side_stack):
    env, _ = side_stack
    rc, out = up_holding(env, client_socket_on(CONTROLLER_PORT), lambda out: "waiting" in out)
    assert rc == 0, out
    assert f"port {CONTROLLER_PORT}" in out and "waiting" in out, out
    assert "started (pid" in out, out


def test_a_start_that_fails_for_a_passing_reason_is_retried_and_its_error_shown(formatted):
    env, var = formatted
    before = kafka_log(var).count("Failed to acquire lock")
    rc, out = up_holding(env, lock_of(var / "kafka" / "data" / ".lock"),
                         lambda out: kafka_log(var).count("Failed to acquire lock") > before)
    assert rc == 0, out
    assert "failed start" in out and "Failed to acquire lock" in out, out


def test_a_start_that_keeps_failing_stops_soon_with_its_error(formatted):
    env, var = formatted
    began = time.monotonic()
    rc, out = up_holding(env, lock_of(var / "kafka" / "data" / ".lock"), lambda out: False)
    took = time.monotonic() - began
    assert rc != 0, out
    assert "Failed to acquire lock" in out, out      # Kafka's own words, from the failed starts
    assert took < 90, f"a start that cannot succeed took {took:.0f} s to give up"
