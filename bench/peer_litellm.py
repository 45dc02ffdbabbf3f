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
from importlib.metadata import version

# the bundled price map, not a download from GitHub at import
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
from litellm import Router  # noqa: E402

from client_loop import drive, read_lines  # noqa: E402


async def run(path: str, base_url: str, concurrency: int) -> dict:
    lines = read_lines(path)
    models = sorted({line["body"]["model"] for line in lines})
    router = Router(model_list=[{"model_name": m, "litellm_params": {
        "model": f"openai/{m}", "api_base": base_url, "api_key": os.environ["PEER_API_KEY"]}}
        for m in models], num_retries=0)
    # any other exception is a failed request, as the plain client counts its own
    out = await drive(lines, concurrency, lambda body: router.acompletion(**body), litellm.RateLimitError, Exception)
    return {**out, "litellm_version": version("litellm")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("file")
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--concurrency", type=int, default=128)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args.file, args.base_url, args.concurrency))))


if __name__ == "__main__":
    main()
