"""Kafka, tried from outside as anyone on the host would (issue 24, item 2).

The broker takes only SASL/SCRAM logins, and its ACLs let each principal do
its own part: a producer writes the request topics, the batcher reads them
and writes the DLQ, the admin alone creates or deletes topics. Without
credentials nothing gets in, with a producer's credentials nothing but
writing requests. And what an authorised producer writes is checked by the
batcher: a message for a job that is finished, cancelled or another
producer's, or signed with someone else's name, goes to the DLQ with the
reason, and the job's counts, cost and state do not change.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from pipeline.config import ROOT, Secret
from pipeline.constants import DLQ_TOPIC, IMMEDIATE_TOPIC, PRODUCER_HEADER, REQUESTS_TOPIC
from pipeline.intake.kafka import sign
from pipeline.intake.kafka_admin import add_producer, remove_producer
from tests.integration.conftest import chat_line, kafka_conf, llmbatch, wait_for, write_jsonl
from tests.integration.test_intake_hostile import DLQReader, _valid, publish

pytestmark = pytest.mark.integration

REQUEST_TOPICS = (REQUESTS_TOPIC, IMMEDIATE_TOPIC)
ALL_TOPICS = (REQUESTS_TOPIC, IMMEDIATE_TOPIC, DLQ_TOPIC)
#: how long a refused client tries before it reports (short: a refusal, not a timeout, is the point)
QUICK = {"socket.timeout.ms": 5000, "message.timeout.ms": 5000, "log_level": 0}


def _no_login(settings) -> dict:
    return {"bootstrap.servers": settings.kafka_bootstrap, **QUICK}


def _guessed_login(settings) -> dict:
    return {**kafka_conf(settings, "producer"), "sasl.password": "guess", **QUICK}


def _produce(conf: dict, topics, client_errors: list | None = None) -> dict[str, str | None]:
    """Per topic, the error of producing one message there with ``conf``, or None when Kafka took it;
    the client's own errors (a refused login) go to ``client_errors``."""
    errors: dict = {}
    p = Producer({**conf, "error_cb": lambda err: (client_errors if client_errors is not None else []).append(str(err))})
    for topic in topics:
        p.produce(topic, value=b'{"v": 1}', key=b"k", on_delivery=lambda err, msg, t=topic: errors.update({t: err}))
    p.flush(15)
    return {t: str(errors[t]) if errors.get(t) is not None else (None if t in errors else "not delivered")
            for t in topics}


def _delete(conf: dict, topics) -> dict[str, str | None]:
    """Per topic, the error of deleting it with ``conf``, or None when Kafka did it."""
    out, admin = {}, AdminClient(conf)   # held: a freed client cancels its requests
    for topic, fut in admin.delete_topics(list(topics), operation_timeout=5, request_timeout=5).items():
        try:
            fut.result(timeout=20)
            out[topic] = None
        except KafkaException as e:
            out[topic] = str(e)
    return out


def _topics(settings) -> set[str]:
    return set(AdminClient(kafka_conf(settings)).list_topics(timeout=10).topics)


@pytest.fixture
def service(stack):
    """A service's producer, made as ``llmbatch kafka add-producer`` makes it; removed afterwards."""
    name = "svc-test-" + uuid.uuid4().hex[:8]
    password = add_producer(stack, name)
    yield dataclasses.replace(stack, kafka_user=name, kafka_password=Secret(password))
    remove_producer(stack, name)


@pytest.mark.parametrize("how", ["no credentials", "a guessed password"])
def test_without_credentials_no_topic_takes_a_message_and_none_can_be_deleted(stack, how):
    conf = _no_login(stack) if how == "no credentials" else _guessed_login(stack)
    client_errors: list = []
    taken = {t: e for t, e in _produce(conf, ALL_TOPICS, client_errors).items() if e is None}
    assert not taken, f"with {how}, Kafka took a message on {sorted(taken)}"
    if how == "a guessed password":   # refused, not merely unanswered
        assert any("Authentication failed" in e for e in client_errors), client_errors
    deleted = {t: e for t, e in _delete(conf, ALL_TOPICS).items() if e is None}
    assert not deleted, f"with {how}, Kafka deleted {sorted(deleted)}"
    assert set(ALL_TOPICS) <= _topics(stack)


