"""The ablation grid: every variant of a study trained with every seed, one Tune trial each.

Reads a :class:`Study` and the command-line options; writes ``results/<study>/summary.csv`` (one
tidy row per run), ``curves.csv``, the run folders under ``runs/`` and, through :mod:`seld.report`,
the tables and plots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seld.config import ExperimentConfig, preset_config, run_hash
from seld.paired import gather_study_counters
from seld.report import COUNTERS_NPZ, TableSpec, paste_into_readme, report_from_files
from seld.runfolder import METRICS_CSV, METRICS_JSON, atomic_write
from seld.storage import Mirror
from seld.study.cluster import (
    ClusterPlan,
    budget_overrides,
    check_shared_paths,
    estimate_run_hours,
    format_plan,
    plan_cluster,
    start_ray,
)
from seld.study.options import (
    DRIVER_PULL_SKIP,
    Options,
    mirrored,
    prepare_out,
    results_dir,
    study_mirror,
)
from seld.study.prepare import DataPlan, prepare_data, train_counts
from seld.study.progress import (
    PlannedRun,
    append_to_log,
    progress_callback,
    resources_line,
    study_log,
)
from seld.study.summary import (
    SUMMARY_COLUMNS,
    git_sha,
    read_curves,
    run_status,
    summary_row,
    write_rows,
)
from seld.study.tune import (
    ablation_trainable,
    error_text,
    fit_tuner,
    forwarded_env,
    log_tables_to_wandb,
    trial_env,
)

log = logging.getLogger(__package__)  # the package logs as one stage: "seld.study"

@dataclass(frozen=True)
class Variant:
    """One arm of an ablation: a name and dotted-key overrides of the study's base config."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Study:
    """An ablation study: every variant trained with every seed (one Tune trial each)."""

    name: str
    preset: str
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    tables: tuple[TableSpec, ...]
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """One run of the grid: its variant, seed, dotted overrides, config and run folder."""

    variant: Variant
    seed: int
    overrides: dict[str, Any]
    cfg: ExperimentConfig
    run_dir: Path

    @property
    def run_id(self) -> str:
        """``<variant>-s<seed>``: the run's name in Tune, progress lines and errors."""
        return f"{self.variant.name}-s{self.seed}"


def run_study(study: Study, opts: Options) -> Path | str:
    """Run an ablation study (or only its report). Returns summary.csv, or the plan text on --dry-run."""
    base = preset_config(study.preset, {**study.overrides, **opts.sets})
    plan = plan_cluster(opts.cluster, base, opts.storage, max_concurrent=opts.concurrency)
    out = results_dir(opts.out, study.name, plan=plan)
    mirror = study_mirror(out, study.name, plan)  # an object-store storage: `out` is its staging folder
    if opts.report_only:
        with mirrored(mirror):
            report_from_files(out, study.tables)
            _paste_readme(study, out, opts)
        return out / "summary.csv"
    seeds = tuple(opts.seeds) if opts.seeds else study.seeds
    counts = train_counts(base, opts)
    runs = _runs(study, seeds, plan, opts, out, counts)
    if opts.dry_run:
        hours = max(estimate_run_hours(r.cfg, *counts, plan) for r in runs)
        budget = max(r.cfg.train.time_budget_s for r in runs)
        return format_plan(plan, len(runs), hours, f"study {study.name!r} (preset {study.preset}, "
                                                    f"{len(study.variants)} variants x {len(seeds)} seeds)",
                           budget_s=budget)
    check_shared_paths(plan, {"--out": None if mirror else out, "--cache-dir": opts.cache_dir})
    with mirrored(mirror):
        prepare_out(out, opts, "summary.csv")
        with study_log(out) as log_path:
            log.info("study %s (preset %s): %d variants x %d seeds; event lines also in %s", study.name,
                     study.preset, len(study.variants), len(seeds), log_path)
            if mirror is not None:
                log.info("storage %s: results, run folders and checkpoints (staged in %s)", mirror.uri, out)
            work = out / "_work"
            data = prepare_data(base, opts, work)
            errors = _train_pending(study, runs, data, plan, out, opts, mirror)
            if mirror is not None:  # what the trials pushed (their rank 0 may have run on other nodes)
                mirror.pull(skip=DRIVER_PULL_SKIP)
            rows = _write_summary(study, runs, errors, data, out)
            paths = report_from_files(out, study.tables)
            _paste_readme(study, out, opts)
            n_failed = sum(r["status"] != "ok" for r in rows)
            log.info("study %s: %d ok, %d failed; summary in %s", study.name, len(rows) - n_failed, n_failed,
                     out / "summary.csv")
        table = main_table(study, out)
        if table:
            append_to_log(out, table)
    if opts.wandb:
        log_tables_to_wandb(study.name, out, [out / "summary.csv", *paths, log_path])
    n_bad = sum(r["status"] != "ok" for r in rows)
    log.info("study %s: %d ok, %d failed or truncated; summary in %s", study.name, len(rows) - n_bad,
             n_bad, out / "summary.csv")
    return out / "summary.csv"


