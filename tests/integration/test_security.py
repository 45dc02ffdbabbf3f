"""The local stack's security defaults, tried from outside as anyone on the host would.

Postgres asks every TCP connection for a password (scram-sha-256), the
superuser included; Redis refuses commands without its password; Flower
answers 401 without the generated credentials; ``llmbatch sql`` runs only as
the read-only role. The passwords are generated into ``var/secrets.env``
(0600) and appear on no process's command line.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psycopg
import pytest
import redis

from pipeline.config import SECRETS_FILE, read_secrets_file
from tests.integration.conftest import LLMBATCH

pytestmark = pytest.mark.integration


def _pg_port(settings) -> int:
    return urllib.parse.urlsplit(settings.libpq_url).port


def _no_password_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSFILE"] = "/nonexistent"       # no ~/.pgpass either
    return env


@pytest.mark.parametrize("role", ["postgres", "llmbatch", "llmbatch_reader"])
def test_postgres_over_tcp_without_a_password_is_refused(stack, role):
    psql = shutil.which("psql")
    assert psql, "psql (postgresql-client) is part of the stack's setup"
    proc = subprocess.run([psql, "-X", "-w", "-h", "127.0.0.1", "-p", str(_pg_port(stack)), "-U", role,
                           "-d", "llmbatch", "-c", "select 1"], capture_output=True, text=True, timeout=30,
                          env=_no_password_env())
    assert proc.returncode != 0, f"psql as {role} over TCP without a password got in: {proc.stdout}"
    assert "no password supplied" in proc.stderr or "password authentication failed" in proc.stderr, proc.stderr


def test_postgres_refuses_a_wrong_password_and_takes_the_generated_one(stack):
    port = _pg_port(stack)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(f"postgresql://postgres:guess@127.0.0.1:{port}/postgres", connect_timeout=5).close()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(f"postgresql://llmbatch:guess@127.0.0.1:{port}/llmbatch", connect_timeout=5).close()
    with psycopg.connect(stack.libpq_url, connect_timeout=5) as conn:   # the app's own URL (secrets file)
        assert conn.execute("SELECT current_user").fetchone()[0] == "llmbatch"
        assert conn.execute("SHOW password_encryption").fetchone()[0] == "scram-sha-256"


def test_pg_hba_trusts_nothing(stack):
    hba = Path(stack.var_dir) / "pgdata" / "pg_hba.conf"
    rules = [line.split() for line in hba.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert rules, f"{hba} has no rules"
    assert not [r for r in rules if "trust" in r], rules
    tcp = [r for r in rules if r[0].startswith("host")]
    assert tcp and all(r[-1] == "scram-sha-256" for r in tcp), tcp


def test_redis_without_the_password_is_refused(stack):
    url = urllib.parse.urlsplit(stack.redis_url)
    assert url.password, "the stack's redis URL carries the generated password"
    bare = redis.Redis(host=url.hostname, port=url.port, socket_timeout=5)
    with pytest.raises(redis.exceptions.AuthenticationError):
        bare.ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host=url.hostname, port=url.port, password="guess", socket_timeout=5).ping()
    cli = shutil.which("redis-cli")
    assert cli, "redis-cli is part of the stack's setup"
    env = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
    out = subprocess.run([cli, "-h", url.hostname, "-p", str(url.port), "set", "llmbatch:caps", "0"],
                         capture_output=True, text=True, timeout=30, env=env)
    assert "NOAUTH" in out.stdout + out.stderr, out
    assert redis.Redis.from_url(stack.redis_url, socket_timeout=5).ping()   # with it: in


def _flower(stack, auth: tuple[str, str] | None) -> int:
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(stack.flower_url + "/", headers=headers),
                                    timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_flower_needs_the_generated_credentials(stack):
    assert stack.flower_user and stack.flower_password, "the secrets file gives Flower's credentials"
    assert _flower(stack, None) == 401
    for guess in (("admin", "llmbatch"), ("admin", "admin"), (stack.flower_user, "guess")):
        assert _flower(stack, guess) == 401, guess
    assert _flower(stack, (stack.flower_user, stack.flower_password.reveal())) == 200


def test_llmbatch_sql_refuses_the_owner(stack):
    ok = subprocess.run([LLMBATCH, "sql", "select current_user"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "llmbatch_reader" in ok.stdout, ok.stderr   # sanity: the reader runs
    env = dict(os.environ, LLMBATCH_READER_DATABASE_URL=stack.database_url)   # the owner's URL
    proc = subprocess.run([LLMBATCH, "sql", "select 1"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "refusing" in proc.stderr and "'llmbatch'" in proc.stderr and "llmbatch_reader" in proc.stderr
    assert proc.stdout == ""


def test_secrets_file_is_private_and_on_no_command_line(stack):
    path = Path(stack.var_dir) / SECRETS_FILE
    assert path.stat().st_mode & 0o777 == 0o600, oct(path.stat().st_mode)
    secrets = {k: v for k, v in read_secrets_file(path).items() if "PASSWORD" in k}
    assert len(secrets) >= 4, sorted(secrets)
    seen = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        seen.append(text)
        for key, value in secrets.items():
            assert value not in text, f"{key} on the command line of pid {cmdline.parent.name}"
    assert any("supervisord" in t for t in seen)   # sanity: the stack's processes were looked at
