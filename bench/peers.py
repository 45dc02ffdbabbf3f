"""A peer side by side: LiteLLM's Router, the plain client and the pipeline on one file and one simulator.

1. LiteLLM is installed from PyPI into its own virtualenv, ``var/peers/litellm``
   (under the stack's var dir; never the project's .venv), on the first run or
   when ``--litellm-version`` asks for another version;
2. at zero simulated latency, in this order, each with the same N-line file:
   the plain client (bench/plain_client.py), LiteLLM ``Router.acompletion``
   with a semaphore of 128 (bench/peer_litellm.py, run by that virtualenv's
   Python), then the pipeline (``submit_file`` → ... → result rows, as in
   bench/e2e.py);
3. each with its throughput and CPU seconds per 1,000 requests (bench/cpu.py:
   the client's process plus the simulator; for the pipeline every stack
   process plus submit), then the ratios pipeline ÷ LiteLLM and
   pipeline ÷ plain client, in throughput and in CPU per request.

    .venv/bin/python bench/peers.py --requests 10000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, save, simulator, write_requests
from e2e import client, cpu_ratios, pipeline, plain, ratio
from pipeline.config import get_settings
from pipeline.providers.registry import build_registry


def venv_dir() -> Path:
    return get_settings().var_dir / "peers" / "litellm"


def installed_version(venv: Path) -> str | None:
    py = venv / "bin" / "python"
    if not py.exists():
        return None
    proc = subprocess.run([str(py), "-c", "from importlib.metadata import version; print(version('litellm'))"],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_litellm(version: str | None) -> Path:
    """The virtualenv's Python, with LiteLLM (``version``, or whatever PyPI has) installed in it."""
    venv = venv_dir()
    have = installed_version(venv)
    if have and (version is None or have == version):
        return venv / "bin" / "python"
    if not (venv / "bin" / "python").exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    spec = f"litellm=={version}" if version else "litellm"
    print(f"installing {spec} into {venv.relative_to(get_settings().var_dir.parent)}", file=sys.stderr, flush=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", spec], check=True)
    return venv / "bin" / "python"


def litellm(python: Path, path: Path, concurrency: int) -> dict:
    spec = build_registry(get_settings()).get("openai")
    env = {**os.environ, "PEER_API_KEY": spec.keys[0].reveal()}
    return client("litellm", [str(python), str(ROOT / "bench" / "peer_litellm.py"), str(path),
                              "--base-url", spec.base_url, "--concurrency", str(concurrency)], env=env)


def run(n: int, concurrency: int = 128, timeout: float = 600, version: str | None = None) -> dict:
    python = ensure_litellm(version)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_requests(Path(tmp) / "peers.jsonl", n, prefix=f"peers-{int(time.time())}")
        with simulator(latency_ms=0.0):
            base = plain(path, concurrency)
        with simulator(latency_ms=0.0):
            peer = litellm(python, path, concurrency)
        with simulator(latency_ms=0.0):
            pipe = pipeline(path, n, timeout)
    rate = pipe["end_to_end_requests_per_s"]
    return save("peers", {
        "requests": n, "simulated_latency_ms": 0, "concurrency": concurrency,
        "litellm_version": peer.get("litellm_version"),
        "plain_client": base, "litellm_router": peer, "pipeline": pipe,
        "summary": {
            "requests_per_s": {"plain_client": base["requests_per_s"], "litellm_router": peer["requests_per_s"],
                               "pipeline": rate},
            "cpu_s_per_1000": {"plain_client": base["cpu_s_per_1000"], "litellm_router": peer["cpu_s_per_1000"],
                               "pipeline": pipe["cpu_s_per_1000"]},
            "ratio_pipeline_to_litellm": ratio(rate, peer["requests_per_s"]),
            "ratio_pipeline_to_plain": ratio(rate, base["requests_per_s"]),
            **cpu_ratios(pipe, peer, "litellm"),
            **cpu_ratios(pipe, base, "plain"),
        },
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=128, help="the clients' semaphore")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--litellm-version", help="install this version (default: the one installed, else PyPI's latest)")
    args = ap.parse_args()
    run(args.requests, args.concurrency, args.timeout, args.litellm_version)


if __name__ == "__main__":
    main()
