"""The reader's connection limit is sized against max_connections, and the local stack and
docker compose give Postgres the same max_connections (sql/016_reader_limits.sql)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _max_connections() -> tuple[int, int]:
    stack = int(re.search(r"^max_connections = (\d+)\b", (ROOT / "infra/stack.sh").read_text(), re.M)[1])
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["postgres"]["command"]
    flag = next(a for a in compose if a.startswith("max_connections="))
    return stack, int(flag.partition("=")[2])


def test_stack_and_compose_give_postgres_the_same_max_connections():
    stack, compose = _max_connections()
    assert stack == compose


def test_reader_limit_leaves_the_pipeline_most_connections():
    sql = (ROOT / "sql/016_reader_limits.sql").read_text()
    limit = int(re.search(r"ALTER ROLE llmbatch_reader CONNECTION LIMIT (\d+);", sql)[1])
    max_conn, _ = _max_connections()
    superuser_reserved = 3   # Postgres' default superuser_reserved_connections
    # the pipeline: 6 worker processes, batcher, scheduler (two engines) at 15 each, and CLI calls
    pipeline_needs = 15 * 9 + 15
    assert 0 < limit and limit + superuser_reserved + pipeline_needs <= max_conn, (limit, max_conn)
    for setting in ("statement_timeout", "idle_in_transaction_session_timeout", "temp_file_limit"):
        assert f"ALTER ROLE llmbatch_reader SET {setting} = " in sql, setting
    assert "REVOKE TEMPORARY ON DATABASE" in sql and "FROM PUBLIC" in sql
