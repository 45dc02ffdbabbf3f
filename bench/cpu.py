"""CPU seconds (and peak memory) of the stack's processes and of the machine, read from /proc:
the one place the benchmarks read them.

A stack process is named by its pid file (``var/run/NAME.pid``, written by
``infra/stack.sh exec``, which then ``exec``s the process itself, so the pid is
the process: Postgres' postmaster, a Celery worker's parent, Kafka's JVM). Its
cost is the sum, over the process and every live descendant, of
``utime + stime`` (its own time) and ``cutime + cstime`` (the time of the
children it has reaped), from ``/proc/PID/stat``. Taken before and after a run,
the difference is exact when processes come and go in between: a Postgres
backend that disconnects, or a Celery pool process that is recycled, moves from
"live descendant" to its parent's reaped time with everything it ever used, and
its share before the run was in the first reading too.

Per process: ``own`` (the pid file's process: the postmaster, the worker's
parent) and ``children`` (the backends, the pool processes, and whatever they
reaped). The bench process's own reaped children (``submit``, the plain client:
``subprocess.run`` waits for them) are read the same way from ``/proc/self``.
The machine-wide figure is the busy time of ``/proc/stat``'s ``cpu`` line
(everything but idle and iowait): on a shared machine it holds other people's
work too.

``peak_memory`` reads each process tree's ``VmHWM`` (peak resident set) from
``/proc/PID/status`` the same way.

It never writes to /proc or signals anything; a process gone between reads
counts as nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Stat:
    """The fields of ``/proc/PID/stat`` the accounting needs (times in clock ticks)."""
    pid: int
    ppid: int
    own: int       # utime + stime
    reaped: int    # cutime + cstime


def read_stat(pid: int | str, proc: Path = Path("/proc")) -> Stat | None:
    try:
        text = (proc / str(pid) / "stat").read_text()
    except (OSError, ValueError):
        return None
    # the command name is in parentheses and may hold spaces or ')': split after the last one
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is the state (field 3 of proc(5)); utime is field 14
    return Stat(pid=int(pid), ppid=int(fields[1]), own=int(fields[11]) + int(fields[12]),
                reaped=int(fields[13]) + int(fields[14]))


def all_stats(proc: Path = Path("/proc")) -> dict[int, Stat]:
    out = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            stat = read_stat(entry.name, proc)
            if stat is not None:
                out[stat.pid] = stat
    return out


def descendants(pid: int, stats: dict[int, Stat], stop: frozenset[int] = frozenset()) -> list[int]:
    """Every live descendant of ``pid``, not entering the subtrees of the pids in ``stop``."""
    kids: dict[int, list[int]] = {}
    for s in stats.values():
        kids.setdefault(s.ppid, []).append(s.pid)
    out, todo = [], [k for k in kids.get(pid, ()) if k not in stop]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [k for k in kids.get(p, ()) if k not in stop]
    return out


def machine_busy(proc: Path = Path("/proc")) -> int:
    """Busy ticks of all CPUs since boot: the ``cpu`` line of /proc/stat less idle and iowait."""
    for line in (proc / "stat").read_text().splitlines():
        if line.startswith("cpu "):
            v = [int(x) for x in line.split()[1:]]
            # user nice system idle iowait irq softirq steal (guest is inside user already)
            return sum(v[:8]) - v[3] - v[4]
    raise ValueError("no cpu line in /proc/stat")


def stack_pids(run_dir: Path) -> dict[str, int]:
    """NAME -> pid of every ``NAME.pid`` in the stack's run directory (``supervisord`` included)."""
    out = {}
    for f in sorted(Path(run_dir).glob("*.pid")):
        try:
            out[f.stem] = int(f.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


@dataclass
class Reading:
    at: float
    machine: int
    bench_children: int
    processes: dict[str, dict] = field(default_factory=dict)   # name -> {pid, own, children}


def read(named: dict[str, int], proc: Path = Path("/proc"), self_pid: int | None = None) -> Reading:
    """One reading of every named process tree, the bench's own reaped children and the machine."""
    stats = all_stats(proc)
    me = stats.get(self_pid if self_pid is not None else os.getpid())
    reading = Reading(at=time.monotonic(), machine=machine_busy(proc), bench_children=me.reaped if me else 0)
    # supervisord is every stack process's parent: each tree stops at another named process
    roots = frozenset(named.values())
    for name, pid in named.items():
        lead = stats.get(pid)
        if lead is None:
            continue
        kids = descendants(pid, stats, roots)
        reading.processes[name] = {
            "pid": pid, "own": lead.own,
            "children": lead.reaped + sum(stats[k].own + stats[k].reaped for k in kids),
            "live_children": len(kids)}
    return reading


def difference(before: Reading, after: Reading, requests: int, *, bench_children: str = "bench_children") -> dict:
    """CPU seconds and seconds per 1,000 requests of each process between two readings.

    A process whose pid changed (restarted) or that is missing from either reading is left out
    and named in ``restarted``: its time before the restart is not in the second reading.
    """
    per_k = 1000 / requests if requests else 0.0
    procs, restarted = {}, []
    for name, a in after.processes.items():
        b = before.processes.get(name)
        if b is None or b["pid"] != a["pid"]:
            restarted.append(name)
            continue
        own = (a["own"] - b["own"]) / TICK
        kids = (a["children"] - b["children"]) / TICK
        entry = {"cpu_s": round(own + kids, 3), "cpu_s_per_1000": round((own + kids) * per_k, 4)}
        if a["live_children"] or b["live_children"] or kids:
            entry["own_s"], entry["children_s"] = round(own, 3), round(kids, 3)
        procs[name] = entry
    mine = (after.bench_children - before.bench_children) / TICK
    procs[bench_children] = {"cpu_s": round(mine, 3), "cpu_s_per_1000": round(mine * per_k, 4)}
    total = sum(p["cpu_s"] for p in procs.values())
    machine = (after.machine - before.machine) / TICK
    return {
        "seconds": round(after.at - before.at, 3),
        "processes": procs,
        "total_cpu_s": round(total, 3),
        "total_cpu_s_per_1000": round(total * per_k, 4),
        "machine_busy_cpu_s": round(machine, 3),
        "machine_busy_cpu_s_per_1000": round(machine * per_k, 4),
        **({"restarted": sorted(restarted)} if restarted else {}),
    }


def sum_of(result: dict, names, *, exclude: bool = False) -> float:
    """CPU seconds per 1,000 requests of the named processes (or of all but them)."""
    names = set(names)
    return round(sum(p["cpu_s_per_1000"] for n, p in result["processes"].items()
                     if (n in names) != exclude), 4)


class Meter:
    """``with Meter(run_dir) as m: ...`` then ``m.result(requests)``: the stack's CPU over the block."""

    def __init__(self, run_dir: Path, *, bench_children: str = "bench_children", proc: Path = Path("/proc")):
        self.run_dir, self.proc, self.label = Path(run_dir), proc, bench_children
        self.before = self.after = None

    def __enter__(self) -> Meter:
        self.named = stack_pids(self.run_dir)
        self.before = read(self.named, self.proc)
        return self

    def __exit__(self, *exc) -> None:
        self.after = read(self.named, self.proc)

    def result(self, requests: int) -> dict:
        return difference(self.before, self.after, requests, bench_children=self.label)


def vm_hwm_mb(pid: int, proc: Path = Path("/proc")) -> float | None:
    """``VmHWM`` of a process in MB (its peak resident set), or None when it is gone."""
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_memory(run_dir: Path, proc: Path = Path("/proc")) -> dict:
    """NAME -> {pid, peak_rss_mb, children_peak_rss_mb} for every stack process and its live
    descendants (Celery pool processes, Postgres backends)."""
    named = stack_pids(run_dir)
    stats = all_stats(proc)
    roots = frozenset(named.values())
    out: dict = {}
    for name, pid in named.items():
        hwm = vm_hwm_mb(pid, proc)
        if hwm is None:
            continue
        entry = {"pid": pid, "peak_rss_mb": round(hwm, 1)}
        kids = [vm_hwm_mb(k, proc) for k in descendants(pid, stats, roots)]
        kids = [round(v, 1) for v in kids if v is not None]
        if kids:
            entry["children_peak_rss_mb"] = kids
        out[name] = entry
    return out
