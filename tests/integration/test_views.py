"""What users see, against the real stack: views, the read-only role, CLI read commands, /metrics."""

from __future__ import annotations

import json
import urllib.request

import psycopg
import pytest
import sqlalchemy as sa

from pipeline import metrics
from tests.integration.conftest import chat_line, llmbatch, write_jsonl

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def job(stack, tmp_path_factory):
    """A finished job: 30 lines over two models in peak and immediate, one bad line."""
    path = tmp_path_factory.mktemp("views") / "job.jsonl"
    lines = [chat_line(f"v{i:03d}", f"views test line {i}", model="gpt-4o" if i % 3 == 0 else "gpt-4o-mini",
                       priority=9 if i % 4 == 0 else 6) for i in range(30)]
    write_jsonl(path, [*lines, "{not json"])
    proc = llmbatch("submit", path, "--budget-usd", "2", "--wait", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])["job_id"]


def test_job_summary_and_new_views(engine, job):
    with engine.connect() as conn:
        s = conn.execute(sa.text("SELECT * FROM job_summary WHERE job_id = :j"), {"j": job}).mappings().one()
        assert (s["accepted"], s["rejected"], s["succeeded"], s["pending"]) == (30, 1, 30, 0)
        assert (s["queued"], s["held"], s["running"], s["deferred"]) == (0, 0, 0, 0)
        assert s["budget_usd"] == 2 and s["cost_usd"] > 0
        day = conn.execute(sa.text(
            "SELECT sum(requests), sum(cost_usd) FROM cost_daily WHERE day = current_date AT TIME ZONE 'UTC'"
            " OR day = (now() AT TIME ZONE 'UTC')::date")).one()
        assert day[0] >= 30 and day[1] >= s["cost_usd"]
        tiers = {r.tier for r in conn.execute(sa.text(
            "SELECT tier FROM tier_latency WHERE hour >= date_trunc('hour', now()) - interval '1 hour'"))}
        assert {"peak", "immediate"} <= tiers
        lat = conn.execute(sa.text(
            "SELECT queue_wait_p50_s, queue_wait_p95_s, latency_p50_ms, latency_p95_ms FROM tier_latency"
            " WHERE tier = 'peak' ORDER BY hour DESC LIMIT 1")).one()
        assert lat[0] is not None and lat[1] >= lat[0] and lat[3] >= lat[2] > 0
        rejected = conn.execute(sa.text("SELECT line, reason FROM rejections WHERE job_id = :j"), {"j": job}).all()
        assert [r.line for r in rejected] == [31]


def test_reader_role_reads_but_cannot_write(stack, job):
    url = stack.reader_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM job_summary WHERE job_id = %s", (job,)).fetchone()[0] == 1
        conn.rollback()
        # even in an explicitly read-write transaction the grants refuse
        conn.execute("SET TRANSACTION READ WRITE")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO jobs (job_id) VALUES ('reader-was-here')")
        conn.rollback()
        conn.execute("SET TRANSACTION READ WRITE")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE reader_table (x int)")


def test_sql_command_answers_documented_queries_and_refuses_writes(job):
    proc = llmbatch("sql", "-f", "sql/queries/recent_jobs.sql")
    assert proc.returncode == 0, proc.stderr
    assert job in proc.stdout and "succeeded" in proc.stdout.splitlines()[0]
    for name in ("cost_by_model_7d", "tier_latency_24h", "failures_by_reason", "rejected_lines",
                 "retries_and_429s"):
        p = llmbatch("sql", "-f", f"sql/queries/{name}.sql", "--json")
        assert p.returncode == 0, (name, p.stderr)
    bad = llmbatch("sql", f"DELETE FROM jobs WHERE job_id = '{job}'")
    assert bad.returncode == 1 and ("read-only" in bad.stderr or "permission denied" in bad.stderr)


def test_status_jobs_results_report(job, tmp_path):
    st = json.loads(llmbatch("status", job, "--json", check=True).stdout)
    assert st["by_tier"]["peak"]["done"] + st["by_tier"]["immediate"]["done"] == 30
    assert st["budget_usd"].startswith("2") and st["eta_s"] == 0
    watch = llmbatch("status", job, "--watch", "--interval", "0.2", timeout=30)
    assert watch.returncode == 0 and "completed" in watch.stdout and "\x1b" not in watch.stdout
    listed = [json.loads(x) for x in llmbatch("jobs", "--since", "1h", "--json", check=True).stdout.splitlines()]
    assert job in {j["job_id"] for j in listed}
    out = tmp_path / "r.jsonl"
    llmbatch("results", job, "--format", "anthropic", "-o", out, check=True)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 30 and all(x["result"]["type"] == "succeeded" for x in lines)
    assert lines[0]["result"]["message"]["content"][0]["type"] == "text"
    csv_out = llmbatch("results", job, "--format", "csv", check=True).stdout.splitlines()
    assert csv_out[0].startswith("custom_id,line,status") and len(csv_out) == 31
    chart = tmp_path / "cost.png"
    rep = llmbatch("report", job, "--chart", chart, check=True)
    assert "total" in rep.stdout and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_worker_metrics_endpoint_counts_the_job(stack, job):
    port = metrics.port_for("worker-peak", stack)
    text = urllib.request.urlopen(f"http://{stack.metrics_host}:{port}/metrics", timeout=5).read().decode()
    assert 'llmbatch_requests_total{model="gpt-4o-mini",status="succeeded",tier="peak"}' in text
    assert "llmbatch_cost_usd_total" in text and "llmbatch_provider_latency_seconds_bucket" in text
    batcher = urllib.request.urlopen(f"http://{stack.metrics_host}:{metrics.port_for('batcher', stack)}/metrics",
                                     timeout=5).read().decode()
    assert 'llmbatch_queue_depth{state="queued",tier="peak"}' in batcher
    assert 'llmbatch_kafka_consumer_lag{partition="' in batcher


def test_flower_requires_credentials(stack):
    import urllib.error
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(stack.flower_url + "/", timeout=5)
    assert e.value.code == 401
