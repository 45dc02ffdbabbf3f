"""Embedding vectors in Postgres as ``real[]`` (table ``embeddings``, sql/025_embeddings.sql).

Why apart from the JSON answer: in jsonb a vector is one numeric per dimension, ten bytes or
more and a parse each; as ``real[]`` it is 4 bytes a dimension that SQL reads as an array
(``vector[1:8]``, a cosine similarity, a cast to pgvector). Kept in both places, a 1,536-wide
answer would be written twice, and the JSON copy is the larger. So the result's answer keeps
every field but the vectors (``"embedding": null`` in each item of ``data``), and the vectors
are here once, one row per input item.

The write path (``write_outcomes`` in the same transaction as the result rows):

1. ``split`` takes the vectors out of the succeeded answers of ``/v1/embeddings`` (the
   outcomes themselves are not changed: the response cache still gets the whole answer);
2. the result rows are inserted, returning those inserted now (a replay inserts none);
3. ``write`` copies those rows' vectors with one binary ``COPY``: each vector is encoded
   here as a ``float4[]`` value with ``struct`` (no decimal text on either side), about
   0.1 ms for 1,536 dimensions.

Base64 answers (``encoding_format: "base64"``) are stored as the same floats. Export puts the
vectors back in the provider's shape (``attach``): floats, or base64 when the request asked
for it. float32 is what the provider computed and sends; a float answer's decimals come back
as the shortest text of the same float32 (``0.0123456791`` may read back ``0.012345679``).

This module must never write a vector without its result row in the same transaction.
"""

from __future__ import annotations

import array
import base64
import json
import struct
import sys

from sqlalchemy.engine import Connection

#: the float4 type's oid, in a binary array header
_FLOAT4_OID = 700


def _is_embedding_list(body) -> bool:
    data = body.get("data") if isinstance(body, dict) and body.get("object") == "list" else None
    return isinstance(data, list) and bool(data) and all(
        isinstance(d, dict) and d.get("object") == "embedding" and "embedding" in d for d in data)


def _floats(value) -> list[float] | None:
    """A vector as floats: a list of numbers, or OpenAI's base64 of little-endian float32."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError:
            return None
        if len(raw) % 4:
            return None
        a = array.array("f")
        a.frombytes(raw)
        if sys.byteorder != "little":
            a.byteswap()
        return a.tolist()
    if isinstance(value, list) and value and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                 for x in value):
        return value
    return None


def encode(vector: list[float]) -> bytes:
    """A ``float4[]`` value in Postgres' binary form: a one-dimensional array header, then each
    element as its length (4) and its big-endian float32."""
    n = len(vector)
    interleaved: list = [4] * (2 * n)
    interleaved[1::2] = vector
    return struct.pack(f">5i{'if' * n}", 1, 0, _FLOAT4_OID, n, 1, *interleaved)


def split(outcomes: list[dict]) -> tuple[list[dict], dict[tuple[str, str], list[tuple[int, bytes]]]]:
    """``(outcomes to write, vectors)``: the outcomes with every embedding answer's vectors taken
    out (copies; the given ones are untouched), and ``{(job_id, custom_id): [(index, encoded)]}``.
    An answer with a vector that is not a list of numbers or base64 floats is kept whole."""
    out, vectors = [], {}
    for o in outcomes:
        body = o.get("response")
        if o.get("status", "succeeded") != "succeeded" or not _is_embedding_list(body):
            out.append(o)
            continue
        items = [(d.get("index", i), _floats(d["embedding"])) for i, d in enumerate(body["data"])]
        if any(v is None or not isinstance(i, int) for i, v in items):
            out.append(o)
            continue
        vectors[(o["job_id"], o["custom_id"])] = [(i, encode(v)) for i, v in items]
        kept = dict(body, data=[dict(d, embedding=None) for d in body["data"]])
        out.append(dict(o, response=kept))
    return out, vectors


def write(conn: Connection, vectors: dict[tuple[str, str], list[tuple[int, bytes]]], keys) -> int:
    """COPY the vectors of ``keys`` (the requests whose result rows this transaction inserted)
    into ``embeddings``; returns the rows written."""
    rows = [(j, c, i, v) for j, c in keys for i, v in vectors.get((j, c), ())]
    if not rows:
        return 0
    raw = conn.connection.driver_connection   # psycopg's, inside the caller's transaction
    with raw.cursor() as cur, cur.copy(
            "COPY embeddings (job_id, custom_id, idx, vector) FROM STDIN (FORMAT BINARY)") as copy:
        # bytea passes the encoded float4[] through as it is: binary COPY reads it as the column's type
        copy.set_types(["text", "text", "int4", "bytea"])
        for row in rows:
            copy.write_row(row)
    return len(rows)


def read_vectors(text: str | None) -> list[list[float]] | None:
    """The ``array_agg(vector ORDER BY idx)::text`` of a request's rows as lists of floats."""
    if not text:
        return None
    # Postgres writes 1.0 as "1" and -0.0 as "-0": read every value as a float (the sign of zero kept)
    return json.loads(text.replace("{", "[").replace("}", "]"), parse_int=float)


def attach(body, vectors: list[list[float]] | None, encoding_format: str | None = None):
    """The answer as the provider sent it: each item's vector put back (base64 when the
    request asked for it). Without vectors (none stored) the body is returned unchanged."""
    if not vectors or not _is_embedding_list(body):
        return body
    data = []
    for i, d in enumerate(body["data"]):
        idx = d.get("index", i)
        vec = vectors[idx] if isinstance(idx, int) and idx < len(vectors) else d["embedding"]
        if encoding_format == "base64" and isinstance(vec, list):
            a = array.array("f", vec)
            if sys.byteorder != "little":
                a.byteswap()
            vec = base64.b64encode(a.tobytes()).decode()
        data.append(dict(d, embedding=vec))
    return dict(body, data=data)
