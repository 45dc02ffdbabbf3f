"""Immediate-tier added latency while a bulk job flows.

A bulk job (peak tier) is submitted; while it runs, a probe publishes one
immediate request (priority 9) every ``--interval`` seconds through the
service API (``publish_request``). For each probe:

    added latency = result row written − Kafka publish time − provider call time

(``results.created_at − requests.published_at − results.latency_ms``): the time
the pipeline adds on top of the provider. The provider call time is measured
by the worker around the SDK call, so it includes the client's own overhead.

    .venv/bin/python bench/latency.py --bulk 30000 --probes 150
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import sqlalchemy as sa

from common import save, simulator, submit, wait_job, write_requests
from pipeline.config import get_settings
from pipeline.intake.kafka import make_producer
from pipeline.intake.producer import publish_request
from pipeline.stores import db


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    k = max(0, min(len(values) - 1, round(p / 100 * (len(values) - 1))))
    return values[k]


def _spread(values: list[float]) -> dict | None:
    return {f"p{p}": round(_pct(values, p), 1) for p in (50, 90, 99)} if values else None


def run(bulk: int, probes: int, interval: float, latency_ms: float = 0.0) -> dict:
    settings = get_settings()
    probe_job = f"bench-immediate-{int(time.time())}"
    with tempfile.TemporaryDirectory() as tmp, simulator(latency_ms=latency_ms):
        path = write_requests(Path(tmp) / "bulk.jsonl", bulk, prefix=f"bulk-{int(time.time())}")
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(submit(path, name="bench-bulk")))
        t.start()
        time.sleep(1.0)   # let the bulk job get going
        producer = make_producer(settings)
        for i in range(probes):
            line = {"custom_id": f"probe-{i}", "method": "POST", "url": "/v1/chat/completions",
                    "priority": 9, "body": {"model": "gpt-4o-mini", "max_tokens": 8,
                                            "messages": [{"role": "user", "content": f"probe {i}"}]}}
            publish_request(line, job_id=probe_job, producer=producer, settings=settings)
            time.sleep(interval)
        t.join()
        engine = db.get_engine()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                done = conn.execute(sa.text("SELECT count(*) FROM results WHERE job_id = :j"),
                                    {"j": probe_job}).scalar()
            if done >= probes:
                break
            time.sleep(0.2)
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT extract(epoch FROM x.created_at - q.published_at) * 1000, x.latency_ms, q.tier,"
                " extract(epoch FROM q.created_at - q.published_at) * 1000,"
                " extract(epoch FROM q.started_at - q.created_at) * 1000"
                " FROM requests q JOIN results x USING (job_id, custom_id) WHERE q.job_id = :j"),
                {"j": probe_job}).all()
            bulk_during = conn.execute(sa.text(
                "SELECT count(*) FROM results WHERE job_id = :j AND created_at <= (SELECT max(created_at)"
                " FROM results WHERE job_id = :p)"), {"j": result["job_id"], "p": probe_job}).scalar()
        counts = wait_job(result["job_id"], timeout=600)
    added = [float(total) - float(lat or 0) for total, lat, _, _, _ in rows]
    to_row = [float(r[3]) for r in rows]
    to_start = [float(r[4]) for r in rows if r[4] is not None]
    after_start = [float(total) - float(lat or 0) - float(row) - float(start)
                   for total, lat, _, row, start in rows if start is not None]
    return save("latency", {
        "bulk_requests": bulk, "bulk_job": result["job_id"], "bulk_status": counts,
        "bulk_results_while_probing": bulk_during,
        "probes": probes, "probes_answered": len(rows), "probe_tiers": sorted({r[2] for r in rows}),
        "simulated_latency_ms": latency_ms,
        "added_latency_ms": {"p50": round(_pct(added, 50), 1), "p90": round(_pct(added, 90), 1),
                             "p99": round(_pct(added, 99), 1), "max": round(max(added), 1),
                             "mean": round(statistics.fmean(added), 1)} if added else None,
        "publish_to_request_row_ms": _spread(to_row),
        "request_row_to_started_ms": _spread(to_start),
        "started_to_result_row_less_provider_ms": _spread(after_start),
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bulk", type=int, default=30000)
    ap.add_argument("--probes", type=int, default=150)
    ap.add_argument("--interval", type=float, default=0.1)
    args = ap.parse_args()
    run(args.bulk, args.probes, args.interval)


if __name__ == "__main__":
    main()
