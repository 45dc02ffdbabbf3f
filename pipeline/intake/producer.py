"""Producer side: validate lines, price them, publish to Kafka.

``submit_file`` streams a JSONL file (a path, ``-`` for standard input,
gzip recognised by its magic bytes: pipeline/intake/lines.py) in memory bounded by
the longest line it reads (``max_line_bytes``; a longer line is refused with
its number, unread), apart from 16 to 32 bytes per custom_id, to reject
duplicates (``DigestSet``), and 16 bytes per distinct prefix for prompt-cache
placement (``Placer``, at most 200,000; placed before the line is bounded), and
publishes every valid line with the idempotent producer. A bad line is rejected with its line
number and reason, recorded in Postgres, and the rest of the job goes on.
A line counts as accepted only when Kafka acknowledged it; lines Kafka did
not acknowledge are reported by number and recorded as rejected.

Whole-file mistakes are caught before a job exists (a directory, an empty
file, a JSON array or one pretty-printed JSON object instead of JSONL). A
job in which no line was accepted ends ``failed``, never an empty
``completed``. Ctrl-C (SIGINT) stops reading at a line boundary: what was
produced is flushed, and the job is finished with the lines handled so far,
so it runs them and can be resumed (``resume=True``) from the next line.
While it reads, the submit records its progress and process on the job row
(``submit_progress_at``, sql/010): a submit that dies is closed by the
scheduler's upkeep (schedules/upkeep.py ``close_abandoned_submits``), so no
job stays ``submitting``.

``publish_request`` is the API for services publishing one request.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Callable

import sqlalchemy as sa
from confluent_kafka import KafkaError, KafkaException

from pipeline.config import Settings, get_settings
from pipeline.constants import IMMEDIATE_TOPIC, REQUESTS_TOPIC
from pipeline.errors import FileInputError, InfrastructureError, LineError, UnknownModelError
from pipeline.endpoints.prompt_cache import Placer
from pipeline.intake.formats import Request, parse_json_line, parse_request
from pipeline.intake.kafka import make_producer, sign
from pipeline.intake.lines import DigestSet, Oversized, is_stdin, open_input, read_lines
from pipeline.intake.tiers import classify
from pipeline.money.pricing import get_price_book
from pipeline.paths.base import check_serves
from pipeline.paths.registry import AUTO, check_mode, path_for, path_of
from pipeline.request import Request as TypedRequest, default_url
from pipeline.stores import db, jobs

log = logging.getLogger(__name__)

MESSAGE_VERSION = 1


def new_job_id() -> str:
    return "job_" + uuid.uuid4().hex[:20]


def to_message(job_id: str, line: int | None, req: Request, *, priority: int | None = None,
               tier: str | None = None, mode: str = AUTO) -> bytes:
    """The Kafka message of a request (schema: pipeline/data/request.schema.json)."""
    msg = {
        "v": MESSAGE_VERSION, "job_id": job_id, "custom_id": req.custom_id, "line": line,
        "provider": req.provider, "model": req.model, "endpoint": req.endpoint, "body": req.body,
        "input_tokens": req.input_tokens, "tokens_exact": req.tokens_exact,
        "max_cost_usd": format(req.max_cost_usd, "f"),   # never "1.5E-7": the schema wants plain digits
        "priority": req.priority if req.priority is not None else priority,
        "tier": req.tier or tier,
        "deadline": req.deadline.isoformat() if req.deadline else None,
        "metadata": req.metadata, "cache": req.cache,
        # the path the job asked for (pipeline/paths/), or auto: the batcher chooses per request
        "mode": mode,
        "published_at": datetime.now(timezone.utc).isoformat(),
    }
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode()


def topic_for(req: Request, *, priority: int | None = None, tier: str | None = None,
              mode: str = AUTO) -> str:
    """The fast lane for a request the batcher will classify immediate, else the main topic.

    The batcher classifies again when it reads the message (pipeline/intake/tiers.py);
    the topic only decides that an interactive request does not queue in a
    partition behind a bulk job's backlog. Only a path that answers at once takes it.
    """
    if not path_of(mode, req.body).fast_lane:
        return REQUESTS_TOPIC
    p = req.priority if req.priority is not None else priority
    chosen, _ = classify(p, req.tier or tier, req.deadline, datetime.now(timezone.utc))
    return IMMEDIATE_TOPIC if chosen == "immediate" else REQUESTS_TOPIC


@dataclass
class SubmitReport:
    job_id: str
    lines_read: int = 0
    accepted: int = 0
    rejected: int = 0
    unacknowledged: list[int] = field(default_factory=list)
    interrupted: bool = False
    #: the last line number handled (read, and produced or rejected): a resume starts after it
    last_line: int = 0
    #: the first few rejections, ``{"line", "custom_id", "reason"}``, for the terminal
    first_rejections: list[dict] = field(default_factory=list)
    #: reasons grouped (numbers blanked), each with its count and one example
    reason_counts: Counter = field(default_factory=Counter)
    reason_example: dict = field(default_factory=dict)
    resumed_from: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def reject(self, line: int, custom_id: str | None, reason: str) -> dict:
        self.rejected += 1
        row = {"line": line, "custom_id": custom_id, "reason": reason}
        if len(self.first_rejections) < FIRST_REJECTIONS:
            self.first_rejections.append(row)
        group = re.sub(r"\d+", "N", reason)
        self.reason_counts[group] += 1
        self.reason_example.setdefault(group, reason)
        return row

    def most_common_reason(self) -> tuple[str, int] | None:
        if not self.reason_counts:
            return None
        group, n = self.reason_counts.most_common(1)[0]
        return self.reason_example[group], n


#: rejections kept in the report for the terminal; ``llmbatch rejections JOB`` lists them all
FIRST_REJECTIONS = 5
#: how often a running submit records its progress on the job row
PROGRESS_EVERY_S = 2.0
def check_file(path: Path, max_line_bytes: int = 16 * 1024 * 1024) -> None:
    """Refuse, before a job exists, a file that cannot be JSONL: a directory, an empty file,
    a file of blank lines, a JSON array, or one JSON object spread over several lines.

    Reads at most ``max_line_bytes`` of any line (pipeline/intake/lines.py): an oversized first line is
    refused later with its number, and only a file of at most that size is read whole to tell a
    pretty-printed object (a larger one is no request anyway). Standard input is not checked:
    it can be read only once.
    """
    if is_stdin(path):
        return
    if path.is_dir():
        raise FileInputError(f"{path} is a directory: give a JSONL file, one request per line")
    if not path.exists():
        raise FileInputError(f"{path}: no such file")
    if not path.is_file():
        raise FileInputError(f"{path} is not a regular file")
    if path.stat().st_size == 0:
        raise FileInputError(f"{path}: the file is empty")
    first, more = b"", False
    with open_input(path) as f:
        for raw in read_lines(f, max_line_bytes):
            if isinstance(raw, Oversized):
                return   # refused with its line number when it is read
            stripped = raw.strip().removeprefix(b"\xef\xbb\xbf").strip()
            if stripped and first:
                more = True
                break
            if stripped:
                first = stripped
    if not first:
        raise FileInputError(f"{path}: every line is blank; a JSONL file has one request per line")
    if first.startswith(b"[") and (more is False or not _parses(first)):
        # a whole array on one line, or the opening of a pretty-printed one; an array line
        # among JSONL lines is only that line's problem (rejected with its reason)
        raise FileInputError(f"{path}: this file is a JSON array, not JSONL: put one request per line "
                             "(e.g. `jq -c '.[]' FILE > FILE.jsonl`)")
    if first.startswith(b"{"):
        try:
            json.loads(first)
            return
        except ValueError:
            pass
        with open_input(path) as f:
            text = f.read(max_line_bytes + 1)
        if len(text) <= max_line_bytes:
            try:
                whole = json.loads(text)
            except ValueError:
                return   # a broken first line: rejected with its reason like any other
            if isinstance(whole, dict):
                raise FileInputError(f"{path}: this file is one JSON object spread over several lines, not "
                                     "JSONL: put one request per line (e.g. `jq -c . FILE > FILE.jsonl`)")


class _OncePerKind(logging.Filter):
    """librdkafka repeats a connection failure every few hundred ms: pass each kind of line
    (numbers blanked) once, so an outage is one line, not hundreds."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = re.sub(r"\d+", "N", record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _kafka_logger() -> logging.Logger:
    logger = logging.getLogger("pipeline.intake.kafka.librdkafka")
    if not any(isinstance(f, _OncePerKind) for f in logger.filters):
        logger.addFilter(_OncePerKind())
    return logger


