"""Are two trainings of the same study the same bit for bit? Every recorded number but the timings.

    python bench/study_diff.py STUDY_A STUDY_B [--runs]

Compares, for the (variant, seed) rows the two `summary.csv` share: every field except the
timings and where they ran (`cost/*`, `wall_s`, `device_hours`, `git_sha`, `run_dir`, `attempts`,
`precision_reason`, which holds a measured speed ratio), as the text the study wrote; the
per-epoch curves (`curves.csv`, timing columns left out); the F20 counters behind the paired
intervals (`counters.npz`, exactly); and the paired table (`*_paired.csv`, byte for byte). With
`--runs`, also each run's `metrics.csv` (timing columns left out), where both folders still hold
their `runs/`. Prints each difference, then one line per part; exit 1 when anything differs or
a row is missing from either side.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import pandas as pd

NOT_COMPARED = ("wall_s", "device_hours", "git_sha", "run_dir", "attempts", "precision_reason")


def _timing(column: str) -> bool:
    return (column.startswith("cost/") or column in NOT_COMPARED
            or any(s in column for s in ("time", "elapsed", "clips_per_s", "wait")))


def _rows(study: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(study / "summary.csv") as f:
        return {(r["variant"], r["seed"]): r for r in csv.DictReader(f)}


def _frames_equal(a: Path, b: Path) -> tuple[bool, str]:
    fa, fb = pd.read_csv(a), pd.read_csv(b)
    cols = [c for c in fa.columns if not _timing(c)]
    if list(fa.columns) != list(fb.columns) or len(fa) != len(fb):
        return False, f"{a.name}: columns or row counts differ ({fa.shape} vs {fb.shape})"
    return fa[cols].equals(fb[cols]), f"{a.name}: {fa.shape[0]} rows x {len(cols)} non-timing columns"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--runs", action="store_true", help="also compare each run's metrics.csv")
    args = p.parse_args(argv)
    ra, rb = _rows(args.a), _rows(args.b)
    ok = True
    missing = sorted(set(ra) ^ set(rb))
    for key in missing:
        print(f"row {key} only in {args.a if key in ra else args.b}")
        ok = False
    fields = differ = 0
    for key in sorted(set(ra) & set(rb)):
        for col, value in ra[key].items():
            if _timing(col):
                continue
            fields += 1
            if rb[key].get(col) != value:
                differ += 1
                print(f"summary.csv {key} {col}: {value!r} vs {rb[key].get(col)!r}")
    ok &= differ == 0
    print(f"summary.csv: {len(set(ra) & set(rb))} runs, {fields} fields compared, {differ} differ")
    for name in ("curves.csv",):
        if (args.a / name).exists() and (args.b / name).exists():
            same, what = _frames_equal(args.a / name, args.b / name)
            ok &= same
            print(f"{what}: {'identical' if same else 'DIFFER'}")
    if (args.a / "counters.npz").exists() and (args.b / "counters.npz").exists():
        ca, cb = np.load(args.a / "counters.npz"), np.load(args.b / "counters.npz")
        same = sorted(ca.files) == sorted(cb.files) and all(np.array_equal(ca[k], cb[k]) for k in ca.files)
        ok &= same
        print(f"counters.npz: {len(ca.files)} arrays, {'identical' if same else 'DIFFER'}")
    for pa in sorted(args.a.glob("*_paired.csv")):
        pb = args.b / pa.name
        same = pb.exists() and pa.read_bytes() == pb.read_bytes()
        ok &= same
        print(f"{pa.name}: {'identical' if same else 'DIFFER'} (byte for byte)")
    if args.runs:
        n = same_runs = 0
        for key in sorted(set(ra) & set(rb)):
            ma, mb = args.a / ra[key]["run_dir"] / "metrics.csv", args.b / rb[key]["run_dir"] / "metrics.csv"
            if not (ma.exists() and mb.exists()):
                print(f"{key}: metrics.csv missing ({ma if not ma.exists() else mb})")
                ok = False
                continue
            same, what = _frames_equal(ma, mb)
            n += 1
            same_runs += same
            if not same:
                print(f"{key} {what}: DIFFER")
        ok &= same_runs == n
        print(f"runs' metrics.csv: {same_runs} of {n} identical on their non-timing columns")
    print("identical" if ok else "DIFFERENT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
