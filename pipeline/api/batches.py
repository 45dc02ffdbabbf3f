"""OpenAI batches as llmbatch jobs: create, read (moving the status on), list, cancel.

A batch is a job submitted exactly as ``llmbatch submit`` submits one (pipeline/intake/producer.py
``submit_file``, run in a thread of the service): its lines are validated, priced and published to
Kafka, so tiers, caps (the job's, its project's, the global ones), the cache and the path chooser
all apply. Its status follows its job (``shapes.next_status``), moved on whenever it is read; at
``finalizing`` the output and error files are written (pipeline/api/files.py) with no lock held,
and recorded in the transaction that moves it to its end. A batch row is locked (``FOR UPDATE``)
while it moves, so a batch names one output file however many readers wrote one.

Never a half batch: the row is written before the submit starts, and a submit that fails as a
whole (Kafka out of reach, the file unusable) ends the batch ``failed`` with the reason.
"""

from __future__ import annotations

import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy as sa

from pipeline.api import files
from pipeline.api.shapes import (
    ENDED, MAX_ERRORS_LISTED, WINDOW, ApiError, CreateBatch, batch_object, job_options, next_status, not_found,
    public_status, utcnow,
)
from pipeline.config import Settings
from pipeline.constants import ANTHROPIC_MESSAGES_URL, JOB_OPEN
from pipeline.errors import LLMBatchError
from pipeline.intake.producer import new_job_id, submit_file
from pipeline.stores import db, jobs

log = logging.getLogger(__name__)

#: a batch whose job row never appeared this long after it was created: its submit died first
SUBMIT_LOST_S = 300
_COLUMNS = ("batch_id, project_id, job_id, input_file_id, endpoint, completion_window, metadata, status,"
            " output_expires_s, output_file_id, error_file_id, failure, created_at, expires_at, in_progress_at,"
            " finalizing_at, completed_at, failed_at, expired_at, cancelling_at, cancelled_at")
#: the column each status stamps when a batch enters it
_STAMP = {"in_progress": "in_progress_at", "finalizing": "finalizing_at", "completed": "completed_at",
          "failed": "failed_at", "expired": "expired_at", "cancelling": "cancelling_at", "cancelled": "cancelled_at"}


