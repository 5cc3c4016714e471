"""Cluster plans for a study: reads Ray cluster launcher files (``cluster/*.yaml``) and SLURM
scripts (``cluster/*.sbatch``), writes nothing; gives per-trial resources, concurrency, shared
storage and the dry run's estimates, and starts (or joins) the Ray a study runs on.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seld.config import ExperimentConfig
from seld.errors import UserError

log = logging.getLogger(__package__)  # the package logs as one stage: "seld.study"

# Training throughput of one Train worker (5-s clips per second, forward + backward + step), for
# the dry-run's estimate and the `paper` runs' time budget. "cpu": the `local` model on the 2-core
# dev machine, measured in Ray runs at 64-87 clips/s (BENCHMARKS.md), taken low. "gpu": the
# paper-size model, measured at 921 clips/s on an H100 (bf16, batch 64, BENCHMARKS.md "Models"),
# scaled to gpu.yaml's A10G by dense bf16 tensor peak (125 vs 989 TFLOP/s) = 116, taken as 100:
# derived, not measured on an A10G. A finished run records its real throughput as
# `cost/train_clips_per_s` in summary.csv.
CLIPS_PER_S = {"cpu": 60.0, "gpu": 100.0}
# Presets whose `train.time_budget_s` comes from the plan (BUDGET_MARGIN x the run's estimate)
# unless --time-budget-s or --set train.time_budget_s gives one: the paper preset's runs last hours
# and their length depends on the data, so a fixed bound would cut them short (issue 17).
PLANNED_BUDGET_PRESETS = ("paper",)
BUDGET_MARGIN = 2.0
MIN_PLANNED_BUDGET_S = 1800.0  # start-up, data reading and scoring besides the training estimate
# Logical CPUs planned per CPU Train worker (see plan_cluster).
CPU_TRIAL_FOOTPRINT = 4


@dataclass(frozen=True)
class NodeType:
    """One kind of node that can run trials: logical CPUs and GPUs per node, and how many nodes."""

    name: str
    cpus: float
    gpus: float
    max_nodes: int
    is_head: bool = False


@dataclass(frozen=True)
class ClusterPlan:
    """How a study's trials are placed on a cluster (derived, never connected to in a dry run).

    Attributes:
        source: the cluster file, or "embedded" for a Ray started by the study itself.
        workers_per_trial: Ray Train workers per trial (DDP when > 1).
        gpus_per_worker: 0 on a CPU-only cluster.
        cpus_per_worker: logical CPUs per Train worker.
        concurrency: trials that can run at once.
        storage: shared folder for results and checkpoints, or None for the local folder.
        nodes: the node types that run trials.
    """

    source: str
    workers_per_trial: int
    gpus_per_worker: float
    cpus_per_worker: float
    concurrency: int
    storage: str | None
    nodes: tuple[NodeType, ...]

    @property
    def device(self) -> str:
        return "gpu" if self.gpus_per_worker > 0 else "cpu"

    def overrides(self) -> dict[str, Any]:
        """Dotted config overrides that put each run on the planned resources."""
        return {
            "train.num_workers": self.workers_per_trial,
            "train.use_gpu": self.gpus_per_worker > 0,
            "train.cpus_per_worker": self.cpus_per_worker,
        }


def _parse_storage(commands: Sequence[str]) -> str | None:
    """SELD_STORAGE named in setup commands: ``export SELD_STORAGE=/mnt/efs/seld`` or ``${SELD_STORAGE:-X}``."""
    for cmd in commands:
        m = re.search(r"SELD_STORAGE=\$\{SELD_STORAGE:-([^}]+)\}", cmd) or re.search(
            r"SELD_STORAGE=([^\s'\";&|]+)", cmd)
        if m:
            return os.path.expandvars(m.group(1))
    return None


def _start_flag(commands: Sequence[str], flag: str) -> float | None:
    for cmd in commands:
        m = re.search(rf"--{flag}[= ](\d+(?:\.\d+)?)", cmd)
        if m:
            return float(m.group(1))
    return None


def load_launcher_file(path: Path) -> dict[str, Any]:
    """Read a Ray cluster launcher YAML and validate it with Ray's own checks (no connection).

    Returns the prepared config (defaults filled in, as ``ray up`` would see it).
    Raises UserError naming the file and Ray's complaint when it is not a valid launcher file.
    """
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read cluster file ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a Ray cluster launcher mapping (cluster_name, provider, ...)")
    try:
        cfg = prepare_config(raw)
        validate_config(cfg)
    except (Exception, SystemExit) as e:  # jsonschema / ValueError / cli_logger.abort
        msg = getattr(e, "message", None) or str(e) or type(e).__name__
        raise UserError(f"{path}: not a valid Ray cluster launcher file: {msg}") from None
    return cfg


def _nodes_from_launcher(cfg: dict[str, Any]) -> tuple[list[NodeType], list[str]]:
    types_ = cfg["available_node_types"]
    max_total = int(cfg.get("max_workers", 0))
    setup = list(cfg.get("setup_commands", [])) + list(cfg.get("head_setup_commands", []))
    head = cfg["head_node_type"]
    nodes = []
    if cfg["provider"]["type"] == "local":
        # The local provider detects resources at `ray start`; read them from the start command.
        start = cfg.get("head_start_ray_commands", [])
        cpus = _start_flag(start, "num-cpus") or float(os.cpu_count() or 1)
        gpus = _start_flag(start, "num-gpus") or 0.0
        n_workers = len(cfg["provider"].get("worker_ips", []))
        nodes.append(NodeType(head, cpus, gpus, 1 + n_workers, is_head=True))
        return nodes, setup
    for name, nt in types_.items():
        res = nt.get("resources", {})
        cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
        # The head counts once and is not limited by the global max_workers (workers are).
        n = 1 if name == head else int(nt.get("max_workers", max_total))
        if cpus > 0 or gpus > 0:
            nodes.append(NodeType(name, cpus, gpus, n, is_head=name == head))
    return nodes, setup


def _nodes_from_sbatch(path: Path) -> tuple[list[NodeType], list[str]]:
    text = path.read_text()
    directives = dict(re.findall(r"^#SBATCH\s+--([\w-]+)=(\S+)", text, flags=re.M))
    try:
        n_nodes = int(directives.get("nodes", "1"))
        gpus = float(directives.get("gpus-per-node", "0").split(":")[-1])
        cpus = float(directives.get("cpus-per-task", "1")) * int(directives.get("ntasks-per-node", "1"))
    except ValueError as e:
        raise UserError(f"{path}: cannot read the #SBATCH resources ({e})") from None
    return [NodeType("slurm-node", cpus, gpus, n_nodes)], text.splitlines()


def plan_cluster(path: Path | None, cfg: ExperimentConfig) -> ClusterPlan:
    """Per-trial resources and concurrency from a cluster file (or this machine when None).

    GPU clusters: one GPU per Train worker, ``cfg.train.num_workers`` workers per trial kept on one
    node, half of a node's CPUs shared among its Train workers (the rest feed Ray Data), and as
    many concurrent trials as the nodes hold, counting the largest node types first up to the
    global ``max_workers``. CPU clusters: 1 CPU per worker, and each trial planned at
    ``CPU_TRIAL_FOOTPRINT`` logical CPUs per worker (Train worker, Ray Data tasks, the trial driver:
    a Train run that takes every CPU hangs Ray Data, and on 2 cores a second concurrent trial
    brings no speed-up, notes/ray-2.60.md).
    """
    if path is None:
        import torch

        gpus = float(torch.cuda.device_count())
        cpus = float(max(4, os.cpu_count() or 1))
        nodes, setup, source = [NodeType("this-machine", cpus, gpus, 1)], [], "embedded"
        max_total = 1
    else:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--cluster {path}: no such file")
        source = str(path)
        if path.suffix in (".sbatch", ".sh"):
            nodes, setup = _nodes_from_sbatch(path)
            max_total = nodes[0].max_nodes
        else:
            launcher = load_launcher_file(path)
            nodes, setup = _nodes_from_launcher(launcher)
            max_total = int(launcher.get("max_workers", 0))
    if not nodes:
        raise UserError(f"{source}: no node type offers CPUs or GPUs for trials")
    n_workers = cfg.train.num_workers
    gpu_nodes = [n for n in nodes if n.gpus >= n_workers]
    if gpu_nodes:
        gpu_nodes.sort(key=lambda n: -n.gpus)
        cpus_per_worker = max(1.0, min(math.floor(n.cpus / (2 * n.gpus)) for n in gpu_nodes))
        concurrency, budget = 0, max_total
        for n in gpu_nodes:
            used = n.max_nodes if n.is_head else min(n.max_nodes, budget)
            concurrency += used * int(n.gpus // n_workers)
            budget -= 0 if n.is_head else used
        gpus_per_worker = 1.0
        used_nodes = tuple(gpu_nodes)
    else:
        cpus_per_worker = 1.0
        concurrency = sum(int(n.cpus // (CPU_TRIAL_FOOTPRINT * n_workers * cpus_per_worker)) * n.max_nodes
                          for n in nodes)
        gpus_per_worker = 0.0
        used_nodes = tuple(nodes)
    storage = os.environ.get("SELD_STORAGE") if path is not None and os.environ.get("SELD_STORAGE") else _parse_storage(setup)
    return ClusterPlan(source, n_workers, gpus_per_worker, cpus_per_worker, max(1, concurrency),
                       storage if path is not None else None, used_nodes)


def estimate_run_hours(cfg: ExperimentConfig, n_train_real: int, n_train_synth: int, plan: ClusterPlan) -> float:
    """Upper-bound wall hours of one run: clip-epochs of both stages over the workers' throughput."""
    clips = {1: n_train_real * ("real" in cfg.data.stage1_domains)
             + n_train_synth * ("synthetic" in cfg.data.stage1_domains), 2: n_train_real}
    clip_epochs = sum(cfg.train.stage_config(s).epochs * clips[s] for s in cfg.train.stage_numbers)
    return clip_epochs / (CLIPS_PER_S[plan.device] * plan.workers_per_trial) / 3600.0


