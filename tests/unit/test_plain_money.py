"""Money prints as a plain decimal everywhere, JSON and CSV included, and the CLI's job
states are the one definition's (issue: `jobs --json` printed a failed job's cost as
"0E-8"; `jobs --status completed_with_errors` exited 2)."""

from __future__ import annotations

import ast
import io
import json
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from llmbatch.cli.main import main
from pipeline import jsontext
from pipeline.constants import JOB_STATES
from pipeline.stores import export

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("amount,text", [(Decimal("0E-8"), "0"), (Decimal("0.00000000"), "0"),
                                         (Decimal("1.20000000"), "1.2"), (Decimal("1E+2"), "100"),
                                         (Decimal("0.00000015"), "0.00000015")])
def test_plain_has_no_exponent_and_no_trailing_zeros(amount, text):
    assert jsontext.plain(amount) == text
    assert json.loads(jsontext.dumps({"cost_usd": amount})) == {"cost_usd": text}


@given(st.decimals(min_value=0, max_value=10**8, places=8, allow_nan=False, allow_infinity=False))
def test_plain_is_exact_and_never_scientific(amount):
    text = jsontext.plain(amount)
    assert "E" not in text.upper() and Decimal(text) == amount


def test_exports_write_plain_money():
    row = {"custom_id": "a", "status": "failed", "cost_usd": Decimal("0E-8"), "response": None,
           "error": {"code": "x", "message": "y"}, "status_code": None, "provider_request_id": None}
    out = io.StringIO()
    export.write_results([row], "job", out, "csv")
    assert out.getvalue().splitlines()[1].split(",")[9] == "0"
    assert "E-8" not in out.getvalue()


def test_no_json_written_with_default_str():
    """The class of the defect: ``json.dumps(..., default=str)`` prints a Decimal as ``0E-8``;
    every JSON llmbatch writes goes through pipeline/jsontext.py instead."""
    found = []
    for package in ("pipeline", "llmbatch", "workers", "schedules"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.keyword) and node.arg == "default" and \
                        isinstance(node.value, ast.Name) and node.value.id == "str":
                    found.append(f"{path.relative_to(ROOT)}:{node.value.lineno}")
    assert found == []


def test_jobs_status_takes_every_job_state():
    option = next(p for p in main.commands["jobs"].params if p.name == "status_")
    assert tuple(option.type.choices) == JOB_STATES
