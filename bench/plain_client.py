"""The baseline: a plain single-process asyncio client, no Kafka, no Postgres.

``AsyncOpenAI`` (the same aiohttp backend and ``max_retries=0`` as the
pipeline's workers) and a semaphore, over the same JSONL file the pipeline
gets. Prints JSON: requests, seconds, requests per second, peak memory.

    .venv/bin/python bench/plain_client.py FILE --concurrency 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import openai

from pipeline.config import get_settings
from pipeline.providers.registry import build_registry


async def run(path: str, concurrency: int) -> dict:
    settings = get_settings()
    spec = build_registry(settings).get("openai")
    client = openai.AsyncOpenAI(api_key=spec.keys[0].reveal(), base_url=spec.base_url,
                                max_retries=0, timeout=settings.provider_timeout_s,
                                http_client=openai.DefaultAioHttpClient(timeout=settings.provider_timeout_s))
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    sem = asyncio.Semaphore(concurrency)
    counts = {"succeeded": 0, "failed": 0, "retried_429": 0}

    async def one(line: dict) -> None:
        async with sem:
            for _ in range(20):
                try:
                    await client.chat.completions.create(**line["body"])
                    counts["succeeded"] += 1
                    return
                except openai.RateLimitError:
                    counts["retried_429"] += 1
                    await asyncio.sleep(1)
                except openai.APIError:
                    break
            counts["failed"] += 1

    startup_cpu_s = sum(os.times()[:2])   # imports and set-up, before the first request
    started = time.monotonic()
    await asyncio.gather(*(one(line) for line in lines))
    seconds = time.monotonic() - started
    await client.close()
    with open("/proc/self/status") as f:
        hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))
    return {"requests": len(lines), **counts, "concurrency": concurrency, "seconds": round(seconds, 3),
            "requests_per_s": round(len(lines) / seconds, 1), "peak_rss_mb": round(hwm / 1024, 1),
            "startup_cpu_s": round(startup_cpu_s, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("file")
    ap.add_argument("--concurrency", type=int, default=128)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args.file, args.concurrency))))


if __name__ == "__main__":
    main()
