"""Token counting, offline.

tiktoken downloads its encoding files on first use and these machines have no
internet. The ``bpe-openai`` package embeds the ``o200k_base`` and
``cl100k_base`` vocabularies; written out in tiktoken's file format
(``base64(token) rank`` per line, ordered by rank) they reproduce tiktoken's
published files byte for byte. :func:`provision` writes them into a cache
directory under the names tiktoken looks for (sha1 of the blob URL) and checks
them against the ``expected_hash`` in tiktoken's own registry; tiktoken then
loads them from ``TIKTOKEN_CACHE_DIR`` with its own hash check.

This module is the one place that sets ``TIKTOKEN_CACHE_DIR``; the settings
decide the directory (``var_dir / "tiktoken"``). Nothing here falls back to a
guess: an encoding that cannot be loaded raises :class:`ConfigError`, a model
with no known encoding raises :class:`UnknownModelError`, and a count that is
an estimate says so (:class:`TokenCount` ``exact=False``).

Command line (used by ``make setup``)::

    python -m pipeline.money.tokens provision [DIR]
"""

from __future__ import annotations

import ast
import base64
import functools
import hashlib
import importlib.util
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError, UnknownModelError

#: Encodings this module provisions and loads.
ENCODINGS = ("o200k_base", "cl100k_base")

# OpenAI cookbook "How to count tokens with tiktoken" (num_tokens_from_messages),
# for every model since gpt-3.5-turbo-0613 / gpt-4-0613, gpt-4o and later.
TOKENS_PER_MESSAGE = 3   # <|start|>{role/name}\n{content}<|end|>\n
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3        # every reply is primed with <|start|>assistant<|message|>

# Anthropic estimate: see estimate_claude_text.
ESTIMATE_ENCODING = "o200k_base"

_lock = threading.Lock()


# --------------------------------------------------------------------------- provisioning

@functools.cache
def _registry() -> dict[str, tuple[str, str]]:
    """``{encoding: (blob_url, expected_sha256)}`` read from tiktoken's own registry.

    The registry module (``tiktoken_ext.openai_public``) is parsed, not executed
    function by function, so nothing here can trigger a download.
    """
    spec = importlib.util.find_spec("tiktoken_ext.openai_public")
    if spec is None or not spec.origin:
        raise ConfigError("tiktoken is not installed (tiktoken_ext.openai_public not found)")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    found: dict[str, tuple[str, str]] = {}
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef) or fn.name not in ENCODINGS:
            continue
        for node in ast.walk(fn):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "load_tiktoken_bpe" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                kw = {k.arg: k.value for k in node.keywords}
                h = kw.get("expected_hash")
                if isinstance(h, ast.Constant) and isinstance(h.value, str):
                    found[fn.name] = (node.args[0].value, h.value)
    missing = [n for n in ENCODINGS if n not in found]
    if missing:
        raise ConfigError(
            f"cannot read the blob URL and expected_hash of {', '.join(missing)} "
            f"from tiktoken's registry ({spec.origin}); tiktoken version not supported")
    return found


