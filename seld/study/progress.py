"""What a researcher sees while a study runs: one line per event (a run starting, each epoch, a run
finishing with the study's progress and the time left, a failed run and whether it is retried), on
the console and in ``<study>/study.log``; reads the per-epoch metrics the trials report to Tune,
writes only log records (and the log file).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seld.runfolder import RUN_FINISHED

if TYPE_CHECKING:
    from seld.study.cluster import ClusterPlan

log = logging.getLogger(__package__)  # the package logs as one stage: "seld.study"

STUDY_LOG = "study.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class PlannedRun:
    """A run the study will train: how it is named in the lines, its variant (runs of one variant
    share measured times in the estimate), its epoch budget (stage 2 may stop before it) and, when
    known, the clips each epoch of that budget trains (a stage-2 epoch of real clips only is
    shorter than a stage-1 epoch over real and synthetic ones)."""

    label: str
    variant: str
    n_epochs: int
    epoch_clips: tuple[int, ...] = ()  # len n_epochs when given


def planned_epoch_clips(cfg, n_train_real: int, n_train_synth: int) -> tuple[int, ...]:
    """The training clips of each epoch of ``cfg``'s budget, stage by stage (as
    :func:`seld.study.cluster.estimate_run_hours` counts them): stage 1 trains the domains of
    ``data.stage1_domains``, stage 2 the real clips."""
    clips = {1: n_train_real * ("real" in cfg.data.stage1_domains)
             + n_train_synth * ("synthetic" in cfg.data.stage1_domains), 2: n_train_real}
    return tuple(clips[s] for s in cfg.train.stage_numbers for _ in range(cfg.train.stage_config(s).epochs))


@dataclass
class _Attempt:
    """Driver-side bookkeeping of one trial (mutable: updated by each Tune event)."""

    run: PlannedRun
    index: int  # "run <index> of <n_total>"
    t_start: float
    n_starts: int = 1
    epochs_done: int = 0
    last_elapsed_s: float | None = None  # the worker's elapsed_s at the previous epoch of this attempt
    t_last_epoch: float | None = None
    best_f20: float = math.nan
    finished: bool = False  # the final report (test scores) arrived


@dataclass
class EtaModel:
    """Time left from measured times, per variant: training seconds per clip, the rest of an
    epoch (validation), trial start-up (start to the end of the first epoch, less its training) and
    finishing (last epoch to the run's end: test scoring).

    A variant uses its own measured times once it has them. One not measured yet in this sitting
    borrows the measured variants' times, scaled by the two variants' ratio in ``recorded`` (the
    study folder's earlier summary.csv, e.g. the committed one on a fresh clone) where both are
    recorded there; else it takes the measured variants' times as they are (pooled). Without the
    ratio, the first Baseline-A runs (whose GRU trains about half as many clips a second on a CPU and
    whose scoring takes ten times longer) made the time left 1.4-1.9x too long (issue 25).

    The estimate counts every unfinished run's whole epoch budget (early stopping in stage 2 or by
    ASHA only makes it shorter), each epoch by its clips when the plan gives them (else by the
    variant's mean epoch), and divides the work by the runs that can go at once.
    """

    concurrency: int
    # variant -> {"clips_per_s": training clips a second, "finish_s": seconds of scoring} as recorded
    recorded: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    epoch_s: dict[str, list[float]] = field(default_factory=dict)  # epoch wall seconds
    train_s: dict[str, list[float]] = field(default_factory=dict)  # training seconds of an epoch ...
    clips: dict[str, list[float]] = field(default_factory=dict)  # ... and the clips it trained
    rest_s: dict[str, list[float]] = field(default_factory=dict)  # the rest of an epoch (validation)
    start_s: dict[str, list[float]] = field(default_factory=dict)
    finish_s: dict[str, list[float]] = field(default_factory=dict)

    def _ratio(self, variant: str, other: str, key: str) -> float | None:
        """How much longer ``variant`` takes than ``other`` by their recorded ``key`` (None unless both)."""
        mine, theirs = (self.recorded.get(v, {}).get(key, math.nan) for v in (variant, other))
        if not (math.isfinite(mine) and math.isfinite(theirs) and mine > 0 and theirs > 0):
            return None
        return theirs / mine if key == "clips_per_s" else mine / theirs

    def _borrowed(self, measured: dict[str, list[float]], variant: str, key: str) -> list[float]:
        """``variant``'s own values, else the measured variants' scaled by the recorded ratio
        (those with one recorded), else theirs as they are."""
        if measured.get(variant):
            return measured[variant]
        scaled = [x * r for v, xs in measured.items() if (r := self._ratio(variant, v, key)) is not None for x in xs]
        return scaled or [x for xs in measured.values() for x in xs]

    def add_epoch(self, variant: str, seconds: float, train_s: float = math.nan, clips: float = math.nan,
                  whole: bool = True) -> None:
        """One measured epoch: its seconds and (when reported) its training seconds and clips.
        ``whole``: ``seconds`` covers training and validation (False for an attempt's first epoch,
        timed by its training alone)."""
        self.epoch_s.setdefault(variant, []).append(seconds)
        if math.isfinite(train_s) and math.isfinite(clips) and clips > 0 and train_s >= 0:
            self.train_s.setdefault(variant, []).append(train_s)
            self.clips.setdefault(variant, []).append(clips)
            if whole:
                self.rest_s.setdefault(variant, []).append(max(0.0, seconds - train_s))

    def add_start(self, variant: str, seconds: float) -> None:
        self.start_s.setdefault(variant, []).append(seconds)

    def add_finish(self, variant: str, seconds: float) -> None:
        self.finish_s.setdefault(variant, []).append(seconds)

    def epoch_time(self, variant: str, clips: float | None = None) -> float | None:
        """Seconds of one epoch of ``variant`` (training ``clips`` clips when given: seconds per
        clip plus the rest of an epoch), or None before any epoch was measured."""
        per_clip = {v: [sum(ts) / sum(self.clips[v])] for v, ts in self.train_s.items() if sum(self.clips[v]) > 0}
        if clips is not None and per_clip:
            rest = self.rest_s.get(variant) or [t for ts in self.rest_s.values() for t in ts]
            return clips * _mean(self._borrowed(per_clip, variant, "clips_per_s")) + _mean(rest)
        times = self._borrowed(self.epoch_s, variant, "clips_per_s")
        return _mean(times) if times else None

    def seconds_left(self, open_runs: list[tuple[PlannedRun, int, bool]]) -> float | None:
        """Seconds until every open run is done, or None before any epoch was measured.

        Args:
            open_runs: (run, epochs done, started) of every run not finished yet.
        """
        if not open_runs:
            return 0.0
        work = 0.0
        for run, done, started in open_runs:
            if run.epoch_clips:
                times = [self.epoch_time(run.variant, c) for c in run.epoch_clips[done:]]
            else:
                times = [self.epoch_time(run.variant)] * max(run.n_epochs - done, 0)
            if self.epoch_time(run.variant) is None:
                return None
            work += sum(t for t in times if t is not None)
            work += _mean(self._borrowed(self.finish_s, run.variant, "finish_s"))
            if not started:
                work += _mean(self.start_s.get(run.variant) or [t for ts in self.start_s.values() for t in ts])
        return work / max(1, min(self.concurrency, len(open_runs)))


def recorded_costs(summary_csv: Path) -> dict[str, dict[str, float]]:
    """Per variant, the mean ``cost/train_clips_per_s`` and ``cost/finish_s`` of the finished runs
    in a study's summary.csv (:class:`EtaModel`'s ``recorded``); empty when there is none."""
    import pandas as pd

    if not Path(summary_csv).is_file():
        return {}
    rows = pd.read_csv(summary_csv)
    cols = {"cost/train_clips_per_s": "clips_per_s", "cost/finish_s": "finish_s"}
    if not {"variant", "status", *cols} <= set(rows.columns):
        return {}
    ok = rows[rows["status"] == "ok"].groupby("variant")[list(cols)].mean()
    return {v: {cols[k]: float(x) for k, x in r.items() if math.isfinite(x)} for v, r in ok.iterrows()}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def format_duration(seconds: float) -> str:
    """`41 s`, `12 min`, `1.5 h`: the precision a person reads a wait in."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _num(result: Mapping[str, Any], key: str) -> float:
    v = result.get(key)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


def _pct(x: float) -> str:
    return f"{x:.1f} %" if math.isfinite(x) else "– %"


def _deg(x: float) -> str:
    return f"{x:.0f}°" if math.isfinite(x) else "–°"


def epoch_line(label: str, result: Mapping[str, Any], n_epochs: int, seconds: float) -> str:
    """``baseline seed 1 · epoch 7/12 stage 1 — loss 0.183, val F20 8.4 %, DOAE 35°, RDE 0.41, 41 s``.

    Args:
        result: one epoch's metrics as the trial reported them (``epoch`` counts from 0 over both
            stages, ``stage``, ``train/loss``, ``val/f20`` (%), ``val/doae_cd`` (°), ``val/rde_cd``,
            ``selected``: 1 when this epoch is the stage's best so far).
        n_epochs: the run's epoch budget (both stages).
        seconds: the epoch's wall time (training and validation; for the first epoch of an attempt,
            whose validation is not timed apart from the start-up, its training time).
    """
    epoch = int(_num(result, "epoch")) + 1
    rde = _num(result, "val/rde_cd")
    line = (f"{label} · epoch {epoch}/{n_epochs} stage {int(_num(result, 'stage'))} — "
            f"loss {_num(result, 'train/loss'):.3f}, val F20 {_pct(_num(result, 'val/f20'))}, "
            f"DOAE {_deg(_num(result, 'val/doae_cd'))}, "
            f"RDE {f'{rde:.2f}' if math.isfinite(rde) else '–'}, {format_duration(seconds)}")
    if _num(result, "selected") == 1:
        line += " (best so far)"
    return line


def finished_line(label: str, result: Mapping[str, Any], wall_s: float) -> str:
    """``baseline seed 1 finished in 3.9 min — test F20 9.0 % (PP 10.2 %), DOAE 38°, RDE 1.10``."""
    rde = _num(result, "test/rde_cd")
    return (f"{label} finished in {format_duration(wall_s)} — test F20 {_pct(_num(result, 'test/f20'))} "
            f"(with fitted thresholds {_pct(_num(result, 'test_pp/f20'))}), "
            f"DOAE {_deg(_num(result, 'test/doae_cd'))}, RDE {f'{rde:.2f}' if math.isfinite(rde) else '–'}")


def _guarded(hook):
    """A progress line that fails must not end a study of hours: log it and go on."""

    def wrapper(self, *args, **kwargs):
        try:
            return hook(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any bug in a progress line
            log.warning("progress line skipped (%s: %s)", type(e).__name__, e)
            return None

    wrapper.__name__ = hook.__name__
    wrapper.__doc__ = hook.__doc__
    return wrapper


def progress_callback(planned: Mapping[str, PlannedRun], *, n_total: int, n_done_before: int,
                      concurrency: int, max_retries: int, default_epochs: int = 0,
                      recorded: Mapping[str, Mapping[str, float]] | None = None):
    """The Tune callback that logs a study's events (imports Ray; see :class:`StudyProgress`)."""
    from ray.tune import Callback

    class StudyProgress(Callback):
        """One log line per event of a study's Tune run.

        Args:
            planned: run id (``trial.config["run_id"]``) -> the planned run; trials without a
                run id (a sweep's) are called ``trial <n>`` with ``default_epochs`` epochs.
            n_total: runs in the whole study (finished earlier ones included).
            n_done_before: runs finished by an earlier start (--resume).
            concurrency: runs at once (for the time left).
            max_retries: retries of a failing run (Tune's FailureConfig.max_failures).
            recorded: the variants' recorded costs (:func:`recorded_costs`) for the time left.
        """

        def __init__(self) -> None:
            self.attempts: dict[str, _Attempt] = {}
            self.eta = EtaModel(concurrency, recorded or {})
            self.n_started = 0
            self.n_ok = 0
            self.n_failed = 0

        def _key(self, trial) -> str:
            return str((trial.config or {}).get("run_id") or trial.trial_id)

        def _params(self, trial) -> str:
            params = {k: v for k, v in (trial.config or {}).items() if "." in k}
            return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in sorted(params.items()))

        @_guarded
        def on_trial_start(self, iteration, trials, trial, **info):
            key = self._key(trial)
            att = self.attempts.get(key)
            if att is not None:  # a retry after a failure: same run, same number
                att.n_starts += 1
                att.t_start, att.epochs_done, att.last_elapsed_s, att.t_last_epoch = time.time(), 0, None, None
                log.info("%s — run %d of %d restarted (attempt %d of %d)", att.run.label, att.index, n_total,
                         att.n_starts, max_retries + 1)
                return
            self.n_started += 1
            index = n_done_before + self.n_started
            run = planned.get(key) or PlannedRun(f"trial {index}", "trial", default_epochs)
            self.attempts[key] = _Attempt(run, index, time.time())
            # A sweep's trial: its Tune id names its run folder (runs/<id>), its values say what it tries.
            about = "; ".join(x for x in ("" if key in planned else f"runs/{trial.trial_id}", self._params(trial)) if x)
            log.info("%s — run %d of %d started%s", run.label, index, n_total, f" ({about})" if about else "")

        @_guarded
        def on_trial_result(self, iteration, trials, trial, result, **info):
            att = self.attempts.get(self._key(trial))
            if att is None:
                return
            now = time.time()
            if result.get(RUN_FINISHED):
                att.finished = True
                if att.t_last_epoch is not None:
                    self.eta.add_finish(att.run.variant, now - att.t_last_epoch)
                self.n_ok += 1
                log.info("%s · %s", finished_line(att.run.label, result, now - att.t_start), self._progress())
                return
            if "epoch" not in result:
                return
            elapsed = _num(result, "elapsed_s")
            whole = att.last_elapsed_s is not None and math.isfinite(elapsed)
            if whole:
                seconds = elapsed - att.last_elapsed_s
            else:  # the first epoch of an attempt: its training time (validation not timed apart)
                seconds = _num(result, "train/time_s")
                self.eta.add_start(att.run.variant, max(0.0, now - att.t_start - seconds))
            att.last_elapsed_s = elapsed if math.isfinite(elapsed) else None
            att.t_last_epoch = now
            att.epochs_done += 1
            f20 = _num(result, "val/f20")
            if math.isfinite(f20) and not f20 <= att.best_f20:
                att.best_f20 = f20
            if math.isfinite(seconds):
                self.eta.add_epoch(att.run.variant, seconds, _num(result, "train/time_s"),
                                   _num(result, "train/clips"), whole=whole)
            log.info("%s", epoch_line(att.run.label, result, att.run.n_epochs, seconds))

        @_guarded
        def on_trial_complete(self, iteration, trials, trial, **info):
            att = self.attempts.get(self._key(trial))
            if att is None or att.finished:
                return
            # Ended without its final report: stopped early by the scheduler (ASHA).
            att.finished = True
            self.n_ok += 1
            log.info("%s stopped early by the scheduler after %d of %d epochs (best val F20 %s) · %s",
                     att.run.label, att.epochs_done, att.run.n_epochs, _pct(att.best_f20), self._progress())

        @_guarded
        def on_trial_recover(self, iteration, trials, trial, **info):
            att = self.attempts.get(self._key(trial))
            label = att.run.label if att else self._key(trial)
            log.warning("%s failed (attempt %d of %d): %s; retrying", label, trial.num_failures, max_retries + 1,
                        trial_error_text(trial))

        @_guarded
        def on_trial_error(self, iteration, trials, trial, **info):
            att = self.attempts.get(self._key(trial))
            label = att.run.label if att else self._key(trial)
            if att:
                att.finished = True
            self.n_failed += 1
            retried = "not retried" if max_retries == 0 else f"not retried again ({max_retries} retries used)"
            log.error("%s failed (attempt %d of %d): %s; %s, recorded as failed · %s", label, trial.num_failures,
                      max_retries + 1, trial_error_text(trial), retried, self._progress())

        def _progress(self) -> str:
            done = n_done_before + self.n_ok + self.n_failed
            text = f"{done} of {n_total} runs done" + (f" ({self.n_failed} failed)" if self.n_failed else "")
            open_runs = [(a.run, a.epochs_done, True) for a in self.attempts.values() if not a.finished]
            pending = [p for k, p in planned.items() if k not in self.attempts]
            # A sweep plans no runs by name: its unstarted trials are alike.
            n_more = n_total - n_done_before - len(self.attempts) - len(pending)
            pending += [PlannedRun("trial", "trial", default_epochs)] * max(0, n_more)
            open_runs += [(p, 0, False) for p in pending]
            if not open_runs:
                return text
            left = self.eta.seconds_left(open_runs)
            return text + (f", about {format_duration(left)} left" if left is not None else "")

    return StudyProgress()


def trial_error_text(trial) -> str:
    """The one-line cause of a trial's latest failure (see :func:`seld.study.tune.error_text`).

    Read from the files Tune has just written on the driver (``error.pkl``, else the last failure
    of ``error.txt``): at a retry their copies in the experiment's storage may not exist yet.
    """
    import cloudpickle

    from seld.study.tune import error_text

    with contextlib.suppress(Exception):  # an error that cannot be unpickled here: use its text
        if trial.pickled_error_file and Path(trial.pickled_error_file).is_file():
            return error_text(cloudpickle.loads(Path(trial.pickled_error_file).read_bytes()))
    with contextlib.suppress(OSError, TypeError):
        text = Path(trial.error_file).read_text(errors="replace")
        last = text.rsplit("Failure # ", 1)[-1]
        if last.strip():
            return error_text(last.split("\n", 1)[-1])
    return "unknown error (see the trial's error.txt)"


def resources_line(plan_concurrency: int, plan: ClusterPlan, sets: Mapping[str, Any]) -> str:
    """What Ray holds and what each run takes, in words that match the machine (Ray is up): the
    plan's workers, CPUs and GPUs per run and the torch threads each worker gets (``--set
    train.torch_threads`` over the plan's, unsaid when neither sets them)."""
    import ray

    res = ray.cluster_resources()
    n_nodes = len([n for n in ray.nodes() if n.get("Alive")])
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    workers, cpus_per_worker, gpus_per_worker = plan.workers_per_trial, plan.cpus_per_worker, plan.gpus_per_worker
    torch_threads = int(sets.get("train.torch_threads", plan.overrides().get("train.torch_threads", 0)))
    per_run = f"{workers} Train worker(s) x {cpus_per_worker:g} CPU" + (f" + {gpus_per_worker:g} GPU" if gpus_per_worker else "")
    if torch_threads:
        per_run += f", {torch_threads} torch thread(s) each"
    if n_nodes <= 1:
        cores = os.cpu_count() or 0
        where = f"Ray on this machine: {cpus:g} logical CPUs on {cores} cores"
        if cpus > cores:
            where += " (more logical CPUs than cores, so Ray Data tasks can run beside the Train workers)"
    else:
        where = f"Ray cluster: {n_nodes} nodes, {cpus:g} logical CPUs"
    where += f", {gpus:g} GPU(s)"
    return f"{where}; each run: {per_run}; {plan_concurrency} run(s) at once"


@contextlib.contextmanager
def study_log(out: Path) -> Iterator[Path]:
    """Copy every ``seld`` log record of INFO and above to ``out/study.log`` (appended, so a resumed
    study continues it) while the block runs, for ``tail -f`` or ``ray job logs``. Yields the path.
    """
    path = Path(out) / STUDY_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S"))
    pkg = logging.getLogger("seld")
    level = pkg.level
    if pkg.getEffectiveLevel() > logging.INFO:  # a library caller without logging set up
        pkg.setLevel(logging.INFO)
    pkg.addHandler(handler)
    try:
        yield path
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(level)
        handler.close()


def append_to_log(out: Path, text: str) -> None:
    """Append a block (the final table) to ``out/study.log`` as it is, without a log prefix."""
    with open(Path(out) / STUDY_LOG, "a", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n")
