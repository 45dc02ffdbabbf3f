"""The money run (issue 13): every path under its caps at once, printed as JSON.

Per run, all at once against the stack, with the simulator in its worst-case mode (every
call billed to its limits: all ``n`` choices to the output limit, every ``cache_control``
prompt written at its longest TTL, schemas and tools counted by the simulator's own billing):

- a realtime OpenAI job of 2,000 mixed requests (peak tier, 64 in flight per batch): plain
  lines, ``n`` of 1 to 4, tools with a ``response_format`` schema, and lines with no
  ``max_tokens`` at all, under a job cap worth about 100 of its requests' maxima, through a
  rate limit tight enough that requests wait longer than the reservation TTL (shortened to 5 s
  for the run: the "old TTL" a hold used to die at while it waited);
- a realtime Anthropic job of 300 requests whose system prompts are cache writes (5 minutes
  and 1 hour TTL), under its own cap;
- a provider-batch job of 300 requests with its own cap;
- a global daily cap set from another process (``llmbatch budget set global …`` with an
  environment that has no caps in it) just before, at "today's ledger + room".

Checks: spend ≤ every cap, in the ledger and in the provider's bill (the simulator's own count,
priced by its own table: ``/_stats?key_prefix=JOB:`` for calls, ``/_stats/batch_lines`` for Batch
API lines), ≥ 90 % of the OpenAI job cap used, and after
``llmbatch budget reconcile`` the Redis counters equal the Postgres ledger for every job and the
global day.

``--mode auto``: the OpenAI job and the provider-batch job go in the background tier under
``--mode auto`` and the path chooser decides: every other line of the OpenAI job has a deadline
30 minutes away (realtime), the rest none (provider batch), so both paths spend under one cap.

Usage: ``python bench/money.py [--runs 5] [--mode auto]`` against ``make up``. Benchmarks are not
part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import LLMBATCH, clear_rate_limits, restarted, simulator  # noqa: E402

from pipeline.config import get_settings  # noqa: E402
from pipeline.money import caps as caps_mod, ledger, scripts, units  # noqa: E402
from pipeline.money.bounds import request_bound  # noqa: E402
from pipeline.money.pricing import get_price_book  # noqa: E402
from pipeline.paths.provider_batch import provider_custom_id  # noqa: E402
from pipeline.stores import db  # noqa: E402

MODEL, CLAUDE = "gpt-4o-mini", "claude-haiku-4-5"
RPM = 60
TTL_S = 5
N_REALTIME, N_CLAUDE, N_PB = 2000, 300, 300
MAX_TOKENS = 32
#: a system prompt long enough to be cached (Anthropic caches 1,024 tokens or more on Haiku)
LONG_SYSTEM = "You answer in one short sentence. " * 200
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ANSWER_SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": {
    "type": "object", "properties": {"prime": {"type": "integer"}, "why": {"type": "string"}},
    "required": ["prime", "why"], "additionalProperties": False}}}


def _openai_line(tag: str, i: int) -> dict:
    """Five shapes in turn: plain, n of 1-4, tools with a response schema, no max_tokens, plain."""
    body = {"model": MODEL, "max_tokens": MAX_TOKENS, "messages": [
        {"role": "user", "content": f"Money run {tag} {i}: name a prime above {i}."}]}
    kind = i % 5
    if kind == 1:
        body["n"] = 1 + (i // 5) % 4
    elif kind == 2:
        body |= {"tools": [WEATHER_TOOL], "response_format": ANSWER_SCHEMA}
    elif kind == 3:
        del body["max_tokens"]          # bounded by the model's maximum output
    return {"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def _claude_line(tag: str, i: int) -> dict:
    ttl = "1h" if i % 2 else "5m"
    return {"custom_id": f"{tag}-{i}", "params": {
        "model": CLAUDE, "max_tokens": MAX_TOKENS,
        "system": [{"type": "text", "text": f"{tag} {i}. " + LONG_SYSTEM,
                    "cache_control": {"type": "ephemeral", "ttl": ttl}}],
        "messages": [{"role": "user", "content": f"Name a prime above {i}."}]}}


def _write(path: Path, lines: list[dict], priority: int | None) -> Path:
    with path.open("w") as f:
        for line in lines:
            if priority is not None:
                line["priority"] = priority
            f.write(json.dumps(line) + "\n")
    return path


def _cap_for(lines: list[dict], count: int) -> Decimal:
    """The summed maxima of the first ``count`` lines (every shape in turn): a cap the job will hit."""
    prices, picked = get_price_book(), lines[:count]
    total = sum((request_bound("openai" if "body" in ln else "anthropic", ln.get("body") or ln["params"],
                               prices).max_cost_usd for ln in picked), Decimal(0))
    return total.quantize(units.UNIT)


def _cli(*args, env=None) -> str:
    proc = subprocess.run([LLMBATCH, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"llmbatch {args}: {proc.returncode} {proc.stderr}")
    return proc.stdout


def _ledger(conn, job: str) -> Decimal:
    return conn.execute(sa.text("SELECT coalesce(sum(cost_usd), 0) FROM results WHERE job_id = :j"),
                        {"j": job}).scalar()


def _open(conn, job: str) -> int:
    return conn.execute(sa.text("SELECT count(*) FROM requests WHERE job_id = :j"
                                " AND status IN ('held', 'queued', 'running')"), {"j": job}).scalar()


def _billed(conn, job: str) -> Decimal:
    """What the provider billed for the job, priced by the simulator's own table: its realtime calls
    (their idempotency keys) and its Batch API lines (their custom_ids). The count a cap must hold
    against, not the ledger's."""
    base = get_settings().simulator_url
    with urllib.request.urlopen(f"{base}/_stats?" + urllib.parse.urlencode({"key_prefix": f"{job}:"}),
                                timeout=30) as r:
        calls = Decimal(json.load(r)["keys"].get("billed_usd") or "0")
    ids = [provider_custom_id(SimpleNamespace(job_id=job, custom_id=c)) for c in conn.execute(sa.text(
        "SELECT custom_id FROM requests WHERE job_id = :j"), {"j": job}).scalars()]
    ask = urllib.request.Request(f"{base}/_stats/batch_lines", data=json.dumps({"custom_ids": ids}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(ask, timeout=60) as r:
        lines = json.load(r)
    if lines["unpriced_lines"]:
        raise SystemExit(f"job {job}: {lines['unpriced_lines']} batch lines the simulator could not price")
    return calls + Decimal(lines["billed_usd"])


def one_run(i: int, engine, sredis, mode: str | None = None) -> dict:
    started = time.monotonic()
    tag = f"money{i}-{uuid.uuid4().hex[:6]}"
    # every sixth line of the realtime job is an Anthropic cache write: one file, both formats
    rt_lines = [_claude_line(tag + "-rt", k) if k % 6 == 5 else _openai_line(tag + "-rt", k)
                for k in range(N_REALTIME)]
    if mode == "auto":   # half with a deadline too near for a provider batch, half with none
        soon = (datetime.now(timezone.utc) + timedelta(minutes=30)).isoformat()
        for k, line in enumerate(rt_lines):
            if k % 2:
                line["deadline"] = soon
    an_lines = [_claude_line(tag + "-an", k) for k in range(N_CLAUDE)]
    pb_lines = [_openai_line(tag + "-pb", k) for k in range(N_PB)]
    job_cap, an_cap, pb_cap = _cap_for(rt_lines, 100), _cap_for(an_lines, 30), _cap_for(pb_lines, 20)
    with engine.connect() as conn:
        before = conn.execute(sa.text("SELECT coalesce(sum(cost_usd), 0) FROM results"
                                      " WHERE created_at >= date_trunc('day', now() AT TIME ZONE 'UTC')"
                                      " AT TIME ZONE 'UTC'")).scalar()
        t0 = conn.execute(sa.text("SELECT now()")).scalar()
    # room for the three caps and a little more: the global cap binds only if a job cap leaks
    room = ((job_cap + an_cap + pb_cap) * Decimal("1.05")).quantize(units.UNIT)
    global_cap = before + room
    # another process, with no caps in its environment, sets the global cap
    _cli("budget", "set", "global", global_cap, env={"LLMBATCH_BUDGET_GLOBAL_DAILY_USD": ""})
    with tempfile.TemporaryDirectory() as tmp:
        auto = ["--mode", "auto", "--tier", "background"]
        submits = [
            [str(_write(Path(tmp) / "rt.jsonl", rt_lines, None if mode == "auto" else 6)), "--budget-usd",
             str(job_cap), *(auto if mode == "auto" else [])],
            [str(_write(Path(tmp) / "an.jsonl", an_lines, 6)), "--budget-usd", str(an_cap)],
            [str(_write(Path(tmp) / "pb.jsonl", pb_lines, None)), "--budget-usd", str(pb_cap),
             *(auto if mode == "auto" else ["--mode", "provider_batch", "--tier", "background"])]]
        procs = [subprocess.Popen([LLMBATCH, "submit", *args, "--json"], stdout=subprocess.PIPE, text=True)
                 for args in submits]
        jobs = [json.loads(p.communicate(timeout=300)[0])["job_id"] for p in procs]
    rt_job, an_job, pb_job = jobs
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            n = sum(_open(conn, j) for j in jobs)
            total = conn.execute(sa.text("SELECT count(*) FROM requests WHERE job_id = ANY(:j)"),
                                 {"j": jobs}).scalar()
        if total == N_REALTIME + N_CLAUDE + N_PB and n == 0:
            break
        time.sleep(1)
    elapsed = time.monotonic() - started
    out = json.loads(_cli("budget", "reconcile", "--json"))
    snap = ledger.ledger_snapshot(engine, get_settings())
    live = {k.decode(): v.decode() for k, v in sredis.hgetall(scripts.KEYS[2]).items()}
    today = "global@" + caps_mod.day()
    with engine.connect() as conn:
        spent = {j: _ledger(conn, j) for j in jobs}
        new_spend = conn.execute(sa.text("SELECT coalesce(sum(cost_usd), 0) FROM results WHERE created_at >= :t"),
                                 {"t": t0}).scalar()
        statuses = {j: dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM requests WHERE job_id = :j GROUP BY status"), {"j": j}).all())
            for j in jobs}
        waits = conn.execute(sa.text(
            "SELECT extract(epoch FROM r.created_at - q.started_at) FROM results r"
            " JOIN requests q USING (job_id, custom_id) WHERE r.job_id = :j AND q.started_at IS NOT NULL"),
            {"j": rt_job}).scalars().all()
        cache_writes = conn.execute(sa.text(
            "SELECT coalesce(sum((response->'usage'->>'cache_creation_input_tokens')::bigint), 0)"
            " FROM results WHERE job_id = ANY(:j)"),
            {"j": [rt_job, an_job]}).scalar()
    waits = [float(w) for w in waits]
    caps = {rt_job: job_cap, an_job: an_cap, pb_job: pb_cap}
    with engine.connect() as conn:
        billed = {j: _billed(conn, j) for j in jobs}
        paths = {j: dict(conn.execute(sa.text(
            "SELECT coalesce(path, 'none'), count(*) FROM request_paths WHERE job_id = :j GROUP BY 1"), {"j": j}).all())
            for j in jobs}
    checks = {
        "provider_bill_le_cap_every_job": all(billed[j] <= caps[j] for j in jobs),
        "openai_job_spend_le_cap": spent[rt_job] <= job_cap,
        "openai_job_cap_used_ge_90pct": spent[rt_job] >= job_cap * Decimal("0.9"),
        "anthropic_job_spend_le_cap": spent[an_job] <= an_cap,
        "pb_spend_le_cap": spent[pb_job] <= pb_cap,
        "global_new_spend_le_room": new_spend <= room,
        "ledger_eq_redis_after_reconcile": all(
            live.get(f) == snap["spent"].get(f) for f in [f"job:{j}" for j in jobs] + [today]),
    }
    names = {rt_job: "openai_realtime", an_job: "anthropic_cache_writes", pb_job: "provider_batch"}
    return {"run": i, "ok": all(checks.values()), "checks": checks, "seconds": round(elapsed, 1),
            "jobs": {names[j]: {"cap_usd": str(caps[j]), "spent_usd": str(spent[j]), "billed_usd": str(billed[j]),
                                "cap_used_pct": round(float(spent[j] / caps[j] * 100), 2),
                                "statuses": statuses[j], "paths": paths[j]} for j in jobs},
            "anthropic_cache_write_tokens": int(cache_writes),
            "global_cap_usd": str(global_cap), "global_room_usd": str(room), "new_spend_usd": str(new_spend),
            "claim_to_result_s": {"max": round(max(waits), 1) if waits else None,
                                  "over_old_ttl": sum(w > TTL_S for w in waits), "of": len(waits)},
            "reconcile": {"rebuilt": out["rebuilt"], "drift_usd": out.get("drift_usd")}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rpm", type=int, default=RPM, help="the model's rate limit for the realtime job")
    ap.add_argument("--mode", choices=["auto"], help="the OpenAI and provider-batch jobs under --mode auto")
    args = ap.parse_args()
    engine = db.get_engine()
    _, sredis = scripts.redis_clients(get_settings())
    with engine.connect() as conn:
        previous = conn.execute(sa.text("SELECT usd FROM budget_caps WHERE scope = 'global'")).scalar()
    env = {"LLMBATCH_RATE_LIMITS": f"{MODEL}={args.rpm}:,{CLAUDE}={args.rpm}:", "LLMBATCH_RATE_PEAK_SHARE": "1.0",
           "LLMBATCH_BUDGET_RESERVATION_TTL_S": str(TTL_S), "LLMBATCH_PROVIDER_TIMEOUT_S": str(TTL_S),
           "LLMBATCH_BUDGET_RESERVATION_MARGIN_S": "0"}
    runs = []
    try:
        with restarted("worker-peak", **env), simulator(latency="uniform", latency_ms=300, jitter_ms=100, worst_case=True):
            for i in range(1, args.runs + 1):
                clear_rate_limits()
                r = one_run(i, engine, sredis, args.mode)
                print(json.dumps(r), flush=True)
                runs.append(r)
    finally:
        with engine.begin() as conn:
            if previous is None:
                conn.execute(sa.text("DELETE FROM budget_caps WHERE scope = 'global'"))
            else:
                conn.execute(sa.text("UPDATE budget_caps SET usd = :u WHERE scope = 'global'"), {"u": previous})
        sredis.eval(scripts.SET_CAP, len(scripts.KEYS), *scripts.KEYS, "global",
                    str(units.to_units(previous)) if previous is not None else units.NO_CAP)
    print(json.dumps({"bench": "money", "simulator": "worst case (every call billed to its limits)",
                      "rate_limit": f"{MODEL}, {CLAUDE}: {args.rpm} rpm each", "reservation_ttl_s": TTL_S,
                      "mode": args.mode or "as submitted", "runs": len(runs), "all_ok": all(r["ok"] for r in runs)}))


if __name__ == "__main__":
    main()
