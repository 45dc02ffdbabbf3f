"""``POST /v1/files``' body, parsed as it arrives (python-multipart's streaming parser): the part
named ``file`` goes straight to its place on disk, under a temporary name, a chunk at a time; the
small fields (``purpose``) are kept, up to ``MAX_FIELD_BYTES``. Nothing of the file is held in
memory or spooled elsewhere, and a body over ``MAX_UPLOAD_BYTES`` is refused as it crosses it.

The caller (pipeline/api/app.py) feeds ``write`` from the request's stream and either ``keep``-s the
result (pipeline/api/files.py records and renames it) or ``discard``-s it (a client that
disconnected, a refused file): then nothing is left.
"""

from __future__ import annotations

import os
from pathlib import Path

from python_multipart.exceptions import ParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from pipeline.api.shapes import ApiError

#: OpenAI's limit on one batch input file
MAX_UPLOAD_BYTES = 200 * 1000 * 1000
#: a form field other than the file (``purpose``) is short
MAX_FIELD_BYTES = 1024


class FormStream:
    """One multipart body: ``file`` written to ``target``, the other fields in ``fields``."""

    def __init__(self, content_type: str, target: Path):
        kind, params = parse_options_header(content_type or "")
        boundary = params.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise ApiError(400, "The body must be multipart/form-data with a 'file' and a 'purpose'.", param="file")
        self.target = target
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.size = 0
        self._out = None
        self._headers: dict[bytes, bytes] = {}
        self._field, self._value = b"", b""
        self._name: str | None = None
        self._buf = bytearray()
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done, "on_part_data": self._data, "on_part_end": self._end})

    def write(self, chunk: bytes) -> None:
        """Feed the next piece of the body (blocking: the file's chunks go to disk here)."""
        try:
            self._parser.write(chunk)
        except ParseError as e:
            raise ApiError(400, f"The multipart body cannot be read: {e}.", param="file") from None

    def finish(self) -> None:
        try:
            self._parser.finalize()
        except ParseError as e:
            raise ApiError(400, f"The multipart body ends too soon: {e}.", param="file") from None
        if self._out is not None:   # the body ended inside the file: never kept as if it were whole
            raise ApiError(400, "The multipart body ends inside the file, before its closing boundary.",
                           param="file")

    def discard(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        self.target.unlink(missing_ok=True)

    # ---- the parser's callbacks

    def _begin(self) -> None:
        self._headers, self._name, self._buf = {}, None, bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_done(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        if self._name == "file":
            if self._out is not None or self.filename is not None:
                raise ApiError(400, "Give one 'file' per upload.", param="file")
            self.filename = params.get(b"filename", b"upload.jsonl").decode("utf-8", "replace")[:255]
            self._out = open(self.target, "wb")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._name == "file":
            self.size += end - start
            if self.size > MAX_UPLOAD_BYTES:
                raise ApiError(400, f"The file is over {MAX_UPLOAD_BYTES:,} bytes, the most a batch input file"
                                    " may have.", param="file")
            self._out.write(data[start:end])
        else:
            self._buf += data[start:end]
            if len(self._buf) > MAX_FIELD_BYTES:
                raise ApiError(400, f"Form field {self._name!r} is over {MAX_FIELD_BYTES} bytes.", param=self._name)

    def _end(self) -> None:
        if self._name == "file":
            self._close()
        elif self._name:
            self.fields[self._name] = self._buf.decode("utf-8", "replace")

    def _close(self) -> None:
        self._out.flush()
        os.fsync(self._out.fileno())   # on disk before its row says it exists
        self._out.close()
        self._out = None
