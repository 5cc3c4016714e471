"""Ray Data over the Parquet feature store: which rows each stage reads, and torch batches.

Reads the store's shards (`store/features-<hash>/shard-*.parquet`, one row per 5-s clip with
log-mel features (2, 251, 64) at 20 ms and the clip's raw events at 100 ms) and yields, on each Ray
Train worker, feature batches (B, 2, 251, 64) float32 and targets encoded from the raw events
((B, 50, 13, 4) ACCDOA or (B, 50, 6, 13, 4) multi-ACCDOA). Row selection (train / validation rooms /
test) is planned on the driver from a small index of the store (no features read), so it is
testable without Ray; only the reading and the sharding use Ray Data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from seld import labels
from seld.config import N_FEATURE_FRAMES, N_LABEL_FRAMES, DataConfig, ExperimentConfig
from seld.errors import DataError

log = logging.getLogger(__name__)

# Columns a training worker needs (the store also has `fold`, which nothing here reads).
INDEX_COLUMNS = ("clip", "split", "domain", "role", "site", "room")
EVENT_COLUMNS = ("ev_frame", "ev_class", "ev_source", "ev_azimuth", "ev_distance")
ROW_COLUMNS = ("clip", "split", "domain", "features", *EVENT_COLUMNS)
# Datasets of one training run (each worker scores its slice of the whole validation set, and rank 0
# scores the test sets at the end).
DATASET_NAMES = ("stage1", "stage2", "val", "test", "synth_test")


# --- The store on disk ---------------------------------------------------------------------------
def shard_paths(store: str | Path, features_cfg=None) -> list[Path]:
    """Sorted Parquet shard files of a store (checked against `features_cfg` when given)."""
    from seld.store import open_store

    paths = sorted(Path(p) for p in open_store(store, features_cfg).shards)
    if not paths:
        raise DataError(f"{store}: the store has no shards; run `seld features DATA --out STORE`")
    return paths


def read_index(store: str | Path, features_cfg=None):
    """A pandas frame of the store's rows without features: clip, split, domain, role, site, room."""
    import pandas as pd

    frames = [pq.read_table(p, columns=list(INDEX_COLUMNS)).to_pandas()
              for p in shard_paths(store, features_cfg)]
    return pd.concat(frames, ignore_index=True)


# --- Row selection (pure; from the index) ---------------------------------------------------------
def validation_rooms(index, data_cfg: DataConfig) -> dict[str, tuple[int, ...]]:
    """Rooms of the real train folders held out for validation, per site.

    `data_cfg.val_rooms` names rooms explicitly (a room id applies to every real site that has it);
    empty means the last (highest-numbered) room of each real site.
    """
    real = index[(index["role"] == "train") & (index["domain"] == "real")]
    out: dict[str, tuple[int, ...]] = {}
    for site, rows in real.groupby("site"):
        rooms = sorted(int(r) for r in rows["room"].unique())
        if data_cfg.val_rooms:
            chosen = tuple(r for r in rooms if r in data_cfg.val_rooms)
        else:
            chosen = (rooms[-1],) if len(rooms) > 1 else ()
            if len(rooms) == 1:
                log.warning("site %s has one real train room (%d): kept for training, no validation "
                            "room from it", site, rooms[0])
        if chosen:
            out[str(site)] = chosen
    if data_cfg.val_rooms:
        known = {int(r) for r in real["room"].unique()}
        missing = [r for r in data_cfg.val_rooms if r not in known]
        if missing:
            raise DataError(f"data.val_rooms: rooms {missing} are not in the real train folders "
                            f"(rooms there: {sorted(known)})")
    return out


