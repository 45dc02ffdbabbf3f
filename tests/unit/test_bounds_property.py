"""reserved >= billed, for generated request bodies (hypothesis).

Every body ``request_bound`` accepts is answered by the simulator's own code
in worst-case mode (every choice to its limit, the prompt written at the
longest cache TTL named); the usage it bills is priced with the pipeline's
``pricing.cost`` at the body's model. That cost must never exceed the bound,
nor the billed input or output tokens the bound's token figures.

The simulator counts with its own rules (simulator/billing.py: a different
Claude stand-in, the cookbook tool formula, image formulas on real or drawn
sizes), so this checks the pipeline's margins, not a copy of them.
``test_the_property_catches_the_old_bound`` shows the same check failing on
the bound as it was before (input × input price + max_tokens × output price).

``test_reserved_is_never_below_billed_on_every_endpoint`` runs the same property over
every url of :data:`pipeline.endpoints.ENDPOINTS` (chat, messages, responses, embeddings,
completions, moderations), each body bounded by its endpoint and billed by the
simulator's endpoint in worst-case mode (``simulator.endpoints.worst_usage``); the bill
is priced twice, by the pipeline's ``cost`` and by the simulator's own price table
(``simulator.prices.usd``), and neither may exceed the reservation. 300 examples by
default; ``LLMBATCH_ENDPOINT_BOUNDS_EXAMPLES=3000`` for the issue's run.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import zlib

from hypothesis import HealthCheck, assume, example, find, given, settings
from hypothesis import strategies as st

from pipeline.constants import (ANTHROPIC_MESSAGES_URL, CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL,
                                MODERATIONS_URL, RESPONSES_URL)
from pipeline.endpoints import ENDPOINTS
from pipeline.errors import LineError
from pipeline.money.bounds import request_bound
from pipeline.money.pricing import PriceBook, cost, max_cost, usage_from_anthropic, usage_from_openai
from simulator import answers, caching
from simulator.endpoints import ALL as SIMULATED, worst_usage
from simulator.prices import builtin_price, usd
from simulator.protocol import Problem, validate_anthropic_message, validate_openai_chat
from tests.unit import test_endpoints_completions, test_endpoints_embeddings, test_endpoints_responses

PRICES = PriceBook.load()
OPENAI_MODELS = [p.model for p in PRICES if p.provider == "openai" and CHAT_URL in p.endpoints]
CLAUDE_MODELS = [p.model for p in PRICES if p.provider == "anthropic"]
#: 400 by default (seconds on a quiet machine); LLMBATCH_BOUNDS_EXAMPLES=5000 for a longer run
SETTINGS = settings(max_examples=int(os.environ.get("LLMBATCH_BOUNDS_EXAMPLES", "400")), deadline=None,
                    derandomize=True, suppress_health_check=list(HealthCheck))
SEEN = {"generated": 0, "accepted": 0}

# --------------------------------------------------------------------------- strategies

texts = st.one_of(
    st.text(max_size=200),                                                   # any unicode
    st.text(alphabet=st.characters(max_codepoint=127), max_size=300),        # ASCII
    st.text(alphabet=" \n\t{}[]\"':,.;()<>=+-*/_0123456789abcXYZ", max_size=300),   # code-ish, whitespace
    st.text(alphabet="日本語中文한국어हिन्दीالعربيةไทย👍🏻🎉ßéü", max_size=150),        # dense scripts, emoji
    st.sampled_from(["", " ", "Hello there", "Summarise the plot of Hamlet in one line."]),
)
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=20)


def png(w: int, h: int) -> str:
    ihdr = struct.pack(">II", w, h) + b"\x08\x02\x00\x00\x00"
    chunk = b"IHDR" + ihdr
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return base64.b64encode(data).decode()


sizes = st.tuples(st.integers(1, 8000), st.integers(1, 8000))
properties = st.dictionaries(
    names,
    st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "boolean", "number"])},
                          optional={"description": texts,
                                    "enum": st.lists(texts, min_size=1, max_size=4)}),
    max_size=4)


@st.composite
def schemas(draw):
    props = draw(properties)
    schema = {"type": "object", "properties": props}
    if props and draw(st.booleans()):
        schema["required"] = sorted(props)[:1]
    return schema


@st.composite
def openai_tools(draw):
    fn = {"name": draw(names), "parameters": draw(schemas())}
    if draw(st.booleans()):
        fn["description"] = draw(texts)
    return {"type": "function", "function": fn}


@st.composite
def openai_parts(draw, vision: bool):
    kinds = ["text", "image"] if vision else ["text"]
    parts = []
    for kind in draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=3)):
        if kind == "text":
            parts.append({"type": "text", "text": draw(texts)})
        else:
            url = (f"data:image/png;base64,{png(*draw(sizes))}" if draw(st.booleans())
                   else f"https://example.com/{draw(names)}.png")
            image = {"url": url}
            detail = draw(st.sampled_from([None, "low", "high", "auto"]))
            if detail:
                image["detail"] = detail
            parts.append({"type": "image_url", "image_url": image})
    return parts


@st.composite
def openai_bodies(draw):
    model = draw(st.sampled_from(OPENAI_MODELS))
    price = PRICES.resolve(model)
    vision = price.image_base is not None or price.image_patch_multiplier is not None
    messages = []
    if draw(st.booleans()):
        messages.append({"role": draw(st.sampled_from(["system", "developer"])), "content": draw(texts)})
    for i in range(draw(st.integers(1, 3))):
        content = draw(st.one_of(texts, openai_parts(vision)))
        messages.append({"role": "user", "content": content})
        if draw(st.integers(0, 3)) == 0:
            call = {"id": f"call_{i}", "type": "function",
                    "function": {"name": draw(names), "arguments": json.dumps({"q": draw(texts)})}}
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            messages.append({"role": "tool", "tool_call_id": f"call_{i}", "content": draw(texts)})
    body = {"model": model, "messages": messages}
    limit = price.max_output_tokens
    key = draw(st.sampled_from([None, "max_tokens", "max_completion_tokens"]))
    if key:
        body[key] = draw(st.one_of(st.integers(1, 64), st.integers(1, limit)))
    n = draw(st.sampled_from([None, 1, 2, 3, 4, 8]))
    if n is not None:
        body["n"] = n
    if draw(st.booleans()):
        body["tools"] = draw(st.lists(openai_tools(), min_size=1, max_size=3))
        choice = draw(st.sampled_from([None, "auto", "none", "required", "named"]))
        if choice == "named":
            body["tool_choice"] = {"type": "function", "function": {"name": body["tools"][0]["function"]["name"]}}
        elif choice:
            body["tool_choice"] = choice
    fmt = draw(st.sampled_from([None, "json_object", "json_schema"]))
    if fmt == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt == "json_schema":
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": draw(names), "schema": draw(schemas()), "strict": True}}
    return body


def cache_control(draw):
    ttl = draw(st.sampled_from([None, None, "5m", "1h", "default"]))
    if ttl is None:
        return {}
    return {"cache_control": {"type": "ephemeral"} if ttl == "default" else {"type": "ephemeral", "ttl": ttl}}


@st.composite
def claude_blocks(draw):
    blocks = []
    for kind in draw(st.lists(st.sampled_from(["text", "text", "image"]), min_size=1, max_size=3)):
        if kind == "text":
            blocks.append({"type": "text", "text": draw(texts) or "x", **cache_control(draw)})
        elif draw(st.booleans()):
            blocks.append({"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                       "data": png(*draw(sizes))}})
        else:
            blocks.append({"type": "image", "source": {"type": "url", "url": f"https://example.com/{draw(names)}"}})
    return blocks


@st.composite
def anthropic_bodies(draw):
    model = draw(st.sampled_from(CLAUDE_MODELS))
    limit = PRICES.resolve(model).max_output_tokens
    messages = []
    for i in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(st.one_of(texts.map(lambda t: t or "x"), claude_blocks()))})
        if i < 2 and draw(st.booleans()):
            messages.append({"role": "assistant", "content": draw(texts) or "ok"})
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": "go on"})
    body = {"model": model, "messages": messages,
            "max_tokens": draw(st.one_of(st.integers(1, 64), st.integers(1, limit)))}
    if draw(st.booleans()):
        body["system"] = draw(st.one_of(texts.filter(bool), st.lists(
            st.builds(lambda t, cc: {"type": "text", "text": t or "x", **cc}, texts,
                      st.just(None).map(lambda _: {})), min_size=1, max_size=2)))
        if isinstance(body["system"], list) and draw(st.booleans()):
            body["system"][-1]["cache_control"] = {"type": "ephemeral", "ttl": draw(st.sampled_from(["5m", "1h"]))}
    if draw(st.booleans()):
        body["tools"] = [{"name": draw(names), "description": draw(texts), "input_schema": draw(schemas()),
                          **cache_control(draw)} for _ in range(draw(st.integers(1, 3)))]
        choice = draw(st.sampled_from([None, "auto", "any", "tool", "none"]))
        if choice == "tool":
            body["tool_choice"] = {"type": "tool", "name": body["tools"][0]["name"]}
        elif choice:
            body["tool_choice"] = {"type": choice}
    if body["max_tokens"] > 1025 and draw(st.booleans()):
        body["thinking"] = {"type": "enabled", "budget_tokens": draw(st.integers(1024, body["max_tokens"] - 1))}
    return body


bodies = st.one_of(openai_bodies().map(lambda b: ("openai", b)), anthropic_bodies().map(lambda b: ("anthropic", b)))


# --------------------------------------------------------------------------- the property

def billed(provider: str, body: dict):
    """The simulator's worst-case usage for ``body``, as the pipeline reads it, or None if refused."""
    try:
        if provider == "openai":
            validate_openai_chat(body)
            answer = answers.openai_answer(body)
        else:
            validate_anthropic_message(body)
            answer = answers.anthropic_answer(body)
    except (Problem, LookupError):
        return None
    raw = answers.usage(answer, worst_case=True, cache=caching.PromptCache())
    return usage_from_openai(raw) if provider == "openai" else usage_from_anthropic(raw)


