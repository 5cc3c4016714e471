"""Sweep efficiency: Optuna TPE + ASHA (studies/sweep.py's machinery) against the full grid over the
same space, on the same data, both through Ray Tune.

    python bench/sweep_efficiency.py --out DIR [--preset local] [--trials 6] [--cache results/ablation/_work]

The space is finite (every dimension a choice) so that "the best of the full grid" is well defined
and the sweep searches exactly the grid's points. Both arms train stage 1 only by default
(`--set train.stages=stage1`): the sweep ranks configs, the stage-2 fine-tuning of the winner comes
after. Compared: the best validation F20 each found (the metric both optimise: `val/f20`, the
selected checkpoint at threshold 0.5), and the trial-epochs each trained (the cost). Both arms resume
(`--resume` is implied when DIR already holds them). Prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import pandas as pd

from seld.config import parse_set_args
from seld.study import Options, Param, Study, Sweep, Variant, run_study, run_sweep

SPACE = {
    "model.n_conformer_layers": Param("choice", choices=(0, 2, 4)),
    "loss.beta": Param("choice", choices=(0.25, 1.0, 4.0)),
}


def grid_variants(space: dict[str, Param]) -> list[Variant]:
    keys = sorted(space)
    combos = itertools.product(*(space[k].grid() for k in keys))
    return [Variant("grid-" + "-".join(f"{k.split('.')[-1]}{v}" for k, v in zip(keys, c, strict=True)),
                    dict(zip(keys, c, strict=True))) for c in combos]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="local")
    ap.add_argument("--trials", type=int, default=6, help="sweep trials (the grid has 9 points)")
    ap.add_argument("--grace", type=int, default=3, help="ASHA grace period, epochs")
    ap.add_argument("--cache", type=Path, default=None, help="folder holding synth-<hash>/store-<hash>")
    ap.add_argument("--set", dest="sets", action="append", default=["train.stages=stage1"])
    ap.add_argument("--only", choices=("grid", "sweep"), help="run one arm only")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sets = parse_set_args(args.sets)
    out = args.out.resolve()
    timings = {}
    if args.only in (None, "grid"):
        study = Study("grid", args.preset, tuple(grid_variants(SPACE)), seeds=(0,), tables=())
        gdir = out / "grid"
        t0 = time.time()
        run_study(study, Options(out=gdir, preset=args.preset, sets=sets, cache_dir=args.cache,
                                 resume=gdir.exists(), max_retries=0))
        timings["grid_wall_s"] = round(time.time() - t0)
    if args.only in (None, "sweep"):
        sweep = Sweep("efficiency", args.preset, SPACE, n_trials=args.trials, seed=0, grace_period=args.grace)
        sdir = out / "sweep"
        t0 = time.time()
        run_sweep(sweep, Options(out=sdir, preset=args.preset, sets=sets, cache_dir=args.cache,
                                 resume=sdir.exists(), max_retries=0, concurrency=1))
        timings["sweep_wall_s"] = round(time.time() - t0)
    if not ((out / "grid" / "summary.csv").exists() and (out / "sweep" / "trials.csv").exists()):
        print(json.dumps(timings))
        return 0
    grid = pd.read_csv(out / "grid" / "summary.csv")
    trials = pd.read_csv(out / "sweep" / "trials.csv")
    g_best = grid.loc[grid["val/f20"].idxmax()]
    s_best = trials.loc[trials["value"].idxmax()]
    g_epochs = int(grid["cost/epochs"].sum())
    s_epochs = int(trials["epochs"].sum())
    res = {"grid_points": len(grid), "grid_best_val_f20": float(g_best["val/f20"]),
           "grid_best": g_best["variant"], "grid_trial_epochs": g_epochs,
           "sweep_trials": len(trials), "sweep_best_val_f20": float(s_best["value"]),
           "sweep_best": {k.removeprefix("param/"): s_best[k] for k in trials.columns if k.startswith("param/")},
           "sweep_trial_epochs": s_epochs, "epoch_ratio": round(s_epochs / max(g_epochs, 1), 3),
           "gap_points": round(float(g_best["val/f20"] - s_best["value"]), 2), **timings}
    (out / "efficiency.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    print("| arm | trials | trial-epochs | best val F20 % | best config |")
    print("|---|---|---|---|---|")
    print(f"| full grid | {res['grid_points']} | {g_epochs} | {res['grid_best_val_f20']:.2f} | {res['grid_best']} |")
    print(f"| Optuna TPE + ASHA | {res['sweep_trials']} | {s_epochs} ({100 * res['epoch_ratio']:.0f} %) | "
          f"{res['sweep_best_val_f20']:.2f} | {res['sweep_best']} |")
    print(f"\ngap {res['gap_points']:+.2f} points at {100 * res['epoch_ratio']:.0f} % of the grid's trial-epochs")
    for name in ("grid", "sweep"):
        print(f"per-run rows: {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
