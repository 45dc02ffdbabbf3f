"""Each rule of pipeline.money.bounds.request_bound, one at a time (issue 13, items 2 and 8)."""

from __future__ import annotations

import base64
import json
import math
import re
import struct
import zlib
from pathlib import Path

import pytest

from pipeline.errors import LineError
from pipeline.intake.formats import parse_request
from pipeline.money import bounds
from pipeline.money.bounds import request_bound
from pipeline.money.pricing import PriceBook, Usage, answered_price, cost
from pipeline.money.tokens import count_chat_tokens, count_text_tokens

PRICES = PriceBook.load()
MINI = PRICES.resolve("gpt-4o-mini")
MSGS = [{"role": "user", "content": "Classify: the parcel arrived broken."}]


def oa(**body):
    return request_bound("openai", {"model": "gpt-4o-mini", "messages": MSGS, **body}, PRICES)


def an(**body):
    return request_bound("anthropic", {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": MSGS, **body},
                         PRICES)


def png(w: int, h: int) -> str:
    chunk = b"IHDR" + struct.pack(">II", w, h) + b"\x08\x02\x00\x00\x00"
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk
                            + struct.pack(">I", zlib.crc32(chunk))).decode()


def reason(fn, **body) -> str:
    with pytest.raises(LineError) as e:
        fn(**body)
    return e.value.reason


# --------------------------------------------------------------------------- output

def test_n_choices_multiply_the_output():
    one, eight = oa(max_tokens=100), oa(max_tokens=100, n=8)
    assert eight.max_output_tokens == 800 and eight.input_tokens == one.input_tokens  # prompt billed once
    assert eight.max_cost_usd - one.max_cost_usd == 700 * MINI.output_per_mtok / 1_000_000


@pytest.mark.parametrize("n", [0, 129, 2.0, "2", True])
def test_n_that_cannot_be_bounded_is_rejected(n):
    assert "n must be an integer from 1 to 128" in reason(oa, n=n)


def test_no_max_tokens_means_the_models_maximum_output():
    assert oa().max_output_tokens == MINI.max_output_tokens == 16384
    assert request_bound("openai", {"model": "o3", "messages": MSGS}, PRICES).max_output_tokens == 100000


def test_reasoning_model_bounded_by_max_completion_tokens_and_the_larger_limit_wins():
    b = request_bound("openai", {"model": "o4-mini", "messages": MSGS, "max_completion_tokens": 5000}, PRICES)
    assert b.max_output_tokens == 5000   # reasoning tokens are inside max_completion_tokens
    assert oa(max_tokens=10, max_completion_tokens=300).max_output_tokens == 300


def test_max_tokens_over_the_models_limit_is_rejected_never_clamped():
    # issue 13 item 8: max_tokens 10**9 was priced at a declared $0.0000108 and cost $0.0000396
    assert "max_tokens is 1000000000, over gpt-4o-mini's output limit of 16384" in reason(oa, max_tokens=10**9)
    assert "over claude-sonnet-4-5's output limit of 64000" in reason(an, max_tokens=64001)


def test_thinking_budget_is_inside_max_tokens_and_checked():
    b = an(max_tokens=8000, thinking={"type": "enabled", "budget_tokens": 4000})
    assert b.max_output_tokens == 8000
    assert "budget_tokens must be an integer from 1024" in reason(
        an, max_tokens=2000, thinking={"type": "enabled", "budget_tokens": 2000})
    assert "budget_tokens" in reason(an, max_tokens=8000, thinking={"type": "enabled", "budget_tokens": 100})
    assert "thinking.type" in reason(an, thinking={"type": "maximal"})


def test_anthropic_max_tokens_is_required():
    body = {"model": "claude-sonnet-4-5", "messages": MSGS}
    with pytest.raises(LineError, match="missing field params.max_tokens"):
        request_bound("anthropic", body, PRICES)


# --------------------------------------------------------------------------- schemas

TOOL = {"type": "function", "function": {
    "name": "lookup_order", "description": "Look an order up by its number.",
    "parameters": {"type": "object", "properties": {"order": {"type": "string", "description": "the number"}},
                   "required": ["order"]}}}


def test_tools_and_functions_are_counted_with_the_documented_margin():
    base, with_tool = oa(max_tokens=10), oa(max_tokens=10, tools=[TOOL])
    raw = count_text_tokens(json.dumps(TOOL, ensure_ascii=False, sort_keys=True), "gpt-4o-mini")
    assert with_tool.input_tokens - base.input_tokens == (
        math.ceil(raw * 5 / 4) + bounds.SCHEMA_ITEM_OVERHEAD + bounds.OPENAI_TOOLS_OVERHEAD)
    legacy = oa(max_tokens=10, functions=[TOOL["function"]])
    assert legacy.input_tokens > base.input_tokens
    assert with_tool.tokens_exact is False and base.tokens_exact is True


