"""Worker data from the Parquet feature store: the rows of each set, each worker's share, batches.

Reads the store's shards (`store/features-<hash>/shard-<split>-NNNNN.parquet`, one row per 5-s clip:
log-mel features (2, 251, 64) at 20 ms in the store's dtype, raw events at 100 ms) and yields, on
each training worker, batches of features (B, 2, 251, 64) in the store's dtype and targets encoded
from the batch's raw events ((B, 50, 13, 4) ACCDOA or (B, 50, 6, 13, 4) multi-ACCDOA).

The driver plans a run once from the store's index columns (no features read): which clips each
set holds (`plan_rows`), and which of them each worker trains on (`plan_shares`: contiguous runs of
each domain's rows in store order, so a worker reads about 1/world of the row groups, and only from
the shards of the splits a stage uses). A worker either holds its share once (`HeldRows`: one
preallocated array for all its stages, "materialised") or streams it from Parquet every epoch
(`TrainSet` with no held rows); either way the next batches are read, gathered and encoded in
background threads while the current batch trains (`ordered_map`). `choose_path` makes the choice from
the bytes a worker would hold and the memory it has. That is the row-group engine; the Ray Data
engine (`data.engine=ray_data`, "The Ray Data engine" below) feeds the same shares through Ray Data
datasets the driver builds, and imports Ray only there. Deterministic given the seed and the worker
count. The plan travels in the Train loop's config; the row-group engine runs without a cluster.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import copy
import itertools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seld import labels
from seld.config import N_LABEL_FRAMES, DataConfig, ExperimentConfig
from seld.errors import DataError
from seld.store import decode_features, feature_encoding, open_shard

log = logging.getLogger(__name__)

# Columns of the driver's index (the store also has `fold`, which nothing here reads).
INDEX_COLUMNS = ("clip", "split", "domain", "role", "site", "room")
EVENT_COLUMNS = ("ev_frame", "ev_class", "ev_source", "ev_azimuth", "ev_distance")
ROW_COLUMNS = ("features", *EVENT_COLUMNS)  # what a worker reads of a row (the index has the rest)
# Sets of one training run (each worker scores its slice of the validation set every epoch; rank 0
# holds all of it to fit the thresholds, and reads the test sets at the end).
DATASET_NAMES = ("stage1", "stage2", "val", "test", "synth_test")
TRAIN_SETS = ("stage1", "stage2")
_EVENT_BYTES = 32  # held bytes per event (frame, class, source int32; azimuth, distance float64; offset)
_SUMS_CHUNK = 256  # rows per float64 chunk of the normalisation sums (bounds its temporary memory)


# --- The store on disk ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreLayout:
    """Where the rows of a store live: its shard files and their Parquet row groups.

    shards: shard paths or URIs (manifest order); group_starts: per shard, the first row of each row group
    and the shard's row count at the end; feature_shape: (2, 251, n_mels); dtype: the store's
    feature dtype ("float16" or "float32").
    """

    shards: tuple[str, ...]
    group_starts: tuple[np.ndarray, ...]
    feature_shape: tuple[int, int, int]
    dtype: str
    filesystem: object = None  # a bucket store's pyarrow filesystem (seld.store.StoreInfo.filesystem)

    @property
    def bytes_per_row(self) -> int:
        """Bytes of one row's features in memory."""
        return int(np.prod(self.feature_shape)) * np.dtype(self.dtype).itemsize


def read_index(store: str | Path, features_cfg=None, layout: StoreLayout | None = None):
    """The store's index: clip, split, domain, role, site, room, and where each row lives (`shard`:
    position in :func:`store_layout`'s shards, `row`: row within the shard). No features are read;
    `layout`: the store's layout when the caller has it (else read and checked here).

    Raises:
        DataError: a shard disagrees with the manifest (row count, feature size), naming the shard.
    """
    import pandas as pd

    layout = layout or store_layout(store, features_cfg)
    frames = []
    for i, p in enumerate(layout.shards):
        frame = open_shard(p, layout.filesystem).read(columns=list(INDEX_COLUMNS)).to_pandas()
        frame["shard"] = np.int32(i)
        frame["row"] = np.arange(len(frame), dtype=np.int64)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def store_layout(store: str | Path, features_cfg=None, filesystem=None) -> StoreLayout:
    """The shards and row groups of a store, from the Parquet footers, checked against the manifest.

    `store`: a folder or an `s3://` / `gs://` URI; `filesystem`: the bucket's pyarrow filesystem to
    read it with (else one from this process's credentials); the layout carries it to the workers.

    Raises:
        DataError: a shard's row count or feature size is not what the manifest says (a damaged or
            hand-edited store), naming the shard and both values.
    """
    from seld.store import open_store

    info = open_store(store, features_cfg, filesystem)
    shape = tuple(int(v) for v in info.manifest["feature_shape"])
    n_features = int(np.prod(shape))
    starts = []
    for entry, path in zip(info.manifest["shards"], info.shards, strict=True):
        try:
            meta = open_shard(path, info.filesystem).metadata
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: unreadable shard ({e}); rebuild the store with `seld features`") from None
        if meta.num_rows != entry["rows"]:
            raise DataError(f"{path}: {meta.num_rows} rows, the manifest says {entry['rows']} "
                            "(store changed or damaged; rebuild it with `seld features`)")
        width = feature_encoding(meta.schema.to_arrow_schema().field("features").type, str(path))[1]
        if width != n_features:
            raise DataError(f"{path}: features of {width} values per row, the manifest says "
                            f"{'x'.join(map(str, shape))} = {n_features}; rebuild it with `seld features`")
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        starts.append(np.cumsum([0, *sizes], dtype=np.int64))
    if not info.shards:
        raise DataError(f"{store}: the store has no shards; run `seld features DATA --out STORE`")
    return StoreLayout(tuple(str(p) for p in info.shards), tuple(starts), shape, info.manifest["feature_dtype"],
                       info.filesystem)


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
    """Clip ids of each set of a run (sorted), per the split table of docs/DESIGN.md.

    Returns a dict over DATASET_NAMES: "stage1" (train rows of cfg.data.stage1_domains minus the
    validation rooms), "stage2" (real train rows minus validation rooms), "val" (validation rooms;
    with protocol "paper" the real test rows), "test" (real test rows), "synth_test" (synthetic test
    rows, possibly empty). A stage the config does not train gets no rows. An empty training or
    validation selection is a DataError.
    """
    val_rooms = validation_rooms(index, cfg.data) if cfg.data.protocol == "dcase" else {}
    is_val_room = np.zeros(len(index), dtype=bool)
    for site, rooms in val_rooms.items():
        is_val_room |= (index["site"] == site).to_numpy() & index["room"].isin(rooms).to_numpy()
    train = (index["role"] == "train").to_numpy()
    real = (index["domain"] == "real").to_numpy()
    test = (index["role"] == "test").to_numpy()
    in_stage1 = index["domain"].isin(cfg.data.stage1_domains).to_numpy()
    stages = cfg.train.stage_numbers
    sel = {
        "stage1": train & in_stage1 & ~is_val_room & (1 in stages),
        "stage2": train & real & ~is_val_room & (2 in stages),
        "val": (train & real & is_val_room) if cfg.data.protocol == "dcase" else (test & real),
        "test": test & real,
        "synth_test": test & ~real,
    }
    clips = index["clip"].to_numpy()
    out = {name: sorted(str(c) for c in clips[mask]) for name, mask in sel.items()}
    needed = {"stage1": 1 in stages, "stage2": 2 in stages, "val": True, "test": True}
    for name, need in needed.items():
        if need and not out[name]:
            raise DataError(f"the store has no rows for the {name!r} set (rooms held out for "
                            f"validation: {val_rooms or 'none'}; protocol {cfg.data.protocol})")
    log.info("rows: %s; validation rooms %s", {k: len(v) for k, v in out.items()}, val_rooms)
    return out


