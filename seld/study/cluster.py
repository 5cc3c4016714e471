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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from seld.compat import ray_prepare_launcher_config, ray_validate_launcher_config
from seld.config import ExperimentConfig
from seld.errors import UserError
from seld.storage import check_uri, is_uri
from seld.study.session import init_ray

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
# Logical CPUs per core of an embedded Ray on a CPU-only machine: one for a run's Train worker, one
# for its Ray Data tasks (the row-group engine leaves it idle).
EMBEDDED_CPU_FOOTPRINT = 2
# Custom resource of the nodes that are never preempted (the head, or an on-demand node type):
# where a cluster file advertises it, every trial's driver asks for DRIVER_SHARE of it and no CPU,
# so drivers (and their Train controllers, which Train V2 pins to the driver's node) never run
# on spot nodes; a spot loss then takes Train workers only, which Train restores from the last
# epoch's checkpoint.
DRIVER_RESOURCE = "seld_driver"
DRIVER_SHARE = 0.01
# Train-level restarts of a run from its last checkpoint on a cluster file (spot nodes come and
# go; one trial may lose its node several times a night); 0 on an embedded Ray, where a failure
# is a bug to see, not a lost node.
CLUSTER_TRAIN_MAX_FAILURES = 10


@dataclass(frozen=True)
class NodeType:
    """One kind of node that can run trials: logical CPUs and GPUs per node, and how many nodes."""

    name: str
    cpus: float
    gpus: float
    max_nodes: int
    is_head: bool = False
    drivers: bool = False  # advertises DRIVER_RESOURCE (not preemptible: trial drivers go here)


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
        driver_nodes: whether a node type advertises DRIVER_RESOURCE (trial drivers go there).
        multi_node: the cluster can have more than one node.
        train_max_failures: Train-level restarts of a run from its last checkpoint.
    """

    source: str
    workers_per_trial: int
    gpus_per_worker: float
    cpus_per_worker: float
    concurrency: int
    storage: str | None
    nodes: tuple[NodeType, ...]
    driver_nodes: bool = False
    train_max_failures: int = 0
    multi_node: bool = False  # more than one node: results and caches must be on `storage`
    torch_threads: int = 0  # embedded plans: threads per Train worker from the cores (0: the default)

    @property
    def device(self) -> str:
        return "gpu" if self.gpus_per_worker > 0 else "cpu"

    def overrides(self) -> dict[str, Any]:
        """Dotted config overrides that put each run on the planned resources."""
        return {
            "train.num_workers": self.workers_per_trial,
            "train.use_gpu": self.gpus_per_worker > 0,
            "train.cpus_per_worker": self.cpus_per_worker,
            **({"train.max_failures": self.train_max_failures} if self.train_max_failures else {}),
            # On a cluster a worker's torch threads are the CPUs it reserved (more would oversubscribe a
            # shared node); an embedded Ray keeps the default (the machine's cores / its workers).
            # On this machine (embedded, CPU) the plan divides the cores among the runs at once.
            **({"train.torch_threads": max(1, int(self.cpus_per_worker))} if self.source != "embedded"
               else {"train.torch_threads": self.torch_threads} if self.torch_threads else {}),
            # On a cluster Ray Data reads the store (on its data nodes, from a bucket if need be);
            # one machine keeps the measured-faster default (data.engine "auto", seld/data.py).
            **({"data.engine": "ray_data"} if self.source != "embedded" else {}),
            # A run that uses Ray Data keeps its share of the CPUs Train leaves free: concurrent runs
            # left to Ray's division can each get none (a hang, notes/ray-2.60.md).
            **({"data.ray_data_cpus": self.data_cpus_per_trial()} if self.source == "embedded" else {}),
        }

    def data_cpus_per_trial(self) -> float:
        """Logical CPUs for one trial's Ray Data tasks on an embedded Ray: those Train workers leave
        free, shared equally by the concurrent trials (at least 1)."""
        total = sum(n.cpus * n.max_nodes for n in self.nodes)
        train = self.concurrency * self.workers_per_trial * self.cpus_per_worker
        return float(max(1, math.floor((total - train) / self.concurrency)))

    def driver_resources(self) -> dict[str, float]:
        """Resources of one trial's driver process (Tune's ``with_resources``): a sliver of
        DRIVER_RESOURCE and no CPU where the cluster has driver nodes (their CPUs, if any, are not
        for trials), else 0.01 CPU (Tune refuses an empty request)."""
        return {"cpu": 0.0, DRIVER_RESOURCE: DRIVER_SHARE} if self.driver_nodes else {"cpu": 0.01}


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


def _start_resources(commands: Sequence[str]) -> dict[str, float]:
    """Custom resources of ``ray start --resources='{"name": n}'`` in start commands."""
    import json

    for cmd in commands:
        m = re.search(r"--resources[= ]['\"]?(\{[^}]*\})", cmd)
        if m:
            try:
                return {str(k): float(v) for k, v in json.loads(m.group(1)).items()}
            except (ValueError, AttributeError):
                return {}
    return {}


def load_launcher_file(path: Path) -> dict[str, Any]:
    """Read a Ray cluster launcher YAML and validate it with Ray's own checks (no connection).

    Returns the prepared config (defaults filled in, as ``ray up`` would see it).
    Raises UserError naming the file and Ray's complaint when it is not a valid launcher file.
    """
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read cluster file ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a Ray cluster launcher mapping (cluster_name, provider, ...)")
    try:
        cfg = ray_prepare_launcher_config(raw)
        ray_validate_launcher_config(cfg)
    except (Exception, SystemExit) as e:  # jsonschema / ValueError / cli_logger.abort
        msg = getattr(e, "message", None) or str(e) or type(e).__name__
        raise UserError(f"{path}: not a valid Ray cluster launcher file: {msg}") from None
    return cfg


def _is_data_node(node_type: dict[str, Any]) -> bool:
    """Whether a launcher node type is a data node (label seld-node=data: Ray Data only, no trials)."""
    return (node_type.get("labels") or {}).get("seld-node") == "data"


def _nodes_from_launcher(cfg: dict[str, Any]) -> tuple[list[NodeType], list[str]]:
    types_ = cfg["available_node_types"]
    max_total = int(cfg.get("max_workers", 0))
    setup = list(cfg.get("setup_commands", [])) + list(cfg.get("head_setup_commands", []))
    head = cfg["head_node_type"]
    nodes = []
    if cfg["provider"]["type"] == "local":
        # The local provider detects resources at `ray start`; read them from the start commands
        # (workers as the head unless their own command says otherwise).
        start = cfg.get("head_start_ray_commands", [])
        wstart = cfg.get("worker_start_ray_commands", [])
        hc = _start_flag(start, "num-cpus")
        cpus = float(os.cpu_count() or 1) if hc is None else hc
        gpus = _start_flag(start, "num-gpus") or 0.0
        n_workers = len(cfg["provider"].get("worker_ips", []))
        drivers = DRIVER_RESOURCE in _start_resources(start)
        wc, wg = _start_flag(wstart, "num-cpus"), _start_flag(wstart, "num-gpus")
        if n_workers and (wc is not None or wg is not None or drivers):
            nodes.append(NodeType(head, cpus, gpus, 1, is_head=True, drivers=drivers))
            nodes.append(NodeType("worker", cpus if wc is None else wc, gpus if wg is None else wg, n_workers))
        else:
            nodes.append(NodeType(head, cpus, gpus, 1 + n_workers, is_head=True, drivers=drivers))
        return nodes, setup
    for name, nt in types_.items():
        res = nt.get("resources", {})
        cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
        if _is_data_node(nt):
            continue  # CPU-only data nodes run Ray Data, never trials
        # The head counts once and is not limited by the global max_workers (workers are).
        n = 1 if name == head else int(nt.get("max_workers", max_total))
        if cpus > 0 or gpus > 0 or DRIVER_RESOURCE in res:
            nodes.append(NodeType(name, cpus, gpus, n, is_head=name == head, drivers=DRIVER_RESOURCE in res))
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
    drivers = DRIVER_RESOURCE in text  # the head's `ray start --resources`
    return [NodeType("slurm-node", cpus, gpus, n_nodes, drivers=drivers)], text.splitlines()


def storage_path(value: str, source: str = "--storage") -> str:
    """A study's storage as given (``--storage``, SELD_STORAGE, a cluster file): a filesystem
    path every node mounts (EFS, NFS, Lustre), expanded; or an object-store URI (``s3://bucket/prefix``,
    ``gs://...``), checked for its form and kept as a URI (never turned into a local path:
    ``Path("s3://b")`` is ``s3:/b``). Run folders are then written in a node-local staging folder
    and mirrored to the URI (:mod:`seld.storage`).
    """
    if is_uri(value):
        return check_uri(value, source)
    return os.path.expanduser(os.path.expandvars(value))


def _is_under(path: Path, root: str) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(root))


def check_shared_paths(plan: ClusterPlan, paths: dict[str, Path | None]) -> None:
    """On a multi-node cluster, refuse (one line, before anything runs) a results or cache folder
    outside the plan's shared storage: trials on other nodes would write run folders where the
    study driver never looks, or fail reading a feature store that only one node holds.

    Args:
        paths: option name -> folder (``{"--out": OUT, "--cache-dir": DIR}``), None when not given.
    """
    if not plan.multi_node:
        return
    if is_uri(plan.storage):
        # Results go to the object store from each node's staging folder, and so does the feature
        # store (seld.study.prepare), unless --cache-dir names a folder: the user's shared filesystem.
        return
    for name, path in paths.items():
        if path is None:
            continue
        if not plan.storage:
            raise UserError(f"{name} {path}: {plan.source} is a multi-node cluster but names no shared "
                            "storage; pass --storage with a path every node mounts (or set SELD_STORAGE)")
        if not _is_under(path, plan.storage):
            raise UserError(f"{name} {path}: not on the shared storage {plan.storage} of the multi-node "
                            f"cluster {plan.source}; other nodes cannot see it (leave {name} out, or "
                            f"put it under {plan.storage})")


def plan_cluster(path: Path | None, cfg: ExperimentConfig, storage: str | None = None,
                 max_concurrent: int | None = None) -> ClusterPlan:
    """Per-trial resources and concurrency from a cluster file (or this machine when None).

    GPU clusters: one GPU per Train worker, ``cfg.train.num_workers`` workers per trial kept on one
    node, half of a node's CPUs shared among its Train workers (the rest feed Ray Data), and as
    many concurrent trials as the nodes hold, counting the largest node types first up to the
    global ``max_workers``. CPU clusters: 1 CPU per worker, and each trial planned at
    ``CPU_TRIAL_FOOTPRINT`` logical CPUs per worker (Train worker, Ray Data tasks, the trial driver:
    a Train run that takes every CPU hangs Ray Data, notes/ray-2.60.md). This machine without a
    cluster file, CPU only: as many runs at once as cores per run's workers, each worker with one
    torch thread (the cores divided among the runs when ``--concurrency`` is lower), on an
    embedded Ray of ``EMBEDDED_CPU_FOOTPRINT`` logical CPUs per core, so Ray Data keeps a CPU per run.

    ``storage`` (``--storage``) overrides the cluster file's shared storage and SELD_STORAGE;
    ``max_concurrent`` (``--concurrency``): the trials at once (the dry run's waves and wall time too).
    """
    if path is None:
        import torch

        gpus = float(torch.cuda.device_count())
        cores = os.cpu_count() or 1
        # Logical CPUs of the embedded Ray: a Train CPU and a Ray Data CPU for each run at once.
        cpus = float(max(4, EMBEDDED_CPU_FOOTPRINT * cores))
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
            max_total = int(launcher.get("max_workers", 0)) - sum(
                int(nt.get("max_workers", 0)) for nt in launcher["available_node_types"].values() if _is_data_node(nt))
    drivers = any(n.drivers for n in nodes)
    nodes = [n for n in nodes if n.cpus > 0 or n.gpus > 0]
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
    elif source == "embedded":
        # This machine, CPU only: one torch thread per run and as many runs at once as cores
        # (BENCHMARKS.md, "Runs at once": on 2 cores, 2 runs x 1 thread train 1.3-1.4x the clips of
        # 1 run x 2 threads, and their start-up and scoring overlap).
        cpus_per_worker = 1.0
        concurrency = max(1, (os.cpu_count() or 1) // n_workers)
        gpus_per_worker = 0.0
        used_nodes = tuple(nodes)
    else:
        cpus_per_worker = 1.0
        concurrency = sum(int(n.cpus // (CPU_TRIAL_FOOTPRINT * n_workers * cpus_per_worker)) * n.max_nodes
                          for n in nodes)
        gpus_per_worker = 0.0
        used_nodes = tuple(nodes)
    if storage:
        storage = storage_path(storage)
    elif path is not None:
        found = os.environ.get("SELD_STORAGE") or _parse_storage(setup)
        storage = storage_path(found, f"{source}: SELD_STORAGE") if found else None
    n_nodes = sum(n.max_nodes for n in nodes) + (1 if drivers and not any(n.is_head for n in nodes) else 0)
    concurrency = max(1, concurrency if max_concurrent is None else max_concurrent)
    if source == "embedded":
        # Whatever the runs at once and their workers (--concurrency 3, train.num_workers=3 on 2
        # cores), Ray must keep a whole CPU beside the Train workers and the trial drivers: a Ray
        # Data task needs one, and Train workers waiting for their data hold theirs (a hang).
        need = math.ceil(concurrency * (n_workers * cpus_per_worker + DRIVER_SHARE) + 1)
        if need > nodes[0].cpus:
            nodes = [replace(nodes[0], cpus=float(need))]
            used_nodes = tuple(nodes)
    threads = 0
    if source == "embedded":  # the cores shared by the runs at once (--concurrency too), GPU runs included
        threads = max(1, (os.cpu_count() or 1) // (concurrency * n_workers))
    return ClusterPlan(source, n_workers, gpus_per_worker, cpus_per_worker, concurrency,
                       storage, used_nodes, driver_nodes=drivers, torch_threads=threads,
                       train_max_failures=CLUSTER_TRAIN_MAX_FAILURES if path is not None else 0,
                       multi_node=path is not None and n_nodes > 1)


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
        "  trial drivers       : " + (f"on {DRIVER_RESOURCE} nodes (not preemptible)" if plan.driver_nodes
                                       else "anywhere (no node advertises " + DRIVER_RESOURCE + ")"),
        f"  node loss           : Train restores from the last epoch, up to {plan.train_max_failures} times per run",
        f"  est. hours per trial: {run_hours:.2f} (upper bound, {CLIPS_PER_S[plan.device]:g} clips/s per {plan.device} worker)",
        f"  est. wall time      : {waves * run_hours:.2f} h ({waves} wave(s))",
        f"  est. device-hours   : {n_trials * run_hours * devices:.2f} {plan.device}-hours",
    ]
    if budget_s is not None:
        lines.append(f"  time budget per run : {budget_s:.0f} s = {budget_s / 3600:.2f} h (train.time_budget_s; "
                     "a run that reaches it is recorded as status time_budget)")
    return "\n".join(lines)


def plan_storage_named(cluster: Path | None) -> bool:
    """Whether a cluster file (or SELD_STORAGE) names shared storage for the results."""
    if cluster is None or not Path(cluster).is_file():
        return False
    return _parse_storage(Path(cluster).read_text().splitlines()) is not None or bool(os.environ.get("SELD_STORAGE"))


def start_ray(plan: ClusterPlan, env_vars: dict[str, str] | None = None) -> None:
    """Connect to the planned cluster, or start an embedded Ray on loopback (no-op if running),
    through :func:`seld.study.session.init_ray`. Training logs reach this driver (and ``ray job logs``);
    ``env_vars`` (e.g. :func:`seld.study.tune.forwarded_env`) reach every trial and Train worker
    through Ray's runtime environment."""
    if plan.source != "embedded":
        log.info("Ray cluster of %s", plan.source)
        init_ray(address=os.environ.get("RAY_ADDRESS", "auto"), env_vars=env_vars)
        return
    init_ray(num_cpus=int(plan.nodes[0].cpus), num_gpus=int(plan.nodes[0].gpus), env_vars=env_vars)
