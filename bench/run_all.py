"""All benchmarks in one run (``make bench``), then one summary table.

Order: end-to-end side by side (zero latency, 20,000 requests, CPU per
process), the peer side by side (LiteLLM's Router, 10,000 requests; ``--no-peers``
skips it), batcher and submit rates, latency-bound throughput (1 s, 6,000 rpm), immediate-tier added
latency under a bulk job, and the peak memory of every stack process. Writes
bench/results/*.json and bench/results/summary.json; prints JSON lines.

The machine is shared and small: figures are noisy; the ratio to the plain
client, measured in the same run, is the figure to compare across runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import batcher
import e2e
import latency
import peers
import ratelimit
from common import LLMBATCH, ROOT, save
from cpu import peak_memory
from pipeline.config import get_settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=20000, help="end-to-end benchmark size")
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the harness")
    ap.add_argument("--peer-requests", type=int, default=10000, help="peers.py size")
    ap.add_argument("--no-peers", action="store_true", help="skip LiteLLM (it installs into var/peers on first use)")
    args = ap.parse_args()
    q = args.quick
    started = time.monotonic()
    subprocess.run([LLMBATCH, "db", "upgrade"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    r_e2e = e2e.run(2000 if q else args.requests)
    r_peer = None if args.no_peers else peers.run(1000 if q else args.peer_requests)
    r_bat = batcher.run(2000 if q else 10000)
    r_rl = ratelimit.run(1000 if q else 8000, rpm=600 if q else 6000)
    r_lat = latency.run(1000 if q else 30000, 30 if q else 150, 0.1)   # bulk outlasts the probes
    mem = save("memory", {"processes": peak_memory(get_settings().var_dir / "run")})
    summary = {
        "e2e_requests": r_e2e["requests"],
        "plain_client_requests_per_s": r_e2e["plain_client"]["requests_per_s"],
        "pipeline_end_to_end_requests_per_s": r_e2e["pipeline"]["end_to_end_requests_per_s"],
        "ratio_pipeline_to_plain": r_e2e["ratio_pipeline_to_plain"],
        "plain_client_cpu_s_per_1000": r_e2e["plain_client"]["cpu_s_per_1000"],
        "pipeline_cpu_s_per_1000": r_e2e["pipeline"]["cpu_s_per_1000"],
        "cpu_ratio_pipeline_to_plain": r_e2e["cpu_ratio_pipeline_to_plain"],
        "cpu_ratio_pipeline_to_plain_without_simulator": r_e2e["cpu_ratio_pipeline_to_plain_without_simulator"],
        "machine_cpu_ratio_pipeline_to_plain": r_e2e["machine_cpu_ratio_pipeline_to_plain"],
        "pipeline_cpu_s_per_1000_by_process": {k: v["cpu_s_per_1000"]
                                               for k, v in r_e2e["pipeline"]["cpu"]["processes"].items()},
        "pipeline_requests_per_s_to_98pct": r_e2e["pipeline"]["requests_per_s_to_98pct"],
        "ratio_to_plain_at_98pct": round(r_e2e["pipeline"]["requests_per_s_to_98pct"]
                                         / r_e2e["plain_client"]["requests_per_s"], 3),
        **({"peers": r_peer["summary"]} if r_peer else {}),
        "submit_lines_per_s_alone": r_bat["submit_lines_per_s_alone"],
        "submit_lines_per_s_under_load": r_e2e["pipeline"]["submit_lines_per_s"],
        "batcher_messages_per_s": r_bat["batcher_messages_per_s"],
        "latency_bound_best_60s_ratio_of_limit": r_rl["best_60s_ratio_of_limit"],
        "latency_bound_job_average_ratio_of_limit": r_rl["job_average_ratio_of_limit"],
        "immediate_added_latency_ms": r_lat["added_latency_ms"],
        "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in mem["processes"].items()},
        "plain_client_peak_rss_mb": r_e2e["plain_client"]["peak_rss_mb"],
        "submit_peak_rss_mb": r_e2e["pipeline"]["submit_peak_rss_mb"],
        "bench_seconds": round(time.monotonic() - started, 1),
    }
    save("summary", summary)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "bench"))
    main()