@dataclass(frozen=True)
class RowSet:
    """Rows of the store, sorted by clip id: ids, split and domain, and where each row lives."""

    clips: np.ndarray  # (n,) str
    splits: np.ndarray  # (n,) str
    domains: np.ndarray  # (n,) str
    shard: np.ndarray  # (n,) int32: position in StoreLayout.shards
    row: np.ndarray  # (n,) int64: row within the shard

    def __len__(self) -> int:
        return len(self.clips)

    def take(self, idx) -> RowSet:
        idx = np.asarray(idx, dtype=np.int64)
        return RowSet(self.clips[idx], self.splits[idx], self.domains[idx], self.shard[idx], self.row[idx])


def row_set(index, clips) -> RowSet:
    """The index rows of `clips`, sorted by clip id (every clip must be in the index)."""
    by_clip = index.set_index("clip", drop=False)
    wanted = sorted(str(c) for c in clips)
    missing = sorted(set(wanted) - set(by_clip.index))
    if missing:
        raise DataError(f"{len(missing)} planned clip(s) are not in the store's index, e.g. {missing[:5]} "
                        "(store changed since the run was planned?)")
    sub = by_clip.loc[wanted] if wanted else by_clip.iloc[:0]
    return RowSet(sub["clip"].to_numpy().astype(str), sub["split"].to_numpy().astype(str),
                  sub["domain"].to_numpy().astype(str), sub["shard"].to_numpy().astype(np.int32),
                  sub["row"].to_numpy().astype(np.int64))


def plan_shares(index, rows: dict[str, list[str]], world: int) -> list[dict[str, RowSet]]:
    """Each worker's training rows: {"stage1": RowSet, "stage2": RowSet} per rank.

    The rule: the union of the training sets' rows, per domain in store order (shard, row), cut into
    `world` contiguous runs of equal size (to one row); rank r trains on the r-th run of each domain,
    for every stage. Contiguous runs keep a worker's reads to about 1/world of the row groups; cutting
    each domain separately gives every worker the same domain mix (stage 1's synthetic-per-real
    subsampling works per worker). Shares are disjoint and together complete.

    Raises:
        DataError: a stage leaves a worker no rows (fewer rows than workers).
    """
    union = sorted({c for name in TRAIN_SETS for c in rows.get(name, ())})
    allrows = row_set(index, union)
    order = np.lexsort((allrows.row, allrows.shard))
    owner = np.empty(len(allrows), dtype=np.int64)
    for domain in sorted(set(allrows.domains)):
        in_domain = order[allrows.domains[order] == domain]
        for rank, part in enumerate(np.array_split(in_domain, world)):
            owner[part] = rank
    shares: list[dict[str, RowSet]] = [{} for _ in range(world)]
    for name in TRAIN_SETS:
        if not rows.get(name):
            continue
        pos = np.searchsorted(allrows.clips, np.asarray(sorted(rows[name])))
        for rank in range(world):
            mine = pos[owner[pos] == rank]
            if len(mine) == 0:
                raise DataError(f"the {name!r} set has {len(pos)} rows: too few for {world} training "
                                f"workers (worker {rank} would get none); use fewer workers")
            shares[rank][name] = allrows.take(mine)
    return shares


