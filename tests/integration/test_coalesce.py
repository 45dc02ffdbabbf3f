"""Single flight on the real stack: the claim protocol's Lua in Redis under any interleaving of
owners, waiters and crashes; one call per distinct key in a batch run in this process; and jobs
through the whole pipeline (submit → Kafka → batcher → workers → simulator), where repeats in
flight at once are sent once and recorded as cache hits with what they saved."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from decimal import Decimal

import sqlalchemy as sa
from hypothesis import given, settings as hsettings, strategies as st

from pipeline.config import get_settings
from pipeline.endpoints.caching import cache_key
from pipeline.stores.flight import CLAIM_PREFIX, Flights
from tests.integration.conftest import chat_line, llmbatch, wait_for, write_jsonl
from tests.integration.execution_helpers import LOOP, calls_of, make_batch, requests_of, sim_stats, simulator_config
from tests.integration.test_scheduler import scheduler  # noqa: F401  (the leading scheduler, a fixture)
from tests.unit.flight_model import check, play
from workers.execute import run_batch

CLAIM_MS = 300


def _flights(settings) -> Flights:
    import redis.asyncio as aredis
    return Flights(aredis.Redis.from_url(settings.redis_url), claim_ms=CLAIM_MS, answer_ttl_s=60)


class RealClock:
    def now(self) -> float:
        return time.monotonic()

    async def advance(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class Namespaced:
    """The real Flights, under keys of this example's own (a fresh prefix): runs never share a key."""

    def __init__(self, flights: Flights, ns: str):
        self.f, self.ns = flights, ns
        self.claim_ms = flights.claim_ms

    async def look(self, key, holder=None):
        return await self.f.look(self.ns + key, holder)

    async def renew(self, key, token):
        return await self.f.renew(self.ns + key, token)

    async def answered(self, key, token, answer):
        await self.f.answered(self.ns + key, token, answer)

    async def failed(self, key, token):
        await self.f.failed(self.ns + key, token)

    async def holder(self, key):
        v = await self.f.redis.get(CLAIM_PREFIX + self.ns + key)
        return v.decode() if v is not None else None


EVENTS = st.lists(st.one_of(
    st.tuples(st.sampled_from(["step", "step", "step", "ok", "fail", "crash"]), st.integers(0, 5)),
    st.tuples(st.just("time"), st.floats(0.0, 0.8))), max_size=40)


@hsettings(max_examples=30, deadline=None)
@given(events=EVENTS, actors=st.integers(1, 5))
def test_the_claim_protocol_in_redis_keeps_the_invariants_under_any_interleaving(stack, events, actors):
    """The Lua scripts, on the stack's Redis, in real time (claims of 300 ms): every request ends
    with its own key's answer or a call of its own, a key is sent once unless its owner died or
    failed, a failed owner's waiters call by themselves, and no stale owner renews a claim."""
    async def go():
        flights = _flights(stack)
        try:
            store = Namespaced(flights, f"test-{uuid.uuid4().hex}-")
            return await play(store, RealClock(), events, claim_s=CLAIM_MS / 1000, actors=actors, max_wait_s=1.0)
        finally:
            await flights.redis.aclose()
    check(asyncio.run(go()), CLAIM_MS / 1000)


def test_a_stale_owner_cannot_renew_or_drop_the_new_owners_claim(stack):
    async def go():
        flights = _flights(stack)
        key = f"test-{uuid.uuid4().hex}"
        try:
            first = await flights.look(key)
            await asyncio.sleep(CLAIM_MS / 1000 + 0.05)        # it died: its claim ran out unrenewed
            second = await flights.look(key, first.value)
            renewed = await flights.renew(key, first.value)
            await flights.failed(key, first.value)
            after_stale = await flights.look(key, second.value)
            await flights.answered(key, second.value, {"ok": 1})
            return first, second, renewed, after_stale, await flights.look(key)
        finally:
            await flights.redis.aclose()
    first, second, renewed, after_stale, last = asyncio.run(go())
    assert first.kind == "owner" and second.kind == "owner" and int(second.value) > int(first.value)
    assert renewed is False
    assert after_stale.kind == "wait" and after_stale.value == second.value   # its claim stands
    assert last.kind == "answer" and last.value == {"ok": 1}


# ------------------------------------------------------------------ a batch in this process

def test_repeats_in_one_batch_are_sent_once_per_distinct_key(stack, engine):
    """A batch of 30 requests with 6 distinct bodies at temperature 0: 6 provider calls; the other
    24 are cache hits at cost 0, each with its list price saved by coalescing."""
    n, distinct = 30, 6
    tag = uuid.uuid4().hex[:8]
    bodies = [{"model": "gpt-4o-mini", "max_tokens": 16, "temperature": 0,
               "messages": [{"role": "user", "content": f"coalesce {tag} body {k}"}]} for k in range(distinct)]
    job, batch = make_batch(engine, n, overrides={f"r{i}": {"body": bodies[i % distinct]} for i in range(n)})
    with engine.begin() as conn:
        for i in range(n):
            conn.execute(sa.text("UPDATE requests SET cache_key = :k WHERE job_id = :j AND custom_id = :c"),
                         {"k": cache_key("openai", bodies[i % distinct]), "j": job, "c": f"r{i}"})
    with simulator_config(stack, latency_ms=200):
        outcome = LOOP.run_until_complete(run_batch(batch, owner=f"test-{tag}", settings=stack))
    assert outcome["succeeded"] == n, outcome
    assert calls_of(stack, job) == distinct
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT from_cache, lever, cost_usd, list_cost_usd, saved_usd, savings FROM results WHERE job_id = :j"),
            {"j": job}).mappings().all()
    hits = [r for r in rows if r["from_cache"]]
    assert len(hits) == n - distinct
    assert all(r["cost_usd"] == 0 and r["lever"] in ("coalesce", "cache") and r["saved_usd"] == r["list_cost_usd"] > 0
               and Decimal(r["savings"][r["lever"]]) == r["list_cost_usd"] for r in hits)
    assert all(r["status"] == "succeeded" for r in requests_of(engine, job).values())


