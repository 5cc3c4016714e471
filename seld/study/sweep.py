"""The sweep: Optuna (seeded TPE, or random) proposes, ASHA stops early, over Tune trials.

Reads a :class:`Sweep` and the command-line options; writes under ``results/<sweep>/`` the Optuna
journal, ``tune_trials.jsonl``, the run folders under ``runs/``, ``trials.csv`` (one row per Optuna
trial), ``best_config.json`` and Optuna's plots. A trial and its run folder are tied by identity:
the folder is named by the Tune trial id, its ``attempts.jsonl`` records the Optuna trial number
and the Optuna trial the Tune trial id (seld/study/search.py hands them out).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from seld.config import ConfigError, preset_config
from seld.errors import UserError
from seld.runfolder import (
    ATTEMPTS,
    BEST_F20,
    CONFIG_JSON,
    METRICS_CSV,
    METRICS_JSON,
    atomic_write,
    write_json_atomic,
)
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
from seld.study.prepare import prepare_data, train_counts
from seld.study.progress import progress_callback, resources_line, study_log
from seld.study.summary import flatten_metrics, write_rows
from seld.study.tune import (
    error_text,
    fit_tuner,
    forwarded_env,
    log_tables_to_wandb,
    sweep_trainable,
    trial_env,
)

log = logging.getLogger(__package__)  # the package logs as one stage: "seld.study"


@dataclass(frozen=True)
class Param:
    """One dimension of a sweep's search space: ``kind`` in loguniform/uniform/int/choice."""

    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("loguniform", "uniform", "int", "choice"):
            raise ConfigError(f"sweep space: unknown kind {self.kind!r}; use loguniform/uniform/int/choice")
        if self.kind == "choice" and not self.choices:
            raise ConfigError("sweep space: a choice needs choices")
        if self.kind != "choice" and not self.low < self.high:
            raise ConfigError(f"sweep space: need low < high, got {self.low}..{self.high}")

    def values(self) -> list[Any] | None:
        """Every value of a finite dimension (choice, int), in order; None for a continuous one."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1))
        return None

    def grid(self, n: int = 3) -> list[Any]:
        """A small grid over this dimension (for the grid baseline of the efficiency benchmark)."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return sorted({int(round(v)) for v in [self.low + (self.high - self.low) * i / (n - 1) for i in range(n)]})
        if self.kind == "loguniform":
            return [float(self.low * (self.high / self.low) ** (i / (n - 1))) for i in range(n)]
        return [float(self.low + (self.high - self.low) * i / (n - 1)) for i in range(n)]


@dataclass(frozen=True)
class Sweep:
    """A hyperparameter sweep: Optuna (seeded TPE, or random) proposes, ASHA stops early, on ``metric``.

    In a finite space no point is trained twice (see :func:`sweep_searcher`). The metric is the
    run's best validation F20 so far (``val/best_f20``, in every report of a run, the final one
    included): a trial ASHA stops and a finished trial are then both recorded at their best epoch,
    the checkpoint each would deliver, and ASHA's rungs compare that too.
    """

    name: str
    preset: str
    space: dict[str, Param]
    n_trials: int
    seed: int = 0
    metric: str = BEST_F20
    mode: str = "max"
    grace_period: int = 2  # epochs before ASHA may stop a trial
    reduction_factor: int = 3
    overrides: dict[str, Any] = field(default_factory=dict)
    sampler: str = "tpe"  # or "random" (the baseline the efficiency benchmark compares against)

    def __post_init__(self) -> None:
        if self.sampler not in ("tpe", "random"):
            raise ConfigError(f"sweep {self.name!r}: sampler must be 'tpe' or 'random', got {self.sampler!r}")

    def space_size(self) -> int | None:
        """Number of distinct points when every dimension is finite (choice/int), else None."""
        values = [p.values() for p in self.space.values()]
        return None if any(v is None for v in values) else math.prod(len(v) for v in values)


