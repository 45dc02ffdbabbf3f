"""Anthropic's Message Batches API on ``llmbatch api``: the routes and what they do.

``POST /v1/messages/batches`` (``{"requests": [{"custom_id", "params"}]}``),
``GET /v1/messages/batches`` (``before_id``, ``after_id``, ``limit`` 1–1000, newest first),
``GET /v1/messages/batches/{id}``, ``GET /v1/messages/batches/{id}/results`` (JSONL),
``POST /v1/messages/batches/{id}/cancel``, ``DELETE /v1/messages/batches/{id}``.

A message batch is an OpenAI batch underneath (pipeline/api/batches.py): an ``api_batches`` row
with endpoint ``/v1/messages`` and an id ``msgbatch_…``, one llmbatch job submitted by the same
``Submitter``, moved on by the same status machine, under the same project caps. Only the shapes
differ (pipeline/api/anthropic_shapes.py). Its requests are written to disk as a JSONL input file
as the body arrives (the body itself is spooled to disk first and read back with ijson: a 256 MB
body never sits in memory), and its results file is recorded once, the first time the batch is
read after it ended, from the job's results and rejections (written with no lock held, so two
first readers may both write one: the second drops its own).

Auth is Anthropic's: ``x-api-key`` (or ``Authorization: Bearer``), the same keys and projects as
the OpenAI routes (pipeline/api/keys.py), and an ``anthropic-version`` header. Every error of these
routes is in Anthropic's shape; another project's id, an OpenAI batch's and a deleted one answer 404.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from collections import Counter
from pathlib import Path

import ijson
import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from pipeline import jsontext
from pipeline.api import anthropic_shapes as shapes
from pipeline.api import batches, files, keys
from pipeline.api.shapes import ENDED, WINDOW, ApiError, check_metadata, job_options, utcnow
from pipeline.config import Settings
from pipeline.constants import ANTHROPIC_MESSAGES_URL
from pipeline.intake.producer import new_job_id
from pipeline.stores import db, outcomes

log = logging.getLogger(__name__)

#: the input file written from a create call's requests, and the results file: neither is shown
#: by the OpenAI files routes (pipeline/api/files.py ``HIDDEN_PURPOSES``)
INPUT_PURPOSE, RESULTS_PURPOSE = files.HIDDEN_PURPOSES
_COLUMNS = ("batch_id, project_id, job_id, input_file_id, status, request_total, result_counts, output_file_id,"
            " failure, created_at, expires_at, cancelling_at, completed_at, failed_at, expired_at, cancelled_at")


class AnthropicRoute(APIRoute):
    """Answers every error of these routes in Anthropic's shape, whoever raised it (the OpenAI
    side's code they reuse raises the same ``ApiError``)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except ApiError as e:
                return JSONResponse(shapes.error_body(e), status_code=e.status)
            except RequestValidationError as e:
                first = (e.errors() or [{}])[0]
                where = ".".join(str(x) for x in first.get("loc", ())[1:])
                return JSONResponse(shapes.error_body(ApiError(400, f"{where}: {first.get('msg', 'bad input')}")),
                                    status_code=400)
            except sa.exc.OperationalError as e:
                log.warning("Postgres unreachable: %s", str(e).splitlines()[0][:200])
                return JSONResponse(shapes.error_body(ApiError(503, "The service cannot reach its database;"
                                                                    " try again shortly.")), status_code=503)
            except Exception:
                log.exception("%s %s failed", request.method, request.url.path)
                return JSONResponse(shapes.error_body(ApiError(500, "The service failed on this request.")),
                                    status_code=500)
        return route


