"""Jobs in ``provider_batch`` mode, through the providers' Batch APIs at half price.

The batcher writes such requests as ``held`` batches with ``mode =
'provider_batch'``. Every scheduler tick:

1. **reserve** (schedules/pb_reserve.py) — before anything is sent, each held
   request's maximum cost at the batch price is reserved against its job, tier
   and global caps, through the same async ``Budget`` the workers use
   (pipeline/paths/base.py ``reserve``, the path's reservation and hold expiry:
   pipeline/paths/provider_batch.py), on the scheduler's one event loop
   (schedules/loop.py), outside any transaction: the held work is read in a
   short transaction before, and the outcomes are recorded in a short one
   after, for the requests still held then. What fits is sent; a request a cap
   refuses is moved to a deferred batch with the reason in words
   (``requests.deferred_reason``); one only other live holds stand in front of
   stays held for the next tick; one whose maximum is above a cap itself (or is
   no amount) fails at once. Budget store down: nothing is sent.
2. **submit** — held provider-batch batches are packed by (provider, model)
   into provider batches within the provider's limits (requests and bytes per
   batch; a batch of ours that does not fit is split). One transaction records
   the provider batch (``creating``: the *intent*) and marks its batches
   ``submitted`` and their requests ``running``; then each attempt is counted
   and timed on the row (``create_attempts``, ``create_started_at``) before
   the JSONL is uploaded and the batch created (OpenAI Files + Batches,
   Anthropic Message Batches), without the SDK's hidden retries (a retried
   create is a second batch, billed twice). A creation the provider refused
   (a 4xx answer) puts everything back to ``held`` and frees the holds; one
   whose outcome is unknown (timeout, dropped connection, 5xx, or a scheduler
   that died) stays ``creating`` with its holds: its lines count as spent at
   their maximum until the provider says what it did.
2b. **recover** — every tick, before submitting, each ``creating`` row is
   looked for at the provider: OpenAI by the batch's metadata
   (``llmbatch_id``); Anthropic (no metadata) by the request count and the
   creation window (first attempt − clock skew .. last attempt +
   ``provider_batch_create_timeout_s`` + skew), among batches no row of ours
   owns, and once results exist by their custom_ids. One found is adopted
   (``submitted``); it is sent again only when the provider lists none and
   the last attempt is older than ``provider_batch_create_timeout_s``.
2c. **cancel** — ``cancel_job`` (pipeline/stores/jobs.py) sets ``cancel_requested`` on the job's
   provider batches whatever their state; the scheduler carries it out each
   tick until the provider confirms (``cancel_confirmed_at``): a batch created
   after the cancel is cancelled the moment its id is known, a ``creating``
   row the provider never created is closed without sending, one still being
   looked for waits. What the provider ran before the cancel took effect is
   ingested and billed; the rest is ``cancelled``, never re-queued.
3. **poll** and ingest: schedules/pb_ingest.py.

Provider custom_ids and request lines are the path's (pipeline/paths/provider_batch.py).

It must never hold a Postgres transaction open across a provider call, nor across
the budget store's calls.
"""

from __future__ import annotations

import logging
import uuid

import sqlalchemy as sa

from pipeline import errors
from pipeline.config import Settings, get_settings
from pipeline.constants import CHAT_URL, EMBEDDINGS_URL
from pipeline.endpoints.embeddings import input_count
from pipeline.endpoints.prompt_cache import in_groups
from pipeline.ids import request_key
from pipeline.money import caps
from pipeline.money.pricing import get_price_book
from pipeline.paths import base as sequence
from pipeline.paths.provider_batch import PROVIDER_BATCH, lines_to_send, provider_custom_id, request_line
from pipeline.providers import batch_api
from pipeline.providers.keys import NoUsableKey
from pipeline.providers.registry import get_registry
from pipeline.request import Outcome, Request
from pipeline.stores import db, jobs as job_store
from schedules import loop, pb_queue, pb_reserve

log = logging.getLogger(__name__)