def planned_budget_s(run_hours: float) -> float:
    """A run's time budget from its estimate: BUDGET_MARGIN x the hours, at least MIN_PLANNED_BUDGET_S."""
    return max(MIN_PLANNED_BUDGET_S, round(BUDGET_MARGIN * run_hours * 3600.0, -1))


def budget_overrides(preset: str, overrides: dict[str, Any], run_hours: float) -> dict[str, Any]:
    """``{"train.time_budget_s": planned}`` for a run of a PLANNED_BUDGET_PRESETS preset whose
    overrides set no budget; else nothing (the preset's or the user's budget stands)."""
    if preset not in PLANNED_BUDGET_PRESETS or "train.time_budget_s" in overrides:
        return {}
    return {"train.time_budget_s": planned_budget_s(run_hours)}


def format_plan(plan: ClusterPlan, n_trials: int, run_hours: float, title: str,
                budget_s: float | None = None) -> str:
    """Human-readable plan printed by ``--dry-run``; ``budget_s``: the runs' train.time_budget_s
    (the largest), stated with whether the plan set it."""
    per_trial = f"{plan.workers_per_trial} worker(s) x ({plan.cpus_per_worker:g} CPU"
    per_trial += f", {plan.gpus_per_worker:g} GPU)" if plan.gpus_per_worker else ")"
    devices = plan.workers_per_trial
    waves = math.ceil(n_trials / plan.concurrency)
    lines = [
        f"plan for {title}",
        f"  cluster file        : {plan.source}",
        "  node types          : " + ", ".join(f"{n.name} ({n.cpus:g} CPU, {n.gpus:g} GPU, <= {n.max_nodes})" for n in plan.nodes),
        f"  trials              : {n_trials}",
        f"  resources per trial : {per_trial}",
        f"  concurrency         : {plan.concurrency} trials at once",
        f"  storage             : {plan.storage or 'local folder (--out)'}",
        f"  est. hours per trial: {run_hours:.2f} (upper bound, {CLIPS_PER_S[plan.device]:g} clips/s per {plan.device} worker)",
        f"  est. wall time      : {waves * run_hours:.2f} h ({waves} wave(s))",
        f"  est. device-hours   : {n_trials * run_hours * devices:.2f} {plan.device}-hours",
    ]
    if budget_s is not None:
        lines.append(f"  time budget per run : {budget_s:.0f} s = {budget_s / 3600:.2f} h (train.time_budget_s; "
                     "a run that reaches it is recorded as status time_budget)")
    return "\n".join(lines)


def plan_storage_named(cluster: Path | None) -> bool:
    """Whether a cluster file names shared storage (SELD_STORAGE) for the results."""
    if cluster is None or not Path(cluster).is_file():
        return False
    return _parse_storage(Path(cluster).read_text().splitlines()) is not None or bool(os.environ.get("SELD_STORAGE"))


def start_ray(plan: ClusterPlan, env_vars: dict[str, str] | None = None) -> None:
    """Connect to the planned cluster, or start an embedded Ray on loopback (no-op if running),
    through :func:`seld.train.init_ray`. Training logs reach this driver (and ``ray job logs``);
    ``env_vars`` (e.g. :func:`seld.study.tune.forwarded_env`) reach every trial and Train worker
    through Ray's runtime environment."""
    from seld.train import init_ray

    if plan.source != "embedded":
        log.info("Ray cluster of %s", plan.source)
        init_ray(address=os.environ.get("RAY_ADDRESS", "auto"), env_vars=env_vars)
        return
    init_ray(num_cpus=int(plan.nodes[0].cpus), num_gpus=int(plan.nodes[0].gpus), env_vars=env_vars)
