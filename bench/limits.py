"""Issue 5, measured against the simulator: in-flight caps, rate limits, tier shares, crashes, budgets.

Each scenario reconfigures what it needs (the simulator through ``/_config``, stack
processes restarted with extra ``LLMBATCH_*`` settings) and restores it in ``finally``.
One JSON line per scenario; all of them in ``bench/results/limits.json``. Every figure
comes with its ``target`` and whether it was ``met``.

    cd bench && ../.venv/bin/python limits.py [--only NAME[,NAME]] [--quick]

Scenarios (``--only``): concurrency, rates, rates_tpm, tier_shares, crash, budget.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from urllib.parse import urlparse

import sqlalchemy as sa

from common import (LLMBATCH, RESULTS, best_window, clear_rate_limits, pct, restarted, save, sim_stats,
                    simulator, stack_sh, submit, wait_job, write_requests)
from pipeline.config import get_settings
from pipeline.stores import db

MODEL = "gpt-4o-mini"
NOW = lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # noqa: E731


def code_version() -> str:
    """The commit the restarted processes load (``+edits``: uncommitted changes to the pipeline's code)."""
    root = str(Path(__file__).resolve().parent.parent)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root)
    edits = subprocess.run(["git", "status", "--porcelain", "--", "pipeline", "workers", "schedules", "sql"],
                           capture_output=True, text=True, cwd=root)
    return (head.stdout.strip() or "unknown") + ("+edits" if edits.stdout.strip() else "")


def figure(value, target: str, met: bool | None) -> dict:
    return {"value": value, "target": target, "met": met}


def q(sql: str, **params):
    with db.get_engine().connect() as conn:
        return conn.execute(sa.text(sql), params)


def scalar(sql: str, **params):
    return q(sql, **params).scalar()


def results_count(job_id: str) -> int:
    return scalar("SELECT count(*) FROM results WHERE job_id = :j", j=job_id)


def submit_async(path: Path, **kwargs) -> tuple[threading.Thread, dict]:
    """Submit in the background; the returned dict gets the report (``job_id``) when it is done."""
    out: dict = {}

    def go():
        try:
            out.update(submit(path, **kwargs))
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            out["error"] = repr(e)
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


