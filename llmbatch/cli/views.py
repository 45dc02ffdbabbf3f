"""What the terminal shows: job status per tier, the job list, psql-like tables, ``--watch``.

Reads only (through the caller's connection); formatting is pure and unit
tested. On a terminal ``watch`` redraws one screen in place; elsewhere (a
pipe, a log file, CI) it prints one plain line per refresh, so the output
stays greppable.
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline import jsontext
from pipeline.config import get_settings
from pipeline.constants import JOB_TERMINAL, REQUEST_STATES, TIERS
from pipeline.logs import escape_controls
from pipeline.stores import db, jobs

#: the per-tier columns of ``status``: the request states, a succeeded one counted as ``done``
STATES = tuple("done" if s == "succeeded" else s for s in REQUEST_STATES)
#: the window the rate is measured over
RATE_WINDOW_S = 30


# ------------------------------------------------------------------ queries

def job_view(conn: Connection, job_id: str) -> dict | None:
    """``jobs.job_status`` plus per-tier states, budget, rate and ETA (``status --json``)."""
    st = jobs.job_status(conn, job_id)
    if st is None:
        return None
    by_tier = {t: dict.fromkeys(STATES, 0) for t in TIERS}
    states, cost_by_tier = jobs.tier_breakdown(conn, job_id)
    for tier, counts in states.items():
        for status, n in counts.items():
            by_tier.setdefault(tier, dict.fromkeys(STATES, 0))["done" if status == "succeeded" else status] = n
    budget, age_s, recent = conn.execute(sa.text(
        "SELECT j.budget_usd, extract(epoch FROM now() - j.created_at),"
        " (SELECT count(*) FROM requests q WHERE q.job_id = j.job_id"
        "  AND q.finished_at > now() - make_interval(secs => :w))"
        " FROM jobs j WHERE j.job_id = :j"), {"j": job_id, "w": RATE_WINDOW_S}).one()
    window = max(1.0, min(float(RATE_WINDOW_S), float(age_s)))
    rate = recent / window
    st["by_tier"] = {t: dict(c, cost_usd=money(cost_by_tier.get(t) or 0))
                     for t, c in by_tier.items() if any(c.values())}
    st["budget_usd"] = money(budget) if budget is not None else None
    st["rate_per_s"] = round(rate, 2)
    st["cost_usd"] = money(st["cost_usd"])
    st["unconfirmed_usd"] = money(st.get("unconfirmed_usd") or 0)
    st["cache_saved_usd"] = money(st["cache_saved_usd"])
    st["savings"] = {k: money(v) for k, v in st["savings"].items() if k != "by_lever"} | {
        "by_lever": {k: money(v) for k, v in st["savings"]["by_lever"].items()}}
    st["held"] = held_work(conn, {t: c["held"] for t, c in by_tier.items()}) if st["status"] not in JOB_TERMINAL \
        else []
    st["deadlines"] = deadline_view(conn, job_id, st["held"])
    st["paths"] = path_view(conn, job_id)
    # held work runs when the scheduler releases it, not at today's rate: it is left out of the ETA
    runnable = st["counts"]["pending"] - sum(h["requests"] for h in st["held"])
    st["eta_s"] = round(runnable / rate) if rate > 0 and runnable > 0 else (0 if runnable <= 0 else None)
    st["budget_wait"] = budget_wait(job_id) if st["status"] not in JOB_TERMINAL else None
    return st


def path_view(conn: Connection, job_id: str) -> list[dict]:
    """The paths the job's requests were given and why (view ``job_paths``, sql/027_path_choice.sql)."""
    rows = conn.execute(sa.text(
        "SELECT path, requests, succeeded, cost_usd, list_cost_usd, a_reason FROM job_paths WHERE job_id = :j"
        " ORDER BY requests DESC, path"), {"j": job_id}).mappings().all()
    return [{"path": r["path"] or "(none)", "requests": r["requests"], "succeeded": r["succeeded"],
             "cost_usd": money(r["cost_usd"]), "list_cost_usd": money(r["list_cost_usd"]),
             "reason": r["a_reason"] or ""} for r in rows]