# --- Reading rows ---------------------------------------------------------------------------------
@dataclass
class EventTable:
    """The raw events of n clips, flat: clip i's events are rows offsets[i]:offsets[i + 1]."""

    offsets: np.ndarray  # (n + 1,) int64
    frame: np.ndarray  # int32, 100-ms label frame
    cls: np.ndarray  # int32
    source: np.ndarray  # int32
    azimuth: np.ndarray  # float64, degrees
    distance: np.ndarray  # float64, cm

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return _EVENT_BYTES * len(self.frame) + 8 * len(self.offsets)

    def take(self, idx) -> EventTable:
        """The events of clips `idx` (in that order), gathered without a loop over clips."""
        idx = np.asarray(idx, dtype=np.int64)
        lengths = self.offsets[idx + 1] - self.offsets[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Row k of the result comes from offsets[idx[c]] + (k - offsets_new[c]) for its clip c.
        clip = np.repeat(np.arange(len(idx)), lengths)
        src = self.offsets[idx][clip] + (np.arange(offsets[-1]) - offsets[:-1][clip])
        return EventTable(offsets, self.frame[src], self.cls[src], self.source[src], self.azimuth[src],
                          self.distance[src])

    def structured(self) -> tuple[np.ndarray, np.ndarray]:
        """(all events as one EVENT_DTYPE array, the clip of each row (int64))."""
        ev = np.zeros(len(self.frame), dtype=labels.EVENT_DTYPE)
        ev["frame"], ev["class"], ev["source"] = self.frame, self.cls, self.source
        ev["azimuth"], ev["distance"] = self.azimuth, self.distance
        return ev, np.repeat(np.arange(len(self)), np.diff(self.offsets))

    def per_clip(self) -> list[np.ndarray]:
        """One EVENT_DTYPE array per clip (onscreen = 0), as the metric and the decoders take them."""
        ev, _ = self.structured()
        return [ev[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True)]

    @classmethod
    def concat(cls, parts: list[EventTable]) -> EventTable:
        lengths = np.concatenate([np.diff(p.offsets) for p in parts]) if parts else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        cat = (lambda f: np.concatenate([getattr(p, f) for p in parts])) if parts else (lambda f: np.zeros(0))
        return EventTable(offsets, cat("frame").astype(np.int32), cat("cls").astype(np.int32),
                          cat("source").astype(np.int32), cat("azimuth").astype(np.float64),
                          cat("distance").astype(np.float64))


def events_of_table(table: pa.Table) -> EventTable:
    """The event list columns of a Parquet table as an EventTable (no per-row loop)."""
    cols = [table[c].combine_chunks() for c in EVENT_COLUMNS]
    first = cols[0]
    offsets = np.asarray(first.offsets, dtype=np.int64)
    for c, name in zip(cols[1:], EVENT_COLUMNS[1:], strict=True):
        if not np.array_equal(np.asarray(c.offsets), offsets):
            raise DataError(f"event column {name} has other list lengths than ev_frame (damaged store)")
    base = offsets[0]
    vals = [np.asarray(c.values.to_numpy(zero_copy_only=False))[base:offsets[-1]] for c in cols]
    return EventTable(offsets - base, vals[0].astype(np.int32), vals[1].astype(np.int32), vals[2].astype(np.int32),
                      vals[3].astype(np.float64), vals[4].astype(np.float64))


def _features_of_table(table: pa.Table, layout: StoreLayout) -> np.ndarray:
    return decode_features(table["features"], layout.feature_shape)  # either encoding, a view of the buffer


def row_groups(layout: StoreLayout, rows: RowSet) -> np.ndarray:
    """The Parquet row group of each row (int64) within its shard, from the layout (no file opened)."""
    out = np.empty(len(rows), dtype=np.int64)
    for s in np.unique(rows.shard):
        m = rows.shard == s
        out[m] = np.searchsorted(layout.group_starts[s], rows.row[m], side="right") - 1
    return out


class StoreReader:
    """Reads rows of a store by row group (pyarrow; safe to share between threads).

    Files are opened per read, not kept open: an open `ParquetFile` holds on to buffers, and a
    worker streaming a paper-sized store touches every shard (kept open, ~2 MiB each, measured:
    0.8 GiB more per worker over one epoch of 245 shards). `files_opened` counts the opens (a
    worker records it: the Ray Data engine's workers construct no reader and open no file).
    """

    def __init__(self, layout: StoreLayout):
        self.layout = layout
        self.files_opened = 0

    def _open(self, shard: int) -> pq.ParquetFile:
        self.files_opened += 1  # a race between reading threads may lose a count; it never reads 0 for >0
        return open_shard(self.layout.shards[shard], self.layout.filesystem)

    def groups_of(self, rows: RowSet) -> np.ndarray:
        """The row group of each row (int64), within its shard."""
        return row_groups(self.layout, rows)

    def read_group(self, shard: int, group: int, rows_in_group: np.ndarray,
                   file: pq.ParquetFile | None = None) -> tuple[np.ndarray, EventTable]:
        """Features (k, 2, 251, n_mels) and events of rows `rows_in_group` (rows of the shard);
        `file`: the shard, already open."""
        file = file or self._open(shard)
        # One thread per read: the reading threads are the parallelism, next to the torch threads.
        table = file.read_row_group(int(group), columns=list(ROW_COLUMNS), use_threads=False)
        local = np.asarray(rows_in_group, dtype=np.int64) - self.layout.group_starts[shard][group]
        if len(local) != table.num_rows or not np.array_equal(local, np.arange(table.num_rows)):
            table = table.take(pa.array(local))
        return _features_of_table(table, self.layout), events_of_table(table)

    def read(self, rows: RowSet, out: np.ndarray | None = None) -> tuple[np.ndarray, EventTable]:
        """All of `rows`, in their order: features (filled into `out` when given) and events.

        Each row group holding wanted rows is read once; nothing else is read.
        """
        feats = out if out is not None else np.empty((len(rows), *self.layout.feature_shape), self.layout.dtype)
        groups = self.groups_of(rows)
        key = rows.shard.astype(np.int64) * (1 << 32) + groups
        order = np.lexsort((rows.row, key))
        bounds = np.flatnonzero(np.r_[True, key[order][1:] != key[order][:-1], True])
        parts, dest = [], []
        file, file_shard = None, -1
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            sel = order[a:b]
            shard = int(rows.shard[sel[0]])
            if shard != file_shard:
                file, file_shard = self._open(shard), shard
            f, ev = self.read_group(shard, int(groups[sel[0]]), rows.row[sel], file)
            feats[sel] = f
            parts.append(ev)
            dest.append(sel)
        if not parts:
            return feats, EventTable.concat([])
        events = EventTable.concat(parts)
        inverse = np.empty(len(rows), dtype=np.int64)
        inverse[np.concatenate(dest)] = np.arange(len(rows))
        return feats, events.take(inverse)


@dataclass
class ClipBatch:
    """Rows of the store as arrays (validation and test sets, and what `seld.evaluate` scores).

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

    def every(self, start: int, step: int) -> ClipBatch:
        """Rows start, start + step, ...: views of this batch's arrays (no copy of the features)."""
        return ClipBatch(self.clips[start::step], self.splits[start::step], self.domains[start::step],
                         self.features[start::step], self.events[start::step])


def read_clips(reader: StoreReader, rows: RowSet) -> ClipBatch:
    """The rows as a ClipBatch (sorted by clip, as `rows` is)."""
    feats, events = reader.read(rows)
    return ClipBatch(rows.clips, rows.splits, rows.domains, feats, events.per_clip())


def encode_targets(events: EventTable | list[np.ndarray], output_format: str) -> np.ndarray:
    """Training targets of n clips, encoded together: (n, 50, 13, 4) ACCDOA or (n, 50, 6, 13, 4)
    multi-ACCDOA (`seld.labels`; the same bits as encoding each clip alone)."""
    if isinstance(events, EventTable):
        flat, clip = events.structured()
        n = len(events)
    else:
        n = len(events)
        flat = np.concatenate([np.asarray(e, dtype=labels.EVENT_DTYPE) for e in events]) if n else \
            labels.empty_events()
        clip = np.repeat(np.arange(n), [len(e) for e in events])
    enc = labels.encode_accdoa_batch if output_format == "accdoa" else labels.encode_multi_accdoa_batch
    return enc(flat, clip, n, N_LABEL_FRAMES)[0]


# --- A worker's training rows ---------------------------------------------------------------------
@dataclass
class HeldRows:
    """A worker's training rows held in memory once, for all its stages: sorted by clip id."""

    rows: RowSet
    features: np.ndarray  # (n, 2, 251, n_mels), the store's dtype: one preallocated array
    events: EventTable

    @classmethod
    def read(cls, reader: StoreReader, shares: dict[str, RowSet]) -> HeldRows:
        """The union of a worker's stage shares, read once into one array."""
        parts = list(shares.values())
        cat = {f: np.concatenate([getattr(p, f) for p in parts]) for f in ("clips", "splits", "domains", "shard", "row")}
        _, first = np.unique(cat["clips"], return_index=True)  # each clip once, sorted by clip id
        rows = RowSet(*(cat[f][first] for f in ("clips", "splits", "domains", "shard", "row")))
        feats, events = reader.read(rows)
        return cls(rows, feats, events)

    @property
    def nbytes(self) -> int:
        return self.features.nbytes + self.events.nbytes

    def positions(self, rows: RowSet) -> np.ndarray:
        """Positions of `rows` (all held) in the held arrays."""
        return np.searchsorted(self.rows.clips, rows.clips)


class StageRows:
    """One worker's training rows of a stage and what every engine draws from them the same way:
    each epoch's rows (all, or stage 1's synthetic-per-real subsample, seeded by seed, rank and
    epoch), the rows of the normalisation, and the record of the order trained (`data.record_order`).

    An engine (:class:`TrainSet`, :class:`RayTrainSet`) adds `batches(epoch, n_batches)` and `sums()`;
    the training loop sees only `rows`, `n_batches`, `batches` and `sums`.
    """

    def __init__(self, name: str, cfg: ExperimentConfig, rank: int, rows: RowSet, layout: StoreLayout,
                 order_log: Path | None = None):
        self.name, self.cfg, self.rank, self.rows = name, cfg, rank, rows
        self._groups = row_groups(layout, rows)
        self.order_log = order_log

    def _epoch_index(self, epoch: int) -> np.ndarray:
        """Row order of one epoch (seeded by seed, rank, epoch); stage 1 may subsample synthetic."""
        rng = np.random.default_rng([self.cfg.seed, self.rank, epoch, 17])
        idx = np.arange(len(self.rows))
        ratio = self.cfg.data.stage1_synth_per_real
        if self.name == "stage1" and ratio is not None:
            synth = idx[self.rows.domains == "synthetic"]
            real = idx[self.rows.domains != "synthetic"]
            n_synth = min(len(synth), int(round(ratio * len(real))))
            idx = np.concatenate([real, rng.choice(synth, n_synth, replace=False)])
        return rng.permutation(idx)

    def n_batches(self, epoch: int) -> int:
        """Batches of this worker's epoch."""
        return math.ceil(len(self._epoch_index(epoch)) / self.cfg.train.batch_size)

    def _norm_index(self) -> np.ndarray:
        """Positions (sorted) of the rows the normalisation uses: all of them, or whole row groups
        drawn (seeded) until `data.norm_max_rows` rows when there are more."""
        idx = np.arange(len(self.rows))
        limit = self.cfg.data.norm_max_rows
        if limit is None or len(idx) <= limit:
            return idx
        rng = np.random.default_rng([self.cfg.seed, self.rank, 23])
        key = self.rows.shard.astype(np.int64) * (1 << 32) + self._groups
        picked, n = [], 0
        for u in rng.permutation(np.unique(key)):
            rows_u = idx[key == u]
            picked.append(rows_u)
            n += len(rows_u)
            if n >= limit:
                break
        return np.sort(np.concatenate(picked))

    def _record(self, epoch: int, clips: list[np.ndarray]) -> None:
        """Append one epoch's training order to `order_log` (a restored epoch appends it again)."""
        if self.order_log is not None:
            with open(self.order_log, "a") as f:
                f.write(f"{self.name} {epoch} {' '.join(str(c) for part in clips for c in part)}\n")


class TrainSet(StageRows):
    """The row-group engine: one worker's rows of a stage, held (`held`) or streamed from the store
    each epoch by this worker's own reader.

    A held set batches an epoch's rows in a seeded random order; a streamed one reads them by row
    group in a seeded order of row groups, mixing `data.shuffle_groups` groups at a time.
    """

    def __init__(self, name: str, cfg: ExperimentConfig, rank: int, rows: RowSet, reader: StoreReader,
                 held: HeldRows | None = None, order_log: Path | None = None):
        super().__init__(name, cfg, rank, rows, reader.layout, order_log)
        self.reader, self.held = reader, held
        self._pos = held.positions(rows) if held is not None else None

    def sums(self) -> np.ndarray:
        """Per channel-mel sums (:func:`feature_sums`) of the normalisation's rows (`_norm_index`)."""
        idx = self._norm_index()
        if self.held is not None:
            pos = self._pos[idx]
            return _chunked_sums(lambda a, b: self.held.features[pos[a:b]], len(pos))
        total = None
        step = 4 * _SUMS_CHUNK  # rows per read; a multiple of the chunk, so both paths sum the same chunks
        for i in range(0, len(idx), step):
            feats, _ = self.reader.read(self.rows.take(idx[i:i + step]))
            s = _chunked_sums(lambda a, b, f=feats: f[a:b], len(feats))
            total = s if total is None else total + s
        return total

    def _held_batch(self, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = self._pos[sel]
        return (self.held.features[pos], encode_targets(self.held.events.take(pos), self.cfg.model.output_format),
                self.rows.clips[sel])

    def _chunks(self, idx: np.ndarray, epoch: int) -> list[tuple[int, np.ndarray]]:
        """A streamed epoch's rows in read order, cut into chunks of whole batches.

        The row groups holding the epoch's rows come in a seeded random order (rows in store order
        within a group); consecutive runs of about `data.shuffle_groups` groups' rows, rounded to
        whole batches, are the chunks, each read and shuffled on its own (so chunks can be made in
        parallel, and only the last batch of the epoch may be short).
        """
        rng = np.random.default_rng([self.cfg.seed, self.rank, epoch, 29])
        key = self.rows.shard[idx].astype(np.int64) * (1 << 32) + self._groups[idx]
        by_key = np.argsort(key, kind="stable")
        bounds = np.flatnonzero(np.r_[True, key[by_key][1:] != key[by_key][:-1], True])
        units = [np.sort(idx[by_key[a:b]]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        order = np.concatenate([units[i] for i in rng.permutation(len(units))]) if units else idx[:0]
        bs = self.cfg.train.batch_size
        size = max(bs, (self.cfg.data.shuffle_groups * int(np.median([len(u) for u in units] or [1]))) // bs * bs)
        return [(k, order[a:a + size]) for k, a in enumerate(range(0, len(order), size))]

    def _streamed_chunk(self, epoch: int, chunk: tuple[int, np.ndarray]) -> list[tuple[np.ndarray, ...]]:
        """Read one chunk's rows (by row group), shuffle them (seeded by the chunk), cut into batches."""
        k, rows = chunk
        feats, events = self.reader.read(self.rows.take(rows))
        perm = np.random.default_rng([self.cfg.seed, self.rank, epoch, 31, k]).permutation(len(rows))
        bs, fmt = self.cfg.train.batch_size, self.cfg.model.output_format
        out = []
        for a in range(0, len(perm), bs):
            sel = np.sort(perm[a:a + bs])
            out.append((feats[sel], encode_targets(events.take(sel), fmt), self.rows.clips[rows[sel]]))
        return out

    def read_threads(self) -> int:
        """Threads that read and encode batches: `data.read_threads`, or (0) one beside the training
        threads on a CPU worker and all of a GPU worker's CPUs but one."""
        if self.cfg.data.read_threads > 0:
            return self.cfg.data.read_threads
        return max(1, int(self.cfg.train.cpus_per_worker) - 1) if self.cfg.train.use_gpu else 1

    def batches(self, epoch: int, n_batches: int):
        """Yield `n_batches` (features store-dtype (B, 2, T, M), targets float32) of one epoch, made by
        :meth:`read_threads` background threads, `data.prefetch_batches` ahead of the consumer (in
        the same order, whatever the thread count)."""
        clips: list[np.ndarray] = []
        for feats, targets, ids in self._batches(epoch, n_batches):
            clips.append(ids)
            yield feats, targets
        self._record(epoch, clips)

    def _batches(self, epoch: int, n_batches: int):
        idx = self._epoch_index(epoch)
        threads, depth = self.read_threads(), self.cfg.data.prefetch_batches
        bs = self.cfg.train.batch_size
        if self.held is not None:
            sels = [np.sort(idx[i * bs:(i + 1) * bs]) for i in range(n_batches)]
            yield from ordered_map(self._held_batch, sels, threads, depth)
            return
        chunks = self._chunks(idx, epoch)
        per_chunk = max(1, len(chunks[0][1]) // bs) if chunks else 1
        made = 0
        for batches in ordered_map(lambda c: self._streamed_chunk(epoch, c), chunks, threads,
                                   max(threads, math.ceil(depth / per_chunk))):
            for b in batches:
                if made >= n_batches:
                    return
                yield b
                made += 1


def ordered_map(fn: Callable, items: list, threads: int, depth: int) -> Iterator:
    """`fn(item)` for each item, in order, computed by `threads` background threads while the
    consumer works, at most `depth` items ahead (at least one per thread).

    An exception in `fn` is raised in the consumer, at its item. A consumer that stops early cancels
    the items not started; those in flight finish in their threads and are dropped. threads 0 or
    depth 0: computed in the consumer's thread, one at a time.
    """
    if threads <= 0 or depth <= 0:
        yield from map(fn, items)
        return
    pool = cf.ThreadPoolExecutor(threads, thread_name_prefix="seld-data")
    pending: collections.deque = collections.deque()
    todo = iter(items)
    try:
        for item in itertools.islice(todo, max(depth, threads)):
            pending.append(pool.submit(fn, item))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(todo, 1):
                pending.append(pool.submit(fn, item))
            yield result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class RunPlan:
    """The driver's data plan of a run (:func:`plan_run`). It travels to the Train workers inside the
    loop config, pickled by Ray: plain fields only."""

    layout: StoreLayout
    rows: dict[str, list[str]]  # clip ids per set (plan_rows)
    shares: list[dict[str, RowSet]]  # per rank {"stage<k>": RowSet} (plan_shares)
    sets: dict[str, RowSet]  # "val" | "test" | "synth_test"
    held_bytes: int  # what the largest share would hold
    # Hold each share (True) or stream it (False): the driver decides (seld.train.choose_data_path,
    # :func:`choose_path`) before handing the plan to the workers; None: not decided yet.
    materialize: bool | None = None


def plan_run(cfg: ExperimentConfig, store: str | Path, filesystem=None) -> RunPlan:
    """The driver's data plan of a run, from the store's index columns only (no features read),
    "materialize" undecided. Raises DataError naming the store when a set the config needs is empty.
    """
    layout = store_layout(store, cfg.features, filesystem)  # a bucket store: the layout carries `filesystem`
    index = read_index(store, cfg.features, layout)  # the footers are read once
    try:
        rows = plan_rows(index, cfg)
    except DataError as e:
        raise DataError(f"{store}: {e}; the store holds the splits {sorted(index['split'].unique())}") from None
    shares = plan_shares(index, rows, cfg.train.num_workers)
    sets = {n: row_set(index, rows[n]) for n in ("val", "test", "synth_test")}
    return RunPlan(layout=layout, rows=rows, shares=shares, sets=sets, held_bytes=held_bytes(shares, layout))


@dataclass(frozen=True)
class WorkerSets:
    """What one Train worker trains, validates and tests on (:func:`worker_sets`, :func:`ray_worker_sets`)."""

    train_sets: dict[int, StageRows]  # per stage, this worker's share
    val: ClipBatch | None  # rank 0: the whole validation set, else None
    val_mine: ClipBatch  # the validation rows this worker scores each epoch
    read_tests: Callable[[], dict[str, ClipBatch]] = field(repr=False)  # rank 0 at the end: the test sets with rows
    reader: StoreReader | None = None  # the row-group engine's reader; None: Ray Data feeds this worker


def worker_sets(cfg: ExperimentConfig, plan: RunPlan, rank: int, world: int,
                order_log: Path | None = None) -> WorkerSets:
    """What worker `rank` of `world` trains and validates on, from the driver's plan (the row-group
    engine: this worker reads the store with its own StoreReader).

    The training sets (TrainSet) cover its share, held once when plan.materialize, else streamed.
    `order_log`: where the training sets record each epoch's clip order (`data.record_order`), or None.
    """
    reader = StoreReader(plan.layout)
    shares = plan.shares[rank]
    held = HeldRows.read(reader, shares) if plan.materialize else None
    train_sets = {s: TrainSet(f"stage{s}", cfg, rank, shares[f"stage{s}"], reader, held, order_log)
                  for s in cfg.train.stage_numbers}
    val_rows: RowSet = plan.sets["val"]
    val = read_clips(reader, val_rows) if rank == 0 else None
    val_mine = val.every(rank, world) if val is not None else read_clips(
        reader, val_rows.take(np.arange(rank, len(val_rows), world)))

    def read_tests() -> dict[str, ClipBatch]:
        return {n: read_clips(reader, plan.sets[n]) for n in TEST_SETS if len(plan.sets[n])}

    return WorkerSets(train_sets, val, val_mine, read_tests, reader)


# --- The Ray Data engine ---------------------------------------------------------------------------
# The driver (seld/train.py build_trainer) makes the run's datasets (`ray_datasets`): per rank and
# stage, the rank's planned share (`plan_shares`, the same rows the row-group engine gives it), read
# with ray.data.read_parquet from the shards that hold them (a path, or s3:// / gs:// through
# pyarrow), filtered to the planned clips and target-encoded in map_batches tasks; and the
# validation and test sets, filtered only. None of them is split by Ray: rank r takes its
# "stage<k>-rank<r>" dataset whole through ray.train.get_dataset_shard, which keeps every rank's
# rows, epoch sizes and normalisation rows those of the plan (and so of the other engine), lets a
# rank stop at the batch count all ranks agree on, and leaves no split coordinator whose state a
# restore would have to repeat. Order: the share's files in an order seeded by (seed, rank, stage),
# the same every epoch (the store writes its shards split by split: in store order a stage's epoch
# would read one split, then the next), blocks kept in that order (preserve_order), then the
# iterator's local shuffle seeded by (seed, rank, epoch): a restored epoch draws the same order.
DATA_NODE_LABEL = {"seld-node": "data"}  # CPU-only nodes that read and encode (Ray Data runs there only)
TRAINER_NODE_LABEL = {"seld-node": "trainer"}  # nodes whose CPUs are Train workers' (Train runs there only)
RAY_READ_COLUMNS = ("clip", *ROW_COLUMNS)
TEST_SETS = ("test", "synth_test")


def engine_of(cfg: ExperimentConfig) -> str:
    """The engine a run uses: `data.engine`, "auto" being the row-group engine (one machine; cluster
    plans set ray_data)."""
    return "rowgroups" if cfg.data.engine == "auto" else cfg.data.engine


def train_dataset_name(stage: int, rank: int) -> str:
    """Name of rank `rank`'s training set of stage `stage` among the trainer's datasets."""
    return f"stage{stage}-rank{rank}"


def _store_files(layout: StoreLayout, shards) -> tuple[list[str], object | None]:
    """Paths of shards for read_parquet and their pyarrow filesystem (None: local paths)."""
    from seld.storage import filesystem, is_uri

    paths = [layout.shards[int(i)] for i in shards]
    if not paths or not is_uri(paths[0]):
        return paths, None
    fs = layout.filesystem or filesystem(paths[0].rsplit("/", 1)[0])[0]
    return [p.split("://", 1)[1] for p in paths], fs


def select_rows(table: pa.Table, clips: np.ndarray, shape: tuple[int, ...],
                output_format: str | None) -> pa.Table | dict[str, np.ndarray]:
    """A Ray Data batch of store rows -> its rows among `clips` (sorted clip ids), store order kept.

    With `output_format`: {"row": int64 position in `clips`, "features": (n, *shape) store dtype,
    "targets": float32 (`encode_targets`)}; without: the clip, features and event columns as read
    (validation and test sets, whose raw events are scored).
    """
    import pyarrow.compute as pc

    pos = pc.index_in(pc.cast(table["clip"], pa.string()), value_set=pa.array(clips, pa.string()))
    keep = pc.is_valid(pos)
    table, pos = table.filter(keep), pos.filter(keep)
    if output_format is None:
        return table.select(list(RAY_READ_COLUMNS))
    return {"row": np.asarray(pos.to_numpy(), dtype=np.int64),
            "features": decode_features(table["features"], shape),
            "targets": encode_targets(events_of_table(table), output_format)}


def ray_datasets(cfg: ExperimentConfig, plan: RunPlan) -> dict:
    """The Ray Data engine's datasets of a run (driver side; call inside :func:`ray_data_context`).

    Returns {"stage<k>-rank<r>": each rank's share of each stage (materialised once when
    plan.materialize, else read again every epoch), "val", "test", "synth_test" (the sets with
    rows; each read once per worker start, rank 0 only for the test sets)}.
    """
    import ray.data

    layout = plan.layout

    def read(rows: RowSet, output_format: str | None, order_seed: int | None = None):
        shards = np.unique(rows.shard)
        if order_seed is not None:  # a training share: its files in a seeded order, not the store's
            shards = np.random.default_rng(order_seed).permutation(shards)
        paths, fs = _store_files(layout, shards)
        # One read task per shard: a read split further cannot fuse with the map below, and every
        # block would then cross the object store twice (measured: BENCHMARKS.md "Ingest engines").
        ds = ray.data.read_parquet(paths, filesystem=fs, override_num_blocks=len(paths)).select_columns(
            list(RAY_READ_COLUMNS))
        return ds.map_batches(select_rows, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                              fn_kwargs={"clips": rows.clips, "shape": layout.feature_shape,
                                         "output_format": output_format})

    out = {}
    for rank, share in enumerate(plan.shares):
        for s in cfg.train.stage_numbers:
            order = int(np.random.SeedSequence([cfg.seed, rank, s, 41]).generate_state(1)[0])
            ds = read(share[f"stage{s}"], cfg.model.output_format, order)
            out[train_dataset_name(s, rank)] = ds.materialize() if plan.materialize else ds
    for name in ("val", *TEST_SETS):
        if len(plan.sets[name]):
            out[name] = read(plan.sets[name], None)
    return out


@contextlib.contextmanager
def ray_data_context(cfg: ExperimentConfig, label_selector: dict[str, str] | None = None):
    """Ray Data's options for one run, set in the current DataContext while its datasets and its
    trainer (which copies the context to the workers) are made, restored after; yields them as
    ExecutionOptions for `ray.train.DataConfig` (which would otherwise drop the label selector).

    preserve_order: each rank's blocks arrive in the order of its files (seeded, see
    :func:`ray_datasets`); no progress bars (logs are not a TTY); `data.ray_data_cpus` as the CPU
    limit (concurrent runs each keep theirs); and
    `label_selector` (:data:`DATA_NODE_LABEL` on a cluster with data nodes) on every Data task.
    Parquet is read by Ray's V1 datasource: its footer and sampling tasks follow the label
    selector, where the V2 one (2.60's default) reads footers in 32 actors placed by "SPREAD" on
    any node (a trainer node included), which on a 2-core machine is also slower to start.
    """
    from ray.data import DataContext, ExecutionResources

    ctx = DataContext.get_current()
    saved = copy.deepcopy(ctx.execution_options), ctx.enable_progress_bars, ctx.use_datasource_v2
    opts = ctx.execution_options
    opts.preserve_order = True
    if cfg.data.ray_data_cpus is not None:
        opts.resource_limits = ExecutionResources(cpu=cfg.data.ray_data_cpus)
    if label_selector:
        opts.label_selector = dict(label_selector)
    ctx.enable_progress_bars = False
    ctx.use_datasource_v2 = False
    try:
        yield copy.deepcopy(opts)
    finally:
        ctx.execution_options, ctx.enable_progress_bars, ctx.use_datasource_v2 = saved


def _rebatched(batches, keep: np.ndarray | None, batch_size: int):
    """(features, targets, row positions) numpy batches from Ray's torch batches: all rows, or only
    those where `keep[row]`, refilled to `batch_size` (only the last may be short)."""
    pending: list[tuple[np.ndarray, ...]] = []
    n = 0
    for b in batches:
        part = (b["features"].numpy(), b["targets"].numpy(), b["row"].numpy())
        if keep is None:
            yield part
            continue
        m = keep[part[2]]
        pending.append(tuple(x[m] for x in part))
        n += int(m.sum())
        while n >= batch_size:
            cat = tuple(np.concatenate(xs) for xs in zip(*pending, strict=True))
            yield tuple(x[:batch_size] for x in cat)
            pending, n = [tuple(x[batch_size:] for x in cat)], n - batch_size
    if n:
        yield tuple(np.concatenate(xs) for xs in zip(*pending, strict=True))


class RayTrainSet(StageRows):
    """The Ray Data engine in a Train worker: one stage's share, taken from the trainer's dataset
    `dataset` (`ray.train.get_dataset_shard`) as torch batches; this process opens no store file.

    An epoch's rows are those of the row-group engine (all, or the seeded stage-1 subsample, whose
    other rows are dropped as they arrive); their order is the blocks' (the share's files in an order
    seeded by seed, rank and stage) through a local shuffle buffer of `data.shuffle_buffer_rows`
    rows seeded by (seed, rank, epoch).
    """

    def __init__(self, name: str, cfg: ExperimentConfig, rank: int, rows: RowSet, layout: StoreLayout,
                 dataset: str, order_log: Path | None = None, shards: Callable | None = None):
        super().__init__(name, cfg, rank, rows, layout, order_log)
        self.dataset = dataset
        self.shards = shards  # name -> DataIterator outside a Train worker (bench/ingest.py); None: Train's

    def _shard(self):
        if self.shards is not None:
            return self.shards(self.dataset)
        import ray.train

        return ray.train.get_dataset_shard(self.dataset)

    def sums(self) -> np.ndarray:
        """Per channel-mel sums (:func:`feature_sums`) of the normalisation's rows (`_norm_index`,
        the row-group engine's rows; summed in arrival order, so equal to its sums to rounding)."""
        want = np.zeros(len(self.rows), dtype=bool)
        want[self._norm_index()] = True
        total = None
        for b in self._shard().iter_batches(batch_size=_SUMS_CHUNK, batch_format="numpy", prefetch_batches=1):
            feats = b["features"][want[b["row"]]]
            if len(feats):
                s = feature_sums(feats)
                total = s if total is None else total + s
        return total

    def batches(self, epoch: int, n_batches: int):
        """Yield `n_batches` (features store-dtype (B, 2, T, M), targets float32) of one epoch; Ray
        fetches `data.prefetch_batches` batches ahead in a background thread."""
        idx = self._epoch_index(epoch)
        keep = None
        if len(idx) < len(self.rows):
            keep = np.zeros(len(self.rows), dtype=bool)
            keep[idx] = True
        bs = self.cfg.train.batch_size
        seed = int(np.random.SeedSequence([self.cfg.seed, self.rank, epoch, 37]).generate_state(1)[0])
        torch_batches = iter(self._shard().iter_torch_batches(
            batch_size=bs, device="cpu", drop_last=False, prefetch_batches=max(1, self.cfg.data.prefetch_batches),
            local_shuffle_buffer_size=max(bs, self.cfg.data.shuffle_buffer_rows), local_shuffle_seed=seed))
        clips: list[np.ndarray] = []
        try:
            for feats, targets, pos in _rebatched(torch_batches, keep, bs):
                if len(clips) >= n_batches:
                    break
                clips.append(self.rows.clips[pos])
                yield feats, targets
        finally:
            close = getattr(torch_batches, "close", None)
            if close is not None:
                close()
        if len(clips) < n_batches:
            # A rank short of batches would reach the epoch's all-reduce while the others are still
            # in their gradient all-reduces (a hang or a desync), so it stops here, by name.
            raise DataError(f"Ray Data dataset {self.dataset!r} delivered {len(clips)} batches of epoch {epoch} "
                            f"where the plan has {n_batches} (store changed since the run was planned?)")
        self._record(epoch, clips)


def clip_batch(iterator, rows: RowSet, shape: tuple[int, ...], keep: Callable | None = None) -> ClipBatch:
    """A Ray Data set of store rows (`select_rows` without encoding) as a ClipBatch sorted by clip id,
    like `read_clips(reader, rows)`; `keep(positions in rows) -> bool mask`: only those rows.

    Raises:
        DataError: the set does not hold exactly the planned rows (store changed since planning).
    """
    parts, where = [], []
    for t in iterator.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
        pos = np.searchsorted(rows.clips, np.asarray(t["clip"].to_numpy(zero_copy_only=False)).astype(str))
        m = keep(pos) if keep is not None else np.ones(len(pos), dtype=bool)
        parts.append(t.filter(pa.array(m)))
        where.append(pos[m])
    pos = np.concatenate(where) if where else np.zeros(0, np.int64)
    wanted = np.flatnonzero(keep(np.arange(len(rows)))) if keep is not None else np.arange(len(rows))
    order = np.argsort(pos, kind="stable")
    if not np.array_equal(pos[order], wanted):
        raise DataError(f"Ray Data delivered {len(pos)} rows where the plan has {len(wanted)} "
                        "(store changed since the run was planned?)")
    table = pa.concat_tables(parts).take(pa.array(order)) if parts else None
    sub = rows.take(wanted)
    if table is None:
        return ClipBatch(sub.clips, sub.splits, sub.domains, np.zeros((0, *shape), np.float32), [])
    return ClipBatch(sub.clips, sub.splits, sub.domains, decode_features(table["features"], shape),
                     events_of_table(table).per_clip())


def ray_worker_sets(cfg: ExperimentConfig, plan: RunPlan, rank: int, world: int,
                    order_log: Path | None = None) -> WorkerSets:
    """:func:`worker_sets` for the Ray Data engine (inside a Train worker): the training sets are
    RayTrainSets, the test sets come from the trainer's datasets, and there is no reader."""
    import ray.train

    layout, shares = plan.layout, plan.shares[rank]
    shape = layout.feature_shape
    train_sets = {s: RayTrainSet(f"stage{s}", cfg, rank, shares[f"stage{s}"], layout, train_dataset_name(s, rank),
                                 order_log) for s in cfg.train.stage_numbers}
    val_rows: RowSet = plan.sets["val"]
    val_it = ray.train.get_dataset_shard("val")
    if rank == 0:
        val = clip_batch(val_it, val_rows, shape)
        val_mine = val.every(rank, world)
    else:
        val = None
        val_mine = clip_batch(val_it, val_rows, shape, keep=lambda pos: pos % world == rank)

    def read_tests() -> dict[str, ClipBatch]:
        return {n: clip_batch(ray.train.get_dataset_shard(n), plan.sets[n], shape)
                for n in TEST_SETS if len(plan.sets[n])}

    return WorkerSets(train_sets, val, val_mine, read_tests)


# --- Materialise or stream -----------------------------------------------------------------------
def held_bytes(shares: list[dict[str, RowSet]], layout: StoreLayout) -> int:
    """Bytes the largest share would hold in memory: its union of stage rows' features (+ events)."""
    most = max(len({c for s in share.values() for c in s.clips}) for share in shares)
    return most * (layout.bytes_per_row + 40 * _EVENT_BYTES)


def choose_path(need_bytes: int, worker_memory_bytes: float | None, data_cfg: DataConfig) -> tuple[bool, str]:
    """Whether workers materialise their shares, and why (one sentence for the log).

    Auto (`data.materialize` "auto"): materialise when a worker's share fits in `data.memory_fraction`
    of the memory a worker has (the rest is the model, activations, Ray's object store and other
    trials); otherwise stream. Forced materialising that does not fit in the worker's whole memory
    is a DataError.
    """
    gib = 2.0 ** 30
    need = f"{need_bytes / gib:.2f} GiB"
    if data_cfg.materialize is False:
        return False, f"streaming (data.materialize=false; a share would hold {need})"
    if worker_memory_bytes is None:
        if data_cfg.materialize is True:
            return True, f"materialising {need} per worker (data.materialize=true; worker memory unknown)"
        return False, f"streaming: no node that can host a worker is up to size its memory (a share is {need})"
    have = f"{worker_memory_bytes / gib:.2f} GiB"
    if data_cfg.materialize is True:
        if need_bytes > worker_memory_bytes:
            raise DataError(f"data.materialize=true: a worker would hold {need} of store rows but has "
                            f"{have} of memory; set data.materialize=false (stream) or use more workers")
        return True, f"materialising {need} per worker (data.materialize=true; a worker has {have})"
    budget = data_cfg.memory_fraction * worker_memory_bytes
    if need_bytes <= budget:
        return True, (f"materialising: a share holds {need}, within {data_cfg.memory_fraction:g} of a "
                      f"worker's {have}")
    return False, (f"streaming: a share would hold {need}, more than {data_cfg.memory_fraction:g} of a "
                   f"worker's {have}")


# --- Normalisation ---------------------------------------------------------------------------------------
def _chunked_sums(rows_of: Callable[[int, int], np.ndarray], n: int) -> np.ndarray:
    """:func:`feature_sums` of n rows taken `_SUMS_CHUNK` at a time (`rows_of(a, b)`: rows a..b), so
    the float64 temporary stays small; the chunks are summed in order."""
    total = None
    for a in range(0, n, _SUMS_CHUNK):
        s = feature_sums(rows_of(a, min(a + _SUMS_CHUNK, n)))
        total = s if total is None else total + s
    return total

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

