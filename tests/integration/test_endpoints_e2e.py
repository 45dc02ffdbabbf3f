"""Every Batch API endpoint end to end on the stack: submit, batcher, workers or the scheduler's
provider batches, the ledger, ``embeddings`` as real[], and export in OpenAI's output shape.

- ``test_embeddings_end_to_end``: N ``/v1/embeddings`` lines (``LLMBATCH_EMBEDDINGS_N``,
  default 2,000; the issue's figure is 20,000): every vector lands as real[] of the model's
  width, equal to the simulator's at float32 precision; the job's cost in the ledger equals
  what the simulator billed for its keys, priced by the simulator's own table; a SQL query
  reads one vector back and a cosine similarity ranks a near text above an unrelated one.
- ``test_five_endpoints_realtime_and_provider_batch``: one file that mixes chat, responses,
  embeddings, completions and moderations, run realtime and through the provider Batch API;
  each exported line is OpenAI's Batch output line, its body validated against the SDK's typed
  model with no field the model lacks, and both runs answer alike at half the price in batch.
"""

from __future__ import annotations

import array
import base64
import json
import math
import os
import struct
import time
import uuid
from decimal import Decimal

import pytest
import sqlalchemy as sa
from openai import BaseModel
from openai.types import Completion, CreateEmbeddingResponse, ModerationCreateResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from pipeline.config import get_settings
from pipeline.money.pricing import get_price_book
from simulator import embeddings as sim_embeddings
from simulator.prices import builtin_price
from tests.integration.conftest import llmbatch, wait_for, write_jsonl
from tests.integration.execution_helpers import sim_stats
from tests.integration.test_scheduler import _job_status, _submit, scheduler  # noqa: F401  (fixture)

EMBED_MODEL = "text-embedding-3-small"
#: the ledger's columns keep 8 decimals: each line's cost is within half a unit of the exact one
HALF_UNIT = Decimal("0.000000005")
WORDS = ("river stone lantern orchard copper meadow violin harbour thunder pepper glacier saffron "
         "compass marble falcon tulip ember quartz willow canyon").split()
TYPED = {"/v1/chat/completions": ChatCompletion, "/v1/responses": Response,
         "/v1/embeddings": CreateEmbeddingResponse, "/v1/completions": Completion,
         "/v1/moderations": ModerationCreateResponse}


def _text(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(6)) + f" number {i}"


def _embedding_line(i: int, text: str, **body) -> dict:
    return {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
            "body": {"model": EMBED_MODEL, "input": text, **body}}


def _billed_usd(job: str, model: str) -> Decimal:
    """What the simulator billed for the job's calls (its keys), priced by the simulator's own table."""
    import urllib.parse
    import urllib.request
    url = f"{get_settings().simulator_url}/_stats?" + urllib.parse.urlencode({"key_prefix": f"{job}:"})
    billed = json.load(urllib.request.urlopen(url, timeout=30))["keys"]["billed"]
    return Decimal(billed.get("prompt_tokens", 0)) * builtin_price("openai", model).input / 10**6


def _export(job: str, tmp_path) -> list[dict]:
    out = tmp_path / f"{job}.jsonl"
    llmbatch("results", job, "-o", out, check=True, timeout=600)
    return [json.loads(x) for x in out.read_text().splitlines()]