def pack_by_endpoint(reqs: list, sizes: list[int], max_requests: int, max_bytes: int) -> list[tuple[int, int]]:
    """``pack`` within each run of one endpoint (``reqs`` sorted by it): a provider batch holds one
    url, as OpenAI requires of a batch's input file. An embeddings request counts its inputs
    against ``max_requests`` (OpenAI: at most 50,000 embedding inputs in a batch)."""
    def get(r, field):   # a typed Request (pipeline/request.py) or a row
        return r[field] if isinstance(r, dict) else getattr(r, field)

    chunks, start = [], 0
    for i in range(1, len(reqs) + 1):
        if i == len(reqs) or get(reqs[i], "endpoint") != get(reqs[start], "endpoint"):
            weights = ([input_count(get(r, "body")) for r in reqs[start:i]]
                       if get(reqs[start], "endpoint") == EMBEDDINGS_URL else None)
            chunks += [(start + a, start + b) for a, b in pack(sizes[start:i], max_requests, max_bytes, weights)]
            start = i
    return chunks


def pack(sizes: list[int], max_requests: int, max_bytes: int, weights: list[int] | None = None) -> list[tuple[int, int]]:
    """Split items of the given byte sizes into consecutive chunks ``[start, end)`` within both limits;
    ``weights``: what each item counts against ``max_requests`` (1 each by default)."""
    chunks, start, used, count = [], 0, 0, 0
    for i, size in enumerate(sizes):
        weight = weights[i] if weights else 1
        if i > start and (count + weight > max_requests or used + size > max_bytes):
            chunks.append((start, i))
            start, used, count = i, 0, 0
        used += size
        count += weight
    if start < len(sizes):
        chunks.append((start, len(sizes)))
    return chunks


# ------------------------------------------------------------------ submit

def submit_held(*, settings: Settings | None = None, engine=None, limit_batches: int = 2000) -> list[str]:
    """Send held provider-batch work to the providers, only what its caps can hold; returns our
    provider batch ids.

    Three steps, so that no transaction waits on Redis: a short transaction takes the held work
    (and what the provider's batch queue has no room for stays held); the reservations are made
    outside any transaction; a second short transaction locks the batches again and sends only the
    requests still held (a job cancelled meanwhile is not sent, and its holds are given back).
    """
    settings = settings or get_settings()
    engine = engine or db.get_engine()
    groups = _take_held(engine, settings, limit_batches)
    if not groups:
        return []
    budget = loop.budget(settings, engine)
    today = caps.period(settings, engine)
    held: list[str] = []   # reservations taken this tick: all given back if the send does not commit
    created: list[str] = []
    unsent: list[str] = []  # those of requests no longer held when the send locked them
    try:
        reserved, store_down = [], False
        for (provider, model), (ids, reqs) in groups.items():
            got = pb_reserve.reserve(budget, [] if store_down else reqs, today)
            held += [res.rid for _, res in got.fit]
            store_down = store_down or got.store_down
            reserved.append((provider, model, ids, got))
        with engine.begin() as conn:
            for provider, model, ids, got in reserved:
                made, gone = _send_reserved(conn, settings, provider, model, ids, got, today)
                created += made
                unsent += gone
    except BaseException:
        loop.run(budget.release_ids(held))
        raise
    if unsent:
        log.info("provider batches: %d requests left 'held' while reserved (their job cancelled): holds given back",
                 len(unsent))
        loop.run(budget.release_ids(unsent))
    for pb_id in created:
        _create_at_provider(pb_id, settings, engine)
    return created


