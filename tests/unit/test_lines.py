"""Submit reads lines of bounded size, from a file, a gzip file or standard input."""

from __future__ import annotations

import gzip
import io

import pytest
from hypothesis import given, settings, strategies as st

from pipeline.errors import FileInputError
from pipeline.intake.lines import DigestSet, Oversized, open_input, read_lines
from pipeline.intake.producer import check_file, oversized_reason


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=12),
       limit=st.integers(1, 30), final_newline=st.booleans())
def test_lines_up_to_the_limit_come_whole_and_longer_ones_as_their_size(lines, limit, final_newline):
    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    got = list(read_lines(io.BufferedReader(io.BytesIO(data), buffer_size=8), limit))
    expected = list(io.BytesIO(data))   # what iterating the file gave
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        content = e.rstrip(b"\n")
        if len(content) > limit:
            assert g == Oversized(len(content))
        else:
            assert g == e


def test_an_oversized_line_is_never_held(tmp_path):
    """A 64 MiB line under a 1 MiB limit: read_lines never returns (or keeps) more than the limit."""
    f = tmp_path / "big.jsonl"
    with f.open("wb") as out:
        out.write(b'{"custom_id": "a", "body": "' + b"x" * (64 << 20) + b'"}\n{"next": 1}\n')
    sizes = []
    with open_input(f) as stream:
        for item in read_lines(stream, 1 << 20):
            sizes.append(item if isinstance(item, Oversized) else len(item))
    assert sizes == [Oversized((64 << 20) + 30), 12]
    assert "67,108,894 bytes, more than the 1,048,576" in oversized_reason(sizes[0], 1 << 20)


def test_a_gzip_file_is_read_as_its_lines(tmp_path):
    f = tmp_path / "requests.jsonl.whatever"
    f.write_bytes(gzip.compress(b'{"a": 1}\n{"b": 2}\n'))
    with open_input(f) as stream:
        assert list(read_lines(stream, 100)) == [b'{"a": 1}\n', b'{"b": 2}\n']
    check_file(f)   # a JSONL file once decompressed: no complaint


def test_check_file_does_not_read_an_oversized_first_line(tmp_path):
    f = tmp_path / "one-line.jsonl"
    f.write_bytes(b'{"custom_id": "' + b"y" * 5000 + b'"}')
    check_file(f, max_line_bytes=100)   # refused later, with its line number


def test_a_truncated_gzip_file_is_named_not_a_traceback(tmp_path):
    f = tmp_path / "cut.jsonl.gz"
    f.write_bytes(gzip.compress(b'{"a": 1}\n' * 1000)[:60])
    with open_input(f) as stream, pytest.raises(FileInputError, match="truncated or corrupt gzip"):
        list(read_lines(stream, 100))


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.text(max_size=12), max_size=3000))
def test_the_digest_set_says_new_exactly_once_per_id(ids):
    seen = DigestSet(capacity=4)   # grows many times
    firsts = [seen.add(i) for i in ids]
    expected, known = [], set()
    for i in ids:
        expected.append(i not in known)
        known.add(i)
    assert firsts == expected and len(seen) == len(known)


def test_the_digest_set_costs_far_less_than_a_set():
    """A set of 8-byte digests took about 100 bytes an id; the table 16 to 32, 48 while it doubles."""
    import tracemalloc
    tracemalloc.start()
    seen = DigestSet()
    for i in range(200_000):
        seen.add(f"review-{i}")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak / 200_000 < 40, f"{peak / 200_000:.1f} bytes an id"
