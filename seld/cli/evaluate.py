"""`seld evaluate`: the official DCASE2025 metric on a folder of prediction CSVs."""

from __future__ import annotations

import argparse
import json
import math

from seld.cli import existing_path
from seld.errors import UserError
from seld.metrics import score_dirs

NAME = "evaluate"
HELP = "score prediction CSVs against reference CSVs with the official DCASE2025 metric"
EXAMPLE = """example:
  seld evaluate data/metadata_dev pred --json
  seld evaluate data/metadata_dev/dev-test-tau pred --jackknife
  seld evaluate data/metadata_dev RUN/predictions --json --breakdowns

REFERENCE_DIR is searched recursively and files are paired by name; every prediction needs a
reference of the same name. Official quirk: only frames before the last annotated frame of each
reference are scored (--score-all-frames scores every frame; not the official number).
--breakdowns adds the scores by site (the reference's split folder), distance and polyphony and the
jackknife interval, keyed as a training run's metrics.json keys them (test_pp/site/tau/f20, ...)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reference_dir", metavar="REFERENCE_DIR", type=existing_path("reference folder"),
                        help="folder of reference CSVs (searched recursively)")
    parser.add_argument("prediction_dir", metavar="PREDICTIONS_DIR", type=existing_path("prediction folder"),
                        help="folder of prediction CSVs (searched recursively)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (f20 in percent, doae_cd, rde_cd, ...)")
    parser.add_argument("--jackknife", action="store_true",
                        help="leave-one-file-out jackknife 95%% confidence intervals")
    parser.add_argument("--score-all-frames", action="store_true",
                        help="score every frame (the official scorer skips the last annotated one "
                             "and later frames)")
    parser.add_argument("--breakdowns", action="store_true",
                        help="also score by site, distance bin and polyphony, with the jackknife "
                             "interval (JSON: a \"breakdowns\" object keyed as metrics.json)")
    parser.add_argument("--prefix", default="test_pp",
                        help="key prefix of the breakdowns: test_pp for a run's predictions/, test "
                             "for predictions_t05/ (default: %(default)s)")


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(result: dict) -> str:
    """A readable table of a SeldScore.to_dict() result."""
    lines = [
        f"files: {result['n_files']}" + ("  (all frames scored)" if result["score_all_frames"]
                                         else ""),
        f"F20:      {_fmt(result['f20'], '6.2f')} %",
        f"DOAE_CD:  {_fmt(result['doae_cd'], '6.2f')} deg",
        f"RDE_CD:   {_fmt(result['rde_cd'], '6.3f')}",
        f"DistE_CD: {_fmt(result['dist_err_cd'], '6.1f')} cm",
    ]
    if "jackknife" in result:
        lines.append("jackknife 95% intervals:")
        for name, d in result["jackknife"].items():
            lines.append(f"  {name:<12} estimate {_fmt(d['estimate'], '.3f')}  "
                         f"[{_fmt(d['low'], '.3f')}, {_fmt(d['high'], '.3f')}]")
    lines.append("")
    lines.append(f"{'class':<22}{'F20 %':>8}{'DOAE':>8}{'RDE':>8}{'DistE':>8}"
                 f"{'TP':>7}{'FPs':>6}{'FP':>6}{'FN':>6}{'n_ref':>7}")
    for r in result["classwise"]:
        lines.append(f"{r['class']:>2} {r['name']:<19}{_fmt(r['f20'], '8.2f')}"
                     f"{_fmt(r['doae'], '8.2f')}{_fmt(r['rde'], '8.3f')}"
                     f"{_fmt(r['dist_err'], '8.1f')}{r['tp']:>7}{r['fp_spatial']:>6}{r['fp']:>6}"
                     f"{r['fn']:>6}{r['n_ref']:>7}")
    if "breakdowns" in result:
        lines.append("")
        lines += [f"{k:<40}{_fmt(v, '.3f')}" for k, v in result["breakdowns"].items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.breakdowns and args.score_all_frames:
        raise UserError("--breakdowns scores the official frames only; drop --score-all-frames")
    score = score_dirs(args.reference_dir, args.prediction_dir,
                       score_all_frames=args.score_all_frames, jackknife=args.jackknife)
    result = score.to_dict()
    if args.breakdowns:
        from seld.evaluate import score_breakdowns_of_dirs  # imports torch: only when asked

        result["breakdowns"] = score_breakdowns_of_dirs(args.reference_dir, args.prediction_dir, args.prefix)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0