def _take_held(engine, settings: Settings, limit_batches: int) -> dict[tuple[str, str], tuple[list, list]]:
    """The held provider-batch batches by (provider, model): ``(batch ids, requests the provider's
    batch queue has room for)``, in one short transaction."""
    groups: dict[tuple[str, str], tuple[list, list]] = {}
    with engine.begin() as conn:
        batches = conn.execute(sa.text(
            "SELECT batch_id, provider, model FROM batches"
            " WHERE status = 'held' AND mode = :mode ORDER BY created_at"
            " LIMIT :n FOR UPDATE SKIP LOCKED"), {"n": limit_batches, "mode": PROVIDER_BATCH.name}).mappings().all()
        by_model: dict[tuple[str, str], list] = {}
        for b in batches:
            by_model.setdefault((b["provider"], b["model"]), []).append(b["batch_id"])
        for (provider, model), ids in by_model.items():
            # a deferred batch whose time came (resume_due_batches) is held again: its requests too
            conn.execute(sa.text(
                "UPDATE requests SET status = 'held', deferred_scope = NULL, deferred_reason = NULL"
                " WHERE batch_id = ANY(:ids) AND status = 'deferred'"), {"ids": ids})
            reqs = [Request.from_row(r) for r in conn.execute(sa.text(
                "SELECT r.*, b.mode AS path, j.on_budget FROM requests r JOIN batches b ON b.batch_id = r.batch_id"
                " JOIN jobs j ON j.job_id = r.job_id"
                " WHERE r.batch_id = ANY(:ids) AND r.status = 'held'"
                " ORDER BY r.endpoint, r.batch_id, r.line, r.custom_id"),   # one url per provider batch
                {"ids": ids}).mappings()]
            groups[(provider, model)] = (ids, _admit(conn, reqs, settings, provider, model) if reqs else [])
    return groups


def _admit(conn, reqs: list[Request], settings: Settings, provider: str, model: str) -> list[Request]:
    """The requests the provider's batch queue has room for now (schedules/pb_queue.py): the rest stay
    held for a later tick; one larger than the whole limit goes to realtime."""
    room = pb_queue.queue_room(conn, settings, provider, model)
    limit = settings.provider_batch_queue_tokens.get(model)
    limit = None if limit is None else int(limit)   # from the environment, a string
    if room is None and limit is None:
        return reqs
    admitted, too_big = pb_queue.admit([r.bound.input_tokens for r in reqs], room, limit)
    if too_big:
        pb_queue.to_realtime(conn, [reqs[i] for i in too_big], {})
        log.warning("provider batches: %d %s requests are larger than the batch queue limit (%s tokens): realtime",
                    len(too_big), model, limit)
    waiting = len(reqs) - len(admitted) - len(too_big)
    if waiting:
        log.info("provider batches: %d %s requests wait for room in the batch queue (%s of %s tokens free)",
                 waiting, model, room, limit if limit is not None else "an unknown limit")
    return [reqs[i] for i in admitted]


def _send_reserved(conn, settings: Settings, provider: str, model: str, ids: list[str], got: pb_reserve.Reserved,
                   today: str) -> tuple[list[str], list[str]]:
    """Record one group's reservations and create its provider batches (``creating``) on ``conn``;
    returns (our provider batch ids, the holds of requests no longer held, to give back).

    The batches are locked again (the lock order of ``cancel_job``: batches first); only the
    requests still held in them are sent, deferred or failed: one whose job was cancelled since
    ``_take_held`` is left as the cancel left it."""
    locked = conn.execute(sa.text(
        "SELECT batch_id FROM batches WHERE batch_id = ANY(:ids) AND status = 'held'"
        " ORDER BY batch_id FOR UPDATE SKIP LOCKED"), {"ids": ids}).scalars().all()
    still = {(j, c) for j, c in conn.execute(sa.text(
        "SELECT job_id, custom_id FROM requests WHERE batch_id = ANY(:ids) AND status = 'held'"),
        {"ids": locked})} if locked else set()

    def held(r: Request) -> bool:
        return (r.job_id, r.custom_id) in still
    reqs = [r for r, _ in got.fit if held(r)]
    unsent = [res.rid for r, res in got.fit if not held(r)]
    defer: dict[tuple[str, str], list] = {}
    for r, e in got.defer:
        if held(r):
            defer.setdefault((r.batch_id, e.kind), []).append((r, e.kind, pb_reserve.defer_reason(r, e)))
    pb_reserve.record_period(conn, reqs, today)
    pb_reserve.apply_budget_outcomes(conn, reqs, defer, [(r, e) for r, e in got.fail if held(r)])
    # batches left with nothing to send (their job was cancelled, or the caps moved it) are done
    conn.execute(sa.text(
        "UPDATE batches b SET status = 'done', finished_at = now() WHERE b.batch_id = ANY(:ids)"
        " AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.batch_id = b.batch_id"
        "                 AND r.status <> ALL(llmbatch_states('request_terminal')))"), {"ids": locked})
    created = []
    if reqs:
        sizes = [len(request_line(r)) for r in reqs]
        fmt = batch_api.batch_format(provider)   # the Batch API's limits are its format's
        for start, end in pack_by_endpoint(reqs, sizes, *_limits(settings, fmt, provider, model)):
            pb_id = "pb_" + uuid.uuid4().hex[:20]
            chunk = reqs[start:end]
            sent = lines_to_send(chunk)   # the lines the provider gets: one per distinct cache key
            conn.execute(sa.text(
                "INSERT INTO provider_batches (id, provider, model, status, requests, bytes, input_tokens)"
                " VALUES (:id, :p, :m, 'creating', :n, :bytes, :tokens)"),
                {"id": pb_id, "p": provider, "m": model, "n": len(sent),
                 "bytes": sum(len(request_line(r)) for r in sent),
                 "tokens": sum(r.bound.input_tokens for r in sent)})
            _assign(conn, pb_id, chunk)
            created.append(pb_id)
    return created, unsent