class Submitter:
    """Runs the submits of new batches, a few at a time, in this process."""

    def __init__(self, settings: Settings, engine, workers: int = 2):
        self.settings, self.engine = settings, engine
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="submit")
        self.running: set[str] = set()
        self._lock = threading.Lock()

    def start(self, batch: dict, path: str, options: dict) -> None:
        with self._lock:
            self.running.add(batch["batch_id"])
        self.pool.submit(self._run, batch, path, options)

    def _run(self, batch: dict, path: str, options: dict) -> None:
        try:
            # a message batch's lines are Anthropic's ({custom_id, params}), which name no url
            endpoint = None if batch["endpoint"] == ANTHROPIC_MESSAGES_URL else batch["endpoint"]
            report = submit_file(path, settings=self.settings, job_id=batch["job_id"], name=batch["batch_id"],
                                 project=batch["project_id"], endpoint=endpoint, **options)
            log.info("batch %s: job %s accepted %d lines, rejected %d", batch["batch_id"], batch["job_id"],
                     report.accepted, report.rejected)
            with self.engine.connect() as conn:
                cancelled = conn.execute(sa.text("SELECT status FROM api_batches WHERE batch_id = :b"),
                                         {"b": batch["batch_id"]}).scalar() == "cancelling"
            if cancelled:   # cancelled while its file was read: the job it made stops now
                jobs.cancel_job(batch["job_id"], settings=self.settings, engine=self.engine)
        except LLMBatchError as e:
            log.warning("batch %s: submit failed: %s", batch["batch_id"], e)
            self.fail(batch["batch_id"], str(e))
        except Exception as e:   # never leave a batch validating for ever
            log.exception("batch %s: submit failed", batch["batch_id"])
            self.fail(batch["batch_id"], f"internal error while reading the file: {type(e).__name__}")
        finally:
            with self._lock:
                self.running.discard(batch["batch_id"])

    def fail(self, batch_id: str, why: str) -> None:
        """End a batch still validating as failed, with the reason."""
        with self.engine.begin() as conn:
            conn.execute(sa.text(
                "UPDATE api_batches SET status = 'failed', failed_at = now(), failure = :w"
                " WHERE batch_id = :b AND status = 'validating'"), {"b": batch_id, "w": why})

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def recover(engine, settings: Settings, submitter: Submitter) -> dict[str, int]:
    """At start: the batches a stopped service left ``validating``. One whose job the submit had
    not made, or had not finished, is submitted again from its first line under the same job id
    (the batcher writes a (job, custom_id) once, so lines published twice count once); one whose
    job the scheduler's upkeep already closed with the lines that arrived is failed and its job
    cancelled: never a batch that runs part of its file as if it were all of it."""
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.text(
            f"SELECT {', '.join('b.' + c.strip() for c in _COLUMNS.split(','))}, f.path"
            " FROM api_batches b JOIN api_files f ON f.file_id = b.input_file_id"
            " WHERE b.status = 'validating' ORDER BY b.created_at")).mappings()]
    out = {"resubmitted": 0, "failed": 0}
    for row in rows:
        with engine.begin() as conn:
            job = conn.execute(sa.text("SELECT status FROM jobs WHERE job_id = :j FOR UPDATE"),
                               {"j": row["job_id"]}).scalar()
            if job is not None and job != "submitting":
                _stamp(conn, row["batch_id"], "failed", ", failure = :w",
                       {"w": "the service stopped while it read the file, and the lines it had read were closed"
                             " as a job of their own; create the batch again"})
        if job is None or job == "submitting":
            try:
                options = job_options(row["metadata"] or {})
            except ApiError as e:   # checked at create: only a rule changed since makes this
                submitter.fail(row["batch_id"], e.message)
                continue
            submitter.start(row, row.pop("path"), options)
            out["resubmitted"] += 1
        else:
            jobs.cancel_job(row["job_id"], settings=settings, engine=engine)
            out["failed"] += 1
    if rows:
        log.warning("batches left validating by a service that stopped: %d submitted again, %d failed",
                    out["resubmitted"], out["failed"])
    return out


def create(engine, submitter: Submitter, project_id: str, spec: CreateBatch) -> dict:
    """A new batch for the caller's uploaded file; its submit starts at once."""
    with engine.begin() as conn:
        f = files.get_file(conn, project_id, spec.input_file_id)
        if f["purpose"] != "batch":
            raise ApiError(400, f"File {spec.input_file_id} has purpose {f['purpose']!r}, not 'batch'.",
                           param="input_file_id")
        now = utcnow()
        row = conn.execute(sa.text(
            f"INSERT INTO api_batches (batch_id, project_id, job_id, input_file_id, endpoint, completion_window,"
            f" metadata, output_expires_s, created_at, expires_at)"
            f" VALUES (:b, :p, :j, :f, :e, '24h', CAST(:m AS jsonb), :o, :c, :x) RETURNING {_COLUMNS}"),
            {"b": "batch_" + secrets.token_hex(12), "p": project_id, "j": new_job_id(), "f": spec.input_file_id,
             "e": spec.endpoint, "m": db.dumps(spec.metadata) if spec.metadata is not None else None,
             "o": spec.output_expires_s, "c": now, "x": now + WINDOW}).mappings().one()
    submitter.start(dict(row), f["path"], spec.options)
    return render(engine, dict(row))


def _row(conn, project_id: str, batch_id: str, lock: bool = False) -> dict:
    row = conn.execute(sa.text(
        f"SELECT {_COLUMNS} FROM api_batches WHERE batch_id = :b AND project_id = :p"
        + (" FOR UPDATE" if lock else "")), {"b": batch_id, "p": project_id}).mappings().first()
    if row is None:
        raise not_found("batch", batch_id)
    return dict(row)


def _job(conn, job_id: str) -> dict | None:
    row = conn.execute(sa.text(
        "SELECT status, accepted, rejected, created_at, submitted_at,"
        " (SELECT count(*) FROM requests r WHERE r.job_id = j.job_id AND r.status = 'running') AS running"
        " FROM jobs j WHERE job_id = :j"), {"j": job_id}).mappings().first()
    return dict(row) if row else None


