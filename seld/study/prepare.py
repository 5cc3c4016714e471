"""A study's data: reads the user's DCASE2025 root (plus an optional synthetic root) or generates the
dataset; writes the feature store; both cached by hash under the cache folder (default OUT/_work).
With an object-store storage (``s3://`` / ``gs://``) and no --cache-dir, the feature store is written
to the bucket (``<storage>/cache/store-<hash>``), where every node reads it: no shared filesystem.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from seld.config import ExperimentConfig
from seld.errors import UserError
from seld.storage import is_uri, join
from seld.study.options import Options

# Clip counts of the real DCASE2025 stereo development set (spec §1) when no store is at hand.
DCASE2025_DEV_CLIPS = {"train": 20_000, "test": 10_000}


@dataclass(frozen=True)
class DataPlan:
    store: Path | str  # the store folder, or its URI in the storage's bucket
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


def prepare_data(cfg: ExperimentConfig, opts: Options, work: Path, storage: str | None = None) -> DataPlan:
    """Generate (or reuse) the dataset and build (or reuse) its feature store; both cached by hash.

    Args:
        work: the cache folder when --cache-dir is not given (the study's OUT/_work).
        storage: the study's storage (the cluster plan's ``storage``): a bucket URI puts the store in
            the bucket (``<storage>/cache/store-<data hash>``) unless --cache-dir names a folder;
            the dataset itself is generated (or merged) in the local cache folder, where only this
            driver reads it.
    """
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
    if is_uri(storage) and opts.cache_dir is None:
        store_root = join(storage, "cache", f"store-{data_hash}")
    else:
        store_root = cache / f"store-{data_hash}"
    store = build_store(root, store_root, cfg.features, progress=True)  # a bar, as `seld features` shows
    # Absolute paths: trials run in Ray workers whose working directory is not the driver's.
    return DataPlan(store if is_uri(store) else Path(store).resolve(), Path(root).resolve(), data_hash, dataset)


def train_counts(cfg: ExperimentConfig, opts: Options) -> tuple[int, int]:
    """(real, synthetic) training clips for the dry-run estimate."""
    if opts.data_root:
        root = Path(opts.data_root)
        real = sum(len(list((root / "stereo_dev" / s).glob("*.wav"))) for s in ("dev-train-tau", "dev-train-sony"))
        synth_root = Path(opts.synth_root) if opts.synth_root else root
        synth = len(list((synth_root / "stereo_dev" / "dev-train-synth").glob("*.wav")))
        return real or DCASE2025_DEV_CLIPS["train"], synth
    return cfg.synth.n_real_train, cfg.synth.n_synth_train
