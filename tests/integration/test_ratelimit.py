"""pipeline/providers/ratelimit.py against the stack's Redis: shared windows, tier shares, 429 back-off,
and the in-flight semaphore, with several asyncio "workers" each holding its own client."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time

from pipeline.config import get_settings
from pipeline.providers import ratelimit


def _settings(**kw):
    return dataclasses.replace(get_settings(), **kw)


def _client():
    import redis.asyncio as aredis
    return aredis.Redis.from_url(get_settings().redis_url, socket_timeout=5)


async def _cleanup(keys):
    r = _client()
    try:
        for key in keys:
            await r.delete(key)
    finally:
        await r.aclose()


def test_shared_rpm_window_admits_at_most_the_limit(stack):
    model = f"test-rl-{secrets.token_hex(4)}"
    settings = _settings(rate_limits={model: "60:"})

    async def main():
        admitted = []

        async def worker():
            r = _client()
            lim = ratelimit.Limiter(settings, r)
            try:
                for _ in range(30):
                    await lim.admit("openai", model, "offpeak", 10)
                    admitted.append(time.monotonic())
            finally:
                await r.aclose()

        tasks = [asyncio.create_task(worker()) for _ in range(3)]
        await asyncio.wait(tasks, timeout=4)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert len(admitted) == 60, len(admitted)
        # the 61st is told to wait for the first admission to leave the 60 s window
        r = _client()
        try:
            ok, wait_ms = await r.eval(ratelimit.ADMIT, 5, *ratelimit.rate_keys("openai", model), "probe", 10,
                                       60, -1, "immediate", "0.7", ratelimit.WINDOW_MS, ratelimit.WAITING_TTL_MS)
        finally:
            await r.aclose()
        assert ok == 0 and 50_000 < wait_ms <= 60_000, wait_ms
        await _cleanup(ratelimit.rate_keys("openai", model))

    asyncio.run(main())


def test_admit_gives_up_at_once_when_the_window_is_further_off_than_max_wait(stack):
    """What sends a job's request to its fallback model (workers/fallback.py)."""
    model = f"test-rl-{secrets.token_hex(4)}"
    settings = _settings(rate_limits={model: "2:"})

    async def main():
        r = _client()
        lim = ratelimit.Limiter(settings, r)
        try:
            assert await lim.admit("openai", model, "peak", 1, max_wait_s=2.0) is not None
            assert await lim.admit("openai", model, "immediate", 1, max_wait_s=2.0) is not None
            started = time.monotonic()
            assert await lim.admit("openai", model, "immediate", 1, max_wait_s=2.0) is None
            assert time.monotonic() - started < 0.5      # told the window is ~60 s off: no sleep
        finally:
            await r.aclose()
            await _cleanup(ratelimit.rate_keys("openai", model))

    asyncio.run(main())


def test_sliding_window_paces_requests_and_tokens(stack, monkeypatch):
    monkeypatch.setattr(ratelimit, "WINDOW_MS", 2000)   # a 2 s window keeps the test short
    model = f"test-rl-{secrets.token_hex(4)}"
    settings = _settings(rate_limits={model: "10:1000"})

    async def main():
        admitted = []   # (time, tokens)

        async def worker(tokens):
            r = _client()
            lim = ratelimit.Limiter(settings, r)
            try:
                for _ in range(8):
                    await lim.admit("openai", model, "offpeak", tokens)
                    admitted.append((time.monotonic(), tokens))
            finally:
                await r.aclose()

        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.gather(worker(50), worker(50), worker(200)), 15)
        elapsed = time.monotonic() - t0
        admitted.sort()
        for i, (t, _) in enumerate(admitted):
            inside = [(u, n) for u, n in admitted[i:] if u < t + 1.95]
            assert len(inside) <= 10
            assert sum(n for _, n in inside) <= 1000
        # 24 calls, 2400 tokens: the token limit (1000 per 2 s) binds: at least ~2 more windows
        assert 3.5 < elapsed < 12, elapsed
        await _cleanup(ratelimit.rate_keys("openai", model))

    asyncio.run(main())


def test_tier_shares_and_background(stack):
    model = f"test-rl-{secrets.token_hex(4)}"
    settings = _settings(rate_limits={model: "10:"}, rate_peak_share=0.7)
    keys = ratelimit.rate_keys("openai", model)

    async def main():
        r = _client()
        try:
            async def admit(tier):
                ok, wait_ms = await r.eval(ratelimit.ADMIT, 5, *keys, secrets.token_hex(4), 1, 10, -1, tier,
                                           "0.7", ratelimit.WINDOW_MS, ratelimit.WAITING_TTL_MS)
                return ok == 1
            assert [await admit("peak") for _ in range(8)] == [True] * 7 + [False]   # peak: its share
            assert await admit("offpeak")                 # offpeak: the whole limit ...
            await r.set(keys[3], "1", px=5000)           # ... until an immediate request waits
            assert not await admit("offpeak")
            assert not await admit("background")          # nothing for background while others wait
            assert await admit("immediate") and await admit("immediate")
            assert not await admit("immediate")           # the whole limit, no more
            await r.delete(keys[3], keys[4])
            await r.delete(keys[0], keys[1])
            await r.set(keys[4], "1", px=5000)           # peak waiting: background still waits
            assert not await admit("background")
            await r.delete(keys[4])
            assert await admit("background")
            lim = ratelimit.Limiter(settings, r)
            await lim.block("openai", model, 1.0)         # a 429: every worker waits
            t0 = time.monotonic()
            await lim.admit("openai", model, "immediate", 1)
            assert 0.8 < time.monotonic() - t0 < 2.5
        finally:
            await r.aclose()
        await _cleanup(keys)

    asyncio.run(main())


