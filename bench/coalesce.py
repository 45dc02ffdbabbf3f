"""Single flight, measured (issue 21, item 3): repeats served without a provider call, as JSON.

Two scenarios against the stack, with the simulator answering in 100–500 ms so calls overlap:

- ``repeats``: one job of ``--lines`` (1,000) chat lines at temperature 0, of which ``--repeat``
  (20 %) are exact repeats of earlier lines, spread through the file (so a repeat is often in the
  same batch as its original, and often in flight at the same time);
- ``copies``: the same kind of file (fresh text) submitted twice at the same moment, by two
  submits running in parallel: two jobs whose every line has a twin in flight.

Figures per scenario, as measured: the provider's call count (the simulator's, from
``/_stats?key_prefix=JOB:``: the jobs' idempotency keys), the distinct requests, the requests
served without a provider call (``results.from_cache``) by lever (``coalesce``: an identical call
was in flight; ``cache``: its answer was already cached), and the jobs' spend against list price.
Targets: calls = distinct requests; served without a call = lines - distinct.

Usage: ``python bench/coalesce.py [--lines 1000] [--repeat 0.2]`` against ``make up`` (or a stack of
one's own: ``LLMBATCH_PORT_OFFSET`` / ``LLMBATCH_VAR_DIR``). Writes ``bench/results/coalesce.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS, simulator, submit, wait_job  # noqa: E402

from pipeline.config import get_settings  # noqa: E402
from pipeline.stores import db  # noqa: E402

MODEL = "gpt-4o-mini"


def write_file(path: Path, lines: int, repeat: float, seed: int) -> dict:
    """``lines`` chat lines at temperature 0; a share ``repeat`` of them repeat an earlier line's
    body exactly (under their own custom_id). Returns the file's counts."""
    rnd = random.Random(seed)
    nonce = uuid.uuid4().hex[:12]   # fresh text: no earlier run's answer is in the cache
    bodies: list[dict] = []
    repeats = 0
    with path.open("w") as f:
        for i in range(lines):
            if bodies and rnd.random() < repeat:
                body = bodies[max(0, len(bodies) - 1 - int(rnd.expovariate(1 / 40)))]   # mostly a recent one
                repeats += 1
            else:
                body = {"model": MODEL, "temperature": 0, "max_tokens": 16,
                        "messages": [{"role": "user", "content": f"Coalescing {nonce} line {i}: say a word."}]}
                bodies.append(body)
            f.write(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}) + "\n")
    return {"lines": lines, "distinct": len(bodies), "repeats": repeats}


def provider_calls(job: str) -> int:
    url = f"{get_settings().simulator_url}/_stats?" + urllib.parse.urlencode({"key_prefix": f"{job}:"})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)["keys"]["calls"]


def served(jobs: list[str]) -> dict:
    """What the jobs' results say: without a call by lever, spent and list price."""
    with db.get_engine().connect() as conn:
        by_lever = dict(conn.execute(sa.text(
            "SELECT coalesce(lever, 'none'), count(*) FROM results WHERE job_id = ANY(:j) AND from_cache"
            " GROUP BY 1"), {"j": jobs}).all())
        row = conn.execute(sa.text(
            "SELECT count(*), count(*) FILTER (WHERE NOT from_cache AND response IS NOT NULL),"
            " coalesce(sum(cost_usd), 0), coalesce(sum(coalesce(list_cost_usd, cost_usd)), 0)"
            " FROM results WHERE job_id = ANY(:j)"), {"j": jobs}).one()
    return {"results": row[0], "answered_by_a_call": row[1], "without_call": sum(by_lever.values()),
            "without_call_by_lever": by_lever, "cost_usd": str(row[2]), "list_cost_usd": str(row[3])}


def scenario_repeats(lines: int, repeat: float, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "repeats.jsonl"
        counts = write_file(path, lines, repeat, seed)
        started = time.monotonic()
        job = submit(path)["job_id"]
        state = wait_job(job, timeout=900)
    out = {"scenario": "repeats", **counts, "job": job, "state": state,
           "seconds": round(time.monotonic() - started, 1), "provider_calls": provider_calls(job), **served([job])}
    return _targets(out, counts["lines"], counts["distinct"])


def scenario_copies(lines: int, repeat: float, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "copy.jsonl"
        counts = write_file(path, lines, repeat, seed + 1)
        reports: list[dict] = []
        go = threading.Barrier(2)

        def one():
            go.wait()
            reports.append(submit(path))
        threads = [threading.Thread(target=one) for _ in range(2)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        jobs = [r["job_id"] for r in reports]
        states = [wait_job(j, timeout=900) for j in jobs]
    calls = sum(provider_calls(j) for j in jobs)
    out = {"scenario": "copies", "copies": 2, "lines": 2 * counts["lines"], "distinct": counts["distinct"],
           "repeats_in_each": counts["repeats"], "jobs": jobs, "states": states,
           "seconds": round(time.monotonic() - started, 1), "provider_calls": calls, **served(jobs)}
    return _targets(out, 2 * counts["lines"], counts["distinct"])


def _targets(out: dict, lines: int, distinct: int) -> dict:
    out["target"] = {"provider_calls": distinct, "without_call": lines - distinct}
    out["met"] = out["provider_calls"] == distinct and out["without_call"] == lines - distinct
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=1000)
    ap.add_argument("--repeat", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--only", choices=["repeats", "copies"])
    args = ap.parse_args()
    figures = []
    with simulator(latency="uniform", latency_ms=300, jitter_ms=200):
        for name, run in (("repeats", scenario_repeats), ("copies", scenario_copies)):
            if args.only in (None, name):
                figures.append(run(args.lines, args.repeat, args.seed))
                print(json.dumps(figures[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "coalesce.json").write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
