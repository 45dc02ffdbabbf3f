"""/v1/embeddings: exact counts by hand, every refusal, OpenAI's limits at their edges, and the
bound against the docs' worst case (tests/unit/endpoints_oracle.py)."""

from __future__ import annotations

import os
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.endpoints import endpoint_bound
from pipeline.errors import LineError
from pipeline.money.pricing import PriceBook
from tests.unit.endpoints_oracle import CL100K, embeddings_worst

PRICES = PriceBook.load()
URL = "/v1/embeddings"
SETTINGS = settings(max_examples=int(os.environ.get("LLMBATCH_BOUNDS_EXAMPLES", "300")), deadline=None,
                    derandomize=True, suppress_health_check=list(HealthCheck))


def emb(input, model="text-embedding-3-small", **body):
    return endpoint_bound(URL, {"model": model, "input": input, **body}, PRICES)


def reason(input, **body) -> str:
    with pytest.raises(LineError) as e:
        emb(input, **body)
    return e.value.reason


def test_embedding_string_is_its_cl100k_count_at_the_input_price():
    text = "The quick brown fox jumps over the lazy dog."
    n = len(CL100K.encode(text))
    assert n == 10
    b = emb(text)
    assert (b.input_tokens, b.max_output_tokens, b.tokens_exact) == (n, 0, True)
    assert b.max_cost_usd == n * Decimal("0.02") / 1_000_000


def test_embedding_list_is_counted_per_item_and_summed():
    texts = ["hello world", "Grüße aus Köln", "日本語のテキスト", "a"]
    b = emb(texts, model="text-embedding-3-large")
    assert b.input_tokens == sum(len(CL100K.encode(t)) for t in texts)
    assert b.max_cost_usd == b.input_tokens * Decimal("0.13") / 1_000_000


def test_embedding_token_arrays_count_as_their_length():
    assert emb([[1, 2, 3], [4], [5, 6]], model="text-embedding-ada-002").input_tokens == 6
    assert emb([10, 20, 30, 40]).input_tokens == 4   # one flat array is one item
    assert emb(["two words", [7, 8]]).input_tokens == len(CL100K.encode("two words")) + 2


def test_embedding_special_token_text_is_counted_as_text_and_not_called_exact():
    b = emb("end<|endoftext|>")
    assert b.input_tokens == len(CL100K.encode("end<|endoftext|>", disallowed_special=()))
    assert b.input_tokens > len(CL100K.encode("end<|endoftext|>", allowed_special="all"))
    assert not b.tokens_exact


def test_embedding_dimensions_up_to_the_models_own():
    assert emb("x", dimensions=1536).input_tokens == 1
    assert emb("x", model="text-embedding-3-large", dimensions=3072).input_tokens == 1
    assert emb("x", dimensions=256, encoding_format="base64", user="u1").input_tokens == 1
    assert reason("x", dimensions=1537) == "body.dimensions is 1537, over text-embedding-3-small's 1536"
    assert (reason("x", model="text-embedding-ada-002", dimensions=1536)
            == "body.dimensions is only for text-embedding-3 models, not text-embedding-ada-002")
    assert reason("x", dimensions=0).startswith("body.dimensions must be an integer from 1 to")


# --------------------------------------------------------------------------- limits at their edges

def test_embedding_at_most_2048_items():
    assert emb(["a"] * 2048).input_tokens == 2048
    assert reason(["a"] * 2049) == "body.input has 2049 items, over OpenAI's 2048 per request"


def test_embedding_at_most_8192_tokens_an_item():
    assert emb([[1] * 8192]).input_tokens == 8192
    assert reason([[1], [1] * 8193]) == "body.input[1] is 8193 tokens, over text-embedding-3-small's 8192 per input"
    text = "hello" + " hello" * 8191
    assert len(CL100K.encode(text)) == 8192
    assert emb(text).input_tokens == 8192
    assert reason(text + " hello") == "body.input is 8193 tokens, over text-embedding-3-small's 8192 per input"


def test_embedding_at_most_300000_tokens_a_request():
    full = [[1] * 8192] * 36 + [[1] * (300_000 - 36 * 8192)]
    assert emb(full).input_tokens == 300_000
    over = full[:-1] + [[1] * (300_001 - 36 * 8192)]
    assert reason(over).startswith("body.input is 300001 tokens in all, over OpenAI's 300000 per request")


@pytest.mark.parametrize("input,message", [
    ("", "body.input is an empty string, which OpenAI refuses"),
    (["a", ""], "body.input[1] is an empty string, which OpenAI refuses"),
    ([], "body.input must be a string or a non-empty array, got an empty array"),
    ({"text": "a"}, "body.input must be a string or a non-empty array, got an object"),
    (["a", 3], "body.input[1] must be a string or a non-empty array of token ids, got a number"),
    ([[1], []], "body.input[1] must be a string or a non-empty array of token ids, got an array"),
    ([[1, True]], "body.input[0] must be a string or a non-empty array of token ids"),
    ([1, -1], "body.input holds token id -1, outside the encoding's 0 to 100276"),
    ([[100277]], "body.input[0] holds token id 100277, outside the encoding's 0 to 100276"),
])
def test_embedding_input_refusals(input, message):
    assert reason(input).startswith(message)


@pytest.mark.parametrize("body,message", [
    ({"encoding_format": "int8"}, "body.encoding_format must be float or base64, got 'int8'"),
    ({"user": 3}, "body.user must be a string"),
    ({"truncate": True}, "body.truncate is not a /v1/embeddings field llmbatch can price"),
])
def test_embedding_field_refusals(body, message):
    assert reason("x", **body).startswith(message)


def test_embedding_without_input_or_model():
    with pytest.raises(LineError, match="missing field body.input"):
        endpoint_bound(URL, {"model": "text-embedding-3-small"}, PRICES)
    with pytest.raises(LineError, match="body.model must be a model name, got null"):
        endpoint_bound(URL, {"model": None, "input": "x"}, PRICES)


# --------------------------------------------------------------------------- the property

texts = st.one_of(
    st.text(min_size=1, max_size=200),
    st.text(alphabet=st.characters(max_codepoint=127), min_size=1, max_size=300),
    st.text(alphabet="日本語中文한국어हिन्दीالعربية👍🏻🎉ßéü<|>endoftext", min_size=1, max_size=150),
    st.sampled_from(["<|endoftext|>", " ", "\n\n", "Hello there"]),
)
token_arrays = st.lists(st.integers(0, 100_276), min_size=1, max_size=50)
inputs = st.one_of(texts, token_arrays, st.lists(st.one_of(texts, token_arrays), min_size=1, max_size=8))


@SETTINGS
@given(model=st.sampled_from(["text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002"]),
       input=inputs)
def test_embedding_bound_never_below_the_docs_worst_case(model, input):
    body = {"model": model, "input": input}
    tokens, worst = embeddings_worst(body)
    bound = endpoint_bound(URL, body, PRICES)
    assert bound.input_tokens >= tokens and bound.max_cost_usd >= worst
    assert bound.max_output_tokens == 0