def _assign(conn, pb_id: str, chunk: list) -> None:
    """Put ``chunk``'s requests in provider batch ``pb_id``; a batch of ours only partly in it is split."""
    by_batch: dict[str, list] = {}
    for r in chunk:
        by_batch.setdefault(r.batch_id, []).append((r.job_id, r.custom_id))
    for batch_id, keys in by_batch.items():
        remaining = conn.execute(sa.text(
            "SELECT count(*) FROM requests WHERE batch_id = :b AND status = 'held'"), {"b": batch_id}).scalar()
        target = batch_id
        if remaining > len(keys):   # split: the chunk's part becomes a batch of its own
            target = "b_" + uuid.uuid4().hex
            conn.execute(sa.text(
                "INSERT INTO batches (batch_id, tier, provider, model, size, status, mode)"
                " SELECT :new, tier, provider, model, :n, 'held', mode FROM batches WHERE batch_id = :b"),
                {"new": target, "n": len(keys), "b": batch_id})
            conn.execute(sa.text(
                "UPDATE requests r SET batch_id = :new FROM jsonb_to_recordset(CAST(:keys AS jsonb))"
                " AS x(job_id text, custom_id text)"
                " WHERE r.job_id = x.job_id AND r.custom_id = x.custom_id AND r.batch_id = :b"),
                {"new": target, "b": batch_id,
                 "keys": db.dumps([{"job_id": j, "custom_id": c} for j, c in keys])})
            conn.execute(sa.text("UPDATE batches SET size = size - :n WHERE batch_id = :b"),
                         {"n": len(keys), "b": batch_id})
        conn.execute(sa.text(
            "UPDATE batches SET status = 'submitted', provider_batch = :pb, dispatched_at = now(),"
            " started_at = now() WHERE batch_id = :b"), {"pb": pb_id, "b": target})
        conn.execute(sa.text(
            "UPDATE requests SET status = 'running', started_at = coalesce(started_at, now())"
            " WHERE batch_id = :b AND status = 'held'"), {"b": target})


def _limits(settings: Settings, fmt: str, provider: str, model: str) -> tuple[int, int]:
    """Requests and bytes of one provider batch: the settings' for the format, lowered by the price
    book's for the model (pipeline/data/pricing.json ``batch_limits``)."""
    requests, size = settings.provider_batch_max_requests[fmt], settings.provider_batch_max_bytes[fmt]
    try:
        price = get_price_book().resolve(model, provider)
    except errors.LLMBatchError:
        return requests, size
    return min(requests, price.batch_max_requests or requests), min(size, price.batch_max_bytes or size)


