"""Fault injection on a real local stack: shared helpers and the fixtures that restore it.

These tests kill and restart the stack's processes, so they run only on a
stack of their own: ``make test-faults`` starts one on shifted ports
(``LLMBATCH_PORT_OFFSET``, own ``LLMBATCH_VAR_DIR``) with short leases so a
killed worker's batch comes back within seconds, sets ``LLMBATCH_FAULTS=1``,
runs this directory and stops the stack. Without ``LLMBATCH_FAULTS=1`` every
test here is skipped, so ``pytest tests`` on a shared stack never kills
anything.

The stack runs under supervisord (infra/supervise.py), as production runs
under systemd or Kubernetes: a scenario that kill -9s a process does not
start it again itself. ``crash`` kills it and then waits for the supervisor
to have started it again (a new pid, its restart count one higher), so each
scenario proves both that the pipeline survives the crash and that the
stack brings the process back.

Every scenario submits a small job (a few hundred to 2,000 requests, the
simulator at 20–50 ms so the fault lands mid-job, every call billed to its
limit: ``worst_case``) and ends with ``check_invariants``: every request
terminal, exactly one result per request, duplicate provider calls counted,
no provider traffic once the job is over, and the money (tests/faults/money.py):
the provider's bill for the job, by the simulator's own count and prices, is
in the pipeline's ledger (nothing spent unseen) and within the job's cap. The
cap is set from the job itself (``JobCaps``) so that it can bind: each
scenario says in its docstring which cap it uses and why.
"""

from __future__ import annotations

import contextlib
import json
import urllib.parse
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipeline.config import ROOT, get_settings
from pipeline.ids import request_key
from pipeline.money.bounds import request_bound
from pipeline.money.ledger import JOB_SPENT_SQL
from pipeline.money.pricing import get_price_book
from pipeline.stores import db
from tests.faults.money import Bill, Ledger, calls_without_a_row, money_failures, unseen_keys
from tests.integration.conftest import LLMBATCH, simulator_call, stack, wait_for  # noqa: F401  (stack: pytest fixture)

STACK_SH = ROOT / "infra" / "stack.sh"
REPORT = Path(os.environ.get("LLMBATCH_FAULT_REPORT", ROOT / "var" / "fault-report.jsonl"))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LLMBATCH_FAULTS") == "1":
        return
    skip = pytest.mark.skip(reason="fault tests kill processes: run them on their own stack with "
                                   "`make test-faults` (sets LLMBATCH_FAULTS=1)")
    for item in items:
        if "tests/faults/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


# ------------------------------------------------------------------ the stack

def stack_sh(action: str, *names: str, check: bool = True) -> str:
    proc = subprocess.run(["bash", str(STACK_SH), action, *names], capture_output=True, text=True,
                          cwd=ROOT, timeout=180)
    if check and proc.returncode != 0:
        raise AssertionError(f"stack.sh {action} {' '.join(names)} failed: {proc.stdout}{proc.stderr}")
    return proc.stdout


