"""LiteLLM's ``Router.acompletion`` over a batch file, the way bench/plain_client.py sends it.

Runs in its own virtualenv (bench/peers.py makes it under var/, never the
project's), so it imports nothing of the pipeline: the provider's base URL comes
as an argument, its key from the environment (``PEER_API_KEY``, not the command
line, which ``ps`` shows). One Router with one deployment, a semaphore, no
Router retries; a 429 is retried after 1 s as the plain client does. Prints
JSON: requests, seconds, requests per second, peak memory, LiteLLM's version.

    var/peers/litellm/bin/python bench/peer_litellm.py FILE --base-url URL --concurrency 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from importlib.metadata import version

# the bundled price map, not a download from GitHub at import
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
from litellm import Router  # noqa: E402


async def run(path: str, base_url: str, concurrency: int) -> dict:
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    models = sorted({line["body"]["model"] for line in lines})
    router = Router(model_list=[{"model_name": m, "litellm_params": {
        "model": f"openai/{m}", "api_base": base_url, "api_key": os.environ["PEER_API_KEY"]}}
        for m in models], num_retries=0)
    sem = asyncio.Semaphore(concurrency)
    counts = {"succeeded": 0, "failed": 0, "retried_429": 0}

    async def one(line: dict) -> None:
        async with sem:
            for _ in range(20):
                try:
                    await router.acompletion(**line["body"])
                    counts["succeeded"] += 1
                    return
                except litellm.RateLimitError:
                    counts["retried_429"] += 1
                    await asyncio.sleep(1)
                except litellm.APIError:
                    break
                except Exception:   # noqa: BLE001 - counted, as the plain client counts its failures
                    break
            counts["failed"] += 1

    startup_cpu_s = sum(os.times()[:2])   # imports and set-up, before the first request
    started = time.monotonic()
    await asyncio.gather(*(one(line) for line in lines))
    seconds = time.monotonic() - started
    with open("/proc/self/status") as f:
        hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))
    return {"requests": len(lines), **counts, "concurrency": concurrency, "seconds": round(seconds, 3),
            "requests_per_s": round(len(lines) / seconds, 1), "peak_rss_mb": round(hwm / 1024, 1),
            "startup_cpu_s": round(startup_cpu_s, 3),
            "litellm_version": version("litellm")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("file")
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--concurrency", type=int, default=128)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args.file, args.base_url, args.concurrency))))


if __name__ == "__main__":
    main()
