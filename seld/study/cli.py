"""The command line shared by the study scripts (``studies/*.py``): reads their arguments and
declarations, runs the ablation or the sweep, prints the plan or where the results are (the rule
for where results go is :func:`seld.study.options.results_dir`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from seld.cli import absolute_overrides, configure_logging, existing_path, path_or_uri, user_path
from seld.config import ConfigError, parse_set_args
from seld.errors import UserError
from seld.storage import is_uri, join
from seld.study.ablation import Study, main_table, run_study
from seld.study.cluster import storage_path
from seld.study.options import DEFAULT_OUT_SENTINEL, Options, results_dir
from seld.study.sweep import Sweep, run_sweep


def _storage_arg(value: str) -> str:
    """``--storage``: a URI as typed, else an absolute path (``$VARS`` expanded first, as the
    cluster files' SELD_STORAGE is)."""
    return path_or_uri(os.path.expandvars(value))


def add_arguments(parser: argparse.ArgumentParser, presets: Sequence[str], default_preset: str,
                  sweep: bool = False) -> None:
    parser.add_argument("--preset", choices=list(presets), default=default_preset,
                        help=f"study size (default {default_preset})")
    # Paths are made absolute here, where they enter (the trials run in Ray's folders, not the shell's);
    # the inputs must exist: one line naming the path as typed otherwise, before Ray starts.
    parser.add_argument("--out", type=user_path, default=None, help="results folder (default results/<study>)")
    parser.add_argument("--data-root", type=existing_path("--data-root"),
                        help="real data in the DCASE2025 layout (default: the generated dataset)")
    parser.add_argument("--synth-root", type=existing_path("--synth-root"),
                        help="extra synthetic stereo data (dev-train-synth) to add in stage 1")
    parser.add_argument("--cluster", type=existing_path("--cluster", "file"),
                        help="Ray cluster launcher YAML or SLURM sbatch file to size trials from")
    parser.add_argument("--storage", type=_storage_arg, help="shared storage every node mounts, for results, run folders, "
                        "checkpoints and caches, or an object store (s3://bucket/prefix, gs://...) "
                        "for results, run folders and checkpoints (default: the cluster file's SELD_STORAGE)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (trials, resources, device-hours) and exit")
    parser.add_argument("--wandb", action="store_true", help="log every trial to W&B (offline unless WANDB_MODE is set)")
    parser.add_argument("--resume", action="store_true", help="continue a killed study without rerunning finished runs")
    parser.add_argument("--report-only", action="store_true", help="regenerate tables and plots from the recorded rows")
    parser.add_argument("--set", action="append", dest="sets", metavar="KEY=VALUE",
                        help="config override for every run, e.g. --set train.stage1.epochs=2")
    parser.add_argument("--cache-dir", type=user_path, help="where generated data and stores are cached (default OUT/_work)")
    parser.add_argument("--max-retries", type=int, default=1, help="retries of a failing run before it is recorded as failed")
    parser.add_argument("--time-budget-s", type=float, help="hard bound per run, seconds (train.time_budget_s)")
    parser.add_argument("--readme", type=existing_path("--readme", "file"),
                        help="paste the main table into the '<!-- STUDY:TABLE:start -->' block of this README "
                        "or of the docs/*.md beside it (whichever holds it)")
    parser.add_argument("--concurrency", type=int, help="trials at once (default: from the cluster plan)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and Ray Tune's periodic status table and trial tracebacks")
    if sweep:
        parser.add_argument("--trials", type=int, help="number of trials (default: the sweep's)")
    else:
        parser.add_argument("--seeds", help="comma-separated seeds (default: the preset's), or auto[:MAX]: "
                            "after them, add seeds one at a time to the comparisons whose verdict is "
                            "still unsettled, up to MAX per row (default 8; group-sequential test)")
        parser.add_argument("--budget-device-hours", type=float,
                            help="with --seeds auto: add no seed once the study has used this many device-hours")
        parser.add_argument("--mde-target", type=float, default=2.0,
                            help="F20 difference (pp) whose seeds-to-detect the paired tables report (default 2)")


def parse_seeds(text: str | None) -> tuple[tuple[int, ...] | None, int | None]:
    """``--seeds``: (the seeds, None) for "0,1,2"; (None, MAX) for "auto[:MAX]"; (None, None) unset."""
    from seld.paired import DEFAULT_MAX_SEEDS

    if text is None:
        return None, None
    try:
        if text == "auto" or text.startswith("auto:"):
            n_max = int(text[5:]) if text != "auto" else DEFAULT_MAX_SEEDS
            if n_max >= 2:
                return None, n_max
        else:
            seeds = tuple(int(x) for x in text.split(","))
            if min(seeds) < 0 or len(set(seeds)) < len(seeds):
                # A repeated seed would train once but count twice in the intervals (n seeds).
                raise UserError(f"--seeds {text!r}: expected distinct non-negative integers, e.g. 0,1,2")
            return seeds, None
    except ValueError:
        pass
    raise UserError(f"--seeds {text!r}: expected comma-separated integers (0,1,2) or auto[:MAX] with MAX >= 2")


def options_from_args(args: argparse.Namespace, name: str) -> Options:
    seeds, seeds_auto_max = parse_seeds(getattr(args, "seeds", None))
    for flag, value in (("--budget-device-hours", getattr(args, "budget_device_hours", None)),
                        ("--mde-target", getattr(args, "mde_target", 2.0))):
        if value is not None and not value > 0:
            raise UserError(f"{flag} {value}: expected a positive number")
    return Options(
        out=results_dir(args.out, name, cluster=args.cluster, storage=args.storage),
        preset=args.preset, data_root=args.data_root, synth_root=args.synth_root, cluster=args.cluster,
        storage=args.storage,
        dry_run=args.dry_run, wandb=args.wandb, resume=args.resume, report_only=args.report_only,
        seeds=seeds, seeds_auto_max=seeds_auto_max,
        budget_device_hours=getattr(args, "budget_device_hours", None), mde_target=getattr(args, "mde_target", 2.0),
        sets=absolute_overrides(parse_set_args(args.sets)), cache_dir=args.cache_dir,
        max_retries=args.max_retries, trials=getattr(args, "trials", None),
        concurrency=args.concurrency, time_budget_s=args.time_budget_s, readme=args.readme,
        verbose=args.verbose,
    )


def main(declarations: dict[str, Study | Sweep], argv: Sequence[str] | None, *, description: str,
         example: str, default_preset: str = "local") -> int:
    """Entry point of a study script: parse, run, print the plan or where the results are."""
    parser = argparse.ArgumentParser(description=description, epilog=example,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    is_sweep = isinstance(next(iter(declarations.values())), Sweep)
    add_arguments(parser, list(declarations), default_preset, sweep=is_sweep)
    try:
        args = parser.parse_args(argv)
    except UserError as e:  # an input path that does not exist: one line, before anything starts
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        return 2
    configure_logging(args.verbose, brief=True)
    decl = declarations[args.preset]
    opts = None
    try:
        opts = options_from_args(args, decl.name)
        result = run_sweep(decl, opts) if isinstance(decl, Sweep) else run_study(decl, opts)
    except (UserError, ConfigError) as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: nothing recorded as failed, no tables from a partial study
        kept = f" under {opts.out}" if opts and opts.out != DEFAULT_OUT_SENTINEL else ""
        then = ("--resume marks the interrupted trials failed in the Optuna storage and goes on with new ones"
                if is_sweep else "--resume continues the started runs from their last epoch")
        print(f"{Path(sys.argv[0]).name}: interrupted; the finished runs are kept{kept}: the same command with "
              f"{then}", file=sys.stderr)
        return 130
    if opts.dry_run:
        print(result)
        return 0
    out = Path(result).parent
    table = final_table(decl, out)
    if table:
        print(table)
    uri = storage_path(opts.storage) if opts.storage else None
    print(f"results in {join(uri, 'results', decl.name)} (staged in {out})" if is_uri(uri) else f"results in {out}")
    bad = unfinished_runs(Path(result))
    if bad:
        # After the tables are written (they list these runs): a non-zero exit is what
        # `ray job submit`, SLURM and CI see.
        print(f"{Path(sys.argv[0]).name}: {len(bad)} run(s) failed or truncated: {', '.join(bad)} "
              f"(see {result})", file=sys.stderr)
        return 1
    return 0


def final_table(decl: Study | Sweep, out: Path) -> str:
    """What a study prints when it ends: its main table (:func:`seld.study.ablation.main_table`), or
    a sweep's best trial (``best_config.json``); "" when neither exists."""
    if not isinstance(decl, Sweep):
        return main_table(decl, out)
    best = out / "best_config.json"
    if not best.is_file():
        return ""
    info = json.loads(best.read_text())
    return (f"best trial {info['trial']}: {info['metric']} = {info['value']:.2f}\n"
            + " ".join(info["set_args"]))


# Statuses of summary.csv (ablation) and trials.csv (sweep) rows that a study counts as finished:
# a sweep's trials that ASHA stopped or Optuna pruned ended as the sweep intended.
FINISHED_STATUSES = frozenset({"ok", "finished", "stopped_early", "pruned"})


def unfinished_runs(table: Path) -> list[str]:
    """The runs of a study's summary.csv / trials.csv that failed or were truncated
    (``variant-sSEED: status`` or ``trial N: status``); empty when every run finished."""
    import pandas as pd

    rows = pd.read_csv(table)
    if "status" not in rows.columns:
        return []
    bad = rows[~rows["status"].astype(str).isin(FINISHED_STATUSES)]
    if "variant" in rows.columns:
        return [f"{r.variant}-s{r.seed}: {r.status}" for r in bad.itertuples()]
    return [f"trial {r.number}: {r.status}" for r in bad.itertuples()]
