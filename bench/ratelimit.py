"""Latency-bound throughput: 1 s simulated latency, a limit of 6,000 requests per minute.

The limit is the simulator's (``rpm``), as a provider's would be, and the
pipeline is given none of its own (``rate_limits`` empty): the figure is
what in-flight capacity alone achieves at this latency; ``limits.py`` measures
the pipeline's own limiter against the same limit. The figure is the best 60-second window
of successful results as a share of the limit (the simulator's window is
sliding, so a fresh window lets a burst through at the start; the best window
cannot exceed the limit), plus the whole job's average rate.

    .venv/bin/python bench/ratelimit.py --requests 8000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from common import best_window, job_times, save, sim_stats, simulator, submit, wait_job, write_requests
from pipeline.stores import db


def run(n: int, rpm: int = 6000, latency_ms: float = 1000.0) -> dict:
    with tempfile.TemporaryDirectory() as tmp, simulator(latency_ms=latency_ms, rpm=rpm):
        path = write_requests(Path(tmp) / "rl.jsonl", n, prefix=f"rl-{int(time.time())}")
        sub = submit(path, name="bench-ratelimit")
        counts = wait_job(sub["job_id"], timeout=900)
        stats = sim_stats()["total"]
    with db.get_engine().connect() as conn:
        finished = [float(t) for t in conn.execute(sa.text(
            "SELECT extract(epoch FROM created_at) FROM results WHERE job_id = :j AND status_code = 200"),
            {"j": sub["job_id"]}).scalars()]
    times = job_times(sub["job_id"])
    best = best_window(finished, 60.0)
    return save("ratelimit", {
        "requests": n, "limit_rpm": rpm, "simulated_latency_ms": latency_ms,
        "limit_enforced_by": "simulator rpm (no rate_limits configured in the pipeline)",
        "job": sub["job_id"], **counts,
        "best_60s_successes": best, "best_60s_ratio_of_limit": round(best / rpm, 3),
        "job_seconds": round(times["to_last_result_s"], 1),
        "job_average_ratio_of_limit": round(n / times["to_last_result_s"] * 60 / rpm, 3),
        "provider_429s": stats["errors"].get("429", 0), "provider_requests": stats["requests"],
        "provider_peak_concurrency": stats["peak_concurrency"],
        "provider_peak_requests_60s": stats["peak_requests_60s"], "provider_duplicates": stats["duplicates"],
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=8000)
    ap.add_argument("--rpm", type=int, default=6000)
    args = ap.parse_args()
    run(args.requests, args.rpm)


if __name__ == "__main__":
    main()
