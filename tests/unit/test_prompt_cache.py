"""Prompt-cache placement (pipeline/endpoints/prompt_cache.py), against the simulator as the witness.

Properties: a prefix below the model's minimum is never marked (the minimum
and the count are the simulator's, not the pipeline's), the user's own markers
are never changed, no body ends with more breakpoints than Anthropic takes,
and the reserved maximum covers what the simulator bills a placed job, cache
writes included.
"""

from __future__ import annotations

import copy
import os
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.endpoints import caching as response_cache
from pipeline.endpoints import prompt_cache
from pipeline.endpoints.prompt_cache import Placer, group_key, min_cacheable_tokens
from pipeline.money.bounds import request_bound
from pipeline.money.pricing import PriceBook
from simulator import answers, billing
from simulator import caching as sim_caching
from simulator.prices import builtin_price, usd

PRICES = PriceBook.load()
SETTINGS = settings(max_examples=int(os.environ.get("LLMBATCH_PLACEMENT_EXAMPLES", "150")), deadline=None,
                    derandomize=True, suppress_health_check=list(HealthCheck))
CLAUDES = ["claude-haiku-4-5", "claude-sonnet-4-5", "claude-3-5-haiku-latest", "claude-opus-4-5", "claude-sonnet-4-0"]
WORDS = ("policy clause refund customer ledger invoice shipment warranty schedule tariff "
         "日本語 हिन्दी ß naïve {json: [1, 2]} return; 👍").split()


def text_of(n_words: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 13 + i * i) % len(WORDS)] for i in range(n_words))


def price(model: str):
    return PRICES.resolve(model)


