"""Producer side: validate lines, price them, publish to Kafka.

``submit_file`` streams a JSONL file in constant memory (apart from one
8-byte hash per custom_id, to reject duplicates) and publishes every valid
line with the idempotent producer. A bad line is rejected with its line
number and reason, recorded in Postgres, and the rest of the job goes on.
A line counts as accepted only when Kafka acknowledged it; lines Kafka did
not acknowledge are reported by number and recorded as rejected.

``publish_request`` is the API for services publishing one request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Callable

from confluent_kafka import KafkaError

from pipeline import db
from pipeline.config import Settings, get_settings
from pipeline.constants import IMMEDIATE_TOPIC, REQUESTS_TOPIC
from pipeline.errors import FileInputError, InfrastructureError, LineError, UnknownModelError
from pipeline.formats import Request, parse_json_line, parse_request
from pipeline.kafka import make_producer
from pipeline.pricing import get_price_book
from pipeline.tiers import classify

log = logging.getLogger(__name__)

MESSAGE_VERSION = 1


def new_job_id() -> str:
    return "job_" + uuid.uuid4().hex[:20]


def to_message(job_id: str, line: int | None, req: Request, *, priority: int | None = None,
               tier: str | None = None, mode: str = "realtime") -> bytes:
    """The Kafka message of a request (schema: pipeline/data/request.schema.json)."""
    msg = {
        "v": MESSAGE_VERSION, "job_id": job_id, "custom_id": req.custom_id, "line": line,
        "provider": req.provider, "model": req.model, "body": req.body,
        "input_tokens": req.input_tokens, "tokens_exact": req.tokens_exact,
        "max_cost_usd": format(req.max_cost_usd, "f"),   # never "1.5E-7": the schema wants plain digits
        "priority": req.priority if req.priority is not None else priority,
        "tier": req.tier or tier,
        "deadline": req.deadline.isoformat() if req.deadline else None,
        "metadata": req.metadata, "cache": req.cache,
        # realtime: our workers call the provider; provider_batch: a provider Batch API (schedules/)
        "mode": mode,
        "published_at": datetime.now(timezone.utc).isoformat(),
    }
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode()


def topic_for(req: Request, *, priority: int | None = None, tier: str | None = None,
              mode: str = "realtime") -> str:
    """The fast lane for a request the batcher will classify immediate, else the main topic.

    The batcher classifies again when it reads the message (pipeline/tiers.py);
    the topic only decides that an interactive request does not queue in a
    partition behind a bulk job's backlog.
    """
    if mode != "realtime":
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
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


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
    return token_counter(settings)


def submit_file(path: Path, *, settings: Settings | None = None, job_id: str | None = None,
                name: str | None = None, priority: int | None = None, tier: str | None = None,
                budget_usd: Decimal | None = None, on_budget: str = "defer", mode: str = "realtime",
                fallback_model: str | None = None,
                on_progress: Callable[[SubmitReport], None] | None = None) -> SubmitReport:
    settings = settings or get_settings()
    path = Path(path)
    if not path.is_file():
        raise FileInputError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise FileInputError(f"{path}: the file is empty")
    prices = get_price_book()
    if fallback_model:
        try:
            fallback_model = prices.resolve(fallback_model).model
        except UnknownModelError as e:
            raise FileInputError(f"--fallback-model: {e.reason}") from None
    counter = _anthropic_counter(settings)
    engine = db.get_engine()
    job_id = job_id or new_job_id()
    report = SubmitReport(job_id)
    with db.transaction(engine) as conn:
        db.create_job(conn, job_id, name=name or path.name, source=str(path), priority=priority,
                      tier=tier, budget_usd=budget_usd, on_budget=on_budget, mode=mode,
                      simulated=settings.simulated, fallback_model=fallback_model)
    producer = make_producer(settings)
    deliveries = _Deliveries()
    rejections: list[dict] = []
    seen: set[bytes] = set()
    key = job_id.encode()
    last_progress = 0.0

    def flush_rejections():
        if rejections:
            with db.transaction(engine) as conn:
                db.record_rejections(conn, job_id, rejections)
            rejections.clear()

    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip() or raw.strip() == b"\xef\xbb\xbf":
                    continue  # blank lines are not requests
                report.lines_read += 1
                cid = None
                try:
                    obj = parse_json_line(raw)
                    cid = obj.get("custom_id") if isinstance(obj.get("custom_id"), str) else None
                    req = parse_request(obj, prices, counter)
                    digest = hashlib.blake2b(req.custom_id.encode(), digest_size=8).digest()
                    if digest in seen:
                        raise LineError(f"duplicate custom_id {req.custom_id!r}: custom_id must be unique in a job")
                    seen.add(digest)
                except LineError as e:
                    report.rejected += 1
                    rejections.append({"line": number, "custom_id": cid, "reason": e.reason})
                    if len(rejections) >= 1000:
                        flush_rejections()
                    continue
                value = to_message(job_id, number, req, priority=priority, tier=tier, mode=mode)
                topic = topic_for(req, priority=priority, tier=tier, mode=mode)
                while True:
                    try:
                        producer.produce(topic, value=value, key=key,
                                         on_delivery=deliveries.callback(number))
                        break
                    except BufferError:
                        producer.poll(0.05)
                producer.poll(0)
                if on_progress and time.monotonic() - last_progress > 0.2:
                    last_progress = time.monotonic()
                    report.accepted = deliveries.acked
                    on_progress(report)
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        remaining = producer.flush(60)
        if remaining:
            log.error("kafka did not acknowledge %d messages within 60 s", remaining)
        flush_rejections()
    sent = report.lines_read - report.rejected
    unacked = sent - deliveries.acked - len(deliveries.failed)
    if deliveries.failed or unacked:
        report.unacknowledged = sorted(deliveries.failed)
        with db.transaction(engine) as conn:
            db.record_rejections(conn, job_id, [
                {"line": n, "custom_id": None, "reason": f"Kafka did not acknowledge the message: {err}"}
                for n, err in deliveries.failed.items()])
    report.accepted = deliveries.acked
    report.rejected = report.lines_read - report.accepted
    if unacked:
        raise InfrastructureError(f"{unacked} messages were neither acknowledged nor failed by Kafka")
    with db.transaction(engine) as conn:
        db.finish_submit(conn, job_id, lines_read=report.lines_read, accepted=report.accepted,
                         rejected=report.rejected)
    if on_progress:
        on_progress(report)
    return report


def publish_request(line: dict, *, job_id: str, producer=None, settings: Settings | None = None,
                    timeout: float = 10.0) -> Request:
    """Validate and publish one request for a service; blocks until Kafka acknowledges it.

    ``line`` is a line of either input format, as a dict. The job row is
    created by the batcher if it does not exist. Raises ``LineError`` for an
    invalid request and ``InfrastructureError`` when Kafka does not acknowledge.
    """
    settings = settings or get_settings()
    req = parse_request(line, get_price_book(), _anthropic_counter(settings))
    own = producer is None
    producer = producer or make_producer(settings)
    result: list = []
    producer.produce(topic_for(req), value=to_message(job_id, None, req), key=job_id.encode(),
                     on_delivery=lambda err, msg: result.append(err))
    producer.flush(timeout)
    if own:
        del producer
    if not result or result[0] is not None:
        raise InfrastructureError(f"Kafka did not acknowledge request {req.custom_id}: "
                                  f"{result[0] if result else 'timed out'}")
    return req
