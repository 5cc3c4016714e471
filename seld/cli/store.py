"""`seld store`: look at a feature store, or convert one written before the tensor encoding."""

from __future__ import annotations

import argparse
import json

NAME = "store"
HELP = "show a feature store (folder or bucket), or convert an older one to the tensor encoding"
EXAMPLE = """example:
  seld store info store/features-829e2afd2935
  seld store convert store/features-829e2afd2935
  seld store convert s3://my-bucket/seld/store

`convert` rewrites, shard by shard, a store whose features column is a flat fixed-size list (stores
written before the fixed-shape tensor encoding) with the same values as Arrow's fixed-shape tensor
type, so that a batch of rows decodes as one (n, 2, 251, 64) array. Each shard is replaced
atomically and the store stays readable throughout; rerunning resumes (converted shards are kept).
The folder name (the feature config's hash) and every value stay the same: training on the
converted store gives the same results, bit for bit."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (("info", "rows per split, encoding, size and feature config of a store"),
                       ("convert", "rewrite a fixed-size-list store with the fixed-shape tensor encoding")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("store", metavar="STORE",
                       help="store folder (features-<hash> or the folder holding it), or its s3:// / gs:// URI")


def run(args: argparse.Namespace) -> int:
    from seld.store import convert_store, open_store

    if args.action == "convert":
        info = convert_store(args.store, progress=True)
    else:
        info = open_store(args.store)
    m = info.manifest
    print(f"{info.path}: {m['n_rows_total']} clips {json.dumps(m['n_rows'])}, {len(info.shards)} shards, "
          f"features {'x'.join(map(str, m['feature_shape']))} {m['feature_dtype']} as {info.encoding}, "
          f"{m['bytes_per_clip']:.0f} bytes/clip")
    if args.action == "info":
        print(f"feature config {info.hash}: {json.dumps(m['feature_config'], sort_keys=True)}")
        if info.skipped:
            print(f"{len(info.skipped)} input file(s) skipped when it was built: {', '.join(sorted(info.skipped))}")
    return 0
