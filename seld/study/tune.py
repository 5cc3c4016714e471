"""Ray Tune for a study: the body of one trial (reads the feature store, writes its run folder),
the one Tuner both the ablation grid and the sweep run, and the W&B run of a study's tables.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from seld.config import config_hash, preset_config
from seld.runfolder import ATTEMPTS, CONFIG_JSON, MIRROR_SKIP
from seld.storage import is_uri
from seld.study.cluster import ClusterPlan
from seld.study.options import Options

# W&B settings a trial needs wherever it runs: the key exists only where the user logged in or
# exported it (the submitting machine, the head), and trials run on other nodes.
WANDB_FORWARD = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_ENTITY")
# Not through Ray's runtime environment: Ray 2.60's runtime-env agent writes every runtime env it
# sets up, env_vars included, to logs/runtime_env_agent.log on each node (tests/test_multinode.py
# found a canary key there).
SECRET_ENV = ("WANDB_API_KEY",)
# AWS keys that Ray Tune 2.60 copies from the driver's environment into each trial's runtime env
# (ray/tune/execution/class_cache.py), and so into that log.
TUNE_PROPAGATED_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def _wandb_env(opts: Options) -> dict[str, str]:
    """The W&B variables of this environment (the key also from ``~/.netrc``), when --wandb."""
    if not opts.wandb:
        return {}
    env = {k: os.environ[k] for k in WANDB_FORWARD if os.environ.get(k)}
    if "WANDB_API_KEY" not in env:
        import netrc
        from urllib.parse import urlparse

        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
        try:
            auth = netrc.netrc().authenticators(host)
        except (OSError, netrc.NetrcParseError):
            auth = None
        if auth and auth[2]:
            env["WANDB_API_KEY"] = auth[2]
    return env


def forwarded_env(opts: Options) -> dict[str, str]:
    """W&B settings of this (submitting) environment that every trial gets through Ray's runtime
    environment (``env_vars``) when the study logs to W&B: mode, host, entity; empty otherwise.

    The key is not among them (SECRET_ENV): :func:`trial_env` hands it to each trial in memory.
    Variables a ``ray job submit --runtime-env-json`` already sets are left out (Ray refuses a
    driver runtime env that sets the same keys as its job's).
    """
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}")
    job_env = ((job.get("runtime_env") or {}).get("env_vars") or {})
    return {k: v for k, v in _wandb_env(opts).items() if k not in job_env and k not in SECRET_ENV}


def trial_env(opts: Options, study: str) -> dict[str, str]:
    """Environment each trial sets in its own process (W&B offline unless the user chose a mode).

    With --wandb it carries the W&B key of this environment (``WANDB_API_KEY``, else ``~/.netrc``):
    it reaches the trial inside its spec (Ray's object store, in memory) and is set in the trial's
    process only, never written or logged (tests/test_multinode.py looks for a canary key in every
    file of the storage and of Ray's session folder).
    """
    env = {"RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}
    if opts.wandb:
        env.update({"WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "WANDB_SILENT": "true",
                    "WANDB_RUN_GROUP": study})
        env.update({k: v for k, v in _wandb_env(opts).items() if k in SECRET_ENV})
    return env


def train_trial(spec: dict[str, Any], params: dict[str, Any] | None = None) -> dict:
    """Body of one Tune trial (runs in the trial's process): train the run, return its metrics.

    ``spec``: preset, overrides, store, run_dir, wandb options, tags, and with an object-store
    storage ``mirror`` (:class:`seld.storage.Mirror` of the run folder, ``run_dir`` its staging
    folder): the trial first pulls the run folder from the store, so a restarted trial (or one on
    another node) resumes from the store's state. ``params``: the sweep's suggested values (dotted
    keys), applied on top; ``spec["ids"]``: a sweep trial's identity (``tune_trial_id``,
    ``optuna_trial``), written into each line of ``attempts.jsonl``. The Train run reports every
    epoch and its end to Tune through ``TuneReportCallback`` (ASHA and Optuna see ``val/best_f20``).
    """
    import ray

    from seld.train import run_training

    os.environ.update(spec.get("env", {}))
    cfg = preset_config(spec["preset"], {**spec["overrides"], **(params or {})})
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    mirror = spec.get("mirror")
    if mirror is not None:
        mirror.pull(skip=MIRROR_SKIP)
    resume = (run_dir / CONFIG_JSON).exists()
    # Where this attempt's driver ran and which forwarded W&B variables it saw (names only, never
    # values): what to check when trials on other nodes cannot log, or a node was lost.
    # A sweep's trial also records its identity (Tune trial id, Optuna trial number): the sweep's
    # report ties trial and folder by it.
    with open(run_dir / ATTEMPTS, "a") as f:
        f.write(json.dumps({**spec.get("ids", {}), "start_unix_s": round(time.time(), 3), "resume": resume,
                            "config_hash": config_hash(cfg),
                            "node_id": ray.get_runtime_context().get_node_id(),
                            "wandb_env": sorted(k for k in WANDB_FORWARD if os.environ.get(k))}) + "\n")
    if spec.get("wandb"):
        os.environ["WANDB_TAGS"] = ",".join(spec["tags"])
    # A store in the study's bucket is read with the storage's filesystem: its credentials travel
    # in memory with the mirror, not through this process's environment.
    store_fs = mirror.fs if mirror is not None and is_uri(spec["store"]) else None
    return run_training(cfg, spec["store"], run_dir, resume=resume, wandb=spec.get("wandb"),
                        run_callbacks=[_tune_report_callback()], mirror=mirror, store_filesystem=store_fs)


def _tune_report_callback():
    from ray.tune.integration.ray_train import TuneReportCallback

    return TuneReportCallback()


def _ablation_trainable(config: dict, specs: dict[str, dict]) -> None:
    train_trial(specs[config["run_id"]])


def _sweep_trainable(config: dict, spec: dict) -> None:
    from ray import tune

    from seld.study.search import OPTUNA_TRIAL_KEY

    trial_id = tune.get_context().get_trial_id()
    spec = {**spec, "run_dir": str(Path(spec["run_dir"]) / trial_id),
            "tags": [*spec["tags"], trial_id],
            "ids": {"tune_trial_id": trial_id, OPTUNA_TRIAL_KEY: config.get(OPTUNA_TRIAL_KEY)}}
    if spec.get("mirror") is not None:
        spec["mirror"] = spec["mirror"].child(trial_id)
    params = {k: v for k, v in config.items() if "." in k}
    train_trial(spec, params)


def ablation_trainable(specs: dict[str, dict], plan: ClusterPlan):
    """The ablation's Tune trainable: one trial per run id (``config["run_id"]``) of ``specs``,
    its driver placed as ``plan.driver_resources()`` says (on a non-preemptible node if any).

    Ray must be up (:func:`seld.study.cluster.start_ray`): the specs go to its object store.
    """
    from ray import tune

    return tune.with_resources(tune.with_parameters(_ablation_trainable, specs=specs), plan.driver_resources())


def sweep_trainable(spec: dict, plan: ClusterPlan):
    """The sweep's Tune trainable: ``spec`` with the trial's suggested values (Ray must be up)."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(_sweep_trainable, spec=spec), plan.driver_resources())


def fit_tuner(trainable, param_space: dict[str, Any], plan: ClusterPlan, out: Path, name: str,
              opts: Options, callbacks: Sequence[Any] = (), **tune_config: Any):
    """Run a study's trials through one Tune run and return its results (a ``ResultGrid``).

    Tune's state goes to ``<storage>/ray`` (the plan's shared storage) or ``OUT/_work/ray`` (also
    with an object-store storage: a study resumes from its run folders, not from Tune's state), in a
    run named ``<name>-<YYYYmmdd-HHMMSS>``; a failing trial is retried ``opts.max_retries`` times;
    at most ``opts.concurrency`` (default: the plan's) trials run at once. Tune's own status table
    and its tracebacks of failed trials are printed only with ``opts.verbose`` (``-v``); the study's
    lines come from ``callbacks`` (:func:`seld.study.progress.progress_callback`). ``tune_config``:
    further ``tune.TuneConfig`` fields (metric, searcher, scheduler, ...).
    """
    import ray
    from ray import tune

    # Read by Tune's controller when the Tuner starts: without -v a failed trial is one line of ours
    # (its cause; the traceback stays in the trial's error.txt), not Tune's multi-page traceback.
    os.environ["TUNE_PRINT_ALL_TRIAL_ERRORS"] = "1" if opts.verbose else "0"
    # Ray 2.60's default output engine prints its experiment box even at verbose 0; its legacy
    # engine (RAY_AIR_NEW_OUTPUT=0) at verbose 0 prints nothing. Both read this when fit() starts.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "1" if opts.verbose else "0"
    # Tune's own INFO lines (where it wrote its state, ...) and its closing list of failed trials
    # by Tune's name (each failure already had its line, by run name) only with -v.
    logging.getLogger("ray.tune").setLevel(logging.INFO if opts.verbose else logging.WARNING)
    # Ctrl-C: Tune's own SIGINT handler ends fit() "gracefully" and stops the running trials as
    # TERMINATED, with no error and no result, which the study cannot tell from finished runs (it
    # recorded them as failed, went on to the next seed round and wrote tables). Without it the
    # interrupt is a KeyboardInterrupt out of fit() (Tune's loop catches Exception only): the study
    # stops there and exits 130 (seld.study.cli.main); the trials stop as the process exits.
    sigint_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    tune_log = logging.getLogger("ray.tune.tune")
    (tune_log.removeFilter if opts.verbose else tune_log.addFilter)(_not_the_failed_trials_list)

    shared = plan.storage and not is_uri(plan.storage)
    storage = Path(plan.storage) / "ray" if shared else (out / "_work" / "ray").resolve()
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=opts.concurrency or plan.concurrency, **tune_config),
        run_config=ray.tune.RunConfig(
            name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(storage),
            failure_config=ray.tune.FailureConfig(max_failures=opts.max_retries),
            callbacks=list(callbacks) or None,
            # 0: no status table, no per-trial boxes; 1 (-v): Tune's status table every 30 s.
            verbose=1 if opts.verbose else 0,
        ),
    )
    # Tune copies these from the driver's environment into every trial's runtime environment, which
    # Ray 2.60's runtime-env agent writes to logs/runtime_env_agent.log (found by the canary key in
    # tests/test_storage.py). With an object store the trials need none of them (the storage's
    # filesystem object carries them, in memory): hidden from Tune while it runs.
    hidden = {k: os.environ.pop(k) for k in TUNE_PROPAGATED_SECRETS if k in os.environ} \
        if is_uri(plan.storage) else {}
    try:
        return tuner.fit()
    finally:
        os.environ.update(hidden)
        if sigint_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = sigint_env


def _not_the_failed_trials_list(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Trials did not complete")


def error_text(err: BaseException | str | None) -> str:
    """One line naming the root cause of a trial's failure (the innermost ``XxxError: msg`` line).

    Args:
        err: the trial's exception, or the text of its traceback (Tune's ``error.txt``).
    """
    if err is None:
        return ""
    text = err if isinstance(err, str) else "".join(traceback.format_exception_only(type(err), err))
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    causes = re.findall(r"^\s*([\w.]*(?:Error|Exception): .+)$", text, flags=re.M)
    line = causes[-1] if causes else text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return re.sub(r"\s+", " ", line).strip()[:500]


def log_tables_to_wandb(study: str, out: Path, paths: Sequence[Path]) -> None:
    import wandb

    from seld.wandb_log import finish_wandb_run

    os.environ.setdefault("WANDB_MODE", "offline")
    run = wandb.init(project="seld", group=study, job_type="report", name=f"{study}-tables",
                     dir=str(out), mode=os.environ["WANDB_MODE"], tags=[study, "report"],
                     reinit="create_new")
    try:
        for p in paths:
            if p.suffix == ".csv":
                df = pd.read_csv(p)
                run.log({p.stem: wandb.Table(dataframe=df)})
            elif p.suffix == ".png":
                run.log({f"plots/{p.stem}": wandb.Image(str(p))})
            elif p.suffix == ".log":  # the study's event lines (study.log), as a file of the run
                run.save(str(p), base_path=str(p.parent), policy="now")
    finally:
        finish_wandb_run(run)
