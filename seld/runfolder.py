"""The run folder: its file names, model files, thresholds and config JSON; and the one atomic writer
(a hidden temporary file in the same folder, then a rename) that every module writing a file uses.
Plain files only: torch is imported only to save and read model files."""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from seld.config import CLASS_NAMES, N_CLASSES, ConfigError, ExperimentConfig, from_dict, to_dict
from seld.errors import DataError

# --- Names inside a run folder -----------------------------------------------------------------------
CONFIG_JSON = "config.json"  # the run's ExperimentConfig (save_json / load_experiment)
METRICS_JSON = "metrics.json"  # final scores and costs (keys in docs/CONTRACT.md)
METRICS_CSV = "metrics.csv"  # one row per trained epoch
THRESHOLDS = "thresholds.json"  # class-wise thresholds fitted on validation
NORM = "norm.npz"  # feature normalisation: mean, std float32 (2, 1, n_mels)
CHECKPOINT_DIR = "checkpoints"  # model files: stage<k>_best.pt and SELECTED
SELECTED = "selected.pt"  # copy of the checkpoint chosen on validation
PREDICTIONS = "predictions"  # test CSVs at the fitted thresholds
PREDICTIONS_T05 = "predictions_t05"  # test CSVs at the default threshold 0.5
PREDICTIONS_VAL = "predictions_val"  # validation CSVs of the selected checkpoint at the default threshold
TEST_COUNTERS = "test_counters.npz"  # per-test-file metric counters of each scored set (seld/paired.py)
ATTEMPTS = "attempts.jsonl"  # one line per start of the run by a study
WANDB_DIR = "wandb"  # W&B's offline log (wandb.init(dir=run folder) makes it)
RAY_SUBDIR = "ray"  # Ray Train storage (per-epoch resume states)
SHARES_DIR = "data"  # worker-<rank>.json: the clips each Train worker trained on, held or streamed
CHECKPOINTED = "checkpointed.json"  # {"epoch", "stage"} of the last checkpoint Ray Train registered
# What a run folder's mirror (seld.storage, an object-store --storage) leaves alone: Ray's resume
# states go to the store directly (Ray Train's storage_path), and a resumed run starts a new W&B
# run (its offline logs are pushed once, by the trial, at the end).
MIRROR_SKIP = (f"{RAY_SUBDIR}/*", f"{WANDB_DIR}/*")
# Key of a run's last report to Ray (after its epochs; carries metrics.json's figures). Not "done",
# which Tune reads as "end this trial now".
RUN_FINISHED = "run_finished"
# Every report of a run (each epoch's, the final one) carries this "best so far": the validation F20
# (%, as written) of the checkpoint the run would deliver if it ended now, i.e. the best epoch of the
# stage being trained; the final report's equals metrics.json's val/f20. Sweeps optimise it.
BEST_F20 = "val/best_f20"


def stage_checkpoint(stage: int) -> str:
    """File name of a stage's best model file in CHECKPOINT_DIR.

    Args:
        stage: the training stage (1 or 2).
    Returns:
        e.g. `stage1_best.pt`.
    """
    return f"stage{stage}_best.pt"


# --- The atomic writer ----------------------------------------------------------------------------------
def temp_path(path: str | Path) -> Path:
    """The temporary name :func:`atomic_write` uses for `path` in this process and thread.

    Args:
        path: the final file.
    Returns:
        `.<name>.tmp-<pid>-<thread id>` in the same folder: hidden, so globbing readers (`*.csv`,
        `*.wav`, `shard-*.parquet`) never see it, and per thread of each process, so concurrent
        writers of one file never share a temporary file.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_native_id()}")


def temp_glob(name_glob: str = "*") -> str:
    """A glob matching the temporary files of any process for final names matching `name_glob`.

    Args:
        name_glob: glob of the final file names, e.g. `shard-*.parquet`.
    Returns:
        The glob of their temporary names, e.g. `.shard-*.parquet.tmp-*` (stale after a crash).
    """
    return f".{name_glob}.tmp-*"


@contextmanager
def atomic_write(path: str | Path, *, temp: str | Path | None = None) -> Iterator[Path]:
    """Write a file under a temporary name, then rename it over `path`: `path` is never half written.

    ``with atomic_write(path) as tmp: write_to(tmp)``. The parent folder is created; the rename
    happens when the block ends without an error. If the block (or the rename) fails, the temporary
    file is removed, `path` keeps its old content (or stays absent) and the error propagates.

    Args:
        path: the final file.
        temp: the temporary name (default :func:`temp_path`); it must be in the same folder, where
            a rename is atomic.
    Returns:
        A context manager yielding the temporary path to write.
    """
    path = Path(path)
    tmp = temp_path(path) if temp is None else Path(temp)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # also a link left in its place (it is not followed)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (:func:`atomic_write`).

    Args:
        path: the final file.
        text: its whole content.
    """
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any, *, sort_keys: bool = True) -> None:
    """Write `obj` as indented JSON with a final newline, atomically (:func:`atomic_write`).

    Args:
        path: the final file.
        obj: JSON-ready value.
        sort_keys: sort object keys (the default for every run-folder and store record).
    """
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


