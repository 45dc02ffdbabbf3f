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
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

ROOT_LOGGER = "llmbatch"
#: packages whose loggers are routed to the root logger's handlers
PACKAGES = (ROOT_LOGGER, "pipeline", "workers", "schedules")
#: the SDKs' HTTP clients log one INFO line per request
CHATTY = ("httpx", "httpx2", "openai", "anthropic")
FIELDS = ("job", "batch", "request", "tier")

# sk-…, sk-ant-…, sk-proj-…: provider key shapes (long enough not to hit ordinary words)
_KEY = re.compile(r"\b(sk-(?:ant-|proj-)?)[A-Za-z0-9_\-]{16,}")


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
        return redact(f"{text} [{ctx}]" if ctx else text)


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
        return redact(json.dumps(out, default=str, ensure_ascii=False))


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
