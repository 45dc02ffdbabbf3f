"""/v1/responses: counts by hand, every refusal with its reason, the output limit at its edge,
and the bound against the docs' worst case (tests/unit/endpoints_oracle.py)."""

from __future__ import annotations

import base64
import os
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.endpoints import endpoint_bound
from pipeline.errors import LineError
from pipeline.money.pricing import PriceBook
from tests.unit.endpoints_oracle import O200K, responses_worst

PRICES = PriceBook.load()
URL = "/v1/responses"
SETTINGS = settings(max_examples=int(os.environ.get("LLMBATCH_BOUNDS_EXAMPLES", "300")), deadline=None,
                    derandomize=True, suppress_health_check=list(HealthCheck))
MODELS = [p.model for p in PRICES if URL in p.endpoints]


def resp(input="Hello", model="gpt-4o-mini", **body):
    return endpoint_bound(URL, {"model": model, "input": input, **body}, PRICES)


def reason(input="Hello", **body) -> str:
    with pytest.raises(LineError) as e:
        resp(input, **body)
    return e.value.reason


def n(text: str) -> int:
    return len(O200K.encode(text))


def png(w: int, h: int) -> str:
    chunk = b"IHDR" + struct.pack(">II", w, h) + b"\x08\x02\x00\x00\x00"
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_response_string_input_is_one_user_message_with_the_chat_framing():
    b = resp("Write a haiku about batch jobs.", max_output_tokens=200)
    # 3 priming + 3 per message + the role + the text
    assert b.input_tokens == 3 + 3 + n("user") + n("Write a haiku about batch jobs.")
    assert b.max_output_tokens == 200 and not b.tokens_exact
    assert b.max_cost_usd == (b.input_tokens * PRICES.resolve("gpt-4o-mini").input_per_mtok
                              + 200 * PRICES.resolve("gpt-4o-mini").output_per_mtok) / 1_000_000


