"""The sweep's searcher and scheduler, on the public APIs of Optuna and Ray Tune only.

:class:`OptunaAskTell` is Optuna's ask/tell interface behind Tune's ``Searcher`` API: it asks the
study (seeded sampler, journal storage) for each Tune trial, records the pair (Optuna trial number,
Tune trial id) in both places (the Optuna trial's user attribute, the config Tune hands the trial),
reports every result as an intermediate value and tells the last one. :class:`FinalReportASHA` is
ASHA that never sees a run's final report; :class:`JournalPush` pushes the sweep's state to an object
store. Imported by seld/study/sweep.py when a sweep runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher

from seld.runfolder import RUN_FINISHED
from seld.storage import Mirror

log = logging.getLogger(__package__)

REPEAT_ATTR = "repeat_of"  # Optuna user attribute of a proposal skipped as a repeat (never trained)
TUNE_TRIAL_ATTR = "tune_trial_id"  # Optuna user attribute: the Tune trial (= run folder name) it ran as
OPTUNA_TRIAL_KEY = "optuna_trial"  # key of the Optuna trial number in the config a Tune trial gets
METRIC_ATTR = "metric"  # Optuna study user attribute: the reported metric the study's values are
MAX_REPEATS = 20  # repeated proposals in a row before an unproposed point is drawn uniformly


def point_key(params: dict[str, Any]) -> tuple:
    """A hashable identity of a point of the space (values by repr, keys sorted)."""
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


class OptunaAskTell(Searcher):
    """Optuna (ask/tell) as a Tune searcher.

    Args:
        distributions: the space as Optuna distributions, by dotted config key (the order is the
            order the sampler draws them in).
        study_name, storage: the Optuna study (created when absent, loaded when present: a resumed
            sweep continues it).
        sampler: the seeded Optuna sampler.
        metric, mode: the reported value Optuna records ("max" or "min").
        points: every point of a finite space, or None. Given, no point is trained twice: a proposal
            of a point already proposed is told FAIL with the user attribute ``repeat_of`` (the
            number of the trial that has it; samplers ignore failed trials, so the next ask draws
            afresh); after MAX_REPEATS repeats in a row a fresh point is enqueued, drawn uniformly
            with ``seed``; once every point is proposed, :meth:`suggest` answers FINISHED.

    Each suggested config holds the point's dotted keys and ``optuna_trial`` (the Optuna trial
    number); the Optuna trial gets the user attribute ``tune_trial_id``.
    """

    def __init__(self, distributions: dict[str, Any], *, study_name: str, storage, sampler, metric: str,
                 mode: str, points: list[dict[str, Any]] | None = None, seed: int = 0) -> None:
        super().__init__(metric=metric, mode=mode)
        self.distributions = dict(distributions)
        self.study = optuna.create_study(storage=storage, sampler=sampler, pruner=optuna.pruners.NopPruner(),
                                         study_name=study_name, load_if_exists=True,
                                         direction="maximize" if mode == "max" else "minimize")
        if self.study.user_attrs.get(METRIC_ATTR) != metric:  # what trials.csv's values are
            self.study.set_user_attr(METRIC_ATTR, metric)
        self.points = points
        self.rng = np.random.default_rng([seed, 7])
        self.live: dict[str, Any] = {}  # Tune trial id -> its running Optuna trial
        self.steps: dict[str, int] = {}  # Tune trial id -> the last iteration recorded
        # Points proposed before (an earlier start of a resumed sweep) count as proposed.
        self.proposed = {point_key(t.params): t.number for t in self.study.trials
                         if t.state != optuna.trial.TrialState.FAIL and t.params}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        """The space is this searcher's own (Tune's ``param_space`` is not read); metric and mode
        were given at construction and must agree with Tune's."""
        for name, mine, theirs in (("metric", self.metric, metric), ("mode", self.mode, mode)):
            if theirs is not None and theirs != mine:
                raise ValueError(f"the sweep's searcher optimises {name} {mine!r}, Tune was given {theirs!r}")
        return True

    def suggest(self, trial_id: str) -> dict | str | None:
        fresh = None
        if self.points is not None:
            fresh = [p for p in self.points if point_key(p) not in self.proposed]
            if not fresh:
                log.info("sweep %s: all %d points of the space proposed", self.study.study_name, len(self.points))
                return Searcher.FINISHED
        for attempt in range(MAX_REPEATS + 1):
            if fresh is not None and attempt == MAX_REPEATS:  # the sampler keeps proposing known points
                self.study.enqueue_trial(fresh[int(self.rng.integers(len(fresh)))])
            trial = self.study.ask(fixed_distributions=self.distributions)
            key = point_key(trial.params)
            if fresh is not None and key in self.proposed:
                trial.set_user_attr(REPEAT_ATTR, self.proposed[key])
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            self.proposed.setdefault(key, trial.number)
            trial.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
            self.live[trial_id] = trial
            return {**trial.params, OPTUNA_TRIAL_KEY: trial.number}
        raise RuntimeError(f"sweep {self.study.study_name}: an enqueued unproposed point came back as a repeat")

    def save(self, checkpoint_path: str) -> None:
        """Tune's experiment checkpoint of the searcher: the running trials' numbers, for the record
        (a sweep resumes from the Optuna journal, not from Tune's state)."""
        Path(checkpoint_path).write_text(json.dumps({tid: t.number for tid, t in self.live.items()}))

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Record the result as the trial's intermediate value at its Tune iteration."""
        trial, value, step = self.live.get(trial_id), result.get(self.metric), result.get("training_iteration")
        if trial is None or value is None or step is None or step <= self.steps.get(trial_id, 0):
            return
        trial.report(float(value), int(step))
        self.steps[trial_id] = int(step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Tell Optuna the trial's last reported value (COMPLETE), or FAIL (an error) / PRUNED
        (stopped with no value). The last result is also recorded as an intermediate value (Tune
        hands the result that made the scheduler stop a trial only to this call): the study holds
        every value Tune saw, and its last step is the epochs Tune saw (a stopped run may have
        trained an epoch more before the stop reached it, which its metrics.csv lists)."""
        if result:
            self.on_trial_result(trial_id, result)
        trial = self.live.pop(trial_id, None)
        self.steps.pop(trial_id, None)
        if trial is None:
            return
        value = (result or {}).get(self.metric)
        state = optuna.trial.TrialState.COMPLETE
        if value is None:
            state = optuna.trial.TrialState.FAIL if error else optuna.trial.TrialState.PRUNED
        try:
            self.study.tell(trial, value, state=state)
        except ValueError as e:  # e.g. a NaN value: the trial stays out of the search, the sweep goes on
            log.warning("sweep %s: trial %d not recorded: %s", self.study.study_name, trial.number, e)


class FinalReportASHA(ASHAScheduler):
    """ASHA on the epochs' reports only.

    A run's last report (``run_finished``, after its epochs; its test scores) has no epoch left to
    stop: it goes past ASHA, answered CONTINUE, so ASHA neither cuts it at a rung nor stops it at
    ``max_t`` (a STOP there made Tune destroy the trial's process while it was still finishing the
    run: metrics.json's driver-side costs, the W&B run, whose offline log was then left empty).
    ASHA's counters and rungs see only epochs.
    """

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(RUN_FINISHED):
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


class JournalPush(Callback):
    """Pushes ``paths`` (the sweep's resume state) to ``mirror`` when a trial starts, completes or
    fails. Tune's controller runs the searcher (which appends to the journal) and the callbacks in
    one thread, so a push never reads a half-written journal line."""

    def __init__(self, mirror: Mirror, paths: tuple[str, ...]) -> None:
        self.mirror, self.paths = mirror, tuple(paths)

    def push(self) -> None:
        self.mirror.push(only=self.paths)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.push()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.push()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.push()


__all__ = ["MAX_REPEATS", "METRIC_ATTR", "OPTUNA_TRIAL_KEY", "REPEAT_ATTR", "TUNE_TRIAL_ATTR", "FinalReportASHA",
           "JournalPush", "OptunaAskTell", "point_key"]
