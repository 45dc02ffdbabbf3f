"""The bad-input corpus through the real stack: ``llmbatch submit FILE --wait --json``.

Every bad line must get a line-numbered rejection (table ``rejections``) with
a reason a person understands, and every good line must run and succeed; the
job still completes.
"""

from __future__ import annotations

import json

import sqlalchemy as sa

from tests.inputs.corpus import all_cases, write_corpus
from tests.integration.conftest import llmbatch


def test_corpus_end_to_end(stack, engine, tmp_path):
    cases = all_cases(ten_mb=True)
    path = write_corpus(tmp_path / "corpus.jsonl", cases)
    proc = llmbatch("submit", path, "--wait", "--json", timeout=240)
    assert proc.returncode == 0, f"submit exited {proc.returncode}: {proc.stderr[-2000:]}"
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    job = status["job_id"]

    rejected = {n: c for n, c in enumerate(cases, 1) if c.kind in ("reject", "kafka")}
    good = {n: c for n, c in enumerate(cases, 1) if c.kind == "ok"}
    requests = sum(1 for c in cases if c.kind != "skip")
    assert status["status"] == "completed"
    assert status["counts"]["total"] == requests
    assert status["counts"]["rejected"] == len(rejected)
    assert status["counts"]["accepted"] == len(good)
    assert status["counts"]["succeeded"] == len(good)

    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT line, reason FROM rejections WHERE job_id = :j"),
                            {"j": job}).all()
        ran = conn.execute(sa.text("SELECT line, status FROM requests WHERE job_id = :j"),
                           {"j": job}).all()
    reasons = dict(rows)
    assert len(reasons) == len(rows), "one rejection per line"
    wrong = []
    for n, case in rejected.items():
        reason = reasons.get(n)
        if reason is None:
            wrong.append(f"line {n} ({case.source}): no rejection, expected {case.expect!r}")
        elif case.text not in reason:
            wrong.append(f"line {n} ({case.source}): reason {reason!r} lacks {case.text!r}")
        elif "Traceback" in reason or "KafkaError{" in reason:
            wrong.append(f"line {n} ({case.source}): reason is not for people: {reason!r}")
    extra = set(reasons) - set(rejected)
    wrong += [f"line {n}: unexpected rejection {reasons[n]!r}" for n in sorted(extra)]
    assert not wrong, "\n".join(wrong)
    assert dict(ran) == {n: "succeeded" for n in good}
