"""The float16 feature store's effect on a trained model's metric.

    python bench/store_precision.py RUN DATA [RUN ...]

For each trained run (its selected checkpoint, trained on the float16 store), the test split's wavs
are featurised once in float32 (the official recipe) and scored twice: with the features as they are
and rounded to float16 as the store keeps them, at threshold 0.5 and with the run's thresholds.
Prints the metric with each, the largest feature difference, and the largest output difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from seld import labels
from seld.config import apply_overrides
from seld.labels import as_written
from seld.metrics import count_errors, score_counters
from seld.postprocess import decode_outputs
from seld.predict import bf16_autocast, features_of_wav, infer, load_model
from seld.runfolder import CHECKPOINT_DIR, METRICS_JSON, SELECTED, THRESHOLDS, load_thresholds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="run folders, then the dataset root last")
    args = ap.parse_args()
    *runs, data = args.runs
    wavs = sorted(p for p in (data / "stereo_dev").glob("dev-test-*/*.wav") if "synth" not in p.parent.name)
    refs = [labels.read_reference_csv(data / "metadata_dev" / w.parent.name / f"{w.stem}.csv") for w in wavs]
    print("| run | features | test F20 % (0.5) | DOAE_CD ° | RDE_CD | test F20 % (thresholds) | max output diff |")
    print("|---|---|---|---|---|---|---|")
    feats32 = None
    for run in runs:
        lm = load_model(run / CHECKPOINT_DIR / SELECTED)
        if feats32 is None:
            cfg32 = apply_overrides(lm.cfg, {"features.store_dtype": "float32"})
            feats32 = np.stack([features_of_wav(w, cfg32)[0][0].astype(np.float32) for w in wavs])
            f16 = feats32.astype(np.float16)
            err = float(np.abs(f16.astype(np.float32) - feats32).max())
            print(f"<!-- {len(wavs)} test clips; max |float16 - float32| feature error {err:.4f} dB -->")
        thr = load_thresholds(run / THRESHOLDS)
        outs = {}
        for name, f in (("float32", feats32), ("float16 (store)", feats32.astype(np.float16))):
            outs[name] = infer(lm.model, f, lm.mean, lm.std, 64, "cpu", bf16_autocast("cpu", lm.cfg.train.amp_bf16))
        for name, out in outs.items():
            row = []
            for t in (0.5, thr):
                preds = [as_written(e) for e in decode_outputs(out, lm.cfg.model.output_format, t)]
                row.append(score_counters(count_errors(refs, preds).sum(axis=0)))
            diff = float(np.abs(out - outs["float32"]).max())
            print(f"| {run.name} | {name} | {row[0].f20:.2f} | {row[0].doae_cd:.2f} | {row[0].rde_cd:.3f} | "
                  f"{row[1].f20:.2f} | {diff:.2e} |")
        recorded = json.loads((run / METRICS_JSON).read_text())
        print(f"<!-- {run.name}: recorded test/f20 {recorded['test/f20']:.2f}, test_pp/f20 {recorded['test_pp/f20']:.2f} -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
