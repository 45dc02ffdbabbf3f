"""The batcher: Kafka ``llm.requests`` → tiered, model-grouped batches in Postgres.

A consumer group member, at-least-once, of ``llm.requests`` and, with a
consumer of its own read first at every turn, of its fast lane
``llm.requests.immediate`` (where producers put what they classify
immediate). For every poll round:

1. decode each message; one that cannot be decoded or validated goes to
   ``llm.requests.dlq`` with the error and its origin in headers, and never
   blocks its partition;
2. classify the tier and append to the buffer of its (tier, model);
3. flush buffers that are full or have lingered long enough: one transaction
   writes the requests (deduped on (job, custom_id)) and their batch rows;
4. after the commit, hand immediate and peak batches to their Celery queues
   (off-peak and background stay held in Postgres for the scheduler);
5. only then commit Kafka offsets, and only up to the first message of each
   partition that is still buffered.

It must never commit an offset before the rows are in Postgres. A crash
between steps 3 and 4 leaves a batch ``queued``: the sweep dispatches it. If the
broker's Redis loses its data, the Celery queues go with it: the sweep sees its
marker key gone and dispatches every batch no worker has taken yet again.
"""

from __future__ import annotations

import json
import logging
import signal
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation

import redis
from confluent_kafka import KafkaError, TopicPartition

from pipeline import db, metrics
from pipeline.cache import ResponseCache, cache_key, is_cacheable
from pipeline.config import Settings, get_settings
from pipeline.constants import DISPATCHED_TIERS, DLQ_TOPIC, IMMEDIATE_TOPIC, REDIS_PREFIX, REQUESTS_TOPIC, TIERS
from pipeline.errors import LineError
from pipeline.kafka import make_consumer, make_producer
from pipeline.pricing import cost, get_price_book, usage_from_anthropic, usage_from_openai
from pipeline.tiers import classify

log = logging.getLogger(__name__)

#: bulk messages taken in one turn of the loop (about 50 ms of work): the fast lane is read between turns
BULK_TURN = 500
#: a key in the broker's Redis; its absence means the Celery queues were lost (Batcher.sweep)
BROKER_MARK = REDIS_PREFIX + "broker-mark"


@dataclass
class Buffer:
    tier: str
    provider: str
    model: str
    mode: str = "realtime"                        # realtime | provider_batch
    rows: list = field(default_factory=list)
    origins: list = field(default_factory=list)   # ((topic, partition), offset) of each row
    since: float = field(default_factory=time.monotonic)


def decode(value: bytes | None, now: datetime) -> dict:
    """A Kafka message → a ``requests`` row; raises LineError when unusable."""
    if value is None:
        raise LineError("empty message")
    try:
        m = json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LineError(f"not valid JSON: {e}") from e
    if not isinstance(m, dict):
        raise LineError("message is not a JSON object")
    for key, kind in (("job_id", str), ("custom_id", str), ("provider", str), ("model", str),
                      ("body", dict), ("input_tokens", int)):
        if not isinstance(m.get(key), kind):
            raise LineError(f"field {key} missing or not {kind.__name__}")
    if m.get("v") != 1:
        raise LineError(f"unsupported message version {m.get('v')!r} (this batcher reads v 1)")
    if m["provider"] not in ("openai", "anthropic"):
        raise LineError(f"unknown provider {m['provider']!r}")
    raw_cost = m.get("max_cost_usd")
    try:
        if not isinstance(raw_cost, str):
            raise InvalidOperation
        max_cost = Decimal(raw_cost)
    except InvalidOperation as e:
        raise LineError(f"max_cost_usd must be a decimal string, got {raw_cost!r}") from e
    deadline = None
    if m.get("deadline"):
        try:
            deadline = datetime.fromisoformat(m["deadline"])
        except (TypeError, ValueError) as e:
            raise LineError(f"deadline is not ISO 8601: {m['deadline']!r}") from e
    tier = m.get("tier")
    if tier is not None and tier not in TIERS:
        raise LineError(f"unknown tier {tier!r}")
    priority = m.get("priority")
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)
                                 or not 0 <= priority <= 9):
        raise LineError(f"priority must be an integer from 0 to 9, got {priority!r}")
    tier, reason = classify(priority, tier, deadline, now)
    mode = m.get("mode") or "realtime"
    if mode not in ("realtime", "provider_batch"):
        raise LineError(f"unknown mode {mode!r}")
    return {
        "job_id": m["job_id"], "custom_id": m["custom_id"], "line": m.get("line"),
        "batch_id": None, "provider": m["provider"], "model": m["model"], "tier": tier,
        "tier_reason": reason, "priority": priority if priority is not None else 5,
        "deadline": m.get("deadline"), "body": m["body"], "metadata": m.get("metadata"),
        "input_tokens": m["input_tokens"], "tokens_exact": bool(m.get("tokens_exact", True)),
        "max_cost_usd": str(max_cost),
        "status": "queued" if tier in DISPATCHED_TIERS and mode == "realtime" else "held",
        "mode": mode,
        "published_at": m.get("published_at"),
        "cache_key": cache_key(m["provider"], m["body"]) if is_cacheable(m["body"], m.get("cache")) else None,
    }