def job_of(name: str, timeout: float = 60) -> str:
    """The id of the newest job called ``name`` (the submit child creates the row first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = scalar("SELECT job_id FROM jobs WHERE name = :n ORDER BY created_at DESC LIMIT 1", n=name)
        if j:
            return j
        time.sleep(0.05)
    raise SystemExit(f"no job named {name} after {timeout} s")


def wait_sim_idle(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sim_stats()["total"]["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)


def success_times(job_id: str) -> list[float]:
    return [float(t) for t in q(
        "SELECT extract(epoch FROM created_at) FROM results WHERE job_id = :j AND status_code = 200",
        j=job_id).scalars()]


# ------------------------------------------------------------------ 1. concurrency

def concurrency(quick: bool) -> dict:
    """4 worker processes on tier peak, a per-tier in-flight cap of 32: does the provider see 32, never more?"""
    n, cap = (1200, 32) if quick else (3200, 32)
    started = time.monotonic()
    name = f"limits-concurrency-{int(time.time())}"
    samples: list[tuple[float, int]] = []        # (monotonic, simulator in_flight)
    remaining: list[tuple[float, int]] = []      # (monotonic, requests of the job not yet terminal)
    running_batches: list[int] = []               # the job's batches running at once (one per busy process)
    with restarted("worker-peak", LLMBATCH_WORKER_CONCURRENCY="peak=4", LLMBATCH_INFLIGHT_PER_TIER=f"peak={cap}"), \
            tempfile.TemporaryDirectory() as tmp, \
            simulator(latency="uniform", latency_ms=400, jitter_ms=100):
        clear_rate_limits()
        procs = _pool_processes("worker-peak")
        path = write_requests(Path(tmp) / "c.jsonl", n, prefix=name)
        t, sub = submit_async(path, name=name)
        job = job_of(name)
        stop = threading.Event()

        def count_remaining():
            while not stop.is_set():
                remaining.append((time.monotonic(), n - results_count(job)))
                running_batches.append(scalar(
                    "SELECT count(*) FROM batches WHERE status = 'running' AND batch_id IN"
                    " (SELECT DISTINCT batch_id FROM requests WHERE job_id = :j)", j=job))
                time.sleep(0.1)
        counter = threading.Thread(target=count_remaining, daemon=True)
        counter.start()
        while True:
            samples.append((time.monotonic(), sim_stats()["total"]["in_flight"]))
            if remaining and remaining[-1][1] == 0:
                break
            if time.monotonic() - started > 600:
                break
            time.sleep(0.05)
        stop.set()
        counter.join()
        t.join()
        counts = wait_job(job, timeout=120)
        stats = sim_stats()["total"]
    # the job's steady state: from 1 s after the provider first saw a call, while more than
    # `cap` requests of the job were not yet terminal (before the drain)
    first = next((ts for ts, f in samples if f > 0), None)
    steady, low = [], []
    for ts, f in samples:
        if first is None or ts < first + 1.0:
            continue
        before = [r for rt, r in remaining if rt <= ts]
        if before and before[-1] > cap:
            steady.append(f)
            if f < 28:
                low.append([round(ts - first, 2), f, before[-1]])
    steady_min, steady_p5, steady_p50 = min(steady, default=None), pct(steady, 5), pct(steady, 50)
    return {
        "requests": n, "job": job, **counts, "worker_processes": 4, "pool_processes_seen": procs,
        "max_batches_running_at_once": figure(max(running_batches, default=0), "4 (every process busy)",
                                              max(running_batches, default=0) >= 4),
        "inflight_per_tier": cap, "simulated_latency_ms": "uniform 300-500",
        "samples": len(samples), "steady_samples": len(steady),
        "peak_in_flight_provider": figure(stats["peak_concurrency"], f"<= {cap}", stats["peak_concurrency"] <= cap),
        "max_in_flight_sampled": max((f for _, f in samples), default=0),
        "steady_in_flight_min": figure(steady_min, ">= 28", steady_min is not None and steady_min >= 28),
        "steady_in_flight_p5": figure(steady_p5, ">= 28", steady_p5 is not None and steady_p5 >= 28),
        "steady_in_flight_median": figure(steady_p50, ">= 28", steady_p50 is not None and steady_p50 >= 28),
        # every steady sample below 28: [seconds since the first call, in flight, requests not terminal]
        "steady_samples_below_28": low[:200], "steady_samples_below_28_count": len(low),
        "provider_429s": stats["errors"].get("429", 0),
        "seconds": round(time.monotonic() - started, 1),
    }


def _pool_processes(name: str) -> int:
    pid = int((get_settings().var_dir / "run" / f"{name}.pid").read_text().split()[0])
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += (task / "children").read_text().split()
    return len(kids)


# ------------------------------------------------------------------ 2. rates

def rates(quick: bool, rpm: int = 600) -> dict:
    """The pipeline's limit equal to the provider's: no 429, the limit used to ≥ 95 %."""
    n = 700 if quick else 3000
    started = time.monotonic()
    env = {"LLMBATCH_RATE_LIMITS": f"{MODEL}={rpm}:", "LLMBATCH_RATE_PEAK_SHARE": "1.0"}
    with restarted("worker-peak", **env), tempfile.TemporaryDirectory() as tmp, \
            simulator(latency="uniform", latency_ms=300, jitter_ms=100, rpm=rpm):
        clear_rate_limits()
        path = write_requests(Path(tmp) / "r.jsonl", n, prefix=f"limits-rates-{int(time.time())}")
        sub = submit(path, name="limits-rates")
        counts = wait_job(sub["job_id"], timeout=900)
        stats = sim_stats()["total"]
    return {"limit": f"rpm {rpm}", **_rate_figures(sub["job_id"], n, counts, stats, per_minute=rpm),
            "note": "peak job with rate_peak_share=1.0: by design (docs/USAGE.md, Tiers and windows) peak alone may fill only 70 % "
                    "of a model's limit, so the full limit is measured with the share lifted",
            "seconds": round(time.monotonic() - started, 1)}


def rates_tpm(quick: bool) -> dict:
    """The same with a tokens-per-minute limit only (input + max_tokens per call, as providers count)."""
    n = 700 if quick else 1200
    started = time.monotonic()
    # one request of write_requests(): ~15 input tokens + max_tokens 16; read the real figure
    with tempfile.TemporaryDirectory() as tmp:
        path = write_requests(Path(tmp) / "t.jsonl", n, prefix=f"limits-tpm-{int(time.time())}")
        per_call = _tokens_per_call(path)
        tpm = per_call * 600        # about 600 calls a minute
        env = {"LLMBATCH_RATE_LIMITS": f"{MODEL}=:{tpm}", "LLMBATCH_RATE_PEAK_SHARE": "1.0"}
        with restarted("worker-peak", **env), simulator(latency="uniform", latency_ms=300, jitter_ms=100, tpm=tpm):
            clear_rate_limits()
            sub = submit(path, name="limits-rates-tpm")
            counts = wait_job(sub["job_id"], timeout=900)
            stats = sim_stats()["total"]
    figs = _rate_figures(sub["job_id"], n, counts, stats, per_minute=tpm // per_call, window=60.0)
    return {"limit": f"tpm {tpm} ({per_call} tokens a call, = {tpm // per_call} calls/min)", **figs,
            "provider_peak_tokens_60s": stats["peak_tokens_60s"],
            "seconds": round(time.monotonic() - started, 1)}


def _tokens_per_call(path: Path) -> int:
    from pipeline.intake.formats import parse_request
    from pipeline.money.pricing import get_price_book
    from pipeline.providers.ratelimit import request_tokens
    first = json.loads(path.read_text().splitlines()[0])
    req = parse_request(first, get_price_book())
    return request_tokens({"input_tokens": req.input_tokens, "body": first["body"]})


def _rate_figures(job: str, n: int, counts: dict, stats: dict, per_minute: int, window: float = 180.0) -> dict:
    times = success_times(job)
    span = (max(times) - min(times)) if len(times) > 1 else 0
    w = int(window)
    best = best_window(times, window)
    allowed = per_minute * window / 60
    avg = (len(times) / span * 60 / per_minute) if span else None
    # steady state: the window after the first minute (a fresh window lets a burst through at once)
    t0 = min(times) if times else 0
    steady = sum(1 for t in times if t0 + 60 <= t < t0 + 60 + window)
    steady_ok = span >= 60 + window
    return {
        "requests": n, "job": job, **counts,
        "provider_429s": figure(stats["errors"].get("429", 0), "0", stats["errors"].get("429", 0) == 0),
        f"best_{w}s_ratio_of_limit": figure(round(best / allowed, 3), ">= 0.95", best / allowed >= 0.95),
        f"steady_{w}s_after_first_minute_ratio": figure(
            round(steady / allowed, 3) if steady_ok else None, ">= 0.95",
            steady / allowed >= 0.95 if steady_ok else None),
        "job_average_ratio_of_limit": round(avg, 3) if avg else None,
        "job_seconds_first_to_last_result": round(span, 1),
        "best_60s_successes": best_window(times, 60.0),
        "provider_requests": stats["requests"], "provider_peak_requests_60s": stats["peak_requests_60s"],
        "provider_peak_concurrency": stats["peak_concurrency"],
    }


# ------------------------------------------------------------------ 3. tier shares

def tier_shares(quick: bool, rpm: int = 600, rate: float = 2.0) -> dict:
    """Immediate latency with and without a peak job saturating the same model's limit."""
    duration = 20.0 if quick else 60.0
    bulk_n = 500 if quick else 1000
    started = time.monotonic()
    env = {"LLMBATCH_RATE_LIMITS": f"{MODEL}={rpm}:"}
    out: dict = {"limit_rpm": rpm, "immediate_per_s": rate, "stream_seconds": duration}
    with restarted("worker-immediate", "worker-peak", **env), \
            simulator(latency="uniform", latency_ms=300, jitter_ms=100, rpm=rpm):
        clear_rate_limits()
        alone = _immediate_stream(f"limits-imm-alone-{int(time.time())}", rate, duration)
        wait_sim_idle()
        clear_rate_limits()
        with tempfile.TemporaryDirectory() as tmp:
            name = f"limits-shares-bulk-{int(time.time())}"
            path = write_requests(Path(tmp) / "b.jsonl", bulk_n, prefix=name)
            t, sub = submit_async(path, name=name)
            job = job_of(name)
            # start once the peak job has filled its share of the window
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                peak_seen = sim_stats()["by_tier"].get("peak", {}).get("requests", 0)
                if peak_seen >= int(rpm * 0.7 * 0.9):
                    break
                time.sleep(0.1)
            loaded = _immediate_stream(f"limits-imm-loaded-{int(time.time())}", rate, duration)
            bulk_during = scalar("SELECT count(*) FROM results WHERE job_id = :j", j=job)
            t.join()
            bulk = wait_job(job, timeout=600)
        stats = sim_stats()
    tiers = stats["by_tier"]
    ratio = {k: (round(loaded[k] / alone[k], 3) if alone.get(k) and loaded.get(k) else None)
             for k in ("p50", "p90", "row_to_result_p50", "row_to_result_p90")}
    out.update({
        "immediate_alone_ms": alone, "immediate_with_peak_ms": loaded,
        "ratio_p50": figure(ratio["p50"], "<= 1.2", ratio["p50"] is not None and ratio["p50"] <= 1.2),
        "ratio_p90": figure(ratio["p90"], "<= 1.2", ratio["p90"] is not None and ratio["p90"] <= 1.2),
        "ratio_row_to_result_p50": ratio["row_to_result_p50"], "ratio_row_to_result_p90": ratio["row_to_result_p90"],
        "peak_job": job, "peak_requests": bulk_n, "peak_status": bulk, "peak_results_while_streaming": bulk_during,
        "provider_429s": figure(stats["total"]["errors"].get("429", 0), "0", stats["total"]["errors"].get("429", 0) == 0),
        "provider_peak_requests_60s": {k: v["peak_requests_60s"] for k, v in tiers.items()},
        "provider_peak_requests_60s_total": stats["total"]["peak_requests_60s"],
        "seconds": round(time.monotonic() - started, 1),
    })
    return out


