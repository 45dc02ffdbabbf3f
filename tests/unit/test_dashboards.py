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
                "le", "tier", "model", "lever", "kind", "scope", "state", "status", "without", "on", "ignoring"}


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


# ------------------------------------------------------------------ issue 15: honest metrics

def test_budget_alert_exists_and_counts():
    before = metrics.REGISTRY.get_sample_value("llmbatch_budget_alerts_total", {"scope": "tier", "threshold": "100"})
    metrics.budget_alert("tier", 100)
    after = metrics.REGISTRY.get_sample_value("llmbatch_budget_alerts_total", {"scope": "tier", "threshold": "100"})
    assert after == (before or 0) + 1


def test_cache_counters_follow_the_batchers_stats():
    stats = {"cache_hits": 7, "cache_misses": 3}
    metrics.count_cache_from(stats)
    assert metrics.REGISTRY.get_sample_value("llmbatch_cache_hits_total") == 7
    stats["cache_hits"] += 2
    assert metrics.REGISTRY.get_sample_value("llmbatch_cache_hits_total") == 9
    assert metrics.REGISTRY.get_sample_value("llmbatch_cache_misses_total") == 3


def test_every_name_the_readme_promises_is_exported():
    readme = (ROOT / "docs" / "OPERATIONS.md").read_text()   # the README links the metrics from there
    section = readme.split("## Metrics, logs, Flower, Grafana", 1)[1].split("\n## ", 1)[0]
    promised = set(re.findall(r"`([a-z_0-9]+)(?:\{[^}]*\})?`", section.split("Logs:", 1)[0]))
    promised = {n if n.startswith("llmbatch_") else f"llmbatch_{n}" for n in promised
                if not n.isupper() and "/" not in n and n not in {"metrics", "llmbatch_"}}
    promised -= {"llmbatch_simulator_requests_total", "llmbatch_simulator_errors_total"}   # the simulator's own
    exported = metrics.exported_names()
    missing = {n for n in promised if n not in exported and f"{n}_bucket" not in exported}
    assert not missing, f"README names metrics the code does not export: {sorted(missing)}"


def test_the_window_collector_says_open_and_next_change():
    from datetime import datetime, timezone

    from pipeline.intake.windows import Window
    w = Window("0 22 * * *", "0 6 * * *")
    at = datetime(2026, 12, 1, 20, 8, tzinfo=timezone.utc)
    families = {f.name: f for f in metrics.WindowCollector(w.is_open, w.next_change, lambda: at).collect()}
    assert families["llmbatch_offpeak_window_open"].samples[0].value == 0
    nxt = families["llmbatch_offpeak_window_next_change_timestamp_seconds"].samples[0].value
    assert nxt == datetime(2026, 12, 1, 22, tzinfo=timezone.utc).timestamp()


def test_the_simulator_serves_metrics():
    import asyncio
    import urllib.request

    from simulator import SimulatorConfig
    from simulator.server import start

    async def run():
        runner, url = await start(SimulatorConfig(host="127.0.0.1", port=0))
        try:
            return await asyncio.to_thread(lambda: urllib.request.urlopen(f"{url}/metrics", timeout=5))
        finally:
            await runner.cleanup()
    resp = asyncio.run(run())
    body = resp.read().decode()
    assert resp.status == 200 and "llmbatch_simulator_in_flight 0" in body
    from prometheus_client.parser import text_string_to_metric_families
    assert {f.name for f in text_string_to_metric_families(body)} >= {"llmbatch_simulator_in_flight"}
