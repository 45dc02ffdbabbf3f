"""Offline tiktoken provisioning and token counts (no network, no services)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import re
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, UnknownModelError
from pipeline.money import tokens
from pipeline.money.tokens import (
    TokenCount,
    count_chat_tokens,
    count_request,
    count_text_tokens,
    encoding_name_for,
    provision,
)


def _registry_from_source() -> dict[str, tuple[str, str]]:
    """Blob URL and expected_hash per encoding, read independently (regex) from tiktoken."""
    src = Path(importlib.util.find_spec("tiktoken_ext.openai_public").origin).read_text()
    out = {}
    for name in ("o200k_base", "cl100k_base"):
        m = re.search(rf'def {name}\(\):\s+mergeable_ranks = load_tiktoken_bpe\(\s+"([^"]+)",\s+'
                      rf'expected_hash="([0-9a-f]{{64}})"', src)
        assert m, name
        out[name] = (m.group(1), m.group(2))
    return out


REGISTRY = _registry_from_source()


# --------------------------------------------------------------------------- provisioning

def test_provision_writes_files_with_tiktoken_expected_hash(tmp_path):
    paths = provision(tmp_path)
    assert set(paths) == {"o200k_base", "cl100k_base"}
    for name, (url, expected) in REGISTRY.items():
        path = paths[name]
        assert path == tmp_path / hashlib.sha1(url.encode()).hexdigest()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == expected
    # the well-known published values, so a changed registry is noticed
    assert REGISTRY["o200k_base"][1] == "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
    assert REGISTRY["cl100k_base"][1] == "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"


def test_provision_is_idempotent_and_repairs(tmp_path, monkeypatch):
    first = provision(tmp_path)
    stamps = {n: p.stat().st_mtime_ns for n, p in first.items()}
    statuses = [s for _, _, s in tokens._provision(tmp_path)]
    assert statuses == ["ok", "ok"]
    assert {n: p.stat().st_mtime_ns for n, p in provision(tmp_path).items()} == stamps
    # a damaged file is rewritten
    first["cl100k_base"].write_bytes(b"garbage")
    assert dict((n, s) for n, _, s in tokens._provision(tmp_path))["cl100k_base"] == "written"
    assert hashlib.sha256(first["cl100k_base"].read_bytes()).hexdigest() == REGISTRY["cl100k_base"][1]
    assert not list(tmp_path.glob("*.tmp"))


def test_provision_mismatch_raises_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tokens, "_blob_from_bpe_openai", lambda name: b"IQ== 0\n")
    with pytest.raises(ConfigError, match="expected_hash"):
        provision(tmp_path)
    assert not any(tmp_path.iterdir())


def test_cli_provision(tmp_path, capsys):
    assert tokens.main(["provision", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("o200k_base: written ")
    assert tokens.main(["provision", str(tmp_path)]) == 0
    assert all(": ok " in line for line in capsys.readouterr().out.strip().splitlines())
    assert tokens.main(["bogus"]) == 2


def test_loading_sets_cache_dir_from_settings():
    from pipeline.config import get_settings

    enc = tokens.get_encoding("o200k_base")
    assert enc.name == "o200k_base"
    expected = Path(get_settings().var_dir) / "tiktoken"
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(expected)
    assert (expected / hashlib.sha1(REGISTRY["o200k_base"][0].encode()).hexdigest()).is_file()
    with pytest.raises(ConfigError):
        tokens.get_encoding("p50k_base")


# --------------------------------------------------------------------------- encodings by model

@pytest.mark.parametrize("model,expected", [
    ("gpt-4o", "o200k_base"), ("gpt-4o-2024-08-06", "o200k_base"), ("gpt-4o-mini", "o200k_base"),
    ("chatgpt-4o-latest", "o200k_base"), ("gpt-4.1", "o200k_base"), ("gpt-4.1-nano-2025-04-14", "o200k_base"),
    ("o1", "o200k_base"), ("o3-mini", "o200k_base"), ("o4-mini-2025-04-16", "o200k_base"),
    ("gpt-5", "o200k_base"), ("gpt-5-nano", "o200k_base"), ("ft:gpt-4o-mini-2024-07-18:org::abc", "o200k_base"),
    ("gpt-4", "cl100k_base"), ("gpt-4-turbo", "cl100k_base"), ("gpt-4-0613", "cl100k_base"),
    ("gpt-3.5-turbo", "cl100k_base"),
    ("claude-haiku-4-5", None), ("claude-3-5-sonnet-20241022", None), ("omni-model", None), ("llama-3", None),
])
def test_encoding_name_for(model, expected):
    assert encoding_name_for(model) == expected


# --------------------------------------------------------------------------- known counts

COOKBOOK_EXAMPLE = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates "
                                  "corporate jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant",
     "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user",
     "content": "Let's circle back when we have more bandwidth to touch base on opportunities for "
                "increased leverage."},
    {"role": "system", "name": "example_assistant",
     "content": "Let's talk later when we're less busy about how to do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the "
                                "client deliverable."},
]


@pytest.mark.parametrize("model,expected", [
    # the OpenAI cookbook prints these, equal to the prompt_tokens its API call reported
    ("gpt-3.5-turbo", 129), ("gpt-4", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124),
    ("gpt-4.1", 124), ("gpt-5", 124),
])
def test_cookbook_example(model, expected):
    assert count_chat_tokens(COOKBOOK_EXAMPLE, model) == expected


def test_small_known_counts():
    # 3 + 1 ("system") + 6, then 3 + 1 ("user") + 3 ("Hello world!"), plus 3 priming
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello world!"}]
    assert count_chat_tokens(msgs, "gpt-4o") == 20
    assert count_chat_tokens([{"role": "user", "content": ""}], "gpt-4o") == 7
    assert count_chat_tokens([], "gpt-4o") == 3
    assert count_chat_tokens([{"role": "user", "content": "Hello 👋 世界"}], "gpt-4o") == 11
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world!"}]
    assert count_chat_tokens([{"role": "user", "content": parts}], "gpt-4o") == 10
    assert count_text_tokens("tiktoken is great!", "gpt-4") == 6   # the cookbook's example
    assert count_text_tokens("tiktoken is great!", "gpt-4o") == 6
    assert count_text_tokens("", "gpt-4o") == 0
    # special-token text in user content is ordinary text, never an error
    assert count_text_tokens("<|endoftext|>", "gpt-4o") == 7


def test_unknown_model_raises():
    with pytest.raises(UnknownModelError):
        count_text_tokens("hi", "claude-haiku-4-5")
    with pytest.raises(UnknownModelError):
        count_chat_tokens([{"role": "user", "content": "hi"}], "some-model")
    with pytest.raises(UnknownModelError):
        count_request("openai", "not-a-gpt", {"messages": []})
    with pytest.raises(ConfigError):
        count_request("mistral", "x", {"messages": []})


# --------------------------------------------------------------------------- generated corpus

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "review", "product",
         "Übergrößenträger", "naïve", "café", "résumé", "Straße", "façade"]
UNICODE = ["日本語のテキスト", "中文字符测试", "한국어 문장", "Привет, мир", "مرحبا بالعالم", "שלום עולם",
           "ελληνικά", "हिन्दी पाठ", "ภาษาไทย", "Ṫëṡṫ ẅïṫḧ ḋïäċṙïṫïċṡ", "\u200b\u200dzero\u00a0width"]
EMOJI = ["👋", "🎉🎉🎉", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇺🇸🇯🇵", "👍🏽", "🤖💬", "❤️‍🔥", "🧑🏿‍💻"]
CODE = ["def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        '{"key": [1, 2, 3], "nested": {"a": null}}', "SELECT * FROM t WHERE id = $1;",
        "```python\nimport os\nprint(os.getcwd())\n```", "<div class=\"x\">&amp;</div>",
        "\t\tindented\r\n\r\nwindows lines", "x = 1_000_000 + 0xFF - 0b1010  # comment"]
SPECIAL = ["<|endoftext|>", "<|endofprompt|>", "<|im_start|>user", "<|fim_prefix|>"]
ROLES = ["system", "user", "assistant", "developer", "tool", "user", "user", "assistant"]
MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-nano", "o3", "o4-mini", "gpt-5", "gpt-5-nano",
          "gpt-4", "gpt-4-turbo", "gpt-3.5-turbo"]


def _text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.08:
        return ""
    if kind < 0.12:
        return " " * rng.randint(1, 40) + "\n" * rng.randint(0, 5)
    if kind < 0.16:  # long
        return " ".join(rng.choice(WORDS + UNICODE + EMOJI + CODE) for _ in range(rng.randint(300, 1500)))
    pieces = []
    for _ in range(rng.randint(1, 12)):
        pool = rng.choice([WORDS, WORDS, UNICODE, EMOJI, CODE, SPECIAL])
        pieces.append(rng.choice(pool))
    sep = rng.choice([" ", "", "\n", "  ", "\n\n", "\t"])
    text = sep.join(pieces)
    if rng.random() < 0.1:
        text += "".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(1, 30)))
    return text


def _message(rng: random.Random) -> dict:
    msg = {"role": rng.choice(ROLES)}
    if rng.random() < 0.2:
        msg["content"] = [{"type": "text", "text": _text(rng)} for _ in range(rng.randint(1, 4))]
    else:
        msg["content"] = _text(rng)
    if rng.random() < 0.15:
        msg["name"] = rng.choice(["alice", "example_user", "bot_42", "Ünïcode", "x"])
    return msg


def _reference_count(messages: list[dict], model: str) -> int:
    """The cookbook formula, straight from tiktoken.get_encoding (independent of pipeline.money.tokens)."""
    import tiktoken

    name = "cl100k_base" if model.startswith(("gpt-4-", "gpt-3.5")) or model == "gpt-4" else "o200k_base"
    enc = tiktoken.get_encoding(name)
    n = 0
    for message in messages:
        n += 3
        for key, value in message.items():
            if isinstance(value, list):
                value = "".join(p["text"] for p in value)
            n += len(enc.encode(value, disallowed_special=()))
            if key == "name":
                n += 1
    return n + 3


def test_generated_corpus_matches_reference():
    tokens.get_encoding("o200k_base")  # sets TIKTOKEN_CACHE_DIR before the reference uses tiktoken
    tokens.get_encoding("cl100k_base")
    rng = random.Random(20241123)
    checked = 0
    for i in range(1200):
        messages = [_message(rng) for _ in range(rng.randint(0 if i % 50 == 0 else 1, 8))]
        model = MODELS[i % len(MODELS)]
        assert count_chat_tokens(messages, model) == _reference_count(messages, model), (model, messages)
        count = count_request("openai", model, {"model": model, "messages": messages})
        assert count.tokens == _reference_count(messages, model)
        checked += 1
    assert checked == 1200


# --------------------------------------------------------------------------- count_request

def test_count_request_openai_exact():
    body = {"model": "gpt-4o", "messages": COOKBOOK_EXAMPLE}
    assert count_request("openai", "gpt-4o", body) == TokenCount(124, True, "tiktoken:o200k_base")
    assert count_request("openai", "gpt-4", body) == TokenCount(129, True, "tiktoken:cl100k_base")


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                               {"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
])
def test_count_request_openai_not_plain_text_is_not_exact(body):
    count = count_request("openai", "gpt-4o", body)
    assert count.exact is False and count.method == "tiktoken:o200k_base"


def test_count_request_anthropic_is_an_estimate():
    body = {"model": "claude-haiku-4-5", "max_tokens": 100, "system": "Be brief.",
            "messages": [{"role": "user", "content": "Hello world!"}]}
    count = count_request("anthropic", "claude-haiku-4-5", body)
    assert count.exact is False
    assert count.method == "estimate:o200k_base"
    # 3 priming + (5 per message + estimate_claude_text: ceil(1.35 x 3 o200k tokens) + 3) x 2
    assert count.tokens == 3 + (5 + 5 + 3) + (5 + 5 + 3)
    blocks = {"model": "claude-haiku-4-5", "max_tokens": 100,
              "system": [{"type": "text", "text": "Be brief."}],
              "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello world!"}]}]}
    # a text block costs one token more than the same string (its separator), never less
    assert count_request("anthropic", "claude-haiku-4-5", blocks).tokens == count.tokens + 2
    longer = dict(body, messages=body["messages"] + [{"role": "assistant", "content": "Hi! How can I help?"}])
    assert count_request("anthropic", "claude-haiku-4-5", longer).tokens > count.tokens