def plan_rows(index, cfg: ExperimentConfig) -> dict[str, list[str]]:
    """Clip ids of each dataset of a run (sorted), per the split table of DESIGN.md.

    Returns a dict over DATASET_NAMES: "stage1" (train rows of cfg.data.stage1_domains minus the
    validation rooms), "stage2" (real train rows minus validation rooms), "val" (validation rooms;
    with protocol "paper" the real test rows), "test" (real test rows), "synth_test" (synthetic test
    rows, possibly empty). An empty training or validation selection is a DataError.
    """
    val_rooms = validation_rooms(index, cfg.data) if cfg.data.protocol == "dcase" else {}
    is_val_room = np.zeros(len(index), dtype=bool)
    for site, rooms in val_rooms.items():
        is_val_room |= (index["site"] == site).to_numpy() & index["room"].isin(rooms).to_numpy()
    train = (index["role"] == "train").to_numpy()
    real = (index["domain"] == "real").to_numpy()
    test = (index["role"] == "test").to_numpy()
    in_stage1 = index["domain"].isin(cfg.data.stage1_domains).to_numpy()
    real_train = train & real & ~is_val_room
    sel = {
        "stage1": train & in_stage1 & ~is_val_room,
        "stage2": real_train,
        "val": (train & real & is_val_room) if cfg.data.protocol == "dcase" else (test & real),
        "test": test & real,
        "synth_test": test & ~real,
    }
    clips = index["clip"].to_numpy()
    out = {name: sorted(str(c) for c in clips[mask]) for name, mask in sel.items()}
    needed = {"stage1": 1 in cfg.train.stage_numbers, "stage2": 2 in cfg.train.stage_numbers,
              "val": True, "test": True}
    for name, need in needed.items():
        if need and not out[name]:
            raise DataError(f"the store has no rows for the {name!r} set (rooms held out for "
                            f"validation: {val_rooms or 'none'}; protocol {cfg.data.protocol})")
    log.info("rows: %s; validation rooms %s", {k: len(v) for k, v in out.items()}, val_rooms)
    return out


# --- Ray Data ---------------------------------------------------------------------------------------
def build_datasets(store: str | Path, rows: dict[str, list[str]], materialize: bool = True,
                   features_cfg=None):
    """Ray Datasets of the planned rows, with only the columns a worker needs.

    With `materialize` (small stores) one dataset "rows" holds the union of all planned rows, read
    once here with pyarrow and put in Ray's object store (`ray.data.from_arrow`); each worker
    pulls it once per trial and selects its sets in memory. (A `read_parquet` pass costs its
    read tasks' start-up, 3-35 s on a loaded 2-core machine, against 2-3 s for this.)
    Otherwise one lazy `read_parquet` dataset per non-empty entry of `rows`, streamed every
    epoch (the training ones split across workers by Ray Train), so no process holds a whole
    training split.

    Returns {name: ray.data.Dataset}.
    """
    import ray.data
    from ray.data.expressions import col

    ray.data.DataContext.get_current().enable_progress_bars = False
    paths = shard_paths(store, features_cfg)
    if materialize:
        import pyarrow as pa
        import pyarrow.compute as pc

        wanted = pa.array(sorted({c for clips in rows.values() for c in clips}))
        tables = []
        for p in paths:
            t = pq.read_table(p, columns=list(ROW_COLUMNS))
            tables.append(t.filter(pc.is_in(t["clip"], value_set=wanted)))
        return {"rows": ray.data.from_arrow(pa.concat_tables(tables))}
    out = {}
    for name, clips in rows.items():
        if clips:
            ds = ray.data.read_parquet([str(p) for p in paths])
            out[name] = ds.filter(expr=col("clip").is_in(list(clips))).select_columns(list(ROW_COLUMNS))
    return out


def select(batch: ClipBatch, clips: list[str]) -> ClipBatch:
    """Rows of `batch` (sorted by clip) whose clip id is in `clips`, in clip order."""
    pos = np.searchsorted(batch.clips, np.asarray(sorted(clips), dtype=batch.clips.dtype))
    if len(clips) and (pos.max() >= len(batch) or not np.array_equal(batch.clips[pos], sorted(clips))):
        raise DataError("planned clips are missing from the rows read (store changed during the run?)")
    return batch.take(pos)


