"""`seld train STORE --preset ... --out RUN`: two-stage training with Ray Train."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
import threading
from pathlib import Path

from seld.cli import absolute_overrides, existing_path, existing_path_or_uri, user_path
from seld.config import PRESETS, ExperimentConfig, baseline_overrides, parse_set_args, preset_config

NAME = "train"
HELP = "two-stage training (Ray Train) from a feature store into a run folder"
EXAMPLE = """examples:
  seld train store --preset smoke --out runs/smoke
  seld train store --preset local --out runs/local --set train.stage1.epochs=8 --workers 2
  seld train store --preset local --out runs/s2 --stages stage2 --init-checkpoint runs/local/checkpoints/stage1_best.pt
  seld train store --preset local --out runs/local --resume      # continue a killed or Ctrl-C-ed run
"""

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=existing_path_or_uri("store"),
                   help="feature store folder (from `seld features`), or its s3:// / gs:// URI")
    p.add_argument("--out", type=user_path, required=True, help="run folder to write")
    p.add_argument("--preset", choices=PRESETS, default="local", help="config preset (default local)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a config field, e.g. --set model.n_conformer_layers=2 (repeatable)")
    p.add_argument("--baseline", action="store_true", help="train Baseline-A (spec §7) with its own schedule")
    p.add_argument("--stages", choices=("both", "stage1", "stage2"), help="stages to run (train.stages)")
    p.add_argument("--init-checkpoint", type=existing_path("--init-checkpoint", "file"), help="model file to start from (train.init_checkpoint)")
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
    overrides.update(absolute_overrides(parse_set_args(args.set)))
    return preset_config(args.preset, overrides)


class EpochLines:
    """One log line per epoch of ``RUN/metrics.csv`` while a run trains: `seld train`'s view of its
    run on the console (and in ``ray job logs``), the study's epoch line without a study; the Train
    workers' own output stays in Ray's logs unless -v. Epochs already in the file when the block
    starts (--resume) are not repeated. Reads metrics.csv only; writes log records.

    Args:
        run_dir: the run folder.
        n_epochs: the run's epoch budget (both stages).
        poll_s: how often the file is read.
    """

    def __init__(self, run_dir: Path, n_epochs: int, poll_s: float = 1.0) -> None:
        self.csv, self.n_epochs, self.poll_s = Path(run_dir) / "metrics.csv", n_epochs, poll_s
        self.label = Path(run_dir).name
        self.last_epoch = max((int(float(r["epoch"])) for r in self._rows()), default=-1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="seld-epoch-lines", daemon=True)

    def _rows(self) -> list[dict[str, str]]:
        try:
            text = self.csv.read_text(encoding="utf-8")
        except OSError:
            return []
        # A row being written has no elapsed_s (the last column) yet: read it at the next poll.
        return [r for r in csv.DictReader(io.StringIO(text)) if r.get("elapsed_s") not in (None, "")]

    def flush(self) -> None:
        from seld.study.progress import epoch_line

        previous = None
        for row in self._rows():
            epoch = int(float(row["epoch"]))
            if epoch > self.last_epoch:
                elapsed = float(row["elapsed_s"])
                # The epoch's wall time from the attempt's clock; the first epoch of an attempt
                # (its clock restarts) counts its training time only.
                seconds = elapsed - float(previous["elapsed_s"]) if previous is not None else math.nan
                if not seconds > 0:
                    seconds = float(row["train/time_s"])
                log.info("%s", epoch_line(self.label, row, self.n_epochs, seconds))
                self.last_epoch = epoch
            previous = row

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.flush()

    def __enter__(self) -> EpochLines:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.flush()


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
    with EpochLines(args.out, cfg.train.max_epochs):
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