def test_a_producer_writes_requests_and_nothing_else(stack, service):
    conf = {**kafka_conf(service, "producer"), **QUICK}
    assert _produce(conf, [DLQ_TOPIC])[DLQ_TOPIC] is not None, "a producer wrote the DLQ"
    for topic, error in _delete(conf, ALL_TOPICS).items():
        assert error is not None and "TOPIC_AUTHORIZATION_FAILED" in error, (topic, error)
    reader = Consumer({**conf, "group.id": "llmbatch-batcher", "auto.offset.reset": "earliest"})
    try:
        reader.subscribe([REQUESTS_TOPIC])
        msg = wait_for(lambda: reader.poll(1.0), timeout=30, every=0, what="an answer to the read")
        assert msg.error() is not None, "a producer read llm.requests"
        assert "AUTHORIZATION" in msg.error().name(), msg.error()
    finally:
        reader.close()
    assert set(ALL_TOPICS) <= _topics(stack)


def _console_tool(settings, main_class: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """Kafka's own command-line tool ``main_class``, run as the user nobody without credentials."""
    java, runuser = shutil.which("java"), shutil.which("runuser")
    assert java and runuser, "java and runuser are part of the stack's setup"
    assert os.geteuid() == 0, "the tests run as root, to try the broker as another local user"
    libs = ROOT / "infra" / "kafka" / "libs"
    return subprocess.run([runuser, "-u", "nobody", "--", java, "-Xmx128m", "-XX:TieredStopAtLevel=1",
                           "-XX:+UseSerialGC", "-cp", f"{libs}/*", main_class,
                           "--bootstrap-server", settings.kafka_bootstrap, *args],
                          input=stdin, capture_output=True, text=True, timeout=120, cwd="/")


def test_another_local_user_with_kafkas_own_tools_cannot_publish_nor_delete(stack, engine):
    """The reproduction of the issue: as nobody, kafka-console-producer put a gpt-4o request onto
    llm.requests.immediate and it ran; kafka-topics --delete removed llm.requests.dlq."""
    job = "job_intruder_" + uuid.uuid4().hex[:10]
    line = json.dumps(json.loads(_valid(job, "intruder", priority=9)))
    proc = _console_tool(stack, "org.apache.kafka.tools.ConsoleProducer", "--topic", IMMEDIATE_TOPIC, "--sync",
                         "--producer-property", "max.block.ms=5000",
                         "--producer-property", "delivery.timeout.ms=6000",
                         "--producer-property", "request.timeout.ms=5000", stdin=line + "\n")
    assert proc.returncode != 0, f"as nobody, the console producer published: {proc.stdout} {proc.stderr[-500:]}"
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        config = Path(d) / "client.properties"   # only timeouts: no credentials
        config.write_text("default.api.timeout.ms=8000\nrequest.timeout.ms=5000\n")
        config.chmod(0o644)
        proc = _console_tool(stack, "org.apache.kafka.tools.TopicCommand", "--delete", "--topic", DLQ_TOPIC,
                             "--command-config", str(config))
    assert proc.returncode != 0, f"as nobody, kafka-topics --delete worked: {proc.stdout} {proc.stderr[-500:]}"
    assert set(ALL_TOPICS) <= _topics(stack)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM requests WHERE job_id = :j"), {"j": job}).scalar() == 0


# ------------------------------------------------------------------ what a producer may write

def _summary(engine, job: str) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text(
            "SELECT status, finished_at, accepted, succeeded, failed, cancelled, pending, cost_usd,"
            " (SELECT count(*) FROM requests r WHERE r.job_id = s.job_id) AS requests"
            " FROM job_summary s WHERE job_id = :j"), {"j": job}).mappings().one())


def _dead_lettered(engine, settings, messages) -> list[str]:
    """Publish ``messages`` as ``settings``' producer; their DLQ reasons, once every one has its copy."""
    dlq = DLQReader(settings)
    try:
        origins = publish(settings, messages)
        wait_for(lambda: all(o in dlq.read() for o in origins), timeout=60, every=0.5,
                 what="a DLQ copy of every message")
        return [dlq.by_origin[o][0]["error"] for o in origins]
    finally:
        dlq.close()


