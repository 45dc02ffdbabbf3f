"""Pure parts of pipeline/providers/ratelimit.py: limit parsing, tier shares, token counts, reset headers."""

from __future__ import annotations

import pytest

from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.providers import ratelimit


def test_parse_limit():
    assert ratelimit.parse_limit("60:10000") == ratelimit.Limit(60, 10000)
    assert ratelimit.parse_limit(":10000") == ratelimit.Limit(None, 10000)
    assert ratelimit.parse_limit("500:") == ratelimit.Limit(500, None)
    assert ratelimit.parse_limit("500") == ratelimit.Limit(500, None)
    assert ratelimit.parse_limit("1_000:2_000_000") == ratelimit.Limit(1000, 2000000)
    for bad in ("x:1", "0:5", "-1:"):
        with pytest.raises(ConfigError):
            ratelimit.parse_limit(bad)


def test_limit_for_lookup():
    s = Settings(rate_limits={"gpt-4o-mini": "60:", "anthropic:claude-x": ":1000", "empty": ""})
    assert ratelimit.limit_for(s, "openai", "gpt-4o-mini") == ratelimit.Limit(60, None)
    assert ratelimit.limit_for(s, "anthropic", "claude-x") == ratelimit.Limit(None, 1000)
    assert ratelimit.limit_for(s, "openai", "other") is None
    assert ratelimit.limit_for(s, "openai", "empty") is None


def test_effective_limit_shares():
    assert ratelimit.effective_limit(100, "immediate", 0.7, True) == 100
    assert ratelimit.effective_limit(100, "peak", 0.7, True) == 70
    assert ratelimit.effective_limit(100, "peak", 0.7, False) == 70      # peak: always its share
    assert ratelimit.effective_limit(100, "offpeak", 0.7, False) == 100
    assert ratelimit.effective_limit(100, "offpeak", 0.7, True) == 70
    assert ratelimit.effective_limit(1, "offpeak", 0.7, True) == 1
    assert ratelimit.effective_limit(None, "peak", 0.7, True) is None


def test_request_tokens():
    assert ratelimit.request_tokens({"input_tokens": 12, "body": {"max_tokens": 100}}) == 112
    assert ratelimit.request_tokens({"input_tokens": 12, "body": {"max_completion_tokens": 50}}) == 62
    assert ratelimit.request_tokens({"input_tokens": None, "body": {}}) == 0


def test_parse_reset():
    assert ratelimit.parse_reset("1s") == 1
    assert ratelimit.parse_reset("6m0s") == 360
    assert ratelimit.parse_reset("120ms") == pytest.approx(0.12)
    assert ratelimit.parse_reset("2.5") == 2.5
    assert ratelimit.parse_reset("") is None and ratelimit.parse_reset("soon") is None


async def _no_redis_admit():
    class NoRedis:
        async def eval(self, *a):
            raise AssertionError("no Redis call for an unlimited model")
    lim = ratelimit.Limiter(Settings(rate_limits={}), NoRedis())
    assert await lim.admit("openai", "gpt-4o-mini", "peak", 100) == 0.0
    async with lim.lease("peak") as waited:
        assert waited == 0.0


def test_unlimited_makes_no_redis_call():
    import asyncio
    asyncio.run(_no_redis_admit())


def test_fails_closed_while_redis_is_down():
    import asyncio

    calls = {"n": 0}

    class Flaky:
        async def eval(self, *a):
            calls["n"] += 1
            if calls["n"] < 3:
                raise ConnectionError("down")
            return [1, 0]

    slept = []

    async def sleep(s):
        slept.append(s)

    lim = ratelimit.Limiter(Settings(rate_limits={"m": "10:"}), Flaky(), sleep=sleep)
    asyncio.run(lim.admit("openai", "m", "peak", 1))
    assert calls["n"] == 3 and len(slept) == 2