def check(provider: str, body: dict, bound_fn):
    """``(bound, billed cost, usage)`` for an accepted body, or None."""
    SEEN["generated"] += 1
    try:
        bound = bound_fn(provider, body)
    except LineError:
        return None
    usage = billed(provider, body)
    if usage is None:
        return None
    SEEN["accepted"] += 1
    return bound, cost(PRICES.resolve(body["model"]), usage), usage


@SETTINGS
@given(bodies)
def test_reserved_is_never_below_billed(case):
    provider, body = case
    got = check(provider, body, lambda p, b: request_bound(p, b, PRICES))
    assume(got is not None)
    bound, spent, usage = got
    assert usage.input_tokens <= bound.input_tokens, (body, usage, bound)
    assert usage.output_tokens <= bound.max_output_tokens, (body, usage, bound)
    assert spent <= bound.max_cost_usd, (body, usage, bound, spent)


def test_report_how_many_bodies_held():
    # runs after the property test in file order; prints the figures for the report
    print(f"\nbounds property: {SEEN['generated']} bodies generated, {SEEN['accepted']} accepted and "
          f"billed, reserved >= billed for all of them")
    assert SEEN["accepted"] >= 100


def _old_bound(provider: str, body: dict):
    """The bound before this change: input tokens x input price + max_tokens x output price."""
    from pipeline.money.tokens import count_request

    price = PRICES.resolve(body["model"])
    out = body.get("max_completion_tokens") or body.get("max_tokens") or price.max_output_tokens
    tokens = count_request(provider, body["model"], body).tokens
    return type("B", (), {"max_cost_usd": max_cost(price, tokens, out)})


