"""Submit and batcher rates, each measured alone.

The batcher is stopped; N lines are submitted (submit lines per second with
nothing else consuming); the batcher is started and drains the topic (batcher
messages per second = requests written / span of their ``created_at``); then
the job runs to the end so the next benchmark starts from a quiet stack.

    .venv/bin/python bench/batcher.py --requests 10000
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from common import ROOT, job_times, save, simulator, submit, wait_job, write_requests


def stack(*args: str) -> None:
    subprocess.run(["bash", str(ROOT / "infra" / "stack.sh"), *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def run(n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, simulator(latency_ms=0.0):
        path = write_requests(Path(tmp) / "drain.jsonl", n, prefix=f"drain-{int(time.time())}")
        stack("down", "batcher")
        try:
            sub = submit(path, name="bench-batcher")
        finally:
            stack("up", "batcher")
        counts = wait_job(sub["job_id"], timeout=900)
    times = job_times(sub["job_id"])
    return save("batcher", {
        "requests": n, "job": sub["job_id"], **counts,
        "submit_lines_per_s_alone": round(sub["lines"] / sub["seconds"], 1),
        "submit_peak_rss_mb": round(sub["peak_rss_mb"], 1),
        "batcher_messages_per_s": round(times["requests"] / times["requests_written_span_s"], 1)
        if times["requests_written_span_s"] else None,
        "batcher_span_s": round(times["requests_written_span_s"], 3),
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=10000)
    args = ap.parse_args()
    run(args.requests)


if __name__ == "__main__":
    main()
