"""What a command costs: wall time and the peak memory of its whole process tree (Ray's daemons
and workers included), and for a `seld train` run the overheads read back from its run folder.

    python bench/cost.py [--run RUN] [--json OUT.json] -- seld train STORE --preset local --out RUN
    python bench/cost.py -- python studies/sweep.py --preset smoke --out /tmp/sweep

Memory is sampled every --interval seconds from /proc (Linux): the sum of RSS over the command and
all its descendants, and the sum of PSS (proportional set size: pages shared between processes,
such as Ray's shared-memory object store and the torch libraries every worker maps, are divided
among them instead of counted once per process). PSS is the honest "how much RAM does this take";
RSS overcounts shared pages. Ray processes started by the command (GCS, raylet, dashboard, workers)
are its descendants, so they are included; a Ray cluster started elsewhere is not.

With --run (a `seld train` run folder) it also reports, from RUN/metrics.json and RUN/metrics.csv:
Ray start-up, trainer/worker start, data loading, per-epoch overhead (validation, checkpoint and
report: epoch wall time minus its training-step time), final scoring, and the data-wait fraction.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/proctree.py, also when loaded by path
from proctree import tree_memory_kb  # noqa: E402


def shm_used_kb(path: str = "/dev/shm") -> int:
    """KiB in use on the shared-memory filesystem (Ray's object store lives there on Linux)."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize // 1024


def run_measured(cmd: list[str], interval: float = 1.0, **popen) -> dict:
    """Run `cmd` to completion; returns wall time, exit code, peak tree RSS/PSS (GiB), the peak
    growth of /dev/shm (Ray's object store: its pages count in PSS only while a process maps them)
    and the peak of PSS + that growth sampled together (an upper bound of the RAM the command
    holds: mapped object-store pages count twice in it)."""
    t0 = time.time()
    shm0 = shm_used_kb()
    proc = subprocess.Popen(cmd, **popen)
    peak = {"rss": 0, "pss": 0, "procs": 0, "shm": 0, "pss_shm": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss, pss, n = tree_memory_kb(proc.pid)
            shm = max(0, shm_used_kb() - shm0)
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            peak["procs"] = max(peak["procs"], n)
            peak["shm"], peak["pss_shm"] = max(peak["shm"], shm), max(peak["pss_shm"], pss + shm)
            stop.wait(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    stop.set()
    th.join()
    return {"rc": rc, "wall_s": round(time.time() - t0, 1), "peak_rss_gib": round(peak["rss"] / 2**20, 2),
            "peak_pss_gib": round(peak["pss"] / 2**20, 2), "peak_shm_gib": round(peak["shm"] / 2**20, 2),
            "peak_pss_plus_shm_gib": round(peak["pss_shm"] / 2**20, 2), "peak_procs": peak["procs"]}


def run_overheads(run: Path) -> dict:
    """Ray start-up, set-up, per-epoch overhead, final scoring and data wait of a finished run."""
    m = json.loads((run / "metrics.json").read_text())
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    prev, over, train = 0.0, [], []
    for r in rows:
        el, tr = float(r["elapsed_s"]), float(r["train/time_s"])
        over.append(el - prev - tr)
        train.append(tr)
        prev = el
    out = {k: m.get(f"cost/{k}") for k in ("ray_start_s", "trainer_start_s", "data_ready_s", "finish_s",
                                             "train_loop_s", "wall_s", "data_wait_frac",
                                             "train_clips_per_s", "epochs")}
    # Epoch 0's elapsed time also holds data loading and normalisation; keep it out of the mean.
    steady = over[1:] or over
    out["epoch_overhead_s"] = round(sum(steady) / len(steady), 2) if steady else None
    out["epoch_train_s"] = round(sum(train) / len(train), 2) if train else None
    out["test_f20"] = m.get("test/f20")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a seld train run folder the command writes")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    ap.add_argument("--interval", type=float, default=1.0, help="memory sampling period, s")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command")
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the command after --")
    res = {"cmd": " ".join(cmd), **run_measured(cmd, args.interval)}
    if args.run is not None and res["rc"] == 0:
        res.update(run_overheads(args.run))
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return int(res["rc"] != 0)


if __name__ == "__main__":
    sys.exit(main())
