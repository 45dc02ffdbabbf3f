"""Provider batches as an operator runs them (issue 21, item 2): the provider's batch queue, lines it
did not run, and its results copied before it deletes them. Used by schedules/pb_submit.py and
schedules/pb_ingest.py.

- **The batch queue** (``queue_room``, ``admit``): OpenAI limits the prompt tokens enqueued per model
  (batches not yet ended); a batch over it fails at validation with ``token_limit_exceeded``. Held
  work is sent only as far as our own open provider batches of the model leave room under
  ``provider_batch_queue_tokens``; the rest waits held (unreserved) for the next tick. A request
  larger than the whole limit can never be batched: it goes to realtime. When the provider still
  fails a batch for the limit (a model with no known limit, or another client of the organisation
  filling the queue), its lines are held again unbilled (``pb_submit._abandon``) and the model's
  batches wait (``queue_room`` 0) until one of ours ends or ``provider_batch_queue_retry_s`` passes.
- **Lines not run** (``split_not_run``): a line the provider did not run (expired, a batch that
  expired or failed, a retryable error: 408, 409, 429, 5xx, 529) is resubmitted alone in a new
  provider batch when its deadline leaves time for one (24 h plus ``provider_batch_deadline_lead_s``)
  and it has been resubmitted fewer than ``provider_batch_resubmits`` times; otherwise it falls back
  as its job says (realtime, or fail). Lines that finished are never sent again, and a line the
  provider ran (billed) is never resubmitted: only lines with no answer, or with a retryable
  error the provider does not bill, are.
- **Retention** (``expires_after``, ``copy_results``, ``at_risk``): each provider batch records
  when the provider deletes its results; the scheduler polls those nearest to it first, copies the
  result lines into Postgres (``provider_batch_results``) in their own transaction before the ingest
  reads them (a failed ingest reads the copy next tick, without the provider), and raises an alert
  for a batch still not copied ``provider_batch_copy_margin_s`` before its results go.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from pipeline import metrics
from pipeline.config import Settings
from pipeline.paths.provider_batch import PROVIDER_BATCH
from pipeline.paths.realtime import REALTIME
from pipeline.stores import db

log = logging.getLogger(__name__)

#: Anthropic keeps a batch's results this long after its creation
ANTHROPIC_RESULTS_KEEP = timedelta(days=29)
#: what a batch's lines may take at the provider: the completion window of both Batch APIs
BATCH_WINDOW = timedelta(hours=24)
#: result-line statuses the provider does not bill and a new batch may answer
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
#: why a line was not run, when that was our doing (a cancel: ours, or for a deadline): never resubmitted
NOT_RESUBMITTED = frozenset({"canceled", "batch_cancelled", "cancelled"})
TOKEN_LIMIT = "token_limit_exceeded"


# ------------------------------------------------------------------ the batch queue

def queue_room(conn, settings: Settings, provider: str, model: str) -> int | None:
    """Prompt tokens ``model`` may still enqueue at ``provider`` (None: no known limit): its limit
    less the tokens of our provider batches of the model not yet ended. After a recent
    ``token_limit_exceeded`` (within ``provider_batch_queue_retry_s``): 0 while one of ours is still
    open; else the limit is taken as below half the smallest batch refused (the provider's figure is
    not told), so the next batch is smaller."""
    row = conn.execute(sa.text(
        "SELECT coalesce(sum(input_tokens) FILTER (WHERE status = ANY(llmbatch_states('provider_batch_open'))), 0),"
        " count(*) FILTER (WHERE status = ANY(llmbatch_states('provider_batch_open'))),"
        " min(input_tokens) FILTER (WHERE status = 'abandoned' AND error LIKE :refused"
        "                           AND ended_at > now() - make_interval(secs => :retry))"
        " FROM provider_batches WHERE provider = :p AND model = :m"),
        {"p": provider, "m": model, "refused": f"{TOKEN_LIMIT}%", "retry": settings.provider_batch_queue_retry_s}).one()
    enqueued, open_batches, refused = int(row[0]), int(row[1]), row[2]
    limit = settings.provider_batch_queue_tokens.get(model)
    if refused is not None:
        if open_batches:
            return 0
        limit = refused // 2 if limit is None else min(int(limit), refused // 2)
    return None if limit is None else max(0, int(limit) - enqueued)


def admit(tokens: list[int], room: int | None, limit: int | None) -> tuple[list[int], list[int]]:
    """Which requests (by index, in order) go out now: ``(admitted, too_big)``. The admitted are
    the longest run from the start whose tokens fit in ``room`` (None: all), skipping those larger
    than the whole known ``limit`` (``too_big``: they can never be batched)."""
    admitted, too_big, used, full = [], [], 0, False
    for i, t in enumerate(tokens):
        if limit is not None and t > limit:
            too_big.append(i)
        elif not full and (room is None or used + t <= room):
            admitted.append(i)
            used += t
        else:
            full = True   # in order: nothing after the first that waits jumps ahead of it
    return admitted, too_big


# ------------------------------------------------------------------ lines not run

@dataclass(frozen=True)
class NotRun:
    """A request a provider batch did not answer: ``why`` (the provider's word or ``error_<status>``),
    its ``deadline`` and how many times it was resubmitted already."""

    key: object
    why: str
    deadline: datetime | None
    resubmits: int


def split_not_run(items: list[NotRun], now: datetime, settings: Settings) -> tuple[list, list]:
    """``(resubmit, fall_back)`` keys: a new provider batch when it may still end before the
    deadline and the resubmits allowed are not used up; the job's fallback otherwise."""
    latest = now + BATCH_WINDOW + timedelta(seconds=settings.provider_batch_deadline_lead_s)
    again, back = [], []
    for it in items:
        ok = (it.why not in NOT_RESUBMITTED and it.resubmits < settings.provider_batch_resubmits
              and (it.deadline is None or it.deadline >= latest))
        (again if ok else back).append(it.key)
    return again, back


def retryable(status_code) -> bool:
    return status_code in RETRYABLE_STATUS


def resubmit(conn, reqs: list, why: dict) -> list[str]:
    """Put ``reqs`` (Requests) in new held provider-batch batches (per tier, provider and model), one
    more resubmit each; the next tick sends them. Returns the new batch ids."""
    return _move(conn, reqs, PROVIDER_BATCH.name, "held", why, resubmits=1,
                 note="the provider batch did not run it ({why}): resubmitted")


def to_realtime(conn, reqs: list, why: dict | None = None) -> list[tuple[str, str, str]]:
    """Move ``reqs`` to new realtime batches (per tier, provider and model): held tiers wait for
    release, others are to be dispatched. Returns ``(batch id, tier, state)``."""
    out = []
    for tier, ids in _by_tier(reqs).items():
        state = REALTIME.initial_status(tier)
        out += [(b, tier, state) for b in _move(conn, ids, REALTIME.name, state, why or {},
                                                  note="the provider batch did not run it: realtime")]
    log.info("%d requests a provider batch did not run go to realtime batches %s", len(reqs), [b for b, _, _ in out])
    return out


def _by_tier(reqs: list) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in reqs:
        out.setdefault(r.tier, []).append(r)
    return out


def _move(conn, reqs: list, mode: str, state: str, why: dict, *, note: str, resubmits: int = 0) -> list[str]:
    groups: dict[tuple, list] = {}
    for r in reqs:
        groups.setdefault((r.tier, r.provider, r.model), []).append(r)
    out = []
    for (tier, provider, model), rs in groups.items():
        batch_id = "b_" + uuid.uuid4().hex
        conn.execute(sa.text(
            "INSERT INTO batches (batch_id, tier, provider, model, size, status, mode)"
            " VALUES (:b, :t, :p, :m, :n, :s, :mode)"),
            {"b": batch_id, "t": tier, "p": provider, "m": model, "n": len(rs), "s": state, "mode": mode})
        conn.execute(sa.text(
            "UPDATE requests r SET batch_id = :b, status = :s, batch_resubmits = r.batch_resubmits + :k,"
            " path_reason = left(coalesce(r.path_reason, '') || '; ' || x.note, 600)"
            " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(job_id text, custom_id text, note text)"
            " WHERE r.job_id = x.job_id AND r.custom_id = x.custom_id"),
            {"b": batch_id, "s": state, "k": resubmits, "rows": db.dumps([
                {"job_id": r.job_id, "custom_id": r.custom_id,
                 "note": note.format(why=why.get((r.job_id, r.custom_id), "not run"))} for r in rs])})
        out.append(batch_id)
    return out


# ------------------------------------------------------------------ retention

def expires_after(fmt: str, settings: Settings) -> timedelta:
    """How long after its creation a provider batch's results are surely still there."""
    if fmt == "anthropic":
        return ANTHROPIC_RESULTS_KEEP
    return timedelta(seconds=settings.provider_batch_output_keep_s)


def copy_results(engine, pb_id: str, status: str, lines: list[dict]) -> None:
    """The result lines of ended provider batch ``pb_id``, into Postgres, in their own transaction."""
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM provider_batch_results WHERE provider_batch = :id"), {"id": pb_id})
        if lines:
            conn.execute(sa.text(
                "INSERT INTO provider_batch_results (provider_batch, seq, line)"
                " SELECT :id, x.seq, x.line FROM jsonb_array_elements(CAST(:lines AS jsonb))"
                " WITH ORDINALITY AS x(line, seq)"), {"id": pb_id, "lines": db.dumps(lines)})
        conn.execute(sa.text(
            "UPDATE provider_batches SET results_copied_at = now(), provider_status = :st WHERE id = :id"),
            {"id": pb_id, "st": status})


def copied(engine, pb_id: str) -> list[dict]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(
            "SELECT line FROM provider_batch_results WHERE provider_batch = :id ORDER BY seq"),
            {"id": pb_id}).scalars())


def at_risk(engine, settings: Settings, now: datetime) -> list[str]:
    """Provider batches whose results are not copied yet and go within ``provider_batch_copy_margin_s``
    of ``now`` (the scheduler's clock): logged at error level and counted, every tick."""
    with engine.connect() as conn:
        ids = list(conn.execute(sa.text(
            "SELECT id FROM provider_batches WHERE status = 'submitted' AND results_copied_at IS NULL"
            " AND results_expire_at < CAST(:cut AS timestamptz) ORDER BY results_expire_at"),
            {"cut": now + timedelta(seconds=settings.provider_batch_copy_margin_s)}).scalars())
    if ids:
        log.error("provider batches %s: results not copied yet, and the provider deletes them within %.0f h",
                  ids, settings.provider_batch_copy_margin_s / 3600)
        metrics.PROVIDER_BATCH_RESULTS_AT_RISK.set(len(ids))
    else:
        metrics.PROVIDER_BATCH_RESULTS_AT_RISK.set(0)
    return ids