def _immediate_stream(job_id: str, rate: float, duration: float) -> dict:
    """Publish ``rate`` immediate requests a second for ``duration`` s; latency = result row − publish."""
    from pipeline.intake.kafka import make_producer
    from pipeline.intake.producer import publish_request
    settings = get_settings()
    producer = make_producer(settings)
    n = int(rate * duration)
    t0 = time.monotonic()
    for i in range(n):
        line = {"custom_id": f"imm-{i}", "method": "POST", "url": "/v1/chat/completions", "priority": 9,
                "body": {"model": MODEL, "max_tokens": 8,
                         "messages": [{"role": "user", "content": f"immediate {job_id} {i}"}]}}
        publish_request(line, job_id=job_id, producer=producer, settings=settings)
        time.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))
    deadline = time.monotonic() + 120
    while results_count(job_id) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    rows = q("SELECT extract(epoch FROM x.created_at - q.published_at) * 1000, x.latency_ms, q.tier,"
             " x.status_code, extract(epoch FROM x.created_at - q.created_at) * 1000,"
             " extract(epoch FROM q.created_at - q.published_at) * 1000"
             " FROM requests q JOIN results x USING (job_id, custom_id) WHERE q.job_id = :j",
             j=job_id).all()
    total = [float(r[0]) for r in rows]
    worker = [float(r[4]) for r in rows]
    batcher = [float(r[5]) for r in rows]
    provider = [float(r[1]) for r in rows if r[1] is not None]
    return {"job": job_id, "sent": n, "answered": len(rows), "ok": sum(1 for r in rows if r[3] == 200),
            "tiers": sorted({r[2] for r in rows}),
            "p50": round(pct(total, 50), 1) if total else None, "p90": round(pct(total, 90), 1) if total else None,
            "p99": round(pct(total, 99), 1) if total else None, "max": round(max(total), 1) if total else None,
            "provider_call_p50": round(pct(provider, 50), 1) if provider else None,
            # the same split as bench/latency.py: publish -> request row (batcher), row -> result (workers)
            "publish_to_row_p50": round(pct(batcher, 50), 1) if batcher else None,
            "publish_to_row_p90": round(pct(batcher, 90), 1) if batcher else None,
            "row_to_result_p50": round(pct(worker, 50), 1) if worker else None,
            "row_to_result_p90": round(pct(worker, 90), 1) if worker else None}


