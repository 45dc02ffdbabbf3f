"""Recurring JSONL runs: ``llmbatch schedule add NAME --cron … --file …``.

Definitions live in ``schedules``; every cron slot becomes one row of
``schedule_runs`` keyed by (schedule, slot). That key is what makes a slot
fire at most once — across restarts and across two schedulers — and the slots
between the last recorded one and now are what make a run not lost while no
scheduler was up (slots older than ``schedule_misfire_grace_s`` are recorded
as ``missed``). APScheduler only decides *when* to look (service.py);
``fire_due`` decides *what* runs, under a row lock on the schedule.

Each run is a job submitted with ``pipeline.intake.producer.submit_file`` and linked
by ``jobs.schedule_name`` and ``schedule_runs.job_id``. A run still going when
the next slot comes is not doubled: ``overlap = skip`` records the slot as
``skipped``; ``queue`` records it ``queued`` and submits it when the previous
run's job ends.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa

from pipeline.config import Settings, get_settings
from pipeline.constants import TIERS
from pipeline.errors import ConfigError, InputError
from pipeline.intake.windows import cron_trigger, fire_times, next_fire
from pipeline.stores import db
from schedules.clock import Clock, get_clock

log = logging.getLogger(__name__)

OVERLAP = ("skip", "queue")
#: a run left 'submitting' this long (its scheduler died mid-submit) no longer blocks the next one
SUBMITTING_STALE_S = 600


def add_schedule(name: str, *, cron: str, file: str, timezone: str = "UTC", tier: str | None = None,
                 priority: int | None = None, budget_usd: Decimal | None = None, mode: str = "realtime",
                 overlap: str = "skip", replace: bool = False, engine=None, clock: Clock | None = None) -> dict:
    cron_trigger(cron, timezone)   # raises ConfigError when unusable
    if overlap not in OVERLAP:
        raise ConfigError(f"overlap must be one of {', '.join(OVERLAP)}")
    if tier is not None and tier not in TIERS:
        raise ConfigError(f"tier must be one of {', '.join(TIERS)}")
    path = Path(file).resolve()
    if not path.is_file():
        raise InputError(f"{file}: no such file")
    engine = engine or db.get_engine()
    now = (clock or get_clock()).now()
    with engine.begin() as conn:
        verb = "INSERT INTO schedules (name, cron, timezone, file, tier, priority, budget_usd, mode, overlap," \
               " created_at) VALUES (:name, :cron, :tz, :file, :tier, :priority, :budget, :mode, :overlap, :now)"
        if replace:
            verb += (" ON CONFLICT (name) DO UPDATE SET cron = :cron, timezone = :tz, file = :file, tier = :tier,"
                     " priority = :priority, budget_usd = :budget, mode = :mode, overlap = :overlap")
        try:
            conn.execute(sa.text(verb), dict(name=name, cron=cron, tz=timezone, file=str(path), tier=tier,
                                             priority=priority, budget=budget_usd, mode=mode, overlap=overlap,
                                             now=now))
        except sa.exc.IntegrityError as e:
            raise ConfigError(f"a schedule named {name!r} exists (remove it first, or --replace)") from e
    return get_schedule(name, engine=engine, clock=clock)


def remove_schedule(name: str, *, engine=None) -> bool:
    engine = engine or db.get_engine()
    with engine.begin() as conn:
        return bool(conn.execute(sa.text("DELETE FROM schedules WHERE name = :n"), {"n": name}).rowcount)


def list_schedules(*, engine=None, clock: Clock | None = None) -> list[dict]:
    engine = engine or db.get_engine()
    now = (clock or get_clock()).now()
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT s.*, (SELECT count(*) FROM schedule_runs r WHERE r.schedule_name = s.name) AS runs,"
            " (SELECT row_to_json(x) FROM (SELECT scheduled_for, status, job_id FROM schedule_runs r"
            "   WHERE r.schedule_name = s.name ORDER BY scheduled_for DESC LIMIT 1) x) AS last_run"
            " FROM schedules s ORDER BY s.name")).mappings().all()
    out = []
    for r in rows:
        nxt = next_fire(cron_trigger(r["cron"], r["timezone"]), now)
        out.append({"name": r["name"], "cron": r["cron"], "timezone": r["timezone"], "file": r["file"],
                    "tier": r["tier"], "priority": r["priority"],
                    "budget_usd": str(r["budget_usd"]) if r["budget_usd"] is not None else None,
                    "mode": r["mode"], "overlap": r["overlap"], "enabled": r["enabled"],
                    "runs": r["runs"], "last_run": r["last_run"],
                    "next_run": nxt.isoformat() if nxt else None})
    return out


def get_schedule(name: str, *, engine=None, clock: Clock | None = None) -> dict | None:
    return next((s for s in list_schedules(engine=engine, clock=clock) if s["name"] == name), None)


def _going(conn, name: str) -> bool:
    """Is a run of ``name`` still in progress (submitting, or its job not finished)?"""
    return bool(conn.execute(sa.text(
        "SELECT 1 FROM schedule_runs r LEFT JOIN jobs j ON j.job_id = r.job_id"
        " WHERE r.schedule_name = :n AND ("
        "   (r.status = 'submitting' AND r.created_at > now() - make_interval(secs => :stale))"
        "   OR (r.status = 'submitted' AND j.status <> ALL(llmbatch_states('job_terminal'))))"
        " LIMIT 1"), {"n": name, "stale": SUBMITTING_STALE_S}).first())


def fire_due(name: str, *, settings: Settings | None = None, engine=None, clock: Clock | None = None,
             submit=None) -> list[dict]:
    """Record every cron slot of ``name`` due by now, and submit the runs that should start."""
    settings = settings or get_settings()
    engine = engine or db.get_engine()
    clock = clock or get_clock(settings, engine)
    now = clock.now()
    decided = []
    with engine.begin() as conn:
        s = conn.execute(sa.text("SELECT * FROM schedules WHERE name = :n FOR UPDATE"), {"n": name}).mappings().first()
        if s is None or not s["enabled"]:
            return []
        last = conn.execute(sa.text(
            "SELECT max(scheduled_for) FROM schedule_runs WHERE schedule_name = :n AND NOT manual"),
            {"n": name}).scalar()
        slots = fire_times(cron_trigger(s["cron"], s["timezone"]), last or s["created_at"], now)
        going = _going(conn, name) or _has_queued(conn, name)
        for slot in slots:
            if now - slot > timedelta(seconds=settings.schedule_misfire_grace_s):
                status, job_id = "missed", None
            elif not going:
                status, job_id, going = "submitting", "job_" + uuid.uuid4().hex[:20], True
            elif s["overlap"] == "skip":
                status, job_id = "skipped", None
            else:
                status, job_id = "queued", None
            inserted = conn.execute(sa.text(
                "INSERT INTO schedule_runs (schedule_name, scheduled_for, status, job_id, detail)"
                " VALUES (:n, :slot, :st, :job, :detail) ON CONFLICT DO NOTHING RETURNING 1"),
                {"n": name, "slot": slot, "st": status, "job": job_id,
                 "detail": "the previous run was still going" if status in ("skipped", "queued") else None}).first()
            if inserted:
                decided.append({"schedule": name, "scheduled_for": slot, "status": status, "job_id": job_id})
        definition = dict(s)
    for run in decided:
        log.info("schedule %s: slot %s %s%s", name, run["scheduled_for"].isoformat(), run["status"],
                 f" as job {run['job_id']}" if run["job_id"] else "")
        if run["status"] == "submitting":
            _submit_run(definition, run, settings=settings, engine=engine, submit=submit)
    return decided


def _has_queued(conn, name: str) -> bool:
    return bool(conn.execute(sa.text(
        "SELECT 1 FROM schedule_runs WHERE schedule_name = :n AND status = 'queued' LIMIT 1"), {"n": name}).first())


def drain_queued(name: str, *, settings: Settings | None = None, engine=None, submit=None) -> dict | None:
    """Start the oldest queued run of ``name`` when no run is going."""
    settings = settings or get_settings()
    engine = engine or db.get_engine()
    with engine.begin() as conn:
        s = conn.execute(sa.text("SELECT * FROM schedules WHERE name = :n FOR UPDATE"), {"n": name}).mappings().first()
        if s is None:
            return None
        conn.execute(sa.text(
            "UPDATE schedule_runs SET status = 'failed', detail = 'the scheduler stopped during submission'"
            " WHERE schedule_name = :n AND status = 'submitting'"
            " AND created_at < now() - make_interval(secs => :stale)"), {"n": name, "stale": SUBMITTING_STALE_S})
        if _going(conn, name):
            return None
        row = conn.execute(sa.text(
            "UPDATE schedule_runs SET status = 'submitting', job_id = :job, created_at = now()"
            " WHERE (schedule_name, scheduled_for) = (SELECT schedule_name, scheduled_for FROM schedule_runs"
            "   WHERE schedule_name = :n AND status = 'queued' ORDER BY scheduled_for LIMIT 1)"
            " RETURNING scheduled_for, job_id"), {"n": name, "job": "job_" + uuid.uuid4().hex[:20]}).first()
        definition = dict(s)
    if row is None:
        return None
    run = {"schedule": name, "scheduled_for": row.scheduled_for, "status": "submitting", "job_id": row.job_id}
    log.info("schedule %s: queued slot %s starts as job %s", name, row.scheduled_for.isoformat(), row.job_id)
    _submit_run(definition, run, settings=settings, engine=engine, submit=submit)
    return run


def run_now(name: str, *, settings: Settings | None = None, engine=None, clock: Clock | None = None,
            submit=None) -> dict:
    """``schedule run NAME``: one manual run now, whatever the cron and the overlap policy say."""
    settings = settings or get_settings()
    engine = engine or db.get_engine()
    clock = clock or get_clock(settings, engine)
    with engine.begin() as conn:
        s = conn.execute(sa.text("SELECT * FROM schedules WHERE name = :n"), {"n": name}).mappings().first()
        if s is None:
            raise InputError(f"no schedule {name!r}")
        run = {"schedule": name, "scheduled_for": clock.now(), "status": "submitting",
               "job_id": "job_" + uuid.uuid4().hex[:20]}
        conn.execute(sa.text(
            "INSERT INTO schedule_runs (schedule_name, scheduled_for, status, job_id, manual, detail)"
            " VALUES (:n, :slot, 'submitting', :job, true, 'schedule run')"),
            {"n": name, "slot": run["scheduled_for"], "job": run["job_id"]})
        definition = dict(s)
    _submit_run(definition, run, settings=settings, engine=engine, submit=submit)
    return run


def _submit_run(s: dict, run: dict, *, settings: Settings, engine, submit=None) -> None:
    if submit is None:
        from pipeline.intake.producer import submit_file as submit
    key = {"n": s["name"], "slot": run["scheduled_for"]}
    slot: datetime = run["scheduled_for"]
    try:
        report = submit(Path(s["file"]), settings=settings, job_id=run["job_id"],
                        name=f"{s['name']} {slot.isoformat(timespec='seconds')}", priority=s["priority"],
                        tier=s["tier"], budget_usd=s["budget_usd"], mode=s["mode"])
    except Exception as e:  # the run is recorded as failed with its reason; the schedule goes on
        log.error("schedule %s: run %s failed to submit: %s", s["name"], slot.isoformat(), e)
        with engine.begin() as conn:
            conn.execute(sa.text(
                "UPDATE schedule_runs SET status = 'failed', detail = :d"
                " WHERE schedule_name = :n AND scheduled_for = :slot"), dict(key, d=str(e)[:2000]))
            conn.execute(sa.text("UPDATE jobs SET schedule_name = :n WHERE job_id = :j"),
                         {"n": s["name"], "j": run["job_id"]})
        run["status"] = "failed"
        return
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE jobs SET schedule_name = :n WHERE job_id = :j"),
                     {"n": s["name"], "j": run["job_id"]})
        conn.execute(sa.text(
            "UPDATE schedule_runs SET status = 'submitted', started_at = now()"
            " WHERE schedule_name = :n AND scheduled_for = :slot"), key)
    run.update(status="submitted", accepted=report.accepted, rejected=report.rejected)
    log.info("schedule %s: run %s submitted as job %s (%d accepted, %d rejected)", s["name"],
             slot.isoformat(), run["job_id"], report.accepted, report.rejected)


def resume_orphans(*, settings: Settings | None = None, engine=None) -> list[dict]:
    """Finish the submissions a dead leader left ``submitting``; call on taking the lead.

    Only the leader submits scheduled runs and it holds the lock until it dies,
    so a new leader knows every non-manual ``submitting`` run is an orphan.
    Submitting the file again under the same job id is harmless: the job row
    is kept, lines already in Kafka or Postgres are deduplicated by
    (job, custom_id), and the counts are recomputed from the whole file.
    """
    settings = settings or get_settings()
    engine = engine or db.get_engine()
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT r.scheduled_for, r.job_id, s.* FROM schedule_runs r JOIN schedules s ON s.name = r.schedule_name"
            " WHERE r.status = 'submitting' AND NOT r.manual ORDER BY r.scheduled_for")).mappings().all()
    resumed = []
    for row in rows:
        run = {"schedule": row["name"], "scheduled_for": row["scheduled_for"], "status": "submitting",
               "job_id": row["job_id"]}
        log.warning("schedule %s: resuming run %s (job %s) left submitting by a stopped scheduler",
                    row["name"], row["scheduled_for"].isoformat(), row["job_id"])
        _submit_run(dict(row), run, settings=settings, engine=engine)
        resumed.append(run)
    return resumed


def schedule_names(*, engine=None) -> list[tuple[str, str, str]]:
    """``(name, cron, timezone)`` of every enabled schedule."""
    engine = engine or db.get_engine()
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(
            "SELECT name, cron, timezone FROM schedules WHERE enabled ORDER BY name")).all()]


def fire_job(name: str) -> None:
    """APScheduler's entry point for a schedule's cron (a textual reference in the job store)."""
    fire_due(name)
