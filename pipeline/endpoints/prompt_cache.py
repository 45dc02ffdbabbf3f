"""Prompt-cache placement: mark the prefixes a job's lines share, so that the provider caches them.

A job's lines often share a prefix: the same tools, the same system prompt,
the same leading messages. Providers bill a cached prefix at a fraction of the
input price, but only where asked (Anthropic) or where the request lands on a
machine that holds it (OpenAI). :class:`Placer` sees a job's lines in order
(intake, ``pipeline.intake.producer.submit_file``) and marks them:

- **Anthropic**: a ``cache_control`` breakpoint at the end of the tools, of
  the system prompt and of the leading messages (all but the last), each only
  when that prefix was already seen earlier in the job (the first line of a
  group is sent as it is: a prefix no other line shares would pay a write for
  nothing) and only when its token count reaches the model's minimum
  (:func:`min_cacheable_tokens`): Anthropic silently caches nothing below it,
  so a mark there would buy nothing. The count is a floor (text tokens in
  o200k_base, no framing): a prefix that only an over-estimate puts above the
  minimum is never marked. Inside provider batches the breakpoints take the
  1-hour TTL (a batch runs for longer than 5 minutes), elsewhere the default
  5 minutes. The write is part of the request's maximum cost, since the bound
  (``pipeline.money.bounds``) prices a body with ``cache_control`` at the write
  rate and the body is marked before it is bounded.
- **OpenAI** (chat completions, Responses): caching is automatic from 1,024 tokens; a
  ``prompt_cache_key`` of the shortest shared prefix that reaches the model's minimum
  (tools and the leading system or developer messages, else every message but
  the last) routes the lines of a group to the same cache.

The user's own markers always win: a body with any ``cache_control`` (tools,
system or message blocks) or a ``prompt_cache_key`` is left exactly as it is.

:func:`group_key` names the prefix group of a marked body, so that whoever runs
a batch can run a group together, its first request before the others (a call
reads only what calls finished before it started wrote).
"""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal

from pipeline import jsontext
from pipeline.constants import CHAT_URL, RESPONSES_URL
from pipeline.errors import LLMBatchError
from pipeline.money.pricing import ModelPrice, PriceBook
from pipeline.money.tokens import ESTIMATE_ENCODING, get_encoding

#: prefixes remembered per job; past this, new prefixes are no longer marked (memory stays bounded)
MAX_PREFIXES = 200_000
KEY_PREFIX = "llmbatch-"
_UNMARKABLE = ("thinking", "redacted_thinking")


def min_cacheable_tokens(price: ModelPrice) -> int | None:
    """The model's minimum cacheable prefix, from the price book (``min_cache_tokens``, with its
    source there); None when the book does not know it, and then nothing is marked (a minimum we do
    not know is never guessed: below it the provider caches nothing, silently)."""
    return price.min_cache_tokens


def cached_ratio(price: ModelPrice) -> Decimal:
    """Cached input (Anthropic: cache read) ÷ input: the pricing file's figures."""
    return price.cached_input_per_mtok / price.input_per_mtok if price.input_per_mtok else Decimal(1)


def _list(value) -> list:
    """``value`` if it is a list, else no items: placement reads any body, valid or not, and never
    raises (the line's validation rejects a malformed one with its reason)."""
    return value if isinstance(value, list) else []


def _blocks(content) -> list:
    """Content as a list of blocks: a string is one."""
    return [content] if isinstance(content, str) else _list(content)


def user_marked(body: dict) -> bool:
    """Whether the body carries any placement of the user's own (which always wins)."""
    if body.get("prompt_cache_key") is not None or body.get("cache_control") is not None:
        return True   # the user's key, or Anthropic's automatic caching (a top-level cache_control)
    blocks = _list(body.get("tools")) + _list(body.get("system"))
    for m in _list(body.get("messages")):
        if isinstance(m, dict):
            blocks += _list(m.get("content"))
    return any(isinstance(b, dict) and "cache_control" in b for b in blocks)


# --------------------------------------------------------------------------- counting and keys

def _floor(text: str) -> int:
    """A floor on a text's tokens: o200k_base, which packs text at least as tight as Claude's tokenizer
    and is OpenAI's own for the models that cache."""
    return len(get_encoding(ESTIMATE_ENCODING).encode_ordinary(text)) if text else 0