def test_inflight_semaphore_holds_its_cap_and_frees_dead_leases(stack):
    tier = f"test-{secrets.token_hex(4)}"
    settings = _settings(inflight_per_tier={tier: 5})

    async def main():
        state = {"now": 0, "max": 0}
        clients = [_client() for _ in range(3)]
        limiters = [ratelimit.Limiter(settings, c, lease_ttl_s=10) for c in clients]

        async def acquirer(i):
            async with limiters[i % 3].lease(tier):
                state["now"] += 1
                state["max"] = max(state["max"], state["now"])
                await asyncio.sleep(0.02)
                state["now"] -= 1

        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(acquirer(i) for i in range(50))), 15)
        assert state["max"] == 5, state
        assert time.monotonic() - t0 >= 50 / 5 * 0.02
        assert await clients[0].zcard(ratelimit.lease_key(tier)) == 0

        # two holders die without releasing (leases of 1 s): the slots come back after expiry
        small = _settings(inflight_per_tier={tier: 2})
        for lid in ("dead-1", "dead-2"):
            assert await clients[0].eval(ratelimit.ACQUIRE, 1, ratelimit.lease_key(tier), lid, 2, 1000) == 1
        t0 = time.monotonic()
        async with ratelimit.Limiter(small, clients[1]).lease(tier) as waited:
            assert 0.7 < waited < 3, waited
        assert 0.7 < time.monotonic() - t0 < 3
        for c in clients:
            await c.aclose()
        await _cleanup([ratelimit.lease_key(tier)])

    asyncio.run(main())


def test_keys_headroom_and_revocation_in_redis(stack):
    """pipeline/providers/keys.py on the stack's Redis: the HEADROOM script reads each key's window,
    calls split by headroom, a revoked key is out for another process's chooser too."""
    from pipeline.providers.keys import Keys, NoUsableKey, dead_key
    from pipeline.providers.registry import KeySpec

    provider, model = f"test-keys-{secrets.token_hex(4)}", "m"
    a, b = KeySpec("a", rpm=300), KeySpec("b", rpm=150, tpm=15_000)
    settings = _settings(rate_limits={})

    async def main():
        r1, r2 = _client(), _client()
        one, other = Keys(ratelimit.Limiter(settings, r1)), Keys(ratelimit.Limiter(settings, r2))
        try:
            for _ in range(30):
                await one.limiter.admit(provider, model, "offpeak", 100, key="a", limit=ratelimit.Limit(300, None))
            room = await one.limiter.headroom(provider, model, [("a", ratelimit.Limit(300, None)),
                                                                ("b", ratelimit.Limit(150, 15_000)), ("c", None)])
            assert room == [0.9, 1.0, 1.0], room
            chosen = [(await one.admit(provider, (a, b), model, "offpeak", 100)).alias for _ in range(60)]
            # a: 30 + x of 300, b: y of 150 and y*100 of 15,000 tokens; by headroom, x ≈ 2y - 30
            assert abs(chosen.count("a") - 30) <= 3 and abs(chosen.count("b") - 30) <= 3, chosen
            room = await one.limiter.headroom(provider, model, [("a", ratelimit.Limit(300, None)),
                                                                ("b", ratelimit.Limit(150, 15_000))])
            assert abs(room[0] - room[1]) < 0.02, room
            assert await one.revoke(provider, "a", "HTTP 401") and not await other.revoke(provider, "a", "HTTP 401")
            assert {(await other.admit(provider, (a, b), model, "offpeak", 1)).alias for _ in range(5)} == {"b"}
            await other.revoke(provider, "b", "HTTP 403")
            try:
                await one.admit(provider, (a, b), model, "offpeak", 1)
                raise AssertionError("admitted with every key revoked")
            except NoUsableKey:
                pass
        finally:
            await _cleanup([k for alias in ("a", "b") for k in ratelimit.rate_keys(provider, model, alias)]
                           + [dead_key(provider, "a"), dead_key(provider, "b")])
            await r1.aclose()
            await r2.aclose()

    asyncio.run(main())