def router(settings: Settings, engine) -> APIRouter:
    """The routes, for ``app.include_router``; the batches' submits run on the app's ``Submitter``."""
    r = APIRouter(route_class=AnthropicRoute)

    def project(request: Request) -> str:
        """The caller's project, from its key (Anthropic's header, or a Bearer token); 401 without."""
        auth = request.headers.get("authorization", "")
        key = request.headers.get("x-api-key") or (auth[7:].strip() if auth[:7].lower() == "bearer " else "")
        with engine.connect() as conn:
            found = keys.project_of(conn, key)
        if found is None:
            raise shapes.unauthorized(bool(key))
        if not request.headers.get("anthropic-version"):
            raise ApiError(400, "anthropic-version: header is required")
        return found

    def url_of(request: Request, batch_id: str) -> str:
        return f"{str(request.base_url).rstrip('/')}/v1/messages/batches/{batch_id}/results"

    @r.post("/v1/messages/batches")
    async def create_batch(request: Request, project_id: str = Depends(project)):
        file_id, tmp = files.upload_target(settings, project_id)
        body = tmp.with_name(f".{file_id}.body")
        try:
            size = 0
            with open(body, "wb") as out:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > shapes.MAX_BODY_BYTES:
                        raise ApiError(413, f"The batch is larger than {shapes.MAX_BODY_BYTES >> 20} MB.")
                    await asyncio.to_thread(out.write, chunk)
            row = await asyncio.to_thread(create, engine, settings, request.app.state.submitter, project_id,
                                          file_id, body, tmp)
        except ClientDisconnect:   # cut off: nothing kept
            log.info("a message batch of project %s was cut off by its client: nothing kept", project_id)
            return JSONResponse(shapes.error_body(ApiError(400, "The request was cut off.")), status_code=400)
        finally:
            body.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
        return shapes.batch_object(row, url_of(request, row["batch_id"]))

    @r.get("/v1/messages/batches")
    def list_batches_route(request: Request, before_id: str | None = None, after_id: str | None = None,
                           limit: str = str(shapes.LIST_DEFAULT), project_id: str = Depends(project)):
        rows, has_more = list_batches(engine, settings, request.app.state.submitter, project_id,
                                      before_id, after_id, shapes.check_limit(limit))
        data = [shapes.batch_object(x, url_of(request, x["batch_id"])) for x in rows]
        return {"data": data, "has_more": has_more, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    @r.get("/v1/messages/batches/{batch_id}")
    def get_batch(batch_id: str, request: Request, project_id: str = Depends(project)):
        row = retrieve(engine, settings, request.app.state.submitter, project_id, batch_id)
        return shapes.batch_object(row, url_of(request, batch_id))

    @r.get("/v1/messages/batches/{batch_id}/results")
    def batch_results(batch_id: str, request: Request, project_id: str = Depends(project)):
        return FileResponse(results_path(engine, settings, request.app.state.submitter, project_id, batch_id),
                            media_type="application/x-jsonl")

    @r.post("/v1/messages/batches/{batch_id}/cancel")
    def cancel_batch(batch_id: str, request: Request, project_id: str = Depends(project)):
        if retrieve(engine, settings, request.app.state.submitter, project_id, batch_id)["status"] in ENDED:
            raise ApiError(400, f"Batch {batch_id} has already ended; only a batch in progress can be canceled.")
        batches.stop(engine, settings, project_id, batch_id)
        row = retrieve(engine, settings, request.app.state.submitter, project_id, batch_id)
        return shapes.batch_object(row, url_of(request, batch_id))

    @r.delete("/v1/messages/batches/{batch_id}")
    def delete_batch(batch_id: str, request: Request, project_id: str = Depends(project)):
        retrieve(engine, settings, request.app.state.submitter, project_id, batch_id)
        delete(engine, project_id, batch_id)
        return shapes.deleted_object(batch_id)

    return r


def read_requests(body: Path, out: Path) -> tuple[int, dict]:
    """The body's requests, checked one by one as ijson reads them, written to ``out`` as input
    lines; (how many, the llmbatch options read from the body's ``metadata``, given by clients as
    an extra body field: the same ``llmbatch_*`` keys as an OpenAI batch's, docs/API.md)."""
    seen: set[str] = set()
    n = 0
    try:
        with open(body, "rb") as f, open(out, "w") as w:
            for item in ijson.items(f, "requests.item", use_float=True):
                if n >= shapes.MAX_REQUESTS:
                    raise ApiError(413, f"requests: at most {shapes.MAX_REQUESTS} requests in one batch.")
                w.write(jsontext.dumps(shapes.check_request(n, item, seen)) + "\n")
                n += 1
        with open(body, "rb") as f:
            metadata = next(ijson.items(f, "metadata"), None)
    except ijson.JSONError as e:
        raise ApiError(400, f"The body is not valid JSON: {e}.") from None
    if not n:
        raise ApiError(400, "requests: Field required (a list of at least one {custom_id, params}).")
    if metadata is not None:
        check_metadata(metadata)
    return n, metadata


def create(engine, settings: Settings, submitter, project_id: str, file_id: str, body: Path, tmp: Path) -> dict:
    """Check the spooled body, write its input file, record the batch and start its submit; blocking."""
    n, metadata = read_requests(body, tmp)
    options = job_options(metadata or {})
    final = tmp.with_name(file_id)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO api_files (file_id, project_id, purpose, filename, bytes, path)"
            " VALUES (:i, :p, :u, 'requests.jsonl', :b, :path)"),
            {"i": file_id, "p": project_id, "u": INPUT_PURPOSE, "b": tmp.stat().st_size, "path": str(final)})
        row = conn.execute(sa.text(
            f"INSERT INTO api_batches (batch_id, project_id, job_id, input_file_id, endpoint, completion_window,"
            f" metadata, request_total, created_at, expires_at)"
            f" VALUES (:b, :p, :j, :f, :e, '24h', CAST(:m AS jsonb), :n, :c, :x) RETURNING {_COLUMNS}, endpoint"),
            {"b": shapes.PREFIX + secrets.token_hex(12), "p": project_id, "j": new_job_id(), "f": file_id,
             "e": ANTHROPIC_MESSAGES_URL, "m": db.dumps(metadata) if metadata is not None else None, "n": n,
             "c": now, "x": now + WINDOW}).mappings().one()
        os.replace(tmp, final)
    submitter.start(dict(row), str(final), options)
    return dict(row)


