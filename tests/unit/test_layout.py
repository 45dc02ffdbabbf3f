"""The layout rule (docs/ARCHITECTURE.md, "Layout and the import rule"): imports point down.

``llmbatch`` (the front door) may import everything; ``workers``,
``schedules`` and ``simulator`` import ``pipeline`` at most; ``pipeline``
imports none of them. Every import counts, those inside functions too: a lazy
import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = ("llmbatch", "pipeline", "workers", "schedules", "simulator")
ALLOWED = {
    "llmbatch": set(OURS),
    "workers": {"workers", "pipeline"},
    "schedules": {"schedules", "pipeline"},
    "simulator": {"simulator", "pipeline"},
    "pipeline": {"pipeline"},
}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import of one of our packages in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in OURS]
    return out


def breaches(root: Path = ROOT) -> list[str]:
    found = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, target in imported_packages(path):
                if target not in allowed:
                    found.append(f"{path.relative_to(root)}:{line} imports {target}")
    return found


def test_every_package_exists():
    for package in OURS:
        assert (ROOT / package / "__init__.py").is_file(), package


def test_imports_point_down():
    assert breaches() == []


@pytest.mark.parametrize("package,target", [("pipeline", "workers"), ("simulator", "llmbatch"),
                                            ("workers", "schedules")])
def test_a_breach_is_caught(tmp_path, package, target):
    """The check itself can fail: a planted upward import, lazy inside a function, is reported."""
    for name in OURS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / package / "bad.py").write_text(f"def f():\n    from {target}.x import y\n")
    assert breaches(tmp_path) == [f"{package}/bad.py:2 imports {target}"]
