"""`seld features`: a DCASE2025-layout dataset -> Parquet feature store (log-mel + raw events)."""

from __future__ import annotations

import argparse
import json

from seld.cli import existing_path, path_or_uri

NAME = "features"
HELP = "extract log-mel features of a DCASE2025-layout dataset into a Parquet feature store"
EXAMPLE = """example:
  seld features data --out store
  seld features /data/DCASE2025_SELD --out store --splits dev-train-tau dev-test-tau --procs 2
  seld features data --out store --set features.store_dtype=float32
  seld features data --out s3://my-bucket/seld/store     # straight into a bucket (AWS_* variables)

Writes STORE/features-<hash>/shard-*.parquet and manifest.json (<hash> = the feature config's hash,
so another config writes another folder); STORE is a folder or an s3:// / gs:// bucket prefix.
Rerunning resumes: finished shards are kept. Unreadable input files are listed and the command
exits non-zero after storing every other clip. `seld store convert STORE` brings a store written
before the tensor encoding of the features column up to date."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", type=existing_path("dataset root"),
                        help="dataset root (stereo_dev/, metadata_dev/, stereo_eval/)")
    parser.add_argument("--out", type=path_or_uri, required=True, metavar="STORE",
                        help="store root: a folder, or a bucket URI (s3://bucket/prefix, gs://bucket/prefix)")
    parser.add_argument("--splits", nargs="+", metavar="SPLIT", help="only these split folders (eval = stereo_eval/eval)")
    parser.add_argument("--procs", type=int, default=None, help="parallel workers (default: CPU count)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="feature config override, e.g. features.store_dtype=float32 (repeatable)")


def run(args: argparse.Namespace) -> int:
    from seld.config import ConfigError, ExperimentConfig, apply_overrides, parse_set_args
    from seld.store import build_store, open_store

    overrides = {}
    for key, value in parse_set_args(args.set).items():
        if "." in key and not key.startswith("features."):
            raise ConfigError(f"--set {key}: seld features only takes features.* keys")
        # Applied under the full config, so an error repeats the key as the user typed it
        # ("unknown config key 'features.n_mel'; did you mean features.n_mels?"); a bare field
        # name is taken as features.<name>.
        overrides[key if key.startswith("features.") else f"features.{key}"] = value
    cfg = apply_overrides(ExperimentConfig(), overrides).features
    folder = build_store(args.data, args.out, cfg, splits=args.splits, n_procs=args.procs, progress=True)
    manifest = open_store(folder).manifest
    print(f"{folder}: {manifest['n_rows_total']} clips {json.dumps(manifest['n_rows'])}, "
          f"{manifest['bytes_per_clip']:.0f} bytes/clip")
    return 0
