"""Studies: Ray Tune over Train V2 runs (ablations: variant x seed; sweeps: Optuna + ASHA).

Reads a study declaration (``studies/*.py``), the data (generated and cached by config hash, or a
user's DCASE2025 root) and optionally a cluster file (``cluster/*.yaml`` or ``cluster/*.sbatch``);
writes ``results/<study>/summary.csv`` (one tidy row per run), ``curves.csv`` (per-epoch rows),
the run folders under ``runs/`` and, through :mod:`seld.report`, the tables and plots.
A sweep writes ``trials.csv``, ``best_config.json``, the Optuna journal and Optuna's plots.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from seld.cli import configure_logging
from seld.config import (
    ConfigError,
    ExperimentConfig,
    config_hash,
    parse_set_args,
    preset_config,
)
from seld.errors import UserError
from seld.report import TableSpec, paste_into_readme, report_from_files
from seld.runfolder import atomic_write

log = logging.getLogger(__name__)

# Rough training throughput of one Train worker (5-s clips per second, forward + backward), used
# only for the dry-run's device-hour estimate. Both are rough assumptions, not measurements: "cpu"
# for the `local` model on a 2-core machine, "gpu" for the paper-size model on one A10G-class GPU.
# A finished run records its real throughput as `cost/train_clips_per_s` in summary.csv.
CLIPS_PER_S = {"cpu": 60.0, "gpu": 400.0}
# Logical CPUs planned per CPU Train worker (see plan_cluster).
CPU_TRIAL_FOOTPRINT = 4
# Clip counts of the real DCASE2025 stereo development set (spec §1) when no store is at hand.
DCASE2025_DEV_CLIPS = {"train": 20_000, "test": 10_000}
SUMMARY_COLUMNS = (
    "study", "variant", "seed", "status", "error", "attempts", "preset", "dataset", "protocol",
    "git_sha", "config_hash", "data_hash", "run_dir", "n_devices", "wall_s", "device_hours",
)


# --- Cluster files -> resource plans ---------------------------------------------------------------
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
    stages = cfg.train.stages
    s1 = cfg.train.stage1.epochs * (n_train_real * ("real" in cfg.data.stage1_domains)
                                    + n_train_synth * ("synthetic" in cfg.data.stage1_domains))
    s2 = cfg.train.stage2.epochs * n_train_real
    clip_epochs = (s1 if stages in ("both", "stage1") else 0) + (s2 if stages in ("both", "stage2") else 0)
    return clip_epochs / (CLIPS_PER_S[plan.device] * plan.workers_per_trial) / 3600.0


def format_plan(plan: ClusterPlan, n_trials: int, run_hours: float, title: str) -> str:
    """Human-readable plan printed by ``--dry-run``."""
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
    return "\n".join(lines)


# --- Study declarations ------------------------------------------------------------------------------
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


@dataclass
class Options:
    """Command-line options shared by the study scripts (see :func:`add_arguments`)."""

    out: Path
    preset: str
    data_root: Path | None = None
    synth_root: Path | None = None
    cluster: Path | None = None
    dry_run: bool = False
    wandb: bool = False
    resume: bool = False
    report_only: bool = False
    seeds: tuple[int, ...] | None = None
    sets: dict[str, str] = field(default_factory=dict)
    cache_dir: Path | None = None
    max_retries: int = 1
    trials: int | None = None
    concurrency: int | None = None
    time_budget_s: float | None = None
    readme: Path | None = None  # paste the first table's markdown into this README's marked block


# --- Data: generated (cached by config hash) or the user's DCASE2025 root ---------------------------------
@dataclass(frozen=True)
class DataPlan:
    store: Path
    data_root: Path
    data_hash: str
    dataset: str  # "generated" | "real"


def _tree_hash(roots: Sequence[Path]) -> str:
    """Hash of the (relative path, size) listing of the audio and label files under ``roots``."""
    h = hashlib.sha256()
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.suffix in (".wav", ".csv") and p.is_file():
                h.update(f"{p.relative_to(root)}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:12]


def _merge_roots(data_root: Path, synth_root: Path, out: Path) -> Path:
    """One DCASE2025-layout folder of symlinks: the real splits of ``data_root`` plus the synthetic
    splits of ``synth_root`` (e.g. converted DCASE2024 FOA data in ``dev-train-synth``)."""
    for top in ("stereo_dev", "metadata_dev"):
        for root in (data_root, synth_root):
            if not (root / top).is_dir():
                raise UserError(f"{root}: expected the DCASE2025 layout ({top}/<split>/...)")
            for split in sorted(p for p in (root / top).iterdir() if p.is_dir()):
                link = out / top / split.name
                link.parent.mkdir(parents=True, exist_ok=True)
                if link.is_symlink() and link.resolve() != split.resolve():
                    link.unlink()
                if not link.exists():
                    link.symlink_to(split.resolve(), target_is_directory=True)
    return out


def prepare_data(cfg: ExperimentConfig, opts: Options, work: Path) -> DataPlan:
    """Generate (or reuse) the dataset and build (or reuse) its feature store; both cached by hash."""
    from seld.store import build_store

    cache = Path(opts.cache_dir) if opts.cache_dir else work
    if opts.data_root:
        root = Path(opts.data_root)
        if not (root / "stereo_dev").is_dir():
            raise UserError(f"--data-root {root}: no stereo_dev/ folder (expected the DCASE2025 layout)")
        roots = [root]
        if opts.synth_root:
            roots.append(Path(opts.synth_root))
            root = _merge_roots(root, Path(opts.synth_root), cache / "data-merged")
        data_hash, dataset = _tree_hash(roots), "real"
    else:
        from seld.synth import dataset_hash, generate_dataset

        data_hash, dataset = dataset_hash(cfg.synth), "generated"
        root = generate_dataset(cfg.synth, cache / f"synth-{data_hash}", progress=True)
    store = build_store(root, cache / f"store-{data_hash}", cfg.features)
    # Absolute paths: trials run in Ray workers whose working directory is not the driver's.
    return DataPlan(Path(store).resolve(), Path(root).resolve(), data_hash, dataset)


# --- Run folders and rows ----------------------------------------------------------------------------------
def git_sha() -> str:
    """The repository's commit (``-dirty`` when tracked files changed), or "unknown" outside git."""
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json -> flat columns: scalars and strings (e.g. ``precision``) as they are,
    ``classwise.<split>[c].f20`` as ``<split>/class/<c>/f20`` (per-class F20 only; the rest stays in
    the run folder)."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            flat[key] = int(value)
        elif isinstance(value, int | float | str) or value is None:
            flat[key] = value
        elif key == "classwise" and isinstance(value, dict):
            for split, rows in value.items():
                for row in rows:
                    flat[f"{split}/class/{row['class']}/f20"] = row.get("f20")
    return flat