def test_the_property_catches_the_old_bound():
    def overspent(case):
        provider, body = case
        try:
            got = check(provider, body, _old_bound)
        except Exception:
            return False
        return got is not None and got[1] > got[0].max_cost_usd

    found = find(bodies, overspent, settings=settings(max_examples=400, deadline=None, database=None,
                                                      suppress_health_check=list(HealthCheck)))
    print(f"\nold bound overspent by: {found}")


@settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.one_of(texts, st.lists(texts, min_size=1, max_size=20).map("".join)))
def test_claude_estimate_is_never_below_the_simulators_count(text):
    """The documented margin of estimate_claude_text against the simulator's independent count."""
    from pipeline.money.tokens import estimate_claude_text
    from simulator.billing import claude_count

    assert estimate_claude_text(text) >= claude_count(text)


# --------------------------------------------------------------------------- every endpoint

ENDPOINT_EXAMPLES = int(os.environ.get("LLMBATCH_ENDPOINT_BOUNDS_EXAMPLES", "300"))
SEEN_BY_URL = {url: {"generated": 0, "accepted": 0, "witnessed": 0} for url in ENDPOINTS}


def _served(url: str) -> list[str]:
    return [p.model for p in PRICES if url in p.endpoints]


@st.composite
def embedding_bodies(draw):
    body = {"model": draw(st.sampled_from(_served(EMBEDDINGS_URL))), "input": draw(test_endpoints_embeddings.inputs)}
    if body["model"].startswith("text-embedding-3") and draw(st.booleans()):
        body["dimensions"] = draw(st.integers(1, PRICES.resolve(body["model"]).dimensions))
    if draw(st.booleans()):
        body["encoding_format"] = draw(st.sampled_from(["float", "base64"]))
    return body


