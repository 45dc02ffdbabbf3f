"""Prompt-cache placement, measured (issue 21, item 4): hit rates and dollars saved as the simulator bills them.

One job per run, realtime, its lines sharing one system prompt of about 1,500
tokens, ``--lines`` per model (default gpt-4o-mini, claude-haiku-4-5 and, for
contrast, claude-sonnet-4-5, whose minimum cacheable prefix is 1,024 tokens
where Haiku 4.5's is 4,096). The simulator answers with a latency (``--latency-ms``,
uniform ± a third), so calls in flight together miss the cache as they would at a provider.

Three runs on the same file, the simulator reset before each (its prompt cache too):
``placed`` (the default settings), ``unplaced`` (``LLMBATCH_PROMPT_CACHE_PLACEMENT=false``
for the submit), both realtime, and ``placed_provider_batch`` (``--mode provider_batch``:
Anthropic's 1-hour TTL, and the cache discount stacked on the batch price). Per model:

- ``hit_rate``: lines whose usage reports cached or cache-read tokens ÷ lines;
- ``cached_token_share``: cached or cache-read tokens ÷ prompt tokens;
- ``writes``: lines that wrote an Anthropic cache entry;
- ``billed_usd``: what the simulator billed (its own prices, ``simulator/prices.py``, on each
  answer's usage, at the batch price in the provider-batch run); ``uncached_usd``: the same
  usage with every input token at the input price (same path);
  ``saved_usd`` = uncached − billed (negative when writes cost more than reads saved);
- ``ledger_usd``: the pipeline's ledger (``results.cost_usd``), which must equal ``billed_usd``
  to the rounding of ``results.cost_usd`` (1e-8 per row).
Per provider, ``simulator_stats_usd`` is the simulator's own counter (``/_stats``), which must
equal the ledger too.

Usage: ``python bench/prompt_cache.py [--lines 100]`` against ``make up``. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import save, sim_stats, simulator, submit, wait_job  # noqa: E402

from pipeline.money.tokens import count_text_tokens  # noqa: E402
from pipeline.stores import db  # noqa: E402
from simulator.prices import builtin_price, usd  # noqa: E402

#: results.cost_usd is numeric(18, 8): each row's exact cost is rounded (half up) to 1e-8 when stored
ROUNDING = Decimal("0.000000005")
RUNS = ("placed", "unplaced", "placed_provider_batch")
MODELS = ("gpt-4o-mini", "claude-haiku-4-5", "claude-sonnet-4-5")
TOPICS = ("refunds", "shipping", "warranty", "invoices", "accounts", "privacy", "returns", "pricing")


def system_prompt(target_tokens: int = 1500) -> str:
    """A support-desk system prompt of about ``target_tokens`` (o200k_base) tokens."""
    rules, i = [], 0
    while count_text_tokens("\n".join(rules), "gpt-4o-mini") < target_tokens:
        topic = TOPICS[i % len(TOPICS)]
        rules.append(f"Rule {i + 1} ({topic}): when a customer asks about {topic}, quote the policy section "
                     f"{i % 13 + 1}.{i % 7 + 1}, state the time limit of {7 + i % 23} days, and never promise "
                     f"what the policy does not say.")
        i += 1
    return "You are the support assistant of Northwind Traders.\n" + "\n".join(rules)


def lines(n: int, models, system: str) -> list[dict]:
    out = []
    for model in models:
        for i in range(n):
            question = f"Customer {i}: I have a question about {TOPICS[i % len(TOPICS)]} (order {1000 + i})."
            cid = f"{model.replace('.', '_')}-{i}"
            if model.startswith("claude"):
                out.append({"custom_id": cid, "params": {"model": model, "max_tokens": 40, "system": system,
                                                         "messages": [{"role": "user", "content": question}]}})
            else:
                out.append({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                            "body": {"model": model, "max_tokens": 40, "messages": [
                                {"role": "system", "content": system}, {"role": "user", "content": question}]}})
    return out


def _uncached(usage: dict) -> dict:
    """The same usage with every input token billed as plain input (no cache read, no write)."""
    if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:
        total = (usage.get("input_tokens", 0) + usage.get("cache_read_input_tokens", 0)
                 + usage.get("cache_creation_input_tokens", 0))
        return {"input_tokens": total, "output_tokens": usage.get("output_tokens", 0),
                "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
    return {**usage, "prompt_tokens_details": {"cached_tokens": 0}}


def figures(job_id: str, tier: str = "standard") -> dict:
    with db.get_engine().connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT r.model, q.provider, r.response -> 'usage', r.cost_usd FROM results r"
            " JOIN requests q USING (job_id, custom_id) WHERE r.job_id = :j AND r.status_code = 200"),
            {"j": job_id}).all()
    per = defaultdict(lambda: {"lines": 0, "hits": 0, "writes": 0, "prompt_tokens": 0, "cached_tokens": 0,
                               "billed_usd": Decimal(0), "uncached_usd": Decimal(0), "ledger_usd": Decimal(0)})
    ledger_by_provider: dict = defaultdict(Decimal)
    for model, provider, usage, cost in rows:
        usage = usage or {}
        kind = "anthropic" if "cache_read_input_tokens" in usage or provider == "anthropic" else "openai"
        price = builtin_price(kind, model)
        f = per[model]
        f["lines"] += 1
        if kind == "anthropic":
            read, wrote = usage.get("cache_read_input_tokens", 0), usage.get("cache_creation_input_tokens", 0)
            prompt = usage.get("input_tokens", 0) + read + wrote
            f["writes"] += wrote > 0
        else:
            read, prompt = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0), usage["prompt_tokens"]
        f["hits"] += read > 0
        f["prompt_tokens"] += prompt
        f["cached_tokens"] += read
        f["billed_usd"] += usd(price, usage, tier)
        f["uncached_usd"] += usd(price, _uncached(usage), tier)
        f["ledger_usd"] += Decimal(cost)
        ledger_by_provider[provider] += Decimal(cost)
    out = {}
    for model, f in sorted(per.items()):
        out[model] = {**{k: v for k, v in f.items() if not isinstance(v, Decimal)},
                      "hit_rate": round(f["hits"] / f["lines"], 4) if f["lines"] else None,
                      "cached_token_share": round(f["cached_tokens"] / f["prompt_tokens"], 4) if f["prompt_tokens"]
                      else None,
                      **{k: str(v) for k, v in f.items() if isinstance(v, Decimal)},
                      "saved_usd": str(f["uncached_usd"] - f["billed_usd"]),
                      "saved_share": round(float((f["uncached_usd"] - f["billed_usd"]) / f["uncached_usd"]), 4)
                      if f["uncached_usd"] else None,
                      "ledger_equals_simulator_prices": abs(f["ledger_usd"] - f["billed_usd"])
                      <= f["lines"] * ROUNDING}
    return {"models": out, "ledger_by_provider": {p: str(v) for p, v in ledger_by_provider.items()},
            "lines": len(rows)}


def one_run(name: str, path: Path, latency_ms: float, placement: bool, mode: str = "realtime") -> dict:
    with simulator(latency="uniform", latency_ms=latency_ms, jitter_ms=latency_ms / 3,
                   batch_processing_s=2.0, batch_stage_s=0.1):
        old = os.environ.get("LLMBATCH_PROMPT_CACHE_PLACEMENT")
        os.environ["LLMBATCH_PROMPT_CACHE_PLACEMENT"] = "true" if placement else "false"
        try:
            report = submit(path, mode=mode, tier="peak")
        finally:
            if old is None:
                os.environ.pop("LLMBATCH_PROMPT_CACHE_PLACEMENT", None)
            else:
                os.environ["LLMBATCH_PROMPT_CACHE_PLACEMENT"] = old
        done = wait_job(report["job_id"], timeout=900)
        stats = sim_stats()
    tier = "batch" if mode == "provider_batch" else "standard"
    result = {"run": name, "mode": mode, "job_id": report["job_id"], **done, **figures(report["job_id"], tier)}
    result["simulator_stats_usd"] = {p: v.get("billed_usd") for p, v in (stats.get("providers") or {}).items()
                                     if v.get("billed_usd") not in (None, "0")}
    result["ledger_equals_simulator_stats"] = all(
        abs(Decimal(result["simulator_stats_usd"].get(p, "0")) - Decimal(v)) <= result["lines"] * ROUNDING
        for p, v in result["ledger_by_provider"].items())
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=100, help="lines per model")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--latency-ms", type=float, default=300.0)
    ap.add_argument("--only", choices=RUNS)
    args = ap.parse_args()
    system = system_prompt()
    models = [m for m in args.models.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompt_cache.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in lines(args.lines, models, system)))
        runs = [run for run in RUNS if args.only in (None, run)]
        results = [one_run(run, path, args.latency_ms, run != "unplaced",
                           "provider_batch" if run == "placed_provider_batch" else "realtime") for run in runs]
    save("prompt_cache", {"lines_per_model": args.lines, "latency_ms": args.latency_ms,
                          "system_prompt_tokens_o200k": count_text_tokens(system, "gpt-4o-mini"),
                          "runs": results})


if __name__ == "__main__":
    main()
