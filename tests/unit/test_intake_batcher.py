"""The batcher's flush, without services: a refused flush is bisected down to the refused
message (dead-lettered, the rest written), an outage is waited out (never dead-lettered),
and no offset passes a message whose row or DLQ copy is not durable."""

from __future__ import annotations

import contextlib
import logging

import psycopg
import pytest
import sqlalchemy as sa

from pipeline.config import load_settings
from pipeline.intake import batcher as batcher_mod
from pipeline.intake.batcher import Batcher
from pipeline.intake.outages import Dependency, is_outage
from pipeline.intake.kafka import sign
from tests.unit.test_intake_messages import NOW, message, raw

#: the batcher checks every message's producer signature with this key
SETTINGS = load_settings({"LLMBATCH_KAFKA_PRODUCER_KEY": "unit-test-key"})


class FakeMsg:
    def __init__(self, value, offset, topic="llm.requests", partition=0, headers=None):
        self._v, self._o, self._t, self._p = value, offset, topic, partition
        self._h = sign(SETTINGS, value) if headers is None else headers

    def value(self): return self._v
    def headers(self): return self._h
    def key(self): return b"k"
    def offset(self): return self._o
    def topic(self): return self._t
    def partition(self): return self._p
    def error(self): return None


class FakeConsumer:
    def __init__(self, *a, **k):
        self.commits, self.paused = [], False
    def assignment(self): return ["tp"]
    def pause(self, parts): self.paused = True
    def resume(self, parts): self.paused = False
    def commit(self, offsets, asynchronous=True): self.commits.append([(t.topic, t.partition, t.offset) for t in offsets])
    def close(self): pass


class FakeProducer:
    def __init__(self, *a, **k):
        self.sent, self.waiting, self.fail_next = [], [], 0
    def produce(self, topic, value=None, key=None, headers=None, on_delivery=None):
        self.waiting.append((topic, value, dict(headers), on_delivery))
    def poll(self, timeout=0):
        waiting, self.waiting = self.waiting, []
        for topic, value, headers, cb in waiting:
            if self.fail_next:
                self.fail_next -= 1
                cb(_KafkaErr(), None)
            else:
                self.sent.append((topic, value, headers))
                cb(None, None)
    def flush(self, timeout=0): self.poll()


class _KafkaErr:
    def code(self): return -195   # _TRANSPORT
    def fatal(self): return False
    def __str__(self): return "broker transport failure"


class FakeEngine:
    def __init__(self): self.reachable = True
    @contextlib.contextmanager
    def begin(self): yield object()
    def connect(self):
        return _Connecting(self)


class _Connecting:
    """What ``engine.connect()`` returns: a context manager, also as ``db.autocommit`` makes it."""
    def __init__(self, engine): self.engine = engine
    def execution_options(self, **_): return self
    def __enter__(self):
        if not self.engine.reachable:
            raise sa.exc.OperationalError("SELECT 1", {}, psycopg.OperationalError("connection refused"))
        return _Conn()
    def __exit__(self, *exc): return False


class _Conn:
    def execute(self, *a, **k): return None


def data_error(text="invalid input syntax"):
    err = psycopg.errors.NumericValueOutOfRange(text)
    return sa.exc.DataError("INSERT", {}, err)


@pytest.fixture
def make(monkeypatch):
    monkeypatch.setattr(batcher_mod, "make_consumer", FakeConsumer)
    monkeypatch.setattr(batcher_mod, "make_producer", FakeProducer)
    written = []

    def build(write):
        def write_batches(conn, rows, batches, cached=()):
            write(rows)
            written.extend(rows)
            return {b["batch_id"]: sum(1 for r in rows if r["batch_id"] == b["batch_id"]) for b in batches}
        monkeypatch.setattr(batcher_mod.batch_store, "write_batches", write_batches)
        monkeypatch.setattr(batcher_mod.batch_store, "admit_requests", lambda conn, rows: (rows, {}))
        monkeypatch.setattr(batcher_mod.batch_store, "mark_dispatched", lambda conn, ids: None)
        b = Batcher(SETTINGS, engine=FakeEngine(), dispatcher=lambda *a: None)
        b.cached.answers = lambda items: {}
        return b
    return build, written