def running(rows: list[tuple[Request, dict]]) -> list[Request]:
    """The requests of ``pb_requests`` sent in the provider batch: those ``running`` (a request the caps
    failed at submit stays in its batch of ours, failed: it is never sent)."""
    return [r for r, state in rows if state["status"] == "running"]


def pb_requests(conn, pb_id: str) -> list[tuple[Request, dict]]:
    """The requests of provider batch ``pb_id``, each with its state: ``status``, ``batch_fallback``,
    ``job_status`` and ``batch_resubmits``."""
    rows = conn.execute(sa.text(
        "SELECT r.*, b.mode AS path, j.batch_fallback,"
        " j.status AS job_status FROM batches b JOIN requests r ON r.batch_id = b.batch_id"
        " JOIN jobs j ON j.job_id = r.job_id"
        " WHERE b.provider_batch = :pb ORDER BY r.batch_id, r.line, r.custom_id"), {"pb": pb_id}).mappings()
    return [(Request.from_row(r), {"status": r["status"], "batch_fallback": r["batch_fallback"],
                                   "job_status": r["job_status"], "batch_resubmits": r["batch_resubmits"]})
            for r in rows]


def _create_at_provider(pb_id: str, settings: Settings, engine, *, attempts: int = 0) -> str:
    """One attempt to create ``pb_id`` at the provider, made only if the row is still ``creating``,
    not cancelled, with ``attempts`` attempts so far (compare-and-set: two schedulers never both
    send it). The attempt is recorded before anything is sent. Returns ``created``, ``refused``
    (held again, holds freed), ``unknown`` (left for ``recover_creating``, holds kept) or ``skipped``."""
    try:
        key = _batch_key(pb_id, settings, engine)
    except NoUsableKey as e:   # nothing was sent; as in realtime, its requests fail with that reason
        log.warning("provider batch %s: not sent: %s", pb_id, e)
        _fail_unsent(engine, pb_id, e, settings)
        return "refused"
    with engine.begin() as conn:
        row = conn.execute(sa.text(
            "UPDATE provider_batches SET create_attempts = create_attempts + 1, create_started_at = now(),"
            " first_create_at = coalesce(first_create_at, now()),"
            " counts = coalesce(counts, '{}'::jsonb) || jsonb_build_object('key_alias',"
            "   coalesce(counts->>'key_alias', CAST(:k AS text)))"
            " WHERE id = :id AND status = 'creating' AND create_attempts = :n AND NOT cancel_requested"
            " RETURNING provider, counts->>'key_alias'"), {"id": pb_id, "n": attempts, "k": key}).first()
        if row is None:
            return "skipped"
        pb, key = row
        # one line per distinct cache key (chosen in stored order, as ingest's twins() reads it),
        # then each prompt-cache prefix group's lines together
        # only its running requests: one a cap failed before sending may share its batch of ours
        reqs = in_groups(lines_to_send(running(pb_requests(conn, pb_id))), lambda r: r.body)
    lines = [{"custom_id": provider_custom_id(r), "params": r.body} for r in reqs]
    content = b"".join(request_line(r) for r in reqs)
    def cancelled() -> bool:
        with engine.connect() as conn:
            return bool(conn.execute(sa.text("SELECT cancel_requested FROM provider_batches WHERE id = :id"),
                                     {"id": pb_id}).scalar())
    try:
        endpoint = reqs[0].endpoint if reqs else CHAT_URL   # one per provider batch (pack_by_endpoint)
        info = loop.run(batch_api.create(settings, pb_id, pb, content, lines, cancelled, endpoint=endpoint,
                                         key_alias=key))
    except batch_api.NotCreated as e:   # the provider said no: nothing to bill, back to held, next tick retries
        log.warning("provider batch %s (%s, %d requests): creation refused, held again: %s",
                    pb_id, pb, len(reqs), e)
        _abandon(engine, pb_id, f"create refused: {e}", settings)
        return "refused"
    except Exception as e:    # the provider may have created it: never send again before asking it
        log.warning("provider batch %s (%s, %d requests): creation not confirmed (%s: %s); its lines stay held"
                    " at their maximum until the provider is asked what it created", pb_id, pb, len(reqs),
                    type(e).__name__, e)
        return "unknown"
    _record_created(engine, pb_id, info, settings)
    log.info("provider batch %s: %s batch %s created on key %s, %d requests, %d bytes",
             pb_id, pb, info["provider_batch_id"], key, len(reqs), len(content))
    return "created"


