"""One worker process's provider calls: the SDK's default httpx client, its aiohttp backend, and
no SDK at all (``direct``: pipeline/providers/direct.py, aiohttp alone), with CPU per call.

Both run side by side in one run, against one simulator process at zero
latency, through the pipeline's own provider class (pipeline/providers/openai.py)
with the same concurrency. Prints JSON and writes bench/results/sdk_clients.json.

    .venv/bin/python bench/sdk_clients.py --requests 3000 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipeline.config import load_settings
from pipeline.providers.base import ProviderClient
from pipeline.providers.registry import build_registry

RESULTS = Path(__file__).parent / "results"
BODY = {"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "Say hi."}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def measure(client: str, url: str, n: int, concurrency: int) -> tuple[float, float]:
    settings = dataclasses.replace(load_settings(), simulator_url=url, openai_api_key="",
                                   openai_base_url=f"{url}/v1", provider_http_client=client)
    provider = ProviderClient(build_registry(settings).get("openai"), settings)
    sem = asyncio.Semaphore(concurrency)

    async def one(i):
        async with sem:
            await provider.call(BODY, headers={"Idempotency-Key": f"{client}:{i}"})

    await asyncio.gather(*(one(i) for i in range(200)))  # warm up connections
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    await provider.client().close()
    return n / elapsed, cpu / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    port = free_port()
    sim = subprocess.Popen([sys.executable, "-m", "simulator", "--port", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        rates: dict[str, list[float]] = {"httpx": [], "aiohttp": [], "direct": []}
        cpu: dict[str, list[float]] = {k: [] for k in rates}
        for _ in range(args.rounds):  # alternate, so all see the same machine noise
            for client in rates:
                rate, us = asyncio.run(measure(client, url, args.requests, args.concurrency))
                rates[client].append(rate)
                cpu[client].append(us)
    finally:
        sim.terminate()
        sim.wait()
    best = {k: round(max(v), 1) for k, v in rates.items()}
    out = {"benchmark": "sdk_clients", "requests": args.requests, "concurrency": args.concurrency,
           "requests_per_s_best": best, "requests_per_s_all": {k: [round(x, 1) for x in v] for k, v in rates.items()},
           "aiohttp_over_httpx": round(best["aiohttp"] / best["httpx"], 2),
           "direct_over_aiohttp": round(best["direct"] / best["aiohttp"], 2),
           "cpu_us_per_call_best": {k: round(min(v)) for k, v in cpu.items()},
           "used_by_the_pipeline": load_settings().provider_http_client}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sdk_clients.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
