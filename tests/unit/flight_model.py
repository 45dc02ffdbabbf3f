"""Interleavings of single-flight owners, waiters and crashes, for any store of the protocol.

``Model`` is the protocol's specification in Python (what the Lua scripts of
pipeline/stores/flight.py do, on a virtual clock): the unit tests run the actors on it;
tests/integration/test_coalesce.py runs the same actors on the real ``Flights`` in Redis,
where time is real. ``play`` runs a script of events that hypothesis draws (which actor steps
next, a call that ends well or badly, a crash, time going by), then lets every live actor run
to its end, and returns what happened for the invariants (``check``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pipeline.stores.flight import MAX_HANDOVERS, Seen, Waiting


class Model:
    """The four atomic steps, as the Lua scripts do them, on a virtual clock (``now``, seconds)."""

    def __init__(self, claim_ms: int):
        self.claim_ms = claim_ms
        self.now = 0.0
        self.answers: dict[str, str] = {}
        self.claims: dict[str, tuple[str, float]] = {}     # key -> (token, expires at)
        self.failed_marks: dict[str, float] = {}           # token -> expires at
        self.fence = 0

    def _claim(self, key):
        c = self.claims.get(key)
        if c is not None and c[1] <= self.now:
            del self.claims[key]
            return None
        return c

    async def look(self, key, holder=None) -> Seen:
        if key in self.answers:
            return Seen("answer", json.loads(self.answers[key]))
        if holder and self.failed_marks.get(holder, -1) > self.now:
            return Seen("failed", holder)
        c = self._claim(key)
        if c is not None:
            return Seen("wait", c[0])
        self.fence += 1
        self.claims[key] = (str(self.fence), self.now + self.claim_ms / 1000)
        return Seen("owner", str(self.fence))

    async def renew(self, key, token) -> bool:
        c = self._claim(key)
        if c is not None and c[0] == token:
            self.claims[key] = (token, self.now + self.claim_ms / 1000)
            return True
        return False

    async def renew_many(self, claims: dict) -> set:
        return {k for k, t in claims.items() if await self.renew(k, t)}

    async def answered(self, key, token, answer) -> None:
        self.answers[key] = json.dumps(answer)
        c = self._claim(key)
        if c is not None and c[0] == token:
            del self.claims[key]

    async def failed(self, key, token) -> None:
        self.failed_marks[token] = self.now + self.claim_ms / 1000
        c = self._claim(key)
        if c is not None and c[0] == token:
            del self.claims[key]

    async def holder(self, key) -> str | None:
        c = self._claim(key)
        return c[0] if c else None


@dataclass
class Actor:
    """One request: ``start`` → ``calling`` (owner, with a token) | ``waiting`` | ``alone`` (calls
    without a claim) → ``done`` (how: cache, coalesce, called) or ``dead`` (its process crashed)."""
    name: int
    key: str
    state: str = "start"
    token: str | None = None
    waiting: Waiting | None = None
    how: str | None = None
    answer: object = None
    calls: int = 0
    waited_for: list = field(default_factory=list)   # the owners it waited for, in order
    alone: str | None = None                          # why it called without a claim: failed | time | handovers
    lost: bool = False                                # an owner whose claim ran out while it lived (a stall)
    held_since: float = 0.0                           # when it last took or renewed its claim (before asking)
    began: float = 0.0
    ended: float | None = None


def answer_of(key: str) -> dict:
    return {"answer": key}


@dataclass
class Run:
    actors: list
    calls: dict                       # key -> calls sent
    crashes: int
    failures: int
    stale_renewals: int               # renewals that succeeded for a token that was not the claim's
    max_wait_s: float
    failed_tokens: set = field(default_factory=set)


async def play(store, clock, events, *, claim_s: float, keys=("k1", "k2"), actors=4, max_wait_s=5.0,
               settle_steps=400) -> Run:
    """Run ``events`` (tuples: ``("step", i)``, ``("ok", i)``, ``("fail", i)``, ``("crash", i)``,
    ``("time", seconds)``), then step every live actor (ending calls well) until all are over.
    ``clock`` has ``now()`` and ``async advance(seconds)`` (virtual, or a real sleep); ``claim_s``: the
    store's claim life (live owners renew every third of it, as workers/coalesce.py does)."""
    people = [Actor(i, keys[i % len(keys)]) for i in range(actors)]
    run = Run(people, {k: 0 for k in keys}, 0, 0, 0, max_wait_s)

    async def step(a: Actor, outcome: str = "ok") -> None:
        now = clock.now()
        if a.state == "start":
            a.began = now
            seen = await store.look(a.key)
            if seen.kind == "answer":
                a.state, a.how, a.answer, a.ended = "done", "cache", seen.value, now
            elif seen.kind == "owner":
                a.state, a.token, a.held_since = "calling", str(seen.value), now
                a.calls += 1
                run.calls[a.key] += 1
            else:
                a.state, a.waiting = "waiting", Waiting(str(seen.value), now, max_wait_s)
                a.waited_for.append(str(seen.value))
        elif a.state == "waiting":
            seen = await store.look(a.key, a.waiting.holder)
            before = a.waiting.holder
            decision = a.waiting.after(seen, now)
            if a.waiting.holder != before:
                a.waited_for.append(a.waiting.holder)
            # a wait is bounded: past its bound a waiter never decides to wait on; and its owner's
            # failure sends it to call by itself at once (never to wait for a next owner: a chain)
            assert decision != "wait" or now - a.began < max_wait_s
            assert seen.kind != "failed" or decision == "alone"
            if decision == "answer":
                a.state, a.how, a.answer, a.ended = "done", "coalesce", seen.value, now
            elif decision == "own":
                a.state, a.token, a.held_since = "calling", str(seen.value), now
                a.calls += 1
                run.calls[a.key] += 1
            elif decision == "alone":
                a.state = "alone"
                a.alone = ("failed" if seen.kind == "failed" else
                           "handovers" if a.waiting.handovers > MAX_HANDOVERS else "time")
                if a.alone == "time":
                    assert now - a.began >= max_wait_s, "went alone before its wait was over"
                a.calls += 1
                run.calls[a.key] += 1
        elif a.state == "calling":
            if not a.lost and await store.holder(a.key) != a.token:
                # its claim ran out before this step (on a real clock, a stalled process): only ever
                # once a whole claim's life went by since it last took or renewed it, never stolen
                a.lost = True
                assert clock.now() - a.held_since >= claim_s - 1e-9, "a live claim was taken from its owner"
            if outcome == "renew":
                asked = clock.now()
                ours = await store.renew(a.key, a.token)
                if ours:
                    a.held_since = asked
                if ours and await store.holder(a.key) != a.token:
                    run.stale_renewals += 1
                return
            if outcome == "ok":
                await store.answered(a.key, a.token, answer_of(a.key))
                a.state, a.how, a.answer, a.ended = "done", "called", answer_of(a.key), now
            else:
                run.failures += 1
                run.failed_tokens.add(a.token)
                await store.failed(a.key, a.token)
                a.state, a.how, a.ended = "done", "failed", now
        elif a.state == "alone":
            if outcome == "ok":
                a.state, a.how, a.answer, a.ended = "done", "called", answer_of(a.key), now
            else:
                run.failures += 1
                a.state, a.how, a.ended = "done", "failed", now

    async def advance(seconds: float) -> None:
        """Time goes by; every live owner's keeper renews its claim every third of its life."""
        while seconds > 0:
            chunk = min(seconds, claim_s / 3)
            await clock.advance(chunk)
            seconds -= chunk
            for a in people:
                if a.state == "calling":
                    await step(a, "renew")

    for ev in events:
        kind, arg = ev
        if kind == "time":
            await advance(arg)
            continue
        a = people[arg % actors]
        if a.state in ("done", "dead"):
            continue
        if kind == "crash":
            a.state, a.ended = "dead", clock.now()   # no more steps: a claim it held expires unrenewed
            run.crashes += 1
        elif kind == "step":
            await step(a, "renew")
        else:
            await step(a, kind)
    # the end: every live actor runs on, and every call ends well
    for _ in range(settle_steps):
        live = [a for a in people if a.state not in ("done", "dead")]
        if not live:
            break
        for a in live:
            await step(a, "ok")
        if any(a.state == "waiting" for a in people):
            await advance(min(a.waiting.delay(clock.now()) for a in people if a.state == "waiting") or 0.01)
    return run


