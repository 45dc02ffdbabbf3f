"""A 120,000-line job split under both providers' Batch API limits (issue 21, item 2), measured.

Two jobs of ``--lines`` (120,000) lines each, ``--mode provider_batch``, background tier: one to
OpenAI (gpt-4o-mini: at most 50,000 requests and 200 MB per batch), one to Anthropic
(claude-haiku-4-5: 100,000 requests or 256 MB). The scheduler is stopped while the jobs are
submitted and started once every line is held, so the split shown is of the whole job (running,
the scheduler sends each tick what the batcher has written by then, in as many batches).

Printed per provider: the provider batches (lines, bytes, status), against the limits the
pipeline applies (settings ``provider_batch_max_requests`` / ``_max_bytes`` and the price book's
``batch_limits``); the simulator's Batch API lines billed (each line once); and the time from the
scheduler's start to both jobs completed, as measured on this machine (under load, niced). The
simulator's Batch API turnaround is its ``batch_processing_s`` (2 s by default) plus the time it
takes to answer each line, not 24 h.

Usage: ``python bench/pb_split.py [--lines 120000]`` against ``make up``. Writes
bench/results/pb_split.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import save, sim_stats, stack_sh, submit, wait_job  # noqa: E402

from pipeline.config import get_settings  # noqa: E402
from pipeline.stores import db  # noqa: E402
from schedules.pb_submit import _limits  # noqa: E402

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}


def lines(provider: str, n: int, tag: str):
    model = MODELS[provider]
    for i in range(n):
        text = f"Split {tag} line {i}: classify the sentiment of review {i * 7919 % 100_003}."
        if provider == "anthropic":
            yield {"custom_id": f"a{i:06d}", "params": {"model": model, "max_tokens": 8,
                                                         "messages": [{"role": "user", "content": text}]}}
        else:
            yield {"custom_id": f"o{i:06d}", "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": text}]}}


def held(job_id: str) -> int:
    with db.get_engine().connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM requests WHERE job_id = :j AND status = 'held'"),
                            {"j": job_id}).scalar()


def provider_batches(job_ids: list[str]) -> list[dict]:
    with db.get_engine().connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(
            "SELECT pb.id, pb.provider, pb.model, pb.status, pb.requests, pb.bytes, pb.input_tokens,"
            " pb.provider_status, pb.created_at, pb.ended_at FROM provider_batches pb"
            " WHERE pb.id IN (SELECT DISTINCT b.provider_batch FROM batches b JOIN requests r"
            "                 ON r.batch_id = b.batch_id WHERE r.job_id = ANY(:j))"
            " ORDER BY pb.provider, pb.created_at"), {"j": job_ids}).mappings()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=120_000)
    args = ap.parse_args()
    tag = uuid.uuid4().hex[:8]
    settings = get_settings()
    billed0 = sim_stats().get("batch_lines_billed", 0)
    stack_sh("down", "scheduler")
    jobs = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for provider in MODELS:
                path = Path(tmp) / f"{provider}.jsonl"
                with path.open("w") as f:
                    for x in lines(provider, args.lines, tag):
                        f.write(json.dumps(x) + "\n")
                jobs[provider] = submit(path, tier="background", mode="provider_batch")
        deadline = time.monotonic() + 1800
        while any(held(j["job_id"]) < j["accepted"] for j in jobs.values()):
            if time.monotonic() > deadline:
                raise SystemExit("the batcher did not hold every line within 30 min")
            time.sleep(2)
    finally:
        stack_sh("up", "scheduler")
    t0 = time.monotonic()
    counts = {p: wait_job(j["job_id"], timeout=7200, poll=2.0) for p, j in jobs.items()}
    took = time.monotonic() - t0
    pbs = provider_batches([j["job_id"] for j in jobs.values()])
    stats = sim_stats()
    out = {"lines_per_job": args.lines, "seconds_scheduler_start_to_done_under_load": round(took, 1),
           "submit": jobs, "counts": counts,
           "simulator_batch_lines_billed": stats.get("batch_lines_billed", 0) - billed0,
           "simulator_custom_ids_billed_twice": len(stats.get("batch_custom_ids_billed_twice", [])),
           "providers": {}}
    for provider, model in MODELS.items():
        mine = [p for p in pbs if p["provider"] == provider]
        from pipeline.providers.batch_api import batch_format
        max_requests, max_bytes = _limits(settings, batch_format(provider), provider, model)
        out["providers"][provider] = {
            "model": model, "limit_requests": max_requests, "limit_bytes": max_bytes,
            "provider_batches": len(mine),
            "lines": [p["requests"] for p in mine], "bytes": [p["bytes"] for p in mine],
            "statuses": sorted({p["status"] for p in mine}),
            "all_under_limits": all(p["requests"] <= max_requests and p["bytes"] <= max_bytes for p in mine),
            "lines_total": sum(p["requests"] for p in mine)}
    save("pb_split", out)


if __name__ == "__main__":
    main()