def deadline_view(conn: Connection, job_id: str, held: list[dict], *, settings=None) -> dict | None:
    """How the job's deadlines went (view ``job_deadlines``, sql/017_deadlines.sql); None without any.

    Missed: still held at its deadline, failed ``deadline_missed`` and never sent
    (schedules/deadlines.py). Held work with a deadline before the window opens
    is released at its latest start: the held lines say when.
    """
    row = conn.execute(sa.text(
        "SELECT with_deadline, on_time, late, missed, overdue, pending, next_deadline"
        " FROM job_deadlines WHERE job_id = :j"), {"j": job_id}).mappings().first()
    if row is None:
        return None
    out = {k: row[k] for k in ("with_deadline", "on_time", "late", "missed", "overdue", "pending")}
    out["next_deadline"] = row["next_deadline"].isoformat() if row["next_deadline"] else None
    if held:
        from pipeline.intake.tiers import latest_start, rules_for
        settings = settings or get_settings()
        firsts = dict(conn.execute(sa.text(
            "SELECT tier, min(deadline) FROM requests WHERE job_id = :j AND status = 'held'"
            " AND deadline IS NOT NULL GROUP BY tier"), {"j": job_id}).all())
        for h in held:
            first = firsts.get(h["tier"])
            if first is None:
                continue
            start_by = latest_start(first, rules_for(settings))
            opens = datetime.fromisoformat(h["opens_at"]) if h.get("opens_at") else None
            if opens is None or start_by < opens:
                h["release_by"] = start_by.isoformat()
                h["text"] += (f"; its first deadline ({_utc(first)}) has the scheduler release it by"
                              f" {_utc(start_by)}")
    return out


_budget_redis = None


def budget_wait(job_id: str) -> dict | None:
    """Why the job's reservations wait, if they do: the cap, its spend, what holds it and for whom
    (pipeline/money/waits.py ``wait_status``). None when they do not, or Redis cannot say."""
    global _budget_redis
    from pipeline.money import scripts, waits
    try:
        if _budget_redis is None:
            _budget_redis = scripts.redis_clients(get_settings())[1]
        return waits.wait_status(_budget_redis, job_id)
    except Exception as e:   # status still shows the rest
        return {"text": f"unknown: the budget store cannot say ({type(e).__name__})", "cap": None}


#: the scheduler's leader lock (schedules/service.py LEADER_LOCK): held while a scheduler leads
_SCHEDULER_LOCK = 727006


