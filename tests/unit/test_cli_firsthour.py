"""The first hour (issue 15), the parts that need no services: what is held and until when,
the wait output, whole-file mistakes, rejection reasons, money, option validation."""

from __future__ import annotations

import io
import json
import types
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from click.testing import CliRunner

from llmbatch.cli import main, views
from pipeline.config import load_settings
from pipeline.errors import FileInputError
from pipeline.intake.producer import SubmitReport, check_file


def status(**over):
    st = {"job_id": "job_x", "status": "running", "provider": "simulator",
          "counts": {"total": 600, "accepted": 600, "rejected": 0, "succeeded": 93, "failed": 0,
                     "cancelled": 0, "pending": 507},
          "cost_usd": "0E-8", "budget_usd": None, "rate_per_s": 0.0, "eta_s": None,
          "by_tier": {"offpeak": {"queued": 0, "held": 507, "running": 0, "deferred": 0, "done": 93,
                                  "failed": 0, "cancelled": 0, "cost_usd": "0"}},
          "held": []}
    st.update(over)
    return st


class Engine:
    """Enough of an engine for ``db.transaction``: the views under test are monkeypatched."""

    def connect(self):
        import contextlib

        class Conn(contextlib.nullcontext):
            dialect = types.SimpleNamespace(do_ping=lambda dbapi_connection: True)   # alive when pinged
            connection = types.SimpleNamespace(dbapi_connection=None)

            def begin(self):
                return contextlib.nullcontext()
        return Conn(None)


# ------------------------------------------------------------------ held work, until when

def test_held_offpeak_work_says_when_the_window_opens():
    settings = load_settings({})
    now = datetime(2026, 12, 1, 20, 8, tzinfo=timezone.utc)
    held = views.held_work(None, {"offpeak": 507}, settings=settings, now=now, scheduler=True)
    assert held[0]["text"] == "507 off-peak, window opens 22:00 UTC, in 1 h 52 m"
    assert held[0]["opens_at"] == "2026-12-01T22:00:00+00:00" and held[0]["in_s"] == 6720


def test_held_work_follows_the_window_settings_and_says_when_no_scheduler_runs():
    settings = load_settings({"LLMBATCH_OFFPEAK_OPEN_CRON": "30 1 * * *", "LLMBATCH_OFFPEAK_CLOSE_CRON": "0 5 * * *"})
    now = datetime(2026, 12, 1, 23, 0, tzinfo=timezone.utc)
    held = views.held_work(None, {"offpeak": 3, "background": 2}, settings=settings, now=now, scheduler=False)
    assert held[0]["text"].startswith("3 off-peak, window opens 01:30 UTC, in 2 h 30 m")
    assert "no scheduler is running" in held[0]["text"] and "llmbatch up scheduler" in held[0]["text"]
    assert held[1]["tier"] == "background" and "idle" in held[1]["text"]


def test_held_work_inside_the_open_window_says_it_is_being_released():
    settings = load_settings({})
    now = datetime(2026, 12, 1, 23, 0, tzinfo=timezone.utc)
    held = views.held_work(None, {"offpeak": 5}, settings=settings, now=now, scheduler=True)
    assert "window open until 06:00 UTC" in held[0]["text"]


def test_nothing_held_nothing_said():
    assert views.held_work(None, {"offpeak": 0, "peak": 4}, settings=load_settings({}), scheduler=True) == []


def test_status_leaves_held_work_out_of_the_eta_and_says_until_when():
    held = [{"tier": "offpeak", "requests": 507, "opens_at": "x", "in_s": 6720,
             "text": "507 off-peak, window opens 22:00 UTC, in 1 h 52 m"}]
    text = views.format_status(status(held=held))
    assert "ETA - (only held work left)" in text
    assert "held: 507 off-peak, window opens 22:00 UTC, in 1 h 52 m" in text
    assert "ETA 4s" not in text and "0E-8" not in text and "spend $0 " in text


def test_wait_prints_one_line_per_change_when_not_a_terminal(monkeypatch):
    held = [{"tier": "offpeak", "requests": 507, "opens_at": "o", "in_s": 1,
             "text": "507 off-peak, window opens 22:00 UTC, in 1 h 52 m"}]
    same = status(held=held)
    done = status(status="completed", held=[],
                  counts=dict(same["counts"], succeeded=600, pending=0))
    seq = iter([same, same, same, done])
    monkeypatch.setattr(views, "job_view", lambda conn, job_id: next(seq))

    out = io.StringIO()
    last = views.follow(Engine(), "job_x", interval=0, out=out, tty=False)
    lines = out.getvalue().splitlines()
    assert last["status"] == "completed"
    assert len(lines) == 2, lines   # three identical polls make one line
    assert "held: 507 off-peak, window opens 22:00 UTC, in 1 h 52 m" in lines[0]
    assert "\r" not in out.getvalue()