# --- Rows to arrays (on the worker) ------------------------------------------------------------------
@dataclass
class ClipBatch:
    """Rows of the store as arrays.

    clips: clip ids (n,); splits, domains: (n,) str; features: (n, 2, 251, n_mels) in the store's
    dtype (float16 by default); events: list of n EVENT_DTYPE arrays (azimuth deg, distance cm).
    """

    clips: np.ndarray
    splits: np.ndarray
    domains: np.ndarray
    features: np.ndarray
    events: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.clips)

    def take(self, idx) -> ClipBatch:
        idx = np.asarray(idx, dtype=np.int64)
        return ClipBatch(self.clips[idx], self.splits[idx], self.domains[idx], self.features[idx],
                         [self.events[i] for i in idx])


def _column(values) -> np.ndarray:
    """A numpy batch column of lists arrives as an object array of arrays; stack when fixed-size."""
    arr = np.asarray(values)
    if arr.dtype == object:
        arr = np.stack([np.asarray(v) for v in arr]) if len(arr) else np.zeros((0, 0))
    return arr


def events_of_row(frame, cls, source, azimuth, distance) -> np.ndarray:
    """EVENT_DTYPE array of one row's raw event columns (onscreen = 0)."""
    ev = np.zeros(len(frame), dtype=labels.EVENT_DTYPE)
    ev["frame"], ev["class"], ev["source"] = frame, cls, source
    ev["azimuth"], ev["distance"] = azimuth, distance
    return ev


def to_clip_batch(batch: dict) -> ClipBatch:
    """A numpy batch from Ray Data (or a pyarrow table's columns) -> ClipBatch."""
    feats = _column(batch["features"])
    n = len(batch["clip"])
    feats = feats.reshape(n, 2, N_FEATURE_FRAMES, -1)
    events = [events_of_row(*(np.asarray(batch[c][i]) for c in EVENT_COLUMNS)) for i in range(n)]
    return ClipBatch(np.asarray(batch["clip"]).astype(str), np.asarray(batch["split"]).astype(str),
                     np.asarray(batch["domain"]).astype(str), feats, events)


def concat(parts: list[ClipBatch]) -> ClipBatch:
    """Concatenate ClipBatches and sort rows by clip id, so the order never depends on Ray Data."""
    if not parts:
        raise DataError("a dataset shard is empty: fewer rows than training workers?")
    clips = np.concatenate([p.clips for p in parts])
    order = np.argsort(clips, kind="stable")
    joined = ClipBatch(clips, np.concatenate([p.splits for p in parts]),
                       np.concatenate([p.domains for p in parts]),
                       np.concatenate([p.features for p in parts]),
                       [e for p in parts for e in p.events])
    return joined.take(order)


def materialize(iterator, batch_size: int = 256) -> ClipBatch:
    """Read a whole dataset shard (a Ray DataIterator) into memory once, sorted by clip id."""
    return concat([to_clip_batch(b) for b in iterator.iter_batches(batch_size=batch_size,
                                                                     batch_format="numpy")])


def stream(iterator, batch_size: int) -> Iterator[ClipBatch]:
    """Stream a dataset shard in batches of `batch_size` rows (order as Ray Data delivers it)."""
    for b in iterator.iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield to_clip_batch(b)


def encode_targets(events: list[np.ndarray], output_format: str) -> np.ndarray:
    """Stacked training targets: (n, 50, 13, 4) ACCDOA or (n, 50, 6, 13, 4) multi-ACCDOA."""
    enc = labels.encode_accdoa if output_format == "accdoa" else labels.encode_multi_accdoa
    return np.stack([enc(ev, N_LABEL_FRAMES)[0] for ev in events])


# --- Normalisation ---------------------------------------------------------------------------------------
def feature_sums(features: np.ndarray) -> np.ndarray:
    """Per channel-mel count, sum and sum of squares (float64 (3, 2, n_mels)) of (n, 2, T, n_mels)."""
    x = np.asarray(features, dtype=np.float64)
    n = np.full(x.shape[1::2], x.shape[0] * x.shape[2], dtype=np.float64)
    return np.stack([n, x.sum(axis=(0, 2)), (x * x).sum(axis=(0, 2))])


def norm_from_sums(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (float32 (2, 1, n_mels) each, broadcastable over (B, 2, T, n_mels))."""
    n, s, ss = sums
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 1e-12))
    return mean[:, None, :].astype(np.float32), np.maximum(std, 1e-3)[:, None, :].astype(np.float32)