def scheduler_running(conn: Connection) -> bool:
    """True when a scheduler holds its leader lock (pg_locks is readable by every role)."""
    return bool(conn.execute(sa.text(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = :k AND granted"),
        {"k": _SCHEDULER_LOCK}).scalar())


def held_work(conn: Connection, held_by_tier: dict[str, int], *, settings=None,
              now: datetime | None = None, scheduler: bool | None = None) -> list[dict]:
    """What is held and until when: one entry per held tier with a sentence for people.

    The off-peak window's next opening comes from the scheduler's own window
    settings and cron logic (pipeline/intake/windows.py) and its clock (the ``db``
    clock tests move), so what ``status`` promises is what the scheduler does.
    """
    from pipeline.intake.windows import Window
    from schedules.clock import get_clock
    out = []
    if not any(held_by_tier.get(t) for t in ("offpeak", "background")):
        return out
    settings = settings or get_settings()
    if scheduler is None:
        scheduler = scheduler_running(conn)
    no_scheduler = "" if scheduler else "; no scheduler is running: start it with `llmbatch up scheduler`"
    if held_by_tier.get("offpeak"):
        window = Window.offpeak(settings)
        now = now or get_clock(settings).now()
        if window.is_open(now):
            closes = window.next_change(now)
            when = f"window open until {_clock_time(closes, settings)}, released as workers free up"
            opens_at = now
        else:
            opens_at = window.next_change(now)
            when = (f"window opens {_clock_time(opens_at, settings)}, in {human_duration((opens_at - now).total_seconds())}"
                    if opens_at else "the window never opens (check LLMBATCH_OFFPEAK_OPEN_CRON)")
        out.append({"tier": "offpeak", "requests": held_by_tier["offpeak"],
                    "opens_at": opens_at.isoformat() if opens_at else None,
                    "in_s": round((opens_at - now).total_seconds()) if opens_at else None,
                    "text": f"{held_by_tier['offpeak']} off-peak, {when}{no_scheduler}"})
    if held_by_tier.get("background"):
        out.append({"tier": "background", "requests": held_by_tier["background"], "opens_at": None,
                    "in_s": None,
                    "text": f"{held_by_tier['background']} background, run when the immediate and peak queues"
                            f" are idle{no_scheduler}"})
    return out


def _clock_time(at: datetime | None, settings) -> str:
    """``22:00 UTC`` (in the window's time zone), with the date when it is not within a day."""
    if at is None:
        return "never"
    return f"{at:%H:%M} {settings.offpeak_timezone}"


def human_duration(seconds: float) -> str:
    """``1 h 52 m``, ``5 m``, ``40 s``: for a time ahead, rounded up to the minute past a minute."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = -(-seconds // 60)
    if minutes < 60:
        return f"{minutes} m"
    days, rest = divmod(minutes, 24 * 60)
    h, m = divmod(rest, 60)
    return (f"{days} d " if days else "") + f"{h} h {m} m"


def money(value) -> str:
    """Dollars as a plain decimal string: ``0``, ``0.0235``; never ``0E-8`` or ``1.20000000``."""
    return jsontext.plain(Decimal(str(value)))


def savings_line(saved: dict) -> str | None:
    """``list price $X  saved $Y (Z%): lever $a, …`` from a job's ``savings`` (job_status); None
    when there is no list price yet."""
    listed = Decimal(saved["list_cost_usd"])
    if not listed:
        return None
    from pipeline.money.savings import LEVERS
    levers = ", ".join(f"{k} ${money(saved['by_lever'][k])}" for k in LEVERS
                       if Decimal(saved["by_lever"].get(k, "0")))
    return (f"list price ${money(listed)}  saved ${money(saved['saved_usd'])}"
            f" ({Decimal(saved['saved_usd']) / listed:.1%})" + (f": {levers}" if levers else ""))


def parse_since(text: str | None, now: datetime | None = None) -> datetime | None:
    """``30m``, ``6h``, ``7d``, ``2w`` or an ISO 8601 date/time → an aware datetime."""
    if not text:
        return None
    now = now or datetime.now(timezone.utc)
    m = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text)
    if m:
        n, unit = int(m.group(1)), m.group(2)
        return now - timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days",
                                   "w": "weeks"}[unit]: n})
    try:
        value = datetime.fromisoformat(text)
    except ValueError as e:
        raise ValueError(f"--since: {text!r} is neither a duration (30m, 6h, 7d) nor ISO 8601") from e
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def list_jobs(conn: Connection, *, status: str | None = None, since: datetime | None = None,
              limit: int = 20) -> list[dict]:
    rows = conn.execute(sa.text(
        "SELECT job_id, name, status, accepted, succeeded, failed, pending, cost_usd, budget_usd,"
        " created_at, finished_at FROM job_summary"
        " WHERE (CAST(:status AS text) IS NULL OR status = :status)"
        "   AND (CAST(:since AS timestamptz) IS NULL OR created_at >= :since)"
        " ORDER BY created_at DESC LIMIT :limit"),
        {"status": status, "since": since, "limit": limit}).mappings().all()
    return [dict(r) for r in rows]


# ------------------------------------------------------------------ formatting

def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, (dict, list)):
        return jsontext.dumps(value)
    if isinstance(value, Decimal):
        return jsontext.plain(value)
    # a cell may hold input (a refused custom_id with an escape sequence): shown, never obeyed
    return escape_controls(str(value))


def format_table(columns: list[str], rows: list, *, footer: bool = True) -> str:
    """An aligned table in psql's style; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row[i], (int, float, Decimal)) or row[i] is None for row in rows) and rows
               for i in range(len(columns))]
    lines = [" | ".join(c.center(w) for c, w in zip(columns, widths)).rstrip(),
             "-+-".join("-" * w for w in widths)]
    for r in cells:
        lines.append(" | ".join(v.rjust(w) if numeric[i] else v.ljust(w)
                                for i, (v, w) in enumerate(zip(r, widths))).rstrip())
    if footer:
        lines.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    return "\n".join(lines)


