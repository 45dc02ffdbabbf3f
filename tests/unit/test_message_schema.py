"""The published JSON Schema describes the messages the producer really sends."""

import json
from importlib import resources

import jsonschema
import pytest

from pipeline.batcher import decode
from pipeline.errors import LineError
from pipeline.formats import parse_request
from pipeline.pricing import PriceBook
from pipeline.producer import to_message

SCHEMA = json.loads(resources.files("pipeline").joinpath("data/request.schema.json").read_text())
PRICES = PriceBook.load()


def message(**line_extra) -> dict:
    line = {"custom_id": "x1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}, **line_extra}
    return json.loads(to_message("job_1", 3, parse_request(line, PRICES)))


def test_producer_messages_validate():
    jsonschema.validate(message(), SCHEMA)
    jsonschema.validate(message(priority=2, tier="offpeak", deadline="2030-01-01T00:00:00Z",
                                metadata={"a": 1}, cache=True), SCHEMA)


@pytest.mark.parametrize("change", [{"v": 2}, {"provider": "mistral"}, {"max_cost_usd": 0.1},
                                    {"priority": 11}, {"tier": "urgent"}, {"body": "text"}])
def test_schema_and_batcher_reject_the_same_mistakes(change):
    msg = {**message(), **change}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(msg, SCHEMA)
    with pytest.raises(LineError):
        decode(json.dumps(msg).encode(), now=None)
