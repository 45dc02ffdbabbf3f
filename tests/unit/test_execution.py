"""Execution logic that needs no services: durable outcome writes, lease keeping, the call gate."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import sqlalchemy as sa


from decimal import Decimal

from pipeline.ids import request_key
from pipeline.request import Outcome
from pipeline.money.budget import Reservation
from pipeline.stores import batches, jobs, outcomes as outcome_store
from workers import execute, gate as gate_mod, writer as writer_mod


def _pg_down() -> sa.exc.OperationalError:
    return sa.exc.OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))


class FakeEngine:
    """``begin()`` fails while ``failures`` > 0 (Postgres down), then hands out a connection."""

    def __init__(self, failures: int = 0):
        self.failures = failures
        self.begun = 0

    @contextlib.contextmanager
    def begin(self):
        self.begun += 1
        if self.failures > 0:
            self.failures -= 1
            raise _pg_down()
        yield object()

    def connect(self):
        """``db.autocommit``'s connection: counted, and failing, as ``begin``."""
        engine = self

        class Connecting:
            def execution_options(self, **_):
                return engine.begin()
        return Connecting()


@pytest.fixture
def stored(monkeypatch):
    """What the writer's transactions stored, by table; ``refuse`` makes Postgres refuse a custom_id."""
    rows = {"outcomes": [], "attempts": [], "deferred": [], "refuse": set()}

    def write_outcomes(conn, outcomes, attempts):
        for o in outcomes:
            if o["custom_id"] in rows["refuse"] and o.get("response") is not None:
                raise sa.exc.DataError("INSERT", {}, Exception("unsupported Unicode escape sequence"))
        rows["outcomes"] += outcomes
        rows["attempts"] += attempts

    monkeypatch.setattr(outcome_store, "write_outcomes", write_outcomes)
    monkeypatch.setattr(batches, "lock_batch", lambda conn, b: None)
    monkeypatch.setattr(jobs, "refresh_jobs", lambda conn, ids: None)
    monkeypatch.setattr(writer_mod.deferral, "write_deferred", lambda conn, d: rows["deferred"].extend(d))
    xids = iter(range(100, 10**6))
    monkeypatch.setattr(writer_mod.budget, "commit_xid", lambda conn: str(next(xids)))
    return rows


class SettleLog:
    """The budget's settle, recorded: which reservation settled, with which commit's xid."""

    def __init__(self):
        self.settled: dict[str, str] = {}

    async def settle(self, res, actual):
        self.settled[res.rid] = res.xid


def _outcome(cid: str, **extra) -> Outcome:
    return Outcome("j", cid, "gpt-4o-mini", "succeeded", attempts=1, cost=Decimal("0.001"),
                   response={"ok": True}, **extra)


def test_a_failed_write_is_retried_until_durable_and_loses_nothing(stored):
    engine = FakeEngine(failures=3)   # Postgres down for three tries
    writer = writer_mod.OutcomeWriter(engine, "b1", sleep=lambda s: None)

    async def run():
        writer.outcomes.append(_outcome("a"))
        writer.attempts.append({"job_id": "j", "custom_id": "a", "attempt": 1})
        try:
            await writer.flush()
        except Exception:   # the old writer raised here, with the outcome already out of its buffer
            pass
        writer.outcomes.append(_outcome("b"))
        await writer.drain()

    asyncio.run(run())
    assert sorted(o["custom_id"] for o in stored["outcomes"]) == ["a", "b"]
    assert [a["custom_id"] for a in stored["attempts"]] == ["a"]
    assert writer.unwritten == 0 and engine.begun >= 4


def test_a_row_postgres_refuses_fails_alone_with_the_reason(stored):
    stored["refuse"].add("bad")
    writer = writer_mod.OutcomeWriter(FakeEngine(), "b1", sleep=lambda s: None)
    writer.budget = SettleLog()
    writer.outcomes += [_outcome("a"), _outcome("bad"), _outcome("c")]
    rids = {c: f"{request_key('j', c)}~0a1b" for c in ("a", "bad", "c")}   # as workers/limited.py names holds
    writer.settles += [(Reservation(rids[c], "g", [], 1, "d"), 0) for c in ("a", "bad", "c")]
    asyncio.run(writer.drain())
    # each settles with the transaction that committed its row: the batch's failed, so one each
    xids = writer.budget.settled
    assert set(xids) == set(rids.values()) and all(xids.values())
    assert len(set(xids.values())) == 3
    by_id = {o["custom_id"]: o for o in stored["outcomes"]}
    assert set(by_id) == {"a", "bad", "c"}
    assert by_id["a"]["status"] == by_id["c"]["status"] == "succeeded"
    assert by_id["bad"]["status"] == "failed" and by_id["bad"]["response"] is None
    assert by_id["bad"]["error"]["code"] == "internal_error"
    assert "could not be stored" in by_id["bad"]["error"]["message"]
    assert "DataError" in by_id["bad"]["error"]["message"]
    assert by_id["bad"]["cost_usd"] == "0.001"   # the call was made: its cost stays on record


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.now += s
        await asyncio.sleep(0)


