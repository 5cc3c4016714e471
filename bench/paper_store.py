"""A paper-shaped feature store without paper data: a generated store's rows repeated to N rows.

    python bench/paper_store.py SRC_STORE --rows 120000 --out /tmp/paper_store [--synth-fraction 0.87]

Every row is a real row of SRC_STORE (features, events, fold and room) under a fresh clip id, in the
store's exact format (shards of 512 rows, row groups of 64, manifest), so `seld train` plans and
reads it as it would the paper's ~105 000 synthetic + ~16 000 real clips (`seld.store.replicate_store`).
Prints the store folder, its size and the seconds it took, as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

from seld.store import replicate_store


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a store written by `seld features` (or its features-<hash> folder)")
    ap.add_argument("--rows", type=int, default=120_000, help="rows of the new store (default: 120000)")
    ap.add_argument("--out", required=True, help="folder for the new store (features-<hash> inside)")
    ap.add_argument("--synth-fraction", type=float, default=0.87,
                    help="share of rows from the synthetic train splits (paper: 105k of 121k = 0.87)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    folder = replicate_store(args.src, args.out, args.rows, synth_fraction=args.synth_fraction)
    manifest = json.loads((folder / "manifest.json").read_text())
    print(json.dumps({"store": str(folder), "rows": manifest["n_rows_total"], "n_rows": manifest["n_rows"],
                      "gib": round(manifest["bytes_total"] / 2**30, 2), "shards": len(manifest["shards"]),
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