def _texts(value) -> str:
    """The text of content (a string, or blocks / parts with text), for the floor count."""
    if isinstance(value, str):
        return value
    out = []
    for part in value if isinstance(value, list) else ():
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif isinstance(part, str):
            out.append(part)
    return "\n".join(out)


def _bare(value):
    """Content as the model sees it: a string is one text block, markers are no part of it."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if isinstance(value, list):
        return [{k: v for k, v in b.items() if k != "cache_control"} if isinstance(b, dict) else b for b in value]
    return value


def _digest(h) -> str:
    return h.copy().hexdigest()


def _fingerprint(h) -> bytes:
    """16 bytes: what the placer remembers of a prefix."""
    return h.copy().digest()[:16]


def _feed(h, value) -> None:
    h.update(jsontext.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    h.update(b"\x1e")


# --------------------------------------------------------------------------- Anthropic

def _anthropic_prefixes(body: dict) -> list[tuple[str, bytes, int]]:
    """``(where, fingerprint, floor tokens)`` of each prefix that can end at a breakpoint, in cache order."""
    h = hashlib.sha256(str(body.get("model")).encode())
    floor, out = 0, []
    tools = _list(body.get("tools"))
    system = body.get("system")
    messages = _list(body.get("messages"))
    if not all(isinstance(t, dict) for t in tools) or not isinstance(system, (str, list, type(None))) \
            or not all(isinstance(m, dict) for m in messages):
        return []
    if tools:
        for tool in tools:
            _feed(h, {k: v for k, v in tool.items() if k != "cache_control"})
            floor += _floor(json.dumps(tool, ensure_ascii=False))
        out.append(("tools", _fingerprint(h), floor))
    if system:
        _feed(h, ["system", _bare(system)])
        floor += _floor(_texts(system))
        out.append(("system", _fingerprint(h), floor))
    if len(messages) > 1:
        for m in messages[:-1]:
            _feed(h, [m.get("role"), _bare(m.get("content"))])
            floor += _floor(_texts(m.get("content")))
        out.append(("messages", _fingerprint(h), floor))
    return out


def _marked_block(block, cc: dict):
    if isinstance(block, str):
        return {"type": "text", "text": block, "cache_control": cc}
    if isinstance(block, dict) and block.get("type") not in _UNMARKABLE:
        return {**block, "cache_control": cc}
    return None


def _mark(body: dict, where: str, cc: dict) -> dict | None:
    """``body`` with a breakpoint at the end of ``where``, or None where no block can carry one."""
    if where == "tools":
        tools = list(body["tools"])
        tools[-1] = {**tools[-1], "cache_control": cc}
        return {**body, "tools": tools}
    if where == "system":
        system = body["system"]
        blocks = [system] if isinstance(system, str) else list(system)
        last = _marked_block(blocks[-1], cc) if blocks else None
        return None if last is None else {**body, "system": blocks[:-1] + [last]}
    messages = list(body["messages"])
    lead = messages[-2]
    blocks = _blocks(lead.get("content"))
    last = _marked_block(blocks[-1], cc) if blocks else None
    if last is None:
        return None
    messages[-2] = {**lead, "content": blocks[:-1] + [last]}
    return {**body, "messages": messages}


# --------------------------------------------------------------------------- OpenAI

def _openai_key(body: dict, minimum: int) -> str | None:
    """The ``prompt_cache_key`` of a chat body: of the shortest shared prefix that reaches ``minimum``
    tokens (tools and the leading system or developer messages, else every message but the last)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or len(messages) < 2 or not all(isinstance(m, dict) for m in messages):
        return None
    h = hashlib.sha256(str(body.get("model")).encode())
    fns = [body.get("tools"), body.get("functions")]
    _feed(h, fns + [body.get("response_format")])
    floor = _floor(json.dumps(fns, ensure_ascii=False)) if any(fns) else 0
    run = 0
    while run < len(messages) - 1 and messages[run].get("role") in ("system", "developer"):
        run += 1
    done = 0
    for end in sorted({b for b in (run, len(messages) - 1) if b > 0}):
        for m in messages[done:end]:
            _feed(h, [m.get("role"), m.get("name"), m.get("content")])
            floor += _floor(_texts(m.get("content")))
        done = end
        if floor >= minimum:
            return KEY_PREFIX + _digest(h)[:32]
    return None


