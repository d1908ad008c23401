"""CPU seconds of process trees, from /proc (Linux), for benchmarks: where a run's CPU time goes.

A tree's time is, over its live processes, user + system time plus the time of the children each
has waited for (cutime, cstime): a child that ended is counted once, in the parent that reaped it.
Take a snapshot before and after the run; `spent(before, after)` gives each tree's seconds between.
"""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of the process and its reaped children)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()      # after "pid (comm) "; comm may hold spaces
    # state ppid ... utime(14) stime(15) cutime(16) cstime(17), numbered from 1 with pid and comm
    return int(fields[1]), sum(int(f) for f in fields[11:15]) / TICK


def processes() -> dict[int, tuple[int, float]]:
    """Every process now: pid → (parent pid, CPU seconds with its reaped children)."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                out[int(entry.name)] = st
    return out


def tree_seconds(roots: list[int], procs: dict[int, tuple[int, float]] | None = None) -> float:
    """CPU seconds of the processes `roots` and all their descendants (live, and reaped by one of them)."""
    procs = processes() if procs is None else procs
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    seen, todo, total = set(), [r for r in roots if r in procs], 0.0
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += procs[pid][1]
        todo += children.get(pid, [])
    return total


def machine_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores: /proc/stat, not idle nor iowait)."""
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in cpu[:8])
    return (user + nice + system + irq + softirq + steal) / TICK


def snapshot(components: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far per component (name → root pids), and `machine` for the whole machine."""
    procs = processes()
    out = {name: tree_seconds(pids, procs) for name, pids in components.items()}
    out["machine"] = machine_seconds()
    return out


def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Seconds per component between two snapshots (a component absent before counts from 0)."""
    return {k: max(0.0, v - before.get(k, 0.0)) for k, v in after.items()}