def _duration(seconds) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_status(st: dict) -> str:
    """The multi-line status screen of a job."""
    c = st["counts"]
    budget = f" of ${money(st['budget_usd'])} budget" if st.get("budget_usd") else " (no job budget)"
    out = [f"job {st['job_id']}  {st['status']}  provider: {st['provider']}",
           f"lines {c['total']}  accepted {c['accepted']}  rejected {c['rejected']}"
           f"  |  done {c['succeeded']}  failed {c['failed']}  cancelled {c['cancelled']}"
           f"  pending {c['pending']}",
           f"spend ${money(st['cost_usd'])}{budget}  |  rate {st.get('rate_per_s', 0):.1f} req/s"
           f"  |  ETA {_eta(st)}"]
    if st.get("savings") and savings_line(st["savings"]):
        out.append(savings_line(st["savings"]))
    if st.get("unconfirmed_calls"):
        out.append(f"unconfirmed spend ${money(st['unconfirmed_usd'])}: {st['unconfirmed_calls']} calls got no"
                   f" answer and may have been billed; counted at their maximum against the caps")
    out += [f"held: {h['text']}" for h in st.get("held") or []]
    if st.get("deadlines"):
        out.append(f"deadlines: {deadline_text(st['deadlines'])}")
    for p in st.get("paths") or []:
        out.append(f"path {p['path']}: {p['requests']} requests, ${money(p['cost_usd'])} of"
                   f" ${money(p['list_cost_usd'])} list  ({p['reason']})")
    if st.get("budget_wait"):
        out.append(f"budget: {st['budget_wait']['text']}")
    if st["status"] == "paused_budget":
        out.append(f"paused by its budget: raise the cap to resume, `llmbatch budget set --job {st['job_id']}"
                   f" --usd AMOUNT`")
    out.append("")
    rows = [[tier] + [v[s] for s in STATES] + [Decimal(v["cost_usd"])]
            for tier, v in st.get("by_tier", {}).items()]
    out.append(format_table(["tier", *STATES, "cost_usd"], rows, footer=False) if rows else "(no requests yet)")
    return "\n".join(out)


def _utc(at: datetime) -> str:
    return f"{at.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC"


def deadline_text(d: dict) -> str:
    """``2 MISSED (failed deadline_missed, not sent), 1 late, 3 on time, 4 pending``."""
    parts = []
    if d["missed"]:
        parts.append(f"{d['missed']} MISSED (failed deadline_missed, not sent)")
    if d["overdue"]:
        parts.append(f"{d['overdue']} overdue (still running past the deadline)")
    for key, label in (("late", "late"), ("on_time", "on time"), ("pending", "pending")):
        if d[key]:
            parts.append(f"{d[key]} {label}")
    if d.get("next_deadline"):
        parts.append(f"next {_utc(datetime.fromisoformat(d['next_deadline']))}")
    return ", ".join(parts) or "none"


def _eta(st: dict) -> str:
    """The ETA of the work that can run now; held work is named on its own line."""
    if st["status"] in JOB_TERMINAL:
        return "-"
    held = sum(h["requests"] for h in st.get("held") or [])
    if held and held >= st["counts"]["pending"]:
        return "- (only held work left)"
    if st.get("budget_wait") and st["budget_wait"].get("cap"):
        return f"unknown (waiting on the {st['budget_wait']['cap']} cap)"
    text = _duration(st.get("eta_s"))
    return f"{text} (+ {held} held)" if held else text