def _cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings_end_to_end(scheduler, tmp_path):  # noqa: F811
    engine = scheduler
    n = int(os.environ.get("LLMBATCH_EMBEDDINGS_N", "2000"))
    tag = uuid.uuid4().hex[:12]   # texts of this run only: an answer cached by an earlier run would cost $0
    lines = [_embedding_line(i, f"{_text(i)} {tag}") for i in range(n)]
    near, far = f"the copper lantern by the river {tag}", f"quarterly tax filing deadline {tag}"
    lines[1] = _embedding_line(1, f"a copper lantern near the river {tag}")
    lines[2] = _embedding_line(2, near)
    lines[3] = _embedding_line(3, far)
    path = write_jsonl(tmp_path / "embeddings.jsonl", lines)
    started = time.monotonic()
    job = _submit(path)
    wait_for(lambda: _job_status(engine, job) in ("completed", "completed_with_errors", "failed"),
             timeout=120 + n / 20, every=1, what=f"job {job} ended")
    wall = time.monotonic() - started
    with engine.connect() as conn:
        statuses = dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM requests WHERE job_id = :j GROUP BY status"), {"j": job}).all())
        ledger = conn.execute(sa.text(
            "SELECT coalesce(sum(cost_usd), 0), count(*) FILTER (WHERE usage_missing),"
            " count(*) FILTER (WHERE response->'data'->0->'embedding' = 'null'::jsonb)"
            " FROM results WHERE job_id = :j"), {"j": job}).one()
        vectors = conn.execute(sa.text(
            "SELECT count(*), min(array_length(vector, 1)), max(array_length(vector, 1))"
            " FROM embeddings WHERE job_id = :j"), {"j": job}).one()
        endpoints = conn.execute(sa.text(
            "SELECT DISTINCT endpoint FROM requests WHERE job_id = :j"), {"j": job}).scalars().all()
        # the query docs/USAGE.md shows: one vector back, its width and first values
        one = conn.execute(sa.text(
            "SELECT array_length(vector, 1) AS dims, vector[1:1536] AS v FROM embeddings"
            " WHERE job_id = :j AND custom_id = 'e2' AND idx = 0"), {"j": job}).one()
        cosine = dict(conn.execute(sa.text(
            "SELECT b.custom_id, (SELECT sum(x * y) FROM unnest(a.vector, b.vector) AS t(x, y))"
            "  / sqrt((SELECT sum(x * x) FROM unnest(a.vector) x) * (SELECT sum(y * y) FROM unnest(b.vector) y))"
            " FROM embeddings a JOIN embeddings b ON b.job_id = a.job_id AND b.custom_id IN ('e2', 'e3')"
            " WHERE a.job_id = :j AND a.custom_id = 'e1'"), {"j": job}).all())
    simulator_usd = _billed_usd(job, EMBED_MODEL)
    assert statuses == {"succeeded": n}
    assert endpoints == ["/v1/embeddings"]
    assert ledger[1] == 0 and ledger[2] == n            # no usage missing; JSON answers hold no vectors
    assert vectors == (n, 1536, 1536)
    expected = sim_embeddings.vector(near, 1536)
    assert one.dims == 1536 and max(abs(a - b) for a, b in zip(one.v, expected)) < 1e-6
    assert ledger[0] == simulator_usd > 0, f"ledger ${ledger[0]} vs simulator ${simulator_usd}"
    assert cosine["e2"] > 0.5 > cosine["e3"], cosine
    assert abs(cosine["e2"] - _cosine(sim_embeddings.vector(lines[1]["body"]["input"], 1536), expected)) < 1e-4
    exported = _export(job, tmp_path)
    assert len(exported) == n
    body = next(x for x in exported if x["custom_id"] == "e2")["response"]["body"]
    CreateEmbeddingResponse.model_validate(body)
    assert max(abs(a - b) for a, b in zip(body["data"][0]["embedding"], expected)) < 1e-6
    print(f"\nembeddings: {n} lines in {wall:.1f} s wall ({n / wall:.0f}/s); ledger ${ledger[0]}, simulator billed "
          f"${simulator_usd}; e2 read back: {one.dims} dims, first {list(one.v[:4])}; cosine e1~e2 "
          f"{cosine['e2']:.3f}, e1~e3 {cosine['e3']:.3f}")


# ------------------------------------------------------------------ five endpoints, both paths

