"""Single flight without services: the waiter's decisions, the claim protocol under any interleaving
of owners, waiters and crashes (on the protocol's model, tests/unit/flight_model.py), and the worker's
coalescer: one call per distinct key in flight, in a process and across processes."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings as hsettings, strategies as st

from pipeline.config import Settings
from pipeline.money.pricing import Usage, get_price_book
from pipeline.money.savings import list_price
from pipeline.request import Outcome, Request
from pipeline.stores.flight import MAX_HANDOVERS, POLL_MAX_S, Seen, Waiting
from tests.unit.flight_model import Model, check, play
from tests.unit.test_paths import row
from workers.coalesce import Coalescer

CLAIM_MS = 1000
ANSWER = {"id": "chatcmpl-1", "model": "gpt-5-mini", "object": "chat.completion",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}}
FULL = list_price(get_price_book().resolve("gpt-5-mini"), Usage(1000, 500))


# ------------------------------------------------------------------ the waiter's decisions

def test_a_waiter_takes_the_answer_or_the_claim_of_an_owner_that_died():
    w = Waiting("7", started=0.0, max_wait_s=10.0)
    assert w.after(Seen("wait", "7"), 1.0) == "wait"
    assert w.after(Seen("answer", {"a": 1}), 2.0) == "answer"
    assert Waiting("7", 0.0, 10.0).after(Seen("owner", "9"), 1.0) == "own"


def test_a_waiter_whose_owner_failed_calls_by_itself():
    assert Waiting("7", 0.0, 10.0).after(Seen("failed", "7"), 1.0) == "alone"


def test_an_answer_that_is_not_json_makes_the_waiter_call():
    assert Waiting("7", 0.0, 10.0).after(Seen("answer", None), 1.0) == "alone"


def test_a_wait_is_bounded_in_time_and_in_owners():
    w = Waiting("1", 0.0, 10.0)
    assert w.after(Seen("wait", "1"), 9.9) == "wait"
    assert w.after(Seen("wait", "1"), 10.0) == "alone"
    w = Waiting("1", 0.0, 1e9)
    decisions = [w.after(Seen("wait", str(t)), 1.0) for t in range(2, 3 + MAX_HANDOVERS)]
    assert decisions == ["wait"] * MAX_HANDOVERS + ["alone"]


def test_looks_back_off_and_never_past_the_end_of_the_wait():
    w = Waiting("1", 0.0, 3.0)
    delays = []
    for _ in range(12):
        delays.append(w.delay(0.0))
        w.after(Seen("wait", "1"), 0.0)
    assert delays == sorted(delays) and delays[-1] == POLL_MAX_S and delays[0] > 0
    assert w.delay(2.9) <= 0.1 + 1e-9 and w.delay(3.0) == 0.0


# ------------------------------------------------------------------ any interleaving (the model)

class VirtualClock:
    def __init__(self, store: Model):
        self.store = store

    def now(self) -> float:
        return self.store.now

    async def advance(self, seconds: float) -> None:
        self.store.now += seconds


EVENTS = st.lists(st.one_of(
    st.tuples(st.sampled_from(["step", "step", "step", "ok", "fail", "crash"]), st.integers(0, 5)),
    st.tuples(st.just("time"), st.floats(0.0, 3.0))), max_size=60)


@hsettings(max_examples=400, deadline=None)
@given(events=EVENTS, actors=st.integers(1, 6), keys=st.sampled_from([("k1",), ("k1", "k2")]))
def test_owners_waiters_and_crashes_in_any_order_keep_the_invariants(events, actors, keys):
    store = Model(CLAIM_MS)
    run = asyncio.run(play(store, VirtualClock(store), events, claim_s=CLAIM_MS / 1000, keys=keys,
                           actors=actors, max_wait_s=5.0))
    check(run, CLAIM_MS / 1000)


def test_without_crashes_or_failures_a_key_is_sent_once():
    store = Model(CLAIM_MS)
    events = [("step", i) for i in range(6)] + [("time", 0.5)] + [("step", i) for i in range(6)]
    run = asyncio.run(play(store, VirtualClock(store), events, claim_s=1.0, keys=("k1",), actors=6))
    check(run, 1.0)
    assert run.calls == {"k1": 1}
    assert sorted(a.how for a in run.actors) == ["called"] + ["coalesce"] * 5


def test_an_owner_that_dies_is_replaced_by_one_waiter_and_the_rest_wait_for_it():
    store = Model(CLAIM_MS)
    events = [("step", 0), ("step", 1), ("step", 2), ("crash", 0), ("time", 2.0)]
    run = asyncio.run(play(store, VirtualClock(store), events, claim_s=1.0, keys=("k1",), actors=3))
    check(run, 1.0)
    assert run.calls == {"k1": 2}   # the dead owner's call, and one waiter's
    assert sorted(a.how or a.state for a in run.actors) == ["called", "coalesce", "dead"]


def test_a_failed_owner_sends_each_waiter_to_call_by_itself_once():
    store = Model(CLAIM_MS)
    events = [("step", 0), ("step", 1), ("step", 2), ("fail", 0)]
    run = asyncio.run(play(store, VirtualClock(store), events, claim_s=1.0, keys=("k1",), actors=3))
    check(run, 1.0)
    assert [a.alone for a in run.actors] == [None, "failed", "failed"] and run.calls == {"k1": 3}


# ------------------------------------------------------------------ the worker's coalescer

def request(custom_id: str, key: str | None = "k1") -> Request:
    return Request.from_row(row(custom_id=custom_id, cache_key=key, mode="realtime"))


def answered(req: Request) -> Outcome:
    return Outcome(req.job_id, req.custom_id, req.model, "succeeded", response=ANSWER, usage=Usage(1000, 500),
                   cost=FULL, list_cost=FULL)


class Process:
    """One worker process's coalescer on a shared store; ``sent`` counts its provider calls."""

    def __init__(self, store, clock_store: Model | None = None, **over):
        model = clock_store or (store if isinstance(store, Model) else None)

        async def sleep(s):
            if model is not None:
                model.now += s
            await asyncio.sleep(0)
        self.c = Coalescer(Settings(**{"coalesce_wait_max_s": 30.0, **over}), store,
                           clock=(lambda: model.now) if model else (lambda: 0.0), sleep=sleep)
        self.sent: list[str] = []

    async def run(self, req: Request, ok: bool = True, hold: asyncio.Event | None = None) -> Outcome | str:
        async with self.c.turn(req) as turn:
            if turn.outcome is not None:
                return turn.outcome
            self.sent.append(req.custom_id)
            for _ in range(3):   # a call takes a while: others arrive meanwhile
                await asyncio.sleep(0)
            if hold is not None:
                await hold.wait()
            if not ok:
                return "failed"
            out = answered(req)
            await turn.publish(out)
            return out


