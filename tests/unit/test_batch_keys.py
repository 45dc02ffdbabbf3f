"""A provider's Batch API and its kind (pipeline/providers/batch_api.py, keys.py, request.py).

A provider batch goes out on a key chosen the way realtime chooses one (the live key with the
most headroom; a revoked key never), and the batch remembers that key's alias. A provider of kind
``anthropic`` not named "anthropic" is Anthropic's format everywhere: its requests' url, its
Batch API, through the simulator's named providers (``/p/<name>/…``)."""

from __future__ import annotations

import asyncio
import json

import pytest

from pipeline.config import get_settings, load_settings
from pipeline.constants import ANTHROPIC_MESSAGES_URL, CHAT_URL
from pipeline.providers import batch_api
from pipeline.providers.keys import Keys, NoUsableKey, dead_key
from pipeline.providers.registry import KeySpec, build_registry
from pipeline.request import Request
from tests.unit.test_keys import Windows

#: a second Anthropic-kind provider beside the default one, with two keys
CLAUDE_EU = {"kind": "anthropic", "batch": "anthropic",
             "keys": [{"alias": "eu-main", "env": "EU_MAIN", "rpm": 300},
                      {"alias": "eu-spare", "env": "EU_SPARE", "rpm": 150}]}
SIM_KEYS = [{"key": "eu-main-SECRET", "alias": "eu-main"}, {"key": "eu-spare-SECRET", "alias": "eu-spare"}]


@pytest.fixture
def claude_eu(monkeypatch):
    """The process's settings name claude-eu (the registry the pipeline reads is built from them)."""
    def configure(base_url: str = "http://127.0.0.1:9/p/claude-eu"):
        monkeypatch.setenv("LLMBATCH_PROVIDERS", json.dumps({"claude-eu": {**CLAUDE_EU, "base_url": base_url}}))
        monkeypatch.setenv("EU_MAIN", "eu-main-SECRET")
        monkeypatch.setenv("EU_SPARE", "eu-spare-SECRET")
        get_settings.cache_clear()
        return get_settings()
    yield configure
    get_settings.cache_clear()


def test_an_anthropic_kind_provider_of_any_name_gets_the_messages_url(claude_eu):
    claude_eu()
    row = {"job_id": "j", "custom_id": "c", "provider": "claude-eu", "model": "claude-haiku-4-5", "tier": "peak"}
    assert Request.from_row(row).endpoint == ANTHROPIC_MESSAGES_URL
    assert Request.probe("j", "c", "claude-eu", {"model": "claude-haiku-4-5"}, "realtime").endpoint \
        == ANTHROPIC_MESSAGES_URL
    assert Request.from_row({**row, "provider": "openai"}).endpoint == CHAT_URL
