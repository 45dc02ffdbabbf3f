"""The batcher: Kafka ``llm.requests`` → tiered, model-grouped batches in Postgres.

A consumer group member, at-least-once, of ``llm.requests`` and, with a
consumer of its own, of its fast lane ``llm.requests.immediate`` (where
producers put what they classify immediate). The fast lane is served first
in every turn and again after every slice of ``BULK_SLICE`` bulk messages,
and its buffers are written and dispatched in a transaction of their own
(``serve_fast``); a bulk flush's transaction runs in a writer thread of its
own (``bulk_written`` finishes it on the loop). An immediate request waits
for at most one slice of bulk decoding, never for a turn of bulk work or a
bulk write. Every message ends as exactly one of: a request row,
or a copy on ``llm.requests.dlq`` with an ``error`` header and its origin in
headers. For every poll round:

1. check who sent each message (``pipeline/intake/kafka.py`` ``verify``: the
   producer's signature), then decode it (``pipeline/intake/messages.py``: strict
   JSON, the JSON Schema, the cost recomputed from the price book); one that
   fails, for any reason, goes to the DLQ and never blocks its partition;
2. classify the tier and append to the buffer of its (tier, model, mode, endpoint);
3. flush buffers that are full or have lingered long enough: one transaction
   writes the requests (deduped on (job, custom_id)) and their batch rows;
   a request for a job that is finished, cancelled or another producer's is
   not written but dead-lettered with that reason (``batches.admit_requests``).
   A flush Postgres refuses for its data is split in halves until the
   messages it refuses are isolated and dead-lettered; the rest commit;
4. after the commit, hand immediate and peak batches to their Celery queues
   (off-peak and background stay held in Postgres for the scheduler);
5. only then commit Kafka offsets, and only up to the first message of each
   partition that is still buffered, being written, waiting for Postgres, or whose DLQ copy
   Kafka has not acknowledged yet.

It must never commit an offset before the rows (or the DLQ copy) are
durable, and never exit because of a message or an outage: while Postgres
is unreachable the partitions are paused and the write is retried with
backoff; a Redis outage only delays dispatch (the sweep sends what is left
``queued``) and makes the cache miss; Kafka errors are logged and waited
out. One log line per state change (down, back), not one per attempt.

A crash between steps 3 and 4 leaves a batch ``queued``: the sweep dispatches
it. If the broker's Redis loses its data, the Celery queues go with it: the
sweep sees its marker key gone and dispatches every batch no worker has
taken yet again.
"""

from __future__ import annotations

import logging
import signal
import time
import uuid
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor, wait as wait_all
from dataclasses import dataclass, field
from datetime import datetime, timezone

import redis
import sqlalchemy as sa
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from pipeline.paths.registry import scheduler_paths
from pipeline import metrics
from pipeline.config import Settings, get_settings
from pipeline.constants import IMMEDIATE_TOPIC, REDIS_PREFIX, REQUESTS_TOPIC, TIERS
from pipeline.errors import ConfigError, LineError
from pipeline.intake.kafka import make_consumer, make_producer, verify
from pipeline.intake.cached import CachedAnswers, cached_result
from pipeline.intake.deadletters import DeadLetters
from pipeline.intake.messages import decode
from pipeline.intake.outages import Dependency, is_conflict, is_outage
from pipeline.intake.tiers import rules_for
from pipeline.intake.windows import Window
from pipeline.money.pricing import get_price_book
from pipeline.money.tokens import ENCODINGS, get_encoding
from pipeline.paths.registry import path_for
from pipeline.stores import batches as batch_store, db
from pipeline.stores.cache import ResponseCache

log = logging.getLogger(__name__)

#: bulk messages taken in one turn of the loop (tens of ms of work)
BULK_TURN = 500
#: bulk messages decoded between two visits of the fast lane (1-4 ms of work; a visit with nothing
#: waiting costs about a microsecond)
BULK_SLICE = 20
#: tiers whose buffers the fast lane writes on each visit, in their own transaction
FAST_TIERS = ("immediate",)
BULK_TIERS = tuple(t for t in TIERS if t not in FAST_TIERS)
#: a key in the broker's Redis; its absence means the Celery queues were lost (Batcher.sweep)
BROKER_MARK = REDIS_PREFIX + "broker-mark"


