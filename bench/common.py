"""Shared pieces of the benchmarks: the request file, the simulator's knobs, job waits, memory.

The benchmarks run against the local stack that ``make up`` starts (or a second
stack: ``LLMBATCH_PORT_OFFSET`` / ``LLMBATCH_VAR_DIR``). They change the running
simulator through ``POST /_config`` and always restore it (``DELETE /_config``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import sqlalchemy as sa

from pipeline.config import get_settings
from pipeline.stores import db

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
PY = sys.executable
LLMBATCH = str(Path(sys.executable).parent / "llmbatch")


def write_requests(path: Path, n: int, *, model: str = "gpt-4o-mini", prefix: str = "bench",
                   priority: int | None = None, max_tokens: int = 16) -> Path:
    """N OpenAI batch lines; the plain client and the pipeline read the same file."""
    with path.open("w") as f:
        for i in range(n):
            line = {"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": model, "max_tokens": max_tokens, "messages": [
                        {"role": "user", "content": f"Benchmark request {i}: say something short."}]}}
            if priority is not None:
                line["priority"] = priority
            f.write(json.dumps(line) + "\n")
    return path


# ------------------------------------------------------------------ simulator

def _sim(method: str, path: str, body: dict | None = None) -> dict:
    url = get_settings().simulator_url + path
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"{}")


def sim_stats() -> dict:
    return _sim("GET", "/_stats")


def sim_reset() -> None:
    _sim("POST", "/_reset")


@contextlib.contextmanager
def simulator(**changes):
    """Run the block with the simulator reconfigured (``/_config``), stats reset; restore after."""
    _sim("POST", "/_config", changes)
    sim_reset()
    try:
        yield
    finally:
        _sim("DELETE", "/_config")


# ------------------------------------------------------------------ jobs

def wait_job(job_id: str, timeout: float = 600, poll: float = 0.1) -> dict:
    """Wait until every accepted request of the job is terminal; return the counts."""
    engine = db.get_engine()
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            row = conn.execute(sa.text(
                "SELECT j.status, j.accepted,"
                " (SELECT count(*) FROM requests r WHERE r.job_id = j.job_id AND r.status = 'succeeded'),"
                " (SELECT count(*) FROM requests r WHERE r.job_id = j.job_id AND r.status = 'failed')"
                " FROM jobs j WHERE j.job_id = :j"), {"j": job_id}).one()
        status, accepted, ok, failed = row
        if status not in ("submitting", "running") or (accepted and ok + failed >= accepted):
            return {"status": status, "accepted": accepted, "succeeded": ok, "failed": failed}
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id} not finished within {timeout} s: {row}")
        time.sleep(poll)


def job_times(job_id: str) -> dict:
    """Wall times of a job from Postgres: created → last request row, → last result row."""
    with db.get_engine().connect() as conn:
        row = conn.execute(sa.text(
            "SELECT extract(epoch FROM (SELECT max(created_at) FROM results WHERE job_id = :j) - j.created_at),"
            " extract(epoch FROM (SELECT max(created_at) - min(created_at) FROM requests WHERE job_id = :j)),"
            " (SELECT count(*) FROM requests WHERE job_id = :j)"
            " FROM jobs j WHERE j.job_id = :j"), {"j": job_id}).one()
    return {"to_last_result_s": float(row[0]), "requests_written_span_s": float(row[1] or 0),
            "requests": row[2]}


def submit(path: Path, **kwargs) -> dict:
    """Submit in a child process (so its own peak memory is measured); returns its report."""
    code = (
        "import json, sys, time\n"
        "from decimal import Decimal\n"
        "from pathlib import Path\n"
        "from pipeline.intake.producer import submit_file\n"
        "t = time.monotonic()\n"
        f"r = submit_file(Path({str(path)!r}), **{kwargs!r})\n"
        "s = time.monotonic() - t\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print(json.dumps({'job_id': r.job_id, 'lines': r.lines_read, 'accepted': r.accepted,"
        " 'seconds': s, 'peak_rss_mb': int(hwm) / 1024}))\n")
    proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=900)
    if proc.returncode:
        raise SystemExit(f"submit failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the stack's processes

STACK_SH = ROOT / "infra" / "stack.sh"


def stack_sh(action: str, *names: str, env: dict | None = None, check: bool = True) -> str:
    """``infra/stack.sh ACTION NAME...`` for this stack (the env's port offset / var dir)."""
    proc = subprocess.run(["bash", str(STACK_SH), action, *names], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise RuntimeError(f"stack.sh {action} {' '.join(names)} failed: {proc.stdout}{proc.stderr}")
    return proc.stdout


@contextlib.contextmanager
def restarted(*names: str, **env: str):
    """Run the block with the stack processes NAMES restarted with extra environment
    (``LLMBATCH_...`` settings); afterwards they are restarted with the original one."""
    stack_sh("down", *names)
    try:
        stack_sh("up", *names, env=env)
        yield
    finally:
        stack_sh("down", *names, check=False)
        stack_sh("up", *names)


def clear_rate_limits() -> int:
    """Forget the shared rate windows and in-flight leases (pipeline/providers/ratelimit.py), so a run
    does not start with the previous run's window; returns the number of keys deleted."""
    import redis

    from pipeline.providers.ratelimit import K
    r = redis.Redis.from_url(get_settings().redis_url)
    keys = list(r.scan_iter(match=K + "*", count=1000))
    return r.delete(*keys) if keys else 0


def pct(values: list[float], p: float) -> float | None:
    """The p-th percentile (nearest rank) of values; None when there are none."""
    if not values:
        return None
    values = sorted(values)
    return values[max(0, min(len(values) - 1, round(p / 100 * (len(values) - 1))))]


def best_window(times: list[float], width: float) -> int:
    """The most events (by time, seconds) within any window of ``width`` seconds."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] > width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def save(name: str, result: dict, *, echo: bool = True) -> dict:
    RESULTS.mkdir(exist_ok=True)
    result = {"benchmark": name, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "provider": "simulator" if get_settings().simulated else "live", **result}
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    if echo:
        print(json.dumps(result), flush=True)
    return result
