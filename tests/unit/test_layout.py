"""The layout rule (docs/ARCHITECTURE.md, "Layout and the import rule"): imports point down.

``llmbatch`` (the front door) may import everything; ``workers``,
``schedules`` and ``simulator`` import ``pipeline`` at most; ``pipeline``
imports none of them. Every import counts, those inside functions too: a lazy
import is still a dependency.

Inside ``pipeline/`` the same holds between its folders (``FOLDERS``): the
top-level vocabulary (config, errors, constants, ids, clock, aio, logs,
metrics) imports no folder; each folder imports the vocabulary and the
folders its row names, and the rows form no cycle. And no module is over
``MAX_LINES`` lines.
"""

from __future__ import annotations

import ast
import sys
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


#: inside pipeline/: which folder may import which, besides itself ("" is the top-level vocabulary,
#: the modules directly in pipeline/). Read from the imports after the split into folders: intake
#: builds on money, stores, providers and endpoints; money keeps its ledger in the stores; the stores send a
#: job's cancel through the providers' Batch API; endpoints may build on money only.
FOLDERS = {
    "": set(),
    "providers": {""},
    "stores": {"", "providers"},
    "money": {"", "stores", "providers"},
    "intake": {"", "money", "stores", "providers", "endpoints", "request", "paths"},
    "endpoints": {"", "money"},
    # pipeline/request.py, a module with a node of its own: the typed request carries a Bound, and
    # its provider's kind (the registry's) says its default url
    "request": {"", "money", "providers"},
    "paths": {"", "money", "stores", "providers", "endpoints", "request"},
    # the HTTP front door (llmbatch api): a batch is a job submitted through intake, its results read
    # from the stores; money parses a cap, paths names the modes
    "api": {"", "intake", "stores", "money", "paths"},
}
#: top-level modules of pipeline/ that are a node of FOLDERS, not part of the vocabulary
MODULE_NODES = {"request"}
#: no module of these packages is longer (docs/ARCHITECTURE.md: a few hundred lines each)
MAX_LINES = 650
SIZED = ("pipeline", "workers", "schedules", "llmbatch")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every absolute import in ``path``; ``from a import b`` gives ``a.b``
    when ``a`` is a package of ours (``b`` may be a module), else ``a``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in OURS:
                out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def folder_of(root: Path, dotted: str) -> str | None:
    """The folder of pipeline/ a module lies in ("" for the top-level vocabulary), None outside."""
    parts = dotted.split(".")
    if parts[0] != "pipeline" or len(parts) < 2:
        return None if parts[0] != "pipeline" else ""
    return parts[1] if (root / "pipeline" / parts[1]).is_dir() or parts[1] in MODULE_NODES else ""


def folder_breaches(root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted((root / "pipeline").rglob("*.py")):
        rel = path.relative_to(root / "pipeline").parts
        source = rel[0] if len(rel) > 1 else (path.stem if path.stem in MODULE_NODES else "")
        allowed = FOLDERS.get(source, set()) | {source}
        for line, dotted in imported_modules(path):
            target = folder_of(root, dotted)
            if target is not None and target not in allowed:
                found.append(f"{path.relative_to(root)}:{line} imports {dotted}")
    return found


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


def test_every_folder_of_pipeline_has_a_rule():
    folders = {p.name for p in (ROOT / "pipeline").iterdir()
               if p.is_dir() and any(p.glob("*.py"))}
    assert folders <= set(FOLDERS), f"folders of pipeline/ with no row in FOLDERS: {folders - set(FOLDERS)}"


def test_the_folder_rule_has_no_cycle():
    done: set[str] = set()
    left = dict(FOLDERS)
    while left:
        ready = [f for f, deps in left.items() if deps <= done]
        assert ready, f"FOLDERS has a cycle among {sorted(left)}"
        done |= set(ready)
        for f in ready:
            del left[f]
    assert FOLDERS[""] == set(), "the top-level vocabulary imports no folder"


def test_imports_inside_pipeline_point_down():
    assert folder_breaches() == []


@pytest.mark.parametrize("source,statement,target", [
    ("clock.py", "from pipeline.stores import db", "pipeline.stores.db"),          # vocabulary → a folder
    ("metrics.py", "from pipeline import money", "pipeline.money"),
    ("providers/bad.py", "from pipeline.money.pricing import cost", "pipeline.money.pricing.cost"),
    ("stores/bad.py", "import pipeline.intake.batcher", "pipeline.intake.batcher"),
    ("endpoints/bad.py", "from pipeline.stores.jobs import cancel_job", "pipeline.stores.jobs.cancel_job"),
])
def test_a_breach_inside_pipeline_is_caught(tmp_path, source, statement, target):
    """The folder check can fail: a planted import against the rule, lazy inside a function, is reported."""
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    for folder in FOLDERS:
        if folder:
            (tmp_path / "pipeline" / folder).mkdir()
            (tmp_path / "pipeline" / folder / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "stores" / "ok.py").write_text("from pipeline.providers import batch_api\n")
    (tmp_path / "pipeline" / source).write_text(f"def f():\n    {statement}\n")
    assert folder_breaches(tmp_path) == [f"pipeline/{source}:2 imports {target}"]


def test_no_module_is_over_max_lines():
    long = {str(p.relative_to(ROOT)): n for package in SIZED for p in sorted((ROOT / package).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines: split them by concern"


def test_a_long_module_is_caught(tmp_path, monkeypatch):
    """The size check can fail: a module one line over the limit is named."""
    for package in SIZED:
        (tmp_path / package).mkdir()
    (tmp_path / "workers" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="workers/long.py"):
        test_no_module_is_over_max_lines()
