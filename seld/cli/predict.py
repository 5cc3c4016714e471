"""`seld predict RUN WAV_DIR --out PRED`: one DCASE2025 CSV per wav from a trained run."""

from __future__ import annotations

import argparse
import sys

from seld.cli import absolute, existing_path, user_path
from seld.errors import DataError

NAME = "predict"
HELP = "predict one DCASE2025 CSV per wav with a run's selected checkpoint and thresholds"
EXAMPLE = """examples:
  seld predict runs/local data/stereo_dev/dev-test-tau data/stereo_dev/dev-test-sony --out pred
  seld predict runs/local data/stereo_eval/eval --out pred_eval --threshold 0.5
  seld predict runs/local wavs --out pred --checkpoint stage1_best.pt
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=existing_path("run folder"), help="training run folder")
    p.add_argument("wav_dirs", type=existing_path("wav folder"), nargs="+", metavar="WAV_DIR", help="folder(s) of wav files")
    p.add_argument("--out", type=user_path, required=True, help="folder for the CSVs")
    p.add_argument("--checkpoint", type=_checkpoint, help="checkpoint path or name in RUN/checkpoints (default: selected)")
    p.add_argument("--threshold", type=float, help="one activity threshold (default RUN/thresholds.json)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def _checkpoint(value: str) -> str:
    """A checkpoint file the user typed (made absolute), or a name inside RUN/checkpoints (kept)."""
    return str(absolute(value)) if absolute(value).is_file() else value


def run(args: argparse.Namespace) -> int:
    from seld.predict import predict_dir

    report = predict_dir(args.run, args.wav_dirs, args.out, checkpoint=args.checkpoint,
                         thresholds=args.threshold, device=args.device)
    if not report.errors:
        print(f"{len(report.written)} CSVs written to {args.out}")
        return 0
    # Failed files: one line, whatever their number (each file's cause after the count).
    causes = "; ".join(msg for _, msg in report.errors)
    n_bad, n_ok = len(report.errors), len(report.written)
    if not n_ok:
        what = causes if n_bad == 1 else f"{n_bad} wav files failed: {causes}"
        raise DataError(f"{what} (no CSV written)")
    print(f"seld predict: error: {n_bad} of {n_bad + n_ok} wav files failed, the other {n_ok} CSV(s) are "
          f"written to {args.out}: {causes}", file=sys.stderr)
    return 1
