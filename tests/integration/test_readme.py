"""The README's commands work: its blocks marked safe run against the live stack and exit 0.

The marker convention: a fenced code block whose info string is ``sh safe``
(```` ```sh safe ````) is safe to run against a running local stack: it only
submits small simulated jobs and reads. Blocks without the marker (``make``
targets, psql with a fixed port, docker) are shown, not run. Renderers read
only the first word of the info string, so the marker does not change how the
README looks.

Blocks run in the order they appear, each in its own ``bash -euo pipefail``
from the repository root with ``.venv/bin`` first on PATH (as after
``source .venv/bin/activate``). A block may set shell variables
(``JOB=$(llmbatch submit …)``): variables assigned at the start of a line are
handed on to the blocks after it, as they would be in the reader's shell.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.S | re.M)
ASSIGNED = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=", re.M)
#: a block's generous deadline: the tour's job is 14 simulated requests, ``status --watch`` waits for them
BLOCK_TIMEOUT_S = 300


def safe_blocks(text: str) -> list[str]:
    """The bodies of the fenced blocks whose info string is ``sh safe`` (or ``bash safe``)."""
    return [body for info, body in FENCE.findall(text)
            if info.split()[:1] in (["sh"], ["bash"]) and "safe" in info.split()[1:]]


def test_the_readme_has_safe_blocks_and_stays_short():
    text = README.read_text()
    assert len(text.splitlines()) < 150, "the README is a tour: keep it under 150 lines, reference goes to docs/"
    assert len(safe_blocks(text)) >= 4, "the tour's commands (submit, watch, results, SQL) are marked `sh safe`"


def test_the_marker_is_read_as_documented():
    text = "```sh safe\necho run\n```\n```sh\necho shown\n```\n```python safe\nprint()\n```\n"
    assert safe_blocks(text) == ["echo run\n"]


@pytest.fixture(scope="module")
def shell_state(tmp_path_factory):
    """A file of ``export NAME=value`` lines the blocks hand on to each other."""
    path = tmp_path_factory.mktemp("readme") / "state.sh"
    path.write_text("")
    return path


@pytest.mark.parametrize("index", range(len(safe_blocks(README.read_text()))))
def test_readme_block_exits_0(stack, shell_state, index):
    block = safe_blocks(README.read_text())[index]
    names = sorted(set(ASSIGNED.findall(block)))
    save = "".join(f'printf "export {n}=%q\\n" "${{{n}}}" >> {shlex.quote(str(shell_state))}\n' for n in names)
    script = f"source {shlex.quote(str(shell_state))}\n{block}\n{save}"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert proc.returncode == 0, (
        f"README block {index + 1} exited {proc.returncode}:\n{block}\n"
        f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
