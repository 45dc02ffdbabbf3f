"""A JSONL job through Kafka, the batcher, Celery and the simulator into Postgres."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal

import sqlalchemy as sa
from confluent_kafka import Consumer, TopicPartition

from pipeline.constants import DLQ_TOPIC, IMMEDIATE_TOPIC, REQUESTS_TOPIC
from pipeline.intake.kafka import make_producer, sign
from pipeline.money.pricing import Usage, cost, get_price_book
from tests.integration.conftest import chat_line, kafka_conf, llmbatch, wait_for, write_jsonl


def test_job_runs_end_to_end_with_bad_lines_rejected(stack, engine, tmp_path):
    lines = [chat_line(f"r{i}", f"Question number {i}: what is {i} squared?") for i in range(20)]
    lines.insert(3, '{"custom_id": "broken", "method": "POST"')          # line 4: truncated JSON
    lines.insert(8, chat_line("r-bad-model", "x", model="gpt-nonexistent"))  # line 9
    lines.append(chat_line("r0", "duplicate custom_id"))                    # line 23
    path = write_jsonl(tmp_path / "job.jsonl", lines)

    proc = llmbatch("submit", path, "--wait", "--json", check=True)
    status = json.loads(proc.stdout)
    assert status["status"] == "completed"
    assert status["counts"] == {"total": 23, "accepted": 20, "rejected": 3, "succeeded": 20,
                                "failed": 0, "cancelled": 0, "pending": 0, "cached": 0, "refused": 0}
    assert "simulator" in proc.stderr
    job = status["job_id"]

    with engine.connect() as conn:
        rejected = conn.execute(sa.text(
            "SELECT line, reason FROM rejections WHERE job_id = :j ORDER BY line"), {"j": job}).all()
        rows = conn.execute(sa.text(
            "SELECT q.custom_id, q.input_tokens, q.model, r.input_tokens, r.cached_input_tokens,"
            " r.output_tokens, r.cost_usd, r.status_code FROM requests q JOIN results r USING (job_id, custom_id)"
            " WHERE q.job_id = :j"), {"j": job}).all()
        attempts = conn.execute(sa.text("SELECT count(*) FROM attempts WHERE job_id = :j"), {"j": job}).scalar()
    assert [r.line for r in rejected] == [4, 9, 23]
    assert "not valid JSON" in rejected[0].reason
    assert "unknown model 'gpt-nonexistent'" in rejected[1].reason
    assert "duplicate custom_id 'r0'" in rejected[2].reason
    assert len(rows) == 20 and attempts == 20
    prices = get_price_book()
    total = Decimal(0)
    for cid, submitted_tokens, model, billed_in, cached, out, cost_usd, code in rows:
        assert code == 200
        assert billed_in == submitted_tokens, f"{cid}: simulator billed {billed_in}, submit counted {submitted_tokens}"
        expected = cost(prices.resolve(model), Usage(billed_in, out, cached))
        assert cost_usd == expected
        total += expected
    assert Decimal(status["cost_usd"]) == total > 0

    out = tmp_path / "out.jsonl"
    llmbatch("results", job, "-o", out, check=True)
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(exported) == 20
    assert {e["custom_id"] for e in exported} == {f"r{i}" for i in range(20)}
    for e in exported:
        assert e["id"].startswith("batch_req_") and e["error"] is None
        assert e["response"]["status_code"] == 200
        body = e["response"]["body"]
        assert body["object"] == "chat.completion" and body["usage"]["prompt_tokens"] > 0

    again = json.loads(llmbatch("status", job, "--json", check=True).stdout)
    assert again["counts"] == status["counts"] and again["cost_usd"] == status["cost_usd"]


def test_missing_and_empty_files_fail_with_one_clear_line(stack, tmp_path):
    missing = llmbatch("submit", tmp_path / "nope.jsonl")
    assert missing.returncode == 2
    assert "no such file" in missing.stderr and "Traceback" not in missing.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = llmbatch("submit", empty)
    assert proc.returncode == 2 and "empty" in proc.stderr and "Traceback" not in proc.stderr


def _message(job_id: str, custom_id: str) -> bytes:
    return json.dumps({"v": 1, "job_id": job_id, "custom_id": custom_id, "line": 1, "provider": "openai",
                       "model": "gpt-4o-mini", "input_tokens": 9, "tokens_exact": True,
                       "max_cost_usd": "0.00002", "priority": 9,
                       "body": {"model": "gpt-4o-mini", "max_tokens": 8,
                                "messages": [{"role": "user", "content": "hi"}]}}).encode()


def test_replayed_messages_change_nothing_and_garbage_goes_to_dlq(stack, engine):
    job = "job_test_" + uuid.uuid4().hex[:10]
    producer = make_producer(stack)
    dlq = Consumer({**kafka_conf(stack), "group.id": f"t-{job}", "enable.auto.commit": False})
    # read the DLQ from its end as it is now, fixed before anything is produced: with a subscription
    # and "latest", the end is looked up at the first fetch, and on a loaded machine that came after
    # the batcher had dead-lettered the garbage, which the test then never saw (CI run 14)
    parts = dlq.list_topics(DLQ_TOPIC, timeout=10).topics[DLQ_TOPIC].partitions
    dlq.assign([TopicPartition(DLQ_TOPIC, p, dlq.get_watermark_offsets(TopicPartition(DLQ_TOPIC, p),
                                                                       timeout=10)[1]) for p in parts])
    garbage = b"{this is not json " + job.encode()
    for value in (_message(job, "one"), garbage, _message(job, "one"), _message(job, "two")):
        producer.produce(REQUESTS_TOPIC, key=job.encode(), value=value, headers=sign(stack, value))
    assert producer.flush(10) == 0

    def done():
        with engine.connect() as conn:
            return conn.execute(sa.text(
                "SELECT count(*) FROM requests WHERE job_id = :j AND status = 'succeeded'"),
                {"j": job}).scalar() == 2
    wait_for(done, timeout=60)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM requests WHERE job_id = :j"), {"j": job}).scalar() == 2
        assert conn.execute(sa.text("SELECT count(*) FROM results WHERE job_id = :j"), {"j": job}).scalar() == 2

    def dead_letter():
        msg = dlq.poll(0.5)
        return msg if msg is not None and msg.error() is None and msg.value() == garbage else None
    msg = wait_for(dead_letter, timeout=30, every=0)
    headers = dict(msg.headers())
    assert b"not valid JSON" in headers["error"]
    assert headers["origin.topic"] == REQUESTS_TOPIC.encode()
    assert int(headers["origin.offset"]) >= 0
    dlq.close()


def test_db_upgrade_is_idempotent(stack):
    proc = llmbatch("db", "upgrade", check=True)
    assert "schema up to date" in proc.stdout


def test_deterministic_requests_are_answered_from_the_cache(stack, engine, tmp_path):
    salt = uuid.uuid4().hex
    lines = [chat_line(f"c{i}", f"{salt} cached question {i}", temperature=0) for i in range(5)]
    for line in lines:
        line["body"]["temperature"] = line.pop("temperature")
    lines.append(chat_line("hot", f"{salt} not deterministic"))
    path = write_jsonl(tmp_path / "cache.jsonl", lines)
    first = json.loads(llmbatch("submit", path, "--wait", "--json", check=True).stdout)
    second = json.loads(llmbatch("submit", path, "--wait", "--json", check=True).stdout)
    assert first["counts"]["cached"] == 0 and first["counts"]["succeeded"] == 6
    assert second["status"] == "completed"
    assert second["counts"]["cached"] == 5 and second["counts"]["succeeded"] == 6
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT custom_id, from_cache, cost_usd, saved_usd, response, lever, list_cost_usd, path, status_code"
            " FROM results WHERE job_id = :j"), {"j": second["job_id"]}).all()
        originals = dict(conn.execute(sa.text(
            "SELECT custom_id, cost_usd FROM results WHERE job_id = :j"), {"j": first["job_id"]}).all())
    for cid, from_cache, cost_usd, saved, response, lever, list_cost, path, status_code in rows:
        if cid == "hot":
            assert not from_cache and cost_usd > 0
        else:
            assert from_cache and cost_usd == 0 and saved == originals[cid] > 0
            # a cache hit is an outcome like any other (one write): the savings ledger names its lever
            assert (lever, list_cost, path, status_code) == ("cache", saved, "realtime", 200)
            assert response["choices"][0]["message"]["content"].startswith("Simulated answer")
    assert Decimal(second["cache_saved_usd"]) == sum(originals[f"c{i}"] for i in range(5))


def test_immediate_requests_take_the_fast_lane_and_its_offsets_are_committed(stack, engine):
    """publish_request puts what will run immediate on llm.requests.immediate, the rest on
    llm.requests; the batcher reads both, each with a consumer group of its own, and commits
    both once the rows are in Postgres."""
    from confluent_kafka import TopicPartition
    from pipeline.intake.producer import publish_request
    job = "job_test_" + uuid.uuid4().hex[:10]
    producer = make_producer(stack)
    for cid, priority in (("fast", 9), ("bulk", 5)):
        publish_request(chat_line(cid, f"Fast lane {cid}", priority=priority), job_id=job, producer=producer,
                        settings=stack)

    def done():
        with engine.connect() as conn:
            return dict(conn.execute(sa.text("SELECT custom_id, tier FROM requests WHERE job_id = :j"
                                             " AND status = 'succeeded'"), {"j": job}).all())
    assert wait_for(lambda: len(done()) == 2 and done(), timeout=60) == {"fast": "immediate", "bulk": "peak"}

    def where(topic, group_id):   # (partition, end offset, committed offset) of each partition
        group = Consumer({**kafka_conf(stack), "group.id": group_id,
                          "enable.auto.commit": False})
        try:
            parts = group.list_topics(topic, timeout=10).topics[topic].partitions
            return [(tp.partition, group.get_watermark_offsets(tp, timeout=10)[1], tp.offset)
                    for tp in group.committed([TopicPartition(topic, p) for p in parts], timeout=10)]
        finally:
            group.close()
    # everything published so far is consumed and committed on both topics, each by its own group
    lanes = ((IMMEDIATE_TOPIC, stack.consumer_group + ".immediate"), (REQUESTS_TOPIC, stack.consumer_group))
    for topic, group_id in lanes:
        assert wait_for(lambda: all(c == end for _, end, c in where(topic, group_id) if end > 0), timeout=30), topic
    assert sum(end for _, end, _ in where(*lanes[0])) >= 1