def cache_file_name(blob_url: str) -> str:
    """The file name tiktoken's ``read_file_cached`` uses for a blob URL."""
    return hashlib.sha1(blob_url.encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _blob_from_bpe_openai(name: str) -> bytes:
    """The encoding file in tiktoken's format, built from bpe-openai's embedded ranks.

    bpe-openai ships each vocabulary as ``bpe_openai/data/<name>.tiktoken.gz``
    (``base64(token) rank`` lines). The file is read directly: importing
    ``bpe_openai`` decodes all its vocabularies and keeps them in memory.
    """
    import gzip

    # located without importing bpe_openai: importing it decodes every vocabulary eagerly
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("bpe-openai is not installed; it supplies the tokenizer vocabularies")
    data = Path(list(spec.submodule_search_locations)[0]) / "data" / f"{name}.tiktoken.gz"
    try:
        raw = data.read_bytes()
    except OSError as e:
        raise ConfigError(f"bpe-openai has no {name} vocabulary ({data}): {e}") from e
    ranks: list[tuple[int, bytes]] = []
    for line in gzip.decompress(raw).splitlines():
        if line.strip():
            token_b64, rank = line.split()
            ranks.append((int(rank), base64.b64decode(token_b64)))
    ranks.sort()
    return b"".join(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n" for rank, tok in ranks)


def _provision(cache_dir: Path, names: tuple[str, ...] = ENCODINGS) -> list[tuple[str, Path, str]]:
    """Provision encodings; returns ``(name, path, "ok" | "written")`` per file."""
    cache_dir = Path(cache_dir)
    out: list[tuple[str, Path, str]] = []
    with _lock:
        for name in names:
            url, expected = _registry()[name]
            path = cache_dir / cache_file_name(url)
            if path.is_file() and _sha256_file(path) == expected:
                out.append((name, path, "ok"))
                continue
            blob = _blob_from_bpe_openai(name)
            actual = hashlib.sha256(blob).hexdigest()
            if actual != expected:
                raise ConfigError(
                    f"{name}: the vocabulary from bpe-openai does not match tiktoken's "
                    f"expected_hash (sha256 {actual}, expected {expected}); the installed "
                    f"bpe-openai and tiktoken disagree, so token counts would be wrong")
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                tmp.write_bytes(blob)
                os.replace(tmp, path)
            except OSError as e:
                raise ConfigError(f"cannot write tiktoken cache file {path}: {e}") from e
            out.append((name, path, "written"))
    return out


def provision(cache_dir: Path) -> dict[str, Path]:
    """Write ``o200k_base`` and ``cl100k_base`` into ``cache_dir`` for tiktoken.

    Files are named as tiktoken looks for them (sha1 of the blob URL) and
    verified against the sha256 ``expected_hash`` in tiktoken's registry.
    Idempotent: a file already present and valid is left alone; an invalid one
    is rewritten. Raises :class:`ConfigError` on a hash mismatch.
    """
    return {name: path for name, path, _ in _provision(cache_dir)}


def default_cache_dir() -> Path:
    from pipeline.config import get_settings

    return Path(get_settings().var_dir) / "tiktoken"


# --------------------------------------------------------------------------- loading

@functools.cache
def get_encoding(name: str):
    """A tiktoken ``Encoding``, loaded offline from the provisioned cache directory."""
    if name not in ENCODINGS:
        raise ConfigError(f"encoding {name!r} is not provisioned; known: {', '.join(ENCODINGS)}")
    import tiktoken

    cache_dir = default_cache_dir()
    _provision(cache_dir, (name,))  # local and idempotent: files missing or damaged are (re)written
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # any failure here means we cannot count: say so
        raise ConfigError(f"tiktoken cannot load {name} from {cache_dir}: {e}") from e


_O200K_PREFIXES = ("gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5")
_O_SERIES = re.compile(r"^o\d+(?:-|$)")
_CL100K_PREFIXES = ("gpt-4-", "gpt-3.5", "text-embedding-3-", "text-embedding-ada-002")
#: the legacy completions base models (tiktoken's own model map names cl100k_base for them)
_CL100K_MODELS = ("gpt-4", "davinci-002", "babbage-002")


@functools.lru_cache(maxsize=1024)
def encoding_name_for(model: str) -> str | None:
    """The tiktoken encoding of an OpenAI model, or None for a model we have none for.

    o200k_base: gpt-4o*, chatgpt-4o*, gpt-4.1*, gpt-4.5*, o1/o3/o4*, gpt-5*.
    cl100k_base: gpt-4, gpt-4-* (turbo, 32k, dated), gpt-3.5* (gpt-3.5-turbo-instruct too),
    text-embedding-3-*, text-embedding-ada-002, davinci-002, babbage-002.
    Fine-tuned ids (``ft:gpt-4o-mini:org::id``) use their base model's encoding.
    Claude and every other model: None.
    """
    m = model.strip().lower()
    if m.startswith("ft:"):
        m = m[3:].split(":", 1)[0]
    if m.startswith(_O200K_PREFIXES) or _O_SERIES.match(m):
        return "o200k_base"
    if m in _CL100K_MODELS or m.startswith(_CL100K_PREFIXES):
        return "cl100k_base"
    return None


@functools.lru_cache(maxsize=1024)
def _encoder_for(model: str):
    """``encode_ordinary`` of the model's encoding (cached per model id)."""
    name = encoding_name_for(model)
    if name is None:
        raise UnknownModelError(
            f"no tiktoken encoding known for model {model!r} "
            f"(exact counts exist for OpenAI models only)")
    return get_encoding(name).encode_ordinary


def _content_text(content) -> str:
    """Text of a message content: a string, or the text parts of a list, joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and p.get("type") in ("text", "input_text"))
    return str(content)


def count_text_tokens(text: str, model: str) -> int:
    """Tokens of plain text for an OpenAI model (special-token text counts as ordinary text)."""
    return len(_encoder_for(model)(text))


def count_chat_tokens(messages: list[dict], model: str) -> int:
    """Prompt tokens of an OpenAI chat request, as OpenAI bills them for plain text.

    The OpenAI cookbook formula ("How to count tokens with tiktoken"): 3 tokens
    per message, plus the tokens of every value in it (role, content, name),
    plus 1 per ``name``, plus 3 priming the reply. A content list counts its
    text parts, concatenated. Images, audio, tool calls and tool definitions
    are not counted; :func:`count_request` marks such bodies ``exact=False``.
    """
    enc = _encoder_for(model)
    n = REPLY_PRIMING
    for msg in messages:
        n += TOKENS_PER_MESSAGE
        for key, value in msg.items():
            if key == "content":
                if value.__class__ is str:
                    n += len(enc(value))
                else:
                    n += len(enc(_content_text(value)))
            elif key == "role":
                n += _role_tokens(enc, value)
            elif value.__class__ is str:
                n += len(enc(value))
                if key == "name":
                    n += TOKENS_PER_NAME
    return n


_ROLE_TOKENS: dict[tuple[int, str], int] = {}


def _role_tokens(enc, role: str) -> int:
    key = (id(enc), role)
    n = _ROLE_TOKENS.get(key)
    if n is None:
        n = _ROLE_TOKENS[key] = len(enc(role))
    return n


# --------------------------------------------------------------------------- requests

@dataclass(frozen=True)
class TokenCount:
    """Input tokens of a request. ``exact`` is False for anything but an exact count."""

    tokens: int
    exact: bool
    method: str


_OPENAI_NON_TEXT_KEYS = ("tools", "functions", "response_format", "audio", "prediction")


def _openai_is_plain_text(body: dict) -> bool:
    if any(body.get(k) for k in _OPENAI_NON_TEXT_KEYS):
        return False
    for msg in body.get("messages") or ():
        if msg.get("tool_calls") or msg.get("function_call") or msg.get("audio"):
            return False
        content = msg.get("content")
        if isinstance(content, list):
            texts = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content) or len(texts) > 1:
                return False  # non-text parts, or several text parts (joining is unverified)
        elif content is not None and not isinstance(content, str):
            return False
    return True


#: Claude estimate margin: ``ceil(o200k × NUM / DEN)``, plus, for every non-ASCII
#: character, its UTF-8 length less one, plus a constant per text (see estimate_claude_text)
CLAUDE_MARGIN_NUM, CLAUDE_MARGIN_DEN = 135, 100
CLAUDE_TEXT_OVERHEAD = 3


def estimate_claude_text(text: str) -> int:
    """An upper estimate of the Claude tokens of ``text`` (Claude's tokenizer is not public).

    ``ceil(1.35 × o200k_base tokens) + Σ (UTF-8 bytes − 1) over non-ASCII
    characters + 3``. Why this shape: Claude's tokenizer makes more tokens than
    OpenAI's on English (public comparisons put it at roughly 10–30 % more), so
    35 % on the o200k count covers ASCII text; o200k packs non-Latin scripts and
    emoji far tighter than older byte-level vocabularies (a Hindi or emoji run
    can take 2–3 × the tokens elsewhere), so every non-ASCII character adds its
    extra bytes, the most a byte-level BPE can spend on it. The margin is checked
    by a property test (tests/unit/test_bounds_property.py) against the
    simulator's own, independent Claude-like count; against Claude itself it is
    an estimate: the exact count is the count_tokens endpoint's (used when an
    Anthropic key is set).
    """
    if not text:
        return 0
    base = len(get_encoding(ESTIMATE_ENCODING).encode_ordinary(text))
    extra = 0 if text.isascii() else sum(len(ch.encode("utf-8")) - 1 for ch in text if ord(ch) > 127)
    return -(-base * CLAUDE_MARGIN_NUM // CLAUDE_MARGIN_DEN) + extra + CLAUDE_TEXT_OVERHEAD


def estimate_anthropic_tokens(body: dict) -> int:
    """An upper estimate of an Anthropic messages request's input tokens: the bound of
    :func:`pipeline.money.bounds.request_bound` (text, images, tools and their system prompt)."""
    from pipeline.money import bounds   # bounds builds on this module

    return bounds.anthropic_input_tokens(body)


def count_request(kind: str, model: str, body: dict) -> TokenCount:
    """Input tokens of a request body in the API shape ``kind`` (a registry kind, ``"openai"`` or
    ``"anthropic"``: a provider of either kind may have any name).

    * OpenAI chat completions: the exact count of :func:`count_chat_tokens`
      (method ``"tiktoken:<encoding>"``). ``exact`` is False when the body
      carries things the formula does not cover (tools, images, audio, tool
      calls, several text parts in one message).
    * Anthropic messages: an **upper estimate**, ``exact=False``, method
      ``"estimate:o200k_base"``: :func:`estimate_claude_text` of every text,
      images, tools and tool-use blocks as :mod:`pipeline.money.bounds` bounds them.
      Claude's tokenizer is not public; the exact count comes from Anthropic's
      ``/v1/messages/count_tokens`` endpoint when an API key is set.
    """
    if kind == "openai":
        name = encoding_name_for(model)
        if name is None:
            raise UnknownModelError(f"no tiktoken encoding known for OpenAI model {model!r}")
        tokens = count_chat_tokens(body.get("messages") or [], model)
        return TokenCount(tokens, _openai_is_plain_text(body), f"tiktoken:{name}")
    if kind == "anthropic":
        return TokenCount(estimate_anthropic_tokens(body), False, f"estimate:{ESTIMATE_ENCODING}")
    raise ConfigError(f"unknown provider kind {kind!r}")


# --------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "provision" or len(argv) > 2:
        print("usage: python -m pipeline.money.tokens provision [DIR]", file=sys.stderr)
        return 2
    cache_dir = Path(argv[1]) if len(argv) == 2 else default_cache_dir()
    try:
        results = _provision(cache_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, path, status in results:
        print(f"{name}: {status} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
