"""Terminal output: tables, the status screen, plain watch lines, --since, logs, metrics hook."""

from __future__ import annotations

import importlib
import io
import json
import logging
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from click.testing import CliRunner

from pipeline import logs, metrics
from llmbatch.cli import views
from llmbatch.cli import main
from llmbatch.cli.doctor import Check, exit_code, render


def status(**over):
    st = {"job_id": "job_x", "status": "running", "provider": "simulator",
          "counts": {"total": 10, "accepted": 9, "rejected": 1, "succeeded": 4, "failed": 1, "cancelled": 0,
                     "pending": 4},
          "cost_usd": "0.0100", "budget_usd": "1.00", "rate_per_s": 2.0, "eta_s": 2,
          "by_tier": {"peak": {"queued": 1, "held": 0, "running": 3, "deferred": 0, "done": 4, "failed": 1,
                               "cancelled": 0, "cost_usd": "0.0100"}}}
    st.update(over)
    return st


def test_table_is_aligned_like_psql():
    text = views.format_table(["name", "n"], [["a", 1], ["bbb", 100]])
    lines = text.splitlines()
    assert lines[0] == "name |  n"
    assert lines[1] == "-----+----"
    assert lines[2] == "a    |   1" and lines[3] == "bbb  | 100"
    assert lines[-1] == "(2 rows)"


def test_status_screen_shows_tiers_budget_rate_eta():
    text = views.format_status(status())
    assert "spend $0.01 of $1 budget" in text and "rate 2.0 req/s" in text and "ETA 2s" in text
    header = text.splitlines()[4]
    for state in views.STATES:
        assert state in header
    assert "peak" in text.splitlines()[6]


def test_status_shows_unconfirmed_spend_apart_from_confirmed():
    """Calls that got no answer may have been billed: their maximum is spend, shown on its own."""
    text = views.format_status(status(unconfirmed_usd="0.0012", unconfirmed_calls=2))
    assert "spend $0.01 of $1 budget" in text
    assert "unconfirmed spend $0.0012: 2 calls got no answer" in text
    assert "unconfirmed" not in views.format_status(status(unconfirmed_usd="0", unconfirmed_calls=0))
    assert "spend=$0.01+0.0012 unconfirmed/1" in views.status_line(status(unconfirmed_usd="0.0012",
                                                                         unconfirmed_calls=2))


def test_status_shows_each_path_with_its_cost_against_list_and_a_reason():
    paths = [{"path": "provider_batch", "requests": 8, "succeeded": 8, "cost_usd": "0.004", "list_cost_usd": "0.008",
              "reason": "auto: provider_batch, 0.50× list price, expected 2026-12-06T13:00+00:00, meets its no"
                        " deadline (24 h)"},
             {"path": "realtime", "requests": 1, "succeeded": 1, "cost_usd": "0.001", "list_cost_usd": "0.001",
              "reason": "the job's mode realtime"}]
    text = views.format_status(status(paths=paths))
    assert "path provider_batch: 8 requests, $0.004 of $0.008 list  (auto: provider_batch, 0.50× list price" in text
    assert "path realtime: 1 requests, $0.001 of $0.001 list  (the job's mode realtime)" in text


def test_watch_prints_plain_lines_when_not_a_terminal(monkeypatch):
    seq = iter([status(), status(status="completed", eta_s=0)])
    monkeypatch.setattr(views, "job_view", lambda conn, job_id: next(seq))

    class Engine:
        def connect(self):
            import contextlib
            return contextlib.nullcontext(None)
    out = io.StringIO()
    last = views.watch(Engine(), "job_x", interval=0, out=out, tty=False)
    lines = out.getvalue().splitlines()
    assert last["status"] == "completed" and len(lines) == 2
    assert "\x1b" not in out.getvalue()
    assert "done=4/9" in lines[0] and "peak[q1 h0 r3 d0 ok4 x1]" in lines[0] and "eta=2s" in lines[0]
    assert "eta=-" in lines[1]


