"""Every metric a Grafana panel queries has data on the endpoints Prometheus scrapes, after a
small job ran through the live stack; every scraped endpoint answers (issue 15).

No Prometheus server: the panels' PromQL is parsed for metric names and each
name must have at least one sample on some /metrics endpoint of the stack.
"""

from __future__ import annotations

import base64
import json
import urllib.request

import pytest

from prometheus_client.parser import text_string_to_metric_families

from pipeline import metrics
from tests.integration.conftest import chat_line, llmbatch, wait_for, write_jsonl
from tests.unit.test_dashboards import _metric_names, _panels

ROLES = tuple(metrics.ROLE_PORT_OFFSET)


def _scrape(url: str) -> dict[str, list]:
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def _endpoints(settings) -> dict[str, str]:
    urls = {role: f"http://{settings.metrics_host}:{metrics.port_for(role, settings)}/metrics" for role in ROLES}
    urls["simulator"] = f"{settings.simulator_url}/metrics"
    return urls


@pytest.fixture
def window_closed(stack):
    """The scheduler's clock (the db clock) at 20:08 UTC: off-peak work stays held during the test."""
    from datetime import datetime, timezone

    from schedules.clock import DbClock
    clock = DbClock()
    clock.set(datetime.now(timezone.utc).replace(hour=20, minute=8, second=0, microsecond=0))
    yield
    clock.reset()


def test_every_panel_has_data_after_a_job(stack, tmp_path, window_closed):
    # temperature 0: the second run is answered from the cache; a job cap gives a budget scope
    lines = [dict(chat_line(f"m{i}", f"metrics question {i}", priority=6),
                  body={"model": "gpt-4o-mini", "max_tokens": 8, "temperature": 0,
                        "messages": [{"role": "user", "content": f"metrics question {i}"}]}) for i in range(6)]
    path = write_jsonl(tmp_path / "metrics.jsonl", lines)
    first = llmbatch("submit", "--mode", "realtime", path, "--wait", "--budget-usd", "5", timeout=300)
    assert first.returncode == 0, first.stderr
    second = llmbatch("submit", "--mode", "realtime", path, "--wait", timeout=300)
    assert second.returncode == 0, second.stderr
    held = llmbatch("submit", "--mode", "realtime", write_jsonl(tmp_path / "held.jsonl", [chat_line("h", "later", tier="offpeak")]),
                    "--budget-usd", "1")
    job_held = held.stdout.strip().splitlines()[-1]
    try:
        urls = _endpoints(stack)

        def all_answer():
            got = {}
            for name, url in urls.items():
                try:
                    got[name] = _scrape(url)
                except OSError as e:
                    got[name] = e
            return got
        scraped = wait_for(lambda: (s := all_answer()) and all(isinstance(v, dict) and v for v in s.values()) and s,
                           timeout=60, every=1, what="every endpoint answers with samples")
        for name, samples in scraped.items():
            print(f"{name}: {len(samples)} sample names")

        def names_with_data():
            got = {}
            for name, url in urls.items():
                for sample_name, samples in _scrape(url).items():
                    got.setdefault(sample_name, []).extend(samples)
            return got
        wanted = {}
        for _, panel in _panels():
            for target in panel["targets"]:
                for n in _metric_names(target["expr"]):
                    wanted.setdefault(n, []).append(panel["title"])
        # the batcher reads its gauges from Postgres every few seconds: poll, do not sleep
        last: dict = {}

        def complete():
            last.update(names_with_data())
            return all(last.get(n) for n in wanted) and dict(last)
        try:
            have = wait_for(complete, timeout=90, every=2, what="every panel's metric has data")
        except AssertionError:
            raise AssertionError(f"no data for {sorted(n for n in wanted if not last.get(n))}") from None
        for n, titles in sorted(wanted.items()):
            print(f"{n}: {len(have[n])} samples  ({'; '.join(sorted(set(titles)))})")
        hits = sum(s.value for s in have["llmbatch_cache_hits_total"])
        assert hits >= 6, "the second run was answered from the cache"
        scopes = {s.labels["scope"] for s in have["llmbatch_budget_remaining_usd"]}
        assert f"job:{job_held}" in scopes
        assert have["llmbatch_offpeak_window_open"]
        assert have["llmbatch_simulator_requests_total"]
    finally:
        llmbatch("cancel", job_held)


def test_budget_alert_is_a_metric(stack):
    before = metrics.REGISTRY.get_sample_value("llmbatch_budget_alerts_total", {"scope": "job", "threshold": "80"}) or 0
    metrics.budget_alert("job", 80)
    assert metrics.REGISTRY.get_sample_value("llmbatch_budget_alerts_total",
                                             {"scope": "job", "threshold": "80"}) == before + 1


def test_status_json_says_nothing_held_for_a_finished_job(stack, tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [chat_line("a", "x", priority=6)])
    proc = llmbatch("submit", "--mode", "realtime", path, "--wait", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    st = json.loads(llmbatch("status", json.loads(proc.stdout)["job_id"], "--json").stdout)
    assert st["held"] == [] and "E-" not in st["cost_usd"]


def test_tier_latency_leaves_cache_hits_out_of_the_percentiles(stack, engine, tmp_path):
    import sqlalchemy as sa
    lines = [dict(chat_line(f"c{i}", f"latency question {i}", priority=6),
                  body={"model": "gpt-4o-mini", "max_tokens": 8, "temperature": 0,
                        "messages": [{"role": "user", "content": f"tier latency cache {i} {tmp_path.name}"}]})
             for i in range(4)]
    path = write_jsonl(tmp_path / "lat.jsonl", lines)
    for _ in range(2):   # the second run is answered from the cache: 0 ms each
        proc = llmbatch("submit", "--mode", "realtime", path, "--wait", timeout=300)
        assert proc.returncode == 0, proc.stderr
    with engine.connect() as conn:
        hits, zero_latency = conn.execute(sa.text(
            "SELECT coalesce(sum(cache_hits), 0), count(*) FILTER (WHERE latency_p50_ms = 0)"
            " FROM tier_latency WHERE hour >= date_trunc('hour', now()) - interval '1 hour'")).one()
    assert hits >= 4 and zero_latency == 0


def _flower_tasks(stack) -> dict:
    auth = base64.b64encode(f"{stack.flower_user}:{stack.flower_password.reveal()}".encode()).decode()
    req = urllib.request.Request(stack.flower_url + "/api/tasks?taskname=llmbatch.execute_batch&limit=1000",
                                 headers={"Authorization": "Basic " + auth})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_flower_shows_each_batch_with_its_job_and_tier(stack, tmp_path):
    """Flower's task list names the job and tier of every batch the batcher sends, not a bare id."""
    path = write_jsonl(tmp_path / "flower.jsonl", [chat_line(f"f{i}", f"flower {i}") for i in range(3)])
    job = json.loads(llmbatch("submit", "--mode", "realtime", path, "--tier", "peak", "--wait", "--json", timeout=300,
                              check=True).stdout)["job_id"]

    def labelled():
        return [t for t in _flower_tasks(stack).values() if job in (t.get("kwargs") or "")]
    tasks = wait_for(labelled, 60, what=f"a Flower task whose kwargs name {job}")
    assert all("'tier': 'peak'" in t["kwargs"] for t in tasks), [t["kwargs"] for t in tasks]