# ------------------------------------------------------------------ 4. crash

def crash(quick: bool, kills: int = 3) -> dict:
    """kill -9 the peak worker (its whole process group) three times during a job."""
    n = 3000 if quick else 10000
    started = time.monotonic()
    lease = {"LLMBATCH_BATCH_LEASE_S": "10"}
    name = f"limits-crash-{int(time.time())}"
    at_kills: list[dict] = []
    with restarted("batcher", LLMBATCH_SWEEP_AFTER_S="5"), restarted("worker-peak", **lease), \
            tempfile.TemporaryDirectory() as tmp, simulator(latency="uniform", latency_ms=75, jitter_ms=25):
        clear_rate_limits()
        path = write_requests(Path(tmp) / "k.jsonl", n, prefix=name)
        t, sub = submit_async(path, name=name)
        job = job_of(name)
        for k in range(kills):
            threshold = int(n * (0.15 + 0.25 * k))
            while results_count(job) < threshold:
                time.sleep(0.05)
            # let the restarted worker get busy again before the next kill
            while sim_stats()["total"]["in_flight"] == 0:
                time.sleep(0.02)
            done_before = results_count(job)
            pid = int((get_settings().var_dir / "run" / "worker-peak.pid").read_text().split()[0])
            in_flight = sim_stats()["total"]["in_flight"]
            os.killpg(pid, signal.SIGKILL)    # what `stack.sh kill` does (the worker leads its group)
            at_kills.append({"results_before": done_before, "provider_in_flight": in_flight,
                             "t": round(time.monotonic() - started, 1)})
            stack_sh("kill", "worker-peak")   # waits for it to be gone, clears the pid file
            stack_sh("up", "worker-peak", env=lease)
        t.join()
        counts = wait_job(job, timeout=900)
        wait_sim_idle()
        time.sleep(2)   # a call still on its way would show as in flight
        stats = sim_stats()["total"]
    checks = q(
        "SELECT (SELECT count(*) FROM results WHERE job_id = :j),"
        " (SELECT count(*) - count(DISTINCT (job_id, custom_id)) FROM results WHERE job_id = :j),"
        " (SELECT count(*) FROM requests WHERE job_id = :j AND status NOT IN ('succeeded', 'failed', 'cancelled')),"
        " (SELECT count(*) FROM requests WHERE job_id = :j),"
        " (SELECT max(deliveries) FROM batches WHERE batch_id IN (SELECT batch_id FROM requests WHERE job_id = :j)),"
        " (SELECT count(*) FROM attempts WHERE job_id = :j),"
        " (SELECT status FROM jobs WHERE job_id = :j)", j=job).one()
    n_results, dup_rows, open_, n_requests, max_deliveries, attempts, job_status = checks
    in_flight_sum = sum(k["provider_in_flight"] for k in at_kills)
    return {
        "requests": n, "job": job, **counts, "job_status_at_the_end": job_status, "kills": at_kills, "batch_lease_s": 10, "sweep_after_s": 5,
        "simulated_latency_ms": "uniform 50-100",
        "results_rows": figure(n_results, f"== {n}", n_results == n),
        "requests_not_terminal": figure(open_, "0", open_ == 0 and n_requests == n),
        "duplicate_result_rows": figure(dup_rows, "0", dup_rows == 0),
        "provider_duplicates": figure(stats["duplicates"], f"<= {in_flight_sum} (sum of in flight at the kills)",
                                      stats["duplicates"] <= in_flight_sum),
        "provider_in_flight_at_kills_sum": in_flight_sum,
        # answered by the provider (200) but no result row kept: answers that died in the killed
        # processes' buffers (outcomes are written every FLUSH_EVERY_S, workers/writer.py)
        "provider_answered_not_recorded": stats["successes"] - n_results,
        "provider_requests": stats["requests"], "attempt_rows": attempts,
        "provider_errors": stats["errors"], "max_batch_deliveries": max_deliveries,
        "seconds": round(time.monotonic() - started, 1),
    }


