"""The money run (issue 13): every path under its caps at once, printed as JSON.

Per run, all at once against the stack:

- a realtime job of 2,000 requests (peak tier, 64 in flight per batch) under a job cap worth
  about 100 requests' maximum, through a rate limit tight enough that requests wait longer
  than the reservation TTL (the TTL is shortened to 5 s for the run: the "old TTL" a hold
  used to die at while it waited);
- a provider-batch job of 300 requests with its own cap;
- a global daily cap set from another process (``llmbatch budget set global …`` with an
  environment that has no caps in it) just before, at "today's ledger + room".

Checks: spend ≤ every cap, ≥ 90 % of the job cap used, and after ``llmbatch budget reconcile``
the Redis counters equal the Postgres ledger for both jobs and the global day.

Usage: ``python bench/money.py [--runs 5]`` against ``make up``. Benchmarks are not part of CI.
The simulator's adversarial worst-case mode (another branch) is used when it offers one
(``worst_case``); otherwise the run says ``"simulator": "current (no worst-case mode)"``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import LLMBATCH, clear_rate_limits, restarted, simulator  # noqa: E402

from pipeline import budget, db  # noqa: E402
from pipeline.config import get_settings  # noqa: E402
from pipeline.pricing import get_price_book, max_cost  # noqa: E402

MODEL = "gpt-4o-mini"
RPM = 60
TTL_S = 5
N_REALTIME, N_PB = 2000, 300
MAX_TOKENS = 32


def _lines(path: Path, n: int, tag: str, priority: int | None) -> Path:
    with path.open("w") as f:
        for i in range(n):
            line = {"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": MODEL, "max_tokens": MAX_TOKENS, "messages": [
                        {"role": "user", "content": f"Money run {tag} {i}: name a prime above {i}."}]}}
            if priority is not None:
                line["priority"] = priority
            f.write(json.dumps(line) + "\n")
    return path


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


def one_run(i: int, engine, sredis) -> dict:
    started = time.monotonic()
    line_max = max_cost(get_price_book().resolve(MODEL), 25, MAX_TOKENS)
    job_cap = (line_max * 100).quantize(budget.UNIT)
    pb_cap = Decimal("0.001")
    with engine.connect() as conn:
        before = conn.execute(sa.text("SELECT coalesce(sum(cost_usd), 0) FROM results"
                                      " WHERE created_at >= date_trunc('day', now() AT TIME ZONE 'UTC')"
                                      " AT TIME ZONE 'UTC'")).scalar()
        t0 = conn.execute(sa.text("SELECT now()")).scalar()
    room = job_cap + pb_cap + line_max * 20
    global_cap = before + room
    # another process, with no caps in its environment, sets the global cap
    _cli("budget", "set", "global", global_cap, env={"LLMBATCH_BUDGET_GLOBAL_DAILY_USD": ""})
    tag = f"money{i}-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory() as tmp:
        rt = _lines(Path(tmp) / "rt.jsonl", N_REALTIME, tag + "-rt", 6)
        pb = _lines(Path(tmp) / "pb.jsonl", N_PB, tag + "-pb", None)
        procs = [subprocess.Popen([LLMBATCH, "submit", str(rt), "--json", "--budget-usd", str(job_cap)],
                                  stdout=subprocess.PIPE, text=True),
                 subprocess.Popen([LLMBATCH, "submit", str(pb), "--json", "--budget-usd", str(pb_cap),
                                   "--mode", "provider_batch", "--tier", "background"],
                                  stdout=subprocess.PIPE, text=True)]
        jobs = [json.loads(p.communicate(timeout=300)[0])["job_id"] for p in procs]
    rt_job, pb_job = jobs
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            n = _open(conn, rt_job) + _open(conn, pb_job)
            total = conn.execute(sa.text("SELECT count(*) FROM requests WHERE job_id = ANY(:j)"),
                                 {"j": jobs}).scalar()
        if total == N_REALTIME + N_PB and n == 0:
            break
        time.sleep(1)
    elapsed = time.monotonic() - started
    out = json.loads(_cli("budget", "reconcile", "--json"))
    snap = budget.ledger_snapshot(engine, get_settings())
    live = {k.decode(): v.decode() for k, v in sredis.hgetall(budget.KEYS[2]).items()}
    today = "global@" + budget.day()
    with engine.connect() as conn:
        rt_spent, pb_spent = _ledger(conn, rt_job), _ledger(conn, pb_job)
        new_spend = conn.execute(sa.text("SELECT coalesce(sum(cost_usd), 0) FROM results WHERE created_at >= :t"),
                                 {"t": t0}).scalar()
        statuses = {j: dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM requests WHERE job_id = :j GROUP BY status"), {"j": j}).all())
            for j in jobs}
        waits = conn.execute(sa.text(
            "SELECT extract(epoch FROM r.created_at - q.started_at) FROM results r"
            " JOIN requests q USING (job_id, custom_id) WHERE r.job_id = :j AND q.started_at IS NOT NULL"),
            {"j": rt_job}).scalars().all()
    waits = [float(w) for w in waits]
    checks = {
        "job_spend_le_cap": rt_spent <= job_cap,
        "job_cap_used_ge_90pct": rt_spent >= job_cap * Decimal("0.9"),
        "pb_spend_le_cap": pb_spent <= pb_cap,
        "global_new_spend_le_room": new_spend <= room,
        "ledger_eq_redis_after_reconcile": all(
            live.get(f) == snap["spent"].get(f) for f in (f"job:{rt_job}", f"job:{pb_job}", today)),
    }
    return {"run": i, "ok": all(checks.values()), "checks": checks, "seconds": round(elapsed, 1),
            "job_cap_usd": str(job_cap), "job_spent_usd": str(rt_spent),
            "job_cap_used_pct": round(float(rt_spent / job_cap * 100), 2),
            "pb_cap_usd": str(pb_cap), "pb_spent_usd": str(pb_spent),
            "global_cap_usd": str(global_cap), "global_room_usd": str(room), "new_spend_usd": str(new_spend),
            "statuses": {"realtime": statuses[rt_job], "provider_batch": statuses[pb_job]},
            "claim_to_result_s": {"max": round(max(waits), 1) if waits else None,
                                  "over_old_ttl": sum(w > TTL_S for w in waits), "of": len(waits)},
            "reconcile": {"rebuilt": out["rebuilt"], "drift_usd": out.get("drift_usd")}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rpm", type=int, default=RPM, help="the model's rate limit for the realtime job")
    args = ap.parse_args()
    engine = db.get_engine()
    _, sredis = budget.redis_clients(get_settings())
    with engine.connect() as conn:
        previous = conn.execute(sa.text("SELECT usd FROM budget_caps WHERE scope = 'global'")).scalar()
    env = {"LLMBATCH_RATE_LIMITS": f"{MODEL}={args.rpm}:", "LLMBATCH_RATE_PEAK_SHARE": "1.0",
           "LLMBATCH_BUDGET_RESERVATION_TTL_S": str(TTL_S), "LLMBATCH_PROVIDER_TIMEOUT_S": str(TTL_S),
           "LLMBATCH_BUDGET_RESERVATION_MARGIN_S": "0"}
    runs = []
    try:
        with restarted("worker-peak", **env), simulator(latency="uniform", latency_ms=300, jitter_ms=100):
            for i in range(1, args.runs + 1):
                clear_rate_limits()
                r = one_run(i, engine, sredis)
                print(json.dumps(r), flush=True)
                runs.append(r)
    finally:
        with engine.begin() as conn:
            if previous is None:
                conn.execute(sa.text("DELETE FROM budget_caps WHERE scope = 'global'"))
            else:
                conn.execute(sa.text("UPDATE budget_caps SET usd = :u WHERE scope = 'global'"), {"u": previous})
        sredis.eval(budget.SET_CAP, len(budget.KEYS), *budget.KEYS, "global",
                    str(budget.to_units(previous)) if previous is not None else budget.NO_CAP)
    print(json.dumps({"bench": "money", "simulator": "current (no worst-case mode on this branch)",
                      "rate_limit": f"{MODEL} {args.rpm} rpm", "reservation_ttl_s": TTL_S,
                      "runs": len(runs), "all_ok": all(r["ok"] for r in runs)}))


if __name__ == "__main__":
    main()