def _frame_polyphony(events) -> dict[int, int]:
    """Reference events per label frame: {frame: count}."""
    frames, counts = np.unique(np.asarray(events["frame"], dtype=np.int64), return_counts=True)
    return {int(f): int(c) for f, c in zip(frames, counts, strict=True)}


def score_breakdowns(pred_dir: Path, data_root: Path, prefix: str = "test_pp",
                     distance_bins_m: Sequence[float] = (0.0, 1.5, 3.0, 100.0)) -> dict[str, float]:
    """Per-site, per-distance-bin and per-polyphony scores of a run's test predictions, plus the
    jackknife interval (over files) of the overall scores.

    Reads ``pred_dir/*.csv`` (DCASE2025 format) and the references under
    ``data_root/metadata_dev/dev-test-*/``. Distance bins filter reference and predicted events
    by their own distance (m); polyphony filters every frame by the number of reference events in
    it (3 means 3 or more). Returns flat columns ``<prefix>/site/<site>/<metric>``,
    ``<prefix>/distance/<lo>-<hi>m/<metric>``, ``<prefix>/polyphony/<k>/<metric>``,
    ``<prefix>/<metric>_ci_lo`` / ``_ci_hi``.
    """
    from seld.config import SPLITS
    from seld.labels import read_prediction_csv, read_reference_csv
    from seld.metrics import score_events

    refs, preds, sites = [], [], []
    for split, info in SPLITS.items():
        if info["role"] != "test" or info["domain"] != "real":
            continue
        for ref_path in sorted((Path(data_root) / "metadata_dev" / split).glob("*.csv")):
            pred_path = Path(pred_dir) / ref_path.name
            refs.append(read_reference_csv(ref_path))
            preds.append(read_prediction_csv(pred_path) if pred_path.exists() else read_reference_csv(ref_path)[:0])
            sites.append(info["site"])
    if not refs:
        return {}
    out: dict[str, float] = {}

    def put(key: str, score) -> None:
        for m in ("f20", "doae_cd", "rde_cd"):
            v = getattr(score, m)
            out[f"{prefix}/{key}/{m}"] = float(v) if v is not None and np.isfinite(v) else float("nan")

    full = score_events(refs, preds, jackknife=len(refs) > 2)
    for m in ("f20", "doae_cd", "rde_cd"):
        iv = (full.intervals or {}).get(m)
        if iv:
            out[f"{prefix}/{m}_ci_lo"], out[f"{prefix}/{m}_ci_hi"] = float(iv["low"]), float(iv["high"])
    for site in sorted(set(sites)):
        idx = [i for i, s in enumerate(sites) if s == site]
        put(f"site/{site}", score_events([refs[i] for i in idx], [preds[i] for i in idx]))
    for lo, hi in zip(distance_bins_m[:-1], distance_bins_m[1:], strict=True):
        def keep(ev, lo=lo, hi=hi):
            return ev[(ev["distance"] >= lo * 100) & (ev["distance"] < hi * 100)]
        name = f"{lo:g}-{hi:g}m" if hi < 100 else f">={lo:g}m"
        put(f"distance/{name}", score_events([keep(r) for r in refs], [keep(p) for p in preds]))
    for k in (1, 2, 3):
        def frames_with(ref, pred, k=k):
            poly = _frame_polyphony(ref)
            sel = {f for f, n in poly.items() if (n >= k if k == 3 else n == k)}
            return (ref[np.isin(ref["frame"], list(sel))] if len(ref) else ref,
                    pred[np.isin(pred["frame"], list(sel))] if len(pred) else pred)
        pairs = [frames_with(r, p) for r, p in zip(refs, preds, strict=True)]
        put(f"polyphony/{k}", score_events([a for a, _ in pairs], [b for _, b in pairs]))
    return out