def restart_with_env(name: str, **env: str) -> None:
    """Restart one app process of the stack with extra environment (restored by ``restore_stack``)."""
    stack_sh("down", name)
    proc = subprocess.run(["bash", str(STACK_SH), "up", name], capture_output=True, text=True, cwd=ROOT,
                          timeout=180, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout + proc.stderr


class Extras:
    """Processes a test starts itself (extra batchers); all stopped at teardown, by pid."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def batcher(self) -> subprocess.Popen:
        log = open(get_settings().var_dir / "log" / f"extra-batcher-{len(self.procs)}.log", "ab")
        p = subprocess.Popen([LLMBATCH, "--log-level", "INFO", "batcher"], cwd=ROOT, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 30) -> None:
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)

    def stop_all(self) -> None:
        for p in self.procs:
            self.stop(p)


@pytest.fixture
def extras():
    e = Extras()
    yield e
    e.stop_all()


@pytest.fixture(autouse=True)
def restore_stack(request):
    """After every fault test: the simulator's startup config back, every stack process up again,
    processes restarted with extra environment restarted without it."""
    if os.environ.get("LLMBATCH_FAULTS") != "1":
        yield
        return
    before = {n: s for n, s in _status().items()}
    yield
    with contextlib.suppress(Exception):
        sim("DELETE", "/_config")
    if getattr(request.node, "restart_plain", None):
        for name in request.node.restart_plain:
            stack_sh("down", name, check=False)
    stack_sh("up", *[n for n, s in before.items() if s == "up"], check=False)
    after = _status()
    down = [n for n, s in before.items() if s == "up" and after.get(n) != "up"]
    assert not down, f"could not restore {down}"


def _status() -> dict[str, str]:
    return {name: row["state"] for name, row in supervised().items()}


def supervised(*names: str) -> dict[str, dict]:
    """``stack.sh status``: per process its state (up, starting, backoff, down, fatal, ...),
    pid and restart count, as the supervisor reports them."""
    out = {}
    for line in stack_sh("status", *names, check=False).splitlines():
        parts = line.split()
        if len(parts) < 6 or parts[0] in ("NAME", "supervisord"):
            continue
        out[parts[0]] = {"state": parts[1], "pid": None if parts[2] == "-" else int(parts[2]),
                         "restarts": 0 if parts[4] == "-" else int(parts[4])}
    return out


def crash(name: str, *, leader_only: bool = False, timeout: float = 240) -> dict:
    """kill -9 NAME, as a crash would, and wait until the supervisor has started it again.

    ``stack.sh kill`` kills the process group; ``leader_only`` kills just the leader (the
    Postgres postmaster, whose backends then outlive it as after a real postmaster crash).
    Nothing here starts the process: the new pid and the restart count one higher are the
    supervisor's work. Returns the process's row after the restart."""
    before = supervised(name)[name]
    assert before["state"] == "up" and before["pid"], f"{name} is not up before the crash: {before}"
    if leader_only:
        os.kill(before["pid"], signal.SIGKILL)
    else:
        stack_sh("kill", name)

    def restarted():
        row = supervised(name).get(name, {})
        if row.get("state") == "up" and row["pid"] != before["pid"] and row["restarts"] > before["restarts"]:
            return row
        return None
    try:
        return wait_until(restarted, timeout, every=1.0, what=f"the supervisor restarting {name}")
    except AssertionError as e:
        raise AssertionError(f"{e}: now {supervised(name).get(name)}") from None


# ------------------------------------------------------------------ the simulator

def sim(method: str, path: str, body: dict | None = None) -> dict:
    return simulator_call(get_settings().simulator_url + path, method, body)


def sim_config(**changes) -> dict:
    return sim("POST", "/_config", changes)


def sim_stats() -> dict:
    return sim("GET", "/_stats")


def key_prefix(job_id: str) -> str:
    """The start of every ``Idempotency-Key`` of ``job_id`` (pipeline/ids.py ``request_key``)."""
    return request_key(job_id, "").split(":", 1)[0] + ":"


def provider_bill(job_id: str, timeout: float = 60) -> Bill:
    """The provider's bill for the job, by the simulator's own count and prices, once final: no call
    in flight and no generation whose client went away still running (it is billed when it ends)."""
    wait_until(lambda: (lambda t: t["total"]["in_flight"] == 0 and t["unattended"] == 0)(sim_stats()),
               timeout, what="every provider call answered and every generation billed")
    keys = sim("GET", "/_stats?" + urllib.parse.urlencode({"key_prefix": key_prefix(job_id)}))["keys"]
    return Bill.from_stats(keys)


def ledger_of(job_id: str) -> Ledger:
    """The pipeline's ledger for the job: results, and calls that may have been billed
    (sql/012_unconfirmed_spend.sql), per request key; checked against what the caps count."""
    led = Ledger()
    with db.get_engine().connect() as conn:
        for cid, usd in conn.execute(sa.text("SELECT custom_id, cost_usd FROM results WHERE job_id = :j"),
                                     {"j": job_id}).all():
            led.add(request_key(job_id, cid), Decimal(usd), "settled")
        for cid, state, max_usd, confirmed in conn.execute(sa.text(
                "SELECT custom_id, state, max_cost_usd, confirmed_usd FROM provider_calls WHERE job_id = :j"),
                {"j": job_id}).all():
            if state == "sent":
                led.sent_left += 1
            elif state == "unconfirmed":
                led.add(request_key(job_id, cid), Decimal(max_usd), "unconfirmed")
            else:
                led.add(request_key(job_id, cid), Decimal(confirmed or 0), "confirmed")
        caps_count = conn.execute(sa.text(f"SELECT s.spent FROM ({JOB_SPENT_SQL}) s(cap, spent)"),
                                  {"j": job_id}).scalar()
    assert Decimal(caps_count) == led.total, f"the caps count ${caps_count}, the ledger read here ${led.total}"
    return led


@dataclass
class JobCaps:
    """Caps set from a job's own lines: each request's maximum cost as the pipeline reserves it
    (pipeline/money/bounds.py, rounded up to the ledger's 1e-8 as the budget holds it). That is the
    pipeline's prediction, used only to choose a cap that can bind; what is checked against the cap
    is the provider's bill."""

    per_request: list[Decimal]

    @classmethod
    def of(cls, path: Path) -> "JobCaps":
        prices, unit = get_price_book(), Decimal("0.00000001")
        out = []
        for line in path.read_text().splitlines():
            bound = request_bound("openai", json.loads(line)["body"], prices)
            out.append(bound.max_cost_usd.quantize(unit, rounding=ROUND_CEILING))
        return cls(out)

    def may_spend(self, billed_duplicates: int = 0) -> Decimal:
        """Every request once at its maximum, and ``billed_duplicates`` calls more at the largest:
        what the job may spend when the scenario allows that many repeated billed calls."""
        return sum(self.per_request, Decimal(0)) + billed_duplicates * max(self.per_request)

    def part(self, fraction: float) -> Decimal:
        """A cap the job reaches before it ends: ``fraction`` of its maxima, rounded down."""
        return (sum(self.per_request, Decimal(0)) * Decimal(str(fraction))).quantize(
            Decimal("0.00000001"), rounding=ROUND_FLOOR)


def job_status(job_id: str) -> str | None:
    try:
        with db.get_engine().connect() as conn:
            return conn.execute(sa.text("SELECT status FROM jobs WHERE job_id = :j"), {"j": job_id}).scalar()
    except sa.exc.OperationalError:    # Postgres restarting (a scenario's fault): poll again
        return None


def check_paused_at_cap(job_id: str, cap: Decimal, then: Decimal, timeout: float = 240) -> dict:
    """The job stopped by its cap (``paused_budget``): the provider's bill so far is within the cap
    and in the ledger. Then the cap is raised to ``then`` (``llmbatch budget set``) so the job goes
    on. Returns what was measured at the pause."""
    wait_until(lambda: job_status(job_id) == "paused_budget", timeout,
               what=f"{job_id} paused at its cap ${cap}")
    bill, led = provider_bill(job_id), ledger_of(job_id)
    failures = money_failures(bill, led, cap)
    at_pause = {"paused_bill_usd": str(bill.usd), "paused_ledger_usd": str(led.total), "paused_cap_usd": str(cap),
                "paused_calls": bill.calls}
    print(json.dumps({"job": job_id, **at_pause}), file=sys.stderr)
    assert not failures, f"at the pause: {'; '.join(failures)}"
    proc = subprocess.run([LLMBATCH, "budget", "set", "--job", job_id, "--usd", str(then)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return at_pause


# ------------------------------------------------------------------ jobs

def write_job_file(path: Path, n: int, prefix: str, **top) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "gpt-4o-mini", "max_tokens": 8, "messages": [
                                    {"role": "user", "content": f"fault test {prefix} request {i}"}]},
                                **top}) + "\n")
    return path