def _batch_key(pb_id: str, settings: Settings, engine) -> str:
    """The alias of the key ``pb_id`` goes out on: the one it was first sent on (kept in
    ``provider_batches.counts``, so every attempt, poll and cancel asks the same account), else
    the live key with the most headroom on its model, chosen as realtime chooses; ``NoUsableKey``
    when every key of its provider is out of the rotation."""
    with engine.connect() as conn:
        provider, model, alias = conn.execute(sa.text(
            "SELECT provider, model, counts->>'key_alias' FROM provider_batches WHERE id = :id"),
            {"id": pb_id}).one()
    if alias is not None:
        return alias
    spec = get_registry().get(provider)
    return loop.run(loop.keys(settings, engine).best(provider, spec.keys, model)).alias


def _record_created(engine, pb_id: str, info: dict, settings: Settings) -> bool:
    """The provider's batch is ours: ``submitted``. A cancel asked for meanwhile is sent at once."""
    with engine.begin() as conn:
        row = conn.execute(sa.text(
            "UPDATE provider_batches SET status = 'submitted', provider_batch_id = :pbid,"
            " input_file_id = :fid, provider_status = :st, submitted_at = now(),"
            " results_expire_at = now() + make_interval(secs => :keep) WHERE id = :id"
            " AND status = 'creating' RETURNING provider, cancel_requested, counts->>'key_alias' AS key_alias"),
            {"id": pb_id, "pbid": info["provider_batch_id"], "fid": info["input_file_id"],
             "st": info["provider_status"], "keep": _keep_s(pb_id, engine, settings)}).first()
    if row is None:
        return False
    if row.cancel_requested:
        confirmed = batch_api.cancel_confirmed(row.provider)
        if info.get("cancel_status") in confirmed:
            job_store.confirm_cancel(engine, pb_id, info["cancel_status"], True)
        else:
            job_store.send_cancel(engine, pb_id, row.provider, info["provider_batch_id"], settings, run=loop.run,
                                  key_alias=row.key_alias)
    return True


def _keep_s(pb_id: str, engine, settings: Settings) -> float:
    """Seconds from now that ``pb_id``'s results surely stay at its provider (pb_queue.expires_after)."""
    with engine.connect() as conn:
        provider = conn.execute(sa.text("SELECT provider FROM provider_batches WHERE id = :id"), {"id": pb_id}).scalar()
    return pb_queue.expires_after(batch_api.batch_format(provider), settings).total_seconds()


def _abandon(engine, pb_id: str, reason: str, settings: Settings | None = None) -> None:
    """A provider batch the provider never created: its requests are held again (those of a
    cancelled job are cancelled), and their holds freed (the next tick reserves again)."""
    with engine.begin() as conn:
        conn.execute(sa.text(
            "UPDATE provider_batches SET status = 'abandoned', error = :e, ended_at = now() WHERE id = :id"),
            {"id": pb_id, "e": reason[:2000]})
        ids = conn.execute(sa.text(
            "UPDATE batches SET status = 'held', provider_batch = NULL, dispatched_at = NULL, started_at = NULL"
            " WHERE provider_batch = :id AND status = 'submitted' RETURNING batch_id"), {"id": pb_id}).scalars().all()
        keys = conn.execute(sa.text(
            "UPDATE requests r SET status = CASE WHEN j.status = 'cancelled' THEN 'cancelled' ELSE 'held' END,"
            " finished_at = CASE WHEN j.status = 'cancelled' THEN now() ELSE r.finished_at END"
            " FROM jobs j WHERE j.job_id = r.job_id AND r.batch_id = ANY(:ids) AND r.status = 'running'"
            " RETURNING r.job_id, r.custom_id, r.status"), {"ids": ids}).all()
        conn.execute(sa.text(
            "UPDATE batches b SET status = 'done', finished_at = now() WHERE b.batch_id = ANY(:ids)"
            " AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.batch_id = b.batch_id"
            "                 AND r.status <> ALL(llmbatch_states('request_terminal')))"), {"ids": ids})
        cancelled = {j for j, _, st in keys if st == "cancelled"}
        if cancelled:
            job_store.refresh_jobs(conn, cancelled)
    settings = settings or get_settings()
    budget = loop.budget(settings, engine)
    loop.run(budget.release_ids([request_key(j, c) for j, c, _ in keys]))


