"""Shared round trips (pipeline/money/roundtrips.py) against the real Redis: the budget's client
sends calls asked together as one pipeline, each script runs once and alone, a script's refusal
is its caller's only, and a Redis that is away reaches every caller as an error."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

from redis.exceptions import ResponseError

from pipeline.money import scripts
from tests.integration.execution_helpers import budget_settings

COUNT = "return redis.call('INCR', KEYS[1])"
REFUSE = "return redis.error_reply('refused ' .. ARGV[1])"


def test_calls_asked_together_run_once_each_in_one_round_trip(stack):
    aredis, sredis = scripts.redis_clients(budget_settings(stack))
    key = f"roundtrips:{uuid.uuid4().hex}"
    client, trips = aredis._client, []
    pipeline = client.pipeline

    def counted(*a, **kw):
        trips.append(kw)
        return pipeline(*a, **kw)
    client.pipeline = counted

    async def together(n):
        calls = [aredis.eval(REFUSE if i == 7 else COUNT, 1, key, i) for i in range(n)]
        return await asyncio.gather(*calls, return_exceptions=True)

    async def main():
        first = await together(100)   # Redis may not know the scripts yet: their text goes once
        trips.clear()
        second = await together(100)
        made = list(trips)
        sredis.script_flush()         # as after a restart: the text goes again, nothing runs twice
        return first, second, made, await together(10)
    try:
        first, second, made, third = asyncio.run(main())
        for replies in (first, second, third):
            assert isinstance(replies[7], ResponseError) and "refused 7" in str(replies[7])
        counted_ = sorted(r for replies in (first, second, third) for i, r in enumerate(replies) if i != 7)
        assert counted_ == list(range(1, 99 + 99 + 9 + 1))   # each call ran once
        assert int(sredis.get(key)) == 207
        assert made == [{"transaction": False}]   # one round trip, and no transaction
    finally:
        sredis.delete(key)


def test_a_redis_that_is_away_reaches_every_caller_as_an_error(stack):
    away = dataclasses.replace(budget_settings(stack), redis_url="redis://127.0.0.1:1/15")
    aredis, _ = scripts.redis_clients(away)

    async def main():
        return await asyncio.gather(*(aredis.eval(COUNT, 1, "k") for _ in range(5)), return_exceptions=True)
    replies = asyncio.run(main())
    assert all(isinstance(r, ConnectionError) or "Connection" in type(r).__name__ for r in replies), replies
