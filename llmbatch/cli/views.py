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

from pipeline import db
from pipeline.constants import JOB_TERMINAL, TIERS

STATES = ("queued", "held", "running", "deferred", "done", "failed", "cancelled")
#: the window the rate is measured over
RATE_WINDOW_S = 30


# ------------------------------------------------------------------ queries

def job_view(conn: Connection, job_id: str) -> dict | None:
    """``db.job_status`` plus per-tier states, budget, rate and ETA (``status --json``)."""
    st = db.job_status(conn, job_id)
    if st is None:
        return None
    by_tier = {t: dict.fromkeys(STATES, 0) for t in TIERS}
    for tier, status, n in conn.execute(sa.text(
            "SELECT tier, status, count(*) FROM requests WHERE job_id = :j GROUP BY 1, 2"), {"j": job_id}):
        state = "done" if status == "succeeded" else status
        by_tier.setdefault(tier, dict.fromkeys(STATES, 0))[state] = n
    cost_by_tier = dict(conn.execute(sa.text(
        "SELECT q.tier, sum(x.cost_usd) FROM results x JOIN requests q USING (job_id, custom_id)"
        " WHERE x.job_id = :j GROUP BY 1"), {"j": job_id}).all())
    budget, age_s, recent = conn.execute(sa.text(
        "SELECT j.budget_usd, extract(epoch FROM now() - j.created_at),"
        " (SELECT count(*) FROM requests q WHERE q.job_id = j.job_id"
        "  AND q.finished_at > now() - make_interval(secs => :w))"
        " FROM jobs j WHERE j.job_id = :j"), {"j": job_id, "w": RATE_WINDOW_S}).one()
    window = max(1.0, min(float(RATE_WINDOW_S), float(age_s)))
    rate = recent / window
    pending = st["counts"]["pending"]
    st["by_tier"] = {t: dict(c, cost_usd=str(cost_by_tier.get(t) or 0))
                     for t, c in by_tier.items() if any(c.values())}
    st["budget_usd"] = str(budget) if budget is not None else None
    st["rate_per_s"] = round(rate, 2)
    st["eta_s"] = round(pending / rate) if rate > 0 and pending else (0 if not pending else None)
    return st


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
        return json.dumps(value, default=str)
    return str(value)


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
    budget = f" of ${st['budget_usd']} budget" if st.get("budget_usd") else " (no job budget)"
    out = [f"job {st['job_id']}  {st['status']}  provider: {st['provider']}",
           f"lines {c['total']}  accepted {c['accepted']}  rejected {c['rejected']}"
           f"  |  done {c['succeeded']}  failed {c['failed']}  cancelled {c['cancelled']}"
           f"  pending {c['pending']}",
           f"spend ${st['cost_usd']}{budget}  |  rate {st.get('rate_per_s', 0):.1f} req/s"
           f"  |  ETA {_duration(st.get('eta_s')) if st['status'] not in JOB_TERMINAL else '-'}",
           ""]
    rows = [[tier] + [v[s] for s in STATES] + [Decimal(v["cost_usd"])]
            for tier, v in st.get("by_tier", {}).items()]
    out.append(format_table(["tier", *STATES, "cost_usd"], rows, footer=False) if rows else "(no requests yet)")
    return "\n".join(out)


def status_line(st: dict) -> str:
    """One line per refresh when the output is not a terminal."""
    tiers = " ".join(f"{t}[q{v['queued']} h{v['held']} r{v['running']} d{v['deferred']}"
                     f" ok{v['done']} x{v['failed']}]" for t, v in st.get("by_tier", {}).items())
    eta = _duration(st.get("eta_s")) if st["status"] not in JOB_TERMINAL else "-"
    return (f"{datetime.now(timezone.utc):%H:%M:%S} {st['job_id']} {st['status']}"
            f" done={st['counts']['succeeded']}/{st['counts']['accepted']} failed={st['counts']['failed']}"
            f" pending={st['counts']['pending']} spend=${st['cost_usd']}"
            f"{'/' + st['budget_usd'] if st.get('budget_usd') else ''}"
            f" rate={st.get('rate_per_s', 0):.1f}/s eta={eta} {tiers}")


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
