"""The cost engine, measured (issue 21, item 7): the simulator's bill of a representative mix ÷ its naive bill.

The mix (``mix``, seeded; nothing in it is tuned to the figure):

- ``--lines`` requests (10,000): 20 % immediate, 20 % peak, 40 % off-peak (half with no deadline,
  half with one 26 to 72 h away), 20 % background;
- 20 % exact repeats at temperature 0: copies of an earlier temperature-0 line (the originals are
  half at temperature 0, half at 0.7), with their own custom_id;
- half the lines carry one of five system prompts of about 1,500 tokens, the rest a one-line one;
- models gpt-4o-mini, gpt-4o, claude-haiku-4-5, claude-sonnet-4-5, in turn.

It goes through the stack with default settings: one job, no ``--mode`` (``auto``), no tier flag
(each line says its own). The figure:

- **bill**: what the simulator billed, by its own counters (``/_stats`` → ``providers`` →
  ``billed_usd``: realtime and Batch API lines alike, priced by ``simulator/prices.py``), the
  simulator reset before the run; never the pipeline's ledger;
- **naive**: every line of the file realtime at list price with no cache, counted and priced by the
  simulator's own code in this process (``simulator.endpoints``/``prices``: each line answered and
  billed with an empty prompt cache at the standard tier), so it imports nothing of the pipeline's
  counting or pricing;
- ``bill_over_naive`` = bill ÷ naive (issue target ≤ 0.45).

Also: the saving per lever from the savings ledger (``results.savings`` of the job), the paths
taken, the ledger's total (for comparison only), and a second job (``--cap-lines`` lines of a new
mix, ``--cap-share`` × that mix's naive bill as its ``--budget-usd``, ``on_budget=fail``): the cap
binds (requests refused) and holds against the simulator's bill of that job.

``--short-deadlines``: the same mix with every deadline 10 to 55 min away: nothing goes to a
provider batch (the simulator's ``batch_lines``), every deadline is met (``job_deadlines``).

The simulator's Batch API turnaround is its ``batch_processing_s`` (2 s by default), not 24 h: the
figure is money, not time. Usage: ``python bench/cost.py [--lines 10000] [--short-deadlines]``
against ``make up``. Writes bench/results/cost.json (or cost_short_deadlines.json).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import save, sim_reset, sim_stats, submit, wait_job  # noqa: E402

from pipeline.stores import db  # noqa: E402

MODELS = ("gpt-4o-mini", "gpt-4o", "claude-haiku-4-5", "claude-sonnet-4-5")
LEVERS = ("cache", "coalesce", "batch", "flex", "prompt_cache", "price_window")
TOPICS = ("refunds", "shipping", "warranty", "invoices", "accounts", "privacy", "returns", "pricing",
          "delivery", "loyalty", "discounts", "complaints")
DOMAINS = ("Northwind Traders", "Contoso Bank", "Fabrikam Health", "Tailspin Travel", "Litware Legal")


def system_prompts(words_per_rule: int = 38, rules: int = 36) -> list[str]:
    """Five system prompts of about 1,500 tokens each (36 rules of ~40 tokens and a header)."""
    out = []
    for d, domain in enumerate(DOMAINS):
        lines = [f"You are the assistant of {domain}. Answer in three sentences at most, cite the policy."]
        for i in range(rules):
            topic = TOPICS[(i + d) % len(TOPICS)]
            lines.append(f"Rule {i + 1} ({topic}): when a customer of {domain} asks about {topic}, quote the"
                         f" policy section {i % 13 + 1}.{(i + d) % 7 + 1}, state the time limit of"
                         f" {7 + (i * 3 + d) % 23} days, name the form {domain.split()[0][:3].upper()}-{100 + i},"
                         f" and never promise what the policy does not say.")
        out.append("\n".join(lines))
    return out


def _body(model: str, system: str, question: str, temperature: float, max_tokens: int) -> dict:
    if model.startswith("claude"):
        return {"model": model, "max_tokens": max_tokens, "temperature": temperature, "system": system,
                "messages": [{"role": "user", "content": question}]}
    return {"model": model, "max_tokens": max_tokens, "temperature": temperature,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}


def _line(cid: str, body: dict, tier: str, deadline: str | None) -> dict:
    line = ({"custom_id": cid, "params": body} if body["model"].startswith("claude")
            else {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body})
    line["tier"] = tier
    if deadline:
        line["deadline"] = deadline
    return line


def mix(n: int, tag: str, *, seed: int = 21, short_deadlines: bool = False,
        now: datetime | None = None) -> list[dict]:
    """The issue's mix, ``n`` lines; ``tag`` makes every question new (nothing cached by an earlier run)."""
    rng = random.Random(seed)
    now = now or datetime.now(timezone.utc)
    prompts = system_prompts()
    tiers = ["immediate"] * 20 + ["peak"] * 20 + ["offpeak"] * 40 + ["background"] * 20
    out: list[dict] = []
    deterministic: list[int] = []   # indexes of temperature-0 originals
    for i in range(n):
        tier = tiers[i % 100] if n >= 100 else rng.choice(tiers)
        if short_deadlines:
            deadline = (now + timedelta(minutes=rng.uniform(10, 55))).isoformat()
        elif tier == "offpeak" and rng.random() < 0.5:
            deadline = (now + timedelta(hours=rng.uniform(26, 72))).isoformat()
        else:
            deadline = None
        if deterministic and rng.random() < 0.2:   # an exact repeat of an earlier temperature-0 line
            src = out[rng.choice(deterministic)]
            line = {k: v for k, v in src.items() if k not in ("custom_id", "tier", "deadline")}
            out.append({"custom_id": f"c{i:06d}", **line, "tier": tier,
                        **({"deadline": deadline} if deadline else {})})
            continue
        model = MODELS[i % len(MODELS)]
        system = (prompts[rng.randrange(len(prompts))] if rng.random() < 0.5
                  else "You are a helpful assistant. Answer briefly.")
        question = (f"[{tag}] Customer {i}: a question about {rng.choice(TOPICS)} for order"
                    f" {rng.randrange(10_000, 99_999)}; " + " ".join(rng.choice(TOPICS) for _ in range(rng.randint(5, 60))))
        temperature = 0.0 if rng.random() < 0.5 else 0.7
        body = _body(model, system, question, temperature, rng.choice((64, 128, 256)))
        if temperature == 0.0:
            deterministic.append(i)
        out.append(_line(f"c{i:06d}", body, tier, deadline))
    return out