def _get(conn, project_id: str, batch_id: str, lock: bool = False) -> dict:
    row = conn.execute(sa.text(
        f"SELECT {_COLUMNS} FROM api_batches WHERE batch_id = :b AND project_id = :p AND endpoint = :e"
        " AND deleted_at IS NULL" + (" FOR UPDATE" if lock else "")),
        {"b": batch_id, "p": project_id, "e": ANTHROPIC_MESSAGES_URL}).mappings().first()
    if row is None:
        raise shapes.not_found(batch_id)
    return dict(row)


def retrieve(engine, settings: Settings, submitter, project_id: str, batch_id: str) -> dict:
    """The batch's row, moved on as far as its job allows; once ended, with its results written."""
    with engine.connect() as conn:
        _get(conn, project_id, batch_id)
    batches.advance(engine, settings, submitter, project_id, batch_id)
    with engine.connect() as conn:
        row = _get(conn, project_id, batch_id)
    if row["status"] not in ENDED or row["result_counts"] is not None:
        return row
    results, counts = write_results(engine, settings, row)   # with no lock held: it may be large
    try:
        with engine.begin() as conn:
            row = _get(conn, project_id, batch_id, lock=True)
            if row["result_counts"] is None:   # another call may have recorded its own meanwhile
                file_id = results.record(conn)
                conn.execute(sa.text("UPDATE api_batches SET output_file_id = :f, result_counts = CAST(:c AS jsonb)"
                                     " WHERE batch_id = :b"), {"f": file_id, "c": db.dumps(counts), "b": batch_id})
                row.update(output_file_id=file_id, result_counts=counts)
    finally:
        results.discard()   # gone already once recorded
    return row


