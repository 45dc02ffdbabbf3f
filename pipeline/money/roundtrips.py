"""Script calls that share round trips to Redis.

A worker runs dozens of requests at once, and each asks Redis for its hold, its rate-limit
slot and its settle: one script call each, and each a round trip with its own connection
checkout, write and read (about 30 % of a bulk worker's profile was redis-py around those
calls). ``CoalescedRedis`` sends the calls asked at the same moment, or while a round
trip is out, together in the next one, as a pipeline (not a transaction: each script runs as it
would alone, in the order asked). A call asked while nothing is out goes at once: nobody waits
for company.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib

from redis.exceptions import NoScriptError, ResponseError


class CoalescedRedis:
    """An asyncio Redis client whose ``eval`` calls share round trips; everything else is the
    client's own. Each caller gets its own reply, or its own error: a script's refusal reaches
    only its caller, a lost connection every caller of that round trip (as it would have reached
    each alone). A caller cancelled before its call was sent is not sent."""

    def __init__(self, client):
        self._client = client
        self._queue: list[tuple[tuple, asyncio.Future]] = []
        self._sender: asyncio.Task | None = None

    def __getattr__(self, name):
        return getattr(self._client, name)

    async def eval(self, *args):
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((args, fut))
        if self._sender is None or self._sender.done():
            # ends when the queue is empty; a caller waits on its own future meanwhile
            self._sender = asyncio.get_running_loop().create_task(self._send_all())
        return await fut

    async def _send_all(self) -> None:
        while self._queue:
            trip = [(args, fut) for args, fut in self._queue if not fut.done()]
            self._queue = []
            if not trip:
                continue
            try:
                replies = await self._send(trip)
            except Exception as e:   # the connection is gone: each caller of the trip hears it
                for _, fut in trip:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            except BaseException:   # this task is cancelled (its loop ends): so are its callers
                for _, fut in trip + self._queue:
                    fut.cancel()
                self._queue = []
                raise
            for (_, fut), reply in zip(trip, replies):
                if fut.done():
                    continue
                if isinstance(reply, Exception):   # a script's refusal: its caller's alone
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)

    async def _send(self, trip: list) -> list:
        """Each script by its SHA1 (a 2.4 KB script is 40 bytes on the wire, and Redis need not
        hash and parse it again); those Redis does not know (a restart, ``SCRIPT FLUSH``) did not
        run, and go again as text, which Redis then keeps."""
        calls = [args for args, _ in trip]
        replies = await self._pipelined([("evalsha", _sha1(a[0]), *a[1:]) for a in calls])
        unknown = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if unknown:
            for i, reply in zip(unknown, await self._pipelined([("eval", *calls[i]) for i in unknown])):
                replies[i] = reply
        return replies

    async def _pipelined(self, commands: list[tuple]) -> list:
        """One round trip: a reply per command, a refusal (``ResponseError``) as its reply."""
        if len(commands) == 1:   # alone: a plain call
            name, *args = commands[0]
            try:
                return [await getattr(self._client, name)(*args)]
            except ResponseError as e:
                return [e]
        async with self._client.pipeline(transaction=False) as pipe:
            for name, *args in commands:
                getattr(pipe, name)(*args)
            return await pipe.execute(raise_on_error=False)


@functools.lru_cache(maxsize=256)
def _sha1(script: str | bytes) -> str:
    return hashlib.sha1(script if isinstance(script, bytes) else script.encode()).hexdigest()
