"""Script calls that share round trips (pipeline/money/roundtrips.py): each caller gets its own
reply or error, whatever the calls beside it do, and calls made while one is out go together."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from hypothesis import given, settings, strategies as st
from redis.exceptions import NoScriptError, ResponseError

from pipeline.money.roundtrips import CoalescedRedis


class FakeRedis:
    """Answers a script with its arguments; ``"refuse"`` is refused (a reply error), ``"drop"``
    loses the connection of its whole round trip. Knows a script by its SHA1 once it was sent
    as text (``known``: those it knows from the start). Records each round trip's calls."""

    def __init__(self, known=("s", "refuse", "drop")):
        self.scripts = {hashlib.sha1(s.encode()).hexdigest(): s for s in known}
        self.trips: list[list[tuple]] = []

    def _answer(self, name, args):
        if name == "evalsha":
            if args[0] not in self.scripts:
                return NoScriptError("NOSCRIPT No matching script.")
            args = (self.scripts[args[0]],) + args[1:]
        else:
            self.scripts[hashlib.sha1(args[0].encode()).hexdigest()] = args[0]
        if args[0] == "refuse":
            return ResponseError(f"refused {args[2:]}")
        return ("ok",) + args[2:]

    async def _trip(self, calls):
        self.trips.append([args for _, args in calls])
        await asyncio.sleep(0.001)
        if any(self.scripts.get(args[0], args[0]) == "drop" for _, args in calls):
            raise ConnectionError("connection lost")
        return [self._answer(name, args) for name, args in calls]

    async def _one(self, name, args):
        (reply,) = await self._trip([(name, args)])
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def eval(self, *args):
        return await self._one("eval", args)

    async def evalsha(self, *args):
        return await self._one("evalsha", args)

    def pipeline(self, transaction=True):
        assert transaction is False, "a pipeline, never a transaction"
        return _Pipe(self)

    async def get(self, key):
        return b"passed through"


class _Pipe:
    def __init__(self, redis):
        self.redis, self.calls = redis, []

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    def eval(self, *args):
        self.calls.append(("eval", args))

    def evalsha(self, *args):
        self.calls.append(("evalsha", args))

    async def execute(self, raise_on_error=True):
        assert raise_on_error is False
        return await self.redis._trip(self.calls)


def _call(client, script, i):
    return client.eval(script, 0, i)


def test_calls_asked_together_or_while_one_is_out_share_a_round_trip():
    fake = FakeRedis()

    async def main():
        client = CoalescedRedis(fake)
        together = await asyncio.gather(*(_call(client, "s", i) for i in range(10)))
        first = asyncio.ensure_future(_call(client, "s", 10))
        for _ in range(3):
            await asyncio.sleep(0)   # the first is out, alone
        meanwhile = await asyncio.gather(*(_call(client, "s", i) for i in range(11, 50)))
        return together + [await first] + meanwhile
    replies = asyncio.run(main())
    assert replies == [("ok", i) for i in range(50)]
    assert [len(t) for t in fake.trips] == [10, 1, 39]


def test_a_refusal_reaches_its_caller_alone_and_a_lost_connection_every_caller_of_its_trip():
    fake = FakeRedis()

    async def main():
        client = CoalescedRedis(fake)
        first = await asyncio.gather(*(_call(client, "refuse" if i == 3 else "s", i) for i in range(6)),
                                     return_exceptions=True)
        second = await asyncio.gather(*(_call(client, "drop" if i == 4 else "s", i) for i in range(6)),
                                      return_exceptions=True)
        third = await _call(client, "s", 99)
        return first, second, third
    first, second, third = asyncio.run(main())
    assert isinstance(first[3], ResponseError)
    assert [r for i, r in enumerate(first) if i != 3] == [("ok", i) for i in range(6) if i != 3]
    assert all(isinstance(r, ConnectionError) for r in second)   # one trip, lost
    assert [len(t) for t in fake.trips] == [6, 6, 1]
    assert third == ("ok", 99)   # the client goes on


def test_a_caller_cancelled_before_its_call_was_sent_is_not_sent():
    fake = FakeRedis()

    async def main():
        client = CoalescedRedis(fake)
        first = asyncio.ensure_future(_call(client, "s", 0))
        await asyncio.sleep(0)   # the first is out
        queued = [asyncio.ensure_future(_call(client, "s", i)) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        queued[1].cancel()
        return await first, await asyncio.gather(*queued, return_exceptions=True)
    first, rest = asyncio.run(main())
    assert first == ("ok", 0)
    assert rest[0] == ("ok", 1) and rest[2] == ("ok", 3)
    assert isinstance(rest[1], asyncio.CancelledError)
    assert [c[2] for t in fake.trips for c in t] == [0, 1, 3]


def test_other_commands_are_the_clients_own():
    assert asyncio.run(CoalescedRedis(FakeRedis()).get("k")) == b"passed through"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["s", "s", "s", "refuse"]), st.integers(0, 3)), min_size=1, max_size=40))
def test_every_caller_gets_what_its_call_alone_would_have_got(calls):
    """Any mix of calls, asked at any moments: each reply is the caller's own, each call is
    sent once, and in the order asked."""
    fake = FakeRedis()
    asked = []

    async def ask(client, i, script, delay):
        for _ in range(delay):
            await asyncio.sleep(0)
        asked.append(i)
        return await _call(client, script, i)

    async def main():
        client = CoalescedRedis(fake)
        return await asyncio.gather(*(ask(client, i, s, d) for i, (s, d) in enumerate(calls)),
                                    return_exceptions=True)
    replies = asyncio.run(main())
    for i, ((script, _), reply) in enumerate(zip(calls, replies)):
        if script == "refuse":
            assert isinstance(reply, ResponseError) and str(reply) == f"refused {(i,)}"
        else:
            assert reply == ("ok", i)
    assert [c[2] for t in fake.trips for c in t] == asked   # each once, in the order asked


@pytest.mark.parametrize("n", [1, 2])
def test_a_lone_call_goes_without_a_pipeline(n):
    fake = FakeRedis()

    async def main():
        client = CoalescedRedis(fake)
        for i in range(n):
            await _call(client, "s", i)
    asyncio.run(main())
    assert [len(t) for t in fake.trips] == [1] * n


def test_a_script_redis_does_not_know_is_sent_as_text_once_and_then_by_its_sha():
    """After a restart (or SCRIPT FLUSH) Redis knows no script: those calls did not run, and go
    again as text; from then on a call is the script's SHA1 only."""
    fake = FakeRedis(known=())

    async def main():
        client = CoalescedRedis(fake)
        first = await asyncio.gather(*(_call(client, "s", i) for i in range(5)))
        return first, await _call(client, "s", 5)
    first, later = asyncio.run(main())
    assert first == [("ok", i) for i in range(5)] and later == ("ok", 5)
    sha = hashlib.sha1(b"s").hexdigest()
    assert [[c[0] for c in t] for t in fake.trips] == [[sha] * 5, ["s"] * 5, [sha]]