def _runs(study: Study, seeds: tuple[int, ...], plan: ClusterPlan, opts: Options, out: Path,
          counts: tuple[int, int]) -> list[Run]:
    """Every (variant, seed) run of the grid, with its overrides, config and run folder.

    ``counts``: (real, synthetic) training clips, for the planned time budget of the `paper` preset
    (:func:`seld.study.cluster.budget_overrides`).
    """
    runs = []
    for v in study.variants:
        for seed in seeds:
            overrides = {**study.overrides, **v.overrides, **plan.overrides(), **opts.sets, "seed": seed}
            if opts.time_budget_s:
                overrides["train.time_budget_s"] = opts.time_budget_s
            hours = estimate_run_hours(preset_config(study.preset, overrides), *counts, plan)
            overrides.update(budget_overrides(study.preset, overrides, hours))
            cfg = preset_config(study.preset, overrides)
            # Named by the run's identity, not its bounds: a run its time budget stopped keeps its
            # folder under another --time-budget-s, and --resume continues it there.
            run_dir = out / "runs" / f"{v.name}-s{seed}-{run_hash(cfg)[:8]}"
            runs.append(Run(v, seed, overrides, cfg, run_dir))
    return runs


def training_order(pending: list[Run]) -> list[Run]:
    """The order a sitting trains ``pending`` runs in: those an earlier sitting started (they have
    epochs in metrics.csv) first, then the study's declared order (variants, then seeds). The
    reference variant is declared first, so it trains before the variants compared with it, and a
    sitting stopped part-way leaves whole comparisons rather than scattered half-runs."""
    return sorted(pending, key=lambda r: not (r.run_dir / METRICS_CSV).exists())  # stable: declared order kept


def _train_pending(study: Study, runs: list[Run], data: DataPlan, plan: ClusterPlan, out: Path,
                   opts: Options, mirror: Mirror | None = None) -> dict[str, str]:
    """Train the runs without a metrics.json; returns run_id -> error text of the trials that failed.
    ``mirror``: the study folder's object store (each trial gets its run folder's)."""
    truncated = [r for r in runs if run_status(r.run_dir, r.cfg, None)[0] == "time_budget"]
    pending = training_order([r for r in runs if not (r.run_dir / METRICS_JSON).exists()] + truncated)
    log.info("study %s: %d runs, %d finished before, %d to train (concurrency %d)", study.name,
             len(runs), len(runs) - len(pending), len(pending), opts.concurrency or plan.concurrency)
    for r in truncated:
        log.info("%s seed %d: stopped by its time budget before; continued from its last epoch "
                 "(train.time_budget_s=%g s for this attempt)", r.variant.name, r.seed, r.cfg.train.time_budget_s)
    errors: dict[str, str] = {}
    if pending:
        env = trial_env(opts, study.name)
        specs = {
            r.run_id: {
                "preset": study.preset, "overrides": r.overrides, "store": str(data.store),
                "run_dir": str(r.run_dir.resolve()), "tags": [study.name, r.variant.name, f"seed{r.seed}"],
                "wandb": {"project": "seld", "group": study.name} if opts.wandb else None, "env": env,
                **({"mirror": mirror.child(f"runs/{r.run_dir.name}")} if mirror is not None else {}),
            }
            for r in pending
        }
        planned = {r.run_id: PlannedRun(f"{r.variant.name} seed {r.seed}", r.variant.name, r.cfg.train.max_epochs)
                   for r in pending}
        progress = progress_callback(planned, n_total=len(runs), n_done_before=len(runs) - len(pending),
                                     concurrency=opts.concurrency or plan.concurrency, max_retries=opts.max_retries)
        errors = _tune_grid(specs, plan, out, study.name, opts, progress)
    return errors