def test_a_message_for_a_finished_job_goes_to_the_dlq_and_the_job_does_not_change(stack, engine, tmp_path):
    """The reproduction: a message into a finished job turned its counts into "total 3,
    succeeded 4" and its cost from $0.000018 to $0.160038, and one that then failed left
    it ``completed`` with ``failed: 1``."""
    salt = uuid.uuid4().hex
    path = write_jsonl(tmp_path / "three.jsonl", [chat_line(f"c{i}", f"{salt} finished {i}") for i in range(3)])
    job = json.loads(llmbatch("submit", str(path), "--wait", "--json", check=True).stdout)["job_id"]
    before = _summary(engine, job)
    assert before["status"] == "completed" and before["succeeded"] == 3, before
    late = [(IMMEDIATE_TOPIC, job.encode(), _valid(job, "late", priority=9)),
            (REQUESTS_TOPIC, job.encode(), _valid(job, "late-bulk", priority=5)),
            (REQUESTS_TOPIC, job.encode(), _valid(job, "late-held", priority=0))]
    reasons = _dead_lettered(engine, stack, late)
    assert reasons == [f"job {job} is finished (completed): it takes no new request"] * 3
    assert _summary(engine, job) == before


def test_a_message_for_another_producers_job_or_in_its_name_goes_to_the_dlq(stack, engine, service):
    theirs = "job_theirs_" + uuid.uuid4().hex[:10]
    with engine.begin() as conn:   # a job of the pipeline's own producer, still running
        conn.execute(sa.text("INSERT INTO jobs (job_id, status, accepted, producer) VALUES (:j, 'running', 5, :p)"),
                     {"j": theirs, "p": stack.kafka_user})
    before = _summary(engine, theirs)
    reasons = _dead_lettered(engine, service, [(REQUESTS_TOPIC, theirs.encode(), _valid(theirs, "mine", priority=6))])
    assert reasons == [f"job {theirs} belongs to producer {stack.kafka_user!r}: a message from"
                       f" {service.kafka_user!r} cannot add to it"]
    assert _summary(engine, theirs) == before

    # signed in the owner's name with the service's own password: the proof fails
    value = _valid(theirs, "forged", priority=6)
    forged = [(PRODUCER_HEADER, stack.kafka_user.encode()), sign(service, value)[1]]
    p = Producer(kafka_conf(service, "producer"))
    dlq = DLQReader(stack)
    origin: list = []
    p.produce(REQUESTS_TOPIC, value=value, key=theirs.encode(), headers=forged,
              on_delivery=lambda err, msg: origin.append((msg.topic(), msg.partition(), msg.offset())))
    assert p.flush(15) == 0 and origin
    wait_for(lambda: origin[0] in dlq.read(), timeout=60, every=0.5, what="the forged message's DLQ copy")
    assert dlq.by_origin[origin[0]][0]["error"] == (f"signature does not match producer {stack.kafka_user!r}:"
                                                    " not sent with its credentials")
    dlq.close()
    assert _summary(engine, theirs) == before


def test_a_service_with_its_own_producer_runs_its_own_job_and_may_add_to_it(stack, engine, service):
    """A service's job has no end of intake: it completes whenever its requests so far are done,
    and its owner's next request makes it running again (it is never ``completed`` with a
    request still to run, and never refused as finished)."""
    from pipeline.intake.producer import publish_request
    job = "job_service_" + uuid.uuid4().hex[:10]

    def state():
        with engine.connect() as conn:
            return conn.execute(sa.text(
                "SELECT j.producer, j.status, count(*) FILTER (WHERE r.status = 'succeeded') AS ok"
                " FROM jobs j JOIN requests r USING (job_id) WHERE j.job_id = :j GROUP BY 1, 2"),
                {"j": job}).first()
    publish_request(chat_line("s1", f"service {job}", priority=9), job_id=job, settings=service)
    row = wait_for(lambda: (r := state()) is not None and r.status == "completed" and r, timeout=60)
    assert row.producer == service.kafka_user and row.ok == 1
    publish_request(chat_line("s2", f"service again {job}", priority=9), job_id=job, settings=service)
    row = wait_for(lambda: (r := state()) is not None and r.ok == 2 and r.status == "completed" and r, timeout=60)
    assert row.producer == service.kafka_user