@dataclass(slots=True)
class Item:
    """A decoded message: its row and where it came from (for its offset and a DLQ copy)."""
    row: dict
    tp: tuple
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class Buffer:
    tier: str
    provider: str
    model: str
    mode: str = "realtime"                        # realtime | provider_batch
    items: list = field(default_factory=list)
    since: float = field(default_factory=time.monotonic)


def dispatch(batch_id: str, tier: str, jobs: list[str] | None = None) -> None:
    """Hand a batch to its tier's Celery queue (by task name: pipeline never imports workers)."""
    from pipeline.intake.dispatch import enqueue_batch
    enqueue_batch(batch_id, tier, jobs)


class Batcher:
    def __init__(self, settings: Settings | None = None, *, dispatcher=dispatch, engine=None):
        self.settings = settings or get_settings()
        if not self.settings.kafka_producer_key:
            raise ConfigError("no kafka_producer_key: the batcher checks every message's producer signature"
                              " with it (var/secrets.env, or LLMBATCH_KAFKA_PRODUCER_KEY)")
        self.engine = engine or db.get_engine()
        self.dispatch = dispatcher
        # deadlines are classified against the off-peak window (pipeline/intake/tiers.py); the batcher's
        # clock is real time, the scheduler releases what this got wrong (schedules/deadlines.py)
        self.window = Window.offpeak(self.settings)
        self.tier_rules = rules_for(self.settings)
        hooks = {"error_cb": self._on_kafka_error, "on_commit": self._on_commit}
        self.consumer = make_consumer(self.settings, **hooks)
        # the fast lane has a consumer (and so a fetch queue) of its own: in a shared one it
        # waited behind every bulk message already fetched, up to the whole of a bulk job
        self.fast = make_consumer(self.settings, group=self.settings.consumer_group + ".immediate", **hooks)
        self.consumers = {REQUESTS_TOPIC: self.consumer, IMMEDIATE_TOPIC: self.fast}
        self.dlq = make_producer(self.settings, role="batcher", error_cb=self._on_kafka_error)
        self.cache = ResponseCache(self.settings.redis_url, self.settings.cache_ttl_s)
        self.buffers: dict[tuple, Buffer] = {}
        #: items whose write waits for Postgres to come back (the partitions are paused meanwhile)
        self.backlog: list[Item] = []
        self.paused = False
        # keyed by (topic, partition)
        self.pending: dict[tuple, dict[int, int]] = defaultdict(dict)   # -> {offset: count}
        self.consumed: dict[tuple, int] = {}                            # -> last offset seen
        self.committed: dict[tuple, int] = {}
        self.postgres = Dependency("Postgres")
        self.redis = Dependency("Redis")
        self.kafka = Dependency("Kafka")
        self.stopping = False
        self.last_sweep = 0.0
        self.stats = defaultdict(int)
        self.cached = CachedAnswers(self.cache, self.redis, self.stats)
        self.dead = DeadLetters(self.dlq, self.kafka, self.stats, hold=self._hold, release=self._release,
                                owned=self.consumed.__contains__)
        #: bulk flushes run their transaction here, one at a time, so the loop keeps serving the
        #: fast lane while Postgres writes them: (items, answers, plan, future) or None
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="bulk-writer")
        self.writing: tuple | None = None

    # -------------------------------------------------------------- kafka side

    def _on_assign(self, consumer, partitions):
        log.info("assigned partitions %s", [f"{p.topic}[{p.partition}]" for p in partitions])
        if self.paused:
            consumer.pause(partitions)

    def _on_revoke(self, consumer, partitions):
        """Give up buffered messages of revoked partitions; the next owner re-reads them."""
        lost = {(p.topic, p.partition) for p in partitions}
        log.info("revoked partitions %s", [f"{t}[{p}]" for t, p in sorted(lost)])
        self._commit(sync=True)
        for key, buf in list(self.buffers.items()):
            buf.items = [it for it in buf.items if it.tp not in lost]
            if not buf.items:
                del self.buffers[key]
        self.backlog = [it for it in self.backlog if it.tp not in lost]
        for p in lost:
            self.pending.pop(p, None)
            self.consumed.pop(p, None)
            self.committed.pop(p, None)

    def _on_kafka_error(self, err) -> None:
        if err.fatal():
            log.error("kafka: fatal error: %s", err)
        code = err.code()
        if code in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE,
                    KafkaError._TIMED_OUT, KafkaError.NETWORK_EXCEPTION):
            self.kafka.failed(err)
        else:
            log.info("kafka: %s", err)

    def _on_commit(self, err, partitions) -> None:
        """An offset commit Kafka did not take is made again at the next turn."""
        failed = [p for p in partitions or () if p.error is not None]
        if err is None and not failed:
            self.kafka.ok()
        if err is not None or failed:
            for p in (partitions or ()):
                if err is not None or p.error is not None:
                    self.committed.pop((p.topic, p.partition), None)
            if err is not None and err.code() != KafkaError._NO_OFFSET:
                log.info("offset commit not taken (made again): %s", err)

    def _hold(self, tp: tuple, offset: int) -> None:
        self.pending[tp][offset] = self.pending[tp].get(offset, 0) + 1

    def _release(self, tp: tuple, offset: int) -> None:
        waiting = self.pending.get(tp)
        if waiting is not None and offset in waiting:
            waiting[offset] -= 1
            if not waiting[offset]:
                del waiting[offset]

    def _commit(self, sync: bool = False) -> None:
        """Commit, per partition, up to the first offset still held."""
        offsets = defaultdict(list)
        for tp, last in self.consumed.items():
            waiting = self.pending.get(tp)
            upto = min(waiting) if waiting else last + 1
            if self.committed.get(tp) != upto:
                offsets[tp[0]].append(TopicPartition(*tp, upto))
                self.committed[tp] = upto
        for topic, tps in offsets.items():
            try:
                self.consumers[topic].commit(offsets=tps, asynchronous=not sync)
            except Exception as e:  # a revoked partition, or Kafka away: made again next turn
                for tp in tps:
                    self.committed.pop((tp.topic, tp.partition), None)
                log.info("offset commit skipped: %s", e)

    def _pause(self, on: bool) -> None:
        """Stop (or restart) fetching while Postgres is away: the loop keeps polling, so
        the group keeps its members, but nothing piles up in memory."""
        if on == self.paused:
            return
        self.paused = on
        for consumer in self.consumers.values():
            try:
                parts = consumer.assignment()
                if parts:
                    (consumer.pause if on else consumer.resume)(parts)
            except KafkaException as e:
                log.info("kafka: cannot %s partitions: %s", "pause" if on else "resume", e)

    # -------------------------------------------------------------- batching

    def add(self, msg, now: datetime, offpeak_opens: datetime | None = None) -> None:
        tp, o = (msg.topic(), msg.partition()), msg.offset()
        self.consumed[tp] = max(o, self.consumed.get(tp, -1))
        try:
            producer = verify(self.settings, msg.headers(), msg.value())
            row = decode(msg.value(), now, get_price_book(), offpeak_opens=offpeak_opens, rules=self.tier_rules)
            row["producer"] = producer
        except LineError as e:
            self.dead.send(tp, o, msg.key(), msg.value(), e.reason)
            return
        except Exception as e:   # a defect here must cost one message, never the loop
            log.exception("message %s[%d]@%d: unexpected error while decoding", tp[0], tp[1], o)
            self.dead.send(tp, o, msg.key(), msg.value(), f"{type(e).__name__}: {e}")
            return
        key = (row["tier"], row["model"], row["mode"], row["endpoint"])
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = Buffer(row["tier"], row["provider"], row["model"], row["mode"])
        buf.items.append(Item(row, tp, o, msg.key(), msg.value()))
        self._hold(tp, o)

    def due(self, force: bool = False, tiers: tuple[str, ...] | None = None) -> list[Buffer]:
        """Buffers full or lingered long enough (all with ``force``), of ``tiers`` only when given."""
        nowm = time.monotonic()
        out = []
        for key, buf in list(self.buffers.items()):
            if tiers is not None and buf.tier not in tiers:
                continue
            if force or len(buf.items) >= self.settings.batch_max_size[buf.tier] \
                    or nowm - buf.since >= self.settings.batch_linger_s[buf.tier]:
                out.append(self.buffers.pop(key))
        return out

    def flush(self, buffers: list[Buffer]) -> None:
        """Write the buffers' requests and batches, then dispatch; what waits for Postgres
        goes to the backlog."""
        items = [it for buf in buffers for it in buf.items]
        if not items:
            return
        answers = self.cached.answers(items)
        self.backlog.extend(self._write(items, answers))
        self._pause(bool(self.backlog))

    def retry_backlog(self) -> None:
        if self.backlog and self.postgres.may_try():
            items, self.backlog = self.backlog, []
            self.backlog = self._write(items, self.cached.answers(items))
            self._pause(bool(self.backlog))

    def _transact(self, rows: list, batches: list, cached: list) -> tuple[dict, dict]:
        """The write itself, one transaction: ``(refused, counts)``. Touches no state of the
        batcher's, so it may run in the bulk writer's thread."""
        with self.engine.begin() as conn:
            rows, refused = batch_store.admit_requests(conn, rows)
            return refused, batch_store.write_batches(conn, rows, batches, cached)

    def _write(self, items: list[Item], answers: dict, plan: tuple | None = None,
               written: Future | None = None) -> list[Item]:
        """Write ``items`` in one transaction (or take the outcome of ``written``, that
        transaction of ``plan`` run in the bulk writer's thread); returns those left for when
        Postgres is back.

        A refusal for data reasons splits the items in halves until each refused one
        is alone, and that one goes to the DLQ with Postgres' reason.
        """
        rows, batches, cached = plan or self._plan(items, answers)
        try:
            refused, counts = written.result() if written is not None else self._transact(rows, batches, cached)
        except Exception as e:
            if is_conflict(e):
                self.postgres.conflicted(getattr(e, "orig", e))
                return items
            if is_outage(e) or not self._postgres_reachable():
                self.postgres.failed(getattr(e, "orig", e))
                return items
            if len(items) == 1:
                it = items[0]
                reason = str(getattr(e, "orig", e)).strip().splitlines()[0] if str(e).strip() else ""
                self.dead.send(it.tp, it.offset, it.key, it.value,
                             f"Postgres refused the request ({type(getattr(e, 'orig', e)).__name__}): {reason}")
                self._release(it.tp, it.offset)
                return []
            mid = len(items) // 2
            log.info("flush of %d requests refused by Postgres (%s): splitting it", len(items),
                     type(getattr(e, "orig", e)).__name__)
            left = self._write(items[:mid], answers)
            return left + items[mid:] if left else self._write(items[mid:], answers)
        self.postgres.ok()
        self.stats["requests"] += sum(counts.values())
        self.stats["replayed"] += len(items) - sum(counts.values()) - len(cached)
        self.stats["cache_hits"] += len(cached)
        metrics.record_savings(cached)   # a replayed message's hit is counted again here, once in the ledger
        self.stats["batches"] += len([b for b in batches if counts.get(b["batch_id"])])
        self._send([b for b in batches if counts.get(b["batch_id"]) and b["status"] == "queued"])
        for it in items:
            reason = refused.get((it.row["job_id"], it.row["custom_id"], it.row["producer"]))
            if reason is not None:   # its copy holds the offset until Kafka has it
                self.dead.send(it.tp, it.offset, it.key, it.value, reason)
            self._release(it.tp, it.offset)
        return []

    def _postgres_reachable(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except Exception:
            return False

    def _plan(self, items: list[Item], answers: dict) -> tuple[list, list, list]:
        """Rows (deduped on (job, custom_id)), their batches and the cache's result rows."""
        rows, batches, cached, seen = [], [], [], set()
        groups: dict[tuple, list] = defaultdict(list)
        for it in items:
            row = dict(it.row, batch_id=None)
            k = (row["job_id"], row["custom_id"])
            if k in seen:   # one key twice in one INSERT fails
                continue
            seen.add(k)
            hit = cached_result(row, answers.get(row["cache_key"])) if row["cache_key"] else None
            if hit is not None:
                row["status"] = "succeeded"
                rows.append(row)
                cached.append(hit)
                continue
            # one url per batch: a provider batch takes a single endpoint (OpenAI's rule)
            groups[(row["tier"], row["provider"], row["model"], row["mode"], row["endpoint"])].append(row)
        for (tier, provider, model, mode, endpoint), group in groups.items():
            size = self.settings.batch_max_size[tier]
            for i in range(0, len(group), size):
                batch_id = "b_" + uuid.uuid4().hex
                # the path says: dispatched now, or held (for the window, or for the scheduler's provider batches)
                status = path_for(mode).initial_status(tier)
                part = group[i:i + size]
                batches.append({"batch_id": batch_id, "tier": tier, "provider": provider,
                                "model": model, "status": status, "mode": mode, "endpoint": endpoint,
                                "jobs": sorted({row["job_id"] for row in part})})
                for row in part:
                    row["batch_id"] = batch_id
                    rows.append(row)
        return rows, batches, cached

    def _send(self, batches: list[dict]) -> int:
        """Dispatch committed batches; with Redis away they stay ``queued`` for the sweep.
        Returns how many were handed to the broker."""
        sent = []
        for b in batches:
            if not self.redis.may_try():
                break
            try:
                self.dispatch(b["batch_id"], b["tier"], b.get("jobs"))
            except Exception as e:   # the broker (Redis) is unreachable
                self.redis.failed(e)
                break
            self.redis.ok()
            sent.append(b["batch_id"])
        if len(sent) < len(batches):
            log.info("%d batches left queued until Redis is back (the sweep sends them)",
                     len(batches) - len(sent))
        if sent:
            try:
                with db.autocommit(self.engine) as conn:   # one statement: no BEGIN, no COMMIT
                    batch_store.mark_dispatched(conn, sent)
            except Exception as e:   # still 'queued': the sweep sends them again, a lease runs each once
                log.info("batches dispatched but not marked so: %s", e)
        return len(sent)

    def sweep(self) -> int:
        """Dispatch batches committed but never dispatched, or whose worker died.

        Held batches are ``held``, not ``queued``: the sweep never releases them.
        Skipped while Postgres or Redis is away; it runs again soon after.
        """
        if not (self.postgres.up and self.redis.may_try()):
            return 0
        try:
            emptied = self._broker_emptied()   # a Redis call: before the transaction, not inside it
            with self.engine.begin() as conn:
                stuck = batch_store.undispatched_batches(conn, self.settings.sweep_after_s)
                if emptied:
                    lost = batch_store.dispatched_batches(conn)
                    log.warning("the Celery broker's Redis lost its data (flushed, or restarted empty): "
                                "dispatching the %d batches its queues held again", len(lost))
                    stuck += lost
            for batch_id, tier in stuck:
                log.warning("sweep: dispatching batch %s (%s) again", batch_id, tier)
            sent = self._send([{"batch_id": b, "tier": t} for b, t in stuck])
            if emptied and sent == len(stuck):
                self._mark_broker()   # only now: a sweep cut short before this looks again
            # batches deferred by a budget whose period has rolled over (pipeline/money/deferral.py)
            from pipeline.money.deferral import resume_due_batches
            resume_due_batches(self.engine, self.dispatch, scheduler_paths())
        except Exception as e:   # an outage mid-sweep: the next sweep does it
            log.warning("sweep not finished (%s: %s); it runs again", type(e).__name__,
                        str(e).strip().splitlines()[0][:200] if str(e).strip() else "")
            if is_outage(e) and not is_conflict(e):
                self.postgres.failed(getattr(e, "orig", e))
            return 0
        return len(stuck)

    def _broker_emptied(self) -> bool:
        """True when a marker key set in the broker's Redis is gone: the Celery queues went with it.
        The sweep sets it again (``_mark_broker``) once it has sent what they held again.

        A batch dispatched twice runs once (its lease, batches.claim_batch), so dispatching
        again on a fresh marker (first start, or a stack started anew) costs nothing.
        """
        try:
            gone = not self.cache.redis.exists(BROKER_MARK)
        except redis.RedisError as e:
            self.redis.failed(e)
            return False
        self.redis.ok()
        return gone

    def _mark_broker(self) -> None:
        try:
            self.cache.redis.set(BROKER_MARK, "1")
        except redis.RedisError as e:   # the next sweep finds it gone and sends again: harmless
            self.redis.failed(e)

    # -------------------------------------------------------------- loop

    def turn(self) -> None:
        """One round: the fast lane, then bulk messages in slices with the fast lane served
        between them, then a bulk flush handed to the writer thread (one at a time)."""
        # backpressure: while a bulk write is out, buffer at most two turns more
        full = self.writing is not None and sum(len(b.items) for b in self.buffers.values()) >= 2 * BULK_TURN
        bulk = [] if full else self.consumer.consume(num_messages=BULK_TURN, timeout=0)
        if not self.serve_fast() and not bulk:
            # idle, or held back: wait on the fast lane, so an immediate request wakes the loop at once
            self.serve_fast(wait=0.2 if self.paused else (0.005 if self.buffers else 0.02))
            bulk = [] if full else self.consumer.consume(num_messages=BULK_TURN, timeout=0)
        if bulk:
            now = datetime.now(timezone.utc)
            opens = self._offpeak_opens(now)
            for i in range(0, len(bulk), BULK_SLICE):
                if i:
                    self.serve_fast()
                for msg in bulk[i:i + BULK_SLICE]:
                    self._take(msg, now, opens)
        self.bulk_written()
        if self.backlog:
            self.retry_backlog()
        if self.writing is None and not self.backlog:
            self.serve_fast()
            self._write_bulk([it for buf in self.due(tiers=BULK_TIERS) for it in buf.items])
        self._commit()
        metrics.observe_consumer_lag(*self.consumers.values())   # throttled: every few seconds
        self.dlq.poll(0)
        self.dead.retry()
        if time.monotonic() - self.last_sweep > self.settings.sweep_after_s / 2:
            self.last_sweep = time.monotonic()
            self.sweep()

    def serve_fast(self, wait: float = 0.0) -> int:
        """Take what the fast lane holds (waiting up to ``wait`` s for a first message), and write
        and dispatch immediate buffers that are due, in a transaction of their own: an immediate
        request never waits for a bulk slice's decoding or a bulk flush. Returns the messages taken."""
        msgs = self.fast.consume(num_messages=1000, timeout=0)
        if not msgs and wait:
            first = self.fast.poll(wait)
            msgs = [first] + self.fast.consume(num_messages=1000, timeout=0) if first is not None else []
        if msgs:
            now = datetime.now(timezone.utc)
            opens = self._offpeak_opens(now)
            for msg in msgs:
                self._take(msg, now, opens)
        due = [] if self.backlog else self.due(tiers=FAST_TIERS)
        if due:
            self.flush(due)
            self._commit()
        return len(msgs)

    def _write_bulk(self, items: list[Item]) -> None:
        """Hand the transaction of a bulk flush to the writer thread; the loop goes on serving
        the fast lane meanwhile, and ``bulk_written`` takes the outcome (offsets, dispatch)."""
        if items:
            answers = self.cached.answers(items)
            plan = self._plan(items, answers)
            self.writing = (items, answers, plan, self.writer.submit(self._transact, *plan))

    def bulk_written(self, wait: bool = False) -> None:
        """Finish the bulk write the writer thread is done with (``wait``: wait for it)."""
        if self.writing is None or not (wait or self.writing[3].done()):
            return
        (items, answers, plan, written), self.writing = self.writing, None
        wait_all([written])
        self.backlog.extend(self._write(items, answers, plan, written))
        self._pause(bool(self.backlog))

    def _take(self, msg, now: datetime, opens: datetime) -> None:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                self._on_kafka_error(err)
            return
        self.kafka.ok()
        self.add(msg, now, opens)

    def _offpeak_opens(self, now: datetime) -> datetime:
        """When held off-peak work can first run; a window that never opens is infinitely far."""
        opens = self.window.opens_at(now)
        return opens if opens is not None else datetime.max.replace(tzinfo=timezone.utc)

    def run(self, max_seconds: float | None = None) -> None:
        # the tokenizers load now, not on the first message: in a profile of a batcher just
        # restarted on a busy machine that was half the samples (3.3 s), both lanes waiting behind it
        for name in ENCODINGS:
            get_encoding(name)
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
                try:
                    self.turn()
                except KafkaException as e:   # the broker away, a rebalance failing: wait, go on
                    self.kafka.failed(e)
                    time.sleep(min(self.kafka.delay, 5.0))
            self.bulk_written(wait=True)
            if not self.backlog:
                self.flush(self.due(force=True))
            self._commit(sync=True)
        finally:
            self.writer.shutdown(wait=True)
            self.dlq.flush(10)
            for consumer in self.consumers.values():
                consumer.close()
            log.info("batcher stopped: %s", dict(self.stats))