def _stamp(conn, batch_id: str, status: str, extra: str = "", params: dict | None = None) -> None:
    col = _STAMP.get(status)
    conn.execute(sa.text(
        f"UPDATE api_batches SET status = :s{f', {col} = coalesce({col}, now())' if col else ''}{extra}"
        " WHERE batch_id = :b"), {"s": status, "b": batch_id, **(params or {})})


def advance(engine, settings: Settings, submitter: Submitter | None, project_id: str, batch_id: str) -> dict:
    """Move the batch on as far as its job allows; returns its row.

    A move to an end needs the output and error files: they are written with no lock held
    (``files.write_outputs``), then the move is made again under the row's lock and recorded with
    them, unless another reader made it meanwhile (its files are the batch's; these are dropped)."""
    staged: tuple | None = None   # ((from, to), files written for that move, not recorded yet)
    try:
        for _ in range(8):   # validating → in_progress → finalizing → (files) → completed, with room for expiring
            write = None
            with engine.begin() as conn:
                row = _row(conn, project_id, batch_id, lock=True)
                job = _job(conn, row["job_id"])
                now = utcnow()
                if row["status"] == "finalizing":
                    status = "completed"
                else:
                    status = next_status(row["status"], job, running=job["running"] if job else 0, now=now,
                                         expires_at=row["expires_at"],
                                         submitting=submitter is not None and batch_id in submitter.running)
                if (status == row["status"] == "validating" and job is None
                        and (submitter is None or batch_id not in submitter.running)
                        and (now - row["created_at"]).total_seconds() > SUBMIT_LOST_S):
                    _stamp(conn, batch_id, "failed", ", failure = :w",
                           {"w": "the service stopped before the file reached the pipeline; create the batch again"})
                    continue
                stop = status in ("cancelling", "expiring") and job is not None and job["status"] in JOB_OPEN
                if status == row["status"] and not stop:
                    return row
                if status not in ("completed", "cancelled", "expired"):
                    if row["status"] == "validating" and status not in ("validating", "failed") and job is not None:
                        # in progress since its submit ended, also when a read finds it further on already
                        conn.execute(sa.text("UPDATE api_batches SET in_progress_at = coalesce(:t, now())"
                                             " WHERE batch_id = :b"), {"t": job.get("submitted_at"), "b": batch_id})
                    _stamp(conn, batch_id, status)
                elif staged is not None and staged[0] == (row["status"], status):
                    ids = {kind: f.record(conn) for kind, f in staged[1].items()}
                    staged = None
                    _stamp(conn, batch_id, status, ", output_file_id = :o, error_file_id = :e",
                           {"o": ids.get("output"), "e": ids.get("error")})
                else:
                    write = status   # its files first, with the lock given up
            if write is not None:
                if staged is not None:   # written for a move another reader made differently
                    for f in staged[1].values():
                        f.discard()
                staged = ((row["status"], write), files.write_outputs(engine, settings, row, write))
            elif stop:   # the window is over or the client cancelled: stop the job (also one its submit made late)
                jobs.cancel_job(row["job_id"], settings=settings, engine=engine)
    finally:
        if staged is not None:
            for f in staged[1].values():
                f.discard()
    with engine.connect() as conn:
        return _row(conn, project_id, batch_id)