def dispatch(batch_id: str, tier: str) -> None:
    """Hand a batch to its tier's Celery queue (by task name: pipeline never imports workers)."""
    from pipeline.dispatch import enqueue_batch
    enqueue_batch(batch_id, tier)


class Batcher:
    def __init__(self, settings: Settings | None = None, *, dispatcher=dispatch, engine=None):
        self.settings = settings or get_settings()
        self.engine = engine or db.get_engine()
        self.dispatch = dispatcher
        self.consumer = make_consumer(self.settings)
        # the fast lane has a consumer (and so a fetch queue) of its own: in a shared one it
        # waited behind every bulk message already fetched, up to the whole of a bulk job
        self.fast = make_consumer(self.settings, group=self.settings.consumer_group + ".immediate")
        self.consumers = {REQUESTS_TOPIC: self.consumer, IMMEDIATE_TOPIC: self.fast}
        self.dlq = make_producer(self.settings)
        self.cache = ResponseCache(self.settings.redis_url, self.settings.cache_ttl_s)
        self.buffers: dict[tuple[str, str], Buffer] = {}
        # keyed by (topic, partition)
        self.pending: dict[tuple, dict[int, int]] = defaultdict(dict)   # -> {offset: count}
        self.consumed: dict[tuple, int] = {}                            # -> last offset seen
        self.committed: dict[tuple, int] = {}
        self.stopping = False
        self.last_sweep = 0.0
        self.stats = defaultdict(int)

    # -------------------------------------------------------------- kafka side

    def _on_assign(self, consumer, partitions):
        log.info("assigned partitions %s", [f"{p.topic}[{p.partition}]" for p in partitions])

    def _on_revoke(self, consumer, partitions):
        """Give up buffered messages of revoked partitions; the next owner re-reads them."""
        lost = {(p.topic, p.partition) for p in partitions}
        log.info("revoked partitions %s", [f"{t}[{p}]" for t, p in sorted(lost)])
        self._commit(sync=True)
        for key, buf in list(self.buffers.items()):
            keep = [(row, o) for row, o in zip(buf.rows, buf.origins) if o[0] not in lost]
            buf.rows = [r for r, _ in keep]
            buf.origins = [o for _, o in keep]
            if not buf.rows:
                del self.buffers[key]
        for p in lost:
            self.pending.pop(p, None)
            self.consumed.pop(p, None)
            self.committed.pop(p, None)

    def _to_dlq(self, msg, error: str) -> None:
        headers = [("error", error.encode()), ("origin.topic", msg.topic().encode()),
                   ("origin.partition", str(msg.partition()).encode()),
                   ("origin.offset", str(msg.offset()).encode())]
        self.dlq.produce(DLQ_TOPIC, value=msg.value(), key=msg.key(), headers=headers)
        self.stats["dlq"] += 1
        log.warning("message %s[%d]@%d to DLQ: %s", msg.topic(), msg.partition(), msg.offset(), error)

    def _commit(self, sync: bool = False) -> None:
        """Commit, per partition, up to the first offset still buffered."""
        offsets = defaultdict(list)
        for tp, last in self.consumed.items():
            waiting = self.pending.get(tp)
            upto = min(waiting) if waiting else last + 1
            if self.committed.get(tp) != upto:
                offsets[tp[0]].append(TopicPartition(*tp, upto))
                self.committed[tp] = upto
        if offsets and self.stats["dlq"]:
            self.dlq.flush(30)   # DLQ copies must be durable before their offsets move
        for topic, tps in offsets.items():
            try:
                self.consumers[topic].commit(offsets=tps, asynchronous=not sync)
            except Exception as e:  # a revoked partition: its messages come back, that is fine
                log.info("offset commit skipped: %s", e)

    # -------------------------------------------------------------- batching

    def add(self, msg, now: datetime) -> None:
        p, o = (msg.topic(), msg.partition()), msg.offset()
        self.consumed[p] = max(o, self.consumed.get(p, -1))
        try:
            row = decode(msg.value(), now)
        except LineError as e:
            self._to_dlq(msg, e.reason)
            return
        key = (row["tier"], row["model"], row["mode"])
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = Buffer(row["tier"], row["provider"], row["model"], row["mode"])
        buf.rows.append(row)
        buf.origins.append((p, o))
        self.pending[p][o] = self.pending[p].get(o, 0) + 1

    def due(self, force: bool = False) -> list[Buffer]:
        nowm = time.monotonic()
        out = []
        for key, buf in list(self.buffers.items()):
            if force or len(buf.rows) >= self.settings.batch_max_size[buf.tier] \
                    or nowm - buf.since >= self.settings.batch_linger_s[buf.tier]:
                out.append(self.buffers.pop(key))
        return out

    def flush(self, buffers: list[Buffer]) -> None:
        """Write the buffers' requests and batches in one transaction, then dispatch."""
        if not buffers:
            return
        rows, batches = [], []
        cached = self._answer_from_cache(buffers, rows)
        for buf in buffers:
            size = self.settings.batch_max_size[buf.tier]
            # dedupe within the flush: one key twice in one INSERT fails
            seen = set()
            unique = []
            for row in buf.rows:
                k = (row["job_id"], row["custom_id"])
                if row["status"] == "succeeded":  # answered from the cache
                    continue
                if k not in seen:
                    seen.add(k)
                    unique.append(row)
            for i in range(0, len(unique), size):
                batch_id = "b_" + uuid.uuid4().hex
                # provider-batch work is held for the scheduler (schedules/provider_batches.py)
                status = "queued" if buf.tier in DISPATCHED_TIERS and buf.mode == "realtime" else "held"
                batches.append({"batch_id": batch_id, "tier": buf.tier, "provider": buf.provider,
                                "model": buf.model, "status": status, "mode": buf.mode})
                for row in unique[i:i + size]:
                    row["batch_id"] = batch_id
                    rows.append(row)
        with self.engine.begin() as conn:
            counts = db.write_batches(conn, rows, batches, cached)
            db.mark_provider_batch_mode(conn, [b["batch_id"] for b in batches
                                               if b["mode"] == "provider_batch" and counts.get(b["batch_id"])])
        self.stats["requests"] += sum(counts.values())
        self.stats["replayed"] += len(rows) - sum(counts.values())
        to_send = [b for b in batches if counts.get(b["batch_id"]) and b["status"] == "queued"]
        for b in to_send:
            self.dispatch(b["batch_id"], b["tier"])
        if to_send:
            with self.engine.begin() as conn:
                db.mark_dispatched(conn, [b["batch_id"] for b in to_send])
        for buf in buffers:
            for p, o in buf.origins:
                waiting = self.pending.get(p)
                if waiting is not None and o in waiting:
                    waiting[o] -= 1
                    if not waiting[o]:
                        del waiting[o]
        self.stats["batches"] += len([b for b in batches if counts.get(b["batch_id"])])

    def _answer_from_cache(self, buffers: list[Buffer], rows: list[dict]) -> list[dict]:
        """Mark rows whose answer is cached as succeeded (appending them to ``rows``)
        and return their result rows: cost 0, and the cost the hit saved."""
        wanted = [r for b in buffers for r in b.rows if r["cache_key"]]
        found = self.cache.get_many(sorted({r["cache_key"] for r in wanted}))
        self.stats["cache_misses"] += len(wanted) - sum(1 for r in wanted if r["cache_key"] in found)
        results, seen = [], set()
        prices = get_price_book()
        for row in wanted:
            answer = found.get(row["cache_key"])
            k = (row["job_id"], row["custom_id"])
            if answer is None or k in seen:
                continue
            seen.add(k)
            raw = answer.get("usage") or {}
            usage = usage_from_openai(raw) if row["provider"] == "openai" else usage_from_anthropic(raw)
            row.update(status="succeeded", batch_id=None)
            rows.append(row)
            results.append({
                "job_id": row["job_id"], "custom_id": row["custom_id"], "model": row["model"],
                "response": answer, "input_tokens": usage.input_tokens,
                "cached_input_tokens": usage.cached_input_tokens, "output_tokens": usage.output_tokens,
                "provider_request_id": answer.get("id"),
                "saved_usd": str(cost(prices.resolve(row["model"]), usage)),
            })
        self.stats["cache_hits"] += len(results)
        return results

    def sweep(self) -> int:
        """Dispatch batches committed but never dispatched, or whose worker died.

        Held batches are ``held``, not ``queued``: the sweep never releases them.
        """
        with self.engine.begin() as conn:
            stuck = db.undispatched_batches(conn, self.settings.sweep_after_s)
            if self._broker_emptied():
                lost = db.dispatched_batches(conn)
                log.warning("the Celery broker's Redis lost its data (flushed, or restarted empty): "
                            "dispatching the %d batches its queues held again", len(lost))
                stuck += lost
        for batch_id, tier in stuck:
            log.warning("sweep: dispatching batch %s (%s) again", batch_id, tier)
            self.dispatch(batch_id, tier)
        if stuck:
            with self.engine.begin() as conn:
                db.mark_dispatched(conn, [b for b, _ in stuck])
        # batches deferred by a budget whose period has rolled over (pipeline/budget.py)
        from pipeline.budget import resume_due_batches
        resume_due_batches(self.engine, self.dispatch)
        return len(stuck)

    def _broker_emptied(self) -> bool:
        """True when a marker key set in the broker's Redis is gone: the Celery queues went with it.

        A batch dispatched twice runs once (its lease, db.claim_batch), so dispatching
        again on a fresh marker (first start, or a stack started anew) costs nothing.
        """
        try:
            return bool(self.cache.redis.set(BROKER_MARK, "1", nx=True))
        except redis.RedisError as e:
            log.warning("sweep: cannot reach Redis (%s)", e)
            return False

    # -------------------------------------------------------------- loop

    def run(self, max_seconds: float | None = None) -> None:
        for topic, consumer in self.consumers.items():
            consumer.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        started = time.monotonic()
        log.info("batcher ready (group %s, topics %s, %s)", self.settings.consumer_group,
                 IMMEDIATE_TOPIC, REQUESTS_TOPIC)
        try:
            while not self.stopping:
                if max_seconds is not None and time.monotonic() - started > max_seconds:
                    break
                # the fast lane first, at every turn; a bulk turn is short so the next comes soon
                msgs = self.fast.consume(num_messages=1000, timeout=0)
                idle = 0.005 if self.buffers else 0.02  # idle: an immediate request waits at most 20 ms
                msgs += self.consumer.consume(num_messages=BULK_TURN, timeout=0 if msgs else idle)
                now = datetime.now(timezone.utc)
                for msg in msgs:
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("kafka: %s", err)
                        continue
                    self.add(msg, now)
                self.flush(self.due())
                self._commit()
                metrics.observe_consumer_lag(*self.consumers.values())   # throttled: every few seconds
                self.dlq.poll(0)
                if time.monotonic() - self.last_sweep > self.settings.sweep_after_s / 2:
                    self.last_sweep = time.monotonic()
                    self.sweep()
            self.flush(self.due(force=True))
            self._commit(sync=True)
        finally:
            self.dlq.flush(10)
            for consumer in self.consumers.values():
                consumer.close()
            log.info("batcher stopped: %s", dict(self.stats))
