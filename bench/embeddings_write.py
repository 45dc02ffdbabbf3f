"""How fast embedding answers are written, three ways, on the stack's Postgres.

N outcomes of ``/v1/embeddings`` (dense random vectors of ``--dims``, as a real model gives; the
simulator's are sparse) are written through ``outcomes.write_outcomes`` in group commits of
``--chunk``, as a worker's writer does:

- ``json``: the vectors kept in the JSON answer only (what was written before ``embeddings``);
- ``copy``: the vectors out of the JSON into ``embeddings`` as real[], by binary COPY (the pipeline's);
- ``recordset``: the same table, filled by ``jsonb_to_recordset`` casting a JSON array to real[].

Prints one JSON line: seconds, rows/s and stored bytes per variant.
``python -m bench.embeddings_write --n 5000``
"""

from __future__ import annotations

import argparse
import json
import random
import time
import uuid

import sqlalchemy as sa

from pipeline.stores import db, embeddings, outcomes


def _outcomes(job: str, n: int, dims: int, rnd: random.Random) -> list[dict]:
    out = []
    for i in range(n):
        vec = [round(rnd.gauss(0, 0.03), 9) for _ in range(dims)]
        body = {"object": "list", "model": "text-embedding-3-small",
                "data": [{"object": "embedding", "index": 0, "embedding": vec}],
                "usage": {"prompt_tokens": 8, "total_tokens": 8}}
        out.append({"job_id": job, "custom_id": f"c{i}", "model": "text-embedding-3-small", "status": "succeeded",
                    "status_code": 200, "response": body, "error": None, "input_tokens": 8, "cached_input_tokens": 0,
                    "output_tokens": 0, "usage_missing": False, "cost_usd": "0.00000016", "attempts": 1,
                    "provider_request_id": "req", "latency_ms": 1})
    return out


def _recordset_write(conn, vectors, keys) -> int:
    rows = [{"job_id": j, "custom_id": c, "idx": i, "vector": embeddings_floats[(j, c, i)]}
            for j, c in keys for i, _ in vectors.get((j, c), ())]
    conn.execute(sa.text(
        "INSERT INTO embeddings (job_id, custom_id, idx, vector) SELECT x.job_id, x.custom_id, x.idx, x.vector"
        " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(job_id text, custom_id text, idx int, vector real[])"),
        {"rows": db.dumps(rows)})
    return len(rows)


embeddings_floats: dict = {}


def run(variant: str, n: int, dims: int, chunk: int, engine) -> dict:
    job = f"bench_emb_{variant}_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO jobs (job_id, status) VALUES (:j, 'running')"), {"j": job})
        conn.execute(sa.text(
            "INSERT INTO requests (job_id, custom_id, provider, model, endpoint, tier, tier_reason, priority,"
            " input_tokens, max_cost_usd, status)"
            " SELECT :j, 'c' || g, 'openai', 'text-embedding-3-small', '/v1/embeddings', 'peak', 'bench', 5, 8,"
            " 0.00000016, 'running' FROM generate_series(0, :n - 1) g"), {"j": job, "n": n})
    items = _outcomes(job, n, dims, random.Random(7))
    for o in items:
        embeddings_floats[(job, o["custom_id"], 0)] = o["response"]["data"][0]["embedding"]
    split, write = embeddings.split, embeddings.write
    if variant == "json":
        embeddings.split = lambda rows: (rows, {})
    elif variant == "recordset":
        embeddings.write = _recordset_write
    try:
        started = time.perf_counter()
        for i in range(0, n, chunk):
            with engine.begin() as conn:
                outcomes.write_outcomes(conn, items[i:i + chunk], [])
        seconds = time.perf_counter() - started
    finally:
        embeddings.split, embeddings.write = split, write
    with engine.connect() as conn:
        json_bytes = conn.execute(sa.text("SELECT sum(pg_column_size(response)) FROM results WHERE job_id = :j"),
                                  {"j": job}).scalar()
        vec_bytes = conn.execute(sa.text("SELECT coalesce(sum(pg_column_size(vector)), 0) FROM embeddings"
                                         " WHERE job_id = :j"), {"j": job}).scalar()
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM jobs WHERE job_id = :j"), {"j": job})
    return {"variant": variant, "seconds": round(seconds, 2), "rows_per_s": round(n / seconds),
            "json_mb": round(json_bytes / 1e6, 1), "vector_mb": round(vec_bytes / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--dims", type=int, default=1536)
    ap.add_argument("--chunk", type=int, default=200)
    args = ap.parse_args()
    engine = db.get_engine()
    out = [run(v, args.n, args.dims, args.chunk, engine) for v in ("json", "copy", "recordset")]
    print(json.dumps({"n": args.n, "dims": args.dims, "chunk": args.chunk, "runs": out}))


if __name__ == "__main__":
    main()
