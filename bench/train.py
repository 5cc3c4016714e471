"""Benchmark of `seld train --preset local`: wall time (Ray start-up included) and test scores of the
stereo model, the mono-input control and a trivial predictor, over seeds.

    python bench/train.py DATA STORE --out bench_runs [--seeds 0 1 2] [--workers 1]

DATA is the generated `local` dataset (`seld synth --preset local`), STORE its feature store.
Each run is a separate `seld train` process, so its wall time includes Ray's start-up.
Prints a markdown table (one row per run, then means) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from seld import labels
from seld.config import N_CLASSES, N_LABEL_FRAMES
from seld.metrics import score_events
from seld.runfolder import METRICS_JSON


def trivial_score(data: Path) -> dict:
    """Every class active in every frame at azimuth 0 and the median training distance."""
    train = sorted((data / "metadata_dev").glob("dev-train-*/*.csv"))
    dist = np.concatenate([labels.read_reference_csv(p)["distance"] for p in train])
    median_cm = float(np.median(dist))
    refs = [labels.read_reference_csv(p) for p in sorted((data / "metadata_dev").glob("dev-test-*/*.csv"))
            if "synth" not in p.parent.name]
    frames, classes = np.meshgrid(np.arange(N_LABEL_FRAMES), np.arange(N_CLASSES), indexing="ij")
    pred = labels.make_events([(f, c, 0, 0.0, median_cm, 0) for f, c in zip(frames.ravel(), classes.ravel(),
                                                                            strict=True)])
    s = score_events(refs, [pred] * len(refs))
    return {"f20": s.f20, "doae_cd": s.doae_cd, "rde_cd": s.rde_cd}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("store", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=["stereo", "mono"])
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        for variant in args.variants:
            run = args.out / f"{variant}-s{seed}"
            cmd = [sys.executable, "-m", "seld", "train", str(args.store), "--preset", "local", "--out",
                   str(run), "--seed", str(seed), "--workers", str(args.workers),
                   "--set", f"model.input_mode={variant}"]
            t0 = time.time()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            wall = time.time() - t0
            m = json.loads((run / METRICS_JSON).read_text())
            rows.append({"variant": variant, "seed": seed, "wall_s": wall, **m})
            print(f"{variant} seed {seed}: {wall:.0f} s, test F20 {m['test/f20']:.1f}", file=sys.stderr)
    triv = trivial_score(args.data)
    print("| run | seed | wall s (incl. Ray start) | epochs s1+s2 | clips/s | data wait | test F20 % | "
          "DOAE_CD ° | RDE_CD | test F20 PP % | stage-1 test F20 % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seed']} | {r['wall_s']:.0f} | {r['cost/stage1_epochs']}+"
              f"{r['cost/stage2_epochs']} | {r['cost/train_clips_per_s']:.0f} | "
              f"{100 * r['cost/data_wait_frac']:.1f} % | {r['test/f20']:.1f} | {r['test/doae_cd'] or float('nan'):.1f} | "
              f"{r['test/rde_cd'] or float('nan'):.3f} | {r['test_pp/f20']:.1f} | "
              f"{r.get('stage1_test/f20', float('nan')):.1f} |")
    for variant in args.variants:
        f = [r["test/f20"] for r in rows if r["variant"] == variant]
        w = [r["wall_s"] for r in rows if r["variant"] == variant]
        print(f"| **{variant} mean** | {len(f)} seeds | {np.mean(w):.0f} | | | | {np.mean(f):.1f} | | | | |")
    print(f"| trivial (all classes, 0°, median distance) | – | – | | | | {triv['f20']:.1f} | "
          f"{triv['doae_cd']:.1f} | {triv['rde_cd']:.3f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
