"""Files on disk, their rows in Postgres (``api_files``), and a batch's output and error files.

An upload is written to disk as it arrives (pipeline/api/upload.py): a 200 MB file never sits in
memory. It is written under a temporary name and renamed only once it is whole, checked and its
row committed, so a client that disconnects mid-upload, or a file refused, leaves neither a file
nor a row. Each
project's files are in a directory of their own (``files_dir``/PROJECT); a file of another
project, a deleted one or one past its ``expires_at`` is not found.

Output and error files are written from the job's results in OpenAI's output shape
(pipeline/stores/export.py ``openai_line``), split by ``shapes.is_output_line``.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from pipeline import jsontext
from pipeline.api.shapes import ApiError, error_for_unrun, file_object, is_output_line, not_found
from pipeline.config import Settings
from pipeline.constants import ANTHROPIC_MESSAGES_URL
from pipeline.errors import FileInputError
from pipeline.intake.producer import check_file
from pipeline.stores import outcomes
from pipeline.stores.export import openai_line

log = logging.getLogger(__name__)

PURPOSES = ("batch",)
#: a message batch's input and results files (pipeline/api/anthropic_batches.py): not files of the
#: OpenAI Files API, which neither lists nor serves them
HIDDEN_PURPOSES = ("message_batch", "message_batch_results")
_COLUMNS = "file_id, project_id, purpose, filename, bytes, path, created_at, expires_at"


def files_dir(settings: Settings) -> Path:
    return Path(settings.api_files_dir) if settings.api_files_dir else Path(settings.var_dir) / "api-files"


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def _place(settings: Settings, project_id: str, file_id: str) -> Path:
    d = files_dir(settings) / project_id
    d.mkdir(parents=True, exist_ok=True)
    return d / file_id


def upload_target(settings: Settings, project_id: str) -> tuple[str, Path]:
    """A new file id and the temporary path its upload is written to (pipeline/api/upload.py)."""
    file_id = new_file_id()
    final = _place(settings, project_id, file_id)
    return file_id, final.with_name(f".{file_id}.part")


def record_upload(engine, settings: Settings, project_id: str, file_id: str, tmp: Path, filename: str,
                  purpose: str | None, size: int) -> dict:
    """Check an upload written whole to ``tmp``, record it and give it its name; blocking (a thread).

    ``ApiError`` 400 for a purpose other than ``batch`` or a file that cannot be JSONL
    (``check_file``: its reason, naming the file); the caller then discards ``tmp``."""
    if purpose not in PURPOSES:
        raise ApiError(400, f"Invalid 'purpose': {purpose!r}; this service takes 'batch' files.", param="purpose")
    try:
        check_file(tmp, settings.max_line_bytes)
    except FileInputError as e:
        raise ApiError(400, str(e).replace(str(tmp), filename), param="file") from None
    final = tmp.with_name(file_id)
    with engine.begin() as conn:
        row = conn.execute(sa.text(
            f"INSERT INTO api_files (file_id, project_id, purpose, filename, bytes, path)"
            f" VALUES (:i, :p, :u, :f, :b, :path) RETURNING {_COLUMNS}"),
            {"i": file_id, "p": project_id, "u": purpose, "f": filename, "b": size,
             "path": str(final)}).mappings().one()
        os.replace(tmp, final)
    return dict(row)


def get_file(conn, project_id: str, file_id: str) -> dict:
    """The caller's live file; ``ApiError`` 404 for anything else (another project's included)."""
    row = conn.execute(sa.text(
        f"SELECT {_COLUMNS} FROM api_files WHERE file_id = :i AND project_id = :p AND deleted_at IS NULL"
        " AND (expires_at IS NULL OR expires_at > now()) AND purpose <> ALL(:h)"),
        {"i": file_id, "p": project_id, "h": list(HIDDEN_PURPOSES)}).mappings().first()
    if row is None:
        raise not_found("file", file_id)
    return dict(row)


def list_files(conn, project_id: str, *, purpose: str | None, after: str | None, limit: int,
               newest_first: bool = True) -> dict:
    """The project's live files, ``limit`` of them after the file ``after``, in OpenAI's list shape."""
    params = {"p": project_id, "u": purpose, "n": limit + 1, "h": list(HIDDEN_PURPOSES)}
    where = ("project_id = :p AND deleted_at IS NULL AND (expires_at IS NULL OR expires_at > now())"
             " AND purpose <> ALL(:h)"
             " AND (CAST(:u AS text) IS NULL OR purpose = :u)")
    cmp, order = ("<", "DESC") if newest_first else (">", "ASC")
    if after:
        anchor = get_file(conn, project_id, after)
        where += f" AND (created_at, file_id) {cmp} (:c, :a)"
        params.update(c=anchor["created_at"], a=after)
    rows = [dict(r) for r in conn.execute(sa.text(
        f"SELECT {_COLUMNS} FROM api_files WHERE {where} ORDER BY created_at {order}, file_id {order} LIMIT :n"),
        params).mappings()]
    data = [file_object(r) for r in rows[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}


def delete_file(engine, project_id: str, file_id: str) -> dict:
    with engine.begin() as conn:
        row = get_file(conn, project_id, file_id)
        conn.execute(sa.text("UPDATE api_files SET deleted_at = now() WHERE file_id = :i"), {"i": file_id})
    Path(row["path"]).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}


def purge_expired(engine) -> int:
    """Remove the files past their ``expires_at`` (an output's ``output_expires_after``)."""
    with engine.begin() as conn:
        rows = conn.execute(sa.text(
            "UPDATE api_files SET deleted_at = now() WHERE deleted_at IS NULL AND expires_at <= now()"
            " RETURNING path")).scalars().all()
    for p in rows:
        Path(p).unlink(missing_ok=True)
    return len(rows)


@dataclass
class Staged:
    """A file written whole under a temporary name, outside any transaction. ``record`` names it in
    the caller's transaction (its ``api_files`` row, then the rename: an orphan file if that
    transaction then fails, never a row without its file); ``discard`` drops one not recorded.

    Files are written before the row lock that records them is taken, so no transaction waits on
    the disk: two callers may both write one, and the one that finds the move already made
    discards its own."""
    file_id: str
    tmp: Path
    project_id: str
    purpose: str
    filename: str
    expires_at: datetime | None = None

    def record(self, conn) -> str:
        final = self.tmp.with_name(self.file_id)
        conn.execute(sa.text(
            "INSERT INTO api_files (file_id, project_id, purpose, filename, bytes, path, expires_at)"
            " VALUES (:i, :p, :u, :f, :b, :path, :e)"),
            {"i": self.file_id, "p": self.project_id, "u": self.purpose, "f": self.filename,
             "b": self.tmp.stat().st_size, "path": str(final), "e": self.expires_at})
        os.replace(self.tmp, final)
        return self.file_id

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def staged(settings: Settings, project_id: str, purpose: str, filename: str,
           expires_at: datetime | None = None) -> Staged:
    file_id, tmp = upload_target(settings, project_id)
    return Staged(file_id, tmp, project_id, purpose, filename, expires_at)


def write_outputs(engine, settings: Settings, batch: dict, ended: str) -> dict[str, Staged]:
    """Write the batch's output and error files from its job's results, outside any transaction:
    ``{"output": …, "error": …}``, without a file that would be empty; the caller records them
    (``Staged.record``) in the transaction that names them on the batch, so a batch names only
    files that exist. A request the batch never ran gets OpenAI's error line for the batch's end
    (``batch_cancelled``, ``batch_expired``). A message batch has no OpenAI files: its results file
    is Anthropic's, written when it is first read after it ended (pipeline/api/anthropic_batches.py)."""
    if batch["endpoint"] == ANTHROPIC_MESSAGES_URL:
        return {}
    expires = (batch["created_at"] + timedelta(seconds=batch["output_expires_s"])
               if batch.get("output_expires_s") else None)
    out = {k: staged(settings, batch["project_id"], "batch_output", f"{batch['batch_id']}_{k}.jsonl", expires)
           for k in ("output", "error")}
    counts = {"output": 0, "error": 0}
    try:
        # iter_results streams (a server-side cursor on a connection of its own)
        with engine.connect() as reader, open(out["output"].tmp, "w") as o, open(out["error"].tmp, "w") as e:
            for row in outcomes.iter_results(reader, batch["job_id"]):
                if row.get("response") is None and row.get("error") is None and row["status"] != "failed":
                    row = {**row, "error": error_for_unrun(ended)}
                line = openai_line(batch["job_id"], row)
                kind = "output" if is_output_line(line) else "error"
                (o if kind == "output" else e).write(jsontext.dumps(line) + "\n")
                counts[kind] += 1
    except BaseException:
        for f in out.values():
            f.discard()
        raise
    for kind in [k for k, n in counts.items() if not n]:
        out.pop(kind).discard()
    return out
