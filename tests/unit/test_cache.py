from pipeline.endpoints.caching import cache_key, is_cacheable


def test_only_deterministic_requests_are_cacheable():
    assert is_cacheable({"temperature": 0}, None)
    assert not is_cacheable({"temperature": 0.7}, None)
    assert not is_cacheable({}, None)
    assert is_cacheable({"temperature": 1}, True)
    assert not is_cacheable({"temperature": 0}, False)


def test_key_covers_every_generation_parameter_but_not_key_order():
    body = {"model": "gpt-4o-mini", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    same = {"messages": [{"content": "hi", "role": "user"}], "temperature": 0, "model": "gpt-4o-mini"}
    assert cache_key("openai", body) == cache_key("openai", same)
    assert cache_key("openai", body) != cache_key("openai", dict(body, max_tokens=5))
    assert cache_key("openai", body) != cache_key("openai", dict(body, model="gpt-4o"))
    assert cache_key("openai", body) != cache_key("anthropic", body)
    assert len(cache_key("openai", body)) == 64