def _row(study: str, variant: str, seed: int, cfg: ExperimentConfig, run_dir: Path, out: Path,
         data: DataPlan | None, sha: str, status: str, error: str, extra: dict[str, Any]) -> dict[str, Any]:
    attempts_file = run_dir / "attempts.jsonl"
    attempts = len(attempts_file.read_text().splitlines()) if attempts_file.exists() else 0
    row: dict[str, Any] = {
        "study": study, "variant": variant, "seed": seed, "status": status, "error": error,
        "attempts": attempts, "preset": cfg.preset, "dataset": data.dataset if data else "",
        "protocol": cfg.data.protocol, "git_sha": sha, "config_hash": config_hash(cfg),
        "data_hash": data.data_hash if data else "", "run_dir": os.path.relpath(run_dir, out),
        "n_devices": cfg.train.num_workers,
    }
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        row.update(flatten_metrics(metrics))
        row["wall_s"] = metrics.get("cost/wall_s")
        if row["wall_s"] is None and attempts:
            # Driver-side wall time of the run that finished: its last start to its metrics.json.
            start = json.loads(attempts_file.read_text().splitlines()[-1])["start_unix_s"]
            row["wall_s"] = round(metrics_path.stat().st_mtime - start, 2)
        if row["wall_s"] is not None:
            row["device_hours"] = round(row["wall_s"] * cfg.train.num_workers / 3600.0, 5)
        if data is not None and (run_dir / "predictions").is_dir():
            row.update(score_breakdowns(run_dir / "predictions", data.data_root))
    row.update(extra)
    return row