def _keep(renewals, lease_s: float = 30.0, until: float = 200.0):
    """Run the lease keeper against ``renewals`` (a callable per renewal) until ``lost`` or ``until``."""
    clock = Clock()

    class Engine:
        @contextlib.contextmanager
        def begin(self):
            yield None

    calls = []

    def renew(conn, batch_id, owner, lease):
        calls.append(clock.now)
        return renewals(len(calls))

    async def run():
        lost = asyncio.Event()
        task = asyncio.create_task(execute._keep_lease(Engine(), "b1", "me", lease_s, lost, clock=clock,
                                                       sleep=clock.sleep))
        while not lost.is_set() and clock.now < until and not task.done():
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return lost.is_set()

    mp = pytest.MonkeyPatch()
    mp.setattr(batches, "renew_lease", renew)
    try:
        return asyncio.run(run()), calls, clock.now
    finally:
        mp.undo()


def test_a_keeper_cancelled_as_its_renewal_comes_back_stops():
    """Cancelled in the instant a renewal returns, the lease keeper stops. ``asyncio.wait_for``
    (Python 3.11) returned the renewal's result instead of the cancellation, the keeper went on
    renewing, and its batch could not end until the lease was taken from it: a fault-suite run
    sat 5 minutes on a batch whose every request was done."""
    clock = Clock()

    class Engine:
        @contextlib.contextmanager
        def begin(self):
            yield None

    calls, holder = [], {}

    def renew(conn, batch_id, owner, lease):
        calls.append(clock.now)
        if len(calls) == 2:
            holder["task"].cancel()     # the batch is over: its owner cancels the keeper now
        return True

    async def inline(fn, *args):        # the renewal comes back at once, as a fast one does
        return fn(*args)

    async def run():
        lost = asyncio.Event()
        task = holder["task"] = asyncio.create_task(
            execute._keep_lease(Engine(), "b1", "me", 30.0, lost, clock=clock, sleep=clock.sleep))
        for _ in range(1000):
            if task.done():
                break
            await asyncio.sleep(0)
        stopped = task.cancelled()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return stopped

    mp = pytest.MonkeyPatch()
    mp.setattr(batches, "renew_lease", renew)
    mp.setattr(execute.asyncio, "to_thread", inline)
    try:
        stopped = asyncio.run(run())
    finally:
        mp.undo()
    assert stopped, f"the keeper went on after it was cancelled: {len(calls)} renewals"
    assert len(calls) == 2


def test_lease_renewal_survives_transient_errors():
    def renewals(n):
        if n in (2, 3, 4):
            raise _pg_down()
        return True
    lost, calls, _ = _keep(renewals)
    assert not lost
    assert len(calls) > 6   # it went on renewing after the failures


def test_lease_taken_by_another_owner_is_lost_at_once():
    lost, calls, now = _keep(lambda n: n < 3)
    assert lost and len(calls) == 3 and now == pytest.approx(30.0)


def test_lease_that_cannot_be_renewed_in_time_is_lost_before_it_expires():
    def renewals(n):
        if n > 1:
            raise _pg_down()
        return True
    lost, calls, now = _keep(renewals)
    assert lost
    assert len(calls) > 3                     # retried, with backoff
    assert now < 10.0 + 30.0                  # before the lease renewed at t=10 runs out


def test_gate_stops_calls_of_a_cancelled_job_and_after_a_lost_lease(monkeypatch):
    asked = []

    def cancelled_jobs(conn, ids):
        asked.append(sorted(ids))
        return {"dead"} & set(ids)

    monkeypatch.setattr(jobs, "cancelled_jobs", cancelled_jobs)

    async def run():
        lost = asyncio.Event()
        gate = gate_mod.Gate(FakeEngine(), lost)
        checker = asyncio.create_task(gate.run())
        try:
            await gate.check("alive")
            with pytest.raises(gate_mod.RequestCancelled):
                await gate.check("dead")
            results = await asyncio.gather(*(gate.check(j) for j in ["alive"] * 20 + ["dead"]),
                                           return_exceptions=True)
            assert sum(isinstance(r, gate_mod.RequestCancelled) for r in results) == 1
            lost.set()
            with pytest.raises(gate_mod.LeaseLost):
                await gate.check("alive")
        finally:
            checker.cancel()
        return len(asked)

    queries = asyncio.run(run())
    assert queries <= 3   # 21 concurrent questions shared one query


class _TimedWriter:
    """Just what the flusher touches: its wake event, and when each flush came."""

    def __init__(self):
        self.wake = asyncio.Event()
        self.batch_id = "b_test"
        self.flushed_at: list[float] = []

    async def flush(self):
        self.flushed_at.append(asyncio.get_running_loop().time())


def test_the_last_outcome_of_a_batch_does_not_wait_to_coalesce(monkeypatch):
    """A batch of one request (an immediate probe) is written as soon as it is over; while
    others are still running, outcomes wait ``FLUSH_COALESCE_S`` to share a transaction."""
    monkeypatch.setattr(execute, "FLUSH_COALESCE_S", 0.5)

    async def run(last: bool) -> float:
        writer, done = _TimedWriter(), asyncio.Event()
        flusher = asyncio.create_task(execute._flusher(writer, done))
        t0 = asyncio.get_running_loop().time()
        writer.wake.set()                 # an outcome waits
        await asyncio.sleep(0.01)
        if last:
            done.set()                    # ... and it was the batch's last request
            await asyncio.wait_for(flusher, 0.2)
            return asyncio.get_running_loop().time() - t0
        await asyncio.sleep(0.6)
        done.set()
        writer.wake.set()
        await flusher
        return writer.flushed_at[0] - t0

    assert asyncio.run(run(last=True)) < 0.1
    assert asyncio.run(run(last=False)) >= 0.5
