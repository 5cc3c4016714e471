"""A study's options and where its results go: the options the study scripts share, the one rule
for the results folder (a path, or the staging folder of an object-store URI), the driver's mirror of
that folder (pull before, push after) and the refusal to overwrite a finished study. Writes only the
results folder itself (created) and, through the mirror, the object store.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from seld.errors import UserError
from seld.storage import Mirror, is_uri, join, staging_dir
from seld.study.cluster import ClusterPlan, plan_storage_named, storage_path

# --out of a study on a cluster whose file or $SELD_STORAGE names shared storage, until the plan
# turns it into <storage>/results/<study> (see results_dir).
DEFAULT_OUT_SENTINEL = Path("results/__default__")
# With an object-store storage, what the study driver pulls from a study folder before it works (the
# small files the summary, the report and a resume read: no model files, predictions, W&B logs or
# Ray state) and what it pushes back at the end (its own outputs: trials push their run folders).
DRIVER_PULL_SKIP = ("_work/*", "runs/*/checkpoints/*", "runs/*/predictions*", "runs/*/wandb/*",
                    "runs/*/ray/*", "runs/*/data/*")
DRIVER_PUSH_SKIP = ("_work/*", "runs/*", "wandb/*")


@dataclass
class Options:
    """Command-line options shared by the study scripts (see :func:`add_arguments`)."""

    out: Path
    preset: str
    data_root: Path | None = None
    synth_root: Path | None = None
    cluster: Path | None = None
    storage: str | None = None  # shared storage every node mounts (default: the cluster file's)
    dry_run: bool = False
    wandb: bool = False
    resume: bool = False
    report_only: bool = False
    seeds: tuple[int, ...] | None = None
    seeds_auto_max: int | None = None  # --seeds auto[:MAX]: add seeds sequentially up to MAX per row
    budget_device_hours: float | None = None  # --seeds auto adds no seeds beyond this study total
    mde_target: float = 2.0  # F20 difference (pp) whose seeds-to-detect the paired tables report
    sets: dict[str, str] = field(default_factory=dict)
    cache_dir: Path | None = None
    max_retries: int = 1
    trials: int | None = None
    concurrency: int | None = None
    time_budget_s: float | None = None
    readme: Path | None = None  # paste the first table's markdown into the marked block of this README or its docs/
    verbose: bool = False  # debug logging and Tune's own status table (-v)


def results_dir(out: Path | None, name: str, *, cluster: Path | None = None,
                plan: ClusterPlan | None = None, storage: str | None = None) -> Path:
    """Where study ``name`` writes: ``--out`` when given; else ``<storage>/results/<name>`` with
    ``--storage``, or on a cluster whose file or $SELD_STORAGE names shared storage, else
    ``results/<name>``. With an object-store storage (``s3://...``) this is the local staging folder
    of ``<storage>/results/<name>`` (:func:`study_mirror`): ``--out`` when given, else
    :func:`seld.storage.staging_dir`.

    Args:
        out: ``--out`` (None when not given, on the command line), or ``Options.out``.
        cluster: ``--cluster``; with ``out`` None, a cluster that names storage gives
            DEFAULT_OUT_SENTINEL, which ``plan`` (the study's cluster plan) resolves.
        storage: ``--storage`` (checked by :func:`seld.study.cluster.storage_path`).
    """
    if out is None:
        if storage:
            return _storage_results(storage_path(storage), name)
        return DEFAULT_OUT_SENTINEL if plan_storage_named(cluster) else Path.cwd() / "results" / name
    if out == DEFAULT_OUT_SENTINEL and plan is not None and plan.storage:
        return _storage_results(plan.storage, name)
    return Path(out)


def _storage_results(storage: str, name: str) -> Path:
    return staging_dir(join(storage, "results", name)) if is_uri(storage) else Path(storage) / "results" / name


def study_mirror(out: Path, name: str, plan: ClusterPlan) -> Mirror | None:
    """With an object-store storage, the mirror of ``<storage>/results/<name>`` staged in ``out``;
    None for a filesystem storage (or none)."""
    if not is_uri(plan.storage):
        return None
    return Mirror(Path(out).resolve(), join(plan.storage, "results", name))


@contextmanager
def mirrored(mirror: Mirror | None) -> Iterator[None]:
    """Around a study driver's work on its folder: reach the store first (one line naming the URI
    when it cannot be reached or written, before anything runs), pull the study folder's small
    files (DRIVER_PULL_SKIP), and push the driver's outputs when the block ends, also when it fails
    (study.log then says why). Nothing happens without a mirror."""
    if mirror is None:
        yield
        return
    mirror.check()
    mirror.pull(skip=DRIVER_PULL_SKIP)
    try:
        yield
    finally:
        mirror.push(skip=DRIVER_PUSH_SKIP)


def prepare_out(out: Path, opts: Options, marker: str) -> None:
    """Create the results folder; refuse one that already holds a study (``marker``) without --resume."""
    if (out / marker).exists() and not opts.resume:
        raise UserError(f"{out}: already holds a study ({marker}); pass --resume to continue it, "
                        "--report-only to redo its tables, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