def _responses_view(body: dict) -> dict:
    """A Responses body as the chat messages it amounts to (instructions first), for its key."""
    value = body.get("input")
    items = value if isinstance(value, list) else [{"role": "user", "content": value}]
    lead = [{"role": "developer", "content": body["instructions"]}] if isinstance(body.get("instructions"), str) else []
    return {"model": body.get("model"), "tools": body.get("tools"),
            "messages": lead + [i if isinstance(i, dict) else {"content": i} for i in items]}


# --------------------------------------------------------------------------- the job's placer

class Placer:
    """Placement for one job: remembers the prefixes its lines have shown so far."""

    def __init__(self, *, provider_batch: bool = False, max_prefixes: int = MAX_PREFIXES):
        self.ttl = "1h" if provider_batch else None
        self.seen: set[bytes] = set()
        self.max_prefixes = max_prefixes
        self.marked = 0

    def place(self, body: dict, price: ModelPrice, url: str | None = None) -> dict:
        """The body to send: ``body`` with our markers, or ``body`` itself (user markers, nothing shared,
        nothing long enough, an endpoint without prompt caching)."""
        if not isinstance(body, dict) or user_marked(body):
            return body
        minimum = min_cacheable_tokens(price)
        if minimum is None:   # the price book does not say the model caches from a length: no marks
            out = body
        elif price.kind == "anthropic":
            out = self._anthropic(body, price, minimum)
        elif url in (None, CHAT_URL, RESPONSES_URL):
            key = _openai_key(body if url != RESPONSES_URL else _responses_view(body), minimum)
            out = body if key is None else {**body, "prompt_cache_key": key}
        else:
            out = body
        if out is not body:
            self.marked += 1
        return out

    def place_line(self, obj: dict, prices: PriceBook) -> dict:
        """A submitted line (either format) with its body placed; a line that cannot be read as one
        is returned as it is (the line's validation says what is wrong with it)."""
        field, url = ("params", None) if "params" in obj and "body" not in obj else ("body", obj.get("url"))
        body = obj.get(field)
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return obj
        try:
            price = prices.resolve(body["model"])
        except LLMBatchError:
            return obj
        if (price.kind == "anthropic") != (field == "params"):
            return obj
        placed = self.place(body, price, url)
        return obj if placed is body else {**obj, field: placed}

    def _anthropic(self, body: dict, price: ModelPrice, minimum: int) -> dict:
        cc = {"type": "ephemeral", **({"ttl": self.ttl} if self.ttl else {})}
        out = body
        for where, fp, floor in _anthropic_prefixes(body):
            if fp in self.seen and floor >= minimum:
                out = _mark(out, where, cc) or out
            elif len(self.seen) < self.max_prefixes:
                self.seen.add(fp)
        return out


def group_key(body: dict) -> str | None:
    """The prefix group of a body that asks for caching: its ``prompt_cache_key``, or the content up to
    its first ``cache_control`` breakpoint; None for a body that asks for none."""
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("prompt_cache_key"), str):
        return body["prompt_cache_key"]
    pieces = [("tool", t) for t in _list(body.get("tools"))]
    pieces += [("system", b) for b in _blocks(body.get("system"))]
    for m in _list(body.get("messages")):
        if isinstance(m, dict):
            pieces += [(m.get("role"), b) for b in _blocks(m.get("content"))]
    # nearly every body of a bulk job has no breakpoint: find that out before hashing its prompt
    if not any(isinstance(piece, dict) and "cache_control" in piece for _, piece in pieces):
        return None
    h = hashlib.sha256(str(body.get("model")).encode())
    for kind, piece in pieces:
        _feed(h, [kind, _bare([piece])])
        if isinstance(piece, dict) and "cache_control" in piece:
            return "cc-" + _digest(h)[:32]
    return None


def in_groups(items: list, body_of=lambda item: item) -> list:
    """``items`` with each prefix group together, where its first member stood (a stable order: a
    provider batch's lines of one group run one after the other, each reading what the first wrote)."""
    first: dict[str, int] = {}
    keyed = []
    for i, item in enumerate(items):
        group = group_key(body_of(item))
        keyed.append(((first.setdefault(group, i) if group is not None else i), i, item))
    return [item for _, _, item in sorted(keyed, key=lambda k: (k[0], k[1]))]
