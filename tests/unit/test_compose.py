"""docker-compose.yml is valid Compose and runs the whole topology.

No Docker engine here: the file is checked against the Compose Specification
schema that check-jsonschema ships (offline), and its services are read.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
APP_ENV = ("LLMBATCH_DATABASE_URL", "LLMBATCH_REDIS_URL", "LLMBATCH_KAFKA_BOOTSTRAP", "LLMBATCH_SIMULATOR_URL")
TIERS = ("immediate", "peak", "offpeak", "background")
APP_SERVICES = ("migrate", "simulator", "batcher", "scheduler", "api", "flower", *(f"worker-{t}" for t in TIERS))


def _check_jsonschema() -> list[str]:
    exe = Path(sys.executable).with_name("check-jsonschema")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "check_jsonschema"]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_matches_compose_spec():
    proc = subprocess.run(
        [*_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_services(compose):
    expected = {"kafka", "postgres", "redis", "prometheus", "grafana", *APP_SERVICES}
    assert expected <= set(compose["services"])


def test_images(compose):
    s = compose["services"]
    assert s["kafka"]["image"].startswith("apache/kafka")
    assert s["postgres"]["image"].startswith("postgres:16")
    assert s["redis"]["image"].startswith("redis:7")
    assert (ROOT / "Dockerfile").is_file()
    for name in APP_SERVICES:
        assert s[name].get("build") is not None, name


def test_redis_never_evicts_and_persists(compose):
    cmd = " ".join(compose["services"]["redis"]["command"])
    assert "--maxmemory-policy noeviction" in cmd
    assert "--appendonly yes" in cmd


def test_app_environment_points_at_services(compose):
    for name in APP_SERVICES:
        env = compose["services"][name]["environment"]
        for key in APP_ENV:
            assert key in env, (name, key)
        assert "@postgres:" in env["LLMBATCH_DATABASE_URL"]
        assert env["LLMBATCH_REDIS_URL"].startswith("redis://:") and "@redis:" in env["LLMBATCH_REDIS_URL"]
        assert env["LLMBATCH_KAFKA_BOOTSTRAP"].startswith("kafka:")
        assert env["LLMBATCH_SIMULATOR_URL"].startswith("http://simulator:")


def test_workers_one_per_tier(compose):
    for tier in TIERS:
        cmd = compose["services"][f"worker-{tier}"]["command"]
        assert cmd[:2] == ["llmbatch", "worker"] and cmd[-2:] == ["--tier", tier]


def test_dependencies_have_conditions_and_healthchecks(compose):
    services = compose["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions"
        for dep, spec in deps.items():
            assert dep in services, (name, dep)
            cond = spec["condition"]
            assert cond in ("service_healthy", "service_completed_successfully", "service_started")
            if cond == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck"
    assert services["migrate"]["command"] == ["llmbatch", "db", "upgrade"]
    assert services["batcher"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_flower_basic_auth_from_env(compose):
    env = compose["services"]["flower"]["environment"]
    assert "${LLMBATCH_FLOWER_USER:?" in env["FLOWER_BASIC_AUTH"]
    assert "${LLMBATCH_FLOWER_PASSWORD:?" in env["FLOWER_BASIC_AUTH"]


def test_the_api_has_its_first_key_from_env_and_its_files_in_a_volume(compose):
    api = compose["services"]["api"]
    assert api["command"] == ["llmbatch", "api"]
    assert "${LLMBATCH_API_FIRST_KEY:?" in api["environment"]["LLMBATCH_API_FIRST_KEY"]
    assert api["environment"]["LLMBATCH_API_HOST"] == "0.0.0.0"
    assert any(v.startswith("api-files:") and v.endswith(api["environment"]["LLMBATCH_API_FILES_DIR"])
               for v in api["volumes"])
    assert "/readyz" in " ".join(api["healthcheck"]["test"])


def _interpolations(value: str) -> list[tuple[str, str, str]]:
    """(variable, operator, rest) of every ${...} in a Compose value."""
    return re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?+]?)([^}]*)\}", value)


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def test_no_password_has_a_default(compose):
    """Every password (and the secret half of each credential) must come from the environment:
    ``${VAR:?message}``, so compose refuses to start without it; never ``${VAR:-default}``
    and never a literal password in a URL."""
    secrets_seen = set()
    for value in _strings(compose["services"]):
        for var, op, _ in _interpolations(value):
            if "PASSWORD" in var or var.endswith(("_KEY", "_SECRET")):
                if var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
                    continue      # optional: without them the simulator answers
                assert op == ":?", f"${{{var}}} must be required (${{{var}:?...}}), not {op or 'plain'}"
                secrets_seen.add(var)
        for user, password in re.findall(r"://([^:/@]*):([^@/]*)@", value):
            assert password.startswith("${") and ":?" in password, f"literal password in {value!r}"
    assert {"LLMBATCH_DATABASE_PASSWORD", "LLMBATCH_READER_PASSWORD", "LLMBATCH_REDIS_PASSWORD",
            "LLMBATCH_FLOWER_PASSWORD", "LLMBATCH_GRAFANA_PASSWORD"} <= secrets_seen
    s = compose["services"]
    assert s["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${LLMBATCH_DATABASE_PASSWORD:?")
    assert s["postgres"]["environment"]["POSTGRES_HOST_AUTH_METHOD"] == "scram-sha-256"
    assert "requirepass" in " ".join(s["redis"]["command"])
    assert not any("trust" in v for v in _strings(s)), "a service trusts connections"


def test_the_stacks_secrets_file_has_every_variable_compose_requires(compose, tmp_path):
    """`docker compose --env-file var/secrets.env` works: the file the local stack generates
    defines every variable compose requires."""
    import os
    env = {**os.environ, "LLMBATCH_VAR_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "infra" / "stack.sh"), "secrets"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "secrets.env"
    assert path.stat().st_mode & 0o777 == 0o600
    defined = {line.split("=", 1)[0] for line in path.read_text().splitlines() if "=" in line
               and not line.startswith("#")}
    required = {var for value in _strings(compose["services"]) for var, op, _ in _interpolations(value)
                if op == ":?"}
    assert required <= defined, required - defined


def test_prometheus_config_exists(compose):
    vols = compose["services"]["prometheus"]["volumes"]
    assert any(v.startswith("./infra/prometheus.yml:") for v in vols)
    cfg = yaml.safe_load((ROOT / "infra" / "prometheus.yml").read_text())
    assert cfg["scrape_configs"]
