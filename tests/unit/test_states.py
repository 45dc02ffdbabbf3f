"""States have one definition (pipeline/constants.py), and the SQL reads it.

No module spells a list of states as literals: Python uses the named sets, SQL calls
``llmbatch_states('…')`` (the function ``db.upgrade`` generates from the constants). The
migrations are history; what counts there is every view, index and CHECK as the last migration
that touches it leaves it, and the documented queries.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from pipeline import constants
from pipeline.stores import db

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("pipeline", "schedules", "workers", "llmbatch")
#: every state of a request, job, batch and provider batch
VOCABULARY = frozenset(constants.REQUEST_STATES + constants.JOB_STATES + constants.BATCH_STATES
                       + constants.PROVIDER_BATCH_STATES)
#: ``IN ('a', 'b')``, ``ARRAY['a', 'b']``: two or more quoted words
SQL_LIST = re.compile(r"(?:\bIN\s*\(|\bARRAY\s*\[)\s*('\w+'(?:\s*,\s*'\w+')+)\s*[)\]]", re.I)
USED_SET = re.compile(r"llmbatch_states\s*\(\s*'(\w+)'\s*\)")


def state_lists_in_sql(text: str) -> list[tuple[int, str]]:
    """(line within ``text``, the list) of every literal list made only of state names."""
    out = []
    for m in SQL_LIST.finditer(text):
        words = re.findall(r"'(\w+)'", m.group(1))
        if set(words) <= VOCABULARY:
            out.append((text.count("\n", 0, m.start()), m.group(0)))
    return out


def state_lists_in_python(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [f"{path.relative_to(ROOT)}:{node.lineno + n}: {s}" for n, s in state_lists_in_sql(node.value)]
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2:
            words = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if len(words) == len(node.elts) and set(words) <= VOCABULARY:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {tuple(words)}")
    return found


def python_files():
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path != ROOT / "pipeline" / "constants.py":
                yield path


def statements(sql: str) -> list[str]:
    """The statements of a migration, comments dropped; dollar-quoted bodies kept whole."""
    sql = re.sub(r"--[^\n]*", "", sql)
    out, start, i = [], 0, 0
    while i < len(sql):
        if sql.startswith("$", i) and (m := re.match(r"\$\w*\$", sql[i:])):
            end = sql.find(m.group(0), i + len(m.group(0)))
            i = end + len(m.group(0))
            continue
        if sql[i] == ";":
            out.append(sql[start:i].strip())
            start = i + 1
        i += 1
    out.append(sql[start:].strip())
    return [s for s in out if s]


_NAME = r"(?:IF\s+(?:NOT\s+)?EXISTS\s+)?([\w.]+)"


def final_definitions(files) -> dict[tuple[str, str], tuple[str, str]]:
    """(kind, name) -> (file, statement) of every view, index and named CHECK as the migrations leave it."""
    defs: dict[tuple[str, str], tuple[str, str]] = {}
    for path in files:
        for stmt in statements(path.read_text()):
            if m := re.match(r"CREATE\s+(?:OR\s+REPLACE\s+)?VIEW\s+" + _NAME, stmt, re.I):
                defs[("view", m.group(1))] = (path.name, stmt)
            elif m := re.match(r"CREATE\s+(?:UNIQUE\s+)?INDEX\s+" + _NAME, stmt, re.I):
                if "IF NOT EXISTS" not in stmt.upper() or ("index", m.group(1)) not in defs:
                    defs[("index", m.group(1))] = (path.name, stmt)
            elif m := re.match(r"DROP\s+(VIEW|INDEX)\s+" + _NAME, stmt, re.I):
                defs.pop((m.group(1).lower(), m.group(2)), None)
            elif stmt.upper().startswith("ALTER TABLE"):
                for m in re.finditer(r"DROP\s+CONSTRAINT\s+" + _NAME, stmt, re.I):
                    defs.pop(("constraint", m.group(1)), None)
                for m in re.finditer(r"ADD\s+CONSTRAINT\s+(\w+)\s+CHECK\s*\((.*?)\)\s*(?:,\s*(?:ADD|DROP)\b|$)",
                                     stmt, re.I | re.S):
                    defs[("constraint", m.group(1))] = (path.name, m.group(2))
    return defs


def test_the_sets_are_one_definition():
    assert constants.REQUEST_STATES == constants.REQUEST_OPEN + constants.REQUEST_TERMINAL
    sets = constants.STATE_SETS
    for name, states in sets.items():
        assert states and len(set(states)) == len(states), name
        whole = {"request": constants.REQUEST_STATES, "job": constants.JOB_STATES,
                 "batch": constants.BATCH_STATES, "provider": constants.PROVIDER_BATCH_STATES}
        assert set(states) <= set(whole[name.split("_")[0]]), name
    # every named set of a state in constants.py is one SQL can read
    named = {k.lower(): v for k, v in vars(constants).items()
             if re.match(r"(REQUEST|JOB|BATCH|PROVIDER_BATCH)_[A-Z_]+$", k) and isinstance(v, tuple)}
    assert named == sets


def test_no_module_spells_a_list_of_states():
    found = [hit for path in python_files() for hit in state_lists_in_python(path)]
    assert not found, "state lists spelled as literals; use pipeline/constants.py:\n" + "\n".join(found)


def test_views_indexes_and_checks_as_the_migrations_leave_them_read_the_constants():
    found = []
    for (kind, name), (file, text) in sorted(final_definitions(db.migration_files()).items()):
        found += [f"{file}: {kind} {name}: {s}" for _, s in state_lists_in_sql(text)]
    for path in sorted((ROOT / "sql" / "queries").glob("*.sql")):
        found += [f"{path.name}:{n + 1}: {s}" for n, s in state_lists_in_sql(path.read_text())]
    assert not found, "state lists spelled as literals; use llmbatch_states('…'):\n" + "\n".join(found)


def test_the_scanners_find_what_they_look_for(tmp_path):
    """The scans above can fail: each finds a planted list."""
    planted = tmp_path / "m.py"
    planted.write_text('Q = ("SELECT 1 FROM requests WHERE status NOT IN"\n     " (\'succeeded\', \'failed\'))")\n'
                       'S = ("held", "queued")\nOK = ("failed", "expired")\n')
    global ROOT
    root, ROOT = ROOT, tmp_path
    try:
        assert len(state_lists_in_python(planted)) == 2
    finally:
        ROOT = root
    (tmp_path / "001_a.sql").write_text(
        "CREATE VIEW v AS SELECT 1 WHERE 'x' IN ('held', 'queued');\n"
        "CREATE INDEX i ON t (a) WHERE s NOT IN ('succeeded', 'failed');\n"
        "ALTER TABLE jobs ADD CONSTRAINT c CHECK (status IN ('running', 'failed'));\n"
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$;\n")
    (tmp_path / "002_b.sql").write_text(
        "CREATE OR REPLACE VIEW v AS SELECT 1 WHERE 'x' = ANY(llmbatch_states('batch_released'));\n"
        "ALTER TABLE jobs DROP CONSTRAINT c, ADD CONSTRAINT c CHECK (status = ANY(llmbatch_states('job_states')));\n")
    defs = final_definitions(sorted(tmp_path.glob("*.sql")))
    assert [k for k, (_, text) in sorted(defs.items()) if state_lists_in_sql(text)] == [("index", "i")]
    assert "job_states" in defs[("constraint", "c")][1] and ("view", "v") in defs


def test_every_set_the_sql_names_exists():
    texts = [p.read_text() for p in python_files()] + [p.read_text() for p in (ROOT / "sql").rglob("*.sql")]
    used = {name for text in texts for name in USED_SET.findall(text)}
    assert used, "no SQL reads the state sets"
    assert used <= set(constants.STATE_SETS), sorted(used - set(constants.STATE_SETS))


def test_the_function_is_generated_from_the_constants():
    body = db.states_function_body()
    for name, states in constants.STATE_SETS.items():
        assert f"WHEN '{name}' THEN RETURN ARRAY[{', '.join(repr(s) for s in states)}]::text[];" in body
    assert "RAISE EXCEPTION" in body and "%" not in db.states_function_sql()
    assert "IMMUTABLE" in db.states_function_sql()