# ------------------------------------------------------------------ 5. budget

def budget(quick: bool) -> dict:
    """A job cap worth ~100 requests, 64 in flight, Redis FLUSHALL midway: spend ≤ cap, ≥ 90 % used."""
    n, worth = (400, 100) if quick else (1000, 100)
    started = time.monotonic()
    name = f"limits-budget-{int(time.time())}"
    settings = get_settings()
    redis_port = str(urlparse(settings.redis_url).port)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_requests(Path(tmp) / "b.jsonl", n, prefix=name)
        max_cost = _max_cost(path)
        cap = (max_cost * worth).quantize(Decimal("0.00000001"), rounding=ROUND_CEILING)
        with restarted("scheduler", LLMBATCH_STUCK_DISPATCHED_S="10", LLMBATCH_UPKEEP_EVERY_S="5"), \
                restarted("worker-peak", LLMBATCH_INFLIGHT_PER_TIER="peak=64"), \
                simulator(latency="uniform", latency_ms=500, jitter_ms=400):
            clear_rate_limits()
            t, sub = submit_async(path, name=name, budget_usd=cap, on_budget="defer")
            job = job_of(name)
            while (done := results_count(job)) < 50 and time.monotonic() - started < 120:
                time.sleep(0.02)
            flushed = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", redis_port, "FLUSHALL"],
                                     capture_output=True, text=True, timeout=30)
            flush_at = {"results_before": done, "provider_in_flight": sim_stats()["total"]["in_flight"],
                        "redis_cli": (flushed.stdout + flushed.stderr).strip(),
                        "t": round(time.monotonic() - started, 1)}
            t.join()
            status = _wait_status(job, ("paused_budget", "completed", "completed_with_errors", "failed", "cancelled"), 300)
            paused_at = round(time.monotonic() - started, 1)
            spend = scalar("SELECT coalesce(sum(cost_usd), 0) FROM results WHERE job_id = :j", j=job)
            by_status = dict(q("SELECT status, count(*) FROM requests WHERE job_id = :j GROUP BY 1", j=job).all())
            deferred_scope = dict(q("SELECT deferred_scope, count(*) FROM requests WHERE job_id = :j"
                                    " AND status = 'deferred' GROUP BY 1", j=job).all())
            provider_calls_paused = sim_stats()["total"]["requests"]
            raised = (max_cost * n * 2).quantize(Decimal("0.00000001"), rounding=ROUND_CEILING)
            cli = subprocess.run([LLMBATCH, "budget", "set", "--job", job, "--usd", str(raised)],
                                 capture_output=True, text=True, timeout=60, cwd=str(Path(__file__).parent.parent))
            final = _wait_status(job, ("completed", "completed_with_errors", "failed", "cancelled"), 300)
            final_counts = dict(q("SELECT status, count(*) FROM requests WHERE job_id = :j GROUP BY 1", j=job).all())
            final_spend = scalar("SELECT coalesce(sum(cost_usd), 0) FROM results WHERE job_id = :j", j=job)
            stats = sim_stats()["total"]
    used = spend / cap
    return {
        "requests": n, "job": job, "max_cost_per_request_usd": str(max_cost), "cap_usd": str(cap),
        "cap_worth_requests": worth, "in_flight_cap": 64, "flushall": flush_at,
        "status_after_cap": figure(status, "paused_budget", status == "paused_budget"),
        "paused_after_s": paused_at, "requests_at_pause": by_status, "deferred_scopes": deferred_scope,
        "provider_calls_at_pause": provider_calls_paused,
        "spend_usd": str(spend),
        "spend_within_cap": figure(str(spend), f"<= {cap}", spend <= cap),
        "cap_used": figure(round(float(used), 4), ">= 0.9", used >= Decimal("0.9")),
        "raised_cap_usd": str(raised), "budget_set": (cli.stdout + cli.stderr).strip(),
        "final_status": final,
        "all_finished_after_raise": figure(final_counts, f"succeeded == {n}", final_counts.get("succeeded") == n),
        "final_spend_usd": str(final_spend), "provider_requests": stats["requests"],
        "provider_duplicates": stats["duplicates"], "provider_errors": stats["errors"],
        "seconds": round(time.monotonic() - started, 1),
    }