@st.composite
def claude_jobs(draw):
    """A job of 2 to 5 Anthropic lines sharing tools, a system prompt and leading messages of drawn
    lengths (from a few tokens to past every minimum), some lines with the user's own markers."""
    model = draw(st.sampled_from(CLAUDES))
    seed = draw(st.integers(0, 50))
    system_words = draw(st.sampled_from([0, 5, 300, 700, 1100, 1800, 3000, 4500]))
    lead_words = draw(st.sampled_from([0, 0, 40, 900, 2600]))
    tools = draw(st.booleans())
    system_form = draw(st.sampled_from(["str", "blocks"]))
    base: dict = {"model": model, "max_tokens": draw(st.integers(1, 400))}
    if tools:
        base["tools"] = [{"name": "lookup", "description": text_of(30, seed),
                          "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}]
    if system_words:
        s = text_of(system_words, seed)
        base["system"] = s if system_form == "str" else [{"type": "text", "text": s[: len(s) // 2]},
                                                          {"type": "text", "text": s[len(s) // 2:]}]
    lead = ([{"role": "user", "content": text_of(lead_words, seed + 1)},
             {"role": "assistant", "content": "Understood."}] if lead_words else [])
    lines = []
    for i in range(draw(st.integers(2, 5))):
        body = copy.deepcopy({**base, "messages": lead + [{"role": "user", "content": f"Question {i}: {seed}"}]})
        mark = draw(st.sampled_from([None, None, "system", "last", "auto"]))
        if mark == "system" and isinstance(body.get("system"), list):
            body["system"][0]["cache_control"] = {"type": "ephemeral"}
        elif mark == "auto":
            body["cache_control"] = {"type": "ephemeral", "ttl": draw(st.sampled_from(["5m", "1h"]))}
        elif mark == "last":
            body["messages"][-1]["content"] = [{"type": "text", "text": body["messages"][-1]["content"],
                                                "cache_control": {"type": "ephemeral", "ttl": "5m"}}]
        lines.append(body)
    return lines


def breakpoints(body: dict) -> list[tuple[int, str]]:
    """``(simulator's prompt tokens up to the breakpoint, ttl)`` of each breakpoint of ``body``."""
    out, cum = [], 3
    for tokens, ttl, _ in billing.anthropic_segments(body):
        cum += tokens
        if ttl is not None:
            out.append((cum, ttl))
    return out


@SETTINGS
@given(claude_jobs(), st.booleans())
def test_a_prefix_below_the_minimum_is_never_marked_and_user_markers_are_never_changed(lines, batch):
    placer = Placer(provider_batch=batch)
    originals = copy.deepcopy(lines)
    for original, body in zip(originals, lines):
        placed = placer.place(body, price(body["model"]))
        assert body == original                      # the caller's body is never mutated
        if prompt_cache.user_marked(original):
            assert placed is body                    # the user's markers win: not one byte changed
            continue
        assert sim_caching.check_anthropic_breakpoints(placed) is None   # at most 4, TTLs in order
        minimum = sim_caching.anthropic_min_tokens(body["model"])
        assert minimum == min_cacheable_tokens(price(body["model"]))
        for tokens, ttl in breakpoints(placed):
            assert tokens >= minimum, f"a breakpoint at {tokens} tokens, below {minimum} for {body['model']}"
            assert ttl == ("1h" if batch else "5m")
        answer_of = answers.anthropic_answer
        assert answer_of(placed).text == answer_of(original).text   # markers change no answer


@SETTINGS
@given(claude_jobs(), st.booleans())
def test_reserved_covers_what_the_simulator_bills_a_placed_job_cache_writes_included(lines, batch):
    placer = Placer(provider_batch=batch)
    cache = sim_caching.PromptCache()
    tier = "batch" if batch else "standard"
    for body in lines:
        placed = placer.place(body, price(body["model"]))
        bound = request_bound("anthropic", placed, PRICES)
        sim_price = builtin_price("anthropic", body["model"])
        for worst in (False, True):
            billed = answers.usage(answers.anthropic_answer(placed), worst_case=worst,
                                   cache=sim_caching.PromptCache() if worst else cache)
            assert bound.max_cost_usd >= usd(sim_price, billed, tier), (billed, bound)
            assert bound.max_cost_usd >= usd(sim_price, billed, "standard")


# --------------------------------------------------------------------------- examples

POLICY = text_of(1500, 3)


def _claude(model, question, system=POLICY):
    return {"model": model, "max_tokens": 50, "system": system, "messages": [{"role": "user", "content": question}]}


def test_haiku_4_5_never_marks_a_1500_token_system_prompt_and_sonnet_marks_it_from_the_second_line():
    assert 1024 < billing.anthropic_prompt(_claude("claude-haiku-4-5", "q")) < 4096
    haiku, sonnet = Placer(), Placer()
    h = [haiku.place(_claude("claude-haiku-4-5", f"q{i}"), price("claude-haiku-4-5")) for i in range(3)]
    s = [sonnet.place(_claude("claude-sonnet-4-5", f"q{i}"), price("claude-sonnet-4-5")) for i in range(3)]
    assert all(isinstance(b["system"], str) for b in h) and haiku.marked == 0
    assert isinstance(s[0]["system"], str)
    assert [b["system"][-1]["cache_control"] for b in s[1:]] == [{"type": "ephemeral"}] * 2
    assert group_key(s[1]) == group_key(s[2]) is not None and group_key(s[0]) is None


def test_provider_batches_take_the_1h_ttl_and_leading_messages_get_their_own_breakpoint():
    lead = [{"role": "user", "content": text_of(1500, 9)}, {"role": "assistant", "content": "Noted."}]
    placer = Placer(provider_batch=True)
    bodies = [{"model": "claude-sonnet-4-5", "max_tokens": 20, "system": POLICY,
               "messages": lead + [{"role": "user", "content": f"q{i}"}]} for i in range(2)]
    placed = [placer.place(b, price("claude-sonnet-4-5")) for b in bodies]
    assert placed[0] is bodies[0]
    assert [t for _, t in breakpoints(placed[1])] == ["1h", "1h"]
    assert placed[1]["messages"][1]["content"][-1]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}


def test_openai_lines_get_a_prompt_cache_key_per_prefix_and_the_users_key_wins():
    placer = Placer()
    p = price("gpt-4o-mini")

    def line(system, q, **extra):
        return {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": system},
                                                     {"role": "user", "content": q}], **extra}

    a1, a2 = placer.place(line(POLICY, "q1"), p), placer.place(line(POLICY, "q2"), p)
    b = placer.place(line(text_of(1500, 4), "q1"), p)
    short = line("Be terse.", "q1")
    own = line(POLICY, "q3", prompt_cache_key="mine")
    assert a1["prompt_cache_key"] == a2["prompt_cache_key"] != b["prompt_cache_key"]
    assert a1["prompt_cache_key"].startswith("llmbatch-") and len(a1["prompt_cache_key"]) <= 64
    assert placer.place(short, p) is short and placer.place(own, p) is own
    assert group_key(a1) == a1["prompt_cache_key"]


def test_markers_and_keys_do_not_change_the_response_cache_key():
    body = _claude("claude-sonnet-4-5", "q")
    marked = {**body, "system": [{"type": "text", "text": POLICY, "cache_control": {"type": "ephemeral"}}]}
    oa = {"model": "gpt-4o-mini", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    assert response_cache.cache_key("anthropic", body) == response_cache.cache_key("anthropic", marked)
    assert response_cache.cache_key("openai", oa) == response_cache.cache_key(
        "openai", {**oa, "prompt_cache_key": "llmbatch-x"})
    assert response_cache.cache_key("openai", oa) != response_cache.cache_key(
        "openai", {**oa, "temperature": 1})


def test_the_cached_ratio_is_the_pricing_files():
    assert prompt_cache.cached_ratio(price("gpt-4o-mini")) == Decimal("0.5")
    assert prompt_cache.cached_ratio(price("claude-haiku-4-5")) == Decimal("0.1")
    assert min_cacheable_tokens(price("gpt-4o-mini")) == 1024


def test_the_minimum_is_the_price_books_and_a_model_it_gives_none_is_never_marked():
    from dataclasses import replace
    for model in ("gpt-4o-mini", "claude-haiku-4-5", "claude-3-5-haiku-latest", "claude-sonnet-4-5"):
        assert min_cacheable_tokens(price(model)) == price(model).min_cache_tokens is not None
    assert min_cacheable_tokens(price("text-embedding-3-small")) is None
    unknown = replace(price("claude-sonnet-4-5"), min_cache_tokens=None)
    placer = Placer()
    body = {"model": "claude-sonnet-4-5", "max_tokens": 10, "system": text_of(3000, 1),
            "messages": [{"role": "user", "content": "hi"}]}
    assert placer.place(body, unknown) is body and placer.place(body, unknown) is body
    known = Placer()   # the book's minimum: the second line of the group is marked
    assert known.place(body, price("claude-sonnet-4-5")) is body
    assert known.place(body, price("claude-sonnet-4-5")) is not body


def test_a_prefix_group_runs_its_first_request_before_the_others():
    import asyncio

    from workers.execute import PrefixGroups

    grouped = [{"model": "gpt-4o-mini", "prompt_cache_key": "g", "messages": [{"role": "user", "content": str(i)}]}
               for i in range(3)]
    alone = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    events = []

    async def run(groups, i, body, seconds):
        async with groups.turn(body):
            events.append(("start", i))
            await asyncio.sleep(seconds)
            events.append(("end", i))

    async def main(wait_s):
        groups = PrefixGroups(wait_s)
        await asyncio.gather(run(groups, 0, grouped[0], 0.05), run(groups, 1, grouped[1], 0),
                             run(groups, 2, grouped[2], 0), run(groups, 3, alone, 0))

    asyncio.run(main(5))
    assert events.index(("end", 0)) < events.index(("start", 1)) and events.index(("start", 3)) < 2
    events.clear()
    asyncio.run(main(0.01))   # a slow first request holds the others at most wait_s
    assert events.index(("start", 1)) < events.index(("end", 0))
    events.clear()
    asyncio.run(main(0))      # no wait at all (the immediate tier)
    assert events.index(("start", 2)) < events.index(("end", 0))


def test_a_provider_batch_lists_each_prefix_group_together_where_its_first_line_stood():
    a = [{"model": "m", "prompt_cache_key": "a", "messages": [{"role": "user", "content": str(i)}]} for i in range(3)]
    b = [{"model": "m", "prompt_cache_key": "b", "messages": [{"role": "user", "content": str(i)}]} for i in range(2)]
    plain = [{"model": "m", "messages": [{"role": "user", "content": str(i)}]} for i in range(2)]
    mixed = [a[0], b[0], plain[0], a[1], b[1], plain[1], a[2]]
    assert prompt_cache.in_groups(mixed) == [a[0], a[1], a[2], b[0], b[1], plain[0], plain[1]]


def test_a_responses_line_is_keyed_by_its_instructions():
    placer, p = Placer(), price("gpt-4o-mini")
    bodies = [{"model": "gpt-4o-mini", "instructions": POLICY, "input": f"q{i}"} for i in range(2)]
    placed = [placer.place(b, p, "/v1/responses") for b in bodies]
    assert placed[0]["prompt_cache_key"] == placed[1]["prompt_cache_key"]
    assert placer.place({"model": "gpt-4o-mini", "input": "short"}, p, "/v1/responses").get("prompt_cache_key") is None
    assert placer.place({"model": "gpt-4o-mini", "input": "x"}, p, "/v1/embeddings").get("prompt_cache_key") is None


def test_a_top_level_cache_control_is_the_users_own_and_its_write_is_in_the_bound():
    """Anthropic's automatic caching: a top-level ``cache_control`` puts the breakpoint on the last
    cacheable block; the simulator writes there and the bound must count that write."""
    body = {**_claude("claude-sonnet-4-5", "q"), "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    plain = _claude("claude-sonnet-4-5", "q")
    assert Placer().place(body, price("claude-sonnet-4-5")) is body
    billed = answers.usage(answers.anthropic_answer(body), worst_case=False, cache=sim_caching.PromptCache())
    assert billed["cache_creation"]["ephemeral_1h_input_tokens"] == billing.anthropic_prompt(body)
    sim_price = builtin_price("anthropic", "claude-sonnet-4-5")
    bound = request_bound("anthropic", body, PRICES)
    assert bound.max_cost_usd >= usd(sim_price, billed)
    assert bound.max_cost_usd > request_bound("anthropic", plain, PRICES).max_cost_usd


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "text", "role", "content", "cache_control", "name", "input_schema"]), inner,
        max_size=4),
    max_leaves=20)


@SETTINGS
@given(st.fixed_dictionaries({}, optional={
    "custom_id": st.text(max_size=5), "params": json_values, "body": json_values, "url": json_values}),
    st.dictionaries(st.sampled_from(["model", "system", "messages", "tools", "prompt_cache_key", "input",
                                     "instructions", "cache_control"]),
                    json_values | st.sampled_from(["claude-sonnet-4-5", "gpt-4o-mini"]), max_size=6),
    st.sampled_from(["claude-sonnet-4-5", "gpt-4o-mini", "claude-haiku-4-5"]))
def test_placing_any_line_never_raises(line, body, model):
    """A malformed line is for the line's validation to reject with its reason: placement never raises."""
    placer = Placer()
    for candidate in (line, {**line, "params": {**body, "model": model}},
                      {**line, "body": {**body, "model": model}, "url": "/v1/chat/completions"},
                      {**line, "body": {**body, "model": model}, "url": "/v1/responses"}):
        for _ in range(2):   # the second sight of a prefix is the one that marks
            placer.place_line(candidate, PRICES)
        group_key(candidate.get("params") or candidate.get("body"))


def test_a_jobs_placer_follows_its_mode_and_auto_keeps_the_five_minute_ttl():
    from pipeline.config import Settings
    from pipeline.intake.producer import placer_for

    on, off = Settings(prompt_cache_placement=True), Settings(prompt_cache_placement=False)
    assert placer_for("provider_batch", on).ttl == "1h"       # the Batch API runs the lines
    assert placer_for("realtime", on).ttl is None
    assert placer_for("auto", on).ttl is None                 # chosen per line later: the bound's 5m
    assert placer_for("auto", off) is None


def test_a_body_without_a_breakpoint_is_in_no_group_and_costs_no_hashing(monkeypatch):
    """A worker asks every request for its group (workers/execute.py PrefixGroups): the
    unmarked ones, nearly all of a bulk job, must not pay for hashing their whole prompt
    (3 % of a worker's CPU under bench/e2e.py, bench/README.md "Profiles")."""
    from pipeline.endpoints import prompt_cache
    marked = _claude("claude-sonnet-4-5", "q", system=[{"type": "text", "text": POLICY,
                                                       "cache_control": {"type": "ephemeral"}}])
    key = group_key(marked)
    plain = [_claude("claude-sonnet-4-5", "q"),
             {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
              "tools": [{"type": "function", "function": {"name": "f"}}]},
             {"model": "m", "messages": "not a list"}, "not a body"]

    def no_hashing(*a, **k):
        raise AssertionError("hashed a body that asks for no caching")
    monkeypatch.setattr(prompt_cache, "_feed", no_hashing)
    assert [group_key(b) for b in plain] == [None] * 4
    monkeypatch.undo()
    assert group_key(marked) == key and key.startswith("cc-")
