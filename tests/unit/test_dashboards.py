"""Every Grafana panel queries metrics the code exports, and Prometheus scrapes the right ports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from pipeline import metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "infra" / "grafana" / "dashboards").glob("*.json"))
# PromQL words that look like metric names but are functions, keywords or labels
_NOT_METRICS = {"sum", "by", "rate", "increase", "histogram_quantile", "max", "min", "avg", "clamp_min",
                "le", "tier", "model", "kind", "scope", "state", "status", "without", "on", "ignoring"}


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}", "", expr)   # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    return {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if w not in _NOT_METRICS
            and not re.fullmatch(r"e\d*", w)}


def _panels():
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            yield path.name, panel


def test_there_is_a_dashboard_with_the_promised_panels():
    assert DASHBOARDS, "no dashboard JSON in infra/grafana/dashboards"
    text = " ".join(p["title"].lower() for _, p in _panels())
    for topic in ("cost", "tokens", "queue depth", "latency", "budget", "cache hit rate"):
        assert topic in text, f"no panel about {topic}"


@pytest.mark.parametrize("dashboard,panel", list(_panels()), ids=lambda v: v if isinstance(v, str) else v["title"])
def test_every_panel_query_names_an_exported_metric(dashboard, panel):
    exported = metrics.exported_names()
    assert panel["targets"], f"{panel['title']}: no query"
    for target in panel["targets"]:
        names = _metric_names(target["expr"])
        assert names, f"{panel['title']}: no metric in {target['expr']!r}"
        unknown = {n for n in names if n.startswith("llmbatch_")} - exported
        assert not unknown, f"{panel['title']}: {sorted(unknown)} not exported by pipeline/metrics.py"
        assert all(n.startswith("llmbatch_") for n in names), f"{panel['title']}: {names}"


def test_the_checker_itself_rejects_a_made_up_metric():
    assert "llmbatch_made_up_total" not in metrics.exported_names()
    assert _metric_names("sum by (tier) (rate(llmbatch_made_up_total{tier=\"x\"}[5m]))") == {"llmbatch_made_up_total"}


def test_every_exported_name_is_prefixed():
    assert all(n.startswith("llmbatch_") for n in metrics.exported_names())


def test_prometheus_scrapes_the_ports_the_processes_listen_on():
    conf = yaml.safe_load((ROOT / "infra" / "prometheus.yml").read_text())
    targets = {t for job in conf["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    for role, offset in metrics.ROLE_PORT_OFFSET.items():
        assert f"{role}:{9100 + offset}" in targets, f"prometheus.yml does not scrape {role} on {9100 + offset}"


def test_grafana_is_provisioned_in_compose():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    volumes = " ".join(compose["services"]["grafana"]["volumes"])
    assert "infra/grafana/provisioning" in volumes and "infra/grafana/dashboards" in volumes