def test_wait_redraws_one_line_on_a_terminal(monkeypatch):
    seq = iter([status(), status(status="completed")])
    monkeypatch.setattr(views, "job_view", lambda conn, job_id: next(seq))

    out = io.StringIO()
    views.follow(Engine(), "job_x", interval=0, out=out, tty=True)
    assert out.getvalue().count("\r") == 2 and out.getvalue().endswith("\n")


@pytest.mark.parametrize("seconds,text", [(0, "0 s"), (59, "59 s"), (60, "1 m"), (61, "2 m"),
                                          (6720, "1 h 52 m"), (90000, "1 d 1 h 0 m")])
def test_human_duration(seconds, text):
    assert views.human_duration(seconds) == text


def test_readme_first_example_runs_at_once_and_the_window_is_documented():
    from pathlib import Path

    from pipeline.intake.tiers import classify
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    first = next(line for line in readme.splitlines() if "llmbatch submit " in line).replace(")", " ")
    prio = int(first.split("--priority")[1].split()[0]) if "--priority" in first else None
    tier = first.split("--tier")[1].split()[0] if "--tier" in first else None
    chosen, _ = classify(prio, tier, None, datetime.now(timezone.utc))
    assert chosen in ("immediate", "peak"), f"the README's first example runs {chosen}: {first}"
    usage = (Path(__file__).resolve().parents[2] / "docs" / "USAGE.md").read_text()
    section = usage.split("## Tiers and windows", 1)[1].split("\n## ", 1)[0]
    for word in ("LLMBATCH_OFFPEAK_OPEN_CRON", "LLMBATCH_OFFPEAK_CLOSE_CRON", "LLMBATCH_OFFPEAK_TIMEZONE",
                 "llmbatch schedule", "llmbatch status"):
        assert word in section, word


# ------------------------------------------------------------------ whole-file mistakes

