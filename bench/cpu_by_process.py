"""Where the machine's CPU goes while a study runs: CPU time per process over a window, from /proc.

    python bench/cpu_by_process.py [--window 60] [--top 30]

Reads every process's user + system CPU ticks (/proc/PID/stat) at the start and the end of the
window and prints each process's share of one core, largest first, then the shares summed by role:
the Train workers (`ray::RayTrainWorker`), Ray's other actors and daemons, and everything else. Run
it beside a study on an otherwise idle machine (issue 28: what an in-study epoch loses to Ray's own
processes on 2 cores). Linux only.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

from proctree import cmdline, read_stats


def snapshot() -> dict[int, tuple[float, str]]:
    """pid -> (CPU seconds so far, command line or [name])."""
    return {pid: (p.cpu_s, cmdline(pid) or f"[{p.name}]") for pid, p in read_stats().items()}


def role(cmd: str) -> str:
    if cmd.startswith("ray::RayTrainWorker"):
        return "Train workers"
    if cmd.startswith("ray::") or "/ray/" in cmd or "raylet" in cmd or "gcs_server" in cmd:
        return "Ray's other processes (actors, drivers, daemons)"
    if "studies/" in cmd:
        return "the study's driver"
    return "everything else (kernel, shell, this script)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window", type=float, default=60.0, help="seconds to sample (default 60)")
    p.add_argument("--top", type=int, default=30, help="processes to list (default 30)")
    args = p.parse_args(argv)
    before = snapshot()
    t0 = time.monotonic()
    time.sleep(args.window)
    after = snapshot()
    dt = time.monotonic() - t0
    rows = sorted(((after[pid][0] - before[pid][0], pid, after[pid][1]) for pid in after if pid in before),
                  reverse=True)
    total = sum(r[0] for r in rows)
    print(f"window {dt:.1f} s, {os.cpu_count()} CPUs, CPU used {total:.1f} s ({total / dt:.2f} cores)")
    print("| share of a core | pid | process |\n|---|---|---|")
    for cpu, pid, cmd in rows[:args.top]:
        if cpu > 0:
            print(f"| {100 * cpu / dt:.1f} % | {pid} | `{cmd[:90]}` |")
    by_role: dict[str, list[float]] = defaultdict(list)
    for cpu, _, cmd in rows:
        if cpu > 0:
            by_role[role(cmd)].append(cpu)
    print("\n| role | processes | share of a core |\n|---|---|---|")
    for name, cpus in sorted(by_role.items(), key=lambda kv: -sum(kv[1])):
        print(f"| {name} | {len(cpus)} | {100 * sum(cpus) / dt:.1f} % |")


if __name__ == "__main__":
    main()