def feed(b, values):
    for i, v in enumerate(values):
        b.add(FakeMsg(v, i), NOW)


def test_a_refused_message_is_isolated_and_dead_lettered(make):
    build, written = make

    def write(rows):
        if any(r["custom_id"] in ("bad7", "bad30") for r in rows):
            raise data_error()
    b = build(write)
    values = [raw(message(custom_id=("bad" if i in (7, 30) else "ok") + str(i), priority=6)) for i in range(100)]
    feed(b, values)
    b.flush(b.due(force=True))
    b.dlq.poll()
    assert sorted(r["custom_id"] for r in written) == sorted(f"ok{i}" for i in range(100) if i not in (7, 30))
    assert sorted(int(h["origin.offset"]) for _, _, h in b.dlq.sent) == [7, 30]
    assert all(h["error"].startswith(b"Postgres refused") for _, _, h in b.dlq.sent)
    b._commit()
    assert b.consumer.commits[-1] == [("llm.requests", 0, 100)]


def test_an_outage_is_waited_out_not_dead_lettered(make, caplog):
    build, written = make
    down = {"on": True}

    def write(rows):
        if down["on"]:
            raise sa.exc.OperationalError("INSERT", {}, psycopg.OperationalError("server closed the connection"))
    b = build(write)
    feed(b, [raw(message(custom_id=f"r{i}", priority=6)) for i in range(10)])
    with caplog.at_level(logging.WARNING, logger="pipeline.intake"):
        b.flush(b.due(force=True))
        assert len(b.backlog) == 10 and b.paused and b.consumer.paused
        for _ in range(5):                     # retried while down: no new log line, no DLQ
            b.postgres.retry_at = 0
            b.retry_backlog()
        b._commit()
        assert not b.consumer.commits or b.consumer.commits[-1] == [("llm.requests", 0, 0)]
        down["on"] = False
        b.postgres.retry_at = 0
        b.retry_backlog()
    assert not b.backlog and not b.paused and not b.consumer.paused
    assert len(written) == 10 and not b.dlq.sent and not b.dlq.waiting
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("Postgres down: server closed") \
        and lines[1].startswith("Postgres back after"), lines
    b._commit()
    assert b.consumer.commits[-1] == [("llm.requests", 0, 10)]


def test_a_deadlock_is_retried_and_not_called_an_outage(make, caplog):
    """A deadlock or serialization failure is a conflict to retry, not Postgres down."""
    build, written = make
    conflicts = {"left": 2}

    def write(rows):
        if conflicts["left"]:
            conflicts["left"] -= 1
            raise sa.exc.OperationalError("INSERT", {}, psycopg.errors.DeadlockDetected("deadlock detected"))
    b = build(write)
    feed(b, [raw(message(custom_id=f"d{i}", priority=6)) for i in range(10)])
    with caplog.at_level(logging.INFO, logger="pipeline.intake"):
        b.flush(b.due(force=True))
        assert len(b.backlog) == 10 and b.postgres.up and b.postgres.outages == 0
        b.retry_backlog()
        b.retry_backlog()
    assert not b.backlog and len(written) == 10 and not b.dlq.sent
    lines = [r.getMessage() for r in caplog.records]
    assert not [line for line in lines if "down" in line or "back after" in line], lines
    assert sum("conflict" in line and "deadlock detected" in line for line in lines) == 2, lines


def test_an_offset_waits_for_its_dlq_copy(make):
    build, _ = make
    b = build(lambda rows: None)
    b.dlq.fail_next = 1
    feed(b, [b"not json", raw(message(custom_id="ok", priority=6))])
    b.flush(b.due(force=True))
    b.dlq.poll()          # Kafka refuses the DLQ copy once
    b._commit()
    assert b.consumer.commits[-1] == [("llm.requests", 0, 0)]   # not past the message
    b.kafka.retry_at = 0
    b.dead.retry()
    b.dlq.poll()
    b._commit()
    assert b.consumer.commits[-1] == [("llm.requests", 0, 2)]
    assert len(b.dlq.sent) == 1


