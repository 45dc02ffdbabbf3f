"""Submitted input as lines of bounded size: a file, a gzip file, or standard input.

``open_input`` opens what ``llmbatch submit`` was given: ``-`` is standard
input; a file (or stdin) that starts with gzip's magic bytes is decompressed
as it is read, so ``reviews.jsonl.gz`` works as it is. ``read_lines`` yields
one line at a time and never holds more than ``max_bytes`` (+1) of one line:
a longer line is skipped to its end in fixed-size pieces and yielded as an
``Oversized`` marker with its size, so the caller refuses it with its line
number before anything parses it. A 300 MB line used to be read, decoded,
parsed and tokenised whole: 7.5 GB of memory for one refusal.

``DigestSet`` remembers the custom_ids already read (to refuse a duplicate)
in 16 to 32 bytes each (a Python set of them took about 100).

This module never parses JSON and never touches a service.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import sys
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from pipeline.errors import FileInputError

#: ``llmbatch submit -``: the requests come on standard input
STDIN = "-"
GZIP_MAGIC = b"\x1f\x8b"
#: how much of an oversized line is read at a time while it is skipped
_SKIP_PIECE = 1024 * 1024


@dataclass(frozen=True)
class Oversized:
    """A line longer than the limit, skipped unread: its size in bytes (newline excluded)."""

    size: int


def is_stdin(source) -> bool:
    return str(source) == STDIN


def _buffered(raw: BinaryIO) -> io.BufferedReader:
    return raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)


def open_input(source) -> BinaryIO:
    """``source`` (a path, or ``-`` for standard input) as a binary stream, gunzipped when it is
    gzip (recognised by its magic bytes, whatever its name)."""
    raw = _buffered(sys.stdin.buffer) if is_stdin(source) else Path(source).open("rb")
    if raw.peek(2)[:2] == GZIP_MAGIC:
        return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"))
    return raw


def read_lines(f: BinaryIO, max_bytes: int) -> Iterator[bytes | Oversized]:
    """Each line of ``f`` (with its newline, as iterating a file gives it), or ``Oversized`` for a
    line of more than ``max_bytes`` bytes; memory is bounded by ``max_bytes``, not by the line.

    A stream that breaks off (a truncated or corrupt gzip file) raises ``FileInputError`` with
    the reason, not a traceback.
    """
    while True:
        raw = _read(f, max_bytes + 1)
        if not raw:
            return
        if len(raw) <= max_bytes or raw.endswith(b"\n") and len(raw) == max_bytes + 1:
            yield raw
            continue
        size = len(raw)
        del raw
        while True:
            piece = _read(f, _SKIP_PIECE)
            if not piece:
                break
            if piece.endswith(b"\n"):
                size += len(piece) - 1
                break
            size += len(piece)
        yield Oversized(size)


def _read(f: BinaryIO, limit: int) -> bytes:
    try:
        return f.readline(limit)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise FileInputError(f"the input breaks off: {str(e) or type(e).__name__} (a truncated or corrupt gzip"
                             " file?); the lines before it were read") from e


class DigestSet:
    """The custom_ids a submit has seen, as 63-bit hashes in one flat table: 16 to 32 bytes per id.

    A Python ``set`` of 8-byte digests took about 100 bytes per id, so a file
    of millions of short lines grew a submit by hundreds of MB for its
    duplicate check alone. Open addressing with linear probing, doubled at
    half full; a hash is BLAKE2b of the id's UTF-8 (two ids share one with
    odds of about n²/2⁶⁴).
    """

    def __init__(self, capacity: int = 1024):
        self._table = array("Q", [0]) * capacity
        self._mask = capacity - 1
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @staticmethod
    def digest(custom_id: str) -> int:
        h = hashlib.blake2b(custom_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(h, "big") | 1   # never 0: 0 marks an empty slot

    def add(self, custom_id: str) -> bool:
        """Record ``custom_id``; False when it was seen before."""
        return self._insert(self.digest(custom_id))

    def _insert(self, d: int) -> bool:
        table, mask = self._table, self._mask
        i = d & mask
        while True:
            v = table[i]
            if v == 0:
                table[i] = d
                self._n += 1
                if self._n * 2 > len(table):
                    self._grow()
                return True
            if v == d:
                return False
            i = (i + 1) & mask

    def _grow(self) -> None:
        old = self._table
        self._table = array("Q", [0]) * (2 * len(old))
        self._mask = len(self._table) - 1
        self._n = 0
        for d in old:
            if d:
                self._insert(d)