def check(run: Run, claim_s: float) -> None:
    """The invariants of every interleaving."""
    for a in run.actors:
        # no waiter is left behind: every live request ended, with an answer or a call of its own
        assert a.state in ("done", "dead"), f"actor {a.name} left {a.state}"
        # and the answer it took is its own key's (never another request's)
        if a.how in ("cache", "coalesce", "called"):
            assert a.answer == answer_of(a.key), (a.name, a.answer)
        # one call per request at most, and waiting for a bounded number of owners
        assert a.calls <= 1
        assert len(a.waited_for) <= MAX_HANDOVERS + 1
        # a failed owner makes its waiters call by themselves: never a chain of owners
        if a.alone == "failed":
            assert a.waited_for[-1] in run.failed_tokens
    assert run.stale_renewals == 0   # a stale owner never renews another owner's claim
    for key, n in run.calls.items():
        sharing = [a for a in run.actors if a.key == key]
        owners = [a for a in sharing if a.token is not None]
        gone = [a for a in owners if a.state == "dead" or a.how == "failed" or a.lost]
        alone = [a for a in sharing if a.alone is not None]
        assert n == len(owners) + len(alone)
        # a new owner only when the one before died or failed
        assert len(owners) <= 1 + len(gone), (key, [(a.name, a.state, a.how) for a in sharing])
        # sent once when nobody died, failed or waited past its bound
        if not gone and not alone:
            assert n == (1 if any(a.state == "done" for a in sharing) else n) and n <= 1, (key, n)
