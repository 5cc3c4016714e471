"""Starting or joining Ray: the one place the project calls ``ray.init`` (``seld train``, the
studies through :func:`seld.study.cluster.start_ray`, the test session). Reads $RAY_ADDRESS,
writes nothing; imports neither torch nor the training code.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

def default_num_cpus(num_workers: int) -> int:
    """Logical CPUs for an embedded Ray: more than Train reserves, so Ray Data is never starved."""
    return max(4, 2 * num_workers + 2)


def quiet_ray_data_console() -> None:
    """Ray Data's INFO lines (each dataset's plan, "execution finished", Parquet estimates) leave this
    process's console; its own file handler still writes them to Ray's session log (``ray-data.log``).
    Ray Data logs to the console through a stream handler of its own on the ``ray.data`` logger;
    its warnings still reach the console."""
    import ray.data  # noqa: F401  (configures the ray.data logger on import)

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
            handler.addFilter(_not_progress_bar_notice)


def _not_progress_bar_notice(record: logging.LogRecord) -> bool:
    """Drops Ray Data's "Progress bars disabled" warning: the project turns the bars off on purpose
    (non-TTY logs), so it is not a warning to the user."""
    return not record.getMessage().startswith("Progress bars")


def init_ray(address: str | None = None, num_cpus: int | None = None, *, num_gpus: int | None = None,
             num_workers: int = 1, include_dashboard: bool = True, log_to_driver: bool | None = None,
             env_vars: dict[str, str] | None = None) -> float:
    """Start an embedded local Ray on loopback, or connect to `address` / $RAY_ADDRESS: the one
    place the project starts Ray (`seld train`, the studies' :func:`seld.study.cluster.start_ray`).

    A no-op when Ray is already initialised (a test session, a Tune trial). The local Ray advertises
    and binds 127.0.0.1 only, writes no auth token, and gets `num_cpus` logical CPUs (default
    :func:`default_num_cpus`) and `num_gpus` GPUs (default: Ray's detection). `env_vars` go to
    every task and actor of this job (trials, Train workers) through Ray's runtime environment,
    merged with a `ray job submit` job's own; they are kept in memory, never written or logged here.
    `log_to_driver`: the workers' output (and Ray's own INFO lines here) reach this process's
    console; default: Ray's RAY_LOG_TO_DRIVER, which the command lines set to 0 unless -v (the
    lines stay in Ray's logs). Returns the seconds it took (0.0 when Ray was already up).
    """
    # Before Ray is imported: bind and advertise loopback only, write no auth token.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    import ray

    if ray.is_initialized():
        return 0.0
    t0 = time.perf_counter()
    if log_to_driver is None:
        log_to_driver = os.environ.get("RAY_LOG_TO_DRIVER", "1").strip().lower() not in ("0", "false", "no", "off")
    quiet = {} if log_to_driver else {"logging_level": logging.WARNING}  # no "Started a local Ray instance" box
    if not log_to_driver:
        quiet_ray_data_console()
    runtime_env = {"env_vars": dict(env_vars)} if env_vars else None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env=runtime_env, **quiet)
        return time.perf_counter() - t0
    n = num_cpus or default_num_cpus(num_workers)
    # A study starts a dozen worker processes at once (trial drivers, Train controllers and workers,
    # Ray Data tasks); with the raylet's default startup concurrency (the cores: 2 here) it pushes
    # "N PYTHON worker processes have been started ... maximum expected startup concurrency" to every
    # driver's console, which no logging setting silences (ray-project/ray#63800). Read by the raylet
    # this call starts, so only an embedded Ray's.
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(max(8, 2 * n)))
    # Ray Train starts a PreemptionWatcher actor per run that polls the node's drain state, which
    # only an autoscaler sets; a one-machine Ray has none. Each takes about 1 % of a core
    # (bench/cpu_by_process.py), taken from the training process on a 2-core machine (issue 28).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(num_cpus=n, num_gpus=num_gpus, include_dashboard=include_dashboard, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", log_to_driver=log_to_driver, runtime_env=runtime_env, **quiet)
    log.info("started a local Ray (%d logical CPUs) in %.1f s", n, time.perf_counter() - t0)
    return time.perf_counter() - t0
