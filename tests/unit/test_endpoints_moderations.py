"""/v1/moderations: free, yet validated and counted; every refusal, and the bound against the
docs' worst case ($0: "Moderation models are free")."""

from __future__ import annotations

import os
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.endpoints import endpoint_bound
from pipeline.errors import LineError
from pipeline.money.pricing import PriceBook
from tests.unit.endpoints_oracle import O200K, billed

PRICES = PriceBook.load()
URL = "/v1/moderations"
SETTINGS = settings(max_examples=int(os.environ.get("LLMBATCH_BOUNDS_EXAMPLES", "300")), deadline=None,
                    derandomize=True, suppress_health_check=list(HealthCheck))
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}


def mod(input, model="omni-moderation-latest", **body):
    return endpoint_bound(URL, {"model": model, "input": input, **body}, PRICES)


def reason(input, **body) -> str:
    with pytest.raises(LineError) as e:
        mod(input, **body)
    return e.value.reason


def test_moderation_is_free_and_counted():
    text = "I will find you."
    b = mod(text)
    assert b.max_cost_usd == 0 and b.max_output_tokens == 0 and not b.tokens_exact
    assert b.input_tokens == 1 + len(O200K.encode(text))
    several = mod(["first", {"type": "text", "text": "second"}], model="text-moderation-latest")
    assert several.input_tokens == 2 + len(O200K.encode("first")) + len(O200K.encode("second"))


def test_moderation_images_for_omni_only():
    assert mod([{"type": "text", "text": "a"}, IMAGE]).input_tokens == 1 + 1 + 16 + 85 + 8 * 170
    assert mod([IMAGE]).max_cost_usd == 0
    assert reason([IMAGE], model="text-moderation-latest") == (
        "body.input[0]: text-moderation-latest takes text only; images need omni-moderation-latest")
    assert mod("a", model="text-moderation-stable").max_cost_usd == 0   # the stable name resolves


@pytest.mark.parametrize("input,message", [
    ([], "body.input must be a string or a non-empty array, got an empty array"),
    (None, "body.input must be a string or a non-empty array, got null"),
    ([{"type": "image_url", "image_url": "https://x"}], "body.input[0] must be a string, {\"type\": \"text\""),
    ([{"type": "text"}], "body.input[0] must be a string"),
    ([3], "body.input[0] must be a string"),
])
def test_moderation_input_refusals(input, message):
    assert reason(input).startswith(message)


def test_moderation_fields_and_models():
    assert reason("a", stream=True).startswith("body.stream is not a /v1/moderations field llmbatch can price")
    with pytest.raises(LineError, match="body.model must be a model name, got null"):
        endpoint_bound(URL, {"input": "a"}, PRICES)
    assert reason("a", model="gpt-4o").startswith("model gpt-4o does not serve /v1/moderations")


@SETTINGS
@given(model=st.sampled_from(["omni-moderation-latest", "text-moderation-latest"]),
       input=st.one_of(st.text(max_size=200),
                       st.lists(st.one_of(st.text(max_size=100),
                                          st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=100))),
                                min_size=1, max_size=6)))
def test_moderation_bound_never_below_the_docs_worst_case(model, input):
    texts = [input] if isinstance(input, str) else [i if isinstance(i, str) else i["text"] for i in input]
    tokens = sum(len(O200K.encode(t, disallowed_special=())) for t in texts)
    bound = endpoint_bound(URL, {"model": model, "input": input}, PRICES)
    assert bound.input_tokens >= tokens
    assert bound.max_cost_usd >= billed(model, tokens, 0) == Decimal(0)
