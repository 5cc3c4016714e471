"""The sweep: Optuna (seeded TPE, or random) proposes, ASHA stops early, over Tune trials.

Reads a :class:`Sweep` and the command-line options; writes under ``results/<sweep>/`` the Optuna
journal, ``tune_trials.jsonl``, the run folders under ``runs/``, ``trials.csv`` (one row per Optuna
trial), ``best_config.json`` and Optuna's plots.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from seld.config import ConfigError, flatten, preset_config
from seld.errors import UserError
from seld.runfolder import (
    ATTEMPTS,
    CONFIG_JSON,
    METRICS_CSV,
    METRICS_JSON,
    RUN_FINISHED,
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

    In a finite space no point is trained twice (see :func:`sweep_searcher`).
    """

    name: str
    preset: str
    space: dict[str, Param]
    n_trials: int
    seed: int = 0
    metric: str = "val/f20"
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


def tune_space(space: dict[str, Param]) -> dict[str, Any]:
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
        log.warning("sweep %s: %d trial(s) interrupted by the earlier kill marked failed: %s", name, len(stale),
                    [t.number for t in stale])
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

    Each epoch is one Tune iteration and the run's final report (test scores) one more: a trial
    that survives every rung must reach ``max_t + 1`` (``max_t`` = epochs of the trained stages),
    or ASHA stops it before its scores exist. ASHA's STOP on that final report (``run_finished``)
    becomes CONTINUE, with ASHA's bookkeeping unchanged: the run has no epoch left, and a STOP
    there made Tune destroy the trial's process while it was still finishing the run (metrics.json's
    driver-side costs, the W&B run, whose offline log was then left empty).
    """
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class FinalReportASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            action = super().on_trial_result(tune_controller, trial, result)
            if result.get(RUN_FINISHED) and action == TrialScheduler.STOP:
                self._num_stopped -= 1  # ASHA counted a stop that does not happen
                return TrialScheduler.CONTINUE
            return action

    return FinalReportASHA(time_attr="training_iteration", max_t=max(1, max_t) + 1,
                           grace_period=max(1, min(sweep.grace_period, max_t)),
                           reduction_factor=sweep.reduction_factor)


REPEAT_ATTR = "repeat_of"  # Optuna user attribute of a proposal skipped as a repeat (never trained)
MAX_DISTINCT_POINTS = 10_000  # finite spaces up to this size never train a point twice
MAX_REPEATS = 20  # repeated proposals in a row before an unproposed point is drawn uniformly


def sweep_searcher(sweep: Sweep, storage, n_before: int = 0):
    """The sweep's Tune searcher: Optuna (seeded TPE, or random) over ``storage``.

    In a finite space (every dimension a choice or an int, at most MAX_DISTINCT_POINTS points) a
    point is never trained twice: TPE often proposes its favourite again, and a repeat buys at best
    a second seed of one config. A repeated proposal is recorded in Optuna as a FAIL trial with the
    user attribute ``repeat_of`` (the number of the trial that has the point; TPE ignores failed
    trials, so the next ask draws afresh); after MAX_REPEATS repeats in a row an unproposed point is
    drawn uniformly (seeded); once every point is proposed the searcher reports the space
    exhausted and Tune stops asking.

    Args:
        storage: Optuna storage holding the study ``sweep.name`` (created when absent); points of
            earlier trials in it count as proposed.
        n_before: trials finished before (a resumed sweep); offsets the sampler seed so a resumed
            sweep does not replay the proposals of the first start.
    """
    import optuna
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    seed = sweep.seed + n_before
    if sweep.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(5, sweep.n_trials // 3)))
    size = sweep.space_size()
    if size is None or size > MAX_DISTINCT_POINTS:  # continuous or huge: repeats are rare, allowed
        return OptunaSearch(metric=sweep.metric, mode=sweep.mode, study_name=sweep.name, storage=storage,
                            sampler=sampler)
    keys = sorted(sweep.space)
    points = [dict(zip(keys, c, strict=True))
              for c in itertools.product(*(sweep.space[k].values() for k in keys))]

    class DistinctOptunaSearch(OptunaSearch):
        """OptunaSearch that never proposes a point twice (finite spaces)."""

        def _proposed(self) -> dict[tuple, int]:
            if not hasattr(self, "_seen"):
                self._seen = {}
                self._rng = np.random.default_rng([seed, 7])
                for t in self._ot_study.trials:
                    if t.state != optuna.trial.TrialState.FAIL and t.params:
                        self._seen.setdefault(point_key(t.params), t.number)
            return self._seen

        def suggest(self, trial_id: str):
            seen = self._proposed()
            fresh = [p for p in points if point_key(p) not in seen]
            if not fresh:
                log.info("sweep %s: all %d points of the space proposed", sweep.name, len(points))
                return Searcher.FINISHED
            for attempt in range(MAX_REPEATS + 1):
                if attempt == MAX_REPEATS:  # the sampler keeps proposing known points
                    self._ot_study.enqueue_trial(fresh[int(self._rng.integers(len(fresh)))])
                config = super().suggest(trial_id)
                ot_trial = self._ot_trials[trial_id]
                key = point_key(ot_trial.params)
                if key not in seen:
                    seen[key] = ot_trial.number
                    return config
                ot_trial.set_user_attr(REPEAT_ATTR, seen[key])
                self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
                del self._ot_trials[trial_id]
            raise RuntimeError(f"sweep {sweep.name}: an enqueued unproposed point came back as a repeat")

    return DistinctOptunaSearch(metric=sweep.metric, mode=sweep.mode, study_name=sweep.name, storage=storage,
                                sampler=sampler)


def point_key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


# The sweep's state a --resume reads: pushed to an object store at every trial event, so a driver
# killed mid-sweep (SIGKILL: no `finally`) loses at most the trial in flight, not the search.
SWEEP_STATE = ("optuna.journal", "study.log")


def journal_push_callback(mirror: Mirror):
    """A Tune callback that pushes :data:`SWEEP_STATE` to ``mirror`` when a trial starts, completes
    or fails. Tune's controller runs the searcher (which appends to the journal) and the callbacks
    in one thread, so a push never reads a half-written journal line."""
    from ray.tune import Callback

    class JournalPush(Callback):
        def _push(self) -> None:
            mirror.push(only=SWEEP_STATE)

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self._push()

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._push()

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._push()

    return JournalPush()


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
    log.info("%s", resources_line(concurrency, plan.workers_per_trial, plan.cpus_per_worker, plan.gpus_per_worker))
    progress = progress_callback({}, n_total=n_before + n, n_done_before=n_before, concurrency=concurrency,
                                 max_retries=opts.max_retries, default_epochs=max_t)
    results = fit_tuner(sweep_trainable(spec, plan), tune_space(sweep.space), plan, out, sweep.name, opts,
                        callbacks=[progress, *([journal_push_callback(mirror)] if mirror is not None else [])],
                        metric=sweep.metric, mode=sweep.mode, search_alg=searcher,
                        scheduler=scheduler, num_samples=n)
    records = []
    for res in results:
        m = res.metrics or {}
        trial_id = m.get("trial_id") or Path(res.path).name
        records.append({"trial_id": trial_id, "error": error_text(res.error),
                        "training_iteration": m.get("training_iteration"),
                        "last/" + sweep.metric: m.get(sweep.metric)})
    log_path = out / "tune_trials.jsonl"
    with open(log_path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _sweep_outputs(sweep: Sweep, out: Path, storage) -> Path:
    """trials.csv (one row per Optuna trial), best_config.json and Optuna's matplotlib plots."""
    import optuna

    try:
        study = optuna.load_study(study_name=sweep.name, storage=storage)
    except KeyError:
        raise UserError(f"{out}: no sweep {sweep.name!r} recorded yet") from None
    run_dirs = _run_dirs(out)
    tune_log = _tune_log(out)
    rows = []
    used: set[str] = set()
    repeats = 0
    for t in study.trials:
        if t.user_attrs.get(REPEAT_ATTR) is not None:  # a repeated proposal, never trained
            repeats += 1
            continue
        params = {k: v for k, v in t.params.items()}
        trial_dir = match_run(run_dirs, params, used)
        if trial_dir is not None:
            used.add(trial_dir.name)
        rows.append(_trial_row(t, params, trial_dir, tune_log))
    df = write_rows(rows, out / "trials.csv", ("number", "trial_id", "status", "error", "value", "epochs"))
    best = study.best_trial if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) else None
    if best is not None:
        _write_best_config(sweep, best, run_dirs, out)
    _sweep_plots(study, out)
    log.info("sweep %s: %d trials in %s (%d repeated proposals skipped)", sweep.name, len(df),
             out / "trials.csv", repeats)
    return out / "trials.csv"


