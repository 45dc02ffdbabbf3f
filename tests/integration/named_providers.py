"""A stack serving named providers: the simulator told about them at run time (``POST /_config``),
the batcher and the workers restarted with the same providers in ``LLMBATCH_PROVIDERS``, a price
file for their models, and each key's secret in an environment variable of its own. Undone after.

Providers are named with a fresh suffix, so the simulator's per-provider tallies (calls, 429s,
billed USD, peak calls in 60 s) of one run are that run's alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal

import sqlalchemy as sa

from pipeline.config import ROOT
from pipeline.constants import JOB_TERMINAL
from tests.integration.conftest import LLMBATCH, simulator_call, wait_for, write_jsonl

RESTARTED = ("batcher", "worker-immediate", "worker-peak")
LLAMA = "meta-llama-3.1-70b"


@dataclass
class Named:
    """One named provider of the run: its name, its keys (alias -> (env var, secret, rpm)), its price."""

    name: str
    kind: str = "openai"
    keys: dict = field(default_factory=dict)
    input: str = "0.88"
    output: str = "0.88"

    def secrets(self) -> list[str]:
        return [secret for _, secret, _ in self.keys.values()]


def key(rpm: int | None = None) -> tuple[str, str, int | None]:
    tag = uuid.uuid4().hex[:8].upper()
    return f"PROVTEST_KEY_{tag}", f"tk-PLANTED-{uuid.uuid4().hex}{uuid.uuid4().hex}", rpm


def sim(settings, method: str, path: str, body=None) -> dict:
    return simulator_call(f"{settings.simulator_url}{path}", method, body, timeout=30)


def _stack_sh(env: dict, *args: str) -> None:
    p = subprocess.run(["bash", str(ROOT / "infra" / "stack.sh"), *args], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"stack.sh {args}: {p.stdout[-2000:]} {p.stderr[-2000:]}"


@contextmanager
def named_stack(settings, tmp_path, providers: list[Named], anthropic_rpm: int | None = None,
                processes: tuple[str, ...] = RESTARTED):
    """Yield the environment a submit needs (providers, price file, secrets); restore the stack after.
    ``processes``: the processes that read the providers (add ``scheduler`` for provider batches)."""
    sim_providers, pipe_providers, prices, env = {}, {}, {}, dict(os.environ)
    for p in providers:
        sim_providers[p.name] = {
            "kind": p.kind, "models": {LLAMA: {"input": p.input, "output": p.output, "encoding": "o200k_base"}},
            "keys": [{"key": secret, "alias": alias, **({"rpm": rpm} if rpm else {})}
                     for alias, (_, secret, rpm) in p.keys.items()]}
        base = f"{settings.simulator_url}/p/{p.name}" + ("/v1" if p.kind == "openai" else "")
        pipe_providers[p.name] = {"kind": p.kind, "base_url": base,
                                  "keys": [{"alias": alias, "env": var, **({"rpm": rpm} if rpm else {})}
                                           for alias, (var, _, rpm) in p.keys.items()]}
        if p.kind == "azure-openai":   # one deployment of the model, named apart from it
            sim_providers[p.name]["deployments"] = pipe_providers[p.name]["deployments"] = {f"dep-{LLAMA}": LLAMA}
        else:
            pipe_providers[p.name]["batch"] = p.kind
        prices[f"{p.name}/{LLAMA}"] = {"input": p.input, "cached_input": p.input, "output": p.output,
                                       "batch_discount": "0.5", "context_window": 131072,
                                       "max_output_tokens": 4096, "encoding": "o200k_base",
                                       "effective_date": "2026-12-05", "source": "simulator"}
        env.update({var: secret for var, secret, _ in p.keys.values()})
    if anthropic_rpm:
        sim_providers["anthropic"] = {"kind": "anthropic", "rpm": anthropic_rpm}
        pipe_providers["anthropic"] = {"keys": [{"alias": "default", "rpm": anthropic_rpm}]}
    price_file = tmp_path / "prices.json"
    price_file.write_text(json.dumps({"models": prices}))
    env.update(LLMBATCH_PROVIDERS=json.dumps(pipe_providers), LLMBATCH_PRICING_FILE=str(price_file))
    sim(settings, "POST", "/_config", {"providers": sim_providers})
    with restarted(settings, env, processes):
        yield env


@contextmanager
def restarted(settings, env: dict, names: tuple[str, ...] = RESTARTED):
    """The processes ``names`` restarted with ``env`` for the block; after it, restarted as they were
    and the simulator's configuration undone."""
    try:
        _stack_sh(env, "restart", *names)
        yield env
    finally:
        try:
            _stack_sh(dict(os.environ), "restart", *names)
        finally:
            sim(settings, "DELETE", "/_config")


def submit(env: dict, tmp_path, lines: list[dict], name: str = "job") -> str:
    path = write_jsonl(tmp_path / f"{name}.jsonl", lines)
    p = subprocess.run([LLMBATCH, "submit", path], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip().splitlines()[-1]


def wait_job(engine, job: str, timeout: float = 240) -> str:
    def status():
        with engine.connect() as conn:
            s = conn.execute(sa.text("SELECT status FROM jobs WHERE job_id = :j"), {"j": job}).scalar()
        return s if s in JOB_TERMINAL else None
    return wait_for(status, timeout=timeout, every=0.5, what=f"job {job} ended")


def results(engine, job: str) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(
            "SELECT q.custom_id, q.provider, q.model, q.status, x.cost_usd, x.input_tokens, x.output_tokens,"
            " x.key_alias, x.created_at, x.error FROM requests q LEFT JOIN results x USING (job_id, custom_id)"
            " WHERE q.job_id = :j ORDER BY x.created_at"), {"j": job}).mappings()]


def chat(custom_id: str, model: str, text: str, max_tokens: int = 16) -> dict:
    if model.startswith("claude"):
        return {"custom_id": custom_id, "params": {"model": model, "max_tokens": max_tokens,
                                                   "messages": [{"role": "user", "content": text}]}}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]}}


def ledger_by_provider(rows: list[dict]) -> dict[str, Decimal]:
    out: dict[str, Decimal] = {}
    for r in rows:
        out[r["provider"]] = out.get(r["provider"], Decimal(0)) + (r["cost_usd"] or Decimal(0))
    return out


def since(t0: float) -> float:
    return round(time.monotonic() - t0, 1)
