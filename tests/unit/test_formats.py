"""Line validation: every bad line gets a reason a person understands."""

import json

import pytest

from pipeline.errors import LineError, UnknownModelError
from pipeline.intake.formats import parse_json_line, parse_request
from pipeline.money.pricing import PriceBook
from pipeline.money.tokens import count_chat_tokens

PRICES = PriceBook.load()


def openai_line(**over):
    line = {"custom_id": "a1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "max_tokens": 10,
                     "messages": [{"role": "user", "content": "Hello there"}]}}
    for k, v in over.items():
        if k.startswith("body_"):
            line["body"][k[5:]] = v
        else:
            line[k] = v
    return line


def anthropic_line(**over):
    line = {"custom_id": "c1", "params": {"model": "claude-haiku-4-5", "max_tokens": 20,
                                          "messages": [{"role": "user", "content": "Hi"}]}}
    line["params"].update(over)
    return line


def reason(obj) -> str:
    with pytest.raises(LineError) as e:
        parse_request(obj, PRICES)
    return e.value.reason


def test_openai_line_is_priced_with_exact_tokens():
    req = parse_request(openai_line(priority=7, metadata={"team": "x"}), PRICES)
    assert req.provider == "openai" and req.model == "gpt-4o-mini"
    assert req.input_tokens == count_chat_tokens([{"role": "user", "content": "Hello there"}], "gpt-4o-mini")
    assert req.tokens_exact is True
    price = PRICES.resolve("gpt-4o-mini")
    expected = (req.input_tokens * price.input_per_mtok + 10 * price.output_per_mtok) / 1_000_000
    assert req.max_cost_usd == expected
    assert req.priority == 7 and req.metadata == {"team": "x"}


def test_anthropic_line_is_an_estimate():
    req = parse_request(anthropic_line(), PRICES)
    assert req.provider == "anthropic" and req.max_tokens == 20
    assert req.tokens_exact is False and req.input_tokens > 0


def test_missing_max_tokens_uses_the_model_output_limit():
    line = openai_line()
    del line["body"]["max_tokens"]
    req = parse_request(line, PRICES)
    assert req.max_tokens == PRICES.resolve("gpt-4o-mini").max_output_tokens


@pytest.mark.parametrize("raw, expected", [
    (b'{"custom_id": "x", "body": {"model": ', "not valid JSON"),
    (b"[1, 2]", "expected a JSON object, got an array"),
    (b'"text"', "expected a JSON object, got a string"),
    (b"\xff\xfe{}", "not valid UTF-8"),
])
def test_undecodable_lines(raw, expected):
    with pytest.raises(LineError) as e:
        parse_json_line(raw)
    assert expected in e.value.reason


def test_bom_and_crlf_are_tolerated():
    assert parse_json_line(b'\xef\xbb\xbf{"a": 1}\r\n') == {"a": 1}


@pytest.mark.parametrize("line, expected", [
    (openai_line(method="GET"), 'method must be "POST"'),
    (openai_line(url="/v1/images/generations"), "url must be one of /v1/chat/completions, /v1/responses,"),
    (openai_line(url="/v1/messages"), "url must be one of /v1/chat/completions"),
    (openai_line(url="/v1/embeddings"), "body.max_tokens is not a /v1/embeddings field"),
    (openai_line(body_model="gpt-9-ultra"), "unknown model 'gpt-9-ultra'"),
    (openai_line(body_max_tokens=0), "max_tokens must be at least 1, got 0"),
    (openai_line(body_max_tokens=10**7), "over gpt-4o-mini's output limit"),
    (openai_line(body_max_tokens="ten"), "max_tokens must be an integer, got a string"),
    (openai_line(body_messages=[]), "messages must not be empty"),
    (openai_line(body_messages="hi"), "body.messages must be an array, got a string"),
    (openai_line(body_messages=[{"role": "wizard", "content": "x"}]), "messages[0].role must be one of"),
    (openai_line(body_model=None), "body.model must be a string, got null"),
    (openai_line(custom_id=7), "custom_id must be a string, got a number"),
    (openai_line(body=[1]), "field body must be an object, got an array"),
    (openai_line(priority=12), "priority must be an integer from 0 to 9, got 12"),
    (openai_line(tier="urgent"), "tier must be one of immediate, peak, offpeak, background"),
    (openai_line(deadline="tomorrow"), "deadline must be an ISO 8601 date-time"),
    (openai_line(metadata=[1]), "metadata must be an object, got an array"),
    (openai_line(cache="yes"), "cache must be true or false"),
    (openai_line(body_model="claude-haiku-4-5"), "served by anthropic: use the Anthropic"),
    (anthropic_line(max_tokens=None), "missing field params.max_tokens"),
    ({"custom_id": "has space", "params": {}}, "must match"),
])
def test_bad_lines_have_reasons(line, expected):
    assert expected in reason(json.loads(json.dumps(line)))


def test_unknown_model_lists_known_ones():
    with pytest.raises(UnknownModelError) as e:
        parse_request(openai_line(body_model="gpt-9-ultra"), PRICES)
    assert "gpt-4o-mini" in e.value.reason


def test_prompt_over_context_window_names_both_numbers():
    window = PRICES.resolve("gpt-4o-mini").context_window
    text = "word " * (window + 10)
    r = reason(openai_line(body_messages=[{"role": "user", "content": text}]))
    assert f"context window of {window} tokens" in r and "prompt is" in r
