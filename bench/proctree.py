"""Processes from /proc (Linux), for the bench scripts and the tests that measure a command: each
process's parent, name, command line and CPU seconds, a process's tree (Ray's daemons and workers
are the descendants of the command that started Ray), and the tree's memory.

    from proctree import read_stats, tree, tree_cpu_s, tree_memory_kb

The scripts import it by name (their folder is first on sys.path when run as `python bench/x.py`);
code that loads a script by path puts bench/ on sys.path first (see bench/cost.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    """One process, from /proc/PID/stat."""

    pid: int
    name: str
    ppid: int
    cpu_s: float  # user + system CPU seconds so far
    reaped_children_cpu_s: float  # of its children that exited and were waited for


def read_stats() -> dict[int, ProcStat]:
    """Every process alive now, by pid (one that ends while being read is left out)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The name is in parentheses and may hold spaces or ')': the fields follow the last ')'.
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is stat's field 3 (state)
        out[int(entry)] = ProcStat(int(entry), name, int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK,
                                   (int(fields[13]) + int(fields[14])) / TICK)
    return out


def cmdline(pid: int) -> str:
    """The command line of `pid`, or "" (a kernel thread, or ended)."""
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ").strip()
    except OSError:
        return ""


def tree(pid: int, stats: dict[int, ProcStat] | None = None) -> list[int]:
    """`pid` and every process under it (children of children ...), `pid` first."""
    stats = read_stats() if stats is None else stats
    children: dict[int, list[int]] = {}
    for p in stats.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of `pid` (default: this process) and all its descendants, those
    that already exited and were reaped included (they count in their parent's)."""
    stats = read_stats()
    return sum(stats[p].cpu_s + stats[p].reaped_children_cpu_s for p in tree(pid or os.getpid(), stats)
               if p in stats)


def tree_memory_kb(pid: int) -> tuple[int, int, int]:
    """(sum of RSS, sum of PSS, number of processes) over the tree of `pid`, in KiB. PSS divides
    pages shared between processes (Ray's object store, the libraries every worker maps) among them."""
    rss = pss = n = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
            n += 1
        except OSError:  # exited meanwhile, or a kernel thread
            continue
    return rss, pss, n