def test_a_json_array_file_is_named(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(json.dumps([{"custom_id": "a"}, {"custom_id": "b"}], indent=2))
    with pytest.raises(FileInputError, match="this file is a JSON array, not JSONL: put one request per line"):
        check_file(f)
    f.write_text(json.dumps([{"custom_id": "a"}]))   # on one line
    with pytest.raises(FileInputError, match="JSON array"):
        check_file(f)


def test_a_pretty_printed_json_object_file_is_named(tmp_path):
    f = tmp_path / "o.json"
    f.write_text(json.dumps({"custom_id": "a", "body": {"model": "m"}}, indent=2))
    with pytest.raises(FileInputError, match="one JSON object spread over several lines, not JSONL"):
        check_file(f)


def test_blank_files_and_directories_are_named(tmp_path):
    f = tmp_path / "blank.jsonl"
    f.write_text("\n  \n\n")
    with pytest.raises(FileInputError, match="every line is blank"):
        check_file(f)
    with pytest.raises(FileInputError, match="is a directory: give a JSONL file"):
        check_file(tmp_path)
    with pytest.raises(FileInputError, match="no such file"):
        check_file(tmp_path / "missing.jsonl")


def test_a_good_jsonl_file_passes(tmp_path):
    f = tmp_path / "ok.jsonl"
    f.write_text('{"custom_id": "a"}\n{"custom_id": "b"}\n')
    check_file(f)
    f.write_text('{"custom_id": "a", broken\n{"custom_id": "b"}\n')   # a broken line is a line's problem
    check_file(f)


def test_the_most_common_reason_groups_lines_that_differ_only_in_numbers():
    r = SubmitReport("job_x")
    for n in range(1, 8):
        r.reject(n, None, f"not valid JSON: Expecting value at column {n}")
    r.reject(8, "c", "unknown model 'gpt-9'")
    reason, count = r.most_common_reason()
    assert count == 7 and reason.startswith("not valid JSON")
    assert len(r.first_rejections) == 5 and r.rejected == 8


# ------------------------------------------------------------------ options and output

def test_an_unknown_job_state_is_refused():
    result = CliRunner().invoke(main, ["jobs", "--status", "bogus"])
    assert result.exit_code == 2 and "bogus" in result.output


def test_every_read_command_takes_json():
    for name in ("status", "jobs", "sql", "doctor", "report", "ps", "rejections"):
        opts = {o for p in main.commands[name].params for o in getattr(p, "opts", [])}
        assert "--json" in opts, name
    for group, name in (("budget", "show"), ("schedule", "list")):
        opts = {o for p in main.commands[group].commands[name].params for o in getattr(p, "opts", [])}
        assert "--json" in opts, f"{group} {name}"


def test_results_has_partial():
    opts = {o for p in main.commands["results"].params for o in getattr(p, "opts", [])}
    assert "--partial" in opts


@pytest.mark.parametrize("value,text", [(Decimal("0E-8"), "0"), (Decimal("0.02350000"), "0.0235"),
                                        (Decimal("100"), "100"), ("1.50000000", "1.5"), (0, "0")])
def test_money_is_a_plain_decimal(value, text):
    assert views.money(value) == text


def test_tables_print_decimals_plainly():
    text = views.format_table(["cost"], [[Decimal("0E-8")], [Decimal("1E+2")]])
    assert "0E-8" not in text and "E+2" not in text and " 100" in text


def test_partial_results_write_only_finished_requests():
    from pipeline.stores.export import finished_only
    rows = [{"custom_id": "a", "status": "succeeded"}, {"custom_id": "b", "status": "held"},
            {"custom_id": "c", "status": "failed"}, {"custom_id": "d", "status": "running"}]
    assert [r["custom_id"] for r in finished_only(rows)] == ["a", "c"]


def test_a_paused_job_says_how_to_resume():
    text = views.format_status(status(status="paused_budget"))
    assert "llmbatch budget set --job job_x --usd" in text


# ------------------------------------------------------------------ the report chart

def test_the_report_chart_has_a_time_axis_so_a_gap_stays_a_gap(tmp_path):
    from datetime import timedelta

    from llmbatch.cli import report
    t0 = datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)
    buckets = [t0, t0 + timedelta(minutes=1), t0 + timedelta(minutes=6)]
    xs, width = report.time_axis(buckets, "minute")
    one_minute = xs[1] - xs[0]
    assert abs((xs[2] - xs[1]) - 5 * one_minute) < 1e-9   # 5 minutes apart, not neighbours
    assert 0 < width < one_minute
    rows = [{"bucket": b, "tier": "peak", "model": "gpt-4o-mini", "requests": 1, "input_tokens": 1,
             "output_tokens": 1, "cost_usd": Decimal("0.01")} for b in buckets]
    path = report.chart({"step": "minute", "rows": rows}, tmp_path / "c.png", "test")
    assert path.stat().st_size > 1000


# ------------------------------------------------------------------ Flower, ps --json

def test_the_batch_task_carries_its_tier_for_flower(monkeypatch):
    from pipeline.intake import dispatch
    sent = []

    class App:
        def send_task(self, name, **kw):
            sent.append((name, kw))
    monkeypatch.setattr(dispatch, "_app", lambda: App())
    dispatch.enqueue_batch("b_1", "peak")
    dispatch.enqueue_batch("b_2", "offpeak", jobs=["job_a"])
    assert sent[0][1]["args"] == ["b_1"] and sent[0][1]["kwargs"] == {"tier": "peak"}
    assert sent[1][1]["kwargs"] == {"tier": "offpeak", "jobs": ["job_a"]}
    import inspect

    from workers.tasks import execute_batch
    assert {"tier", "jobs"} <= set(inspect.signature(execute_batch.run).parameters)


def test_ps_json_prints_one_object_per_process():
    result = CliRunner().invoke(main, ["ps", "--json", "redis", "batcher"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    # the supervisor itself comes first, as in `make status`
    assert [r["name"] for r in rows] == ["supervisord", "redis", "batcher"]
    assert all(r["state"] in ("up", "down", "starting", "backoff", "fatal") for r in rows)
    assert all(set(r) == {"name", "state", "pid", "uptime", "restarts", "port"} for r in rows)


def test_an_array_line_among_jsonl_lines_is_only_that_lines_problem(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text('[1, 2]\n{"custom_id": "b"}\n')
    check_file(f)   # the first line is rejected as "expected a JSON object", the rest runs