def submit(path: Path, *args: str, background: bool = False):
    """``llmbatch submit FILE --json``: the job id, or the Popen when ``background``."""
    cmd = [LLMBATCH, "submit", str(path), "--json", *args]
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["job_id"]


def submitted_job(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])["job_id"]


def counts(job_id: str) -> dict:
    with db.get_engine().connect() as conn:
        rows = conn.execute(sa.text("SELECT status, count(*) FROM requests WHERE job_id = :j GROUP BY status"),
                            {"j": job_id}).all()
    return dict(rows)


def done(job_id: str) -> int:
    with db.get_engine().connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM results WHERE job_id = :j"), {"j": job_id}).scalar()


def wait_until(predicate, timeout: float, every: float = 0.25, what: str = "condition"):
    return wait_for(predicate, timeout, every, what)


def wait_terminal(job_id: str, n: int, timeout: float = 180) -> dict:
    """Every one of the job's n requests in a terminal state (a lost request never gets there)."""
    def all_done():
        try:
            c = counts(job_id)
        except sa.exc.OperationalError:    # Postgres restarting (a scenario's fault): poll again
            return None
        terminal = sum(v for k, v in c.items() if k in ("succeeded", "failed", "cancelled"))
        return c if terminal >= n else None
    try:
        return wait_until(all_done, timeout, what=f"all {n} requests of {job_id} terminal")
    except AssertionError as e:
        raise AssertionError(f"{e}: states now {counts(job_id)}") from None