def advance_open(engine, settings: Settings, submitter: Submitter | None, limit: int = 500) -> int:
    """Move on every batch that has not ended, read or not (the service does it every few seconds):
    a client that never polls still gets its files written when its job ends. Returns how many moved."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT project_id, batch_id, status FROM api_batches"
            " WHERE status <> ALL(:ended) ORDER BY created_at LIMIT :n"), {"ended": list(ENDED), "n": limit}).all()
    moved = 0
    for project_id, batch_id, status in rows:
        try:
            moved += advance(engine, settings, submitter, project_id, batch_id)["status"] != status
        except Exception as e:   # one batch never stops the others; the next round tries again
            log.warning("batch %s: could not move it on: %s", batch_id, e)
    return moved


def render(engine, row: dict) -> dict:
    """The batch object: the row, its job's counts, usage and rejected lines."""
    with engine.connect() as conn:
        counts = conn.execute(sa.text(
            "SELECT j.accepted AS total,"
            " count(*) FILTER (WHERE r.status = 'succeeded') AS completed,"
            " count(*) FILTER (WHERE r.status = ANY(llmbatch_states('request_terminal'))"
            "                 AND r.status <> 'succeeded') AS failed"
            " FROM jobs j LEFT JOIN requests r ON r.job_id = j.job_id WHERE j.job_id = :j GROUP BY j.job_id"),
            {"j": row["job_id"]}).mappings().first()
        usage = conn.execute(sa.text(
            "SELECT coalesce(sum(input_tokens), 0) AS i, coalesce(sum(cached_input_tokens), 0) AS c,"
            " coalesce(sum(output_tokens), 0) AS o FROM results WHERE job_id = :j"),
            {"j": row["job_id"]}).mappings().one()
        rejections = [dict(r) for r in conn.execute(sa.text(
            "SELECT line, custom_id, reason FROM rejections WHERE job_id = :j ORDER BY line LIMIT :n"),
            {"j": row["job_id"], "n": MAX_ERRORS_LISTED}).mappings()]
    obj = batch_object({**row, "status": public_status(row["status"])}, dict(counts) if counts else None,
                       rejections, usage={"input_tokens": int(usage["i"]),
                                          "input_tokens_details": {"cached_tokens": int(usage["c"])},
                                          "output_tokens": int(usage["o"]),
                                          "output_tokens_details": {"reasoning_tokens": 0},
                                          "total_tokens": int(usage["i"]) + int(usage["o"])})
    return obj


def _openai_only(batch_id: str) -> None:
    """A message batch (pipeline/api/anthropic_batches.py) is not an OpenAI batch: 404 here."""
    if not batch_id.startswith("batch_"):
        raise not_found("batch", batch_id)


def retrieve(engine, settings: Settings, submitter, project_id: str, batch_id: str) -> dict:
    _openai_only(batch_id)
    return render(engine, advance(engine, settings, submitter, project_id, batch_id))


def cancel(engine, settings: Settings, submitter, project_id: str, batch_id: str) -> dict:
    """Stop the batch's job (held and queued work at once, calls in flight finish): ``cancelling``,
    then ``cancelled`` with the partial results once nothing of it runs."""
    _openai_only(batch_id)
    stop(engine, settings, project_id, batch_id)
    return retrieve(engine, settings, submitter, project_id, batch_id)


def stop(engine, settings: Settings, project_id: str, batch_id: str) -> None:
    """``cancelling`` and the job cancelled; 409 for a batch that has ended or is finalizing."""
    with engine.begin() as conn:
        row = _row(conn, project_id, batch_id, lock=True)
        if row["status"] in ("completed", "failed", "expired", "cancelled", "finalizing"):
            raise ApiError(409, f"Cannot cancel a batch with status '{public_status(row['status'])}'.")
        if row["status"] != "cancelling":
            _stamp(conn, batch_id, "cancelling")
    jobs.cancel_job(row["job_id"], settings=settings, engine=engine)


def list_batches(engine, settings: Settings, submitter, project_id: str, after: str | None, limit: int) -> dict:
    """The project's batches, newest first, ``limit`` after the batch ``after``."""
    with engine.connect() as conn:
        params = {"p": project_id, "n": limit + 1, "m": ANTHROPIC_MESSAGES_URL}
        where = "project_id = :p AND endpoint <> :m"
        if after:
            _openai_only(after)
            anchor = _row(conn, project_id, after)
            where += " AND (created_at, batch_id) < (:c, :a)"
            params.update(c=anchor["created_at"], a=after)
        ids = conn.execute(sa.text(
            f"SELECT batch_id FROM api_batches WHERE {where} ORDER BY created_at DESC, batch_id DESC LIMIT :n"),
            params).scalars().all()
    data = [retrieve(engine, settings, submitter, project_id, b) for b in ids[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(ids) > limit}