def optuna_distributions(space: dict[str, Param]) -> dict[str, Any]:
    """The space as Optuna distributions, in the space's order (the order the sampler draws in); the
    same distributions Tune's OptunaSearch made of :func:`tune_space` (tests/test_sweep.py)."""
    import optuna

    out = {}
    for key, p in space.items():
        if p.kind in ("loguniform", "uniform"):
            out[key] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.kind == "loguniform")
        elif p.kind == "int":
            out[key] = optuna.distributions.IntDistribution(int(p.low), int(p.high))
        else:
            out[key] = optuna.distributions.CategoricalDistribution(list(p.choices))
    return out


def tune_space(space: dict[str, Param]) -> dict[str, Any]:
    """The space as Tune search domains (for a Tuner without the sweep's searcher)."""
    from ray import tune

    out = {}
    for key, p in space.items():
        if p.kind == "loguniform":
            out[key] = tune.loguniform(p.low, p.high)
        elif p.kind == "uniform":
            out[key] = tune.uniform(p.low, p.high)
        elif p.kind == "int":
            out[key] = tune.randint(int(p.low), int(p.high) + 1)
        else:
            out[key] = tune.choice(list(p.choices))
    return out


def optuna_storage(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def _finished_trials(storage, name: str) -> list:
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return []
    return [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]


def _fail_interrupted_trials(storage, name: str) -> int:
    """Mark trials a killed sweep left RUNNING in the Optuna storage as FAIL (their Tune trials are
    gone), so trials.csv and Optuna's tools do not show them as running forever. Returns how many."""
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return 0
    stale = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    for t in stale:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    if stale:
        log.warning("sweep %s: %d trial(s) interrupted by the earlier kill or Ctrl-C marked failed: %s", name,
                    len(stale), [t.number for t in stale])
    return len(stale)


def run_sweep(sweep: Sweep, opts: Options) -> Path | str:
    """Run (or resume) a sweep: Optuna TPE + ASHA over Tune trials; writes trials.csv, the best
    config and the plots. Returns trials.csv, or the plan text on --dry-run."""
    n_trials = opts.trials or sweep.n_trials
    base = preset_config(sweep.preset, {**sweep.overrides, **opts.sets})
    plan = plan_cluster(opts.cluster, base, opts.storage, max_concurrent=opts.concurrency)
    out = results_dir(opts.out, sweep.name, plan=plan)
    counts = train_counts(base, opts)
    hours = estimate_run_hours(base, *counts, plan)
    overrides = {**sweep.overrides, **plan.overrides(), **opts.sets, "seed": sweep.seed}
    if opts.time_budget_s:
        overrides["train.time_budget_s"] = opts.time_budget_s
    overrides.update(budget_overrides(sweep.preset, overrides, hours))
    if opts.dry_run:
        return format_plan(plan, n_trials, hours, f"sweep {sweep.name!r} (preset {sweep.preset}, "
                                                  f"{len(sweep.space)} parameters, Optuna TPE + ASHA; "
                                                  "hours assume no early stop)",
                           budget_s=preset_config(sweep.preset, overrides).train.time_budget_s)
    mirror = study_mirror(out, sweep.name, plan)  # an object-store storage: `out` is its staging folder
    if opts.report_only:
        with mirrored(mirror):
            return _sweep_outputs(sweep, out, optuna_storage(out / "optuna.journal"))
    check_shared_paths(plan, {"--out": None if mirror else out, "--cache-dir": opts.cache_dir})
    with mirrored(mirror):
        prepare_out(out, opts, "optuna.journal")
        with study_log(out) as log_path:
            storage = optuna_storage(out / "optuna.journal")
            _fail_interrupted_trials(storage, sweep.name)
            done = _finished_trials(storage, sweep.name)
            remaining = n_trials - len(done)
            log.info("sweep %s: %d of %d trials finished before, %d to run; event lines also in %s", sweep.name,
                     len(done), n_trials, max(remaining, 0), log_path)
            data = prepare_data(base, opts, out / "_work", plan.storage)
            if remaining > 0:
                spec = {"preset": sweep.preset, "overrides": overrides, "store": str(data.store),
                        "run_dir": str((out / "runs").resolve()), "tags": [sweep.name],
                        "wandb": {"project": "seld", "group": sweep.name} if opts.wandb else None,
                        "env": trial_env(opts, sweep.name),
                        **({"mirror": mirror.child("runs")} if mirror is not None else {})}
                _tune_sweep(sweep, spec, storage, remaining, plan, out, opts, mirror)
                if mirror is not None:  # what the trials pushed (their rank 0 may have run on other nodes)
                    mirror.pull(skip=DRIVER_PULL_SKIP)
            trials = _sweep_outputs(sweep, out, storage)
    if opts.wandb:
        log_tables_to_wandb(sweep.name, out, [trials, *sorted(out.glob("*.png")), log_path])
    return trials


def sweep_scheduler(sweep: Sweep, max_t: int):
    """ASHA on the sweep's metric, one rung unit per epoch (Tune's ``training_iteration``).

    Each epoch is one Tune iteration and the run's final report (test scores) one more; ASHA sees
    the epochs only (:class:`seld.study.search.FinalReportASHA`), so it never stops a run that is
    finishing. ``max_t`` (epochs of the trained stages) + 1 keeps the rungs where they were when
    ASHA saw the final report too (tests/test_sweep.py replays a recorded sweep).
    """
    from seld.study.search import FinalReportASHA

    return FinalReportASHA(time_attr="training_iteration", max_t=max(1, max_t) + 1,
                           grace_period=max(1, min(sweep.grace_period, max_t)),
                           reduction_factor=sweep.reduction_factor)


MAX_DISTINCT_POINTS = 10_000  # finite spaces up to this size never train a point twice


def sweep_searcher(sweep: Sweep, storage, n_before: int = 0):
    """The sweep's Tune searcher: Optuna (seeded TPE, or random) over ``storage``, through Optuna's
    ask/tell (:class:`seld.study.search.OptunaAskTell`).

    In a finite space (every dimension a choice or an int, at most MAX_DISTINCT_POINTS points) a
    point is never trained twice: TPE often proposes its favourite again, and a repeat buys at best
    a second seed of one config. A repeated proposal is recorded in Optuna as a FAIL trial with the
    user attribute ``repeat_of``; after ``search.MAX_REPEATS`` repeats in a row an unproposed point
    is drawn uniformly (seeded); once every point is proposed the searcher reports the space
    exhausted and Tune stops asking.

    Args:
        storage: Optuna storage holding the study ``sweep.name`` (created when absent); points of
            earlier trials in it count as proposed.
        n_before: trials finished before (a resumed sweep); offsets the sampler seed so a resumed
            sweep does not replay the proposals of the first start.
    """
    import optuna

    from seld.study.search import OptunaAskTell

    seed = sweep.seed + n_before
    if sweep.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(5, sweep.n_trials // 3)))
    size = sweep.space_size()
    points = None
    if size is not None and size <= MAX_DISTINCT_POINTS:  # continuous or huge: repeats are rare, allowed
        keys = sorted(sweep.space)
        points = [dict(zip(keys, c, strict=True))
                  for c in itertools.product(*(sweep.space[k].values() for k in keys))]
    return OptunaAskTell(optuna_distributions(sweep.space), study_name=sweep.name, storage=storage,
                         sampler=sampler, metric=sweep.metric, mode=sweep.mode, points=points, seed=seed)


# The sweep's state a --resume reads: pushed to an object store at every trial event, so a driver
# killed mid-sweep (SIGKILL: no `finally`) loses at most the trial in flight, not the search.
SWEEP_STATE = ("optuna.journal", "study.log")


def journal_push_callback(mirror: Mirror):
    """A Tune callback that pushes :data:`SWEEP_STATE` to ``mirror`` when a trial starts, completes
    or fails (:class:`seld.study.search.JournalPush`)."""
    from seld.study.search import JournalPush

    return JournalPush(mirror, SWEEP_STATE)


def _tune_sweep(sweep: Sweep, spec: dict, storage, n: int, plan: ClusterPlan, out: Path, opts: Options,
                mirror: Mirror | None = None) -> None:
    start_ray(plan, forwarded_env(opts))
    cfg = preset_config(sweep.preset, spec["overrides"])
    max_t = cfg.train.max_epochs
    # Optuna ids of earlier trials seed the sampler's RNG offset so a resumed sweep does not
    # replay the same proposals.
    n_before = len(_finished_trials(storage, sweep.name))
    searcher = sweep_searcher(sweep, storage, n_before)
    scheduler = sweep_scheduler(sweep, max_t)
    concurrency = opts.concurrency or plan.concurrency
    log.info("%s", resources_line(concurrency, plan, opts.sets))
    progress = progress_callback({}, n_total=n_before + n, n_done_before=n_before, concurrency=concurrency,
                                 max_retries=opts.max_retries, default_epochs=max_t)
    # The searcher holds the space (Optuna's distributions) and hands each trial its whole config.
    results = fit_tuner(sweep_trainable(spec, plan), {}, plan, out, sweep.name, opts,
                        callbacks=[progress, *([journal_push_callback(mirror)] if mirror is not None else [])],
                        metric=sweep.metric, mode=sweep.mode, search_alg=searcher,
                        scheduler=scheduler, num_samples=n)
    records = []
    for res in results:
        m = res.metrics or {}
        trial_id = m.get("trial_id") or Path(res.path).name
        records.append({"trial_id": trial_id, "optuna_trial": (res.config or {}).get("optuna_trial"),
                        "error": error_text(res.error), "training_iteration": m.get("training_iteration"),
                        "last/" + sweep.metric: m.get(sweep.metric)})
    log_path = out / "tune_trials.jsonl"
    with open(log_path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


LEGACY_METRIC = "val/f20"  # what a sweep whose journal does not name its metric optimised


def _sweep_outputs(sweep: Sweep, out: Path, storage) -> Path:
    """trials.csv (one row per Optuna trial), best_config.json and Optuna's matplotlib plots."""
    import optuna

    from seld.study.search import METRIC_ATTR, REPEAT_ATTR, TUNE_TRIAL_ATTR

    try:
        study = optuna.load_study(study_name=sweep.name, storage=storage)
    except KeyError:
        raise UserError(f"{out}: no sweep {sweep.name!r} recorded yet") from None
    folders = trial_folders(out)
    tune_log = _tune_log(out)
    rows = []
    repeats = 0
    for t in study.trials:
        if t.user_attrs.get(REPEAT_ATTR) is not None:  # a repeated proposal, never trained
            repeats += 1
            continue
        trial_dir = folders.get(t.number)
        tune_id = t.user_attrs.get(TUNE_TRIAL_ATTR)
        if trial_dir is not None and tune_id is not None and tune_id != trial_dir.name:
            raise UserError(f"{out / 'optuna.journal'}: Optuna trial {t.number} ran as Tune trial {tune_id}, but "
                            f"runs/{trial_dir.name}/{ATTEMPTS} names it; expected runs/{tune_id}")
        rows.append(_trial_row(t, dict(t.params), trial_dir, tune_log))
    df = write_rows(rows, out / "trials.csv", ("number", "trial_id", "status", "error", "value", "epochs"))
    best = study.best_trial if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) else None
    if best is not None:
        _write_best_config(sweep, study.user_attrs.get(METRIC_ATTR, LEGACY_METRIC), best, folders.get(best.number),
                           out)
    _sweep_plots(study, out)
    log.info("sweep %s: %d trials in %s (%d repeated proposals skipped)", sweep.name, len(df),
             out / "trials.csv", repeats)
    return out / "trials.csv"


def trial_folders(out: Path) -> dict[int, Path]:
    """The sweep's run folders by Optuna trial number: the number each folder's attempts.jsonl
    records (``optuna_trial``; every attempt of a trial runs in the folder named by its Tune trial
    id). A folder without one (a trial recorded before trials carried their ids) is left out, with
    a warning; two trials in one folder, or one trial in two folders, is an error."""
    folders: dict[int, Path] = {}
    without = []
    runs_root = out / "runs"
    for d in sorted(runs_root.iterdir() if runs_root.is_dir() else []):
        if not (d / CONFIG_JSON).exists():
            continue
        lines = (d / ATTEMPTS).read_text().splitlines() if (d / ATTEMPTS).exists() else []
        numbers = {json.loads(line).get("optuna_trial") for line in lines if line.strip()} - {None}
        if not numbers:
            without.append(d.name)
            continue
        if len(numbers) > 1:
            raise UserError(f"{d / ATTEMPTS}: attempts of Optuna trials {sorted(numbers)}; expected one trial per folder")
        number = numbers.pop()
        if number in folders:
            raise UserError(f"{d / ATTEMPTS}: Optuna trial {number} also ran in {folders[number]}; expected one folder")
        folders[number] = d
    if without:
        log.warning("sweep %s: %d run folder(s) record no Optuna trial number in %s, left out of trials.csv: %s",
                    out.name, len(without), ATTEMPTS, without)
    return folders


def _tune_log(out: Path) -> dict[str, dict[str, Any]]:
    """tune_trials.jsonl (Tune's view of each trial: its error, last iteration), by trial id."""
    tune_log = {}
    if (out / "tune_trials.jsonl").exists():
        for line in (out / "tune_trials.jsonl").read_text().splitlines():
            rec = json.loads(line)
            tune_log[rec["trial_id"]] = rec
    return tune_log


def _trial_row(t, params: dict[str, Any], trial_dir: Path | None, tune_log: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One trials.csv row: the Optuna trial, its parameters and its run folder's metrics."""
    metrics = json.loads((trial_dir / METRICS_JSON).read_text()) if trial_dir and (trial_dir / METRICS_JSON).exists() else {}
    n_epochs = 0
    if trial_dir and (trial_dir / METRICS_CSV).exists() and (trial_dir / METRICS_CSV).stat().st_size:
        n_epochs = len(pd.read_csv(trial_dir / METRICS_CSV))
    tl = tune_log.get(trial_dir.name, {}) if trial_dir else {}
    status = t.state.name.lower()
    if status == "complete":
        status = "finished" if metrics else "stopped_early"
        if metrics.get("status", "ok") != "ok":
            status = metrics["status"]  # "time_budget": the run's budget stopped it, not ASHA
    row = {"number": t.number, "trial_id": trial_dir.name if trial_dir else "", "status": status,
           "error": tl.get("error", ""), "value": t.value, "epochs": n_epochs,
           **{f"param/{k}": v for k, v in params.items()}}
    row.update({k: v for k, v in flatten_metrics(metrics).items() if not k.startswith("classwise")
                and "/class/" not in k and k != "status"})
    return row


def _write_best_config(sweep: Sweep, metric: str, best, best_dir: Path | None, out: Path) -> None:
    """best_config.json: the best trial's value, overrides (also as --set arguments) and full config."""
    best_json = {
        "study": sweep.name, "metric": metric, "mode": sweep.mode, "value": best.value,
        "trial": best.number, "overrides": dict(sorted(best.params.items())),
        "set_args": [f"--set {k}={v}" for k, v in sorted(best.params.items())],
        "config": json.loads((best_dir / CONFIG_JSON).read_text()) if best_dir else None,
    }
    write_json_atomic(out / "best_config.json", best_json)


def _sweep_plots(study, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    plots = {"optimization_history": ovm.plot_optimization_history,
             "param_importances": ovm.plot_param_importances,
             "parallel_coordinate": ovm.plot_parallel_coordinate}
    for name, fn in plots.items():
        try:
            ax = fn(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            log.warning("sweep plot %s skipped: %s", name, e)
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flatten()[0].figure
        with atomic_write(out / f"{name}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