def _wait_for_kafka(producer, settings: Settings) -> None:
    """Return once Kafka answers a metadata request; one line while waiting; InfrastructureError
    after ``outage_patience_s``."""
    patience_s = settings.outage_patience_s
    deadline = time.monotonic() + patience_s
    waiting = False
    while True:
        try:
            producer.list_topics(timeout=5)
            if waiting:
                log.warning("Kafka reachable again")
            return
        except KafkaException as e:
            if not waiting:   # said at the first failure, however long that try took
                log.warning("waiting for Kafka at %s (up to %.0f s)", settings.kafka_bootstrap, patience_s)
                waiting = True
            if time.monotonic() > deadline:
                why = e.args[0].str() if e.args and hasattr(e.args[0], "str") else str(e)
                raise InfrastructureError(f"cannot reach Kafka at {settings.kafka_bootstrap}: {why}") from None


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw)
        return True
    except ValueError:
        return False


class _Interrupt:
    """SIGINT sets a flag the read loop checks between lines, so an interrupt never lands
    inside a Kafka callback or between producing a line and counting it. A second Ctrl-C
    gives SIGINT back its default (a third one stops at once)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


class _Deliveries:
    """Counts Kafka acknowledgements and remembers the lines that failed."""

    def __init__(self):
        self.acked = 0
        self.failed: dict[int, str] = {}

    def callback(self, line: int):
        def on_delivery(err, msg):
            if err is None:
                self.acked += 1
            elif err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                size = len(msg.value() or b"") if msg is not None else 0
                self.failed[line] = (f"the request is {size / 1e6:.1f} MB, more than the Kafka broker "
                                     f"accepts in one message (its message.max.bytes): {err.str()}")
            else:
                self.failed[line] = str(err)
        return on_delivery


def _anthropic_counter(settings: Settings):
    """Exact Anthropic counts when a key is set; otherwise the stored estimate is used."""
    if not settings.anthropic_api_key:
        return None
    from pipeline.providers.anthropic import token_counter
    from pipeline.providers.registry import build_registry
    return token_counter(settings, build_registry(settings).get("anthropic"))


def placer_for(mode: str, settings: Settings) -> Placer | None:
    """The job's prompt-cache placer (None: placement is off). Anthropic's 1-hour TTL where the
    provider's Batch API runs the lines: a job whose mode is a scheduler path. Under ``auto`` the path
    is chosen per line later, by the batcher, so the lines keep the 5-minute TTL their bound is priced
    at, also those that then go to a provider batch (a shorter-lived cache there, never a dearer bill)."""
    if not settings.prompt_cache_placement:
        return None
    return Placer(provider_batch=mode != AUTO and path_for(mode).runs_in == "scheduler")


def submit_file(path: Path, *, settings: Settings | None = None, job_id: str | None = None,
                name: str | None = None, priority: int | None = None, tier: str | None = None,
                budget_usd: Decimal | None = None, on_budget: str = "defer", mode: str = AUTO,
                fallback_model: str | None = None, resume: bool = False, deadline: datetime | None = None,
                project: str | None = None, endpoint: str | None = None,
                on_progress: Callable[[SubmitReport], None] | None = None) -> SubmitReport:
    """Publish every valid line of ``path`` as job ``job_id``; returns the report.

    ``deadline``: of every line without its own; ``project``: the API project the job belongs to
    (its daily cap applies, pipeline/money/caps.py); ``endpoint``: the one url every line must name
    (an OpenAI batch's, pipeline/api/): a line naming another is rejected.

    ``resume=True`` continues job ``job_id`` (submitted from the same file and
    interrupted): lines up to the job's recorded line count are skipped, their
    custom_ids still count as taken, and the job's counts add up.
    """
    settings = settings or get_settings()
    check_mode(mode)   # an unknown mode is refused before a job exists
    path = Path(path)
    if is_stdin(path) and resume:
        raise FileInputError("--resume reads the file again from its start: it needs a file, not standard input")
    check_file(path, settings.max_line_bytes)
    prices = get_price_book()
    if fallback_model:
        try:
            fallback_model = prices.resolve(fallback_model).model
        except UnknownModelError as e:
            raise FileInputError(f"--fallback-model: {e.reason}") from None
    counter = _anthropic_counter(settings)
    engine = db.get_engine()
    producer = make_producer(settings, logger=_kafka_logger())
    _wait_for_kafka(producer, settings)   # before a job exists: Kafka down leaves no job behind
    seen = DigestSet()
    if resume:
        if not job_id:
            raise FileInputError("--resume needs the job id")
        previous = _start_resume(engine, job_id, path, seen, settings.max_line_bytes)
        priority, tier, mode = previous["priority"], previous["tier"], previous["mode"]
    else:
        previous = {"lines_read": 0, "accepted": 0, "rejected": 0, "last_line": 0}
        job_id = job_id or new_job_id()
        with db.transaction(engine) as conn:
            jobs.create_job(conn, job_id, name=name or ("stdin" if is_stdin(path) else path.name),
                          source=str(path), priority=priority,
                          tier=tier, budget_usd=budget_usd, on_budget=on_budget, mode=mode,
                          simulated=settings.simulated, fallback_model=fallback_model,
                          producer=settings.kafka_user, project=project)
    report = SubmitReport(job_id, resumed_from=previous["last_line"], last_line=previous["last_line"])
    deliveries = _Deliveries()
    rejections: list[dict] = []
    key = job_id.encode()
    placer = placer_for(mode, settings)
    produced = 0
    last_progress = last_beat = 0.0

    def flush_rejections():
        if rejections:
            with db.transaction(engine) as conn:
                jobs.record_rejections(conn, job_id, rejections)
            rejections.clear()

    def heartbeat():
        with db.transaction(engine) as conn:
            conn.execute(sa.text(
                "UPDATE jobs SET lines_read = :n, submit_progress_at = now(), submit_pid = :pid,"
                " submit_host = :host WHERE job_id = :j AND status = 'submitting'"),
                {"n": previous["lines_read"] + report.lines_read, "pid": os.getpid(),
                 "host": socket.gethostname(), "j": job_id})

    heartbeat()
    with _Interrupt() as interrupt:
        try:
            with open_input(path) as f:
                for number, raw in enumerate(read_lines(f, settings.max_line_bytes), 1):
                    if interrupt.requested:
                        report.interrupted = True
                        break
                    if number <= previous["last_line"]:
                        continue
                    report.last_line = number
                    if not isinstance(raw, Oversized) and (not raw.strip() or raw.strip() == b"\xef\xbb\xbf"):
                        continue  # blank lines are not requests
                    report.lines_read += 1
                    cid = None
                    try:
                        if isinstance(raw, Oversized):
                            raise LineError(oversized_reason(raw, settings.max_line_bytes))
                        obj = parse_json_line(raw)
                        cid = obj.get("custom_id") if isinstance(obj.get("custom_id"), str) else None
                        if placer is not None:   # before the bound: a cache write is part of the maximum
                            obj = placer.place_line(obj, prices)
                        if endpoint is not None and obj.get("url") != endpoint:
                            raise LineError(f"url {obj.get('url')!r} is not the batch's endpoint {endpoint}:"
                                            " every line of a batch names its endpoint")
                        req = parse_request(obj, prices, counter)
                        if deadline is not None and req.deadline is None:
                            req = dataclasses.replace(req, deadline=deadline)
                        way = path_of(mode, req.body)   # the path says whether it serves this line
                        price = prices.resolve(req.model, req.provider)
                        check_serves(way, TypedRequest.probe(job_id, req.custom_id, req.provider, req.body, way.name,
                                                             obj.get("url") or default_url(req.provider, price.kind)),
                                     price)
                        if not seen.add(req.custom_id):
                            raise LineError(f"duplicate custom_id {req.custom_id!r}: custom_id must be unique"
                                            " in a job")
                    except LineError as e:
                        rejections.append(report.reject(number, cid, e.reason))
                        if len(rejections) >= 1000:
                            flush_rejections()
                        continue
                    value = to_message(job_id, number, req, priority=priority, tier=tier, mode=mode)
                    topic = topic_for(req, priority=priority, tier=tier, mode=mode)
                    while True:
                        try:
                            producer.produce(topic, value=value, key=key, headers=sign(settings, value),
                                             on_delivery=deliveries.callback(number))
                            produced += 1
                            break
                        except BufferError:
                            producer.poll(0.05)
                    producer.poll(0)
                    now = time.monotonic()
                    if on_progress and now - last_progress > 0.2:
                        last_progress = now
                        report.accepted = deliveries.acked
                        on_progress(report)
                    if now - last_beat > PROGRESS_EVERY_S:
                        last_beat = now
                        heartbeat()
        finally:
            remaining = producer.flush(60)
            if remaining:
                log.error("kafka did not acknowledge %d messages within 60 s", remaining)
            flush_rejections()
    unacked = produced - deliveries.acked - len(deliveries.failed)
    if deliveries.failed or unacked:
        report.unacknowledged = sorted(deliveries.failed)
        with db.transaction(engine) as conn:
            jobs.record_rejections(conn, job_id, [
                {"line": n, "custom_id": None, "reason": f"Kafka did not acknowledge the message: {err}"}
                for n, err in deliveries.failed.items()])
        for n, err in deliveries.failed.items():
            report.reject(n, None, f"Kafka did not acknowledge the message: {err}")
        report.rejected = report.lines_read - deliveries.acked
    report.accepted = deliveries.acked
    report.rejected = report.lines_read - report.accepted
    if unacked:
        # the job stays 'submitting' with its progress: the upkeep closes it with what reached Postgres
        raise InfrastructureError(f"{unacked} messages were neither acknowledged nor failed by Kafka"
                                  f" (job {job_id}; it will be closed with the lines that arrived)")
    total_accepted = previous["accepted"] + report.accepted
    with db.transaction(engine) as conn:
        jobs.finish_submit(conn, job_id, lines_read=previous["lines_read"] + report.lines_read,
                         accepted=total_accepted, rejected=previous["rejected"] + report.rejected)
        conn.execute(sa.text("UPDATE jobs SET submit_line = :n WHERE job_id = :j"),
                     {"n": report.last_line, "j": job_id})
        if total_accepted == 0:
            # nothing will ever run: say so in the job's state, not as an empty 'completed'
            conn.execute(sa.text(
                "UPDATE jobs SET status = 'failed', finished_at = now() WHERE job_id = :j"
                " AND status <> 'cancelled'"), {"j": job_id})   # a cancel stands
    if on_progress:
        on_progress(report)
    return report


def oversized_reason(line: Oversized, max_line_bytes: int) -> str:
    return (f"the line is {line.size:,} bytes, more than the {max_line_bytes:,} a line may have"
            " (setting max_line_bytes): refused unread")


def _start_resume(engine, job_id: str, path: Path, seen: DigestSet, max_line_bytes: int) -> dict:
    """Put an interrupted job back to ``submitting`` and take its counts; fills ``seen`` with the
    custom_ids of the lines already accepted (read again from the file, which must be the same)."""
    with db.transaction(engine) as conn:
        row = conn.execute(sa.text(
            "SELECT status, source, lines_read, accepted, rejected, coalesce(submit_line, 0) AS last_line,"
            " priority, tier, mode FROM jobs WHERE job_id = :j FOR UPDATE"), {"j": job_id}).mappings().first()
        if row is None:
            raise FileInputError(f"--resume: no job {job_id}")
        if row["status"] == "submitting":
            raise FileInputError(f"--resume: job {job_id} is still being submitted")
        if row["status"] == "cancelled":
            raise FileInputError(f"--resume: job {job_id} was cancelled")
        rejected_lines = set(conn.execute(sa.text(
            "SELECT line FROM rejections WHERE job_id = :j AND line <= :n"),
            {"j": job_id, "n": row["last_line"]}).scalars())
        conn.execute(sa.text(
            "UPDATE jobs SET status = 'submitting', finished_at = NULL WHERE job_id = :j"), {"j": job_id})
    with open_input(path) as f:
        for number, raw in enumerate(read_lines(f, max_line_bytes), 1):
            if number > row["last_line"]:
                break
            if number in rejected_lines or isinstance(raw, Oversized) or not raw.strip():
                continue
            try:
                cid = parse_json_line(raw).get("custom_id")
            except LineError:
                continue
            if isinstance(cid, str):
                seen.add(cid)
    return dict(row)


def publish_request(line: dict, *, job_id: str, producer=None, settings: Settings | None = None,
                    timeout: float = 10.0) -> Request:
    """Validate and publish one request for a service; blocks until Kafka acknowledges it.

    ``line`` is a line of either input format, as a dict. The job row is
    created by the batcher if it does not exist, owned by the producer that
    published its first request: ``settings.kafka_user``, whose credentials
    (``kafka_user`` / ``kafka_password``, made by ``llmbatch kafka add-producer``)
    authenticate to Kafka and sign the message (pipeline/intake/kafka.py). A request
    for a job that is finished, cancelled or another producer's goes to the
    DLQ with that reason. Raises ``LineError`` for an invalid request and
    ``InfrastructureError`` when Kafka does not acknowledge.
    """
    settings = settings or get_settings()
    req = parse_request(line, get_price_book(), _anthropic_counter(settings))
    own = producer is None
    producer = producer or make_producer(settings)
    result: list = []
    value = to_message(job_id, None, req)
    producer.produce(topic_for(req), value=value, key=job_id.encode(), headers=sign(settings, value),
                     on_delivery=lambda err, msg: result.append(err))
    producer.flush(timeout)
    if own:
        del producer
    if not result or result[0] is not None:
        raise InfrastructureError(f"Kafka did not acknowledge request {req.custom_id}: "
                                  f"{result[0] if result else 'timed out'}")
    return req
