"""Loops that await Redis stop when their owner cancels them, even when the Redis call
swallowed the cancellation.

redis-py sends every command of a client with a ``socket_timeout`` through
``asyncio.wait_for``. On Python 3.11, ``wait_for`` returns the inner result
when the cancellation arrives as the inner call completes, and the
cancellation is gone. CI run 92 hung for 600 s in
``test_a_hold_lives_as_long_as_its_call_even_past_the_ttl``: ``asyncio.run``
cancelled the budget's heartbeat at the end, the heartbeat was inside a Redis
call, and it went on beating for ever. A tier lease's renewer, cancelled the
same way when its call is over, would hold one of the tier's slots for the
worker's whole life.

``SwallowingRedis`` answers through ``wait_for`` exactly that way: the owner
cancels the loop while the command is being sent.
"""

from __future__ import annotations

import asyncio

from pipeline.config import Settings
from pipeline.money import budget
from pipeline.providers import ratelimit


class SwallowingRedis:
    """Every command cancels ``owner`` as it completes, inside ``asyncio.wait_for``."""

    def __init__(self, answer):
        self.answer, self.owner, self.calls = answer, None, 0

    async def _command(self):
        async def send():
            self.calls += 1
            self.owner.cancel()          # the owner is done with the loop: it cancels it now
            return self.answer
        return await asyncio.wait_for(send(), 5)

    async def eval(self, *_):
        return await self._command()

    async def get(self, *_):
        return await self._command()


def _stops(loop_of, redis: SwallowingRedis, beats: float) -> tuple[bool, int]:
    async def run():
        task = redis.owner = asyncio.create_task(loop_of(redis))
        for _ in range(50):
            if task.done():
                break
            await asyncio.sleep(beats)
        stopped = task.done()
        task.cancel()                    # so the test itself ends, with or without the fix
        await asyncio.gather(task, return_exceptions=True)
        return stopped, redis.calls
    return asyncio.run(run())


def test_the_swallowing_redis_really_swallows_the_cancellation():
    """The stand-in is faithful: a bare await of it completes although its caller was cancelled."""
    async def once(redis):
        await redis.get("k")
        return "went on"

    async def run():
        redis = SwallowingRedis(b"x")
        task = redis.owner = asyncio.create_task(once(redis))
        return await task
    assert asyncio.run(run()) == "went on"


def test_the_budget_heartbeat_stops_when_cancelled_inside_a_redis_call():
    settings = Settings(budget_reservation_ttl_s=0.2, provider_timeout_s=0.1, budget_reservation_margin_s=0)

    def heartbeat(redis):
        b = budget.Budget(settings, None, redis, None)
        b._beat_redis = redis
        return b._heartbeat()
    stopped, calls = _stops(heartbeat, SwallowingRedis(None), 0.06)
    assert stopped, f"the heartbeat went on after it was cancelled: {calls} Redis calls"
    assert calls == 1


def test_a_tier_lease_renewer_stops_when_cancelled_inside_a_redis_call():
    def renewer(redis):
        return ratelimit.Limiter(Settings(), redis)._renew("lease:peak", "l1", 150)
    stopped, calls = _stops(renewer, SwallowingRedis(1), 0.06)
    assert stopped, f"the lease renewer went on after it was cancelled: {calls} renewals"
    assert calls == 1


def test_a_request_waiting_for_a_tier_slot_stops_when_cancelled_inside_a_redis_call():
    """It would otherwise wait on, take the slot and call the provider for a batch that is over."""
    async def waiting(redis):
        limiter = ratelimit.Limiter(Settings(inflight_per_tier={"peak": 1}), redis)
        async with limiter.lease("peak"):
            raise AssertionError("a cancelled request took a tier slot")
    stopped, calls = _stops(waiting, SwallowingRedis(0), 0.06)
    assert stopped, f"the cancelled request went on asking for a slot: {calls} asks"
    assert calls == 1