def test_an_unexpected_error_in_decoding_costs_one_message(make, monkeypatch):
    build, written = make
    b = build(lambda rows: None)

    def boom(value, now, prices, **kw):
        if b"boom" in value:
            raise ZeroDivisionError("a defect")
        return real(value, now, prices, **kw)
    real = batcher_mod.decode
    monkeypatch.setattr(batcher_mod, "decode", boom)
    feed(b, [raw(message(custom_id="boom", priority=6)), raw(message(custom_id="ok", priority=6))])
    b.flush(b.due(force=True))
    b.dlq.poll()
    assert [r["custom_id"] for r in written] == ["ok"]
    assert b.dlq.sent[0][2]["error"] == b"ZeroDivisionError: a defect"


@pytest.mark.parametrize("error, outage", [
    (sa.exc.OperationalError("x", {}, psycopg.OperationalError("connection refused")), True),
    (sa.exc.InterfaceError("x", {}, psycopg.InterfaceError("connection already closed")), True),
    (sa.exc.OperationalError("x", {}, psycopg.errors.AdminShutdown("terminating connection")), True),
    (sa.exc.DataError("x", {}, psycopg.errors.NumericValueOutOfRange("numeric field overflow")), False),
    (sa.exc.DataError("x", {}, psycopg.errors.UntranslatableCharacter("unsupported Unicode escape")), False),
    (sa.exc.IntegrityError("x", {}, psycopg.errors.UniqueViolation("duplicate key")), False),
    (sa.exc.OperationalError("x", {}, psycopg.errors.DeadlockDetected("deadlock detected")), True),
    (sa.exc.OperationalError("x", {}, psycopg.errors.ProgramLimitExceeded("stack depth limit")), False),
    (ValueError("odd"), False),
])
def test_outages_and_refusals_are_told_apart(error, outage):
    assert is_outage(error) is outage


def test_a_dependency_logs_state_changes_only(caplog):
    d = Dependency("Redis")
    with caplog.at_level(logging.WARNING, logger="pipeline.intake"):
        for _ in range(5):
            d.failed(ConnectionError("refused"))
        assert not d.up and d.delay > d.first_s
        d.ok()
        d.ok()
    assert len(caplog.records) == 2 and d.up


class QueuedConsumer(FakeConsumer):
    """A consumer whose ``consume`` calls answer, in turn, the lists of ``answers`` (then nothing)."""
    def __init__(self, answers):
        super().__init__()
        self.answers = list(answers)
    def consume(self, num_messages=1, timeout=0):
        return self.answers.pop(0) if self.answers else []
    def poll(self, timeout=0):
        got = self.consume()
        return got[0] if got else None


def test_an_immediate_message_is_written_alone_while_bulk_work_is_decoded(make, monkeypatch):
    """An immediate message that arrives while a turn decodes 500 bulk messages is written and
    dispatched in a transaction of its own, after at most one slice of bulk decoding, and before
    any bulk row: it never waits for the bulk job's decoding or its flush."""
    build, written = make
    flushes = []
    b = build(lambda rows: flushes.append(sorted({r["tier"] for r in rows})))
    dispatched = []
    b.dispatch = lambda batch_id, tier, jobs=None: dispatched.append(tier)
    monkeypatch.setitem(b.settings.batch_linger_s, "immediate", 0.0)
    bulk = [FakeMsg(raw(message(custom_id=f"bulk{i}", priority=6)), i) for i in range(batcher_mod.BULK_TURN)]
    probe = FakeMsg(raw(message(custom_id="probe", priority=9)), 0, topic="llm.requests.immediate")
    decoded = []
    add = b.add
    b.add = lambda msg, *a: (decoded.append(msg.topic()), add(msg, *a))
    # the fast lane is empty at the turn's start; the probe arrives during the first bulk slice
    b.fast = b.consumers["llm.requests.immediate"] = QueuedConsumer([[], [probe]])
    b.consumer = b.consumers["llm.requests"] = QueuedConsumer([bulk])
    monkeypatch.setitem(b.settings.batch_linger_s, "peak", 0.0)
    b.turn()
    b.bulk_written(wait=True)
    assert flushes[0] == ["immediate"], flushes
    assert flushes[1:] and all(tiers == ["peak"] for tiers in flushes[1:]), flushes
    assert decoded.index("llm.requests.immediate") <= batcher_mod.BULK_SLICE
    assert dispatched[0] == "immediate"
    assert len(written) == batcher_mod.BULK_TURN + 1


