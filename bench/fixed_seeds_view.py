"""A study's tables as a fixed-seed study of some of its seeds would have written them.

    python bench/fixed_seeds_view.py results/ablation-extended --preset local-extended \
        --seeds 0,1,2 --out /tmp/extended-3seeds

A `--seeds auto` study trains more seeds only where a comparison is unsettled; to tell what the
added seeds changed from what a retrain changed, compare its tables with those of its own first
seeds read as a fixed-seed study: `summary.csv` and `curves.csv` cut to `--seeds`, `counters.npz`
copied whole (the report takes the counters of the rows it has), no `sequential.json` (so the
verdicts are the fixed-seed rule's), then `studies/ablation.py --report-only` into `--out`. Pass
the result's `<table>_paired.csv` to `bench/verdict_changes.py`. Exit status: the report's.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def fixed_seeds_view(study_dir: Path, preset: str, seeds: list[int], out: Path) -> int:
    """Write the cut study into `out` and report it (module doc); returns the report's exit status."""
    if not (study_dir / "summary.csv").is_file():
        raise SystemExit(f"{study_dir / 'summary.csv'}: no such file; pass a study's results folder")
    summary = pd.read_csv(study_dir / "summary.csv")
    missing = sorted(set(seeds) - set(summary["seed"]))
    if missing:
        raise SystemExit(f"{study_dir / 'summary.csv'}: no rows of seed(s) {missing}")
    if out.resolve() == study_dir.resolve():
        raise SystemExit(f"--out {out} is the study itself; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    summary[summary["seed"].isin(seeds)].to_csv(out / "summary.csv", index=False)
    curves = study_dir / "curves.csv"
    if curves.is_file():
        c = pd.read_csv(curves)
        (c[c["seed"].isin(seeds)] if "seed" in c.columns else c).to_csv(out / "curves.csv", index=False)
    if (study_dir / "counters.npz").is_file():
        shutil.copyfile(study_dir / "counters.npz", out / "counters.npz")
    (out / "sequential.json").unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "studies" / "ablation.py"), "--preset", preset, "--report-only",
           "--out", str(out)]
    return subprocess.run(cmd, cwd=ROOT).returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study_dir", type=Path, help="a study's results folder (summary.csv, counters.npz)")
    ap.add_argument("--preset", required=True, help="the study's preset (its tables), e.g. local-extended")
    ap.add_argument("--seeds", required=True, help="comma-separated seeds to keep, e.g. 0,1,2")
    ap.add_argument("--out", type=Path, required=True, help="folder for the cut study and its tables")
    args = ap.parse_args()
    try:
        seeds = sorted({int(s) for s in args.seeds.split(",") if s.strip()})
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2")
    if not seeds:
        ap.error("--seeds: no seed given")
    raise SystemExit(fixed_seeds_view(args.study_dir, args.preset, seeds, args.out))


if __name__ == "__main__":
    main()