def write_results(engine, settings: Settings, batch: dict) -> tuple[files.Staged, dict]:
    """Write the ended batch's results file, outside any transaction; (the file, counts by type),
    for the caller to record (``Staged.record``).

    Every request of the create call has one line: its result; ``errored`` for one the pipeline
    refused (its rejection's reason) and for one the submit never published (a batch failed as a
    whole: its reason); ``canceled``/``expired`` for what a cancelled/expired batch never ran."""
    results = files.staged(settings, batch["project_id"], RESULTS_PURPOSE, f"{batch['batch_id']}_results.jsonl",
                           batch["created_at"] + shapes.RESULTS_KEPT)
    counts: Counter = Counter()
    seen: set[str] = set()
    try:
        with engine.connect() as reader, open(results.tmp, "w") as out:
            def put(line: dict) -> None:
                out.write(jsontext.dumps(line) + "\n")
                counts[line["result"]["type"]] += 1
                seen.add(line["custom_id"])
            for row in outcomes.iter_results(reader, batch["job_id"]):
                put(shapes.result_line(batch["job_id"], row, batch["status"]))
            for cid, reason in reader.execute(sa.text(
                    "SELECT custom_id, reason FROM rejections WHERE job_id = :j AND custom_id IS NOT NULL"
                    " ORDER BY line"), {"j": batch["job_id"]}):
                if cid not in seen:
                    put(shapes.rejected_line(cid, reason))
            if len(seen) < (batch["request_total"] or 0):   # lines the submit never published
                path = reader.execute(sa.text("SELECT path FROM api_files WHERE file_id = :f"),
                                      {"f": batch["input_file_id"]}).scalar()
                why = batch["failure"] or "the request was not run"
                with open(path) as f:
                    for raw in f:
                        cid = json.loads(raw)["custom_id"]
                        if cid not in seen:
                            put(shapes.unpublished_line(cid, batch["status"], why))
    except BaseException:
        results.discard()
        raise
    return results, {k: counts.get(k, 0) for k in shapes.RESULT_TYPES}


def results_path(engine, settings: Settings, submitter, project_id: str, batch_id: str) -> str:
    row = retrieve(engine, settings, submitter, project_id, batch_id)
    if row["status"] not in ENDED:
        raise ApiError(400, f"Batch {batch_id} has not ended yet; its results are available once"
                            f" processing_status is 'ended'.")
    with engine.connect() as conn:
        path = conn.execute(sa.text(
            "SELECT path FROM api_files WHERE file_id = :f AND deleted_at IS NULL"
            " AND (expires_at IS NULL OR expires_at > now())"), {"f": row["output_file_id"]}).scalar()
    if path is None:
        raise ApiError(404, f"The results of batch {batch_id} have expired (kept 29 days after its creation).")
    return path


def delete(engine, project_id: str, batch_id: str) -> None:
    """Delete an ended batch, its input and its results; one still processing is refused (400)."""
    with engine.begin() as conn:
        row = _get(conn, project_id, batch_id, lock=True)
        if row["status"] not in ENDED:
            raise ApiError(400, f"Batch {batch_id} is still processing; cancel it and wait until it has ended"
                                f" before deleting it.")
        conn.execute(sa.text("UPDATE api_batches SET deleted_at = now() WHERE batch_id = :b"), {"b": batch_id})
        paths = conn.execute(sa.text(
            "UPDATE api_files SET deleted_at = now() WHERE file_id IN (:i, :o) AND deleted_at IS NULL"
            " RETURNING path"), {"i": row["input_file_id"], "o": row["output_file_id"] or ""}).scalars().all()
    for p in paths:
        Path(p).unlink(missing_ok=True)


def list_batches(engine, settings: Settings, submitter, project_id: str, before_id: str | None,
                 after_id: str | None, limit: int) -> tuple[list[dict], bool]:
    """The project's message batches, newest first: ``limit`` of them older than ``after_id``, or
    newer than ``before_id``; (rows, whether more lie that way)."""
    if before_id and after_id:
        raise ApiError(400, "before_id and after_id cannot both be given.")
    where, params, order = "project_id = :p AND endpoint = :e AND deleted_at IS NULL", {}, "DESC"
    with engine.connect() as conn:
        for anchor_id, cmp in ((after_id, "<"), (before_id, ">")):
            if anchor_id:
                anchor = _get(conn, project_id, anchor_id)
                where += f" AND (created_at, batch_id) {cmp} (:c, :a)"
                params.update(c=anchor["created_at"], a=anchor_id)
                order = "ASC" if cmp == ">" else "DESC"
        ids = conn.execute(sa.text(
            f"SELECT batch_id FROM api_batches WHERE {where} ORDER BY created_at {order}, batch_id {order} LIMIT :n"),
            {"p": project_id, "e": ANTHROPIC_MESSAGES_URL, "n": limit + 1, **params}).scalars().all()
    has_more = len(ids) > limit
    ids = ids[:limit][::-1] if order == "ASC" else ids[:limit]
    return [retrieve(engine, settings, submitter, project_id, b) for b in ids], has_more
