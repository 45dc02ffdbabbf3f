"""``llmbatch scheduler``: one leader, APScheduler with its job store in Postgres.

Leadership: a scheduler holds a session-level Postgres advisory lock on a
connection of its own while it leads; a second scheduler waits as standby and
takes over when the leader's connection goes away (a killed process loses its
socket, so Postgres releases the lock at once). APScheduler 3 does not support
two schedulers sharing one job store, so only the leader starts it. Even a
split brain could not double a run: each cron slot is a unique row of
``schedule_runs`` (schedules/recurring.py).

Jobs of the leader's APScheduler:
- ``schedule:NAME`` (Postgres job store, ``SQLAlchemyJobStore`` on our
  database, table ``apscheduler_jobs``): a recurring schedule's cron; fires
  ``recurring.fire_job``. Kept in step with the ``schedules`` table by ``sync``.
- ``tick`` (every ``scheduler_tick_s``, in memory): deadlines first (fail
  held requests past their deadline, release those at their latest start:
  schedules/deadlines.py), then the off-peak window
  (release while open, paced; hold unstarted batches while closed),
  background fill (only while ``tier.immediate`` and ``tier.peak`` are empty
  in the broker), provider batches (recover unconfirmed creations, carry out
  cancels, submit, poll, ingest).
- ``sync`` (every 2 s): schedules table → APScheduler jobs; catch-up of cron
  slots missed while no scheduler ran; queued runs whose predecessor ended.
- ``upkeep`` (every ``upkeep_every_s``): retention, stuck batches, budget periods.
- ``budget-reconcile`` (every ``budget_reconcile_every_s``): Redis budget counters against the ledger.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import psycopg

from pipeline.config import Settings, get_settings
from pipeline.constants import DISPATCHED_TIERS, queue_for
from pipeline.intake.tiers import rules_for
from pipeline.intake.windows import Window, cron_trigger
from pipeline.stores import db
from schedules import deadlines, pb_deadlines, pb_ingest, pb_queue, pb_submit, recurring, release, upkeep
from schedules.clock import Clock, get_clock

log = logging.getLogger(__name__)

LEADER_LOCK = 727006
JOBSTORE_TABLE = "apscheduler_jobs"
SYNC_EVERY_S = 2.0


def broker_depth(settings: Settings, queues=tuple(queue_for(t) for t in DISPATCHED_TIERS)) -> int:
    """Messages waiting in the Celery queues (Redis lists; kombu's priority lists included)."""
    import redis
    r = redis.Redis.from_url(settings.redis_url, socket_timeout=2)
    total = 0
    for q in queues:
        total += r.llen(q)
        for suffix in (3, 6, 9):   # kombu's Redis priority steps: "<queue>\x06\x16<n>"
            total += r.llen(f"{q}\x06\x16{suffix}")
    return total


class Ticker:
    """The decisions of one tick, kept apart from APScheduler so tests can call them directly."""

    def __init__(self, settings: Settings, engine, clock: Clock, dispatcher=None):
        self.settings = settings
        self.engine = engine
        self.clock = clock
        self.window = Window.offpeak(settings)
        self.dispatcher = dispatcher
        self.was_open: bool | None = None

    def _kw(self):
        return {"engine": self.engine} | ({"dispatcher": self.dispatcher} if self.dispatcher else {})

    def deadlines(self) -> dict:
        """Before the window: a deadline outranks the window's pacing and priority order."""
        now = self.clock.now()
        missed = deadlines.expire_missed(now, engine=self.engine)
        released = deadlines.release_due(now, rules_for(self.settings), **self._kw())
        return {"missed": missed, "released": released}

    def offpeak(self) -> dict:
        now = self.clock.now()
        is_open = self.window.is_open(now)
        if is_open != self.was_open:
            log.info("off-peak window %s at %s (next change %s)", "open" if is_open else "closed",
                     now.isoformat(), self.window.next_change(now))
            self.was_open = is_open
        if not is_open:
            held = release.hold_unstarted(("offpeak",), engine=self.engine)
            if held:
                log.info("off-peak window closed: %d released batches not started are held again", len(held))
            return {"open": False, "released": 0, "held_again": len(held)}
        room = self.settings.release_max_waiting["offpeak"] - release.waiting("offpeak", engine=self.engine)
        n = min(self.settings.release_per_tick["offpeak"], room)
        released = release.release_held(("offpeak",), limit=n, **self._kw())
        if released:
            log.info("off-peak: released %d batches", len(released))
        return {"open": True, "released": len(released)}

    def background(self) -> dict:
        depth = broker_depth(self.settings)
        if depth:
            return {"idle": False, "depth": depth, "released": 0}
        room = self.settings.release_max_waiting["background"] - release.waiting("background", engine=self.engine)
        n = min(self.settings.release_per_tick["background"], room)
        released = release.release_held(("background",), limit=n, **self._kw())
        if released:
            log.info("background: immediate and peak queues idle, released %d batches", len(released))
        return {"idle": True, "depth": 0, "released": len(released)}

    def provider(self) -> dict:
        # in one thread, in this order: holds of batches ingested but not settled are settled (they
        # free room for what is sent next), an unconfirmed creation is resolved (adopted, or sent
        # again) before new work is sent, and a cancel is carried out before the next poll
        settled = pb_ingest.settle_unsettled(settings=self.settings, engine=self.engine)
        creating = pb_submit.recover_creating(settings=self.settings, engine=self.engine)
        near = pb_deadlines.to_realtime_for_deadlines(self.clock.now(), self.settings, self.engine)
        cancels = pb_submit.carry_out_cancels(settings=self.settings, engine=self.engine)
        created = pb_submit.submit_held(settings=self.settings, engine=self.engine)
        ended = pb_ingest.poll_open(settings=self.settings, now=self.clock.now(), **self._kw())
        at_risk = pb_queue.at_risk(self.engine, self.settings, self.clock.now())
        return {"creating": creating, "cancels": cancels, "created": len(created), "ended": len(ended),
                "settled_late": settled, "deadlines": near, "results_at_risk": len(at_risk)}

    def price_windows(self) -> dict:
        """Work held for a model's price window goes when the window is open (pipeline/paths/window.py)."""
        released = release.release_price_windows(self.clock.now(), **self._kw())
        if released:
            log.info("price windows: released %d batches", len(released))
        return {"released": len(released)}

    def tick(self) -> dict:
        out = {}
        for name in ("deadlines", "offpeak", "background", "price_windows", "provider"):
            try:
                out[name] = getattr(self, name)()
            except Exception:   # one part failing must not stop the others
                log.exception("scheduler tick: %s failed", name)
        return out


class SchedulerService:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or get_settings()
        self.engine = db.get_engine()
        self.clock = get_clock(self.settings, self.engine)
        self.ticker = Ticker(self.settings, self.engine, self.clock)
        self.stopping = threading.Event()
        self.aps = None
        self.lock_conn = None

    # ---------------------------------------------------------- leadership

    def _try_lead(self) -> bool:
        try:
            if self.lock_conn is None or self.lock_conn.closed:
                self.lock_conn = psycopg.connect(self.settings.libpq_url, autocommit=True,
                                                 application_name=f"llmbatch-scheduler-{os.getpid()}")
            return bool(self.lock_conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()[0])
        except psycopg.Error as e:
            log.warning("scheduler: cannot reach Postgres for leadership: %s", e)
            self.lock_conn = None
            return False

    def _still_leader(self) -> bool:
        try:
            return bool(self.lock_conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s"
                " AND pid = pg_backend_pid() AND granted", (LEADER_LOCK,)).fetchone()[0])
        except psycopg.Error:
            return False

    # ---------------------------------------------------------- APScheduler

    def _start_aps(self) -> None:
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.jobstores.memory import MemoryJobStore
        from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
        from apscheduler.schedulers.background import BackgroundScheduler

        self.aps = BackgroundScheduler(
            jobstores={"default": SQLAlchemyJobStore(engine=self.engine, tablename=JOBSTORE_TABLE),
                       "internal": MemoryJobStore()},
            executors={"default": ThreadPoolExecutor(8)},
            job_defaults={"coalesce": True, "max_instances": 1,
                          "misfire_grace_time": int(self.settings.schedule_misfire_grace_s)},
            timezone="UTC")
        self.aps.start()
        s = self.settings
        self.aps.add_job(self.ticker.tick, "interval", seconds=s.scheduler_tick_s, id="tick",
                         jobstore="internal", next_run_time=_now())
        self.aps.add_job(self.sync, "interval", seconds=SYNC_EVERY_S, id="sync", jobstore="internal",
                         next_run_time=_now())
        self.aps.add_job(self.upkeep, "interval", seconds=s.upkeep_every_s, id="upkeep", jobstore="internal",
                         next_run_time=_now())
        self.aps.add_job(self.reconcile, "interval", seconds=s.budget_reconcile_every_s, id="budget-reconcile",
                         jobstore="internal", next_run_time=_now())

    def sync(self) -> None:
        """schedules table → APScheduler jobs; catch up missed slots; start queued runs."""
        try:
            wanted = {f"schedule:{n}": (n, cron, tz) for n, cron, tz in recurring.schedule_names(engine=self.engine)}
            have = {j.id: j for j in self.aps.get_jobs(jobstore="default")}
            for job_id, job in have.items():
                if job_id not in wanted:
                    self.aps.remove_job(job_id, jobstore="default")
                    log.info("schedule %s removed", job_id.split(":", 1)[1])
            for job_id, (name, cron, tz) in wanted.items():
                label = f"{name} [{cron} {tz}]"
                if job_id in have and have[job_id].name == label:
                    continue
                self.aps.add_job("schedules.recurring:fire_job", cron_trigger(cron, tz), args=[name], id=job_id,
                                 name=label, jobstore="default", replace_existing=True)
                log.info("schedule %s: cron %s (%s) registered", name, cron, tz)
            for _, (name, _, _) in wanted.items():
                recurring.fire_due(name, settings=self.settings, engine=self.engine, clock=self.clock)
                recurring.drain_queued(name, settings=self.settings, engine=self.engine)
        except Exception:
            log.exception("scheduler sync failed")

    def upkeep(self) -> None:
        try:
            out = upkeep.run_upkeep(settings=self.settings, engine=self.engine, clock=self.clock)
            log.debug("upkeep: %s", out)
        except Exception:
            log.exception("scheduler upkeep failed")

    def reconcile(self) -> None:
        try:
            upkeep.budget_reconcile(settings=self.settings, engine=self.engine)
        except Exception as e:   # Redis or Postgres away: the next run tries again
            log.warning("budget reconcile failed: %s", e)

    # ---------------------------------------------------------- main loop

    def run(self, max_seconds: float | None = None) -> int:
        started = time.monotonic()
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        db.upgrade(self.engine)

        def expired():
            return max_seconds is not None and time.monotonic() - started > max_seconds

        leading = self._try_lead()
        log.info("scheduler ready (%s; clock %s; off-peak window %s → %s %s)",
                 "leader" if leading else "standby: another scheduler leads", self.settings.clock,
                 self.settings.offpeak_open_cron, self.settings.offpeak_close_cron, self.settings.offpeak_timezone)
        while not leading and not self.stopping.wait(1.0) and not expired():
            leading = self._try_lead()
            if leading:
                log.info("scheduler: leadership taken over")
        if not leading:
            return 0
        recurring.resume_orphans(settings=self.settings, engine=self.engine)
        self._start_aps()
        code = 0
        try:
            while not self.stopping.wait(1.0) and not expired():
                if not self._still_leader():
                    log.error("scheduler: lost the leader lock (Postgres connection gone): stopping")
                    code = 1
                    break
        finally:
            self.aps.shutdown(wait=True)
            try:
                self.lock_conn.close()
            except Exception:
                pass
            log.info("scheduler stopped")
        return code


def _now():
    from datetime import datetime, timezone
    return datetime.now(timezone.utc)