def _mixed_lines(k: int) -> list[dict]:
    """``k`` lines of each endpoint; ``cache: false``, so the second run calls the provider too
    (embeddings and moderations are cacheable by default)."""
    tag = uuid.uuid4().hex[:8]
    out = []
    for i in range(k):
        text = f"{_text(i)} {tag}"
        out += [
            {"custom_id": f"chat{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "gpt-4o-mini", "max_tokens": 24, "messages": [{"role": "user", "content": text}]}},
            {"custom_id": f"resp{i}", "method": "POST", "url": "/v1/responses",
             "body": {"model": "gpt-4o-mini", "input": text, "instructions": "Be brief.", "max_output_tokens": 32}},
            {"custom_id": f"emb{i}", "method": "POST", "url": "/v1/embeddings",
             "body": {"model": EMBED_MODEL, "input": [text, f"{tag} {i}"] if i % 2 else text,
                      **({"dimensions": 256} if i % 3 == 0 else {}),
                      **({"encoding_format": "base64"} if i % 4 == 1 else {})}},
            {"custom_id": f"comp{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "gpt-3.5-turbo-instruct", "prompt": text, "max_tokens": 12}},
            {"custom_id": f"mod{i}", "method": "POST", "url": "/v1/moderations",
             "body": {"model": "omni-moderation-latest", "input": text}},
        ]
    return [dict(line, cache=False) for line in out]


#: fields of OpenAI's API reference its SDK's typed models lack (the response object's ``store``)
NOT_IN_THE_SDK = {"store"}


def _no_unknown_fields(model: BaseModel, where: str) -> None:
    """Every field of our body is a field of OpenAI's typed model, at every depth."""
    extra = set(model.model_extra or ()) - NOT_IN_THE_SDK
    assert not extra, f"{where}: fields OpenAI's model lacks: {sorted(extra)}"
    for name in type(model).model_fields:
        value = getattr(model, name)
        for item in value if isinstance(value, list) else value.values() if isinstance(value, dict) else [value]:
            if isinstance(item, BaseModel):
                _no_unknown_fields(item, f"{where}.{name}")


def _check_line(line: dict, url: str) -> None:
    assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None, line
    assert line["id"].startswith("batch_req_")
    assert set(line["response"]) == {"status_code", "request_id", "body"} and line["response"]["status_code"] == 200
    assert isinstance(line["response"]["request_id"], str)
    body = line["response"]["body"]
    if url == "/v1/embeddings" and isinstance(body["data"][0]["embedding"], str):   # base64, as asked
        body = dict(body, data=[dict(d, embedding=array.array("f", base64.b64decode(d["embedding"])).tolist())
                                for d in body["data"]])   # what the SDK does with it (little-endian float32)
    _no_unknown_fields(TYPED[url].model_validate(body), f"{line['custom_id']} ({url})")


def _run(engine, path, *args) -> tuple[str, Decimal]:
    before = Decimal(sim_stats(get_settings())["providers"]["openai"]["billed_usd"])
    job = _submit(path, *args)
    wait_for(lambda: _job_status(engine, job) in ("completed", "completed_with_errors", "failed"),
             timeout=300, every=1, what=f"job {job} ended")
    return job, Decimal(sim_stats(get_settings())["providers"]["openai"]["billed_usd"]) - before


@pytest.mark.parametrize("k", [int(os.environ.get("LLMBATCH_MIXED_K", "20"))])
def test_five_endpoints_realtime_and_provider_batch(scheduler, tmp_path, k):  # noqa: F811
    engine = scheduler
    lines = _mixed_lines(k)
    urls = {line["custom_id"]: line["url"] for line in lines}
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    realtime, rt_billed = _run(engine, path, "--tier", "peak")
    batch, pb_billed = _run(engine, path, "--tier", "peak", "--mode", "provider_batch")
    q = ("SELECT r.custom_id, r.cost_usd, r.usage_missing, r.input_tokens, r.output_tokens, q.status"
         " FROM requests q JOIN results r USING (job_id, custom_id) WHERE q.job_id = :j")
    with engine.connect() as conn:
        rt = {row.custom_id: row for row in conn.execute(sa.text(q), {"j": realtime})}
        pb = {row.custom_id: row for row in conn.execute(sa.text(q), {"j": batch})}
        per_batch = conn.execute(sa.text(
            "SELECT b.provider_batch, count(DISTINCT r.endpoint) FROM requests r JOIN batches b USING (batch_id)"
            " WHERE r.job_id = :j GROUP BY b.provider_batch"), {"j": batch}).all()
        stored = conn.execute(sa.text("SELECT count(*) FROM embeddings WHERE job_id = ANY(:j)"),
                              {"j": [realtime, batch]}).scalar()
        refused = dict(conn.execute(sa.text("SELECT custom_id, reason FROM rejections WHERE job_id = :j"),
                                    {"j": batch}).all())
    # the legacy completion models have no Batch API (the price book's "batch": "none", as the
    # simulator's Batch API says too): --mode provider_batch refuses their lines at submit, with the reason
    legacy_ids = {cid for cid, url in urls.items() if url == "/v1/completions"}
    assert set(refused) == legacy_ids and all("has no Batch API" in why for why in refused.values()), refused
    assert len(rt) == 5 * k and len(pb) == 4 * k
    assert {r.status for r in [*rt.values(), *pb.values()]} == {"succeeded"}
    assert not any(r.usage_missing for r in [*rt.values(), *pb.values()]), "moderations are free, not missing"
    # one url per provider batch (chat and responses share a model); the scheduler may have sent a url's
    # lines in more than one, as the batcher flushed them
    assert len(per_batch) >= 4 and all(n == 1 and pbid for pbid, n in per_batch), per_batch
    prices = get_price_book()
    models = {line["custom_id"]: line["body"]["model"] for line in lines}
    for cid, b in pb.items():
        a = rt[cid]
        assert (a.input_tokens, a.output_tokens) == (b.input_tokens, b.output_tokens), cid
        discount = prices.resolve(models[cid]).batch_discount   # the price book's batch price
        # the ledger keeps 8 decimals: half of an odd last digit is rounded
        assert abs(b.cost_usd - a.cost_usd * (1 - discount)) <= HALF_UNIT, f"{cid}: batch {b.cost_usd}, realtime {a.cost_usd}"
        assert (a.cost_usd == 0) == (urls[cid] == "/v1/moderations"), cid
    rt_ledger = sum(r.cost_usd for r in rt.values())
    pb_ledger = sum(r.cost_usd for r in pb.values())
    assert abs(rt_ledger - rt_billed) <= HALF_UNIT * len(rt) and rt_billed > 0, (rt_ledger, rt_billed)
    assert abs(pb_ledger - pb_billed) <= HALF_UNIT * len(pb) and pb_billed > 0, (pb_ledger, pb_billed)
    assert stored == 2 * sum(2 if i % 2 else 1 for i in range(k))   # one row per input item
    exports = {}
    for job in (realtime, batch):
        exported = _export(job, tmp_path)
        ran = lines if job == realtime else [x for x in lines if x["custom_id"] not in legacy_ids]
        assert [x["custom_id"] for x in exported] == [line["custom_id"] for line in ran]   # input order
        for line in exported:
            _check_line(line, urls[line["custom_id"]])
        exports[job] = {x["custom_id"]: x["response"]["body"] for x in exported}
    for cid, url in urls.items():
        if cid in legacy_ids:
            continue
        a, b = exports[realtime][cid], exports[batch][cid]
        assert set(a) == set(b), cid
        if url == "/v1/embeddings":   # the same vectors, in the format asked, back from real[]
            assert [d["embedding"] for d in a["data"]] == [d["embedding"] for d in b["data"]], cid
            asked = next(x for x in lines if x["custom_id"] == cid)["body"]
            width = asked.get("dimensions", 1536)
            for d in a["data"]:
                if asked.get("encoding_format") == "base64":
                    assert len(d["embedding"]) == 4 * math.ceil(width * 4 / 3), cid   # base64 of float32s
                else:
                    assert len(d["embedding"]) == width, cid
        elif url == "/v1/completions":
            assert a["choices"][0]["text"] == b["choices"][0]["text"], cid
        elif url == "/v1/moderations":
            assert a["results"] == b["results"], cid
    print(f"\nfive endpoints x {k}: realtime ledger ${rt_ledger} = simulator ${rt_billed}; provider batch ledger "
          f"${pb_ledger} = simulator ${pb_billed} ({len(legacy_ids)} legacy completion lines refused at submit: no"
          f" Batch API); {2 * len(lines) - len(legacy_ids)} exported lines validated against OpenAI's models")


def test_an_outcome_written_twice_stores_its_vectors_once_and_reads_back_exact(engine):
    """A redelivered batch writes its outcomes again: the result is not inserted twice, nor its
    vectors; a float32 vector reads back bit for bit, as real[] and through export."""
    from pipeline.stores import outcomes

    job = f"job_emb_{uuid.uuid4().hex[:10]}"
    vec = [0.1, -0.2, 0.30000001192092896, 1e-7, -0.0]
    body = {"object": "list", "model": EMBED_MODEL, "usage": {"prompt_tokens": 2, "total_tokens": 2},
            "data": [{"object": "embedding", "index": 0, "embedding": vec},
                     {"object": "embedding", "index": 1, "embedding": [v * 2 for v in vec]}]}
    outcome = {"job_id": job, "custom_id": "c", "model": EMBED_MODEL, "status": "succeeded", "status_code": 200,
               "response": body, "error": None, "input_tokens": 2, "cached_input_tokens": 0, "output_tokens": 0,
               "usage_missing": False, "cost_usd": "0.00000004", "attempts": 1, "provider_request_id": "r",
               "latency_ms": 1}
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO jobs (job_id, status) VALUES (:j, 'running')"), {"j": job})
        conn.execute(sa.text(
            "INSERT INTO requests (job_id, custom_id, line, provider, model, endpoint, tier, tier_reason, priority,"
            " input_tokens, max_cost_usd, status, body) VALUES (:j, 'c', 1, 'openai', :m, '/v1/embeddings', 'peak',"
            " 'test', 5, 2, 0.00000004, 'running', CAST(:b AS jsonb))"),
            {"j": job, "m": EMBED_MODEL, "b": json.dumps({"model": EMBED_MODEL, "input": ["a", "b"]})})
    try:
        for _ in range(2):
            with engine.begin() as conn:
                outcomes.write_outcomes(conn, [outcome], [])
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT idx, vector FROM embeddings WHERE job_id = :j ORDER BY idx"),
                                {"j": job}).all()
            stored = conn.execute(sa.text("SELECT response FROM results WHERE job_id = :j"), {"j": job}).scalar()
            exported = list(outcomes.iter_results(conn, job))
        def bits(values) -> bytes:   # float32, bit for bit
            return struct.pack(f"<{len(values)}f", *values)

        assert [(i, bits(v)) for i, v in rows] == [(0, bits(vec)), (1, bits([x * 2 for x in vec]))]
        assert [d["embedding"] for d in stored["data"]] == [None, None] and stored["usage"] == body["usage"]
        assert outcome["response"] is body and body["data"][0]["embedding"] is vec   # the writer's copy is whole
        assert [bits(d["embedding"]) for d in exported[0]["response"]["data"]] == [bits(vec),
                                                                                   bits([x * 2 for x in vec])]
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM jobs WHERE job_id = :j"), {"j": job})
