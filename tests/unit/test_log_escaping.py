"""A log record is one line: no value from input can start a line or carry an escape sequence."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest
from hypothesis import given, settings, strategies as st

from pipeline import logs
from pipeline.logs import JsonFormatter, PlainFormatter, configure

CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _record(msg, args, exc=False, **extra) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(*args or ("x",))
        except ValueError as e:
            exc_info = (type(e), e, e.__traceback__)
    record = logging.LogRecord("pipeline.money.budget", logging.WARNING, __file__, 1, msg, args, exc_info)
    for k, v in extra.items():
        setattr(record, k, v)
    return record


@pytest.mark.parametrize("formatter", [PlainFormatter(), JsonFormatter()], ids=["plain", "json"])
@settings(max_examples=300, deadline=None)
@given(args=st.lists(st.text(), max_size=3), request=st.text(), exc=st.booleans())
def test_no_formatted_record_holds_a_control_character(formatter, args, request, exc):
    msg = " ".join(["request %s"] * len(args))
    line = formatter.format(_record(msg, tuple(args), exc=exc, request=request or None, job=None,
                                    batch=None, tier=None))
    assert not CONTROL.search(line), repr(line)
    if isinstance(formatter, JsonFormatter):
        json.loads(line)   # still JSON


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in logs.PACKAGES})
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for n, level in saved[2].items():
        logging.getLogger(n).setLevel(level)


def test_a_forged_record_stays_inside_its_own_line(restore_logging):
    out = io.StringIO()
    log = configure("INFO", "plain", out)
    forged = "a\n2026-12-05 05:40:00,000 CRITICAL pipeline.money.budget FORGED"
    log.warning("request %s failed", forged, extra={"request": "esc\x1b[2J"})
    try:
        raise RuntimeError("cr\rinside")
    except RuntimeError:
        log.exception("boom")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert not any(line.startswith("2026-12-05 05:40:00") for line in lines)
    assert "\\n2026-12-05 05:40:00,000 CRITICAL" in lines[0] and "esc\\x1b[2J" in lines[0]
    assert "cr\\rinside" in lines[1] and "Traceback" in lines[1]


def test_a_table_shows_a_refused_id_without_obeying_it():
    from llmbatch.cli.views import format_table
    table = format_table(["line", "custom_id", "reason"], [[3, "esc\x1b[2J", "x"], [4, "a\nb", "y"]])
    assert not CONTROL.search(table.replace("\n", "")) and len(table.splitlines()) == 5
    assert "esc\\x1b[2J" in table