# ------------------------------------------------------------------ the simulator's naive bill

class NaivePricer:
    """Each line realtime at list price, with no cache, by the simulator's own counting and prices."""

    def __init__(self):
        from simulator.config import SimulatorConfig
        from simulator.server import Simulator

        self.sim = Simulator(SimulatorConfig())

    def usd(self, line: dict) -> Decimal:
        from simulator.caching import PromptCache
        from simulator.endpoints import ALL
        from simulator.prices import usd
        from simulator.server import Call

        if "params" in line:
            provider, endpoint, body = self.sim.providers["anthropic"], ALL["/v1/messages"], line["params"]
        else:
            provider, endpoint, body = self.sim.providers["openai"], ALL[line["url"]], line["body"]
        answer = self.sim.evaluate(Call(provider, endpoint), body)
        usage = endpoint.bill(answer, False, PromptCache())
        return usd(provider.model(body["model"]).price, usage, "standard")


# ------------------------------------------------------------------ reading the run

def simulator_bill() -> dict:
    stats = sim_stats()
    providers = stats.get("providers") or {}
    return {"billed_usd": sum((Decimal(str(p.get("billed_usd") or 0)) for p in providers.values()), Decimal(0)),
            "batch_lines": sum(int(p.get("batch_lines") or 0) for p in providers.values()),
            "realtime_calls": int(stats["total"]["requests"]),
            "by_provider": {k: {"billed_usd": p.get("billed_usd"), "batch_lines": p.get("batch_lines"),
                                "calls": p.get("calls")} for k, p in providers.items()}}


