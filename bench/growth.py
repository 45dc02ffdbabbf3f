"""How each cost grows with the work (issue 23, item 5). Four parts, each alone with ``--only``:

- ``workers``: the e2e run (bench/e2e.py ``pipeline``: same file shape, zero simulated
  latency) with the peak tier's worker restarted with 1, 2 and 4 pool processes
  (``LLMBATCH_WORKER_CONCURRENCY=peak=K``): throughput, and CPU seconds per 1,000
  requests of every stack process (bench/cpu.py);
- ``submit``: submit time, lines per second, submit's peak RSS (VmHWM) and CPU per 1,000
  lines (submit's and Kafka's) for 10k, 100k and 1M lines, with the batcher stopped; the lines are then skipped (the
  batcher's consumer groups moved to the end of the request topics) and the job
  cancelled, so the next part starts from a quiet stack;
- ``storage``: Postgres bytes per request, per table, split into heap, indexes and
  TOAST (``pg_table_size``, ``pg_indexes_size``, ``pg_total_relation_size`` of the
  TOAST table), the difference over one job of N requests; also the average row
  size (``pg_column_size``) of the job's own rows;
- ``partitions``: batcher messages per second (request rows written / span of their
  ``created_at``, as bench/batcher.py) with the load spread over 1, 2, 3 and 6 of
  the request topic's partitions: the batcher stopped, K jobs submitted whose ids
  the producer's partitioner (librdkafka's default, CRC32 of the key, the job id)
  sends to K different partitions, the batcher started.

    .venv/bin/python bench/growth.py --requests 10000
    .venv/bin/python bench/growth.py --only submit --sizes 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
import uuid
import zlib
from pathlib import Path

import sqlalchemy as sa
from confluent_kafka import TopicPartition

from common import LLMBATCH, ROOT, job_times, restarted, save, simulator, stack_sh, submit, wait_job, write_requests
from e2e import meter, pipeline
from pipeline.config import get_settings
from pipeline.constants import IMMEDIATE_TOPIC, REQUESTS_PARTITIONS, REQUESTS_TOPIC
from pipeline.intake.kafka import make_consumer
from pipeline.stores import db

PARTS = ("workers", "submit", "storage", "partitions")


# ------------------------------------------------------------------ workers

def workers(n: int, counts=(1, 2, 4), timeout: float = 900) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in counts:
            path = write_requests(Path(tmp) / f"w{k}.jsonl", n, prefix=f"growth-w{k}-{int(time.time())}")
            with restarted("worker-peak", LLMBATCH_WORKER_CONCURRENCY=f"peak={k}"), simulator(latency_ms=0.0):
                pipe = pipeline(path, n, timeout)
            procs = pipe["cpu"]["processes"]
            out[str(k)] = {"requests_per_s": pipe["end_to_end_requests_per_s"],
                           "cpu_s_per_1000": pipe["cpu_s_per_1000"],
                           "worker_peak_cpu_s_per_1000": procs.get("worker-peak", {}).get("cpu_s_per_1000"),
                           "machine_busy_cpu_s_per_1000": pipe["cpu"]["machine_busy_cpu_s_per_1000"],
                           "succeeded": pipe["succeeded"], "job_id": pipe["job_id"],
                           "cpu_by_process": {p: v["cpu_s_per_1000"] for p, v in procs.items()}}
    return {"requests": n, "by_worker_processes": out}


# ------------------------------------------------------------------ submit

def skip_to_end() -> dict:
    """Commit the batcher's consumer groups at the end of the request topics (the batcher is
    stopped): what was published while it was down is never read. Returns the offsets."""
    settings = get_settings()
    moved = {}
    for group, topic in ((settings.consumer_group, REQUESTS_TOPIC),
                         (settings.consumer_group + ".immediate", IMMEDIATE_TOPIC)):
        consumer = make_consumer(settings, group=group)
        try:
            parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            ends = [TopicPartition(topic, p, consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1])
                    for p in parts]
            consumer.commit(offsets=ends, asynchronous=False)
            moved[topic] = {tp.partition: tp.offset for tp in ends}
        finally:
            consumer.close()
    return moved


def cancel(job_id: str) -> None:
    subprocess.run([LLMBATCH, "cancel", job_id], cwd=ROOT, check=True, capture_output=True, timeout=120)


def submit_sizes(sizes=(10_000, 100_000, 1_000_000)) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = write_requests(Path(tmp) / f"s{n}.jsonl", n, prefix=f"growth-s{n}-{int(time.time())}")
            file_mb = path.stat().st_size / 2**20
            stack_sh("down", "batcher")
            try:
                with meter("submit") as m:
                    sub = submit(path, name=f"bench-growth-submit-{n}")
                cpu = m.result(n)["processes"]
                skip_to_end()
                cancel(sub["job_id"])
            finally:
                stack_sh("up", "batcher")
            path.unlink()
            out[str(n)] = {"seconds": round(sub["seconds"], 3), "lines_per_s": round(sub["lines"] / sub["seconds"], 1),
                           "peak_rss_mb": round(sub["peak_rss_mb"], 1), "accepted": sub["accepted"],
                           "file_mb": round(file_mb, 1),
                           # CPU per 1,000 lines of submit itself and of Kafka taking the messages
                           "submit_cpu_s_per_1000": cpu["submit"]["cpu_s_per_1000"],
                           "kafka_cpu_s_per_1000": cpu.get("kafka", {}).get("cpu_s_per_1000")}
    return {"by_lines": out}


# ------------------------------------------------------------------ storage

SIZES = sa.text("""
SELECT c.relname,
       pg_table_size(c.oid) - coalesce(pg_total_relation_size(NULLIF(c.reltoastrelid, 0)), 0),
       pg_indexes_size(c.oid),
       coalesce(pg_total_relation_size(NULLIF(c.reltoastrelid, 0)), 0)
  FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace
 WHERE s.nspname = current_schema() AND c.relkind IN ('r', 'p')""")


def table_sizes(conn) -> dict[str, tuple[int, int, int]]:
    """Table -> (heap, indexes, TOAST) bytes."""
    return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in conn.execute(SIZES)}


def row_bytes(conn, job_id: str) -> dict:
    """Average ``pg_column_size`` of the job's rows in the tables keyed by job_id."""
    out = {}
    for (table,) in conn.execute(sa.text(
            "SELECT table_name FROM information_schema.columns WHERE table_schema = current_schema()"
            " AND column_name = 'job_id' AND table_name IN (SELECT tablename FROM pg_tables"
            " WHERE schemaname = current_schema())")).all():
        avg, rows = conn.execute(sa.text(
            f'SELECT avg(pg_column_size(t.*)), count(*) FROM "{table}" t WHERE job_id = :j'), {"j": job_id}).one()
        if rows:
            out[table] = {"rows": rows, "avg_row_bytes": round(float(avg), 1)}
    return out


