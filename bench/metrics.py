"""Benchmark of seld/metrics.py: 10 000 clips scored from CSV folders and in memory, against the
literal per-frame implementation of the official scorer (kept in tests/test_metrics.py) on a subset.

    .venv/bin/python bench/metrics.py [--clips 10000] [--subset 500] [--out /tmp/seld-bench-metrics]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seld.labels import make_events, read_prediction_csv, read_reference_csv, write_csv  # noqa: E402
from seld.metrics import score_dirs, score_events  # noqa: E402


def _official():
    spec = importlib.util.spec_from_file_location("official", ROOT / "tests" / "test_metrics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._official_score


def synth_clip(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One 5-s clip: 0-4 events (5-50 frames, moving), and a noisy prediction of it."""
    ref, pred = [], []
    for _ in range(int(rng.integers(0, 5))):
        cls, start = int(rng.integers(0, 13)), int(rng.integers(0, 45))
        stop = min(50, start + int(rng.integers(5, 50)))
        az0, speed, dist = rng.uniform(-90, 90), rng.uniform(-3, 3), rng.uniform(50, 500)
        detected = rng.random() < 0.8
        for f in range(start, stop):
            az = float(np.clip(az0 + speed * (f - start), -90, 90))
            ref.append((f, cls, 0, round(az), round(dist), 0))
            if detected and rng.random() < 0.9:
                pred.append((f, cls, 0, round(az + rng.normal(0, 15)),
                             round(max(0.0, dist + rng.normal(0, 80))), 0))
    for _ in range(int(rng.integers(0, 10))):  # false alarms
        pred.append((int(rng.integers(0, 50)), int(rng.integers(0, 13)), 0,
                     int(rng.integers(-90, 91)), int(rng.integers(50, 500)), 0))
    return make_events(ref), make_events(pred)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=10_000)
    parser.add_argument("--subset", type=int, default=500, help="clips for the literal reference")
    parser.add_argument("--repeat", type=int, default=3, help="best of N for our timings")
    parser.add_argument("--out", type=Path, default=None, help="scratch folder (default: temp)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    scratch = args.out or Path(tempfile.mkdtemp(prefix="seld-bench-metrics-"))
    ref_dir, pred_dir = scratch / "ref" / "dev-test-tau", scratch / "pred"
    pairs = [synth_clip(rng) for _ in range(args.clips)]
    names = [f"fold4_room{i % 16}_mix{i:05d}.csv" for i in range(args.clips)]
    for name, (ref, pred) in zip(names, pairs, strict=True):
        write_csv(ref_dir / name, ref)
        write_csv(pred_dir / name, pred)
    n_rows = sum(len(r) + len(p) for r, p in pairs)
    print(f"{args.clips} clips, {n_rows} CSV rows (ref + pred)")

    refs = [read_reference_csv(ref_dir / n) for n in names]
    preds = [read_prediction_csv(pred_dir / n) for n in names]
    score_events(refs[:100], preds[:100])  # warm-up

    def best_of(n, fn):
        times, result = [], None
        for _ in range(n):
            t = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t)
        return min(times), result

    t_csv, from_csv = best_of(args.repeat, lambda: score_dirs(scratch / "ref", pred_dir))
    t_mem, in_mem = best_of(args.repeat, lambda: score_events(refs, preds))
    t_jack, _ = best_of(args.repeat, lambda: score_events(refs, preds, jackknife=True))
    assert abs(from_csv.f20 - in_mem.f20) < 1e-9

    official = _official()
    sub = names[: args.subset]
    t = time.perf_counter()
    expected = official([ref_dir / n for n in sub], [pred_dir / n for n in sub])
    t_ref_sub = time.perf_counter() - t
    ours_sub = score_events(refs[: args.subset], preds[: args.subset])
    assert abs(ours_sub.f20 - expected["f20"]) < 1e-9
    t_ref_full = t_ref_sub * args.clips / args.subset
    print(f"F20 {in_mem.f20:.2f} %  DOAE_CD {in_mem.doae_cd:.2f}  RDE_CD {in_mem.rde_cd:.3f}")
    print(f"from CSV (read + score):      {t_csv:.2f} s (best of {args.repeat})")
    print(f"in memory:                    {t_mem:.3f} s")
    print(f"in memory + jackknife:        {t_jack:.3f} s")
    print(f"literal per-frame, {args.subset} clips: {t_ref_sub:.2f} s "
          f"(-> {t_ref_full:.1f} s for {args.clips}, reads the CSVs and scores, as the official code)")
    print(f"ratio literal / ours in memory: {t_ref_full / t_mem:.0f}x; "
          f"literal / ours from CSV: {t_ref_full / t_csv:.1f}x")
    if args.out is None:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