def _write_rows(rows: list[dict[str, Any]], path: Path, lead: Sequence[str]) -> pd.DataFrame:
    df = pd.DataFrame.from_records(rows)
    cols = [c for c in lead if c in df.columns] + sorted(c for c in df.columns if c not in lead)
    df = df[cols]
    with atomic_write(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")
    return df


def _curves(runs: list[tuple[str, int, Path]]) -> pd.DataFrame | None:
    parts = []
    for variant, seed, run_dir in runs:
        p = run_dir / "metrics.csv"
        if p.exists() and p.stat().st_size:
            df = pd.read_csv(p)
            df.insert(0, "step", range(1, len(df) + 1))
            df.insert(0, "seed", seed)
            df.insert(0, "variant", variant)
            parts.append(df)
    return pd.concat(parts, ignore_index=True) if parts else None


# --- Ray Tune ------------------------------------------------------------------------------------------
def _start_ray(plan: ClusterPlan) -> None:
    """Connect to the planned cluster, or start an embedded Ray on loopback (no-op if running)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    if plan.source != "embedded":
        address = os.environ.get("RAY_ADDRESS", "auto")
        log.info("connecting to the Ray cluster at %s (%s)", address, plan.source)
        ray.init(address=address, log_to_driver=False)
        return
    ray.init(num_cpus=int(plan.nodes[0].cpus), num_gpus=int(plan.nodes[0].gpus), include_dashboard=True,
             dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", log_to_driver=False)


def _trial_env(opts: Options, study: str) -> dict[str, str]:
    """Environment each trial sets in its own process (W&B offline unless the user chose a mode)."""
    env = {"RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}
    if opts.wandb:
        env.update({"WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "WANDB_SILENT": "true",
                    "WANDB_RUN_GROUP": study})
    return env


def train_trial(spec: dict[str, Any], params: dict[str, Any] | None = None) -> dict:
    """Body of one Tune trial (runs in the trial's process): train the run, return its metrics.

    ``spec``: preset, overrides, store, run_dir, wandb options, tags. ``params``: the sweep's
    suggested values (dotted keys), applied on top. The Train run reports every epoch to Tune
    through ``TuneReportCallback`` (ASHA and Optuna see ``val/f20``).
    """
    from seld.train import run_training

    os.environ.update(spec.get("env", {}))
    cfg = preset_config(spec["preset"], {**spec["overrides"], **(params or {})})
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = (run_dir / "config.json").exists()
    with open(run_dir / "attempts.jsonl", "a") as f:
        f.write(json.dumps({"start_unix_s": round(time.time(), 3), "resume": resume,
                            "config_hash": config_hash(cfg)}) + "\n")
    if spec.get("wandb"):
        os.environ["WANDB_TAGS"] = ",".join(spec["tags"])
    return run_training(cfg, spec["store"], run_dir, resume=resume, wandb=spec.get("wandb"),
                        run_callbacks=[_tune_report_callback()])


def _tune_report_callback():
    from ray.tune.integration.ray_train import TuneReportCallback

    return TuneReportCallback()


def _ablation_trainable(config: dict, specs: dict[str, dict]) -> None:
    train_trial(specs[config["run_id"]])


def _sweep_trainable(config: dict, spec: dict) -> None:
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    spec = {**spec, "run_dir": str(Path(spec["run_dir"]) / trial_id),
            "tags": [*spec["tags"], trial_id]}
    params = {k: v for k, v in config.items() if "." in k}
    train_trial(spec, params)


def _error_text(err: BaseException | None) -> str:
    """One line naming the root cause of a trial's failure (the innermost ``XxxError: msg`` line)."""
    if err is None:
        return ""
    text = re.sub(r"\x1b\[[0-9;]*m", "", "".join(traceback.format_exception_only(type(err), err)))
    causes = re.findall(r"^\s*([\w.]*(?:Error|Exception): .+)$", text, flags=re.M)
    line = causes[-1] if causes else text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return re.sub(r"\s+", " ", line).strip()[:500]


def _prepare_out(out: Path, opts: Options, marker: str) -> None:
    if (out / marker).exists() and not opts.resume:
        raise UserError(f"{out}: already holds a study ({marker}); pass --resume to continue it, "
                        "--report-only to redo its tables, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def run_study(study: Study, opts: Options) -> Path | str:
    """Run an ablation study (or only its report). Returns summary.csv, or the plan text on --dry-run."""
    out = Path(opts.out)
    if opts.report_only:
        report_from_files(out, study.tables)
        _paste_readme(study, out, opts)
        return out / "summary.csv"
    seeds = tuple(opts.seeds) if opts.seeds else study.seeds
    base = preset_config(study.preset, {**study.overrides, **opts.sets})
    plan = plan_cluster(opts.cluster, base)
    if plan.storage and opts.out == DEFAULT_OUT_SENTINEL:
        out = Path(plan.storage) / "results" / study.name
    runs = []
    for v in study.variants:
        for seed in seeds:
            overrides = {**study.overrides, **v.overrides, **plan.overrides(), **opts.sets, "seed": seed}
            if opts.time_budget_s:
                overrides["train.time_budget_s"] = opts.time_budget_s
            cfg = preset_config(study.preset, overrides)
            run_dir = out / "runs" / f"{v.name}-s{seed}-{config_hash(cfg)[:8]}"
            runs.append((v, seed, overrides, cfg, run_dir))
    if opts.dry_run:
        n_real, n_synth = _train_counts(base, opts)
        hours = max(estimate_run_hours(cfg, n_real, n_synth, plan) for _, _, _, cfg, _ in runs)
        return format_plan(plan, len(runs), hours, f"study {study.name!r} (preset {study.preset}, "
                                                    f"{len(study.variants)} variants x {len(seeds)} seeds)")
    _prepare_out(out, opts, "summary.csv")
    work = out / "_work"
    data = prepare_data(base, opts, work)
    pending = [r for r in runs if not (r[4] / "metrics.json").exists()]
    log.info("study %s: %d runs, %d finished before, %d to train (concurrency %d)", study.name,
             len(runs), len(runs) - len(pending), len(pending), plan.concurrency)
    errors: dict[str, str] = {}
    if pending:
        env = _trial_env(opts, study.name)
        specs = {
            f"{v.name}-s{seed}": {
                "preset": study.preset, "overrides": overrides, "store": str(data.store),
                "run_dir": str(run_dir.resolve()), "tags": [study.name, v.name, f"seed{seed}"],
                "wandb": {"project": "seld", "group": study.name} if opts.wandb else None, "env": env,
            }
            for v, seed, overrides, _, run_dir in pending
        }
        errors = _tune_grid(specs, plan, out, study.name, opts)
    sha = git_sha()
    rows = []
    for v, seed, _, cfg, run_dir in runs:
        run_id = f"{v.name}-s{seed}"
        done = (run_dir / "metrics.json").exists()
        status = "ok" if done else "failed"
        error = "" if done else errors.get(run_id, "no metrics.json (interrupted?)")
        rows.append(_row(study.name, v.name, seed, cfg, run_dir, out, data, sha, status, error, {}))
    _write_rows(rows, out / "summary.csv", SUMMARY_COLUMNS)
    curves = _curves([(v.name, seed, run_dir) for v, seed, _, _, run_dir in runs])
    if curves is not None:
        curves.to_csv(out / "curves.csv", index=False, float_format="%.6g", lineterminator="\n")
    paths = report_from_files(out, study.tables)
    _paste_readme(study, out, opts)
    if opts.wandb:
        _log_tables_to_wandb(study.name, out, [out / "summary.csv", *paths])
    n_failed = sum(r["status"] != "ok" for r in rows)
    log.info("study %s: %d ok, %d failed; summary in %s", study.name, len(rows) - n_failed, n_failed,
             out / "summary.csv")
    return out / "summary.csv"


def _paste_readme(study: Study, out: Path, opts: Options) -> None:
    if opts.readme is None or not study.tables:
        return
    table = study.tables[0]
    if paste_into_readme(opts.readme, out / f"{table.name}.md", f"{study.name}:{table.name}"):
        log.info("pasted %s into %s", out / f"{table.name}.md", opts.readme)


def _tune_grid(specs: dict[str, dict], plan: ClusterPlan, out: Path, name: str, opts: Options) -> dict[str, str]:
    """One Tune trial per run spec; returns run_id -> error text of the trials that failed."""
    import ray
    from ray import tune

    _start_ray(plan)
    trainable = tune.with_resources(tune.with_parameters(_ablation_trainable, specs=specs), {"cpu": 0.01})
    storage = Path(plan.storage) / "ray" if plan.storage else (out / "_work" / "ray").resolve()
    tuner = tune.Tuner(
        trainable,
        param_space={"run_id": tune.grid_search(sorted(specs))},
        tune_config=tune.TuneConfig(max_concurrent_trials=opts.concurrency or plan.concurrency),
        run_config=ray.tune.RunConfig(
            name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(storage),
            failure_config=ray.tune.FailureConfig(max_failures=opts.max_retries),
            verbose=1,
        ),
    )
    results = tuner.fit()
    errors = {}
    for res in results:
        run_id = (res.config or {}).get("run_id")
        if res.error is not None and run_id:
            errors[run_id] = _error_text(res.error)
    return errors


def _log_tables_to_wandb(study: str, out: Path, paths: Sequence[Path]) -> None:
    import wandb

    from seld.train import finish_wandb_run

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
    finally:
        finish_wandb_run(run)


def _train_counts(cfg: ExperimentConfig, opts: Options) -> tuple[int, int]:
    """(real, synthetic) training clips for the dry-run estimate."""
    if opts.data_root:
        root = Path(opts.data_root)
        real = sum(len(list((root / "stereo_dev" / s).glob("*.wav"))) for s in ("dev-train-tau", "dev-train-sony"))
        synth_root = Path(opts.synth_root) if opts.synth_root else root
        synth = len(list((synth_root / "stereo_dev" / "dev-train-synth").glob("*.wav")))
        return real or DCASE2025_DEV_CLIPS["train"], synth
    return cfg.synth.n_real_train, cfg.synth.n_synth_train


# --- Sweeps --------------------------------------------------------------------------------------------
def _tune_space(space: dict[str, Param]) -> dict[str, Any]:
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


def _optuna_storage(path: Path):
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
    out = Path(opts.out)
    n_trials = opts.trials or sweep.n_trials
    base = preset_config(sweep.preset, {**sweep.overrides, **opts.sets})
    plan = plan_cluster(opts.cluster, base)
    if plan.storage and opts.out == DEFAULT_OUT_SENTINEL:
        out = Path(plan.storage) / "results" / sweep.name
    if opts.dry_run:
        n_real, n_synth = _train_counts(base, opts)
        hours = estimate_run_hours(base, n_real, n_synth, plan)
        return format_plan(plan, n_trials, hours, f"sweep {sweep.name!r} (preset {sweep.preset}, "
                                                  f"{len(sweep.space)} parameters, Optuna TPE + ASHA; "
                                                  "hours assume no early stop)")
    if opts.report_only:
        return _sweep_outputs(sweep, out, _optuna_storage(out / "optuna.journal"))
    _prepare_out(out, opts, "optuna.journal")
    storage = _optuna_storage(out / "optuna.journal")
    _fail_interrupted_trials(storage, sweep.name)
    done = _finished_trials(storage, sweep.name)
    remaining = n_trials - len(done)
    log.info("sweep %s: %d of %d trials finished before, %d to run", sweep.name, len(done), n_trials,
             max(remaining, 0))
    data = prepare_data(base, opts, out / "_work")
    if remaining > 0:
        overrides = {**sweep.overrides, **plan.overrides(), **opts.sets, "seed": sweep.seed}
        if opts.time_budget_s:
            overrides["train.time_budget_s"] = opts.time_budget_s
        spec = {"preset": sweep.preset, "overrides": overrides, "store": str(data.store),
                "run_dir": str((out / "runs").resolve()), "tags": [sweep.name],
                "wandb": {"project": "seld", "group": sweep.name} if opts.wandb else None,
                "env": _trial_env(opts, sweep.name)}
        _tune_sweep(sweep, spec, storage, remaining, plan, out, opts)
    trials = _sweep_outputs(sweep, out, storage)
    if opts.wandb:
        _log_tables_to_wandb(sweep.name, out, [trials, *sorted(out.glob("*.png"))])
    return trials


def sweep_scheduler(sweep: Sweep, max_t: int):
    """ASHA on the sweep's metric, one rung unit per epoch (Tune's ``training_iteration``).

    Each epoch is one Tune iteration and the run's final report (test scores) one more: a trial
    that survives every rung must reach ``max_t + 1`` (``max_t`` = epochs of the trained stages),
    or ASHA stops it before its scores exist.
    """
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", max_t=max(1, max_t) + 1,
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
                        self._seen.setdefault(_point_key(t.params), t.number)
            return self._seen

        def suggest(self, trial_id: str):
            seen = self._proposed()
            fresh = [p for p in points if _point_key(p) not in seen]
            if not fresh:
                log.info("sweep %s: all %d points of the space proposed", sweep.name, len(points))
                return Searcher.FINISHED
            for attempt in range(MAX_REPEATS + 1):
                if attempt == MAX_REPEATS:  # the sampler keeps proposing known points
                    self._ot_study.enqueue_trial(fresh[int(self._rng.integers(len(fresh)))])
                config = super().suggest(trial_id)
                ot_trial = self._ot_trials[trial_id]
                key = _point_key(ot_trial.params)
                if key not in seen:
                    seen[key] = ot_trial.number
                    return config
                ot_trial.set_user_attr(REPEAT_ATTR, seen[key])
                self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
                del self._ot_trials[trial_id]
            raise RuntimeError(f"sweep {sweep.name}: an enqueued unproposed point came back as a repeat")

    return DistinctOptunaSearch(metric=sweep.metric, mode=sweep.mode, study_name=sweep.name, storage=storage,
                                sampler=sampler)


def _point_key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


def _tune_sweep(sweep: Sweep, spec: dict, storage, n: int, plan: ClusterPlan, out: Path, opts: Options) -> None:
    import ray
    from ray import tune

    _start_ray(plan)
    cfg = preset_config(sweep.preset, spec["overrides"])
    max_t = cfg.train.max_epochs
    # Optuna ids of earlier trials seed the sampler's RNG offset so a resumed sweep does not
    # replay the same proposals.
    n_before = len(_finished_trials(storage, sweep.name))
    searcher = sweep_searcher(sweep, storage, n_before)
    scheduler = sweep_scheduler(sweep, max_t)
    trainable = tune.with_resources(tune.with_parameters(_sweep_trainable, spec=spec), {"cpu": 0.01})
    storage_path = Path(plan.storage) / "ray" if plan.storage else (out / "_work" / "ray").resolve()
    tuner = tune.Tuner(
        trainable,
        param_space=_tune_space(sweep.space),
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, search_alg=searcher,
                                    scheduler=scheduler, num_samples=n,
                                    max_concurrent_trials=opts.concurrency or plan.concurrency),
        run_config=ray.tune.RunConfig(name=f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                      storage_path=str(storage_path),
                                      failure_config=ray.tune.FailureConfig(max_failures=opts.max_retries),
                                      verbose=1),
    )
    results = tuner.fit()
    records = []
    for res in results:
        m = res.metrics or {}
        trial_id = m.get("trial_id") or Path(res.path).name
        records.append({"trial_id": trial_id, "error": _error_text(res.error),
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
    run_dirs = {}
    runs_root = out / "runs"
    # In the order the trials started: Optuna numbers its trials in the order Tune asked for them,
    # so two trials with the same parameters (a finite space) pair up with their own run folders.
    for d in sorted(runs_root.iterdir() if runs_root.is_dir() else [], key=_first_start):
        cfg_path = d / "config.json"
        if cfg_path.exists():
            run_dirs[d.name] = d
    rows = []
    tune_log = {}
    if (out / "tune_trials.jsonl").exists():
        for line in (out / "tune_trials.jsonl").read_text().splitlines():
            rec = json.loads(line)
            tune_log[rec["trial_id"]] = rec
    used: set[str] = set()
    repeats = 0
    for t in study.trials:
        if t.user_attrs.get(REPEAT_ATTR) is not None:  # a repeated proposal, never trained
            repeats += 1
            continue
        params = {k: v for k, v in t.params.items()}
        trial_dir = _match_run(run_dirs, params, used)
        if trial_dir is not None:
            used.add(trial_dir.name)
        metrics = json.loads((trial_dir / "metrics.json").read_text()) if trial_dir and (trial_dir / "metrics.json").exists() else {}
        n_epochs = 0
        if trial_dir and (trial_dir / "metrics.csv").exists() and (trial_dir / "metrics.csv").stat().st_size:
            n_epochs = len(pd.read_csv(trial_dir / "metrics.csv"))
        tl = tune_log.get(trial_dir.name, {}) if trial_dir else {}
        status = t.state.name.lower()
        if status == "complete":
            status = "finished" if metrics else "stopped_early"
        row = {"number": t.number, "trial_id": trial_dir.name if trial_dir else "", "status": status,
               "error": tl.get("error", ""), "value": t.value, "epochs": n_epochs,
               **{f"param/{k}": v for k, v in params.items()}}
        row.update({k: v for k, v in flatten_metrics(metrics).items() if not k.startswith("classwise")
                    and "/class/" not in k})
        rows.append(row)
    df = _write_rows(rows, out / "trials.csv", ("number", "trial_id", "status", "error", "value", "epochs"))
    best = study.best_trial if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) else None
    if best is not None:
        best_dir = _match_run(run_dirs, best.params)
        best_json = {
            "study": sweep.name, "metric": sweep.metric, "mode": sweep.mode, "value": best.value,
            "trial": best.number, "overrides": dict(sorted(best.params.items())),
            "set_args": [f"--set {k}={v}" for k, v in sorted(best.params.items())],
            "config": json.loads((best_dir / "config.json").read_text()) if best_dir else None,
        }
        (out / "best_config.json").write_text(json.dumps(best_json, indent=2, sort_keys=True) + "\n")
    _sweep_plots(study, out)
    log.info("sweep %s: %d trials in %s (%d repeated proposals skipped)", sweep.name, len(df),
             out / "trials.csv", repeats)
    return out / "trials.csv"


def _first_start(run_dir: Path) -> tuple[float, str]:
    """When a trial's run folder was first started (attempts.jsonl), for ordering; then the name."""
    try:
        first = (run_dir / "attempts.jsonl").read_text().splitlines()[0]
        return float(json.loads(first)["start_unix_s"]), run_dir.name
    except (OSError, IndexError, ValueError, KeyError):
        return float("inf"), run_dir.name


def _match_run(run_dirs: dict[str, Path], params: dict[str, Any], used: set[str] | None = None) -> Path | None:
    """The run folder whose config.json holds these parameter values (dotted keys), skipping the
    folders in `used`; None for a trial without parameters (one a kill interrupted before it ran)."""
    if not params:
        return None

    def dotted(tree: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    for name, d in run_dirs.items():
        if used is not None and name in used:
            continue
        cfg = dotted(json.loads((d / "config.json").read_text()))
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
        fig.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)


# --- Command line shared by studies/*.py -------------------------------------------------------------
DEFAULT_OUT_SENTINEL = Path("results/__default__")


def add_arguments(parser: argparse.ArgumentParser, presets: Sequence[str], default_preset: str,
                  sweep: bool = False) -> None:
    parser.add_argument("--preset", choices=list(presets), default=default_preset,
                        help=f"study size (default {default_preset})")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default results/<study>)")
    parser.add_argument("--data-root", type=Path, help="real data in the DCASE2025 layout (default: the generated dataset)")
    parser.add_argument("--synth-root", type=Path, help="extra synthetic stereo data (dev-train-synth) to add in stage 1")
    parser.add_argument("--cluster", type=Path, help="Ray cluster launcher YAML or SLURM sbatch file to size trials from")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (trials, resources, device-hours) and exit")
    parser.add_argument("--wandb", action="store_true", help="log every trial to W&B (offline unless WANDB_MODE is set)")
    parser.add_argument("--resume", action="store_true", help="continue a killed study without rerunning finished runs")
    parser.add_argument("--report-only", action="store_true", help="regenerate tables and plots from the recorded rows")
    parser.add_argument("--set", action="append", dest="sets", metavar="KEY=VALUE",
                        help="config override for every run, e.g. --set train.stage1.epochs=2")
    parser.add_argument("--cache-dir", type=Path, help="where generated data and stores are cached (default OUT/_work)")
    parser.add_argument("--max-retries", type=int, default=1, help="retries of a failing run before it is recorded as failed")
    parser.add_argument("--time-budget-s", type=float, help="hard bound per run, seconds (train.time_budget_s)")
    parser.add_argument("--readme", type=Path,
                        help="paste the main table into this README's '<!-- STUDY:TABLE:start -->' block")
    parser.add_argument("--concurrency", type=int, help="trials at once (default: from the cluster plan)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    if sweep:
        parser.add_argument("--trials", type=int, help="number of trials (default: the sweep's)")
    else:
        parser.add_argument("--seeds", type=lambda s: tuple(int(x) for x in s.split(",")),
                            help="comma-separated seeds (default: the preset's)")


def options_from_args(args: argparse.Namespace, name: str) -> Options:
    return Options(
        out=Path(args.out) if args.out else (DEFAULT_OUT_SENTINEL if args.cluster else Path("results") / name),
        preset=args.preset, data_root=args.data_root, synth_root=args.synth_root, cluster=args.cluster,
        dry_run=args.dry_run, wandb=args.wandb, resume=args.resume, report_only=args.report_only,
        seeds=getattr(args, "seeds", None), sets=parse_set_args(args.sets), cache_dir=args.cache_dir,
        max_retries=args.max_retries, trials=getattr(args, "trials", None),
        concurrency=args.concurrency, time_budget_s=args.time_budget_s, readme=args.readme,
    )


def main(declarations: dict[str, Study | Sweep], argv: Sequence[str] | None, *, description: str,
         example: str, default_preset: str = "local") -> int:
    """Entry point of a study script: parse, run, print the plan or where the results are."""
    parser = argparse.ArgumentParser(description=description, epilog=example,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    is_sweep = isinstance(next(iter(declarations.values())), Sweep)
    add_arguments(parser, list(declarations), default_preset, sweep=is_sweep)
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    decl = declarations[args.preset]
    if args.out is None and args.cluster is None:
        args.out = Path("results") / decl.name
    opts = options_from_args(args, decl.name)
    if opts.out == DEFAULT_OUT_SENTINEL and not plan_storage_named(opts.cluster):
        opts.out = Path("results") / decl.name
    try:
        result = run_sweep(decl, opts) if isinstance(decl, Sweep) else run_study(decl, opts)
    except (UserError, ConfigError) as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        return 2
    if opts.dry_run:
        print(result)
    else:
        print(f"results in {Path(result).parent}")
    return 0


def plan_storage_named(cluster: Path | None) -> bool:
    """Whether a cluster file names shared storage (SELD_STORAGE) for the results."""
    if cluster is None or not Path(cluster).is_file():
        return False
    return _parse_storage(Path(cluster).read_text().splitlines()) is not None or bool(os.environ.get("SELD_STORAGE"))


__all__ = [
    "ClusterPlan", "NodeType", "Options", "Param", "Study", "Sweep", "Variant", "add_arguments",
    "estimate_run_hours", "flatten_metrics", "format_plan", "load_launcher_file", "main",
    "plan_cluster", "prepare_data", "run_study", "run_sweep", "score_breakdowns",
]
