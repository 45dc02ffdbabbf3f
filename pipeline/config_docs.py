"""docs/CONFIGURATION.md, generated from the settings object (pipeline/config.py ``Settings``):
each setting's meaning is the ``#:`` comment beside its field, read from the source.

Apart from the settings themselves, so that the object every process builds stays small.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.config import ROOT, Secret, Settings

DOCS_COMMAND = "python -m pipeline.config_docs > docs/CONFIGURATION.md"


def field_docs(cls: type = None) -> dict[str, tuple[str, str]]:
    """``{field: (section, meaning)}`` read from the ``#:`` comments of ``Settings``' source.

    Read from the source, not stored at run time, so a meaning is one comment
    line beside its field and the settings object stays a plain dataclass.
    A field with no ``#:`` comment gets an empty meaning.
    """
    import ast
    import inspect
    import textwrap

    lines = textwrap.dedent(inspect.getsource(cls or Settings)).splitlines()
    body = ast.parse("\n".join(lines)).body[0].body
    out, section, seen = {}, "", 0
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        row = node.lineno - 1
        for i in range(seen, row):                  # a plain comment after a blank line: a section
            text = lines[i].strip()
            after = lines[i - 1].strip()
            if text.startswith("#") and not text.startswith("#:") and (not after or after.startswith("class ")):
                section = text.lstrip("# ").strip()
        comment, i = [], row - 1
        while i >= 0 and lines[i].strip().startswith("#:"):
            comment.insert(0, lines[i].strip()[2:].strip().replace("``", "`"))
            i -= 1
        out[node.target.id] = (section, " ".join(comment))
        seen = node.end_lineno
    return out


def _shown(value) -> str:
    """A default as you would write it in the environment variable."""
    if isinstance(value, Secret) or value == "":
        return "(empty)"
    if value is None:
        return "(none)"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "(empty)"
    if isinstance(value, Path):
        return f"<repo>/{value.relative_to(ROOT)}" if value.is_relative_to(ROOT) else str(value)
    return str(value)


def _kind(f: dataclasses.Field, value) -> str:
    if isinstance(value, Secret):
        return "secret"
    if f.name == "providers":
        return "TOML tables / JSON"
    if isinstance(value, dict):
        return "map `k=v,…`"
    if f.name.endswith(("_dir", "_file")):
        return "path"
    return {int: "int", float: "float", str: "str", bool: "bool"}.get(type(value), type(value).__name__)


def settings_reference(cls: type = None) -> str:
    """docs/CONFIGURATION.md: every setting, its variable, type, default and meaning, by section."""
    cls = cls or Settings
    base, docs = cls(), field_docs(cls)
    lines = [
        "# Configuration",
        "",
        f"<!-- Generated from pipeline/config.py (Settings) by `{DOCS_COMMAND}`. Do not edit by hand. -->",
        "",
        "One settings object, `pipeline/config.py` `Settings`, built once per process by",
        "`get_settings()`. Every setting is read, in this order (later wins), from its default,",
        "from the TOML file `llmbatch.toml` in the working directory (another file:",
        "`LLMBATCH_CONFIG=path`; keys are the setting names), and from its environment variable",
        "`LLMBATCH_<NAME>`. `OPENAI_API_KEY` and `ANTHROPIC_API_KEY` work as well as their",
        "`LLMBATCH_` names. An unknown key in the TOML file is an error.",
        "",
        "Maps are written `key=value,key=value` (`LLMBATCH_BATCH_MAX_SIZE=peak=100`); the keys you",
        "give replace those of the default, the others stay. With `LLMBATCH_PORT_OFFSET=N` the",
        "default ports of Postgres, Redis, Kafka, the simulator, Flower and metrics move up by N",
        "(a setting you give yourself is used as given). Secrets never show in a repr or a log line.",
        "`providers` is written as TOML tables (`[providers.NAME]`) or as JSON in `LLMBATCH_PROVIDERS`;",
        "each key names the variable its secret is read from (docs/USAGE.md, \"Providers and keys\").",
        "",
        "Mind the kernel's ephemeral port range (Linux: 32768–60999, in",
        "`/proc/sys/net/ipv4/ip_local_port_range`), from which every outgoing connection takes its",
        "local port. The default ports of Postgres (55432), Redis (56379), the simulator (58080) and",
        "Kafka (59092, controller 59093) lie inside it, and an offset can move a second stack's ports",
        "into it: while such a service is down, any client's socket may take its port, and the",
        "service then cannot start (\"address already in use\") until that socket closes; `make up`",
        "waits for it, naming the socket, up to `PORT_WAIT_S` seconds (60). An offset",
        "from 5568 to 6442 puts all of them above 60999 (the fault stack's 5700 does); otherwise",
        "reserve the ports with `sysctl net.ipv4.ip_local_reserved_ports=…`. `llmbatch sql --url`",
        "prints the Postgres address a stack really uses.",
        "",
        "To add a setting: a field on `Settings` with a `#:` comment line above it saying what it",
        f"means, then `{DOCS_COMMAND}` (tests/unit/test_config_docs.py checks both).",
    ]
    section = None
    for f in dataclasses.fields(cls):
        where, meaning = docs.get(f.name, ("", ""))
        if where != section:
            section = where
            title, _, note = where.partition(" (")
            lines += ["", f"## {title[:1].upper() + title[1:] or 'Settings'}", ""]
            lines += [f"({note}", ""] if note else []
            lines += ["| setting | environment variable | type | default | meaning |", "|---|---|---|---|---|"]
        value = getattr(base, f.name)
        cells = [f"`{f.name}`", f"`LLMBATCH_{f.name.upper()}`", _kind(f, value),
                 f"`{_shown(value)}`", meaning or "**(no meaning given)**"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += [
        "",
        "## Read outside the settings object",
        "",
        "| variable | read by | meaning |",
        "|---|---|---|",
        "| `LLMBATCH_CONFIG` | `load_settings` | the TOML settings file (default `llmbatch.toml`) |",
        "| `LLMBATCH_FLOWER_USER`, `LLMBATCH_FLOWER_PASSWORD` | infra/stack.sh, docker-compose.yml |"
        " Flower's basic auth |",
        "| `LLMBATCH_GRAFANA_USER`, `LLMBATCH_GRAFANA_PASSWORD` | docker-compose.yml | Grafana's admin login |",
        "| `LLMBATCH_FAULTS` | tests/faults | `1`: the fault tests may kill and restart the stack's processes |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if sys.argv[1:]:
        sys.exit(f"usage: {DOCS_COMMAND}")
    sys.stdout.write(settings_reference())