def test_response_format_schema_is_counted():
    fmt = {"type": "json_schema", "json_schema": {"name": "label", "schema": {
        "type": "object", "properties": {"label": {"type": "string", "enum": ["ok", "broken", "late"]}}}}}
    assert oa(max_tokens=10, response_format=fmt).input_tokens > oa(max_tokens=10).input_tokens + 20
    assert "response_format" in reason(oa, response_format={"type": "grammar"})


def test_non_function_tools_cannot_be_bounded():
    assert "only function tools are priced" in reason(oa, tools=[{"type": "web_search"}])
    assert "only custom (client) tools" in reason(an, tools=[{"type": "web_search_20250305", "name": "w"}])


def test_anthropic_tools_add_the_tool_use_system_prompt():
    tool = {"name": "lookup", "description": "d", "input_schema": {"type": "object", "properties": {}}}
    assert an(tools=[tool]).input_tokens - an().input_tokens > bounds.ANTHROPIC_TOOL_PROMPT


# --------------------------------------------------------------------------- images

def image(url: str, detail: str | None = None) -> list:
    img = {"url": url} if detail is None else {"url": url, "detail": detail}
    return [{"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                         {"type": "image_url", "image_url": img}]}]


def image_tokens(model: str, url: str, detail: str | None = None) -> int:
    with_image = request_bound("openai", {"model": model, "messages": image(url, detail)}, PRICES).input_tokens
    text_only = request_bound("openai", {"model": model, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is it?"}]}]}, PRICES).input_tokens
    return with_image - text_only - bounds.TOKENS_PER_IMAGE


def test_openai_images_by_the_published_tile_formula():
    data = f"data:image/png;base64,{png(1024, 1024)}"
    assert image_tokens("gpt-4o", data, "high") == 85 + 170 * 4         # 768 x 768: 2 x 2 tiles
    assert image_tokens("gpt-4o", data, "low") == 85
    assert image_tokens("gpt-4o", f"data:image/png;base64,{png(4096, 2048)}") == 85 + 170 * 6  # 1536 x 768
    assert image_tokens("gpt-4o", "https://example.com/cat.png") == 85 + 170 * 8   # size unknown: the maximum
    assert image_tokens("gpt-4o-mini", "https://example.com/cat.png") == 2833 + 5667 * 8
    assert image_tokens("gpt-4o-mini", data, "low") == 2833


def test_openai_patch_models_bound_by_the_patch_cap_and_models_without_vision_reject():
    assert image_tokens("gpt-4.1-mini", "https://example.com/cat.png", "low") == math.ceil(1536 * 1.62)
    with pytest.raises(LineError, match="does not take image input"):
        request_bound("openai", {"model": "o3-mini", "messages": image("https://example.com/x.png")}, PRICES)


def test_anthropic_images_by_area_capped():
    def with_image(source):
        return an(messages=[{"role": "user", "content": [{"type": "image", "source": source}]}]).input_tokens

    base = an(messages=[{"role": "user", "content": []}]).input_tokens + bounds.TOKENS_PER_IMAGE
    small = {"type": "base64", "media_type": "image/png", "data": png(200, 200)}
    assert with_image(small) - base == math.ceil(200 * 200 / 750)
    assert with_image({"type": "url", "url": "https://example.com/big.jpg"}) - base == bounds.ANTHROPIC_IMAGE_MAX
    big = {"type": "base64", "media_type": "image/png", "data": png(5000, 5000)}
    assert with_image(big) - base == bounds.ANTHROPIC_IMAGE_MAX


def test_content_that_cannot_be_bounded_is_rejected_with_the_reason():
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]
    assert "type 'input_audio' cannot be bounded" in reason(oa, messages=audio)
    assert "audio" in reason(oa, audio={"voice": "alloy", "format": "wav"}, modalities=["text", "audio"])
    assert "prediction" in reason(oa, prediction={"type": "content", "content": "x"})
    assert "service_tier 'priority'" in reason(oa, service_tier="priority")
    doc = [{"role": "user", "content": [{"type": "document", "source": {"type": "base64", "data": ""}}]}]
    assert "type 'document' cannot be bounded" in reason(an, messages=doc)


# --------------------------------------------------------------------------- cache writes

def test_cache_writes_price_the_prompt_at_the_write_rate():
    sonnet = PRICES.resolve("claude-sonnet-4-5")
    plain = an(system="Be brief.")
    five = an(system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}])
    hour = an(system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}])
    t = hour.input_tokens
    assert five.input_tokens == t
    assert five.max_cost_usd == cost(sonnet, Usage(t, 100, cache_write_tokens=t))       # 1.25 x input
    assert hour.max_cost_usd == cost(sonnet, Usage(t, 100, cache_write_1h_tokens=t))    # 2 x input
    assert plain.max_cost_usd < five.max_cost_usd < hour.max_cost_usd
    tool = {"name": "t", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    assert an(tools=[tool]).max_cost_usd == cost(sonnet, Usage(an(tools=[tool]).input_tokens, 100,
                                                               cache_write_1h_tokens=an(tools=[tool]).input_tokens))
    assert "ttl 5m or 1h" in reason(an, system=[{"type": "text", "text": "x",
                                                 "cache_control": {"type": "ephemeral", "ttl": "2h"}}])


# --------------------------------------------------------------------------- counts and the one rule

def test_plain_openai_text_is_the_exact_cookbook_count():
    b = oa(max_tokens=5)
    assert b.input_tokens == count_chat_tokens(MSGS, "gpt-4o-mini") and b.tokens_exact


def test_declared_input_tokens_can_only_raise_the_count():
    body = {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": MSGS}
    est = request_bound("anthropic", body, PRICES).input_tokens
    assert request_bound("anthropic", body, PRICES, declared_input_tokens=1).input_tokens == est
    assert request_bound("anthropic", body, PRICES, declared_input_tokens=est + 50).input_tokens == est + 50


def test_parse_request_prices_with_request_bound():
    body = {"model": "gpt-4o-mini", "messages": MSGS, "n": 3, "max_tokens": 50, "tools": [TOOL]}
    req = parse_request({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}, PRICES)
    b = request_bound("openai", body, PRICES)
    assert (req.input_tokens, req.max_tokens, req.max_cost_usd) == (b.input_tokens, 150, b.max_cost_usd)


def test_priced_by_the_model_that_answered():
    # issue 13 item 8: labelled gpt-4o-mini, answered by gpt-4o
    answered = answered_price(PRICES, {"model": "gpt-4o-2024-08-06"}, "gpt-4o-mini")
    assert answered.model == "gpt-4o"
    assert answered_price(PRICES, {"model": "some-new-snapshot"}, "gpt-4o-mini").model == "gpt-4o-mini"
    assert answered_price(PRICES, {}, "gpt-4o-mini").model == "gpt-4o-mini"
    u = Usage(1000, 100)
    assert cost(answered, u) > cost(MINI, u)


def test_the_simulator_does_not_import_the_pipelines_counting_or_pricing():
    root = Path(__file__).resolve().parents[2] / "simulator"
    banned = ("pipeline.money.pricing", "pipeline.money.bounds", "count_request", "count_chat_tokens", "count_text_tokens",
              "estimate_claude_text", "estimate_anthropic", "pipeline import tokens")
    for path in sorted(root.glob("*.py")):
        code = "\n".join(line for line in path.read_text().splitlines()
                         if line.lstrip().startswith(("import ", "from ")))
        found = [b for b in banned if b in code]
        assert not found, f"{path.name} uses the pipeline's {found}"


def test_the_content_walker_counts_parts_by_their_type_and_refuses_the_rest():
    """One walk over content parts serves chat, Anthropic and Responses: text by its field, one
    token per part, other types by their table entry, anything else refused with what is priced."""
    from pipeline.money.bounds import content_tokens, text_part
    count = len
    parts = {"text": text_part("text", count), "image": lambda part, at: 100}
    seen = []
    assert content_tokens("abcd", "c", count, parts, "x") == 4
    assert content_tokens(None, "c", count, parts, "x") == 0
    value = [{"type": "text", "text": "abc"}, {"type": "image"}]
    assert content_tokens(value, "c", count, parts, "x", each=lambda p, at: seen.append(at)) == 1 + 3 + 100
    assert seen == ["c[0]", "c[1]"]
    for bad, message in ((None, "c must be text or parts"), (7, "c must be text or parts"),
                         ([{"type": "audio"}], "c[0] of type 'audio' cannot be bounded (text and images)"),
                         ([{"type": "text", "text": 3}], "c[0] of type 'text' cannot be bounded"),
                         (["plain"], "c[0] of type None cannot be bounded"),
                         ([{"type": ["text"]}], "c[0] of type ['text'] cannot be bounded")):
        with pytest.raises(LineError, match=re.escape(message)):
            content_tokens(bad, "c", count, parts, "text and images", shape="text or parts", null_ok=False)