def _fail_unsent(engine, pb_id: str, error: NoUsableKey, settings: Settings) -> None:
    """A provider batch that cannot be sent (every key of its provider is out of the rotation):
    its requests fail with the reason, never retried for ever, and their holds are freed."""
    with engine.begin() as conn:
        # never attempted (a key, once chosen, is kept): nothing can have reached the provider
        if conn.execute(sa.text(
                "UPDATE provider_batches SET status = 'abandoned', error = :e, ended_at = now()"
                " WHERE id = :id AND status = 'creating' AND create_attempts = 0 RETURNING id"),
                {"id": pb_id, "e": str(error)[:2000]}).first() is None:
            return
        rows = [(r, state) for r, state in pb_requests(conn, pb_id) if state["status"] == "running"]
        reqs = [r for r, _ in rows]
        sequence.write(conn, [Outcome.cancelled(r, "the job was cancelled") if state["job_status"] == "cancelled"
                              else Outcome.failed(r, error.code, str(error)) for r, state in rows], [])
        conn.execute(sa.text("UPDATE batches SET status = 'done', finished_at = now()"
                             " WHERE provider_batch = :id AND status = 'submitted'"), {"id": pb_id})
        job_store.refresh_jobs(conn, {r.job_id for r in reqs})
    loop.run(loop.budget(settings, engine).release_ids([r.key for r in reqs]))


def _known_ids(engine):
    def known(ids: list[str]) -> set[str]:
        with engine.connect() as conn:
            return set(conn.execute(sa.text(
                "SELECT provider_batch_id FROM provider_batches WHERE provider_batch_id = ANY(:ids)"),
                {"ids": ids}).scalars())
    return known