def storage(n: int, timeout: float = 900) -> dict:
    engine = db.get_engine()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_requests(Path(tmp) / "storage.jsonl", n, prefix=f"growth-pg-{int(time.time())}")
        with engine.connect() as conn:
            before = table_sizes(conn)
        with simulator(latency_ms=0.0):
            pipe = pipeline(path, n, timeout)
        time.sleep(1)
        with engine.connect() as conn:
            after = table_sizes(conn)
            rows = row_bytes(conn, pipe["job_id"])
    per = {}
    for table, (h, i, t) in after.items():
        h0, i0, t0 = before.get(table, (0, 0, 0))
        d = (h - h0, i - i0, t - t0)
        if any(d):
            per[table] = {"heap": round(d[0] / n, 1), "indexes": round(d[1] / n, 1), "toast": round(d[2] / n, 1),
                          "total": round(sum(d) / n, 1)}
    total = {k: round(sum(v[k] for v in per.values()), 1) for k in ("heap", "indexes", "toast", "total")}
    return {"requests": n, "job_id": pipe["job_id"], "bytes_per_request": total, "by_table": per,
            "job_rows": rows,
            "note": "differences of relation sizes: pages reused from earlier deletes make them smaller, "
                    "so run on a fresh stack or compare several sizes"}


# ------------------------------------------------------------------ partitions