def _run_dirs(out: Path) -> dict[str, Path]:
    """The sweep's run folders that hold a config.json, by name."""
    run_dirs = {}
    runs_root = out / "runs"
    # In the order the trials started: Optuna numbers its trials in the order Tune asked for them,
    # so two trials with the same parameters (a finite space) pair up with their own run folders.
    for d in sorted(runs_root.iterdir() if runs_root.is_dir() else [], key=first_start):
        cfg_path = d / CONFIG_JSON
        if cfg_path.exists():
            run_dirs[d.name] = d
    return run_dirs


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


def _write_best_config(sweep: Sweep, best, run_dirs: dict[str, Path], out: Path) -> None:
    """best_config.json: the best trial's value, overrides (also as --set arguments) and full config."""
    best_dir = match_run(run_dirs, best.params)
    best_json = {
        "study": sweep.name, "metric": sweep.metric, "mode": sweep.mode, "value": best.value,
        "trial": best.number, "overrides": dict(sorted(best.params.items())),
        "set_args": [f"--set {k}={v}" for k, v in sorted(best.params.items())],
        "config": json.loads((best_dir / CONFIG_JSON).read_text()) if best_dir else None,
    }
    write_json_atomic(out / "best_config.json", best_json)


def first_start(run_dir: Path) -> tuple[float, str]:
    """When a trial's run folder was first started (attempts.jsonl), for ordering; then the name."""
    try:
        first = (run_dir / ATTEMPTS).read_text().splitlines()[0]
        return float(json.loads(first)["start_unix_s"]), run_dir.name
    except (OSError, IndexError, ValueError, KeyError):
        return float("inf"), run_dir.name


def match_run(run_dirs: dict[str, Path], params: dict[str, Any], used: set[str] | None = None) -> Path | None:
    """The run folder whose config.json holds these parameter values (dotted keys), skipping the
    folders in `used`; None for a trial without parameters (one a kill interrupted before it ran)."""
    if not params:
        return None

    for name, d in run_dirs.items():
        if used is not None and name in used:
            continue
        cfg = flatten(json.loads((d / CONFIG_JSON).read_text()))
        if all(_same(cfg.get(k), v) for k, v in params.items()):
            return d
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return a == b


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