def test_response_items_instructions_and_parts_are_counted():
    items = [
        {"role": "developer", "content": "Answer in French."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Bonjour"},
                                                        {"type": "input_text", "text": "ça va ?"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Oui."}]},
    ]
    b = resp(items, instructions="Be brief.")
    expected = (3 + 3 + n("developer") + n("Be brief.")
                + 3 + n("developer") + n("Answer in French.")
                + 3 + n("user") + 1 + n("Bonjour") + 1 + n("ça va ?")
                + 3 + n("assistant") + 1 + n("Oui."))
    assert b.input_tokens == expected


def test_response_default_output_is_the_models_maximum_and_reasoning_is_inside_it():
    assert resp(model="o4-mini").max_output_tokens == PRICES.resolve("o4-mini").max_output_tokens
    assert resp(model="o4-mini", reasoning={"effort": "high"}, max_output_tokens=5000).max_output_tokens == 5000


def test_response_max_output_tokens_at_the_models_limit():
    assert resp(max_output_tokens=16384).max_output_tokens == 16384
    assert reason(max_output_tokens=16385) == "max_output_tokens is 16385, over gpt-4o-mini's output limit of 16384 tokens"
    assert reason(max_output_tokens=0) == "max_output_tokens must be at least 1, got 0"


def test_response_function_tools_calls_and_schemas_carry_the_chat_margin():
    tool = {"type": "function", "name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    base = resp().input_tokens
    with_tool = resp(tools=[tool]).input_tokens
    assert with_tool - base >= 32 + 24 + n('"get_weather"')
    call = [{"role": "user", "content": "Weather in Oslo?"},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "12 C, rain"}]
    assert resp(call).input_tokens > resp(call[:1]).input_tokens + n('{"city": "Oslo"}') + n("12 C, rain") + 24
    schema = {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}
    assert resp(text=schema).input_tokens > base + 24


def test_response_images_by_the_vision_formula():
    part = [{"role": "user", "content": [{"type": "input_image", "image_url": png(512, 512), "detail": "high"}]}]
    b = resp(part, model="gpt-4o")
    assert b.input_tokens == 3 + 3 + n("user") + 1 + 16 + 85 + 170 * 1
    url = [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]
    assert resp(url, model="gpt-4o").input_tokens == 3 + 3 + n("user") + 1 + 16 + 85 + 170 * 8
    assert reason(url, model="o3-mini") == "body.input[0].content[0]: o3-mini does not take image input"


def test_response_flex_is_allowed_and_bounded_at_the_standard_price():
    assert resp(service_tier="flex") == resp() == resp(service_tier="auto") == resp(service_tier="default")


@pytest.mark.parametrize("tool", ["web_search", "web_search_preview", "file_search", "code_interpreter",
                                  "computer_use_preview", "image_generation", "mcp", "local_shell", "custom"])
def test_response_built_in_tools_are_refused_with_the_reason(tool):
    r = reason(tools=[{"type": "function", "name": "f", "parameters": {}}, {"type": tool}])
    assert r.startswith(f"body.tools[1] of type '{tool}' cannot be bounded: built-in tools are billed per call")


@pytest.mark.parametrize("body,message", [
    ({"previous_response_id": "resp_123"}, "body.previous_response_id cannot be bounded: the stored conversation"),
    ({"conversation": "conv_123"}, "body.conversation cannot be bounded: the stored conversation"),
    ({"conversation": {"id": "conv_123"}}, "body.conversation cannot be bounded"),
    ({"background": True}, "body.background cannot be bounded: a background response is billed after"),
    ({"prompt": {"id": "pmpt_1"}}, "body.prompt cannot be bounded: a stored prompt template"),
    ({"service_tier": "priority"}, "body.service_tier 'priority' cannot be bounded: only auto, default and flex"),
    ({"audio": {}}, "body.audio is not a /v1/responses field llmbatch can price"),
    ({"tools": {"type": "function"}}, "body.tools must be an array, got an object"),
    ({"instructions": ["a"]}, "body.instructions must be a string, got an array"),
    ({"text": {"format": {"type": "grammar"}}}, "body.text.format {'type': 'grammar'} cannot be bounded"),
    ({"reasoning": "high"}, "body.reasoning must be an object, got a string"),
])
def test_response_field_refusals(body, message):
    assert reason(**body).startswith(message)


def test_response_background_false_is_no_refusal():
    assert resp(background=False) == resp()


@pytest.mark.parametrize("input,message", [
    ([], "body.input must be a string or a non-empty array of items, got an empty array"),
    (None, "body.input must be a string or a non-empty array of items, got null"),
    (["hi"], "body.input[0] must be an object (a message or a function call item), got a string"),
    ([{"role": "tool", "content": "x"}], "body.input[0].role must be one of user, assistant, system, developer"),
    ([{"type": "item_reference", "id": "msg_1"}], "body.input[0] of type 'item_reference' cannot be bounded"),
    ([{"type": "reasoning", "id": "rs_1", "summary": []}], "body.input[0] of type 'reasoning' cannot be bounded"),
    ([{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}],
     "body.input[0].content[0] of type 'input_file' cannot be bounded"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
     "body.input[0].content[0] of type 'input_audio' cannot be bounded"),
    ([{"role": "user", "content": 7}], "body.input[0].content must be a string or an array of content parts"),
    ([{"type": "function_call", "name": "f"}], "body.input[0]: a function_call item needs a name and arguments"),
    ([{"role": "user", "content": [{"type": "input_image", "detail": "high"}]}],
     "body.input[0].content[0]: input_image needs an image_url or file_id"),
])
def test_response_input_refusals(input, message):
    assert reason(input, model="gpt-4o").startswith(message)


def test_response_prompt_over_the_context_window_is_refused():
    assert reason("word " * 130_000).startswith("prompt is ")


# --------------------------------------------------------------------------- the property

texts = st.one_of(st.text(max_size=150), st.text(alphabet=st.characters(max_codepoint=127), max_size=300),
                  st.text(alphabet="日本語中文한국어👍🏻🎉ßéü{}\"", max_size=100))
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=20)
parts = st.lists(st.builds(lambda t: {"type": "input_text", "text": t}, texts), min_size=1, max_size=3)
messages = st.builds(lambda role, content: {"role": role, "content": content},
                     st.sampled_from(["user", "assistant", "system", "developer"]), st.one_of(texts, parts))
calls = st.builds(lambda name, args: {"type": "function_call", "call_id": "c", "name": name, "arguments": args},
                  names, texts)
outputs = st.builds(lambda out: {"type": "function_call_output", "call_id": "c", "output": out}, texts)
tools = st.builds(lambda name, desc, props: {"type": "function", "name": name, "description": desc,
                                             "parameters": {"type": "object", "properties": props}},
                  names, texts, st.dictionaries(names, st.fixed_dictionaries({"type": st.just("string"),
                                                                               "description": texts}), max_size=3))


@st.composite
def bodies(draw):
    model = draw(st.sampled_from(MODELS))
    body = {"model": model,
            "input": draw(st.one_of(texts, st.lists(st.one_of(messages, calls, outputs), min_size=1, max_size=6)))}
    if draw(st.booleans()):
        body["instructions"] = draw(texts)
    if draw(st.booleans()):
        body["tools"] = draw(st.lists(tools, min_size=1, max_size=3))
    if draw(st.booleans()):
        body["max_output_tokens"] = draw(st.integers(16, PRICES.resolve(model).max_output_tokens))
    if draw(st.booleans()):
        body["text"] = {"format": {"type": "json_schema", "name": draw(names),
                                   "schema": {"type": "object", "properties": {draw(names): {"type": "string"}}}}}
    if draw(st.booleans()):
        body["service_tier"] = draw(st.sampled_from(["auto", "default", "flex"]))
    return body


@SETTINGS
@given(body=bodies())
def test_response_bound_never_below_the_docs_worst_case(body):
    tokens, out, worst = responses_worst(body, O200K)
    bound = endpoint_bound(URL, body, PRICES)
    assert bound.input_tokens >= tokens and bound.max_output_tokens >= out and bound.max_cost_usd >= worst