def job_id_for(partition: int, partitions: int = REQUESTS_PARTITIONS) -> str:
    """A job id the producer's default partitioner (librdkafka consistent_random: CRC32 of the
    key, the job id, modulo the partition count) sends to ``partition``."""
    while True:
        job_id = "job_" + uuid.uuid4().hex[:20]
        if zlib.crc32(job_id.encode()) % partitions == partition:
            return job_id


def high_watermarks() -> dict[int, int]:
    settings = get_settings()
    consumer = make_consumer(settings, group=settings.consumer_group)
    try:
        parts = consumer.list_topics(REQUESTS_TOPIC, timeout=10).topics[REQUESTS_TOPIC].partitions
        return {p: consumer.get_watermark_offsets(TopicPartition(REQUESTS_TOPIC, p), timeout=10)[1] for p in parts}
    finally:
        consumer.close()


def partitions(n: int, spreads=(1, 2, 3, 6), timeout: float = 900) -> dict:
    out = {}
    engine = db.get_engine()
    with tempfile.TemporaryDirectory() as tmp:
        for k in spreads:
            per_job = n // k
            stamp = int(time.time())
            jobs = []
            with simulator(latency_ms=0.0):
                stack_sh("down", "batcher")
                try:
                    marks = high_watermarks()
                    for p in range(k):
                        path = write_requests(Path(tmp) / f"p{k}-{p}.jsonl", per_job, prefix=f"growth-p{k}-{p}-{stamp}")
                        jobs.append(submit(path, job_id=job_id_for(p), name=f"bench-growth-partitions-{k}")["job_id"])
                    moved = {p: o - marks.get(p, 0) for p, o in high_watermarks().items()}
                finally:
                    stack_sh("up", "batcher")
                for j in jobs:
                    wait_job(j, timeout=timeout)
            with engine.connect() as conn:
                span, rows = conn.execute(sa.text(
                    "SELECT extract(epoch FROM max(created_at) - min(created_at)), count(*)"
                    " FROM requests WHERE job_id = ANY(:j)"), {"j": jobs}).one()
            span = float(span or 0)
            out[str(k)] = {"partitions_used": sum(1 for v in moved.values() if v > 0),
                           "messages_per_partition": {str(p): v for p, v in moved.items() if v},
                           "request_rows": rows, "span_s": round(span, 3),
                           "batcher_messages_per_s": round(rows / span, 1) if span else None,
                           "jobs": jobs}
    return {"requests": n, "topic_partitions": REQUESTS_PARTITIONS, "by_partitions": out}


def run(parts=PARTS, n: int = 10000, sizes=(10_000, 100_000, 1_000_000), timeout: float = 900) -> dict:
    result = {}
    if "workers" in parts:
        result["workers"] = workers(n, timeout=timeout)
    if "submit" in parts:
        result["submit"] = submit_sizes(sizes)
    if "storage" in parts:
        result["storage"] = storage(n, timeout=timeout)
    if "partitions" in parts:
        result["partitions"] = partitions(n, timeout=timeout)
    return save("growth" if set(parts) == set(PARTS) else "growth-" + "-".join(parts), result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10000, help="requests per run of workers, storage, partitions")
    ap.add_argument("--sizes", default="10000,100000,1000000", help="submit sizes, comma-separated")
    ap.add_argument("--only", action="append", choices=PARTS, help="run only this part (repeatable)")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    run(tuple(args.only or PARTS), args.requests, tuple(int(s) for s in args.sizes.split(",")), args.timeout)


if __name__ == "__main__":
    main()
