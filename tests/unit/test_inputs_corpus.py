"""The bad-input corpus against pipeline.intake.formats alone (no services).

The same cases run end to end in tests/inputs/test_bad_input.py; here each
line goes through ``parse_json_line`` + ``parse_request`` the way the
producer does (blank lines skipped, duplicates caught by custom_id).
"""

import pytest

from pipeline.errors import LineError
from pipeline.intake.formats import parse_json_line, parse_request
from pipeline.money.pricing import PriceBook
from tests.inputs.corpus import all_cases

PRICES = PriceBook.load()
CASES = all_cases(ten_mb=False)


def outcome(raw: bytes, seen: set) -> tuple[str, str]:
    if not raw.strip() or raw.strip() == b"\xef\xbb\xbf":
        return "skip", ""
    try:
        req = parse_request(parse_json_line(raw), PRICES)
    except LineError as e:
        return "reject", e.reason
    if req.custom_id in seen:
        return "reject", f"duplicate custom_id {req.custom_id!r}"
    seen.add(req.custom_id)
    return "ok", ""


def test_every_case_has_its_expected_outcome():
    seen: set = set()
    wrong = []
    for case in CASES:
        kind, reason = outcome(case.raw, seen)
        want = "ok" if case.kind == "kafka" else case.kind   # the broker, not formats, refuses those
        if kind != want or (want == "reject" and case.text not in reason):
            wrong.append(f"{case.source}: expected {case.expect!r}, got {kind} {reason!r}")
    assert not wrong, "\n".join(wrong)


def test_reasons_are_for_people():
    seen: set = set()
    for case in CASES:
        kind, reason = outcome(case.raw, seen)
        if kind == "reject":
            assert 10 <= len(reason) <= 400, (case.source, reason)
            assert "Traceback" not in reason and "Error(" not in reason, (case.source, reason)


@pytest.mark.parametrize("label", ["10 MB line"])
def test_ten_megabyte_line_is_rejected_for_its_context_window(label):
    case = next(c for c in all_cases(ten_mb=True) if c.source == label)
    assert len(case.raw) >= 10_000_000
    kind, reason = outcome(case.raw, set())
    assert kind == "reject" and "context window" in reason
