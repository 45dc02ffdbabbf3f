"""The simulator's own price table and USD rules, and that it stays the pipeline's independent witness."""

from __future__ import annotations

import ast
from decimal import Decimal
from pathlib import Path

import pytest

from simulator.prices import FREE, Price, builtin_price, plain, usd

ROOT = Path(__file__).resolve().parents[2]
M = Decimal(1_000_000)
#: what the simulator may use of the pipeline, by (module's last name, imported name), so the
#: check holds wherever pipeline/ puts its modules: errors, a label, and the provisioning of the
#: tokenizer's vocabulary files (data). Never its counting, bounds or prices.
ALLOWED_FROM_PIPELINE = {("errors", "ConfigError"), ("errors", "LLMBatchError"),
                         ("constants", "SIMULATOR_LABEL"), ("tokens", "provision"),
                         ("tokens", "default_cache_dir")}


def pipeline_imports(root: Path) -> set[tuple[str, str]]:
    found = set()
    for path in (root / "simulator").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
                found |= {(node.module.split(".")[-1], a.name) for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {(a.name, "*") for a in node.names if a.name.split(".")[0] == "pipeline"}
    return found


def test_the_simulator_uses_no_pipeline_counting_or_pricing():
    assert pipeline_imports(ROOT) <= ALLOWED_FROM_PIPELINE


def test_the_witness_check_can_fail(tmp_path):
    (tmp_path / "simulator").mkdir()
    (tmp_path / "simulator" / "bad.py").write_text("def f():\n    from pipeline.pricing import PRICES\n")
    assert pipeline_imports(tmp_path) - ALLOWED_FROM_PIPELINE == {("pricing", "PRICES")}


@pytest.mark.parametrize("model,family", [
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"), ("gpt-4o-2024-08-06", "gpt-4o"), ("gpt-5-2025-08-07", "gpt-5"),
    ("gpt-5-mini", "gpt-5-mini"), ("o3-2025-04-16", "o3"), ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
    ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
])
def test_snapshots_resolve_to_their_family(model, family):
    kind = "anthropic" if model.startswith("claude") else "openai"
    assert builtin_price(kind, model) is builtin_price(kind, family) is not None


def test_unknown_models_have_no_price():
    assert builtin_price("openai", "gpt-4o-turbo-x") is None
    assert builtin_price("openai", "claude-haiku-4-5") is None     # each kind its own table


def test_openai_shapes_bill_cached_input_and_the_flex_or_batch_discount():
    p = Price.of("2.50", "10.00", "1.25")
    chat = {"prompt_tokens": 2000, "completion_tokens": 100, "prompt_tokens_details": {"cached_tokens": 1024}}
    full = (976 * Decimal("2.50") + 1024 * Decimal("1.25") + 100 * Decimal("10.00")) / M
    assert usd(p, chat) == full
    assert usd(p, chat, "flex") == usd(p, chat, "batch") == full / 2
    responses = {"input_tokens": 2000, "output_tokens": 100, "input_tokens_details": {"cached_tokens": 1024}}
    assert usd(p, responses) == full
    assert usd(Price.of("0.02"), {"prompt_tokens": 1000, "total_tokens": 1000}) == Decimal("0.00002")
    assert usd(FREE, {}) == 0


def test_anthropic_cache_writes_and_reads_stack_with_the_batch_discount():
    p = Price.of("3", "15", "0.30")
    u = {"input_tokens": 100, "output_tokens": 50, "cache_creation_input_tokens": 3000,
         "cache_read_input_tokens": 4000,
         "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000}}
    full = (100 * 3 + 1000 * Decimal("3.75") + 2000 * 6 + 4000 * Decimal("0.30") + 50 * 15) / M
    assert usd(p, u) == full and usd(p, u, "batch") == full / 2


def test_money_prints_as_a_plain_decimal():
    assert plain(Decimal("0E-8")) == "0" and plain(Decimal("0.00001950")) == "0.0000195"
    assert plain(Decimal("12.5000")) == "12.5" and plain(Decimal("100")) == "100"
