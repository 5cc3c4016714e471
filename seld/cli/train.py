"""`seld train STORE --preset ... --out RUN`: two-stage training with Ray Train."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from seld.config import PRESETS, ExperimentConfig, baseline_overrides, parse_set_args, preset_config

NAME = "train"
HELP = "two-stage training (Ray Train) from a feature store into a run folder"
EXAMPLE = """examples:
  seld train store --preset smoke --out runs/smoke
  seld train store --preset local --out runs/local --set train.stage1.epochs=8 --workers 2
  seld train store --preset local --out runs/s2 --stages stage2 --init-checkpoint runs/local/checkpoints/stage1_best.pt
  seld train store --preset local --out runs/local --resume      # continue a killed run
"""

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="feature store folder (from `seld features`), or its s3:// / gs:// URI")
    p.add_argument("--out", type=Path, required=True, help="run folder to write")
    p.add_argument("--preset", choices=PRESETS, default="local", help="config preset (default local)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a config field, e.g. --set model.n_conformer_layers=2 (repeatable)")
    p.add_argument("--baseline", action="store_true", help="train Baseline-A (spec §7) with its own schedule")
    p.add_argument("--stages", choices=("both", "stage1", "stage2"), help="stages to run (train.stages)")
    p.add_argument("--init-checkpoint", type=Path, help="model file to start from (train.init_checkpoint)")
    p.add_argument("--workers", type=int, help="Ray Train workers (train.num_workers; DDP when > 1)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (train.use_gpu)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument("--wandb", action="store_true", help="log to W&B (offline unless WANDB_MODE is set)")
    p.add_argument("--wandb-project", default="seld", help="W&B project (default seld)")
    p.add_argument("--wandb-group", help="W&B group")


def build_config(args: argparse.Namespace) -> ExperimentConfig:
    """The run's config from the preset, --baseline, the flags and --set (in that order)."""
    overrides: dict = baseline_overrides(args.preset) if args.baseline else {}
    for key, value in (("train.stages", args.stages), ("train.num_workers", args.workers),
                       ("seed", args.seed),
                       ("train.init_checkpoint", str(args.init_checkpoint) if args.init_checkpoint else None)):
        if value is not None:
            overrides[key] = value
    if args.gpu:
        overrides["train.use_gpu"] = True
    overrides.update(parse_set_args(args.set))
    return preset_config(args.preset, overrides)


def run(args: argparse.Namespace) -> int:
    from seld.config import flatten
    from seld.errors import UserError
    from seld.runfolder import CONFIG_JSON, load_experiment
    from seld.train import run_training

    if args.resume and (args.out / CONFIG_JSON).is_file():
        cfg = load_experiment(args.out / CONFIG_JSON)
        log.info("resuming %s with its saved config", args.out)
        # --set values are checked, not silently dropped: a resumed run keeps its saved config.
        asked, saved = flatten(build_config(args)), flatten(cfg)
        differ = [f"{k}={asked[k]!r} (saved {saved[k]!r})" for k in parse_set_args(args.set) if asked[k] != saved[k]]
        if differ:
            raise UserError(f"{args.out / CONFIG_JSON}: --resume continues the saved config; --set "
                            f"{', '.join(differ)} would change it (use another --out for a new run)")
    else:
        cfg = build_config(args)
    wandb = {"project": args.wandb_project, "group": args.wandb_group} if args.wandb else None
    metrics = run_training(cfg, args.store, args.out, resume=args.resume, wandb=wandb)
    keys = [k for k in ("status", "test/f20", "test/doae_cd", "test/rde_cd", "test_pp/f20", "cost/wall_s")
            if k in metrics]
    print(json.dumps({k: metrics[k] for k in keys}))
    if metrics.get("status", "ok") != "ok":
        # A truncated run is not a finished one: say so in the exit status (schedulers, CI).
        print(f"seld train: {args.out}: stopped by train.time_budget_s before stage(s) "
              f"{sorted(set(cfg.train.stage_numbers) - set(metrics.get('stages_done', [])))} finished "
              f"(status {metrics['status']})", file=sys.stderr)
        return 1
    return 0
