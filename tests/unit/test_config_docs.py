"""docs/CONFIGURATION.md is generated from the settings object and must stay in step with it.

Every field of ``pipeline.config.Settings`` needs a one-line meaning (a ``#:``
comment above it) and a line in docs/CONFIGURATION.md. When either test fails
the fix is one command, named in the failure message:
``python -m pipeline.config_docs > docs/CONFIGURATION.md``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.config import Settings
from pipeline.config_docs import DOCS_COMMAND, field_docs, settings_reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "CONFIGURATION.md"


def missing_meanings(cls: type = Settings) -> list[str]:
    docs = field_docs(cls)
    return [f.name for f in dataclasses.fields(cls) if not docs.get(f.name, ("", ""))[1]]


def missing_lines(text: str, cls: type = Settings) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)
            if f"| `{f.name}` | `LLMBATCH_{f.name.upper()}` |" not in text]


def test_every_setting_has_a_meaning():
    missing = missing_meanings()
    assert not missing, (
        f"settings without a meaning: {', '.join(missing)}. Put a '#: what it means' line just above "
        f"each in pipeline/config.py (class Settings), then run: {DOCS_COMMAND}")


def test_every_setting_has_a_line_in_the_doc():
    missing = missing_lines(DOC.read_text() if DOC.exists() else "")
    assert not missing, f"settings missing from docs/CONFIGURATION.md: {', '.join(missing)}. Run: {DOCS_COMMAND}"


def test_the_doc_is_what_the_generator_writes():
    assert DOC.exists() and DOC.read_text() == settings_reference(), (
        f"docs/CONFIGURATION.md is out of date with pipeline/config.py. Run: {DOCS_COMMAND}")


# The checks themselves catch a breach (a check that cannot fail proves nothing).

@dataclasses.dataclass(frozen=True)
class _Breach:
    # section one
    #: a documented setting
    documented: int = 1
    undocumented: str = "x"

    # section two
    #: a map
    per_tier: dict = dataclasses.field(default_factory=lambda: {"peak": 2})


def test_a_setting_without_a_meaning_is_caught():
    assert missing_meanings(_Breach) == ["undocumented"]


def test_a_setting_without_a_line_is_caught():
    text = settings_reference(_Breach)
    assert missing_lines(text, _Breach) == []
    without = "\n".join(line for line in text.splitlines() if "`per_tier`" not in line)
    assert missing_lines(without, _Breach) == ["per_tier"]


def test_the_generator_renders_sections_defaults_and_meanings():
    text = settings_reference(_Breach)
    assert "## Section one" in text and "## Section two" in text
    assert "| `documented` | `LLMBATCH_DOCUMENTED` | int | `1` | a documented setting |" in text
    assert "| `per_tier` | `LLMBATCH_PER_TIER` | map `k=v,…` | `peak=2` | a map |" in text
    assert "**(no meaning given)**" in text
