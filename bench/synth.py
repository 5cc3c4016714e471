"""Time the generated dataset: `smoke` and `local` presets, from scratch, with all cores.

A fixed numpy FFT workload is timed before and after, in the same run, as the reference: on a
shared machine the ratio generation / reference is the figure to compare between runs.

    .venv/bin/python bench/synth.py [--presets smoke local] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from seld.config import preset_config
from seld.synth import generate_dataset, plan_splits


def reference_s() -> float:
    """Seconds for 20 rfft/irfft pairs of a (4, 2**17) float64 array (single thread)."""
    x = np.random.default_rng(0).standard_normal((4, 2**17))
    t = time.perf_counter()
    for _ in range(20):
        np.fft.irfft(np.fft.rfft(x))
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["smoke", "local"])
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    rows = []
    for preset in args.presets:
        cfg = preset_config(preset).synth
        plans = plan_splits(cfg)
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-synth-{preset}-"))
        try:
            ref0 = reference_s()
            t = time.perf_counter()
            generate_dataset(cfg, tmp / "data", progress=False, n_procs=args.workers)
            wall = time.perf_counter() - t
            t = time.perf_counter()
            generate_dataset(cfg, tmp / "data", progress=False)
            reuse = time.perf_counter() - t
            ref1 = reference_s()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        ref = (ref0 + ref1) / 2
        rows.append({
            "preset": preset, "clips": sum(p.n_clips for p in plans),
            "synthetic_clips": sum(p.n_clips for p in plans if p.domain == "synthetic"),
            "real_like_clips": sum(p.n_clips for p in plans if p.domain == "real"),
            "recording_s": sum(p.n_recordings for p in plans) * cfg.recording_s,
            "wall_s": round(wall, 1), "reuse_s": round(reuse, 3), "reference_s": round(ref, 3),
            "wall_over_reference": round(wall / ref, 1),
        })
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
