"""The ablation grid: every variant of a study trained with every seed, one Tune trial each.

Reads a :class:`Study` and the command-line options; writes ``results/<study>/summary.csv`` (one
tidy row per run), ``curves.csv``, the run folders under ``runs/`` and, through :mod:`seld.report`,
the tables and plots. With ``--seeds auto[:MAX]`` it then adds seeds one at a time, only to the rows
of comparisons still unsettled (:mod:`seld.paired`'s group-sequential test), and writes the plan to
``sequential.json``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from seld.config import ExperimentConfig, flatten, preset_config, run_config_dict, run_hash
from seld.errors import UserError
from seld.paired import SequentialPlan, gather_study_counters, load_counters, write_plan
from seld.report import (
    COUNTERS_NPZ,
    SEQUENTIAL_JSON,
    TableSpec,
    paste_into_readme,
    report_from_files,
    sequential_status,
)
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
    planned_epoch_clips,
    progress_callback,
    recorded_costs,
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
            report_from_files(out, study.tables, opts.mde_target)
            _paste_readme(study, out, opts)
        return out / "summary.csv"
    sequential = sequential_plan(study, opts)
    seeds = (sequential.seeds[:sequential.n_planned] if sequential else
             tuple(opts.seeds) if opts.seeds else study.seeds)
    counts = train_counts(base, opts)
    runs = _runs(study, seeds, plan, opts, out, counts)
    if opts.dry_run:
        hours = max(estimate_run_hours(r.cfg, *counts, plan) for r in runs)
        budget = max(r.cfg.train.time_budget_s for r in runs)
        more = f", then up to {sequential.max_seeds} seeds per row where unsettled" if sequential else ""
        return format_plan(plan, len(runs), hours, f"study {study.name!r} (preset {study.preset}, "
                                                    f"{len(study.variants)} variants x {len(seeds)} seeds{more})",
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
            data = prepare_data(base, opts, work, plan.storage)
            if sequential is not None:
                write_plan(out / SEQUENTIAL_JSON, sequential)
            else:  # a plan left by an earlier --seeds auto sitting would describe other runs
                (out / SEQUENTIAL_JSON).unlink(missing_ok=True)
            errors = _train_pending(study, runs, data, plan, out, opts, mirror)
            if mirror is not None:  # what the trials pushed (their rank 0 may have run on other nodes)
                mirror.pull(skip=DRIVER_PULL_SKIP)
            rows = _write_summary(study, runs, errors, data, out)
            if sequential is not None:
                rows = _add_seeds(study, sequential, runs, errors, data, plan, out, opts, counts, mirror)
            paths = report_from_files(out, study.tables, opts.mde_target)
            _paste_readme(study, out, opts)
            # The study's one closing line (in study.log too); the table follows it.
            n_bad = sum(r["status"] != "ok" for r in rows)
            log.info("study %s: %d ok, %d failed or truncated; summary in %s", study.name, len(rows) - n_bad,
                     n_bad, out / "summary.csv")
        table = main_table(study, out)
        if table:
            append_to_log(out, table)
    if opts.wandb:
        log_tables_to_wandb(study.name, out, [out / "summary.csv", *paths, log_path])
    return out / "summary.csv"


def _runs(study: Study, seeds: tuple[int, ...], plan: ClusterPlan, opts: Options, out: Path,
          counts: tuple[int, int]) -> list[Run]:
    """Every (variant, seed) run of the grid, with its overrides, config and run folder.

    ``counts``: (real, synthetic) training clips, for the planned time budget of the `paper` preset
    (:func:`seld.study.cluster.budget_overrides`).
    """
    return [_run(study, v, seed, plan, opts, out, counts) for v in study.variants for seed in seeds]


def _run(study: Study, v: Variant, seed: int, plan: ClusterPlan, opts: Options, out: Path,
         counts: tuple[int, int]) -> Run:
    overrides = {**study.overrides, **v.overrides, **plan.overrides(), **opts.sets, "seed": seed}
    if opts.time_budget_s:
        overrides["train.time_budget_s"] = opts.time_budget_s
    hours = estimate_run_hours(preset_config(study.preset, overrides), *counts, plan)
    overrides.update(budget_overrides(study.preset, overrides, hours))
    cfg = preset_config(study.preset, overrides)
    # Named by the run's identity, not its bounds: a run its time budget stopped keeps its
    # folder under another --time-budget-s, and --resume continues it there.
    run_dir = out / "runs" / f"{v.name}-s{seed}-{run_hash(cfg)[:8]}"
    return Run(v, seed, overrides, cfg, run_dir)


def config_changes(pending: list[Run], out: Path) -> tuple[int, dict[str, tuple[Any, Any]]]:
    """Runs to train that have a folder of the same variant and seed under ``out/runs`` trained
    with another config (the code's config changed since, or other ``--set`` values): how many, and
    the keys that differ, {dotted key: (recorded value, planned value)} (keys absent on one side
    show ``<absent>``). Such folders are kept but not reused: a run is its config."""
    n, keys = 0, {}
    for r in pending:
        others = sorted(p for p in r.run_dir.parent.glob(f"{r.variant.name}-s{r.seed}-*")
                        if p != r.run_dir and (p / "config.json").is_file())
        if not others:
            continue
        n += 1
        try:
            old = flatten(run_config_dict(json.loads((others[-1] / "config.json").read_text())))
        except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged record: say so, keep going
            keys.setdefault(f"{others[-1] / 'config.json'} (unreadable: {type(e).__name__})", ("?", "?"))
            continue
        new = flatten(run_config_dict(r.cfg))
        for k in sorted(set(old) | set(new)):
            if old.get(k, "<absent>") != new.get(k, "<absent>"):
                keys.setdefault(k, (old.get(k, "<absent>"), new.get(k, "<absent>")))
    return n, keys


def sequential_plan(study: Study, opts: Options) -> SequentialPlan | None:
    """The plan of ``--seeds auto[:MAX]`` (None without it): the study's seeds first, then the next
    integers up to MAX seeds in all. A one-line UserError when the study cannot use it."""
    if opts.seeds_auto_max is None:
        if opts.budget_device_hours is not None:
            raise UserError("--budget-device-hours: only with --seeds auto (a fixed grid trains every run)")
        return None
    if not any(c.verdict for t in study.tables for c in t.comparisons):
        raise UserError(f"--seeds auto: study {study.name!r} has no comparison with a verdict to settle")
    planned = tuple(study.seeds)
    if opts.seeds_auto_max < len(planned):
        raise UserError(f"--seeds auto:{opts.seeds_auto_max}: fewer than the study's {len(planned)} planned seeds")
    extra = tuple(range(max(planned) + 1, max(planned) + 1 + opts.seeds_auto_max - len(planned)))
    return SequentialPlan(planned + extra, len(planned))


def runs_wanted(rows, counters: dict | None, tables: tuple[TableSpec, ...],
                sequential: SequentialPlan) -> set[tuple[str, int]]:
    """The (variant, seed) runs the unsettled comparisons need next: for each verdict comparison
    whose sequential test is still running at n seeds, its two rows' variants with the plan's first
    n + 1 seeds (runs already in ``rows`` included).

    Args:
        rows: the study's summary rows (summary.csv as a DataFrame).
        counters: its counters.npz arrays (the file intervals take part in a verdict), or None.
    """
    wanted: set[tuple[str, int]] = set()
    for spec in tables:
        for a, b, res in sequential_status(rows, spec, counters, sequential):
            if res.state == "running":
                wanted |= {(row.variant, s) for row in (a, b) for s in sequential.seeds[:res.n_seeds + 1]}
    return wanted


def device_hours_used(rows) -> tuple[float, float]:
    """(device-hours a study's summary rows used, the mean of one finished run) for
    ``--budget-device-hours``. A failed or cut-short run records no device-hours but spent some: it
    counts as a finished run's mean, so failures and retries do not let the study overrun its budget."""
    import pandas as pd

    if "device_hours" not in rows or not len(rows):
        return 0.0, 0.0
    hours = pd.to_numeric(rows["device_hours"], errors="coerce")
    per_run = float(hours[rows["status"] == "ok"].mean())
    per_run = per_run if math.isfinite(per_run) else 0.0
    return float(hours.fillna(per_run).sum()), per_run


def _add_seeds(study: Study, sequential: SequentialPlan, runs: list[Run], errors: dict[str, str],
               data: DataPlan, plan: ClusterPlan, out: Path, opts: Options, counts: tuple[int, int],
               mirror: Mirror | None) -> list[dict[str, Any]]:
    """``--seeds auto``: while a verdict comparison is unsettled and can still settle, train the next
    seed of its two rows' variants (all such comparisons advance together, one Tune fit per round),
    rewrite the summary and look again. Decisions come only from summary.csv and counters.npz, so a
    --resume replays them and trains only what is missing. Appends to ``runs``; returns the rows."""
    import pandas as pd

    by_name = {v.name: v for v in study.variants}
    order = {v.name: i for i, v in enumerate(study.variants)}
    attempted = {(r.variant.name, r.seed) for r in runs}  # trained (or tried) once in this sitting
    while True:
        rows = pd.read_csv(out / "summary.csv")  # the values the tables read, to the digit
        counters = load_counters(out / COUNTERS_NPZ)[1] if (out / COUNTERS_NPZ).is_file() else None
        ok = {(str(r.variant), int(r.seed)) for r in rows.itertuples() if r.status == "ok"}
        wanted = runs_wanted(rows, counters, study.tables, sequential)
        todo = sorted(wanted - ok - attempted, key=lambda k: (sequential.seeds.index(k[1]), order[k[0]]))
        if not todo:
            if wanted - ok:
                log.warning("study %s: %d wanted run(s) failed; their comparisons stay open: %s", study.name,
                            len(wanted - ok), ", ".join(f"{v}-s{s}" for v, s in sorted(wanted - ok)))
            break
        new = [_run(study, by_name[v], seed, plan, opts, out, counts) for v, seed in todo]
        to_train = [r for r in new if not (r.run_dir / METRICS_JSON).exists()]
        if opts.budget_device_hours is not None and to_train:
            used, per_run = device_hours_used(rows)
            need = len(to_train) * per_run
            if used + need > opts.budget_device_hours:
                log.info("study %s: %.3f device-hours used, the next %d run(s) need about %.3f: over the "
                         "budget of %g; no more seeds", study.name, used, len(to_train), need,
                         opts.budget_device_hours)
                write_plan(out / SEQUENTIAL_JSON, replace(sequential, stopped_by_budget=True))
                break
        log.info("study %s: adding %s for the comparisons still unsettled", study.name,
                 ", ".join(f"{v}-s{s}" for v, s in todo))
        attempted |= set(todo)
        runs += new
        errors.update(_train_pending(study, new, data, plan, out, opts, mirror))
        if mirror is not None:
            mirror.pull(skip=DRIVER_PULL_SKIP)
        runs.sort(key=lambda r: (order[r.variant.name], sequential.seeds.index(r.seed)))
        _write_summary(study, runs, errors, data, out)
    return pd.read_csv(out / "summary.csv").to_dict("records")


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
    n_changed, changed = config_changes(pending, out)
    if n_changed:
        shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        log.warning("study %s: %d of the runs to train have a folder under %s trained with another config "
                    "(%s%s); those folders are kept, not reused", study.name, n_changed, out / "runs", shown, more)
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
        counts = train_counts(pending[0].cfg, opts)  # the time left counts each epoch's clips
        planned = {r.run_id: PlannedRun(f"{r.variant.name} seed {r.seed}", r.variant.name, r.cfg.train.max_epochs,
                                        planned_epoch_clips(r.cfg, *counts))
                   for r in pending}
        progress = progress_callback(planned, n_total=len(runs), n_done_before=len(runs) - len(pending),
                                     concurrency=opts.concurrency or plan.concurrency, max_retries=opts.max_retries,
                                     recorded=recorded_costs(out / "summary.csv"))
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
    log.info("%s", resources_line(opts.concurrency or plan.concurrency, plan, opts.sets))
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
