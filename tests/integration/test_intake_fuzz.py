"""Generated messages (valid, invalid, hostile) straight to Kafka: every one ends as exactly
one request row or one DLQ copy, and the batcher is the same process at the end.

``LLMBATCH_FUZZ_MESSAGES`` sets how many (default 1,500, a couple of minutes here);
the issue's run is ``LLMBATCH_FUZZ_MESSAGES=10000``. The figures are printed and
written to ``var/fuzz-report.json``.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from pipeline.constants import IMMEDIATE_TOPIC, REQUESTS_TOPIC
from tests.integration.test_intake_hostile import (DLQReader, assert_same_batcher, batcher_pid, publish,
                                                   wait_accounted)

N = int(os.environ.get("LLMBATCH_FUZZ_MESSAGES", "1500"))
CHUNK = 25
DEEP = "\x01deep\x01"      # replaced, in the serialised bytes, by an array nested that deep

MODELS = {"gpt-4o-mini": "openai", "gpt-4.1-nano": "openai", "claude-haiku-4-5": "anthropic",
          "gpt-99": "openai", "claude-3-5-haiku-latest": "anthropic", "gpt-4o": "openai", "gpt-5-nano": "openai"}

hostile_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", "\x00", "a\x00b", "\ud800", "日本語 🎉", "\u202e", "NaN", "Infinity", "-5", "1e12",
                     "yesterday", "2026-12-02T10:00:00", " ", "x" * 600]),
)
hostile_value = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**40, max_value=2**40),
    st.sampled_from([10**12, 2**31, 2**63, -1, 0, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    hostile_text, st.just(DEEP),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
dates = st.one_of(
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.datetimes().map(lambda d: d.isoformat()),          # no offset: refused
    st.sampled_from(["2026-12-02T10:00:00", "yesterday", "2026-02-30T00:00:00Z", "0000-01-01T00:00:00Z",
                     "9999-12-31T23:59:59+14:00", "2026-12-01T12:00:00.123456789Z", "2026-12-01 12:00:00Z",
                     "2026-12-01t12:00:00z", "2026-12-01T23:59:60Z"]),
)


ROLES = {"openai": st.sampled_from(["user", "system", "assistant"]), "anthropic": st.sampled_from(["user", "assistant"])}
S = {  # built once: a strategy built inside a draw is validated again at every draw (slow)
    "model": st.sampled_from(sorted(MODELS)),
    "content": st.text(max_size=40),
    "n_messages": st.integers(min_value=1, max_value=3),
    "bool": st.booleans(),
    "max_tokens": st.integers(min_value=1, max_value=64),
    "temperature": st.sampled_from([0, 0.5, 1]),
    "custom_id": st.text(alphabet="abcdefghij-_0123456789", min_size=1, max_size=12),
    "line": st.one_of(st.none(), st.integers(min_value=1, max_value=10**6)),
    "input_tokens": st.integers(min_value=0, max_value=3000),
    "cost": st.decimals(min_value=0, max_value=10, places=8).map(lambda d: format(d, "f")),
    "priority": st.one_of(st.none(), st.integers(min_value=0, max_value=9)),
    "tier": st.sampled_from([None, "immediate", "peak", "offpeak", "background"]),
    "date": st.one_of(st.none(), st.none(), dates),
    "metadata": st.one_of(st.none(), st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)),
    "cache": st.sampled_from([None, True, False]),
    "mode": st.sampled_from([None, "realtime", "realtime", "provider_batch"]),
    "mutations": st.sampled_from([0, 0, 0, 1, 1, 2, 3]),
    "kind": st.sampled_from(["field", "drop", "body", "content", "extra"]),
    "index": st.integers(min_value=0, max_value=10**6),
    "body_field": st.sampled_from(["model", "messages", "max_tokens", "temperature", "n"]),
    "content_or_value": st.one_of(hostile_text, hostile_value),
    "extra_key": st.text(max_size=6),
    "how": st.sampled_from(["json"] * 12 + ["truncate", "garble", "array", "not-json"]),
    "depth": st.sampled_from([3, 64, 65, 1000, 100_000]),
}


@st.composite
def message(draw, jobs):
    model = draw(S["model"])
    provider = MODELS[model]
    msgs = [{"role": draw(ROLES[provider]), "content": draw(S["content"])} for _ in range(draw(S["n_messages"]))]
    msgs[0]["role"] = "user"
    body = {"model": model, "messages": msgs}
    if provider == "anthropic" or draw(S["bool"]):
        body["max_tokens"] = draw(S["max_tokens"])
    if draw(S["bool"]):
        body["temperature"] = draw(S["temperature"])
    m = {"v": 1, "job_id": jobs[draw(S["index"]) % len(jobs)], "custom_id": draw(S["custom_id"]),
         "line": draw(S["line"]), "provider": provider, "model": model, "body": body,
         "input_tokens": draw(S["input_tokens"]), "tokens_exact": draw(S["bool"]),
         "max_cost_usd": draw(S["cost"]), "priority": draw(S["priority"]), "tier": draw(S["tier"]),
         "deadline": draw(S["date"]), "metadata": draw(S["metadata"]), "cache": draw(S["cache"]),
         "mode": draw(S["mode"]), "published_at": draw(S["date"])}
    # then break it, or not
    for _ in range(draw(S["mutations"])):
        kind = draw(S["kind"])
        keys = sorted(m)
        if kind == "field" and keys:
            m[keys[draw(S["index"]) % len(keys)]] = draw(hostile_value)
        elif kind == "drop" and keys:
            m.pop(keys[draw(S["index"]) % len(keys)], None)
        elif kind == "body" and isinstance(m.get("body"), dict):
            m["body"][draw(S["body_field"])] = draw(hostile_value)
        elif kind == "content" and isinstance(m.get("body"), dict) and isinstance(m["body"].get("messages"), list) \
                and m["body"]["messages"] and isinstance(m["body"]["messages"][0], dict):
            m["body"]["messages"][0]["content"] = draw(S["content_or_value"])
        else:
            m[draw(S["extra_key"])] = draw(hostile_value)
    return m, draw(S["how"]), draw(S["depth"]), draw(S["index"])


def serialise(m: dict, how: str, depth: int, cut: int, index: int) -> bytes | None:
    if isinstance(m.get("custom_id"), str) and 0 < len(m["custom_id"]) < 600:
        m["custom_id"] = f"{m['custom_id']}~{index}"   # one row per message at most: accounting by key
    try:
        data = json.dumps(m, allow_nan=True, ensure_ascii=bool(index % 2)).encode("utf-8", "surrogatepass")
    except (ValueError, TypeError):
        data = repr(m).encode("utf-8", "surrogatepass")
    nested = b"[" * depth + b"]" * depth
    data = data.replace(json.dumps(DEEP).encode(), nested)
    if how == "truncate":
        return data[: cut % max(1, len(data))]
    if how == "garble":
        i = cut % max(1, len(data))
        return data[:i] + bytes([0xff, 0xfe, 0x00]) + data[i:]
    if how == "array":
        return b"[" + data + b"]"
    if how == "not-json":
        return None if cut % 3 == 0 else b"\x00" * (cut % 7)
    return data


def test_generated_messages_are_all_accounted_for(stack, engine):
    pid = batcher_pid(stack)
    run = uuid.uuid4().hex[:8]
    live, cancelled = f"job_fuzz_{run}", f"job_fuzz_cancelled_{run}"
    with engine.begin() as conn:   # most valid messages go to the DLQ (a cancelled job takes none): fewer provider calls
        conn.execute(sa.text("INSERT INTO jobs (job_id, status) VALUES (:j, 'cancelled')"), {"j": cancelled})
    jobs = [live, cancelled, cancelled, cancelled]
    dlq = DLQReader(stack)
    generated: list = []

    # messages come in lists of CHUNK per example: the engine's work per example, not per
    # message, is what makes generation slow
    @settings(max_examples=-(-N // CHUNK), database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(message(jobs), st.sampled_from([REQUESTS_TOPIC, REQUESTS_TOPIC, IMMEDIATE_TOPIC]),
                              st.sampled_from(["job", "job", "none", "random"])), min_size=CHUNK, max_size=CHUNK))
    def generate(chunk):
        for spec, topic, keying in chunk:
            if len(generated) >= N:
                return
            m, how, depth, cut = spec
            value = serialise(m, how, depth, cut, len(generated))
            job = m.get("job_id") if isinstance(m.get("job_id"), str) else None
            key = {"job": (job or "x").encode("utf-8", "surrogatepass"), "none": None,
                   "random": uuid.uuid4().bytes}[keying]
            generated.append((topic, key, value))

    t0 = time.monotonic()
    generate()
    t1 = time.monotonic()
    assert len(generated) >= N * 0.9, f"hypothesis generated only {len(generated)} messages"
    origins = publish(stack, generated)
    t2 = time.monotonic()
    job_ids = {live, cancelled}
    for _, _, value in generated:
        try:
            j = json.loads(value).get("job_id")
            if isinstance(j, str):
                job_ids.add(j)
        except Exception:
            pass
    figures = wait_accounted(engine, dlq, generated, origins, job_ids, timeout=max(300, N / 10))
    t3 = time.monotonic()
    assert_same_batcher(stack, pid)
    report = {"published": figures["published"], "request_rows": figures["rows"], "rejections": 0,
              "dlq": figures["dlq"], "missing": len(figures["missing"]),
              "row_and_dlq": len(figures["row_and_dlq"]), "dlq_twice": len(figures["dlq_twice"]),
              "batcher_restarts": 0 if batcher_pid(stack) == pid else 1,
              "seconds": {"generate": round(t1 - t0, 1), "publish": round(t2 - t1, 1),
                          "accounted": round(t3 - t2, 1)}}
    print("fuzz:", json.dumps(report))
    (stack.var_dir / "fuzz-report.json").write_text(json.dumps(report) + "\n")
    assert figures["rows"] + figures["dlq"] == figures["published"], report
    assert not figures["row_and_dlq"], report
    assert figures["rows"] > 0 and figures["dlq"] > 0, report   # the generator made both kinds
    dlq.close()
