"""Who sent a request message: the producer's signature (pipeline/intake/kafka.py), without services.

A message passes only when it is signed, under the password the stack's
producer key gives the producer it names, over exactly its value; and the
batcher dead-letters the rest with the reason, before decoding them.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, strategies as st

from pipeline.config import Secret, load_settings, producer_password
from pipeline.constants import PRODUCER_HEADER, SIGNATURE_HEADER
from pipeline.errors import ConfigError, LineError
from pipeline.intake.kafka import client_conf, sign, verify
from tests.unit.test_intake_batcher import FakeMsg, make  # noqa: F401  (the fixture)
from tests.unit.test_intake_messages import NOW, message, raw

KEY = "unit-test-key"
STACK = load_settings({"LLMBATCH_KAFKA_PRODUCER_KEY": KEY, "LLMBATCH_VAR_DIR": "/nonexistent"})
NAMES = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1, max_size=40)


def as_producer(name: str):
    """A service's settings: its own user and the password ``kafka add-producer`` gives it."""
    return dataclasses.replace(STACK, kafka_user=name, kafka_password=Secret(producer_password(KEY, name)),
                               kafka_producer_key=Secret(""))


def test_the_pipelines_producer_derives_its_password_and_logs_in_with_it():
    conf = client_conf(STACK, "producer")
    assert conf["sasl.username"] == "llmbatch-submit"
    assert conf["sasl.password"] == producer_password(KEY, "llmbatch-submit")
    assert conf["security.protocol"] == "SASL_PLAINTEXT" and conf["sasl.mechanism"] == "SCRAM-SHA-512"
    with pytest.raises(ConfigError, match="KAFKA_ADMIN_PASSWORD"):
        client_conf(STACK, "admin")   # no password: refused here, not by a broker timeout


@given(NAMES, st.binary(max_size=2000))
def test_a_producers_own_signature_passes(name, value):
    assert verify(STACK, sign(as_producer(name), value), value) == name


@given(NAMES, NAMES, st.binary(max_size=200))
def test_a_signature_in_another_producers_name_fails(name, other, value):
    if name == other:
        return
    headers = [(PRODUCER_HEADER, other.encode()), sign(as_producer(name), value)[1]]
    with pytest.raises(LineError, match="signature does not match"):
        verify(STACK, headers, value)


@given(NAMES, st.binary(max_size=200), st.binary(min_size=1, max_size=20))
def test_a_signature_of_another_value_fails(name, value, extra):
    with pytest.raises(LineError, match="signature does not match"):
        verify(STACK, sign(as_producer(name), value), value + extra)


@pytest.mark.parametrize("headers", [None, [], [(PRODUCER_HEADER, b"llmbatch-submit")],
                                     [(SIGNATURE_HEADER, b"00")]])
def test_an_unsigned_message_fails(headers):
    with pytest.raises(LineError, match="unsigned message"):
        verify(STACK, headers, b"{}")


def test_the_batcher_dead_letters_unsigned_and_forged_messages_before_decoding(make):
    build, written = make
    b = build(lambda rows: None)
    value = raw(message(custom_id="x", priority=6))
    other = load_settings({"LLMBATCH_KAFKA_PRODUCER_KEY": "another-stacks-key"})
    b.add(FakeMsg(value, 0, headers=[]), NOW)
    b.add(FakeMsg(value, 1, headers=sign(other, value)), NOW)
    b.add(FakeMsg(b"not json", 2, headers=[]), NOW)
    b.add(FakeMsg(value, 3), NOW)
    b.flush(b.due(force=True))
    b.dlq.poll()
    reasons = {int(h["origin.offset"]): h["error"].decode() for _, _, h in b.dlq.sent}
    assert reasons[0].startswith("unsigned message") and reasons[2].startswith("unsigned message")
    assert reasons[1] == "signature does not match producer 'llmbatch-submit': not sent with its credentials"
    assert [(r["custom_id"], r["producer"]) for r in written] == [("x", "llmbatch-submit")]


def test_the_batcher_will_not_start_without_the_producer_key(monkeypatch):
    from pipeline.intake import batcher as batcher_mod
    with pytest.raises(ConfigError, match="kafka_producer_key"):
        batcher_mod.Batcher(load_settings({"LLMBATCH_VAR_DIR": "/nonexistent"}), engine=object())