def test_repeats_in_one_batch_make_one_call_and_are_cache_hits_at_cost_0():
    async def go():
        p = Process(Model(CLAIM_MS))
        return p, await asyncio.gather(*(p.run(request(f"c{i}")) for i in range(5)))
    p, outs = asyncio.run(go())
    assert p.sent == ["c0"]
    hits = [o for o in outs if o.from_cache]
    assert len(hits) == 4 and all(o.cost == 0 and o.lever == "coalesce" and o.list_cost == FULL for o in hits)
    assert all(o.savings == {"coalesce": FULL} and o.response == ANSWER for o in hits)
    assert {o.custom_id for o in outs} == {f"c{i}" for i in range(5)}


def test_a_request_after_the_answer_is_an_exact_cache_hit():
    async def go():
        p = Process(Model(CLAIM_MS))
        await p.run(request("c0"))
        return p, await p.run(request("c1"))
    p, out = asyncio.run(go())
    assert p.sent == ["c0"] and out.from_cache and out.lever == "cache" and out.savings == {"cache": FULL}


def test_two_processes_send_one_key_once():
    async def go():
        store = Model(CLAIM_MS)
        a, b = Process(store), Process(store)
        hold = asyncio.Event()
        first = asyncio.create_task(a.run(request("a0"), hold=hold))
        await asyncio.sleep(0)
        second = asyncio.create_task(b.run(request("b0")))
        for _ in range(5):
            await asyncio.sleep(0)
        hold.set()
        return a, b, await first, await second
    a, b, first, second = asyncio.run(go())
    assert a.sent == ["a0"] and b.sent == [] and second.lever == "coalesce" and second.cost == 0