def _write_summary(study: Study, runs: list[Run], errors: dict[str, str], data: DataPlan,
                   out: Path) -> list[dict[str, Any]]:
    """summary.csv (one row per run, failed ones with their error) and curves.csv; returns the rows."""
    sha = git_sha()
    rows = []
    for r in runs:
        status, error = run_status(r.run_dir, r.cfg, errors.get(r.run_id))
        rows.append(summary_row(study.name, r.variant.name, r.seed, r.cfg, r.run_dir, out, data, sha, status,
                                error, {}))
    write_rows(rows, out / "summary.csv", SUMMARY_COLUMNS)
    # Per-test-file counters of the finished runs: the tables' paired file intervals (--report-only).
    ok = [(r.variant.name, r.seed, r.run_dir) for r, row in zip(runs, rows, strict=True) if row["status"] == "ok"]
    gather_study_counters(out / COUNTERS_NPZ, ok)
    curves = read_curves([(r.variant.name, r.seed, r.run_dir) for r in runs])
    if curves is not None:
        with atomic_write(out / "curves.csv") as tmp:
            curves.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")
    return rows


def _paste_readme(study: Study, out: Path, opts: Options) -> None:
    if opts.readme is None or not study.tables:
        return
    table = study.tables[0]
    pasted = paste_into_readme(opts.readme, out / f"{table.name}.md", f"{study.name}:{table.name}")
    if pasted is not None:
        log.info("pasted %s into %s", out / f"{table.name}.md", pasted)


def _tune_grid(specs: dict[str, dict], plan: ClusterPlan, out: Path, name: str, opts: Options,
               progress) -> dict[str, str]:
    """One Tune trial per run spec, ``progress`` logging its events; returns run_id -> error text
    of the trials that failed."""
    from ray import tune

    start_ray(plan, forwarded_env(opts))
    log.info("%s", resources_line(opts.concurrency or plan.concurrency, plan.workers_per_trial,
                                  plan.cpus_per_worker, plan.gpus_per_worker))
    # Trials start in the order of ``specs`` (see _train_pending), not alphabetically.
    results = fit_tuner(ablation_trainable(specs, plan), {"run_id": tune.grid_search(list(specs))}, plan,
                        out, name, opts, callbacks=[progress])
    errors = {}
    for res in results:
        run_id = (res.config or {}).get("run_id")
        if res.error is not None and run_id:
            errors[run_id] = error_text(res.error)
    return errors


def main_table(study: Study, out: Path) -> str:
    """What a study prints when it ends: its first table's title and rows (from ``<table>.md``);
    "" when the study has no table or it was not written."""
    if not study.tables:
        return ""
    md = out / f"{study.tables[0].name}.md"
    if not md.is_file():
        return ""
    lines = md.read_text(encoding="utf-8").splitlines()
    title = next((x.lstrip("# ") for x in lines if x.startswith("# ")), study.tables[0].title)
    start = next((i for i, x in enumerate(lines) if x.startswith("|")), None)
    if start is None:
        return ""
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join([title, *lines[start:end]])