def test_a_call_is_counted_in_its_window_from_when_it_is_sent(stack):
    """A call waits for its record in Postgres between its admission and its send (workers/gate.py);
    the window must count it from the send, or the provider sees the next minute's calls early."""
    from decimal import Decimal

    from pipeline.providers.registry import KeySpec, ProviderSpec
    from tests.unit.test_fallback import OK, FakeBudget, request
    from workers.limited import Limited

    provider, model = f"test-stamp-{secrets.token_hex(4)}", "gpt-4o"
    settings = _settings(rate_limits={})

    class SlowRecord:   # the record's write takes a second
        async def sending(self, req, res, call_id):
            await asyncio.sleep(1.0)

        def answered(self, call_id):
            pass

    class P:
        name = provider
        spec = ProviderSpec(provider, "openai", "http://x/v1", (KeySpec("k", rpm=100),))

        async def call(self, body, *, headers, key=None):
            return OK

    async def main():
        r = _client()
        try:
            lim = Limited(P(), request(fallback_model=None, provider=provider), FakeBudget(Decimal(1)),
                          ratelimit.Limiter(settings, r), calls=SlowRecord())
            t0 = (await r.time())
            await lim.call(request().body, headers={})
            window = await r.zrange(ratelimit.rate_keys(provider, model, "k")[0], 0, -1, withscores=True)
            assert len(window) == 1
            counted_from = window[0][1] / 1000 - (t0[0] + t0[1] / 1e6)
            assert 0.9 <= counted_from <= 1.5, f"counted {counted_from:.2f} s after the admission began"
        finally:
            await _cleanup(ratelimit.rate_keys(provider, model, "k"))
            await r.aclose()

    asyncio.run(main())


def test_a_slow_call_is_counted_again_from_its_answer(stack):
    """The provider counts a call when it arrives, anywhere between our stamp and its answer: a
    starved worker's send reached the simulator seconds after its stamp (101 calls in 60 s against
    a share of 84). A call slower than the window's guard is counted from its answer; a fast one,
    or one that failed fast, keeps its stamp."""
    from decimal import Decimal

    from pipeline.errors import RetryableProviderError
    from pipeline.providers.registry import KeySpec, ProviderSpec
    from tests.unit.test_fallback import OK, FakeBudget, request
    from workers.limited import Limited

    model = "gpt-4o"
    settings = _settings(rate_limits={})

    def provider_taking(seconds: float, fail: bool = False):
        name = f"test-restamp-{secrets.token_hex(4)}"

        class P:
            spec = ProviderSpec(name, "openai", "http://x/v1", (KeySpec("k", rpm=100),))

            async def call(self, body, *, headers, key=None):
                await asyncio.sleep(seconds)
                if fail:
                    raise RetryableProviderError("upstream timed out", 504, None)
                return OK
        P.name = name
        return P()

    async def counted_from(r, p, fail: bool) -> float:
        lim = Limited(p, request(fallback_model=None, provider=p.name), FakeBudget(Decimal(1)),
                      ratelimit.Limiter(settings, r))
        t0 = await r.time()
        try:
            await lim.call(request().body, headers={})
        except RetryableProviderError:
            assert fail
        window = await r.zrange(ratelimit.rate_keys(p.name, model, "k")[0], 0, -1, withscores=True)
        assert len(window) == 1
        return window[0][1] / 1000 - (t0[0] + t0[1] / 1e6)

    async def main():
        r = _client()
        providers = [provider_taking(1.5), provider_taking(1.5, fail=True), provider_taking(0.0)]
        try:
            slow, slow_failed, fast = [await counted_from(r, p, fail) for p, fail in zip(providers, (0, 1, 0))]
            assert 1.4 <= slow <= 2.5, f"a 1.5 s call counted from {slow:.2f} s"
            assert 1.4 <= slow_failed <= 2.5, f"a 1.5 s failed call counted from {slow_failed:.2f} s"
            assert fast <= 0.4, f"a fast call counted from {fast:.2f} s"
        finally:
            await _cleanup([k for p in providers for k in ratelimit.rate_keys(p.name, model, "k")])
            await r.aclose()

    asyncio.run(main())


def test_a_call_whose_entry_left_the_window_is_counted_again_when_it_is_sent(stack):
    """An admitted call can wait past the window for its record (a starved worker, a slow
    Postgres): its entry has expired by then, and the provider still counts the call, so the
    stamp at its send puts it back, tokens and all."""
    provider, model = f"test-restore-{secrets.token_hex(4)}", "gpt-4o"
    settings = _settings(rate_limits={})
    limit = ratelimit.Limit(rpm=10, tpm=1000)

    async def main():
        r = _client()
        lim = ratelimit.Limiter(settings, r)
        window, tokens = ratelimit.rate_keys(provider, model, "k")[:2]
        try:
            assert await lim.try_admit(provider, model, "offpeak", 70, "late", key="k", limit=limit) == 0.0
            await r.delete(window, tokens)   # the window moved on while the call waited for its record
            await lim.stamp(provider, model, 70, "late", key="k", limit=limit)
            assert [m for m, _ in await r.zrange(window, 0, -1, withscores=True)] == [b"late|70"]
            assert int(await r.get(tokens)) == 70
            await lim.stamp(provider, model, 70, "late", key="k", limit=limit)   # a second stamp moves it
            assert await r.zcard(window) == 1 and int(await r.get(tokens)) == 70
        finally:
            await _cleanup([window, tokens])
            await r.aclose()

    asyncio.run(main())
