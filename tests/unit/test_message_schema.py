"""The published JSON Schema describes the messages the producer really sends, on the topic it chooses."""

import json
from datetime import datetime, timedelta, timezone
from importlib import resources

import jsonschema
import pytest

from pipeline.constants import IMMEDIATE_TOPIC, REQUESTS_TOPIC
from pipeline.errors import LineError
from pipeline.intake.formats import parse_request
from pipeline.intake.messages import decode
from pipeline.intake.producer import to_message, topic_for
from pipeline.money.pricing import PriceBook

SCHEMA = json.loads(resources.files("pipeline").joinpath("data/request.schema.json").read_text())
PRICES = PriceBook.load()


def message(**line_extra) -> dict:
    line = {"custom_id": "x1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}, **line_extra}
    return json.loads(to_message("job_1", 3, parse_request(line, PRICES)))


def test_producer_messages_validate():
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    jsonschema.validate(message(), SCHEMA, format_checker=checker)
    jsonschema.validate(message(priority=2, tier="offpeak", deadline="2030-01-01T00:00:00Z",
                                metadata={"a": 1}, cache=True), SCHEMA, format_checker=checker)
    # a deadline written without an offset is sent with UTC's
    jsonschema.validate(message(deadline="2030-01-01T00:00:00"), SCHEMA, format_checker=checker)


@pytest.mark.parametrize("change", [{"v": 2}, {"provider": "Mistral AI"}, {"max_cost_usd": 0.1},
                                    {"priority": 11}, {"tier": "urgent"}, {"body": "text"},
                                    {"custom_id": ""}, {"job_id": ""}, {"custom_id": "c" * 100_001},
                                    {"metadata": "hi"}, {"published_at": "yesterday"}, {"line": "abc"},
                                    {"input_tokens": 10**12}, {"max_cost_usd": "NaN"},
                                    {"max_cost_usd": "-5"}, {"max_cost_usd": "1e12"},
                                    {"deadline": "2026-12-02T10:00:00"}])
def test_schema_and_batcher_reject_the_same_mistakes(change):
    msg = {**message(), **change}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(msg, SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    with pytest.raises(LineError):
        decode(json.dumps(msg).encode(), now=None)


def test_a_provider_the_batcher_does_not_price_is_refused_by_it():
    """The schema cannot know the registry: any provider name passes it, and the batcher refuses
    a provider whose price book has no such model."""
    msg = {**message(), "provider": "mistral"}
    jsonschema.validate(msg, SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    with pytest.raises(LineError, match="not served by provider 'mistral'"):
        decode(json.dumps(msg).encode(), now=None)


def _request(**line_extra):
    line = {"custom_id": "x1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}, **line_extra}
    return parse_request(line, PRICES)


@pytest.mark.parametrize("line, job, topic", [
    ({"priority": 9}, {}, IMMEDIATE_TOPIC),
    ({"tier": "immediate"}, {}, IMMEDIATE_TOPIC),
    ({}, {"priority": 8}, IMMEDIATE_TOPIC),                        # the job's default priority
    ({"priority": 3}, {"tier": "immediate"}, IMMEDIATE_TOPIC),     # submit --tier immediate
    ({"deadline": (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat()}, {}, IMMEDIATE_TOPIC),
    ({"priority": 7}, {}, REQUESTS_TOPIC),
    ({}, {}, REQUESTS_TOPIC),
    ({"priority": 9}, {"mode": "provider_batch"}, REQUESTS_TOPIC),
])
def test_what_the_batcher_will_call_immediate_takes_the_fast_lane(line, job, topic):
    assert topic_for(_request(**line), **job) == topic