# ------------------------------------------------------------------ whole jobs

def _lines(tag: str, n: int, repeat_every: int | None) -> tuple[list[dict], int]:
    """``n`` lines at temperature 0; every ``repeat_every``-th repeats the line before it."""
    lines, distinct = [], 0
    for i in range(n):
        if repeat_every and i % repeat_every == repeat_every - 1:
            body = lines[-1]["body"]
        else:
            body = chat_line("x", f"coalesce job {tag} line {i}", max_tokens=16)["body"] | {"temperature": 0}
            distinct += 1
        lines.append({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    return lines, distinct


def _submit(path) -> str:
    proc = llmbatch("submit", path, "--wait", "--json", timeout=600, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["job_id"]


def _served(engine, jobs: list[str]) -> tuple[int, dict]:
    with engine.connect() as conn:
        n = conn.execute(sa.text("SELECT count(*) FROM results WHERE job_id = ANY(:j) AND from_cache"),
                         {"j": jobs}).scalar()
        savings = conn.execute(sa.text(
            "SELECT s.lever, sum(s.usd::numeric) FROM results x, jsonb_each_text(x.savings) s(lever, usd)"
            " WHERE x.job_id = ANY(:j) GROUP BY 1"), {"j": jobs}).all()
    return n, dict(savings)


def test_a_jobs_repeats_in_flight_are_served_without_a_provider_call(stack, engine, tmp_path):
    """200 lines, every fifth an exact repeat of the line before (20 %): 160 provider calls, and the
    40 repeats are cache hits with what they saved, in the job's status and the savings_daily view."""
    lines, distinct = _lines(uuid.uuid4().hex[:8], 200, 5)
    with simulator_config(stack, latency="uniform", latency_ms=300, jitter_ms=200):
        job = _submit(write_jsonl(tmp_path / "repeats.jsonl", lines))
    assert calls_of(stack, job) == distinct == 160
    served, savings = _served(engine, [job])
    assert served == 40 and set(savings) <= {"coalesce", "cache"} and sum(savings.values()) > 0
    status = json.loads(llmbatch("status", job, "--json", check=True).stdout)
    assert status["counts"]["cached"] == 40 and status["counts"]["succeeded"] == 200
    assert Decimal(status["savings"]["saved_usd"]) == sum(savings.values())
    with engine.connect() as conn:
        today = conn.execute(sa.text(
            "SELECT saved_coalesce_usd + saved_cache_usd FROM savings_daily"
            " WHERE day = (now() AT TIME ZONE 'UTC')::date")).scalar()
    assert today >= sum(savings.values())


def test_two_copies_of_one_job_at_the_same_moment_are_sent_once(stack, engine, tmp_path):
    """The same 100 lines submitted twice at once: 100 provider calls for the two jobs, and 100 of
    their 200 requests served without a call."""
    lines, distinct = _lines(uuid.uuid4().hex[:8], 100, None)
    path = write_jsonl(tmp_path / "copy.jsonl", lines)
    jobs: list[str] = []
    go = threading.Barrier(2)

    def one():
        go.wait()
        jobs.append(_submit(path))
    with simulator_config(stack, latency="uniform", latency_ms=300, jitter_ms=200):
        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(jobs) == 2
    assert sum(calls_of(stack, j) for j in jobs) == distinct == 100
    served, _ = _served(engine, jobs)
    assert served == 100



# ------------------------------------------------------------------ a provider batch

def test_a_provider_batch_sends_one_line_per_distinct_request(scheduler, tmp_path):
    """40 lines at temperature 0, every fourth a repeat of the line before, through OpenAI's Batch
    API: 30 lines reach the provider, and the 10 repeats take their twin's answer at cost 0."""
    engine = scheduler
    lines, distinct = _lines(uuid.uuid4().hex[:8], 40, 4)
    before = sum(sim_stats(get_settings())["batch_requests"].values())
    proc = llmbatch("submit", write_jsonl(tmp_path / "pb.jsonl", lines), "--json", "--tier", "peak",
                    "--mode", "provider_batch", check=True)
    job = json.loads(proc.stdout)["job_id"]

    def done():
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT status FROM jobs WHERE job_id = :j"), {"j": job}).scalar() \
                == "completed"
    wait_for(done, timeout=240, every=1, what=f"provider-batch job {job} completed")
    assert sum(sim_stats(get_settings())["batch_requests"].values()) - before == distinct == 30
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT from_cache, lever, cost_usd, list_cost_usd, savings FROM results WHERE job_id = :j"),
            {"j": job}).mappings().all()
    twins = [r for r in rows if r["from_cache"]]
    assert len(rows) == 40 and len(twins) == 10
    assert all(r["lever"] == "coalesce" and r["cost_usd"] == 0 and r["list_cost_usd"] > 0 for r in twins)
    assert all(set(r["savings"]) == {"batch"} for r in rows if not r["from_cache"])
