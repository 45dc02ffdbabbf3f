"""Many keys per provider (pipeline/providers/keys.py, workers/limited.py): the key with the most
headroom takes the call, a refused key leaves the rotation once for everyone, and with none
left the request fails ``no_usable_key``. The windows here are a fake in Python; the Lua that
reads them from Redis is tested on the stack (tests/integration/test_keys.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from decimal import Decimal

import pytest

from pipeline import metrics
from pipeline.config import load_settings
from pipeline.errors import PermanentProviderError, RetryableProviderError
from pipeline.providers.keys import DEAD, Keys, NoUsableKey
from pipeline.providers.ratelimit import Limit
from pipeline.providers.registry import KeySpec, ProviderSpec
from tests.unit.test_fallback import OK, FakeBudget, request
from workers.limited import Limited

A, B = KeySpec("key-a", rpm=300), KeySpec("key-b", rpm=150)


class Windows:
    """A limiter of per-key request windows that never slide (one minute, frozen)."""

    settings = load_settings({})

    def __init__(self, used: dict | None = None, stolen: set | None = None):
        self.used = Counter(used or {})
        self.stolen = set(stolen or ())   # keys whose window another worker fills before we get there
        self.redis: dict[str, str] = {}
        self.slept: list[float] = []

    async def eval(self, script, keys, *args):
        if "MGET" in script:
            return [self.redis.get(k) for k in keys]
        if "'NX'" in script:
            if keys[0] in self.redis:
                return 0
            self.redis[keys[0]] = args[0]
            return 1
        if "DEL" in script:
            self.redis.pop(keys[0], None)
            return 1
        raise AssertionError(script)

    async def headroom(self, provider, model, limits):
        return [1.0 if lim is None else max(0.0, 1 - self.used[alias] / lim.rpm) for alias, lim in limits]

    async def try_admit(self, provider, model, tier, tokens, rid, *, key, limit):
        if key in self.stolen:
            self.used[key] = limit.rpm
            self.stolen.discard(key)
        if limit is None or self.used[key] < limit.rpm:
            self.used[key] += 1
            return 0.0
        return 5.0

    async def admit(self, provider, model, tier, tokens, max_wait_s=None, *, key, limit, rid=None):
        wait = await self.try_admit(provider, model, tier, tokens, "r", key=key, limit=limit)
        return None if wait and max_wait_s is not None else 0.0

    async def sleep(self, s):
        self.slept.append(s)
        raise TimeoutError("would wait")   # the tests that get here expect it

    async def block(self, *a, **k):
        pass

    async def stamp(self, *a, **k):
        pass

    async def observe_headers(self, *a, **k):
        pass

    @contextlib.asynccontextmanager
    async def lease(self, tier):
        yield 0.0


def admit(keys: Keys, specs=(A, B), n: int = 1, **kw) -> list[str]:
    async def go():
        return [(await keys.admit("together", specs, "llama", "peak", 10, **kw)).alias for _ in range(n)]
    return asyncio.run(go())


def test_calls_split_by_headroom_two_to_one_from_the_first_call():
    w = Windows()
    chosen = Counter(admit(Keys(w), n=90))
    # round robin would give 45 : 45; by headroom the 300 rpm key takes two calls in three
    assert chosen == {"key-a": 60, "key-b": 30} or abs(chosen["key-a"] - 60) <= 1, chosen
    full = Counter(admit(Keys(w), n=360))
    assert w.used == {"key-a": 300, "key-b": 150}   # both windows full, neither over
    assert full["key-a"] + chosen["key-a"] == 300


def test_the_key_with_the_most_headroom_takes_the_call():
    w = Windows(used={"key-a": 250})   # other workers used most of a's window: b has more room
    assert admit(Keys(w)) == ["key-b"]
    w = Windows(used={"key-b": 149})
    assert admit(Keys(w)) == ["key-a"]


def test_a_window_taken_meanwhile_sends_the_call_to_the_next_key():
    w = Windows(stolen={"key-a"})
    assert admit(Keys(w)) == ["key-b"]


def test_no_room_on_any_key_waits_or_gives_up_past_max_wait():
    w = Windows(used={"key-a": 300, "key-b": 150})
    assert asyncio.run(Keys(w).admit("together", (A, B), "llama", "peak", 10, max_wait_s=1.0)) is None
    with pytest.raises(TimeoutError):   # without a limit on the wait: it sleeps for the soonest window
        admit(Keys(w))
    assert w.slept == [pytest.approx(1.0, abs=0.02)]


def test_a_revoked_key_leaves_the_rotation_for_every_worker_once():
    w = Windows()
    one, other = Keys(w), Keys(w)   # two workers on one Redis
    assert asyncio.run(one.revoke("together", "key-a", "HTTP 401")) is True
    assert asyncio.run(other.revoke("together", "key-a", "HTTP 401")) is False   # the alert is raised once
    assert set(w.redis) == {DEAD + "together:key-a"} and w.redis[DEAD + "together:key-a"] == "HTTP 401"
    assert Counter(admit(Keys(w), n=20)) == {"key-b": 20}
    asyncio.run(one.revoke("together", "key-b", "HTTP 403"))
    with pytest.raises(NoUsableKey, match="every key of provider 'together'.*key-a, key-b") as e:
        admit(Keys(w))
    assert e.value.code == "no_usable_key" and isinstance(e.value, PermanentProviderError)
    asyncio.run(one.restore("together", "key-a"))
    assert admit(Keys(w)) == ["key-a"]


def test_one_key_without_a_limit_needs_no_window():
    w = Windows()
    assert admit(Keys(w), specs=(KeySpec("default"),), n=3) == ["default"] * 3
    assert not w.used or set(w.used) == {"default"}


# ------------------------------------------------------------------ the worker's side (Limited)

class Provider:
    """A provider of two keys; ``refused`` answers 401 (the key was revoked at the provider)."""

    def __init__(self, refused=()):
        self.spec = ProviderSpec("together", "openai", "http://sim/p/together/v1", (A, B))
        self.name, self.refused, self.calls = "together", set(refused), []

    async def call(self, body, *, headers, key=None):
        self.calls.append(key.alias)
        if key.alias in self.refused:
            raise PermanentProviderError("Incorrect API key provided: tk-****-xyz", 401, "req_1")
        return OK


def run(lim: Limited, attempts: int = 3):
    """Attempts as call_with_retries makes them: a retryable error goes on, a permanent one ends."""
    async def go():
        for _ in range(attempts):
            try:
                return await lim.call(request().body, headers={})
            except RetryableProviderError:
                continue
    return asyncio.run(go())


def test_a_401_takes_the_key_out_and_the_request_goes_on_on_the_other():
    w, p = Windows(used={"key-b": 100}), Provider(refused={"key-a"})   # a has more room: tried first
    before = metrics.REGISTRY.get_sample_value("llmbatch_key_revocations_total",
                                               {"provider": "together", "key": "key-a"}) or 0
    lim = Limited(p, request(fallback_model=None, provider="together"), FakeBudget(Decimal(1)), w)
    with pytest.raises(RetryableProviderError) as e:
        asyncio.run(lim.call(request().body, headers={}))
    assert e.value.status_code == 401 and e.value.retry_after == 0.0     # retried at once, elsewhere
    assert "tk-" not in str(e.value) and "key-a" in str(e.value)          # the provider's text may quote the key
    assert lim.key_alias == "key-a"                                       # the attempt's alias, for its row
    assert run(lim) is OK and p.calls == ["key-a", "key-b"] and lim.key_alias == "key-b"
    after = metrics.REGISTRY.get_sample_value("llmbatch_key_revocations_total",
                                              {"provider": "together", "key": "key-a"})
    assert after == before + 1


def test_with_every_key_refused_the_request_fails_no_usable_key():
    w, p = Windows(), Provider(refused={"key-a", "key-b"})
    budget = FakeBudget(Decimal(1))
    lim = Limited(p, request(fallback_model=None, provider="together"), budget, w)
    with pytest.raises(NoUsableKey):
        run(lim, attempts=5)
    assert sorted(p.calls) == ["key-a", "key-b"]        # each key was tried once, then none is left
    assert len(budget.released) == len(budget.reserved)  # no hold outlives the request


def test_a_429_blocks_only_the_keys_window():
    blocked = []

    class W(Windows):
        async def block(self, provider, model, seconds, *, key, limit):
            blocked.append((key, limit))

    class Busy(Provider):
        async def call(self, body, *, headers, key=None):
            self.calls.append(key.alias)
            raise RetryableProviderError("rate limited", 429, "r", retry_after=2.0)

    lim = Limited(Busy(), request(fallback_model=None, provider="together"), FakeBudget(Decimal(1)), W())
    with pytest.raises(RetryableProviderError):
        asyncio.run(lim.call(request().body, headers={}))
    assert blocked == [(lim.key_alias, Limit(300 if lim.key_alias == "key-a" else 150, None))]


# ------------------------------------------------------------------ each kind against the simulator

def test_every_kind_calls_the_simulator_on_the_key_it_is_given():
    """get_provider's clients, one per key, for kinds openai, azure-openai and anthropic, against an
    in-process simulator that knows the keys: each call is counted on its key's alias, and a
    revoked key is answered 401 (which Limited turns into a revocation)."""
    import json as json_

    from pipeline.providers.base import ProviderClient
    from pipeline.providers.registry import build_registry
    from simulator.providers import key_alias
    from tests.unit.test_simulator_providers import PROVIDERS, serve, stats

    async def body():
        async with serve() as (url, oa, http):
            env = {"TK1": "tk-one-SECRET", "TK2": "tk-two-SECRET", "AZ": "az-1-SECRET", "AK": "ak-1-SECRET",
                   "LLMBATCH_PROVIDER_HTTP_CLIENT": "httpx", "LLMBATCH_PROVIDERS": json_.dumps({
                       "together": {"kind": "openai", "base_url": f"{url}/p/together/v1",
                                    "keys": [{"alias": "one", "env": "TK1"}, {"alias": "two", "env": "TK2"}]},
                       "azure-east": {"kind": "azure-openai", "base_url": f"{url}/p/azure-east",
                                      "deployments": PROVIDERS["azure-east"]["deployments"],
                                      "keys": [{"alias": "az", "env": "AZ"}]},
                       "claude-eu": {"kind": "anthropic", "base_url": f"{url}/p/claude-eu",
                                     "keys": [{"alias": "ak", "env": "AK"}]}})}
            settings = load_settings(env)
            reg = build_registry(settings)
            msg = [{"role": "user", "content": "hi"}]
            tg = ProviderClient(reg.get("together"), settings)
            for k in (tg.spec.key("one"), tg.spec.key("two"), tg.spec.key("two")):
                a = await tg.call({"model": "llama-70b", "max_tokens": 5, "messages": msg}, headers={}, key=k)
                assert a.status_code == 200 and a.body["usage"]["prompt_tokens"] > 0
            az = ProviderClient(reg.get("azure-east"), settings)
            a = await az.call({"model": "gpt-4o-mini", "max_tokens": 5, "messages": msg}, headers={})
            assert a.status_code == 200
            an = ProviderClient(reg.get("claude-eu"), settings)
            a = await an.call({"model": "claude-haiku-4-5", "max_tokens": 5, "messages": msg}, headers={})
            assert a.body["usage"]["input_tokens"] > 0
            async with http.post(url + "/_admin/keys/revoke", json={"key": "tk-one-SECRET", "provider": "together"}):
                pass
            with pytest.raises(PermanentProviderError) as refused:
                await tg.call({"model": "llama-70b", "max_tokens": 5, "messages": msg}, headers={},
                              key=tg.spec.key("one"))
            assert refused.value.status_code == 401
            s = await stats(http, url)
            assert {a: k["successes"] for a, k in s["together"]["keys"].items()} == {key_alias("tk-one-SECRET"): 1,
                                                                                     "second": 2}
            assert s["azure-east"]["successes"] == 1 and s["claude-eu"]["successes"] == 1
            for c in (tg, az, an):
                for client in c._clients.values():
                    await client.close()
    asyncio.run(body())