def ledger(job_id: str) -> dict:
    with db.get_engine().connect() as conn:
        row = conn.execute(sa.text(
            "SELECT count(*), coalesce(sum(cost_usd), 0), coalesce(sum(list_cost_usd), 0),"
            " count(*) FILTER (WHERE from_cache),"
            + ", ".join(f"coalesce(sum((savings->>'{lv}')::numeric), 0)" for lv in LEVERS)
            + " FROM results WHERE job_id = :j"), {"j": job_id}).one()
        paths = dict(conn.execute(sa.text(
            "SELECT coalesce(answered_by, path, '-') || ':' || status, count(*) FROM request_paths"
            " WHERE job_id = :j GROUP BY 1 ORDER BY 1"), {"j": job_id}).all())
        refused = conn.execute(sa.text(
            "SELECT count(*) FROM results WHERE job_id = :j AND error->>'code' = 'budget_exceeded'"),
            {"j": job_id}).scalar()
        deadlines = conn.execute(sa.text(
            "SELECT with_deadline, on_time, late, missed FROM job_deadlines WHERE job_id = :j"),
            {"j": job_id}).mappings().first()
    saved = {lv: str(row[4 + i]) for i, lv in enumerate(LEVERS)}
    return {"results": row[0], "ledger_usd": str(row[1]), "ledger_list_usd": str(row[2]),
            "answered_without_call": row[3], "saved_by_lever_usd": saved, "paths": paths,
            "budget_refused": refused, "deadlines": dict(deadlines) if deadlines else None}


def run_job(lines: list[dict], **submit_kw) -> tuple[dict, dict, dict, float]:
    """Submit ``lines`` as one job with the simulator reset first; wait; (submit report, counts, bill, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mix.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        sim_reset()
        t0 = time.monotonic()
        report = submit(path, **submit_kw)
        counts = wait_job(report["job_id"], timeout=3600, poll=1.0)
        seconds = time.monotonic() - t0
    time.sleep(1.0)   # a last provider-batch settle
    return report, counts, simulator_bill(), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=10_000, help="size of the mix (0: only the capped job)")
    ap.add_argument("--short-deadlines", action="store_true", help="every deadline 10-55 min away")
    ap.add_argument("--cap-lines", type=int, default=2_000, help="size of the capped job (0: none)")
    ap.add_argument("--cap-share", type=float, default=0.25, help="the cap, × the capped mix's naive bill")
    args = ap.parse_args()
    tag = uuid.uuid4().hex[:8]
    pricer = NaivePricer()
    result: dict = {"lines": args.lines, "short_deadlines": args.short_deadlines,
                    "simulator_batch_processing_s": "simulator default (2 s), not 24 h"}
    if args.lines:
        lines = mix(args.lines, tag, short_deadlines=args.short_deadlines)
        naive = sum((pricer.usd(x) for x in lines), Decimal(0))
        report, counts, bill, seconds = run_job(lines)
        led = ledger(report["job_id"])
        ratio = bill["billed_usd"] / naive if naive else None
        result.update({
            "job_id": report["job_id"], "counts": counts, "seconds_under_load": round(seconds, 1),
            "naive_usd": str(naive.quantize(Decimal("0.000001"))),
            "bill_usd": str(bill["billed_usd"]), "bill_over_naive": round(float(ratio), 4) if ratio else None,
            "simulator": bill, **led})
    if args.cap_lines and not args.short_deadlines:
        capped = mix(args.cap_lines, tag + "cap", seed=22)
        cap_naive = sum((pricer.usd(x) for x in capped), Decimal(0))
        cap = (cap_naive * Decimal(str(args.cap_share))).quantize(Decimal("0.01"))
        creport, ccounts, cbill, cseconds = run_job(capped, budget_usd=cap, on_budget="fail")
        cled = ledger(creport["job_id"])
        result["cap"] = {"lines": args.cap_lines, "cap_usd": str(cap), "naive_usd": str(cap_naive),
                         "job_id": creport["job_id"], "counts": ccounts, "budget_refused": cled["budget_refused"],
                         "simulator_bill_usd": str(cbill["billed_usd"]), "ledger_usd": cled["ledger_usd"],
                         "binds": cled["budget_refused"] > 0, "holds": cbill["billed_usd"] <= cap,
                         "seconds_under_load": round(cseconds, 1)}
    name = "cost_short_deadlines" if args.short_deadlines else "cost" if args.lines else "cost_cap"
    save(name, json.loads(json.dumps(result, default=str)))


if __name__ == "__main__":
    main()
