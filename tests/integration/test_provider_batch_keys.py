"""A provider batch goes out on a key chosen as realtime chooses (the live key with the most
headroom, a revoked one never) and is read back on it; a provider of kind anthropic with a name of
its own runs its provider batches in Anthropic's format. On the live stack: the scheduler and the
workers restarted with the named providers, the simulator serving them under ``/p/<name>/…``."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
import redis
import sqlalchemy as sa

from pipeline.providers.keys import dead_key
from tests.integration.conftest import LLMBATCH, write_jsonl
from tests.integration.named_providers import LLAMA, RESTARTED, Named, key, named_stack, results, sim, wait_job

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:6]
#: two keys; "big" has the more headroom, and is revoked before the job: the batch must take "small"
TWO = Named(f"pbk-{RUN}", keys={"big": key(300), "small": key(150)}, input="0.50", output="0.50")
#: kind anthropic, named otherwise
EU = Named(f"ceu-{RUN}", kind="anthropic", keys={"eu-1": key(60)}, input="1.00", output="5.00")


@pytest.fixture(scope="module")
def env(stack, tmp_path_factory):
    with named_stack(stack, tmp_path_factory.mktemp("pbkeys"), [TWO, EU], processes=RESTARTED + ("scheduler",)) as e:
        yield e


def _submit(env, tmp_path, lines, name) -> str:
    path = write_jsonl(tmp_path / f"{name}.jsonl", lines)
    p = subprocess.run([LLMBATCH, "submit", str(path), "--json", "--mode", "provider_batch", "--tier", "peak"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)["job_id"]


def _batches(engine, job: str) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(
            "SELECT DISTINCT pb.id, pb.provider, pb.status, pb.counts->>'key_alias' AS key_alias"
            " FROM provider_batches pb JOIN batches b ON b.provider_batch = pb.id"
            " JOIN requests r ON r.batch_id = b.batch_id WHERE r.job_id = :j"), {"j": job}).mappings()]


def test_a_provider_batch_goes_out_on_a_live_key_and_is_stored_with_it(stack, engine, env, tmp_path):
    r = redis.Redis.from_url(stack.redis_url)
    mark = dead_key(TWO.name, "big")
    r.set(mark, "401 in a test")   # out of the rotation, as a 401 would have put it
    try:
        n = 6
        job = _submit(env, tmp_path, [
            {"custom_id": f"k{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": f"{TWO.name}/{LLAMA}", "max_tokens": 8,
                      "messages": [{"role": "user", "content": f"batch key {i}"}]}} for i in range(n)], "two")
        assert wait_job(engine, job, timeout=240) == "completed"
    finally:
        r.delete(mark)
    rows = results(engine, job)
    pbs = _batches(engine, job)
    stats = sim(stack, "GET", "/_stats")["providers"][TWO.name]
    print(f"\nprovider batches {pbs}; results by key {[x['key_alias'] for x in rows]}; simulator keys {stats['keys']}")
    assert len(rows) == n and all(x["status"] == "succeeded" for x in rows)
    assert {p["key_alias"] for p in pbs} == {"small"} and {p["status"] for p in pbs} == {"ended"}
    assert {x["key_alias"] for x in rows} == {"small"}
    with engine.connect() as conn:
        assert set(conn.execute(sa.text("SELECT DISTINCT key_alias FROM attempts WHERE job_id = :j"),
                                {"j": job}).scalars()) == {"small"}
    assert set(stats["keys"]) == {"small"} and stats["keys"]["small"]["batch_lines"] == n


def test_an_anthropic_kind_provider_of_its_own_name_runs_its_provider_batches(stack, engine, env, tmp_path):
    n = 4
    job = _submit(env, tmp_path, [
        {"custom_id": f"e{i}", "params": {"model": f"{EU.name}/{LLAMA}", "max_tokens": 8,
                                           "messages": [{"role": "user", "content": f"eu batch {i}"}]}}
        for i in range(n)], "eu")
    assert wait_job(engine, job, timeout=240) == "completed"
    rows = results(engine, job)
    with engine.connect() as conn:
        urls = set(conn.execute(sa.text("SELECT DISTINCT endpoint FROM requests WHERE job_id = :j"),
                                {"j": job}).scalars())
        answers = conn.execute(sa.text("SELECT response FROM results WHERE job_id = :j"), {"j": job}).scalars().all()
    stats = sim(stack, "GET", "/_stats")["providers"][EU.name]
    print(f"\n{EU.name}: urls {urls}; keys {[x['key_alias'] for x in rows]}; simulator {stats['keys']}")
    assert len(rows) == n and all(x["status"] == "succeeded" for x in rows)
    assert urls == {"/v1/messages"}
    assert all(a["type"] == "message" and a["content"][0]["type"] == "text" for a in answers)
    assert {x["key_alias"] for x in rows} == {"eu-1"} and stats["keys"]["eu-1"]["batch_lines"] == n


def test_with_every_key_out_a_provider_batch_fails_no_usable_key_once(stack, engine, env, tmp_path):
    """As in realtime: the requests fail with that reason, they are not sent again every tick."""
    r = redis.Redis.from_url(stack.redis_url)
    marks = [dead_key(TWO.name, alias) for alias in TWO.keys]
    for m in marks:
        r.set(m, "401 in a test")
    try:
        job = _submit(env, tmp_path, [
            {"custom_id": f"n{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": f"{TWO.name}/{LLAMA}", "max_tokens": 8,
                      "messages": [{"role": "user", "content": f"no key {i}"}]}} for i in range(3)], "nokey")
        assert wait_job(engine, job, timeout=120) == "failed"
    finally:
        for m in marks:
            r.delete(m)
    with engine.connect() as conn:
        codes = conn.execute(sa.text("SELECT error->>'code' FROM results WHERE job_id = :j"), {"j": job}).scalars().all()
    pbs = _batches(engine, job)
    assert codes == ["no_usable_key"] * 3
    assert [p["status"] for p in pbs] == ["abandoned"]   # one row: not created again every tick
