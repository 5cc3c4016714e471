"""Studies: Ray Tune over Train V2 runs (ablations: variant x seed; sweeps: Optuna + ASHA).

Reads a study declaration (``studies/*.py``), the data (generated and cached by config hash, or a
user's DCASE2025 root) and optionally a cluster file (``cluster/*.yaml`` or ``cluster/*.sbatch``);
writes ``results/<study>/summary.csv`` (one tidy row per run), ``curves.csv`` (per-epoch rows),
the run folders under ``runs/`` and, through :mod:`seld.report`, the tables and plots.
A sweep writes ``trials.csv``, ``best_config.json``, the Optuna journal and Optuna's plots.

Modules: ``session`` (starting or joining Ray), ``cluster`` (cluster files -> plans, estimates),
``prepare`` (data and feature store), ``tune`` (the trial body and the one Tuner), ``progress`` (one
line per event, on the console and in ``study.log``), ``summary`` (a run's row), ``ablation`` (the
grid), ``sweep`` (Optuna + ASHA), ``options`` (options, where results go, the driver's mirror),
``cli`` (the command line).
"""

from seld.study.ablation import Study, Variant, run_study
from seld.study.cli import add_arguments, main
from seld.study.cluster import (
    ClusterPlan,
    NodeType,
    estimate_run_hours,
    format_plan,
    load_launcher_file,
    plan_cluster,
)
from seld.study.options import Options
from seld.study.prepare import prepare_data
from seld.study.summary import flatten_metrics
from seld.study.sweep import (
    REPEAT_ATTR,
    Param,
    Sweep,
    first_start,
    match_run,
    optuna_storage,
    point_key,
    run_sweep,
    sweep_scheduler,
    sweep_searcher,
    tune_space,
)

__all__ = [
    "REPEAT_ATTR", "ClusterPlan", "NodeType", "Options", "Param", "Study", "Sweep", "Variant",
    "add_arguments", "estimate_run_hours", "first_start", "flatten_metrics", "format_plan",
    "load_launcher_file", "main", "match_run", "optuna_storage", "plan_cluster", "point_key",
    "prepare_data", "run_study", "run_sweep", "sweep_scheduler", "sweep_searcher",
    "tune_space",
]
