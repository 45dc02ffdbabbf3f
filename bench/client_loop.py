"""The loop of a one-process baseline client (bench/plain_client.py, bench/peer_litellm.py): every
line of a batch file sent with a semaphore, a 429 retried after 1 s (up to 20 tries), any other
error counted as a failure. It imports nothing of the pipeline: bench/peer_litellm.py runs it in
a virtualenv of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import time


def read_lines(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


async def drive(lines: list[dict], concurrency: int, send, rate_limited: type, failed: type) -> dict:
    """``await send(body)`` for each line's body; returns the counts, timings and peak memory."""
    sem = asyncio.Semaphore(concurrency)
    counts = {"succeeded": 0, "failed": 0, "retried_429": 0}

    async def one(line: dict) -> None:
        async with sem:
            for _ in range(20):
                try:
                    await send(line["body"])
                    counts["succeeded"] += 1
                    return
                except rate_limited:
                    counts["retried_429"] += 1
                    await asyncio.sleep(1)
                except failed:
                    break
            counts["failed"] += 1

    startup_cpu_s = sum(os.times()[:2])   # imports and set-up, before the first request
    started = time.monotonic()
    await asyncio.gather(*(one(line) for line in lines))
    seconds = time.monotonic() - started
    with open("/proc/self/status") as f:
        hwm = next(int(v.split()[1]) for v in f if v.startswith("VmHWM"))
    return {"requests": len(lines), **counts, "concurrency": concurrency, "seconds": round(seconds, 3),
            "requests_per_s": round(len(lines) / seconds, 1), "peak_rss_mb": round(hwm / 1024, 1),
            "startup_cpu_s": round(startup_cpu_s, 3)}