# ------------------------------------------------------------------ invariants

@dataclass
class FaultRow:
    scenario: str
    requests: int
    succeeded: int
    failed: int
    lost: int
    in_flight_after_end: int
    duplicated_rows: int
    provider_calls: int
    duplicate_provider_calls: int
    #: provider calls − attempt rows: attempts are a log, not the ledger (a redo after a crash
    #: writes its attempt under the number the lost one had); the money is in ``ledger_usd``
    unrecorded_calls: int
    spend_usd: str                  # settled: results.cost_usd
    provider_bill_usd: str          # the simulator's own bill for the job's keys
    ledger_usd: str                 # settled + unconfirmed (+ confirmed): what the caps count
    unconfirmed_usd: str
    unconfirmed_calls: int
    sent_calls_left: int            # provider_calls still 'sent' after the job: counted by no cap
    unseen_requests: int            # requests billed above their ledger rows
    calls_without_ledger_row: int   # billed generations beyond their request's ledger rows
    cap_usd: str | None
    overspend_usd: str              # provider's bill above the cap
    seconds: float
    paused_bill_usd: str | None = None
    paused_ledger_usd: str | None = None
    paused_cap_usd: str | None = None
    paused_calls: int | None = None


def check_invariants(scenario: str, job_id: str, n: int, *, started: float, cap: Decimal | None = None,
                     max_duplicate_calls: int | None = None, quiet_s: float = 3.0,
                     at_pause: dict | None = None) -> FaultRow:
    """Assert the invariants every fault scenario must keep; record a row of the fault table.

    Money: the provider's bill for the job (the simulator's count and prices) ≤ the ledger
    (nothing spent unseen, per job and per request) and ≤ ``cap`` (tests/faults/money.py).
    ``at_pause``: what ``check_paused_at_cap`` measured, for the table."""
    with db.get_engine().connect() as conn:
        q = lambda sql: conn.execute(sa.text(sql), {"j": job_id})  # noqa: E731
        n_requests = q("SELECT count(*) FROM requests WHERE job_id = :j").scalar()
        open_ = q("SELECT count(*) FROM requests WHERE job_id = :j"
                  " AND status NOT IN ('succeeded', 'failed', 'cancelled')").scalar()
        n_results = q("SELECT count(*) FROM results WHERE job_id = :j").scalar()
        distinct_results = q("SELECT count(DISTINCT custom_id) FROM results WHERE job_id = :j").scalar()
        missing = q("SELECT count(*) FROM requests r WHERE job_id = :j AND NOT EXISTS"
                    " (SELECT 1 FROM results x WHERE x.job_id = r.job_id AND x.custom_id = r.custom_id)").scalar()
        by_status = dict(q("SELECT status, count(*) FROM requests WHERE job_id = :j GROUP BY status").all())
        spend = q("SELECT coalesce(sum(cost_usd), 0) FROM results WHERE job_id = :j").scalar()
        attempts = q("SELECT count(*) FROM attempts WHERE job_id = :j").scalar()
        open_batches = q("SELECT count(DISTINCT b.batch_id) FROM batches b JOIN requests r USING (batch_id)"
                         " WHERE r.job_id = :j AND b.status NOT IN ('done', 'failed', 'cancelled')").scalar()
    # calls still in flight when the job is over are duplicates whose answers nobody keeps:
    # let them land (bounded) so they are counted
    with_flight = sim_stats()["total"]["in_flight"]
    bill = provider_bill(job_id)     # waits for calls in flight and unattended generations
    led = ledger_of(job_id)
    money = money_failures(bill, led, cap)
    stats = sim_stats()["total"]
    time.sleep(quiet_s)
    later = sim_stats()["total"]
    row = FaultRow(
        scenario=scenario, requests=n, succeeded=by_status.get("succeeded", 0),
        failed=by_status.get("failed", 0), lost=n - n_requests + open_, in_flight_after_end=with_flight,
        duplicated_rows=n_results - distinct_results, provider_calls=stats["requests"],
        duplicate_provider_calls=stats["duplicates"], unrecorded_calls=max(0, stats["requests"] - attempts),
        spend_usd=str(spend), provider_bill_usd=str(bill.usd), ledger_usd=str(led.total),
        unconfirmed_usd=str(led.unconfirmed), unconfirmed_calls=led.unconfirmed_calls, sent_calls_left=led.sent_left,
        unseen_requests=len(unseen_keys(bill, led)), calls_without_ledger_row=calls_without_a_row(bill, led),
        cap_usd=str(cap) if cap is not None else None,
        overspend_usd=str(max(Decimal(0), bill.usd - cap)) if cap is not None else "0",
        seconds=round(time.monotonic() - started, 1), **(at_pause or {}))
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    with REPORT.open("a") as f:
        f.write(json.dumps(asdict(row)) + "\n")
    print(json.dumps(asdict(row)), file=sys.stderr)
    assert n_requests == n, f"{n - n_requests} requests never reached Postgres"
    assert open_ == 0, f"{open_} requests not terminal: {by_status}"
    assert missing == 0 and n_results == n, f"results: {n_results} rows for {n} requests, {missing} missing"
    assert row.duplicated_rows == 0
    assert not money, "; ".join(money)
    if max_duplicate_calls is not None:
        assert stats["duplicates"] <= max_duplicate_calls, \
            f"{stats['duplicates']} duplicate provider calls (bound {max_duplicate_calls})"
    assert later["requests"] == stats["requests"], \
        f"provider still called after the job ended: {later['requests'] - stats['requests']} calls in {quiet_s} s"
    assert later["in_flight"] == 0, f"{later['in_flight']} provider calls still in flight"
    assert open_batches == 0, f"{open_batches} batches of the job not done"
    return row


