"""Hostile messages straight to Kafka: every one ends as a request row or a DLQ copy, the
batcher never dies, and the well-formed messages among them still run.

The helpers here (publish, read the DLQ, account) are shared with the other
``test_intake_*`` integration tests.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from decimal import Decimal

import sqlalchemy as sa
from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.constants import DLQ_TOPIC, REQUESTS_TOPIC
from pipeline.intake.kafka import sign
from pipeline.money.bounds import request_bound
from pipeline.money.pricing import get_price_book
from tests.integration.conftest import kafka_conf, wait_for
from tests.unit.test_intake_messages import HOSTILE, message, raw


# ------------------------------------------------------------------ helpers

def batcher_pid(settings) -> int:
    pid = int((settings.var_dir / "run" / "batcher.pid").read_text().split()[0])
    os.kill(pid, 0)   # alive
    return pid


def assert_same_batcher(settings, pid: int) -> None:
    now = batcher_pid(settings)
    assert now == pid, f"the batcher was restarted: pid {pid} then {now}"


def publish(settings, messages: list[tuple[str, bytes | None, bytes | None]]) -> list[tuple[str, int, int]]:
    """Publish (topic, key, value) raw, as any producer holding credentials could (signed as the
    pipeline's own producer); returns each one's (topic, partition, offset)."""
    p = Producer({**kafka_conf(settings, "producer"), "enable.idempotence": True,
                  "linger.ms": 20, "message.max.bytes": 16 * 1024 * 1024, "compression.type": "lz4"})
    origins: list = [None] * len(messages)
    errors: list = []

    def done(i):
        def cb(err, msg):
            if err is not None:
                errors.append((i, str(err)))
            else:
                origins[i] = (msg.topic(), msg.partition(), msg.offset())
        return cb

    for i, (topic, key, value) in enumerate(messages):
        while True:
            try:
                p.produce(topic, value=value, key=key, headers=sign(settings, value), on_delivery=done(i))
                break
            except BufferError:
                p.poll(0.1)
        p.poll(0)
    assert p.flush(120) == 0, "Kafka did not acknowledge every test message"
    assert not errors, f"Kafka refused test messages: {errors[:5]}"
    return origins


class DLQReader:
    """Reads ``llm.requests.dlq`` from where it ended when the test began."""

    def __init__(self, settings):
        self.consumer = Consumer({**kafka_conf(settings),
                                  "group.id": "test-intake-" + uuid.uuid4().hex, "enable.auto.commit": False})
        meta = self.consumer.list_topics(DLQ_TOPIC, timeout=10).topics[DLQ_TOPIC]
        tps = []
        for p in meta.partitions:
            _, high = self.consumer.get_watermark_offsets(TopicPartition(DLQ_TOPIC, p), timeout=10)
            tps.append(TopicPartition(DLQ_TOPIC, p, high))
        self.consumer.assign(tps)
        self.by_origin: dict[tuple, list[dict]] = {}

    def read(self) -> dict[tuple, list[dict]]:
        while True:
            msgs = self.consumer.consume(num_messages=1000, timeout=0.5)
            if not msgs:
                return self.by_origin
            for m in msgs:
                if m.error():
                    continue
                h = {k: v.decode() for k, v in (m.headers() or [])}
                origin = (h.get("origin.topic"), int(h.get("origin.partition", -1)), int(h.get("origin.offset", -1)))
                self.by_origin.setdefault(origin, []).append(h)

    def close(self):
        self.consumer.close()


def row_key(value: bytes | None):
    """(job_id, custom_id) a message would become a row under, if it names them."""
    try:
        m = json.loads(value)
    except Exception:
        return None
    if isinstance(m, dict) and isinstance(m.get("job_id"), str) and isinstance(m.get("custom_id"), str):
        return m["job_id"], m["custom_id"]
    return None


def account(engine, dlq: DLQReader, messages, origins, job_ids) -> dict:
    """How each published message ended: its row, its DLQ copies. Returns the figures."""
    def storable(j: str) -> bool:   # a job id Postgres could hold at all
        try:
            return "\x00" not in j and bool(j.encode("utf-8"))
        except UnicodeEncodeError:
            return False
    job_ids = [j for j in job_ids if storable(j)]
    with engine.connect() as conn:
        rows = set(conn.execute(sa.text("SELECT job_id, custom_id FROM requests WHERE job_id = ANY(:j)"),
                                {"j": list(job_ids)}).all())
    by_origin = dlq.read()
    missing, doubled, both = [], [], []
    n_rows = n_dlq = 0
    for (topic, key, value), origin in zip(messages, origins):
        k = row_key(value)
        has_row = k is not None and tuple(k) in rows
        copies = len(by_origin.get(origin, []))
        n_rows += has_row
        n_dlq += bool(copies)
        if not has_row and not copies:
            missing.append(origin)
        elif has_row and copies:
            both.append(origin)
        elif copies > 1:
            doubled.append(origin)
    return {"published": len(messages), "rows": n_rows, "dlq": n_dlq, "missing": missing,
            "row_and_dlq": both, "dlq_twice": doubled}


def wait_accounted(engine, dlq, messages, origins, job_ids, timeout: float = 180) -> dict:
    last: dict = {}

    def done():
        last.update(account(engine, dlq, messages, origins, job_ids))
        return not last["missing"]
    try:
        wait_for(done, timeout=timeout, every=1.0, what="every message accounted for")
    except AssertionError:
        raise AssertionError(f"not every message accounted for: {len(last['missing'])} missing, "
                             f"first {last['missing'][:5]}; figures {dict(last, missing=len(last['missing']))}")
    return last


# ------------------------------------------------------------------ tests

def _valid(job: str, cid: str, **change) -> bytes:
    m = message(job_id=job, custom_id=cid, line=None, **change)
    return raw(m)


def test_every_hostile_message_is_accounted_for_and_the_batcher_lives(stack, engine):
    pid = batcher_pid(stack)
    dlq = DLQReader(stack)
    job = "job_hostile_" + uuid.uuid4().hex[:10]
    key = job.encode()
    msgs = []
    for i, name in enumerate(sorted(HOSTILE)):
        value = HOSTILE[name]
        if value is not None:   # the test's job and a custom_id of its own, where it has the usual ones
            for sep in (b'": "', b'":"'):
                value = value.replace(b'"job_id' + sep + b'job_1"', b'"job_id' + sep + key + b'"')
                value = value.replace(b'"custom_id' + sep + b'x1"', b'"custom_id' + sep + f"h{i}".encode() + b'"')
        msgs.append((REQUESTS_TOPIC, key, value))
    # the well-formed ones, between the hostile ones in the same partition (issue 12, item 10:
    # one bad message in a batch of 100 must not take the batch with it)
    good = [f"ok{i}" for i in range(20)]
    for i, cid in enumerate(good):
        msgs.insert(2 * i + 1, (REQUESTS_TOPIC, key, _valid(job, cid, priority=6, max_cost_usd="0")))
    origins = publish(stack, msgs)

    figures = wait_accounted(engine, dlq, msgs, origins, [job])
    assert not figures["row_and_dlq"] and not figures["dlq_twice"], figures
    assert figures["rows"] == len(good), figures
    assert figures["dlq"] == len(HOSTILE), figures

    # every DLQ copy says why, and where it came from
    for (topic, _, value), origin in zip(msgs, origins):
        for h in dlq.read().get(origin, []):
            assert h["error"] and h["origin.topic"] == topic

    # the well-formed ones run to success, priced from the price book, not from the message's "0"
    def succeeded():
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM requests WHERE job_id = :j AND status = 'succeeded'"),
                                {"j": job}).scalar() == len(good)
    wait_for(succeeded, timeout=180, every=1.0, what="the well-formed messages succeeded")
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT max_cost_usd FROM requests WHERE job_id = :j AND custom_id = 'ok0'"),
                              {"j": job}).scalar()
    m = message()
    bound = request_bound("openai", m["body"], get_price_book(), declared_input_tokens=m["input_tokens"])
    assert Decimal(stored) == bound.max_cost_usd > 0
    assert_same_batcher(stack, pid)
    dlq.close()


def test_a_cancelled_jobs_messages_go_to_the_dlq_with_the_reason(stack, engine):
    """Issue 12, item 11: a job cancelled while its requests were still in Kafka ran them all.
    Issue 24, item 2: a job takes no new request once it ended: they go to the DLQ, saying why."""
    pid = batcher_pid(stack)
    job = "job_cancelled_" + uuid.uuid4().hex[:10]
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO jobs (job_id, status, accepted) VALUES (:j, 'cancelled', 30)"),
                     {"j": job})
    msgs = [(REQUESTS_TOPIC, job.encode(), _valid(job, f"c{i}", priority=p, temperature=0 if i % 2 else 1))
            for i, p in enumerate([9, 6, 3, 0, 6] * 6)]
    dlq = DLQReader(stack)
    origins = publish(stack, msgs)
    figures = wait_accounted(engine, dlq, msgs, origins, [job])
    assert figures["dlq"] == len(msgs) and figures["rows"] == 0, figures
    reasons = {h["error"] for o in origins for h in dlq.by_origin[o]}
    assert reasons == {f"job {job} was cancelled: it takes no new request"}
    with engine.connect() as conn:
        results = conn.execute(sa.text("SELECT count(*) FROM results WHERE job_id = :j"), {"j": job}).scalar()
    assert results == 0
    assert_same_batcher(stack, pid)
    dlq.close()
