"""End-to-end throughput: submit N requests, wait for the last result in Postgres.

Measures submit start → job completed (its last result committed), against the
simulator at whatever latency it runs with (``make up`` starts it at zero).
Prints JSON and writes bench/results/e2e.json.

    .venv/bin/python bench/e2e.py --requests 5000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from pipeline import db
from pipeline.config import get_settings
from pipeline.producer import submit_file

RESULTS = Path(__file__).parent / "results"


def make_file(path: Path, n: int, model: str, priority: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({
                "custom_id": f"bench-{i}", "method": "POST", "url": "/v1/chat/completions", "priority": priority,
                "body": {"model": model, "max_tokens": 16,
                         "messages": [{"role": "user", "content": f"Benchmark request {i}: say something short."}]},
            }) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--model", default="gpt-4o-mini")
    ap.add_argument("--priority", type=int, default=5, help="5 = peak tier, 8 = immediate")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = make_file(Path(tmp) / "bench.jsonl", args.requests, args.model, args.priority)
        started = time.monotonic()
        report = submit_file(path, name="bench-e2e")
        submitted = time.monotonic() - started
    engine = db.get_engine()
    while True:
        with engine.connect() as conn:
            status = db.job_status(conn, report.job_id)
        if status["status"] == "completed":
            break
        if time.monotonic() - started > args.timeout:
            raise SystemExit(f"timed out: {status}")
        time.sleep(0.1)
    with engine.connect() as conn:
        wall = conn.execute(sa.text(
            "SELECT extract(epoch FROM max(r.created_at) - j.created_at) FROM results r"
            " JOIN jobs j USING (job_id) WHERE job_id = :j GROUP BY j.created_at"), {"j": report.job_id}).scalar()
    out = {
        "benchmark": "e2e",
        "requests": args.requests,
        "succeeded": status["counts"]["succeeded"],
        "submit_seconds": round(submitted, 3),
        "submit_lines_per_s": round(args.requests / submitted, 1),
        "end_to_end_seconds": round(float(wall), 3),
        "end_to_end_requests_per_s": round(args.requests / float(wall), 1),
        "provider": "simulator" if get_settings().simulated else "live",
        "job_id": report.job_id,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "e2e.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