def wait_line(st: dict) -> str:
    """One line of ``submit --wait``: progress, then what is held and until when."""
    c = st["counts"]
    text = (f"{st['status']}: {c['succeeded']}/{c['accepted']} done, {c['failed']} failed, "
            f"{c['pending']} pending, spend ${money(st['cost_usd'])}, ETA {_eta(st)}")
    for h in st.get("held") or []:
        text += f" | held: {h['text']}"
    if (st.get("deadlines") or {}).get("missed"):
        text += f" | deadlines: {deadline_text(st['deadlines'])}"
    if st.get("budget_wait"):
        text += f" | budget: {st['budget_wait']['text']}"
    return text


def _wait_key(st: dict) -> tuple:
    """What counts as a change for the plain (not a terminal) ``--wait`` output."""
    c = st["counts"]
    return (st["status"], c["succeeded"], c["failed"], c["cancelled"], c["pending"],
            tuple((h["tier"], h["requests"], h.get("opens_at")) for h in st.get("held") or []))


def follow(engine, job_id: str, *, interval: float = 1.0, out=None, tty: bool | None = None) -> dict:
    """``submit --wait``: on a terminal one progress line redrawn in place; elsewhere one line
    per change (not per poll). Returns the final status."""
    out = out or sys.stderr
    tty = out.isatty() if tty is None else tty
    last_key = None
    while True:
        with db.transaction(engine) as conn:   # waits out a Postgres restart, saying so once
            st = job_view(conn, job_id)
        key = _wait_key(st)
        if tty:
            width = 200
            out.write("\r\x1b[K" + wait_line(st)[:width])
            if st["status"] in JOB_TERMINAL:
                out.write("\n")
        elif key != last_key:
            out.write(f"{datetime.now(timezone.utc):%H:%M:%S} " + wait_line(st) + "\n")
        last_key = key
        out.flush()
        if st["status"] in JOB_TERMINAL:
            return st
        time.sleep(interval)


def status_line(st: dict) -> str:
    """One line per refresh when the output is not a terminal."""
    tiers = " ".join(f"{t}[q{v['queued']} h{v['held']} r{v['running']} d{v['deferred']}"
                     f" ok{v['done']} x{v['failed']}]" for t, v in st.get("by_tier", {}).items())
    eta = _duration(st.get("eta_s")) if st["status"] not in JOB_TERMINAL else "-"
    return (f"{datetime.now(timezone.utc):%H:%M:%S} {st['job_id']} {st['status']}"
            f" done={st['counts']['succeeded']}/{st['counts']['accepted']} failed={st['counts']['failed']}"
            f" pending={st['counts']['pending']} spend=${money(st['cost_usd'])}"
            f"{'+' + money(st['unconfirmed_usd']) + ' unconfirmed' if st.get('unconfirmed_calls') else ''}"
            f"{'/' + money(st['budget_usd']) if st.get('budget_usd') else ''}"
            f" rate={st.get('rate_per_s', 0):.1f}/s eta={eta} {tiers}"
            + "".join(f" | held: {h['text']}" for h in st.get("held") or []))


def watch(engine, job_id: str, *, interval: float = 1.0, out=None, tty: bool | None = None,
          max_seconds: float | None = None) -> dict:
    """Refresh until the job reaches a terminal state; returns the last status."""
    out = out or sys.stdout
    tty = out.isatty() if tty is None else tty
    started = time.monotonic()
    while True:
        with engine.connect() as conn:
            st = job_view(conn, job_id)
        if tty:
            out.write("\x1b[H\x1b[2J" + format_status(st) + f"\n\n(refreshing every {interval:g} s;"
                      " Ctrl-C to stop watching: the job goes on)\n")
        else:
            out.write(status_line(st) + "\n")
        out.flush()
        if st["status"] in JOB_TERMINAL or (max_seconds and time.monotonic() - started > max_seconds):
            return st
        time.sleep(interval)
