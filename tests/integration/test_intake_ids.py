"""Ids that cannot hurt, and input read in bounded memory (issue 24, items 5, 6 and 8) on the live stack.

Non-ASCII custom_ids run end to end; control characters are refused at submit
with their line numbers and by the batcher with the reason; after a hostile
job, no process's log holds a forged line or an escape byte. A line over
``max_line_bytes`` is refused unread, and submit's peak memory stays bounded;
``submit -`` reads standard input and a gzip file is read as its lines.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import uuid

import sqlalchemy as sa

from pipeline.constants import REQUESTS_TOPIC
from pipeline.intake.dispatch import enqueue_batch
from tests.integration.conftest import LLMBATCH, chat_line, llmbatch, wait_for, write_jsonl
from tests.integration.execution_helpers import LOOP, calls_of, insert_requests, make_batch, requests_of
from tests.integration.test_intake_hostile import DLQReader, publish, wait_accounted
from tests.unit.test_intake_messages import message, raw

PRINTABLE_IDS = ["café-1", "日本-2", "emoji 👩‍👩‍👧", "with space", "quote\"'`\\", "a:b~c/d"]
FORGED = "2026-12-05 05:40:00,000 CRITICAL pipeline.money.budget FORGED"
HOSTILE_IDS = [f"a\n{FORGED}", "esc\x1b[2J", "cr\rinside", "nel\x85inside"]


def _job_id(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def _statuses(engine, job: str) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT custom_id, status FROM requests WHERE job_id = :j"),
                                 {"j": job}).all())


def _all_succeeded(engine, job: str, n: int):
    def done():
        s = _statuses(engine, job)
        return len(s) == n and set(s.values()) == {"succeeded"}
    wait_for(done, timeout=180, every=0.5, what=f"the {n} requests of {job} succeeded")


def test_printable_non_ascii_ids_run_end_to_end(stack, engine, tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl",
                       [chat_line(cid, f"say {i}", max_tokens=8, priority=6) for i, cid in enumerate(PRINTABLE_IDS)])
    job = _job_id(llmbatch("submit", path))
    _all_succeeded(engine, job, len(PRINTABLE_IDS))
    assert set(_statuses(engine, job)) == set(PRINTABLE_IDS)
    assert calls_of(stack, job) == len(PRINTABLE_IDS)   # one call each, under the job's own key prefix


def test_a_worker_calls_with_any_printable_custom_id(stack, engine):
    """The worker's own path, in process: the key used to be ``job:custom_id`` in the Idempotency-Key
    header, and a non-ASCII id failed every call with UnicodeEncodeError (header 'Idempotency-Key')."""
    from workers.execute import run_batch
    job, batch = make_batch(engine, len(PRINTABLE_IDS),
                            overrides={f"r{i}": {"custom_id": cid} for i, cid in enumerate(PRINTABLE_IDS)})
    outcome = LOOP.run_until_complete(run_batch(batch, owner=f"test-{uuid.uuid4().hex[:8]}", settings=stack))
    reqs = requests_of(engine, job)
    assert {c: r["status"] for c, r in reqs.items()} == {c: "succeeded" for c in PRINTABLE_IDS}, \
        {c: r["error"] for c, r in reqs.items()}
    assert outcome["succeeded"] == len(PRINTABLE_IDS) and calls_of(stack, job) == len(PRINTABLE_IDS)


def _log_offsets(stack) -> dict:
    return {p: p.stat().st_size for p in (stack.var_dir / "log").glob("*.log")}


def _new_log_text(offsets: dict, stack) -> dict[str, bytes]:
    out = {}
    for p in (stack.var_dir / "log").glob("*.log"):
        with p.open("rb") as f:
            f.seek(offsets.get(p, 0))
            out[p.name] = f.read()
    return out


def test_a_hostile_job_is_refused_with_line_numbers_and_forges_no_log_line(stack, engine, tmp_path):
    offsets = _log_offsets(stack)
    marker = uuid.uuid4().hex[:8]
    hostile = [h.replace("FORGED", f"FORGED-{marker}") for h in HOSTILE_IDS]

    # 1. at submit: each hostile line refused with its number and reason, the job goes on
    lines = [chat_line("good-0", "hello", max_tokens=8, priority=6)]
    lines += [chat_line(cid, "hello", max_tokens=8, priority=6) for cid in hostile]
    lines += [chat_line("good-1", "hello", max_tokens=8, priority=6)]
    proc = llmbatch("submit", write_jsonl(tmp_path / "hostile.jsonl", lines))
    job = _job_id(proc)
    with engine.connect() as conn:
        refused = conn.execute(sa.text("SELECT line, reason FROM rejections WHERE job_id = :j ORDER BY line"),
                               {"j": job}).all()
    assert [r.line for r in refused] == [2, 3, 4, 5], refused
    assert all(r.reason.startswith("custom_id contains a control character") for r in refused), refused
    assert "\x1b" not in proc.stderr and FORGED not in proc.stderr.replace("\\n", "")
    _all_succeeded(engine, job, 2)

    # 2. at the batcher: the same ids, and a job_id with a newline, straight onto Kafka -> DLQ with the reason
    kjob = f"job_ids_{marker}"
    msgs = [(REQUESTS_TOPIC, kjob.encode(), raw(message(job_id=kjob, custom_id=cid, line=None))) for cid in hostile]
    msgs.append((REQUESTS_TOPIC, b"x", raw(message(job_id=f"job_x\n{FORGED}-{marker}", custom_id="r1", line=None))))
    dlq = DLQReader(stack)
    try:
        origins = publish(stack, msgs)
        figures = wait_accounted(engine, dlq, msgs, origins, [kjob])
        assert figures["rows"] == 0 and figures["dlq"] == len(msgs), figures
        reasons = [h["error"] for o in origins for h in dlq.read()[o]]
        assert all("contains a control character" in r for r in reasons), reasons
    finally:
        dlq.close()

    # 3. in a worker: rows with those ids already stored (as before this check existed), whose model
    # the worker cannot price, so each fails on its own and is logged with its custom_id
    wjob, batch = f"job_wlog_{marker}", f"b-wlog-{marker}"
    rows = [{"job_id": wjob, "custom_id": cid, "line": i + 1, "batch_id": batch, "provider": "openai",
             "model": "no-such-model", "tier": "peak", "tier_reason": "test", "priority": 6,
             "body": {"model": "no-such-model", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
             "input_tokens": 8, "max_cost_usd": "0.0001", "status": "queued"} for i, cid in enumerate(hostile)]
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO jobs (job_id, status, accepted, lines_read) VALUES (:j, 'running', :n, :n)"),
                     {"j": wjob, "n": len(rows)})
        conn.execute(sa.text("INSERT INTO batches (batch_id, tier, provider, model, size, status)"
                             " VALUES (:b, 'peak', 'openai', 'no-such-model', :n, 'dispatched')"),
                     {"b": batch, "n": len(rows)})
        insert_requests(conn, rows)
    enqueue_batch(batch, "peak", [wjob])

    def failed():
        s = _statuses(engine, wjob)
        return len(s) == len(rows) and set(s.values()) == {"failed"}
    wait_for(failed, timeout=120, every=0.5, what="the worker failed the unpriceable rows")

    # 4. every process's log since the test began: the ids were quoted, escaped, on their own lines
    def quoted():
        return marker.encode() in _new_log_text(offsets, stack).get("worker-peak.log", b"")
    wait_for(quoted, timeout=30, every=0.5, what="the worker's log lines about the hostile rows")
    forged_start = re.compile(rb"^" + re.escape(FORGED.encode()), re.M)
    for name, text in _new_log_text(offsets, stack).items():
        assert not forged_start.search(text), f"{name}: a forged line: {forged_start.search(text)}"
        for byte, what in ((b"\x1b", "an escape byte"), (b"\r", "a carriage return"), ("\x85".encode(), "a NEL")):
            assert byte not in text, f"{name}: {what} at offset {text.find(byte)}"


# ------------------------------------------------------------------ bounded lines, stdin, gzip

def test_a_line_over_the_limit_is_refused_unread_and_memory_stays_bounded(stack, engine, tmp_path):
    """A 48 MiB line under a 4 MiB limit: refused with its number, the other lines run, and the submit's
    peak RSS stays bounded (it took 24 times the line before: over 1 GB here)."""
    path = tmp_path / "one-huge-line.jsonl"
    with path.open("wb") as f:
        f.write(json.dumps(chat_line("small-0", "hi", max_tokens=8, priority=6)).encode() + b"\n")
        line = chat_line("huge", "@", max_tokens=8, priority=6)
        head, tail = json.dumps(line).encode().split(b'"@"')
        huge = head + b'"' + b"word " * (48 * 1024 * 1024 // 5) + b'"' + tail
        f.write(huge + b"\n")
        f.write(json.dumps(chat_line("small-2", "hi", max_tokens=8, priority=6)).encode() + b"\n")
    size = len(huge)
    del huge
    # the submit's own peak: VmHWM of its process, read as it exits. A child's ru_maxrss would not do:
    # Linux counts in it the parent's memory at the fork (478 MiB of pytest, late in a CI run)
    hwm = tmp_path / "hwm"
    report = ("import atexit, sys\n"
              "def hwm():\n"
              "    kb = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
              f"    open({str(hwm)!r}, 'w').write(kb)\n"
              "atexit.register(hwm)\n"
              "sys.argv = ['llmbatch', 'submit', sys.argv[1]]\n"
              "from llmbatch.cli import run\n"
              "run()\n")
    done = subprocess.run([sys.executable, "-c", report, str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LLMBATCH_MAX_LINE_BYTES": str(4 * 1024 * 1024)})
    peak_mib = int(hwm.read_text()) / 1024
    job = _job_id(done)
    assert f"line 2: the line is {size:,} bytes, more than the 4,194,304" in done.stderr, done.stderr
    assert peak_mib < 400, f"submit peaked at {peak_mib:.0f} MiB for a 48 MiB line under a 4 MiB limit"
    _all_succeeded(engine, job, 2)


def test_submit_dash_reads_standard_input_and_a_gzip_file_is_read(stack, engine, tmp_path):
    plain = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"s{i}", f"stdin {i}", max_tokens=8, priority=6)
                                                for i in range(3)])
    with plain.open("rb") as stdin:
        proc = subprocess.run([LLMBATCH, "submit", "-"], stdin=stdin, capture_output=True, text=True, timeout=300)
    job = _job_id(proc)
    _all_succeeded(engine, job, 3)

    packed = tmp_path / "in.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes().replace(b'"s', b'"z')))
    job = _job_id(llmbatch("submit", packed))
    _all_succeeded(engine, job, 3)
    assert set(_statuses(engine, job)) == {"z0", "z1", "z2"}

    with packed.open("rb") as stdin:   # gzip on standard input too
        proc = subprocess.run([LLMBATCH, "submit", "-"], stdin=stdin, capture_output=True, text=True, timeout=300)
    _all_succeeded(engine, _job_id(proc), 3)
