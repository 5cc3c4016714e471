"""Sweep efficiency: Optuna + ASHA (studies/sweep.py's machinery) against the full grid over the
same space, on the same data, all through Ray Tune.

    python bench/sweep_efficiency.py --out DIR [--preset local] [--cache results/ablation/_work]
        [--trials 4] [--grace 6] [--sampler tpe] [--replay-seeds 20] [--curves CSV]
        [--only grid|sweep|replay|report]

Three arms, each resumable (DIR keeps them):
- grid: every point of the finite space below trained to the end of the schedule (the reference);
  what each run reported to Tune (`val/f20` per epoch, then the final report) goes to
  DIR/grid_curves.csv.
- sweep: one real sweep (`run_sweep`, sampler seed 0) with --trials/--grace/--sampler; its trials
  go to DIR/real_sweep.csv.
- replay: the same searcher and scheduler (`sweep_searcher`, `sweep_scheduler`: real Optuna, real
  ASHA, real Tune) over a trainable that reports the recorded `val/f20` of grid_curves.csv instead
  of training: a tabular benchmark. It is exact because CPU training is deterministic (a config
  trained for k epochs reports the first k values of its full run, to the last digit), so one sweep
  costs seconds, and the result is a distribution over --replay-seeds sampler seeds rather than one
  draw (DIR/replay.csv). The real sweep checks it: the replay of seed 0 must give the real sweep's
  trials (same points, same epochs, same values); the script says whether it does.
`--only report` runs no arm and prints the tables from what DIR holds; `--curves` replays from
another grid_curves.csv (results/sweep_efficiency/ holds the committed one).

The space is finite so that "the best of the full grid" is well defined. Stage 1 only by default
(`--set train.stages=stage1`): the sweep ranks configs; the stage-2 fine-tuning of the winner comes
after. Compared: the best validation F20 found (`val/f20`, the metric both optimise) and the
trial-epochs trained (the cost). Goal (issue #8): within 1 point of the grid's best at a third of
the grid's trial-epochs or less. Prints markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from seld.config import parse_set_args, preset_config
from seld.runfolder import METRICS_CSV, METRICS_JSON
from seld.study import (
    REPEAT_ATTR,
    Options,
    Param,
    Study,
    Sweep,
    Variant,
    match_run,
    optuna_storage,
    point_key,
    run_study,
    run_sweep,
    sweep_scheduler,
    sweep_searcher,
    tune_space,
)

SPACE = {
    "model.n_conformer_layers": Param("choice", choices=(0, 2, 4)),
    "loss.beta": Param("choice", choices=(0.25, 1.0, 4.0)),
}
GOAL_GAP, GOAL_RATIO = 1.0, 1 / 3
# Replayed settings: (sampler, grace, trials). The first is the stop-10 real sweep's (grace 3).
REPLAY_SETTINGS = [("tpe", 3, 6), ("tpe", 6, 4), ("tpe", 6, 5), ("tpe", 6, 6),
                   ("random", 6, 4), ("random", 6, 5), ("random", 6, 6)]


def grid_variants(space: dict[str, Param]) -> list[Variant]:
    keys = sorted(space)
    combos = itertools.product(*(space[k].grid() for k in keys))
    return [Variant("grid-" + "-".join(f"{k.split('.')[-1]}{v}" for k, v in zip(keys, c, strict=True)),
                    dict(zip(keys, c, strict=True))) for c in combos]


# --- The replay (tabular) arm ----------------------------------------------------------------------
CURVE_COLUMNS = (*SPACE, "iteration", "val/f20", "final")


def export_curves(grid_dir: Path) -> pd.DataFrame:
    """What every grid run reported to Tune, in order: one row per epoch (metrics.csv's `val/f20`)
    and the final report (metrics.json's `val/f20`, `final` = 1); `iteration` = Tune's
    training_iteration. Columns CURVE_COLUMNS."""
    runs = {d.name: d for d in sorted((grid_dir / "runs").iterdir()) if (d / METRICS_JSON).exists()}
    out = []
    for combo in itertools.product(*(SPACE[k].choices for k in SPACE)):
        params = dict(zip(SPACE, combo, strict=True))
        run = match_run(runs, params)
        if run is None:
            raise SystemExit(f"{grid_dir}: no finished grid run for {params}; run the grid arm first")
        f20 = pd.read_csv(run / METRICS_CSV)["val/f20"].tolist()
        f20.append(json.loads((run / METRICS_JSON).read_text())["val/f20"])
        out += [{**params, "iteration": i + 1, "val/f20": v, "final": int(i == len(f20) - 1)}
                for i, v in enumerate(f20)]
    return pd.DataFrame(out, columns=list(CURVE_COLUMNS))


def load_curves(path: Path) -> dict[tuple, list[dict]]:
    """Per grid point (`point_key` of its parameters): the reports of its run, in order."""
    df = pd.read_csv(path)
    missing = [c for c in CURVE_COLUMNS if c not in df.columns]
    if missing:
        raise SystemExit(f"{path}: missing columns {missing} (expected {list(CURVE_COLUMNS)})")
    curves = {}
    for combo, rows in df.sort_values("iteration").groupby(list(SPACE), sort=False):
        params = {k: SPACE[k].choices[list(SPACE[k].choices).index(v)] for k, v in zip(SPACE, combo, strict=True)}
        curves[point_key(params)] = [{"val/f20": float(v)} for v in rows["val/f20"]]
    if len(curves) != math.prod(len(p.choices) for p in SPACE.values()):
        raise SystemExit(f"{path}: {len(curves)} grid points, expected every point of {SPACE}")
    return curves


def _replay_trainable(config: dict, curves: dict) -> None:
    from ray import tune

    for row in curves[point_key({k: config[k] for k in SPACE})]:
        tune.report(row)


def replay(sweep: Sweep, curves: dict, max_t: int, workdir: Path) -> list[dict]:
    """One sweep over the recorded curves; per trial (in order): params, epochs, value."""
    import optuna
    from ray import tune

    workdir.mkdir(parents=True, exist_ok=True)
    storage = optuna_storage(workdir / "optuna.journal")
    tuner = tune.Tuner(
        tune.with_parameters(_replay_trainable, curves=curves),
        param_space=tune_space(sweep.space),
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, num_samples=sweep.n_trials,
                                    search_alg=sweep_searcher(sweep, storage),
                                    scheduler=sweep_scheduler(sweep, max_t), max_concurrent_trials=1,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name="replay", storage_path=str(workdir / "ray"), verbose=0),
    )
    results = tuner.fit()
    # Epochs each trial trained: its last Tune iteration (the final report is one past the last
    # epoch). Points are distinct (the searcher never repeats one), so they identify the trials.
    iterations = {point_key({k: r.config[k] for k in SPACE}): int(r.metrics["training_iteration"])
                  for r in results}
    study = optuna.load_study(study_name=sweep.name, storage=storage)
    out = []
    for t in study.trials:
        if t.user_attrs.get(REPEAT_ATTR) is not None or t.state != optuna.trial.TrialState.COMPLETE:
            continue
        params = {k: t.params[k] for k in SPACE}
        out.append({"params": params, "value": float(t.value),
                    "epochs": min(iterations[point_key(params)], max_t)})
    return out


def summarise(trials: list[dict], grid_best: float, grid_epochs: int) -> dict:
    best = max(trials, key=lambda t: t["value"])
    epochs = sum(t["epochs"] for t in trials)
    gap = grid_best - best["value"]
    return {"best_value": round(best["value"], 4), "best": json.dumps(best["params"], sort_keys=True),
            "trial_epochs": epochs, "epoch_ratio": round(epochs / grid_epochs, 4), "gap": round(gap, 4),
            "met": bool(gap <= GOAL_GAP and epochs <= GOAL_RATIO * grid_epochs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="local")
    ap.add_argument("--trials", type=int, default=4, help="real sweep: trials (the grid has 9 points)")
    ap.add_argument("--grace", type=int, default=6, help="real sweep: ASHA grace period, epochs")
    ap.add_argument("--sampler", default="tpe", choices=("tpe", "random"), help="real sweep: sampler")
    ap.add_argument("--replay-seeds", type=int, default=20, help="sampler seeds per replayed setting")
    ap.add_argument("--cache", type=Path, default=None, help="folder holding synth-<hash>/store-<hash>")
    ap.add_argument("--curves", type=Path, default=None,
                    help="replay from this grid_curves.csv (default: DIR/grid_curves.csv, written from the grid arm)")
    ap.add_argument("--set", dest="sets", action="append", default=["train.stages=stage1"])
    ap.add_argument("--only", choices=("grid", "sweep", "replay", "report"),
                    help="run one arm only, or none (report: the tables from what DIR holds)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sets = parse_set_args(args.sets)
    out = args.out.resolve()
    gdir, sdir = out / "grid", out / "sweep"
    real = Sweep("efficiency", args.preset, SPACE, n_trials=args.trials, seed=0, grace_period=args.grace,
                 sampler=args.sampler)
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    if args.only in (None, "grid"):
        study = Study("grid", args.preset, tuple(grid_variants(SPACE)), seeds=(0,), tables=())
        t0 = time.time()
        run_study(study, Options(out=gdir, preset=args.preset, sets=sets, cache_dir=args.cache,
                                 resume=gdir.exists(), max_retries=0))
        timings["grid_wall_s"] = round(time.time() - t0)
    if args.only in (None, "sweep"):
        t0 = time.time()
        run_sweep(real, Options(out=sdir, preset=args.preset, sets=sets, cache_dir=args.cache,
                                resume=sdir.exists(), max_retries=0, concurrency=1))
        timings["sweep_wall_s"] = round(time.time() - t0)
    out.mkdir(parents=True, exist_ok=True)
    (out / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    # The grid as the replay sees it: its runs' reports (refreshed from the runs when present).
    curves_path = args.curves or out / "grid_curves.csv"
    if (gdir / "summary.csv").exists() and args.curves is None:
        export_curves(gdir).to_csv(curves_path, index=False)
    if not curves_path.exists():
        print(json.dumps(timings))
        return 0
    cdf = pd.read_csv(curves_path)
    finals = cdf[cdf["final"] == 1].reset_index(drop=True)
    g_best = finals.loc[finals["val/f20"].idxmax()]
    g_value, g_epochs = float(g_best["val/f20"]), int((cdf["final"] == 0).sum())
    g_name = ", ".join(f"{k}={g_best[k]}" for k in SPACE)
    cfg = preset_config(args.preset, sets)
    max_t = cfg.train.max_epochs
    print(f"full grid: {len(finals)} points, {g_epochs} trial-epochs, best val F20 {g_value:.2f} "
          f"({g_name}); goal: >= {g_value - GOAL_GAP:.2f} at <= {GOAL_RATIO * g_epochs:.0f} trial-epochs\n")

    res: dict = {"grid_points": len(finals), "grid_best_val_f20": g_value, "grid_best": g_name,
                 "grid_trial_epochs": g_epochs, **timings}
    # The real sweep's trials, compactly (kept next to the replay so the check can be redone).
    if (sdir / "trials.csv").exists():
        t = pd.read_csv(sdir / "trials.csv", dtype={"trial_id": str})
        t.rename(columns={f"param/{k}": k for k in SPACE})[["number", *SPACE, "status", "epochs", "value"]].to_csv(
            out / "real_sweep.csv", index=False)
    if (out / "real_sweep.csv").exists():
        t = pd.read_csv(out / "real_sweep.csv")
        real_trials = [{"params": {k: t.loc[i, k].item() for k in SPACE}, "value": float(t.loc[i, "value"]),
                        "epochs": int(t.loc[i, "epochs"])} for i in t.index]
        res["sweep"] = {"sampler": real.sampler, "grace": real.grace_period, "trials": real.n_trials,
                        **summarise(real_trials, g_value, g_epochs)}
    if args.only in (None, "replay"):
        import ray

        from seld.study.session import init_ray

        init_ray(num_cpus=2, include_dashboard=False)
        curves = load_curves(curves_path)
        rows = []
        for sampler, grace, n in REPLAY_SETTINGS:
            for seed in range(args.replay_seeds):
                sweep = Sweep(f"replay-{sampler}-g{grace}-n{n}-s{seed}", args.preset, SPACE, n_trials=n,
                              seed=seed, grace_period=grace, sampler=sampler)
                trials = replay(sweep, curves, max_t, out / "_work" / "replay" / sweep.name)
                rows.append({"sampler": sampler, "grace": grace, "trials": n, "seed": seed,
                             **summarise(trials, g_value, g_epochs), "sequence": json.dumps(trials)})
        ray.shutdown()
        pd.DataFrame(rows).to_csv(out / "replay.csv", index=False)
    if (out / "replay.csv").exists():
        rep = pd.read_csv(out / "replay.csv")
        print(f"replay over {rep['seed'].nunique()} sampler seeds per setting (real Tune + Optuna + ASHA on the grid's recorded curves)\n")
        print("| sampler | ASHA grace | trials | goal met | median gap (points) | median trial-epochs | worst gap |")
        print("|---|---|---|---|---|---|---|")
        summary = []
        for (sampler, grace, n), g in rep.groupby(["sampler", "grace", "trials"], sort=False):
            summary.append({"sampler": sampler, "grace": int(grace), "trials": int(n), "met": int(g["met"].sum()),
                            "seeds": len(g), "median_gap": float(g["gap"].median()),
                            "median_epochs": float(g["trial_epochs"].median()), "worst_gap": float(g["gap"].max())})
            s = summary[-1]
            print(f"| {sampler} | {grace} | {n} | {s['met']}/{s['seeds']} | {s['median_gap']:.2f} | "
                  f"{s['median_epochs']:.0f} ({100 * s['median_epochs'] / g_epochs:.0f} %) | {s['worst_gap']:.2f} |")
        res["replay"] = summary
        if "sweep" in res:  # the real sweep against its own replay (seed 0, same setting)
            mine = rep[(rep["sampler"] == real.sampler) & (rep["grace"] == real.grace_period)
                       & (rep["trials"] == real.n_trials) & (rep["seed"] == 0)]
            if len(mine):
                seq = json.loads(mine["sequence"].iloc[0])
                same = len(seq) == len(real_trials) and all(
                    a["epochs"] == b["epochs"] and np.isclose(a["value"], b["value"])
                    and {k: float(v) for k, v in a["params"].items()} == {k: float(v) for k, v in b["params"].items()}
                    for a, b in zip(seq, real_trials, strict=False))
                res["replay_reproduces_sweep"] = bool(same)
    if "sweep" in res:
        s = res["sweep"]
        print(f"\nreal sweep ({s['sampler']}, grace {s['grace']}, {s['trials']} trials, seed 0): best val F20 "
              f"{s['best_value']:.2f} ({s['best']}), {s['trial_epochs']} trial-epochs "
              f"({100 * s['epoch_ratio']:.0f} %), gap {s['gap']:+.2f}, goal {'met' if s['met'] else 'not met'}")
        if "replay_reproduces_sweep" in res:
            print(f"replay of seed 0 reproduces the real sweep trial for trial: {res['replay_reproduces_sweep']}")
    (out / "efficiency.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