def recover_creating(*, settings: Settings | None = None, engine=None) -> int:
    """Carry every ``creating`` row (the intent) to a decision the provider backs, once per tick.

    Never attempted (the scheduler died between the intent and the call): sent now, or closed
    if its job was cancelled. Attempted: looked for at the provider (OpenAI by metadata,
    Anthropic by count, window and custom_ids); found, it is adopted (and cancelled, if that
    was asked); sent again, or closed when cancelled, only when the provider lists none and the
    last attempt is older than ``provider_batch_create_timeout_s``. Until then its requests stay
    ``running`` and their holds stay: spent at their maximum, under the caps. Returns the rows seen.
    """
    settings = settings or get_settings()
    engine = engine or db.get_engine()
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.text(
            "SELECT id, provider, requests, create_attempts, cancel_requested, counts->>'key_alias' AS key_alias,"
            " extract(epoch FROM first_create_at)::float8 AS first_at,"
            " extract(epoch FROM create_started_at)::float8 AS last_at,"
            " coalesce(create_started_at < now() - make_interval(secs => :t), true) AS window_closed"
            " FROM provider_batches WHERE status = 'creating'"
            # the provider is asked at most once per poll interval per row
            " AND (create_attempts = 0 OR polled_at IS NULL OR polled_at < now() - make_interval(secs => :p))"
            " ORDER BY created_at"),
            {"t": settings.provider_batch_create_timeout_s, "p": settings.provider_batch_poll_s}).mappings()]
        for r in rows:
            if batch_api.batch_format(r["provider"]) == "anthropic" and r["create_attempts"]:
                sent = lines_to_send(running(pb_requests(conn, r["id"])))   # the lines it sent
                r["pids"] = {provider_custom_id(q) for q in sent}
    found: dict[str, tuple] = {}
    tried = [r for r in rows if r["create_attempts"]]
    by_provider: dict[tuple, list[dict]] = {}   # (provider, key alias): one listing of that account's batches
    for r in tried:
        if batch_api.batch_format(r["provider"]) == "anthropic":
            by_provider.setdefault((r["provider"], r["key_alias"]), []).append({
                "id": r["id"], "requests": r["requests"], "pids": r["pids"],
                "start": r["first_at"] - batch_api.CLOCK_SKEW_S,
                "end": r["last_at"] + settings.provider_batch_create_timeout_s + batch_api.CLOCK_SKEW_S})
    for (provider, key), intents in by_provider.items():
        try:
            found.update(loop.run(batch_api.find_anthropic(settings, intents, _known_ids(engine), provider,
                                                           key_alias=key)))
        except Exception as e:
            log.warning("provider batches: cannot list %s's batches to find %d unconfirmed creations: %s",
                        provider, len(intents), e)
    for r in tried:
        if batch_api.batch_format(r["provider"]) != "openai":
            continue
        try:
            hit = loop.run(batch_api.find_openai(settings, r["id"], r["first_at"], r["provider"],
                                                 key_alias=r["key_alias"]))
            found[r["id"]] = ("found", hit) if hit else ("none",)
        except Exception as e:
            log.warning("provider batch %s: cannot list OpenAI batches to find it: %s", r["id"], e)
    if found:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE provider_batches SET polled_at = now() WHERE id = ANY(:ids)"),
                         {"ids": list(found)})
    for r in rows:
        pb_id = r["id"]
        try:
            if not r["create_attempts"]:
                if r["cancel_requested"]:
                    _abandon(engine, pb_id, "cancelled before it was sent", settings)
                else:
                    _create_at_provider(pb_id, settings, engine, attempts=0)
                continue
            verdict = found.get(pb_id, ("unsure", "the provider could not be asked"))
            if verdict[0] == "found":
                if _record_created(engine, pb_id, verdict[1], settings):
                    log.warning("provider batch %s: adopted %s batch %s, created by an attempt whose answer"
                                " was lost", pb_id, r["provider"], verdict[1]["provider_batch_id"])
            elif verdict[0] == "none" and r["window_closed"]:
                if r["cancel_requested"]:
                    _abandon(engine, pb_id, "cancelled; the provider never created it", settings)
                    log.info("provider batch %s: cancelled, and the provider has no batch for it", pb_id)
                else:
                    log.warning("provider batch %s: the provider has no batch for it %d attempt(s) on; sending"
                                " it again", pb_id, r["create_attempts"])
                    _create_at_provider(pb_id, settings, engine, attempts=r["create_attempts"])
            else:
                log.info("provider batch %s: creation unconfirmed, its lines held at their maximum (%s)", pb_id,
                         verdict[1] if len(verdict) > 1 else "within its creation window")
        except Exception:
            log.exception("provider batch %s: recovery failed; the next tick tries again", pb_id)
    return len(rows)


def carry_out_cancels(*, settings: Settings | None = None, engine=None) -> int:
    """Send the cancels the provider has not confirmed yet (rows ``creating`` wait for
    ``recover_creating``: a batch is cancelled the moment its id is known). Returns those sent."""
    settings = settings or get_settings()
    engine = engine or db.get_engine()
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT id, provider, provider_batch_id, counts->>'key_alias' FROM provider_batches"
            " WHERE status = 'submitted' AND cancel_requested AND cancel_confirmed_at IS NULL"
            " ORDER BY cancel_requested_at")).all()
    for pb_id, provider, pbid, key in rows:
        job_store.send_cancel(engine, pb_id, provider, pbid, settings, run=loop.run, key_alias=key)
    return len(rows)