def _max_cost(path: Path) -> Decimal:
    from pipeline.intake.formats import parse_request
    from pipeline.money.pricing import get_price_book
    book = get_price_book()
    return max(parse_request(json.loads(line), book).max_cost_usd for line in path.read_text().splitlines())


def _wait_status(job: str, wanted: tuple, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = scalar("SELECT status FROM jobs WHERE job_id = :j", j=job)
        if status in wanted:
            return status
        time.sleep(0.2)
    return status


# ------------------------------------------------------------------ main

SCENARIOS = {"concurrency": concurrency, "rates": rates, "rates_tpm": rates_tpm, "tier_shares": tier_shares,
             "crash": crash, "budget": budget}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated scenarios: " + ", ".join(SCENARIOS))
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the harness")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [x for x in names if x not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    # a partial run keeps the other scenarios' last results in limits.json
    previous = {}
    old = RESULTS / "limits.json"
    if old.exists():
        previous = json.loads(old.read_text()).get("scenarios", {})
    scenarios = dict(previous)
    for name in names:
        t = time.monotonic()
        try:
            code = code_version()
            result = {"scenario": name, "at": NOW(), "quick": args.quick, "code": code,
                      **SCENARIOS[name](args.quick)}
        except Exception as e:  # noqa: BLE001 - one scenario failing must not lose the others
            result = {"scenario": name, "at": NOW(), "quick": args.quick, "code": code, "error": repr(e),
                      "seconds": round(time.monotonic() - t, 1)}
        scenarios[name] = result
        print(json.dumps(result), flush=True)
    save("limits", {"scenarios": scenarios}, echo=False)


if __name__ == "__main__":
    main()
