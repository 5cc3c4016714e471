"""`seld synth`: generate the embedded SELD dataset in the DCASE2025 layout (seld/synth)."""

from __future__ import annotations

import argparse
import logging

from seld.cli import user_path
from seld.config import PRESETS, ConfigError, parse_set_args, preset_config

NAME = "synth"
HELP = "generate the seeded stereo SELD dataset (synthetic + real-like domains) in the DCASE2025 layout"
EXAMPLE = """Example:
  seld synth --preset smoke --out data
  seld synth --preset local --out data_local --seed 1 --set synth.moving_fraction=0.5

Writes data/stereo_dev/<split>/*.wav, data/metadata_dev/<split>/*.csv, the FOA recordings they were
cut from (data/foa/) and data/synth.json (config + hash). Running it again with the same config
returns at once; a folder holding another config's dataset is an error."""

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=PRESETS, default="local", help="dataset size preset (default: local)")
    parser.add_argument("--out", type=user_path, required=True, help="dataset root folder (created)")
    parser.add_argument("--seed", type=int, default=None, help="generator seed (default: the preset's, 0)")
    parser.add_argument("--set", action="append", metavar="synth.KEY=VALUE", dest="overrides",
                        help="override a generator field, e.g. synth.n_synth_train=200 (repeatable)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from seld.synth import dataset_hash, generate_dataset

    overrides = parse_set_args(args.overrides)
    bad = [k for k in overrides if not k.startswith("synth.")]
    if bad:
        raise ConfigError(f"--set {bad[0]}: seld synth only takes synth.* keys")
    if args.seed is not None:
        overrides["synth.seed"] = str(args.seed)
    cfg = preset_config(args.preset, overrides).synth
    root = generate_dataset(cfg, args.out, progress=not args.no_progress, n_procs=args.workers)
    log.info("dataset %s (hash %s) in %s", args.preset, dataset_hash(cfg), root)
    return 0
