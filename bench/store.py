"""Benchmark: `build_store` end to end (wav decode -> log-mel -> Parquet) on a generated dataset.

Writes --clips 5-s stereo PCM-16 clips with random labels into a temporary DCASE2025 layout, then
measures, in the same run: the per-file librosa recipe (load + features, one core) as the
reference, `build_store` with --procs worker processes (pool start-up included), a resumed run
(nothing to compute), bytes per clip at float16 and float32, and the float16 error.
Run: .venv/bin/python bench/store.py [--clips 512] [--procs 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf

from seld import labels
from seld.config import FeatureConfig
from seld.features import load_audio, log_mel_librosa
from seld.store import build_store, decode_features, open_store

SR = 24_000


def write_dataset(root: Path, n_clips: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    t = np.arange(5 * SR) / SR
    wavs = []
    for i in range(n_clips):
        split = "dev-train-tau" if i % 2 == 0 else "dev-test-tau"
        stem = f"fold{3 if i % 2 == 0 else 4}_room{1 + i % 5}_mix{i:03d}_deg000_start0000"
        x = 0.05 * rng.standard_normal((2, t.size)) + 0.3 * np.sin(2 * np.pi * rng.uniform(100, 5000) * t)
        x *= 10 ** (-rng.uniform(0, 2))
        wav = root / "stereo_dev" / split / f"{stem}.wav"
        wav.parent.mkdir(parents=True, exist_ok=True)
        sf.write(wav, x.T.astype(np.float32), SR, subtype="PCM_16")
        n_ev = int(rng.integers(0, 40))
        ev = labels.make_events([(int(rng.integers(0, 50)), int(rng.integers(0, 13)), 0,
                                  int(rng.integers(-90, 91)), int(rng.integers(50, 500)), 0) for _ in range(n_ev)])
        labels.write_csv(root / "metadata_dev" / split / f"{stem}.csv", ev)
        wavs.append(wav)
    return wavs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=512)
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--shard-rows", type=int, default=128)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    res: dict = {"clips": args.clips, "procs": args.procs, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        wavs = write_dataset(root, args.clips)
        n_ref = min(64, len(wavs))
        log_mel_librosa(load_audio(wavs[0]))  # warm-up
        t0 = time.perf_counter()
        for w in wavs[:n_ref]:
            log_mel_librosa(load_audio(w))
        res["librosa_per_file_load_and_features_1core"] = n_ref / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        f16 = build_store(root, Path(tmp) / "store", FeatureConfig(), n_procs=args.procs,
                          shard_rows=args.shard_rows)
        dt = time.perf_counter() - t0
        res["build_store_clips_per_s"] = args.clips / dt
        res["build_store_s"] = dt
        res["speedup_vs_librosa_1core"] = res["build_store_clips_per_s"] / res["librosa_per_file_load_and_features_1core"]
        t0 = time.perf_counter()
        build_store(root, Path(tmp) / "store", FeatureConfig(), n_procs=args.procs, shard_rows=args.shard_rows)
        res["resume_nothing_to_do_s"] = time.perf_counter() - t0
        res["bytes_per_clip_float16"] = open_store(f16).manifest["bytes_per_clip"]

        f32 = build_store(root, Path(tmp) / "store", FeatureConfig(store_dtype="float32"), n_procs=args.procs,
                          splits=["dev-test-tau"], shard_rows=args.shard_rows)
        res["bytes_per_clip_float32"] = open_store(f32).manifest["bytes_per_clip"]
        a = pq.ParquetDataset(sorted(f16.glob("shard-dev-test-tau-*.parquet"))).read(columns=["clip", "features"])
        b = pq.ParquetDataset(sorted(f32.glob("shard-dev-test-tau-*.parquet"))).read(columns=["clip", "features"])
        assert a.column("clip").to_pylist() == b.column("clip").to_pylist()
        xa = decode_features(a.column("features"), (-1,)).astype(np.float32)
        xb = decode_features(b.column("features"), (-1,))
        res["float16_max_abs_err_db"] = float(np.abs(xa - xb).max())
        res["float16_mean_abs_err_db"] = float(np.abs(xa - xb).mean())
        # Paper's training set: about 105 000 clips.
        res["paper_train_set_gb_float16"] = res["bytes_per_clip_float16"] * 105_000 / 1e9
        res["paper_train_set_gb_float32"] = res["bytes_per_clip_float32"] * 105_000 / 1e9

    for k, v in res.items():
        print(f"{k:42s} {v:.4g}" if isinstance(v, float) else f"{k:42s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
