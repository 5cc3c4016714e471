"""Where an in-study epoch's time goes, against the bare step measured in the same invocation.

    python bench/epoch_profile.py STUDY_DIR STORE [--batches 30] [--concurrent N] [--skip-bare]

For every run folder of a study (`STUDY_DIR/runs/*`), its stage-1 epochs from metrics.csv, split
into training steps (`train/time_s`, data waits included; `train/data_wait_frac` of it waiting),
validation (`val/time_s`: the pass and the selection's model file) and the rest of the epoch
(elapsed minus both: the resume checkpoint, Ray Train's report, metrics.csv), averaged over the
stage-1 epochs after the first (epoch 0 also holds data loading and the normalisation). Then, per
variant, the bare figures of the same model, precision and torch threads in one process with
nothing else of the study (`bench/step_profile.py --val`: the worker's own train step on the
store's rows, and one validation pass), run back to back in this invocation, and the ratio

    in-study epoch / (batches per epoch x bare mean ms per step + bare validation pass)

which issue 28 asks to bring within 1.25. The bare figures are measured with nothing else running:
run this on an idle machine (a study running beside it slows the bare steps, which flatters the
ratio). `--concurrent N` runs N bare processes at once and averages them, as a study runs N runs at
once on this machine (they share caches and memory bandwidth): the reference for the study's own
concurrency. Prints one JSON line per variant and a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def in_study(run: Path) -> dict:
    """Stage-1 epoch breakdown of one run folder (seconds, means over epochs 1..)."""
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f)]
    prev = 0.0
    parts = []
    for r in rows:
        el = float(r["elapsed_s"])
        if r["stage"] == "1" and r["epoch"] != "0":
            train = float(r["train/time_s"])
            val = float(r["val/time_s"]) if r.get("val/time_s") not in (None, "") else float("nan")
            parts.append({"epoch_s": el - prev, "train_s": train, "wait_s": train * float(r["train/data_wait_frac"]),
                          "val_s": val, "other_s": el - prev - train - val, "clips": int(r["train/clips"])})
        prev = el
    if not parts:
        raise SystemExit(f"{run}/metrics.csv: no stage-1 epoch after the first")
    mean = {k: statistics.fmean(p[k] for p in parts) for k in parts[0]}
    cfg = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    return {**mean, "epochs": len(parts), "model": cfg["model"]["name"], "threads": cfg["train"]["torch_threads"],
            "batch_size": cfg["train"]["batch_size"], "precision": metrics.get("precision", "float32"),
            "trainer_start_s": metrics.get("cost/trainer_start_s"), "finish_s": metrics.get("cost/finish_s")}


def bare(store: Path, model: str, threads: int, precision: str, batches: int, concurrent: int = 1) -> dict:
    cmd = [sys.executable, str(HERE / "step_profile.py"), str(store), "--preset", "local", "--threads",
           str(max(1, threads)), "--precision", precision, "--batches", str(batches), "--val"]
    if model != "stereo_rcnet":
        cmd.append("--baseline")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(concurrent)]
    arms = []
    for p in procs:
        stdout, _ = p.communicate(timeout=1800)
        if p.returncode:
            raise SystemExit(f"{' '.join(cmd)}: exit {p.returncode}")
        arms.append(json.loads(stdout.strip().splitlines()[-1])[precision])
    # An epoch is the sum of its steps, so the reference is the mean step (slow steps included), not
    # the median.
    return {"ms_per_step": statistics.fmean(a["ms_per_batch_mean"] for a in arms),
            "val_s": statistics.fmean(a["val_s"] for a in arms)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", type=Path)
    ap.add_argument("store", type=Path)
    ap.add_argument("--batches", type=int, default=30, help="bare steps timed per variant")
    ap.add_argument("--concurrent", type=int, default=1, help="bare processes at once (the study's runs at once)")
    ap.add_argument("--skip-bare", action="store_true", help="the in-study breakdown only")
    args = ap.parse_args()
    by_variant: dict[tuple, list[dict]] = defaultdict(list)
    for run in sorted((args.study / "runs").glob("*")):
        if (run / "metrics.json").exists():
            r = in_study(run)
            by_variant[(run.name.split("-s")[0], r["model"], r["threads"], r["precision"])].append(r)
    lines = ["| variant | precision | threads | in-study epoch (s) | steps | of which data wait | validation | rest "
             "| bare steps | bare validation | ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (variant, model, threads, precision), runs in by_variant.items():
        m = {k: statistics.fmean(r[k] for r in runs) for k in ("epoch_s", "train_s", "wait_s", "val_s", "other_s", "clips")}
        res = {"variant": variant, "precision": precision, "threads": threads, "runs": len(runs), **{k: round(v, 2) for k, v in m.items()}}
        if not args.skip_bare:
            b = bare(args.store, model, threads, precision, args.batches, args.concurrent)
            steps = m["clips"] / runs[0]["batch_size"]
            res.update(bare_steps_s=round(steps * b["ms_per_step"] / 1000, 2), bare_val_s=round(b["val_s"], 2),
                       bare_concurrent=args.concurrent)
            res["ratio"] = round(m["epoch_s"] / (res["bare_steps_s"] + res["bare_val_s"]), 3)
        print(json.dumps(res))
        lines.append(f"| {variant} | {precision} | {threads} | {m['epoch_s']:.1f} | {m['train_s']:.1f} | {m['wait_s']:.2f} "
                     f"| {m['val_s']:.2f} | {m['other_s']:.2f} | {res.get('bare_steps_s', '')} | {res.get('bare_val_s', '')} "
                     f"| {res.get('ratio', '')} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