@pytest.fixture
def fault_job(stack, tmp_path, request):  # noqa: F811
    """A fresh simulator config and stats, and a job file factory, for one scenario."""
    sim("DELETE", "/_config")
    _quiesce()
    sim("POST", "/_reset")

    sim("POST", "/_config", {"worst_case": True})   # every call billed to its limit: the cap is tight

    def make(n: int, **top) -> Path:
        prefix = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]
        return write_job_file(tmp_path / "job.jsonl", n, prefix, **top)
    return make


def _quiesce(timeout: float = 60) -> None:
    """Start from a quiet stack: the previous scenario's work finished (or, past the bound, cancelled),
    so the simulator's counts belong to this scenario alone."""
    def open_work():
        with db.get_engine().connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM requests"
                                        " WHERE status NOT IN ('succeeded', 'failed', 'cancelled')")).scalar()
    try:
        wait_until(lambda: open_work() == 0 and sim_stats()["total"]["in_flight"] == 0, timeout,
                   what="previous scenario finished")
    except AssertionError:
        with db.get_engine().begin() as conn:
            left = conn.execute(sa.text(
                "UPDATE requests SET status = 'cancelled', finished_at = now()"
                " WHERE status NOT IN ('succeeded', 'failed', 'cancelled') RETURNING job_id")).scalars().all()
            conn.execute(sa.text("UPDATE batches SET status = 'done', finished_at = now()"
                                 " WHERE status NOT IN ('done', 'failed', 'cancelled')"))
        print(f"quiesce: cancelled {len(left)} requests left by an earlier scenario", file=sys.stderr)
