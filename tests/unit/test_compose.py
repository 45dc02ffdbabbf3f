"""docker-compose.yml is valid Compose and runs the whole topology.

No Docker engine here: the file is checked against the Compose Specification
schema that check-jsonschema ships (offline), and its services are read.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
APP_ENV = ("LLMBATCH_DATABASE_URL", "LLMBATCH_REDIS_URL", "LLMBATCH_KAFKA_BOOTSTRAP", "LLMBATCH_SIMULATOR_URL")
TIERS = ("immediate", "peak", "offpeak", "background")
APP_SERVICES = ("migrate", "simulator", "batcher", "scheduler", "flower", *(f"worker-{t}" for t in TIERS))


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
        assert env["LLMBATCH_REDIS_URL"].startswith("redis://redis:")
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
    assert "LLMBATCH_FLOWER_USER" in env["FLOWER_BASIC_AUTH"]
    assert "LLMBATCH_FLOWER_PASSWORD" in env["FLOWER_BASIC_AUTH"]


def test_prometheus_config_exists(compose):
    vols = compose["services"]["prometheus"]["volumes"]
    assert any(v.startswith("./infra/prometheus.yml:") for v in vols)
    cfg = yaml.safe_load((ROOT / "infra" / "prometheus.yml").read_text())
    assert cfg["scrape_configs"]
