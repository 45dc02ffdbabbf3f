"""End-to-end throughput, side by side with a plain asyncio client, at zero simulated latency.

1. the plain client (bench/plain_client.py, its own process) sends the N
   requests of the file straight to the simulator;
2. the pipeline gets the same file: ``submit_file`` (in its own process) →
   Kafka → batcher → Postgres → Celery workers → simulator → Postgres; the
   time is submit start → the job's last result row committed;
3. the ratio pipeline / plain is the headline figure, in throughput and in CPU
   per request.

CPU (bench/cpu.py, from /proc, before and after each run): seconds per 1,000
requests of every stack process (Kafka, the batcher, each worker tier's parent
and pool processes, the Postgres postmaster and backends, Redis, the simulator,
the scheduler, ...) and of submit / the plain client, beside the machine-wide
busy time. The plain client's figure is its own process plus the simulator's;
the pipeline's is every stack process (simulator included) plus submit. Both
are also given without the simulator.

Also reported: submit lines per second (while the rest of the pipeline runs)
and the provider's view (simulator ``/_stats``: peak concurrency, duplicates).

    .venv/bin/python bench/e2e.py --requests 20000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from common import PY, ROOT, job_times, restarted, save, sim_stats, simulator, submit, wait_job, write_requests
from cpu import Meter, sum_of
from pipeline.config import get_settings
from pipeline.stores import db

SIMULATOR = "simulator"


def meter(label: str) -> Meter:
    return Meter(get_settings().var_dir / "run", bench_children=label)


def client(label: str, argv: list[str], *, env: dict | None = None) -> dict:
    """Run a one-process client over the file (it prints one JSON line); its CPU and the
    simulator's make its CPU per request."""
    with meter(label) as m:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode:
        raise SystemExit(f"{label} failed: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    cpu = m.result(out["requests"])
    out["cpu"] = cpu
    out["cpu_s_per_1000"] = sum_of(cpu, [label, SIMULATOR])
    out["cpu_s_per_1000_without_simulator"] = sum_of(cpu, [label])
    return out


def plain(path: Path, concurrency: int) -> dict:
    return client("plain_client", [PY, str(ROOT / "bench" / "plain_client.py"), str(path),
                                   "--concurrency", str(concurrency)])


def pipeline(path: Path, n: int, timeout: float) -> dict:
    started = time.monotonic()
    with meter("submit") as m:
        sub = submit(path, name="bench-e2e")
        counts = wait_job(sub["job_id"], timeout=timeout)
    polled = time.monotonic() - started
    cpu = m.result(n)
    times = job_times(sub["job_id"])
    stats = sim_stats()["total"]
    with db.get_engine().connect() as conn:
        marks = conn.execute(sa.text(
            "SELECT percentile_cont(ARRAY[0.5, 0.9, 0.98, 1.0]) WITHIN GROUP (ORDER BY"
            " extract(epoch FROM x.created_at - j.created_at)) FROM results x JOIN jobs j USING (job_id)"
            " WHERE x.job_id = :j"), {"j": sub["job_id"]}).scalar()
        deferred = conn.execute(sa.text(
            "SELECT count(DISTINCT custom_id) FROM attempts WHERE job_id = :j AND attempt > 1"),
            {"j": sub["job_id"]}).scalar()
    return {
        "job_id": sub["job_id"], **counts,
        "submit_seconds": round(sub["seconds"], 3),
        "submit_lines_per_s": round(sub["lines"] / sub["seconds"], 1),
        "submit_peak_rss_mb": round(sub["peak_rss_mb"], 1),
        "end_to_end_seconds": round(times["to_last_result_s"], 3),
        "end_to_end_requests_per_s": round(n / times["to_last_result_s"], 1),
        "observed_seconds": round(polled, 3),
        # when 50/90/98/100 % of the results were written: a long tail means some requests
        # waited (deferred, retried, re-dispatched) after the bulk was done
        "results_written_by_s": dict(zip(("p50", "p90", "p98", "p100"), (round(float(m), 2) for m in marks))),
        "requests_per_s_to_98pct": round(0.98 * n / float(marks[2]), 1),
        "requests_with_retries": deferred,
        "provider_requests": stats["requests"], "provider_peak_concurrency": stats["peak_concurrency"],
        "provider_duplicates": stats["duplicates"],
        "cpu": cpu,
        "cpu_s_per_1000": cpu["total_cpu_s_per_1000"],
        "cpu_s_per_1000_without_simulator": sum_of(cpu, [SIMULATOR], exclude=True),
    }


def run(n: int, concurrency: int = 128, timeout: float = 600, worker_env: dict | None = None) -> dict:
    """``worker_env``: LLMBATCH_* settings the peak worker is restarted with for the pipeline's run
    (restored after), e.g. the other value of a setting to compare."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_requests(Path(tmp) / "e2e.jsonl", n, prefix=f"e2e-{int(time.time())}")
        with simulator(latency_ms=0.0):
            base = plain(path, concurrency)
        with (restarted("worker-peak", **worker_env) if worker_env else contextlib.nullcontext()), \
                simulator(latency_ms=0.0):
            pipe = pipeline(path, n, timeout)
    return save("e2e", {
        "requests": n, "simulated_latency_ms": 0, **({"worker_env": worker_env} if worker_env else {}),
        "plain_client": base, "pipeline": pipe,
        "ratio_pipeline_to_plain": round(pipe["end_to_end_requests_per_s"] / base["requests_per_s"], 3),
        **cpu_ratios(pipe, base, "plain"),
    })


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def cpu_ratios(pipe: dict, base: dict, name: str) -> dict:
    """Pipeline ÷ a client in CPU seconds per request: process accounting (with and without
    the simulator) and the machine's busy time."""
    return {
        f"cpu_ratio_pipeline_to_{name}": ratio(pipe["cpu_s_per_1000"], base["cpu_s_per_1000"]),
        f"cpu_ratio_pipeline_to_{name}_without_simulator": ratio(
            pipe["cpu_s_per_1000_without_simulator"], base["cpu_s_per_1000_without_simulator"]),
        f"machine_cpu_ratio_pipeline_to_{name}": ratio(pipe["cpu"]["machine_busy_cpu_s_per_1000"],
                                                       base["cpu"]["machine_busy_cpu_s_per_1000"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=128, help="the plain client's semaphore")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--worker-env", action="append", default=[], metavar="LLMBATCH_NAME=VALUE",
                    help="restart the peak worker with this setting for the pipeline's run (repeatable)")
    args = ap.parse_args()
    run(args.requests, args.concurrency, args.timeout, dict(kv.split("=", 1) for kv in args.worker_env))


if __name__ == "__main__":
    main()