moderation_inputs = st.one_of(
    texts, st.lists(st.one_of(texts, st.builds(lambda t: {"type": "text", "text": t}, texts),
                              st.just({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})),
                    min_size=1, max_size=6))

endpoint_bodies = st.one_of(
    openai_bodies().map(lambda b: (CHAT_URL, b)),
    anthropic_bodies().map(lambda b: (ANTHROPIC_MESSAGES_URL, b)),
    test_endpoints_responses.bodies().map(lambda b: (RESPONSES_URL, b)),
    embedding_bodies().map(lambda b: (EMBEDDINGS_URL, b)),
    test_endpoints_completions.bodies().map(lambda b: (COMPLETIONS_URL, b)),
    st.builds(lambda m, i: (MODERATIONS_URL, {"model": m, "input": i}),
              st.sampled_from(_served(MODERATIONS_URL)), moderation_inputs),
)


@settings(max_examples=ENDPOINT_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(endpoint_bodies)
# found by this test: empty instructions are a developer message the simulator bills (4 tokens)
@example((RESPONSES_URL, {"model": "gpt-4.1", "input": "", "instructions": ""}))
def test_reserved_is_never_below_billed_on_every_endpoint(case):
    url, body = case
    seen = SEEN_BY_URL[url]
    seen["generated"] += 1
    endpoint, price = ENDPOINTS[url], PRICES.resolve(body["model"])
    try:
        bound = endpoint.bound(body, price)
    except LineError:
        assume(False)
    raw = worst_usage(url, body)
    assume(raw is not None)
    seen["accepted"] += 1
    usage = endpoint.usage({"usage": raw})   # the pipeline reads the bill as it reads an answer
    if usage is not None:
        assert usage.input_tokens <= bound.input_tokens, (url, body, usage, bound)
        assert usage.output_tokens <= bound.max_output_tokens, (url, body, usage, bound)
        assert cost(price, usage) <= bound.max_cost_usd, (url, body, usage, bound)
    else:   # an answer with no usage is free, or the reservation would not be its cost
        assert not raw and bound.max_cost_usd == 0, (url, body, raw, bound)
    witness = builtin_price(SIMULATED[url].family, body["model"])
    if witness is not None:   # the simulator's own dollars for the same bill
        seen["witnessed"] += 1
        assert usd(witness, raw) <= bound.max_cost_usd, (url, body, raw, bound, usd(witness, raw))


def test_report_every_endpoint():
    # runs after the property in file order: each url was generated, accepted and billed
    print("\nbounds property per endpoint (generated / accepted and billed / priced by the simulator too):")
    for url, seen in SEEN_BY_URL.items():
        print(f"  {url}: {seen['generated']} / {seen['accepted']} / {seen['witnessed']}")
    assert all(seen["accepted"] >= ENDPOINT_EXAMPLES // 30 for seen in SEEN_BY_URL.values()), SEEN_BY_URL
