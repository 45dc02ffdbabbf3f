"""/v1/completions (legacy): counts by hand, every refusal, the limits at their edges, and the bound
against the docs' worst case (tests/unit/endpoints_oracle.py)."""

from __future__ import annotations

import os
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.endpoints import endpoint_bound
from pipeline.errors import LineError
from pipeline.money.pricing import PriceBook
from tests.unit.endpoints_oracle import CL100K, completions_worst

PRICES = PriceBook.load()
URL = "/v1/completions"
SETTINGS = settings(max_examples=int(os.environ.get("LLMBATCH_BOUNDS_EXAMPLES", "300")), deadline=None,
                    derandomize=True, suppress_health_check=list(HealthCheck))
PROMPT = "Say this is a test"


def comp(prompt=PROMPT, model="gpt-3.5-turbo-instruct", **body):
    return endpoint_bound(URL, {"model": model, "prompt": prompt, **body}, PRICES)


def reason(prompt=PROMPT, **body) -> str:
    with pytest.raises(LineError) as e:
        comp(prompt, **body)
    return e.value.reason


def n(text: str) -> int:
    return len(CL100K.encode(text))


def test_completion_default_is_16_tokens_out_and_the_prompt_plus_its_separator_in():
    b = comp()
    assert n(PROMPT) == 5
    assert (b.input_tokens, b.max_output_tokens, b.tokens_exact) == (5 + 1, 16, False)
    assert b.max_cost_usd == (6 * Decimal("1.50") + 16 * Decimal("2.00")) / 1_000_000


def test_completion_every_prompt_is_billed_and_completed():
    prompts = ["one", "two words", "three small words"]
    b = comp(prompts, model="davinci-002", max_tokens=10)
    assert b.input_tokens == sum(n(p) + 1 for p in prompts)
    assert b.max_output_tokens == 10 * 3
    assert comp([[1, 2, 3], [4, 5]], model="babbage-002", max_tokens=5).input_tokens == 3 + 1 + 2 + 1
    assert comp([11, 12, 13], max_tokens=5).max_output_tokens == 5   # one flat token array is one prompt


def test_completion_n_and_best_of_multiply_the_output_and_the_larger_wins():
    assert comp(max_tokens=10, n=3).max_output_tokens == 30
    assert comp(max_tokens=10, best_of=5).max_output_tokens == 50
    assert comp(max_tokens=10, n=2, best_of=7).max_output_tokens == 70
    assert comp(["a", "b"], max_tokens=10, n=2, best_of=7).max_output_tokens == 140
    assert comp(max_tokens=10, n=3).input_tokens == comp(max_tokens=10).input_tokens   # the prompt once


def test_completion_echo_bounds_the_repeated_prompt_too_and_logprobs_adds_nothing():
    plain = comp(max_tokens=10, n=2)
    assert comp(max_tokens=10, n=2, logprobs=5) == plain
    echo = comp(max_tokens=10, n=2, echo=True)
    assert echo.max_output_tokens == plain.max_output_tokens + 2 * (n(PROMPT) + 1)
    assert comp(max_tokens=0, echo=True).max_output_tokens == n(PROMPT) + 1


def test_completion_suffix_is_input_for_every_prompt():
    suffix = "\n\nThe end."
    assert comp(["a", "b"], suffix=suffix).input_tokens == comp(["a", "b"]).input_tokens + 2 * n(suffix)


def test_completion_max_tokens_and_the_context_window_at_their_edges():
    assert comp(max_tokens=4096 - 6).max_output_tokens == 4090
    assert reason(max_tokens=4096 - 5) == ("body.prompt is 6 tokens; with max_tokens 4091 that is over "
                                           "gpt-3.5-turbo-instruct's context window of 4096 tokens")
    assert reason(max_tokens=4097) == "body.max_tokens must be an integer from 0 to 4096, got 4097"
    long = [[1] * 16383]
    assert comp(long, model="davinci-002", max_tokens=0).input_tokens == 16384
    assert reason(["a", [1] * 16383], model="davinci-002", max_tokens=1).startswith(
        "body.prompt[1] is 16384 tokens; with max_tokens 1 that is over davinci-002's context window")


@pytest.mark.parametrize("body,message", [
    ({"n": 0}, "body.n must be an integer from 1 to 128, got 0"),
    ({"n": 129}, "body.n must be an integer from 1 to 128, got 129"),
    ({"best_of": 21}, "body.best_of must be an integer from 1 to 20, got 21"),
    ({"n": 3, "best_of": 2}, "body.best_of (2) must be at least body.n (3)"),
    ({"logprobs": 6}, "body.logprobs must be an integer from 0 to 5, got 6"),
    ({"max_tokens": -1}, "body.max_tokens must be an integer from 0 to 4096, got -1"),
    ({"max_tokens": "16"}, "body.max_tokens must be an integer from 0 to 4096, got '16'"),
    ({"echo": "yes"}, "body.echo must be true or false, got a string"),
    ({"suffix": 3}, "body.suffix must be a string, got a number"),
    ({"functions": []}, "body.functions is not a /v1/completions field llmbatch can price"),
])
def test_completion_field_refusals(body, message):
    assert reason(**body).startswith(message)


@pytest.mark.parametrize("prompt,message", [
    ([], "body.prompt must be a string or a non-empty array, got an empty array"),
    ([["a"]], "body.prompt[0] must be a string or a non-empty array of token ids, got an array"),
    ([1, 100277], "body.prompt holds token id 100277, outside the encoding's 0 to 100276"),
    (None, "body.prompt must be a string or a non-empty array, got null"),
])
def test_completion_prompt_refusals(prompt, message):
    assert reason(prompt).startswith(message)


def test_completion_prompt_is_required_and_chat_models_are_refused():
    with pytest.raises(LineError, match="missing field body.prompt"):
        endpoint_bound(URL, {"model": "davinci-002"}, PRICES)
    assert reason(model="gpt-4o-mini").startswith("model gpt-4o-mini does not serve /v1/completions")


# --------------------------------------------------------------------------- the property

texts = st.one_of(st.text(max_size=200), st.text(alphabet=st.characters(max_codepoint=127), max_size=300),
                  st.sampled_from(["", "<|endoftext|>", "Once upon a time"]))
token_arrays = st.lists(st.integers(0, 100_276), min_size=1, max_size=40)
prompts = st.one_of(texts, token_arrays, st.lists(st.one_of(texts, token_arrays), min_size=1, max_size=5))


@st.composite
def bodies(draw):
    body = {"model": draw(st.sampled_from(["gpt-3.5-turbo-instruct", "davinci-002", "babbage-002"])),
            "prompt": draw(prompts)}
    n = draw(st.one_of(st.none(), st.integers(1, 6)))
    if n is not None:
        body["n"] = n
    if draw(st.booleans()):
        body["best_of"] = draw(st.integers(n or 1, 20))
    for key, strategy in (("max_tokens", st.integers(0, 300)), ("echo", st.booleans()),
                          ("logprobs", st.integers(0, 5)), ("suffix", texts), ("temperature", st.just(0))):
        if draw(st.booleans()):
            body[key] = draw(strategy)
    return body


@SETTINGS
@given(body=bodies())
def test_completion_bound_never_below_the_docs_worst_case(body):
    prompt_tokens, completion_tokens, worst = completions_worst(body)
    bound = endpoint_bound(URL, body, PRICES)
    assert bound.input_tokens >= prompt_tokens
    assert bound.max_output_tokens >= completion_tokens
    assert bound.max_cost_usd >= worst