def test_parse_since():
    now = datetime(2026, 1, 2, 12, tzinfo=timezone.utc)
    assert views.parse_since("6h", now) == now - timedelta(hours=6)
    assert views.parse_since("7d", now) == now - timedelta(days=7)
    assert views.parse_since("2026-01-01", now) == datetime(2026, 1, 1, tzinfo=timezone.utc)
    with pytest.raises(ValueError):
        views.parse_since("yesterday", now)


def test_exit_codes_are_documented_and_bad_usage_exits_2():
    cli = importlib.import_module("llmbatch.cli.main")
    for code in ("* 0", "* 1", "* 2", "* 3", "* 130"):
        assert code in cli.__doc__
    result = CliRunner().invoke(main, ["jobs", "--since", "yesterday"])
    assert result.exit_code == 2
    result = CliRunner().invoke(main, ["sql"])
    assert result.exit_code == 2


def test_every_read_command_takes_json():
    for name in ("status", "jobs", "sql", "doctor", "report"):
        opts = {o for p in main.commands[name].params for o in getattr(p, "opts", [])}
        assert "--json" in opts, name


def test_doctor_exit_codes_and_fixes():
    ok = Check("redis", True, "ok")
    down = Check("kafka", False, "refused", "make up")
    setup = Check("tokenizer files", False, "missing", "python -m pipeline.money.tokens provision", kind="setup")
    warn = Check("flower", False, "down", "make up", required=False)
    assert exit_code([ok, warn]) == 0
    assert exit_code([ok, setup]) == 1
    assert exit_code([down, setup]) == 3
    text = render([ok, down])
    assert "FAIL kafka" in text and "fix: make up" in text


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in logs.PACKAGES})
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for n, level in saved[2].items():
        logging.getLogger(n).setLevel(level)


def test_json_logs_carry_correlation_fields_and_hide_keys(restore_logging):
    stream = io.StringIO()
    logs.configure("INFO", "json", stream=stream)
    log = logs.bind(logging.getLogger("pipeline.test"), job="job_1", tier="peak")
    log.info("calling with key %s", "sk-proj-" + "A" * 40, extra={"batch": "b_1"})
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert line["job"] == "job_1" and line["tier"] == "peak" and line["batch"] == "b_1"
    assert "A" * 40 not in line["message"] and "sk-proj-***" in line["message"]


def test_record_outcomes_counts_requests_tokens_cost_retries_429s():
    metrics.set_tier("peak")

    def value(name, **labels):
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0
    before = (value("llmbatch_requests_total", tier="peak", model="m-test", status="succeeded"),
              value("llmbatch_provider_429_total", tier="peak"), value("llmbatch_retries_total", tier="peak"))
    metrics.record_outcomes(
        [{"model": "m-test", "status": "succeeded", "input_tokens": 10, "cached_input_tokens": 4,
          "output_tokens": 5, "cost_usd": "0.5", "latency_ms": 200, "response": {}},
         {"model": "m-test", "status": "failed", "cost_usd": "0", "response": None}],
        [{"attempt": 1, "status_code": 429}, {"attempt": 2, "status_code": 200}])
    assert value("llmbatch_requests_total", tier="peak", model="m-test", status="succeeded") == before[0] + 1
    assert value("llmbatch_tokens_total", tier="peak", model="m-test", kind="cached") >= 4
    assert value("llmbatch_cost_usd_total", tier="peak", model="m-test") >= 0.5
    assert value("llmbatch_provider_429_total", tier="peak") == before[1] + 1
    assert value("llmbatch_retries_total", tier="peak") == before[2] + 1
    assert value("llmbatch_provider_latency_seconds_count", tier="peak", model="m-test") >= 1
    metrics.record_outcomes([{"model": None, "cost_usd": "not a number"}], [])   # never raises