def test_when_the_leader_gets_no_answer_its_followers_call_by_themselves():
    async def go():
        store = Model(CLAIM_MS)
        p = Process(store)
        hold = asyncio.Event()
        lead = asyncio.create_task(p.run(request("c0"), ok=False, hold=hold))
        await asyncio.sleep(0)
        rest = [asyncio.create_task(p.run(request(f"c{i}"))) for i in (1, 2)]
        await asyncio.sleep(0)
        hold.set()
        return p, store, [await lead] + [await r for r in rest]
    p, store, outs = asyncio.run(go())
    assert sorted(p.sent) == ["c0", "c1", "c2"] and outs[0] == "failed"
    assert not any(o.from_cache for o in outs[1:])
    assert store.failed_marks   # a waiter in another process would call by itself too


def test_a_requests_without_a_key_or_with_coalescing_off_calls():
    async def go():
        on, off = Process(Model(CLAIM_MS)), Process(Model(CLAIM_MS), coalesce=False)
        await asyncio.gather(*(on.run(request(f"c{i}", None)) for i in range(3)))
        await asyncio.gather(*(off.run(request(f"c{i}")) for i in range(3)))
        return on, off
    on, off = asyncio.run(go())
    assert len(on.sent) == 3 and len(off.sent) == 3


class Broken:
    claim_ms = CLAIM_MS

    async def look(self, key, holder=None):
        raise ConnectionError("Redis is away")


def test_a_redis_that_fails_means_no_flight_not_a_failure():
    async def go():
        p = Process(Broken())
        return p, await asyncio.gather(*(p.run(request(f"c{i}")) for i in range(3)))
    p, outs = asyncio.run(go())
    # the process still sends one call per key (its own leader), and Redis is not needed for that
    assert p.sent == ["c0"] and all(o.status == "succeeded" for o in outs)


def test_the_owner_of_a_process_that_died_is_replaced_by_a_waiter():
    async def go():
        store = Model(CLAIM_MS)
        await store.look("k1")                 # a process took the claim and died: it is never renewed
        p = Process(store)
        return p, store, await p.run(request("c0"))
    p, store, out = asyncio.run(go())
    assert p.sent == ["c0"] and not out.from_cache and store.now >= CLAIM_MS / 1000


def test_an_answer_of_a_fallback_model_is_not_handed_on():
    async def go():
        p = Process(Model(CLAIM_MS))
        hold = asyncio.Event()

        async def lead():
            async with p.c.turn(request("c0")) as turn:
                p.sent.append("c0")
                await hold.wait()
                out = answered(request("c0"))
                await turn.publish(Outcome(out.job_id, out.custom_id, "gpt-4o-mini", "succeeded",
                                           response=ANSWER, usage=out.usage, cost=out.cost))
        first = asyncio.create_task(lead())
        await asyncio.sleep(0)
        second = asyncio.create_task(p.run(request("c1")))
        await asyncio.sleep(0)
        hold.set()
        await first
        return p, await second
    p, out = asyncio.run(go())
    assert p.sent == ["c0", "c1"] and not out.from_cache


def test_a_process_renews_all_its_claims_together_while_its_calls_run():
    async def go():
        store = Model(CLAIM_MS)
        p = Process(store)
        hold = asyncio.Event()
        calls = [asyncio.create_task(p.run(request(f"c{i}", f"k{i}"), hold=hold)) for i in range(3)]
        for _ in range(40):   # the renewer's sleeps move the clock: far past one claim's life
            await asyncio.sleep(0)
        held = {k: store.claims.get(k) for k in ("k0", "k1", "k2")}
        hold.set()
        await asyncio.gather(*calls)
        return store, held, p
    store, held, p = asyncio.run(go())
    assert store.now > 2 * CLAIM_MS / 1000   # time went by ...
    assert all(c is not None and c[1] > store.now - CLAIM_MS / 1000 for c in held.values())   # ... claims renewed
    assert not p.c.owned and sorted(store.answers) == ["k0", "k1", "k2"]
