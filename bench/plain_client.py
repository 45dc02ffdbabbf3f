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

import openai

from client_loop import drive, read_lines

from pipeline.config import get_settings
from pipeline.providers.registry import build_registry


async def run(path: str, concurrency: int) -> dict:
    settings = get_settings()
    spec = build_registry(settings).get("openai")
    client = openai.AsyncOpenAI(api_key=spec.keys[0].reveal(), base_url=spec.base_url,
                                max_retries=0, timeout=settings.provider_timeout_s,
                                http_client=openai.DefaultAioHttpClient(timeout=settings.provider_timeout_s))
    try:
        return await drive(read_lines(path), concurrency, lambda body: client.chat.completions.create(**body),
                           openai.RateLimitError, openai.APIError)
    finally:
        await client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("file")
    ap.add_argument("--concurrency", type=int, default=128)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args.file, args.concurrency))))


if __name__ == "__main__":
    main()
