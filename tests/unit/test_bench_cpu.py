"""bench/cpu.py on a synthetic /proc tree: per-process CPU across processes that come and go."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_cpu", ROOT / "bench" / "cpu.py")
cpu = importlib.util.module_from_spec(_spec)
sys.modules["bench_cpu"] = cpu   # dataclasses look their module up
_spec.loader.exec_module(cpu)


class FakeProc:
    """A /proc with ``stat`` files the kernel's way: ``pid (comm) state ppid ... utime stime cutime cstime``."""

    def __init__(self, root: Path):
        self.root = root
        self.busy = [0] * 10

    def set(self, pid: int, ppid: int, utime: int, stime: int = 0, cutime: int = 0, cstime: int = 0,
            comm: str = "python") -> None:
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        # fields 4..13 are ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt
        rest = [ppid, pid, pid, 0, -1, 0, 0, 0, 0, 0, utime, stime, cutime, cstime, 20, 0, 1, 0]
        (d / "stat").write_text(f"{pid} ({comm}) S " + " ".join(map(str, rest)) + "\n")

    def gone(self, pid: int) -> None:
        for f in (self.root / str(pid)).iterdir():
            f.unlink()
        (self.root / str(pid)).rmdir()

    def machine(self, user: int, system: int, idle: int, iowait: int = 0) -> None:
        (self.root / "stat").write_text(
            f"cpu  {user} 0 {system} {idle} {iowait} 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")


@pytest.fixture()
def proc(tmp_path):
    p = FakeProc(tmp_path / "proc")
    p.root.mkdir()
    (p.root / "self").mkdir()   # not a pid: skipped
    p.machine(100, 50, 1000)
    return p


def test_the_command_name_may_hold_spaces_and_parentheses(proc):
    proc.set(7, 1, utime=30, stime=12, cutime=5, cstime=1, comm="postgres: llmbatch (idle) x")
    s = cpu.read_stat(7, proc.root)
    assert (s.ppid, s.own, s.reaped) == (1, 42, 6)


def test_a_tree_counts_its_children_and_what_they_reaped_across_churn(proc):
    T = cpu.TICK
    proc.set(1, 0, utime=0)                       # supervisord
    proc.set(100, 1, utime=10 * T)                # postmaster
    proc.set(101, 100, utime=4 * T)               # a backend that will disconnect
    proc.set(102, 100, utime=2 * T)               # a backend that stays
    proc.set(200, 1, utime=3 * T)                 # the worker's parent
    proc.set(201, 200, utime=1 * T)               # a pool process
    proc.set(900, 50, utime=1 * T, cutime=0)      # the bench
    named = {"supervisord": 1, "postgres": 100, "worker-peak": 200}
    before = cpu.read(named, proc.root, self_pid=900)

    # 101 ran 6 s more, then the postmaster reaped it (all of its 10 s now in the postmaster's cutime);
    # 103 was born, ran 3 s and is alive; 102 ran 1 s more; the postmaster itself 0.5 s
    proc.gone(101)
    proc.set(100, 1, utime=int(10.5 * T), cutime=10 * T)
    proc.set(102, 100, utime=3 * T)
    proc.set(103, 100, utime=3 * T)
    # the pool process was recycled: 201 (ran 1 s more, reaped), 202 new with 2 s
    proc.gone(201)
    proc.set(200, 1, utime=3 * T, cutime=2 * T)
    proc.set(202, 200, utime=2 * T)
    # the bench reaped its submit child: 7 s
    proc.set(900, 50, utime=1 * T, cutime=5 * T, cstime=2 * T)
    proc.machine(100 + 30 * T, 50, 2000)
    after = cpu.read(named, proc.root, self_pid=900)

    r = cpu.difference(before, after, requests=2000, bench_children="submit")
    pg = r["processes"]["postgres"]
    assert pg["own_s"] == pytest.approx(0.5)
    assert pg["children_s"] == pytest.approx(6 + 1 + 3)
    w = r["processes"]["worker-peak"]
    assert (w["own_s"], w["children_s"]) == (pytest.approx(0), pytest.approx(1 + 2))
    assert r["processes"]["submit"]["cpu_s"] == pytest.approx(7)
    # supervisord's tree stops at the processes with pid files of their own
    assert r["processes"]["supervisord"]["cpu_s"] == 0
    assert r["total_cpu_s"] == pytest.approx(10.5 + 3 + 7)
    assert r["total_cpu_s_per_1000"] == pytest.approx(20.5 / 2)
    assert r["machine_busy_cpu_s"] == pytest.approx(30)
    assert cpu.sum_of(r, ["submit"]) == pytest.approx(3.5)
    assert cpu.sum_of(r, ["submit"], exclude=True) == pytest.approx(6.75)


def test_a_restarted_process_is_named_not_counted(proc):
    T = cpu.TICK
    proc.set(300, 1, utime=5 * T)
    before = cpu.read({"batcher": 300}, proc.root, self_pid=1)
    proc.gone(300)
    proc.set(301, 1, utime=1 * T)
    after = cpu.read({"batcher": 301}, proc.root, self_pid=1)
    r = cpu.difference(before, after, requests=10)
    assert r["restarted"] == ["batcher"] and "batcher" not in r["processes"]


def test_idle_and_iowait_are_not_busy(proc):
    proc.machine(user=7, system=3, idle=500, iowait=40)
    assert cpu.machine_busy(proc.root) == 10


def pid_files(tmp_path, **pids) -> Path:
    """A stack's run directory with NAME.pid files (an empty value: a broken file)."""
    run = tmp_path / "run"
    run.mkdir()
    for name, pid in pids.items():
        (run / f"{name.replace('_', '-')}.pid").write_text(f"{pid}\n" if pid else "")
    return run


def test_the_meter_reads_the_pid_files(tmp_path, proc):
    run = pid_files(tmp_path, redis=400, broken=None)
    proc.set(400, 1, utime=0)
    with cpu.Meter(run, proc=proc.root) as m:
        proc.set(400, 1, utime=2 * cpu.TICK)
    assert m.result(1000)["processes"]["redis"]["cpu_s_per_1000"] == pytest.approx(2)


def test_peak_memory_reads_each_tree_from_the_pid_files(tmp_path, proc):
    run = pid_files(tmp_path, supervisord=1, worker_peak=200)
    proc.set(1, 0, utime=0)
    proc.set(200, 1, utime=0)
    proc.set(201, 200, utime=0)
    for pid, kb in ((1, 2048), (200, 75 * 1024), (201, 150 * 1024)):
        (proc.root / str(pid) / "status").write_text(f"Name:\tx\nVmPeak:\t999999 kB\nVmHWM:\t{kb} kB\n")
    out = cpu.peak_memory(run, proc.root)
    assert out["worker-peak"] == {"pid": 200, "peak_rss_mb": 75.0, "children_peak_rss_mb": [150.0]}
    assert out["supervisord"] == {"pid": 1, "peak_rss_mb": 2.0}   # its tree stops at worker-peak