# --- Config JSON --------------------------------------------------------------------------------------------
def save_json(cfg: Any, path: str | Path) -> None:
    """Save a config dataclass as sorted, indented JSON (atomically).

    Args:
        cfg: a config dataclass (an ExperimentConfig for a run's `config.json`).
        path: the JSON file.
    """
    write_json_atomic(path, to_dict(cfg))


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read an ExperimentConfig saved by :func:`save_json`.

    Args:
        path: the JSON file (a run's `config.json`).
    Returns:
        The config; ConfigError naming the file when it is unreadable, naming the key when it is invalid.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config JSON ({e})") from None
    return from_dict(ExperimentConfig, data)


# --- Model files ----------------------------------------------------------------------------------------
def save_model_file(path: str | Path, model_state: dict, cfg_json: str, mean, std, meta: dict) -> None:
    """Write a model file (weights, config JSON, normalisation, meta) atomically.

    Args:
        path: the model file, e.g. `RUN/checkpoints/stage1_best.pt`.
        model_state: the model's state dict.
        cfg_json: the ExperimentConfig as JSON text.
        mean, std: float32 (2, 1, n_mels) feature normalisation, or None.
        meta: small JSON-ready facts (epoch, stage, scores).
    Raises:
        DataError naming the file when it cannot be written (e.g. a full disk); the previous file
        is kept, and no temporary file is left.
    """
    import torch

    path = Path(path)
    try:
        # A fixed temporary name, not per process: only rank 0 writes model files, and a test can
        # put a link to /dev/full there to fill the disk of a Ray worker whose pid it cannot know.
        with atomic_write(path, temp=path.with_name(path.name + ".tmp")) as tmp:
            torch.save({"model": model_state, "config": cfg_json,
                        "norm_mean": None if mean is None else torch.as_tensor(mean),
                        "norm_std": None if std is None else torch.as_tensor(std), "meta": meta}, tmp)
    except (OSError, RuntimeError) as e:  # torch reports a failed write (e.g. a full disk) as RuntimeError
        kept = "the previous file is kept" if path.exists() else "nothing was written"
        raise DataError(f"{path}: cannot write the checkpoint (disk full or not writable?; {kept}): "
                        f"{str(e).strip().splitlines()[0]}") from None


def read_model_file(path: str | Path) -> dict:
    """Read a model file written by :func:`save_model_file` (on the CPU).

    Args:
        path: the model file.
    Returns:
        {"model": state dict, "config": JSON text, "norm_mean", "norm_std": tensors or None, "meta": dict};
        DataError naming the file when it is missing, unreadable or not a seld model file.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise DataError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or "model" not in blob or "config" not in blob:
        raise DataError(f"{path}: not a seld checkpoint (expected keys model, config)")
    return blob


# --- Thresholds -----------------------------------------------------------------------------------------
def save_thresholds(path: str | Path, thresholds: Sequence[float]) -> None:
    """Write `thresholds.json`: {"thresholds": [13 floats], "classes": [13 names]} (atomic).

    Args:
        path: the JSON file.
        thresholds: one activity threshold per class, (13,).
    """
    thr = np.asarray(thresholds, dtype=np.float64)
    if thr.shape != (N_CLASSES,):
        raise ValueError(f"need {N_CLASSES} thresholds, got shape {thr.shape}")
    write_json_atomic(path, {"thresholds": thr.tolist(), "classes": list(CLASS_NAMES)}, sort_keys=False)


def load_thresholds(path: str | Path) -> np.ndarray:
    """Read `thresholds.json`.

    Args:
        path: the JSON file.
    Returns:
        float64 (13,) in [0, 1]; DataError naming the file when it is missing or malformed.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: thresholds file not found") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable JSON thresholds file ({e})") from None
    values = data.get("thresholds") if isinstance(data, dict) else None
    if (not isinstance(values, list) or len(values) != N_CLASSES
            or not all(isinstance(v, int | float) and math.isfinite(v) and 0 <= v <= 1 for v in values)):
        raise DataError(f"{path}: expected {{\"thresholds\": [{N_CLASSES} numbers in [0, 1]]}}")
    return np.asarray(values, dtype=np.float64)