def test_the_fast_lane_is_written_while_a_bulk_write_is_out(make, monkeypatch):
    """A bulk flush's transaction runs in the writer thread: while Postgres takes its time
    over it, an immediate message is written and dispatched, and no offset passes the bulk
    messages until their write is over."""
    import threading
    build, written = make
    release = threading.Event()

    def write(rows):
        if any(r["tier"] == "peak" for r in rows):
            assert release.wait(5), "the bulk write was never let go"
    b = build(write)
    dispatched = []
    b.dispatch = lambda batch_id, tier, jobs=None: dispatched.append(tier)
    monkeypatch.setitem(b.settings.batch_linger_s, "immediate", 0.0)
    monkeypatch.setitem(b.settings.batch_linger_s, "peak", 0.0)
    bulk = [FakeMsg(raw(message(custom_id=f"bulk{i}", priority=6)), i) for i in range(100)]
    probe = FakeMsg(raw(message(custom_id="probe", priority=9)), 0, topic="llm.requests.immediate")
    b.fast = b.consumers["llm.requests.immediate"] = QueuedConsumer([])
    b.consumer = b.consumers["llm.requests"] = QueuedConsumer([bulk])
    b.last_sweep = float("inf")           # no sweep in this test
    b.turn()                              # the bulk write goes out, and hangs in Postgres
    assert b.writing is not None and not written
    b.fast.answers.append([probe])        # the probe arrives meanwhile
    b.turn()
    assert [r["custom_id"] for r in written] == ["probe"] and dispatched == ["immediate"]
    assert not [c for c in b.consumer.commits if any(t == "llm.requests" and o > 0 for t, _, o in c)]
    release.set()
    b.bulk_written(wait=True)
    b._commit()
    assert len(written) == 101 and dispatched == ["immediate", "peak"]
    assert b.consumer.commits[-1] == [("llm.requests", 0, 100)]
    b.writer.shutdown()


class _MarkerRedis:
    """The broker's Redis as the sweep's marker sees it."""
    def __init__(self): self.keys = {}
    def exists(self, k): return k in self.keys
    def set(self, k, v, nx=False):
        if nx and k in self.keys:
            return None
        self.keys[k] = v
        return True


def test_the_broker_marker_is_set_only_once_what_the_queues_held_is_sent_again(make, monkeypatch):
    """The sweep finds the broker's Redis emptied (its marker gone) and sends again the batches its
    queues held. A sweep cut short before that (Postgres gone while it lists them) leaves the marker
    unset: the next sweep still finds them lost, and sends them."""
    build, _ = make
    b = build(lambda rows: None)
    b.cache.redis = _MarkerRedis()
    sent = []
    b.dispatch = lambda batch_id, tier, jobs=None: sent.append(batch_id)
    postgres_gone = [True]

    def dispatched_batches(conn):
        if postgres_gone[0]:
            raise sa.exc.OperationalError("SELECT", {}, psycopg.OperationalError("server closed the connection"))
        return [("b_lost", "peak")]
    monkeypatch.setattr(batcher_mod.batch_store, "undispatched_batches", lambda conn, after: [])
    monkeypatch.setattr(batcher_mod.batch_store, "dispatched_batches", dispatched_batches)
    monkeypatch.setattr("pipeline.money.deferral.resume_due_batches", lambda *a: None)
    assert b.sweep() == 0 and sent == []
    assert batcher_mod.BROKER_MARK not in b.cache.redis.keys
    postgres_gone[0] = False
    b.postgres.ok()
    assert b.sweep() == 1 and sent == ["b_lost"]
    assert batcher_mod.BROKER_MARK in b.cache.redis.keys
    assert b.sweep() == 0 and sent == ["b_lost"], "sent again with the marker back"
