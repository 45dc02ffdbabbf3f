"""Logging: one root logger name, plain or JSON lines, correlation fields.

Every module logs with ``logging.getLogger(__name__)`` under ``pipeline``,
``workers`` or ``schedules`` (``ROOT_LOGGER`` = ``llmbatch`` for code outside
a module); every record ends in one handler on the Python root logger. Only the CLI entry point calls
``configure``; library code never adds handlers.

Correlation fields (``job``, ``batch``, ``request``, ``tier``) travel in
``extra=`` or through ``bind(logger, job=…, tier=…)``; a line shows the ones
it has. What must never be logged: API keys and prompt bodies. ``redact``
masks anything shaped like a provider key in the final text as a last line of
defence; the first line is not putting them there.

A record is one line. Its text quotes values from input (custom_ids, job
ids, provider messages), so the formatters escape every control character
(C0, DEL, C1, the Unicode line separators, the bidirectional overrides) in
the final text, exception and stack included: a newline becomes a
backslash and an ``n``. No value can start a line of its own (a forged record
with its own time and level) or send an escape sequence to the terminal of
whoever tails the log. This is done here, once, not at each call site.
"""

from __future__ import annotations

import logging
import re
import sys
import time

from pipeline import jsontext

ROOT_LOGGER = "llmbatch"
#: packages whose loggers are routed to the root logger's handlers
PACKAGES = (ROOT_LOGGER, "pipeline", "workers", "schedules")
#: the SDKs' HTTP clients log one INFO line per request
CHATTY = ("httpx", "httpx2", "openai", "anthropic")
FIELDS = ("job", "batch", "request", "tier")

# sk-…, sk-ant-…, sk-proj-…: provider key shapes (long enough not to hit ordinary words)
_KEY = re.compile(r"\b(sk-(?:ant-|proj-)?)[A-Za-z0-9_\-]{16,}")


#: what a log line must not carry raw: C0 and C1 controls, DEL, line and paragraph separators,
#: bidirectional embeddings, overrides and isolates (they reorder what a reader sees)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(ch: str) -> str:
    code = ord(ch)
    return _NAMED.get(ch) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape_controls(text: str) -> str:
    """``text`` on one line, with no control character: each one written as its escape."""
    return _CONTROL.sub(lambda m: _escaped(m.group()), text)


def _json_escaped(ch: str) -> str:
    return f"\\u{ord(ch):04x}"


def redact(text: str) -> str:
    """Mask provider API keys in ``text``."""
    return _KEY.sub(lambda m: m.group(1) + "***", text)


class _Context(logging.Filter):
    """Adds missing correlation fields as None, so formatters can rely on them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if FIELDS is None:   # interpreter shutdown has cleared this module: a late __del__'s record
            return False
        for f in FIELDS:
            if not hasattr(record, f):
                setattr(record, f, None)
        return True


class PlainFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ctx = " ".join(f"{f}={getattr(record, f)}" for f in FIELDS if getattr(record, f, None))
        return escape_controls(redact(f"{text} [{ctx}]" if ctx else text))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for f in FIELDS:
            value = getattr(record, f, None)
            if value is not None:
                out[f] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        # json escapes C0 itself; DEL, C1 and the separators would pass raw: \\u escapes, valid JSON
        return _CONTROL.sub(lambda m: _json_escaped(m.group()), redact(jsontext.dumps(out, ensure_ascii=False)))


def configure(level: str = "INFO", fmt: str = "plain", stream=None) -> logging.Logger:
    """Install the one handler on the Python root logger (idempotent). CLI entry point only.

    Our packages log at ``level``; libraries (celery, kafka, sqlalchemy) at
    WARNING unless ``level`` is DEBUG. Celery's own loggers keep the level its
    ``--loglevel`` gives them and print through the same handler.
    """
    lvl = getattr(logging, str(level).upper(), logging.INFO)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    handler.addFilter(_Context())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(min(lvl, logging.WARNING) if lvl <= logging.DEBUG else logging.WARNING)
    for name in PACKAGES:
        logging.getLogger(name).setLevel(lvl)
    for name in CHATTY:   # pinned: a Celery worker sets the root logger to its --loglevel
        logging.getLogger(name).setLevel(lvl if lvl <= logging.DEBUG else logging.WARNING)
    return logging.getLogger(ROOT_LOGGER)


def bind(logger: logging.Logger, **fields) -> logging.LoggerAdapter:
    """A logger that adds correlation fields (job, batch, request, tier) to every line."""
    return _Adapter(logger, {k: v for k, v in fields.items() if k in FIELDS})


class _Adapter(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        kwargs["extra"] = {**self.extra, **kwargs.get("extra", {})}
        return msg, kwargs
