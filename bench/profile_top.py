"""The top frames of a py-spy profile, as text for bench/README.md.

Record a running process (as root, or with ptrace allowed) while a benchmark loads it:

    .venv/bin/py-spy record --pid PID --duration 30 --rate 200 --format raw -o batcher.txt
    .venv/bin/python bench/profile_top.py batcher.txt [--top 15]

``--format raw`` writes collapsed stacks (``frame;frame;frame COUNT`` per line, root first).
Printed: the frames with the most samples of their own (the leaf: where the CPU was), then
the frames present in the most stacks (inclusive: what they and their callees cost), each as
a share of all samples. Idle waits show up as the frames that block (``consume``, ``poll``).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"; py-spy's own spelling otherwise
    m = re.match(r"(.*) \((?:.*/)?([^/]+?)(?::\d+)?\)$", frame)
    return f"{m.group(1)} ({m.group(2)})" if m else frame


def top(path: Path, n: int = 15) -> tuple[int, list, list]:
    own, inclusive, total = Counter(), Counter(), 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_short(f) for f in stack.split(";")]
        k = int(count)
        total += k
        own[frames[-1]] += k
        for f in set(frames):
            inclusive[f] += k
    return total, own.most_common(n), inclusive.most_common(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", type=Path)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    total, own, inclusive = top(args.profile, args.top)
    print(f"{total} samples")
    for title, rows in (("own", own), ("inclusive", inclusive)):
        print(f"\n| {title} % | frame |\n|---|---|")
        for frame, k in rows:
            print(f"| {100 * k / max(total, 1):.1f} | `{frame}` |")


if __name__ == "__main__":
    main()
