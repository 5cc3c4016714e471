"""Parquet feature store: a DCASE2025-layout dataset -> one row per 5-s clip (log-mel + raw events).

Reads `DATA/stereo_dev/<split>/*.wav` with `DATA/metadata_dev/<split>/*.csv` (and
`DATA/stereo_eval/eval/*.wav`, no labels) and writes `OUT/features-<hash>/shard-<split>-NNNNN.parquet`
plus `manifest.json`, where <hash> is the hash of the FeatureConfig. OUT is a folder of this node or
a bucket (`s3://bucket/prefix`, `gs://...`, through `seld.storage`'s filesystems and credentials).
Features are (2, 251, 64) dB at 20 ms frames in `FeatureConfig.store_dtype`, stored as Arrow's
fixed-shape tensor type (a batch of rows is one (n, 2, 251, 64) array: the flat value buffer, no
per-row step); stores written before it hold a fixed-size list of the same values (C order), which
every reader here still reads and `convert_store` rewrites. Events keep the CSV's 100 ms frames,
azimuth in degrees and distance in cm. See docs/CONTRACT.md.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from seld import labels
from seld.config import LABEL_HOP_S, SPLITS, FeatureConfig, config_hash, from_dict, to_dict
from seld.errors import DataError, UserError
from seld.runfolder import atomic_write, temp_glob, write_json_atomic
from seld.storage import check_uri, is_uri, join

log = logging.getLogger(__name__)

# Bump when the row content changes (part of every shard's fingerprint). The feature column's
# encoding is not part of it, nor of the config hash: converting a store rewraps the same bytes.
STORE_FORMAT = 1
ENCODING_TENSOR = "fixed_shape_tensor"  # Arrow's fixed-shape tensor extension type (new stores)
ENCODING_LIST = "fixed_size_list"  # flat fixed-size list (stores written before; still read)
SHARD_ROWS = 512  # clips per shard: 32 MB at float16, a good Ray Data block; the unit of resume
SHARD_ROW_GROUP = 64  # clips per Parquet row group: the unit the training workers read
EVAL_SPLIT = "eval"  # stereo_eval/eval: evaluation audio without labels
_BATCH_CLIPS = 16  # clips per log_mel call inside a worker
_NAME = re.compile(r"fold(\d+)_room(\d+)")
_META_KEY = b"seld.shard"


@dataclass(frozen=True)
class ClipSource:
    """One input clip: its id (file stem), split folder, wav and label csv (None for eval)."""

    clip: str
    split: str
    wav: str
    csv: str | None


@dataclass(frozen=True)
class ShardJob:
    name: str
    split: str
    sources: tuple[ClipSource, ...]
    fingerprint: str


@dataclass(frozen=True)
class StoreInfo:
    """An opened store: ``path`` (the hashed folder: a Path on this node, or an ``s3://`` / ``gs://``
    URI string), ``manifest`` (dict), ``shards`` (paths or URIs, manifest order), ``hash`` (feature
    config hash), ``config`` (FeatureConfig), ``n_rows`` per split, ``skipped`` input files
    ({path: reason}), ``filesystem``: the bucket's pyarrow filesystem (None on this node; picklable,
    it carries the credentials of the process that opened the store to those it is handed to)."""

    path: Path | str
    manifest: dict
    shards: tuple[Path | str, ...]
    hash: str
    config: FeatureConfig
    n_rows: dict
    skipped: dict
    filesystem: object = dataclasses.field(default=None, repr=False)

    @property
    def encoding(self) -> str:
        """How the shards store the features column (ENCODING_TENSOR or ENCODING_LIST)."""
        return self.manifest.get("feature_encoding", ENCODING_LIST)

    def arrow_paths(self) -> tuple[object | None, list[str]]:
        """``(filesystem, shard paths in it)`` for pyarrow and Ray Data readers, e.g.
        ``ray.data.read_parquet(paths, filesystem=fs)`` or ``pq.ParquetFile(p, filesystem=fs)``;
        ``(None, absolute paths)`` for a store on this node."""
        if self.filesystem is None:
            return None, [str(Path(p).resolve()) for p in self.shards]
        return self.filesystem, [_bucket_path(str(p)) for p in self.shards]


class StoreIncomplete(DataError):
    """Some input files were unreadable; the store holds every other clip. ``skipped``: {file: reason}."""

    def __init__(self, path: Path | str, skipped: dict[str, str]):
        self.path, self.skipped = path, dict(skipped)
        lines = "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
        super().__init__(f"{len(skipped)} input file(s) skipped, store {path} holds the others "
                         f"(fix them and rerun; finished shards are kept): {lines}")


# --- Where a store lives: a folder of this node or a bucket -----------------------------------------
def _bucket_path(uri: str) -> str:
    """``bucket/prefix/...`` of an ``s3://`` / ``gs://`` URI (a path of its pyarrow filesystem)."""
    parsed = urlparse(uri)
    return f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return re.sub(r"\s+", " ", text[0] if text else type(e).__name__)[:300]


@dataclass(frozen=True)
class _Folder:
    """A store folder on this node (``fs`` None, ``location`` a Path) or in a bucket (``location``
    its URI, ``fs`` the bucket's pyarrow filesystem): the few file operations a store needs.

    In a bucket every object is written whole in one request (a reader never sees half of one), so
    there is no temporary name to rename; an upload cut off leaves no object, or one whose Parquet
    footer does not read, which a resumed run recomputes.
    """

    location: Path | str
    fs: object = None

    @staticmethod
    def at(location: str | Path, fs=None) -> _Folder:
        if is_uri(location):
            uri = check_uri(str(location), "store")
            if fs is None:
                from seld.storage import filesystem

                fs = filesystem(uri)[0]
            return _Folder(uri, fs)
        return _Folder(Path(location))

    def sub(self, name: str) -> _Folder:
        return _Folder(self.location / name) if self.fs is None else _Folder(join(self.location, name), self.fs)

    def file(self, name: str) -> Path | str:
        """What callers see of a file here: a Path, or a URI."""
        return self.location / name if self.fs is None else join(self.location, name)

    def _key(self, name: str = "") -> str:
        return _bucket_path(join(self.location, name) if name else self.location)

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        if self.fs is None:
            return self.location.is_dir()
        return self.fs.get_file_info(self._key()).type == pafs.FileType.Directory

    def names(self, pattern: str) -> list[str]:
        """Sorted names of the files (or, for ``features-*``, the folders) here matching ``pattern``."""
        import pyarrow.fs as pafs

        if self.fs is None:
            return sorted(p.name for p in self.location.glob(pattern))
        infos = self.fs.get_file_info(pafs.FileSelector(self._key(), allow_not_found=True))
        return sorted(n for n in (i.base_name for i in infos if i.type != pafs.FileType.NotFound)
                      if fnmatch.fnmatchcase(n, pattern))

    def missing(self, names: list[str]) -> list[str]:
        import pyarrow.fs as pafs

        if self.fs is None:
            return [n for n in names if not (self.location / n).is_file()]
        infos = self.fs.get_file_info([self._key(n) for n in names]) if names else []
        return [n for n, i in zip(names, infos, strict=True) if i.type != pafs.FileType.File]

    def has(self, name: str) -> bool:
        return not self.missing([name])

    def size(self, name: str) -> int:
        return (self.location / name).stat().st_size if self.fs is None else self.fs.get_file_info(self._key(name)).size

    def read_text(self, name: str) -> str:
        if self.fs is None:
            return (self.location / name).read_text()
        with self.fs.open_input_stream(self._key(name)) as f:
            return f.read().decode()

    def write_json(self, name: str, obj) -> None:
        if self.fs is None:
            write_json_atomic(self.location / name, obj)
            return
        with self.fs.open_output_stream(self._key(name)) as f:
            f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def delete(self, name: str) -> None:
        if self.fs is None:
            (self.location / name).unlink(missing_ok=True)
        elif self.has(name):
            self.fs.delete_file(self._key(name))

    def prepare(self) -> None:
        """Make the folder (on this node) and remove temporary files an interrupted run left."""
        if self.fs is None:
            self.location.mkdir(parents=True, exist_ok=True)
            for stale in self.location.glob(temp_glob()):
                stale.unlink(missing_ok=True)

    def parquet(self, name: str) -> pq.ParquetFile:
        return open_shard(self.file(name), self.fs)

    def write_parquet(self, name: str, table: pa.Table, groups: list[int] | None = None) -> int:
        """Write a shard (a temporary name then a rename here; one whole object in a bucket) in row
        groups of SHARD_ROW_GROUP rows, or of the sizes `groups`; returns its size in bytes."""
        groups = groups or [min(SHARD_ROW_GROUP, table.num_rows - a) for a in range(0, table.num_rows, SHARD_ROW_GROUP)]
        options = {"use_dictionary": ["clip", "split", "domain", "role", "site"],
                   "compression": {c: "none" if c == "features" else "snappy" for c in table.schema.names}}

        def write(where) -> None:
            with pq.ParquetWriter(where, table.schema, **options) as writer:
                start = 0
                for n in groups:
                    writer.write_table(table.slice(start, n), row_group_size=n)
                    start += n
                if not groups:  # no rows: the file still holds the schema
                    writer.write_table(table)

        if self.fs is None:
            with atomic_write(self.location / name) as tmp:
                write(tmp)
            return (self.location / name).stat().st_size
        buf = pa.BufferOutputStream()
        write(buf)
        data = buf.getvalue()
        with self.fs.open_output_stream(self._key(name)) as f:
            f.write(data)
        return data.size


def open_shard(path: str | Path, filesystem=None) -> pq.ParquetFile:
    """A shard of a store on this node or in a bucket, open for reading (footer, row groups).

    Args:
        path: the shard's path, or its ``s3://`` / ``gs://`` URI (as in ``StoreInfo.shards``).
        filesystem: the bucket's pyarrow filesystem (``StoreInfo.filesystem``); None builds one
            from this process's credentials (seld.storage).
    """
    if not is_uri(path):
        return pq.ParquetFile(path)
    if filesystem is None:
        from seld.storage import filesystem as bucket_filesystem

        filesystem = bucket_filesystem(str(path))[0]
    return pq.ParquetFile(_bucket_path(str(path)), filesystem=filesystem)


# --- The feature column -----------------------------------------------------------------------------
def feature_type(dtype: str, shape: tuple[int, ...] | list[int]) -> pa.DataType:
    """The features column's Arrow type in new stores: a fixed-shape tensor of `shape` in `dtype`
    ("float16" or "float32"); its storage is the fixed-size list older stores hold."""
    return pa.fixed_shape_tensor(pa.float16() if dtype == "float16" else pa.float32(), list(shape))


def feature_encoding(type_: pa.DataType, where: str = "features") -> tuple[str, int]:
    """``(encoding, values per row)`` of a features column's Arrow type, either encoding.

    Raises:
        DataError: any other type, naming ``where`` (the shard).
    """
    if isinstance(type_, pa.FixedShapeTensorType):
        return ENCODING_TENSOR, int(np.prod(type_.shape))
    if pa.types.is_fixed_size_list(type_):
        return ENCODING_LIST, int(type_.list_size)
    raise DataError(f"{where}: features column of type {type_}, expected a fixed-shape tensor or a "
                    "fixed-size list; rebuild the store with `seld features`")


def decode_features(column: pa.Array | pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    """The rows of a features column (either encoding) as one (n, *shape) array, without a step per
    row: a read-only view of the flat value buffer when the column is one chunk (a row group read
    from Parquet), else one copy (chunks combined, or rows taken)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, pa.ExtensionArray):
        column = column.storage
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), *shape)


def _as_tensor_column(column: pa.ChunkedArray | pa.Array, type_: pa.DataType) -> pa.ChunkedArray:
    """A fixed-size-list features column as the fixed-shape tensor `type_` (the same buffers)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    return pa.chunked_array([pa.ExtensionArray.from_storage(type_, c) for c in chunks], type_)


# --- Planning --------------------------------------------------------------------------------------
def split_info(split: str) -> dict[str, str]:
    """domain, role, site of a split folder (docs/DESIGN.md split table; `eval` = stereo_eval/eval)."""
    if split == EVAL_SPLIT:
        return {"domain": "real", "role": "eval", "site": "eval"}
    return SPLITS[split]


def find_clips(data_root: str | Path, splits=None) -> list[ClipSource]:
    """Input clips of a dataset in the DCASE2025 layout, sorted by (split, clip).

    A wav without its csv is kept (with csv = the expected path) and reported when it is read.
    Unknown split folders are skipped with a warning.
    """
    root = Path(data_root)
    dev = root / "stereo_dev"
    if not dev.is_dir() and not (root / "stereo_eval").is_dir():
        raise UserError(f"{root}: not a DCASE2025 dataset root (no stereo_dev/ or stereo_eval/ folder)")
    wanted = set(splits) if splits else None
    if wanted:
        unknown = wanted - set(SPLITS) - {EVAL_SPLIT}
        if unknown:
            raise UserError(f"splits {sorted(unknown)}: unknown; choose from {', '.join([*SPLITS, EVAL_SPLIT])}")
    out: list[ClipSource] = []
    folders = sorted(p for p in dev.iterdir() if p.is_dir()) if dev.is_dir() else []
    for folder in folders:
        if folder.name not in SPLITS:
            log.warning("%s: not a known split folder (%s); skipped", folder, ", ".join(SPLITS))
            continue
        if wanted and folder.name not in wanted:
            continue
        meta = root / "metadata_dev" / folder.name
        for wav in sorted(folder.glob("*.wav")):
            out.append(ClipSource(wav.stem, folder.name, str(wav), str(meta / f"{wav.stem}.csv")))
    ev_dir = root / "stereo_eval" / "eval"
    if ev_dir.is_dir() and (not wanted or EVAL_SPLIT in wanted):
        out += [ClipSource(w.stem, EVAL_SPLIT, str(w), None) for w in sorted(ev_dir.glob("*.wav"))]
    if wanted:  # a requested split whose folder is missing is an error, not a silent drop
        absent = sorted(s for s in wanted if not (ev_dir if s == EVAL_SPLIT else dev / s).is_dir())
        if absent:
            raise UserError(f"{root}: no folder for the requested split(s) {', '.join(absent)} "
                            f"(expected stereo_dev/<split>/ or stereo_eval/eval/)")
    if not out:
        raise UserError(f"{root}: no wav files found under stereo_dev/<split>/ or stereo_eval/eval/")
    return out


def _fingerprint(sources, cfg_hash: str) -> str:
    """Cheap identity of a shard's inputs (names, sizes, mtimes) and settings, for resuming."""
    h = hashlib.sha256(f"{STORE_FORMAT}:{cfg_hash}".encode())
    for s in sources:
        for p in (s.wav, s.csv):
            try:
                st = os.stat(p) if p else None
            except OSError:
                st = None
            h.update(f"|{s.split}/{s.clip}:{p}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}".encode())
    return h.hexdigest()


def plan_shards(sources: list[ClipSource], cfg: FeatureConfig, shard_rows: int = SHARD_ROWS) -> list[ShardJob]:
    """Consecutive groups of at most `shard_rows` clips of one split, named shard-<split>-NNNNN."""
    cfg_hash = config_hash(cfg)
    jobs = []
    for split in dict.fromkeys(s.split for s in sources):
        rows = [s for s in sources if s.split == split]
        for i in range(0, len(rows), shard_rows):
            part = tuple(rows[i:i + shard_rows])
            jobs.append(ShardJob(f"shard-{split}-{i // shard_rows:05d}", split, part, _fingerprint(part, cfg_hash)))
    return jobs


# --- Extraction (runs in worker threads) ----------------------------------------------------------
def _feature_shape(cfg: FeatureConfig) -> list[int]:
    """(channels, frames, mels) of one clip's features: (2, 251, 64) for 5 s at 20 ms."""
    return [2, 1 + int(round(cfg.clip_s * cfg.sample_rate_hz)) // cfg.hop_length, cfg.n_mels]


def _schema(cfg: FeatureConfig) -> pa.Schema:
    ints, floats = pa.list_(pa.int32()), pa.list_(pa.float64())
    return pa.schema([
        ("clip", pa.string()), ("split", pa.string()), ("domain", pa.string()), ("role", pa.string()),
        ("site", pa.string()), ("room", pa.int32()), ("fold", pa.int32()),
        ("features", feature_type(cfg.store_dtype, _feature_shape(cfg))),
        ("ev_frame", ints), ("ev_class", ints), ("ev_source", ints),
        ("ev_azimuth", floats), ("ev_distance", floats),
    ])


def _read_clip(src: ClipSource, cfg: FeatureConfig):
    """(audio (2, n) float32, events, sha256 of wav+csv bytes) of one clip; DataError if unreadable."""
    from seld.features import load_audio

    h = hashlib.sha256()
    try:
        h.update(Path(src.wav).read_bytes())
    except OSError as e:
        raise DataError(f"{src.wav}: cannot read ({e.strerror})") from None
    audio = load_audio(src.wav, cfg)
    n_clip = int(round(cfg.clip_s * cfg.sample_rate_hz))
    if audio.shape[1] > n_clip:
        log.warning("%s: %.2f s long, only the first %.1f s are used", src.wav,
                    audio.shape[1] / cfg.sample_rate_hz, cfg.clip_s)
        audio = audio[:, :n_clip]
    if src.csv is None:
        return audio, labels.empty_events(), h.hexdigest()
    csv = Path(src.csv)
    if not csv.is_file():
        raise DataError(f"{src.wav}: no label file {csv}")
    h.update(csv.read_bytes())
    n_frames = int(round(cfg.clip_s / LABEL_HOP_S))
    return audio, labels.read_reference_csv(csv, n_frames=n_frames), h.hexdigest()


def extract_shard(job: ShardJob, cfg: FeatureConfig, out_dir: str | Path, fs=None) -> dict:
    """Compute one shard and write it to the store folder `out_dir` (a path, or a bucket URI with
    its pyarrow filesystem `fs`): under a temporary name then renamed, or as one whole object.

    Returns a summary dict: name, split, rows, bytes, sources_sha256, skipped {file: reason}.
    """
    from seld.features import log_mel

    info = split_info(job.split)
    rows: dict[str, list] = {k: [] for k in ("clip", "room", "fold", "ev")}
    feats: list[np.ndarray] = []
    skipped: dict[str, str] = {}
    digest = hashlib.sha256()
    store_np = np.float16 if cfg.store_dtype == "float16" else np.float32
    for i in range(0, len(job.sources), _BATCH_CLIPS):
        audio = []
        for src in job.sources[i:i + _BATCH_CLIPS]:
            try:
                a, ev, sha = _read_clip(src, cfg)
            except DataError as e:
                skipped[src.wav] = str(e).removeprefix(f"{src.wav}: ")
                log.debug("skipped %s", e)  # all are named in the one StoreIncomplete line at the end
                continue
            audio.append(a)
            digest.update(f"{src.clip}:{sha}\n".encode())
            m = _NAME.search(src.clip)
            rows["clip"].append(src.clip)
            rows["fold"].append(int(m.group(1)) if m else -1)
            rows["room"].append(int(m.group(2)) if m else -1)
            rows["ev"].append(ev)
        if audio:
            x = log_mel(np.stack(audio), cfg.sample_rate_hz, cfg)
            feats.append(x.reshape(len(audio), -1).astype(store_np))
    n = len(rows["clip"])
    schema = _schema(cfg)
    n_features = int(np.prod(_feature_shape(cfg)))
    flat = np.concatenate(feats) if feats else np.zeros((0, n_features), store_np)
    ev = rows["ev"]
    features = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), n_features)
    table = pa.table({
        "clip": rows["clip"], "split": [job.split] * n, "domain": [info["domain"]] * n,
        "role": [info["role"]] * n, "site": [info["site"]] * n,
        "room": pa.array(rows["room"], pa.int32()), "fold": pa.array(rows["fold"], pa.int32()),
        "features": pa.ExtensionArray.from_storage(schema.field("features").type, features),
        "ev_frame": [e["frame"].tolist() for e in ev], "ev_class": [e["class"].tolist() for e in ev],
        "ev_source": [e["source"].tolist() for e in ev], "ev_azimuth": [e["azimuth"].tolist() for e in ev],
        "ev_distance": [e["distance"].tolist() for e in ev],
    }, schema=schema)
    summary = {"name": job.name, "split": job.split, "rows": n, "sources_sha256": digest.hexdigest(),
               "skipped": skipped, "fingerprint": job.fingerprint}
    table = table.replace_schema_metadata({_META_KEY: json.dumps(summary).encode()})
    summary["bytes"] = _Folder.at(out_dir, fs).write_parquet(f"{job.name}.parquet", table)
    return summary


def _finished(folder: _Folder, job: ShardJob) -> tuple[dict, str] | None:
    """(summary, feature encoding) of an existing shard written from the same inputs and settings,
    else None (absent, unreadable, or from other inputs)."""
    try:
        schema = folder.parquet(f"{job.name}.parquet").schema_arrow
        summary = json.loads((schema.metadata or {})[_META_KEY])
        encoding = feature_encoding(schema.field("features").type)[0]
    except (OSError, KeyError, ValueError, pa.ArrowException, DataError):
        return None
    if summary.get("fingerprint") != job.fingerprint:
        return None
    summary["bytes"] = folder.size(f"{job.name}.parquet")
    return summary, encoding


def _convert_shard(folder: _Folder, name: str, type_: pa.DataType) -> tuple[int, bool]:
    """Rewrite a fixed-size-list shard with its features column as the fixed-shape tensor `type_`
    (the same values, row groups and metadata). Returns (bytes, whether it was rewritten); a shard
    already in the tensor encoding is kept as it is."""
    file = folder.parquet(name)
    schema = file.schema_arrow
    where = str(folder.file(name))
    encoding, n_values = feature_encoding(schema.field("features").type, where)
    if encoding == ENCODING_TENSOR:
        return folder.size(name), False
    if n_values != int(np.prod(type_.shape)):
        raise DataError(f"{where}: features of {n_values} values per row, the manifest says "
                        f"{'x'.join(map(str, type_.shape))}; rebuild the store with `seld features`")
    groups = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
    table = file.read()
    del file  # no handle left open on the file being replaced
    i = table.schema.get_field_index("features")
    table = table.set_column(i, pa.field("features", type_), _as_tensor_column(table["features"], type_))
    return folder.write_parquet(name, table.replace_schema_metadata(schema.metadata), groups), True


# --- Public API ------------------------------------------------------------------------------------
def store_folder(out: str | Path, cfg: FeatureConfig) -> Path | str:
    """`out/features-<hash>` for a feature config (a URI when `out` is a bucket URI)."""
    name = f"features-{config_hash(cfg)}"
    return join(check_uri(str(out), "--out"), name) if is_uri(out) else Path(out) / name


def build_store(data_root, out, cfg: FeatureConfig | None = None, splits=None, n_procs: int | None = None,
                progress: bool = False, shard_rows: int = SHARD_ROWS) -> Path | str:
    """Extract features of every clip of a DCASE2025-layout dataset into a Parquet store.

    Args:
        data_root: dataset root (`stereo_dev/<split>/*.wav`, `metadata_dev/<split>/*.csv`, optional
            `stereo_eval/eval/*.wav`).
        out: store root, a folder or a bucket URI (`s3://bucket/prefix`, `gs://...`); the store is
            `out/features-<hash of cfg>/`.
        cfg: feature settings (default: the official recipe, float16 storage).
        splits: split folder names to include (default: all known ones present).
        n_procs: parallel workers (threads with one torch thread each; default: CPU count, at most
            the number of shards to compute).
        progress: progress bar on stderr.
        shard_rows: clips per shard.

    Returns:
        The store folder (a Path, or the store's URI in a bucket). Shards whose inputs and settings
        are unchanged are kept from an earlier (possibly interrupted) run, and converted to the
        tensor encoding if they predate it; shards are written under a temporary name and renamed
        (in a bucket: each as one whole object), so a visible shard is always complete.
        `manifest.json` is written last.

    Raises:
        StoreIncomplete: some inputs were unreadable; every other clip is in the store, the manifest
            lists the skipped files.
        DataError: the bucket cannot be reached or written (one line naming the URI).
    """
    cfg = cfg or FeatureConfig()
    t0 = time.perf_counter()
    sources = find_clips(data_root, splits)
    jobs = plan_shards(sources, cfg, shard_rows)
    folder = _Folder.at(store_folder(out, cfg))
    try:
        return _build(folder, data_root, cfg, jobs, n_procs, progress, t0)
    except OSError as e:
        if folder.fs is None:
            raise
        # pyarrow reports the SDK's errors (no bucket, refused credentials, unreachable endpoint) as OSError
        raise DataError(f"{folder.location}: cannot write the store ({_one_line(e)})") from None


def _build(folder: _Folder, data_root, cfg: FeatureConfig, jobs: list[ShardJob], n_procs: int | None,
           progress: bool, t0: float) -> Path | str:
    folder.prepare()
    planned = {f"{j.name}.parquet" for j in jobs}
    for old in folder.names("shard-*.parquet"):
        if old not in planned:
            log.info("removing %s: not part of this dataset's plan", folder.file(old))
            folder.delete(old)
    folder.delete("manifest.json")  # rewritten when every shard is done

    summaries: dict[str, dict] = {}
    todo = []
    tensor = _schema(cfg).field("features").type
    for job in jobs:
        done = _finished(folder, job)
        if done is None:
            todo.append(job)
            continue
        summaries[job.name], encoding = done
        if encoding != ENCODING_TENSOR:  # a store from before the tensor encoding: same values, rewrapped
            summaries[job.name]["bytes"] = _convert_shard(folder, f"{job.name}.parquet", tensor)[0]
    if summaries:
        log.info("%s: %d of %d shards already done", folder.location, len(summaries), len(jobs))
    n_procs = max(1, min(n_procs or os.cpu_count() or 1, len(todo)))
    bar = tqdm(total=sum(len(j.sources) for j in todo), desc="features", unit="clip", disable=not progress or not todo)
    if n_procs == 1:
        for job in todo:
            summaries[job.name] = extract_shard(job, cfg, folder.location, folder.fs)
            bar.update(len(job.sources))
    else:
        # Worker threads, one torch thread each: decoding, the DFT, Parquet encoding and hashing all
        # release the GIL, and threads start instantly (a spawned process spends seconds importing
        # torch/scipy) and share the cached filterbank.
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with cf.ThreadPoolExecutor(n_procs, thread_name_prefix="seld-features") as pool:
                futures = {pool.submit(extract_shard, job, cfg, folder.location, folder.fs): job for job in todo}
                for fut in cf.as_completed(futures):
                    job = futures[fut]
                    summaries[job.name] = fut.result()
                    bar.update(len(job.sources))
        finally:
            torch.set_num_threads(threads)
    bar.close()

    ordered = [summaries[j.name] for j in jobs]
    skipped = {k: v for s in ordered for k, v in s["skipped"].items()}
    n_rows: dict[str, int] = {}
    for s in ordered:
        n_rows[s["split"]] = n_rows.get(s["split"], 0) + s["rows"]
    total_rows = sum(n_rows.values())
    total_bytes = sum(s["bytes"] for s in ordered)
    manifest = {
        "format": STORE_FORMAT,
        "hash": config_hash(cfg),
        "feature_config": to_dict(cfg),
        "feature_shape": _feature_shape(cfg),
        "feature_dtype": cfg.store_dtype,
        "feature_encoding": ENCODING_TENSOR,
        "data_root": str(Path(data_root).resolve()),
        "n_rows": n_rows,
        "n_rows_total": total_rows,
        "bytes_total": total_bytes,
        "bytes_per_clip": round(total_bytes / total_rows, 1) if total_rows else None,
        "shards": [{k: s[k] for k in ("name", "split", "rows", "bytes", "sources_sha256")} for s in ordered],
        "skipped": skipped,
    }
    folder.write_json("manifest.json", manifest)
    dt = time.perf_counter() - t0
    n_new = sum(len(j.sources) for j in todo)
    if skipped:  # one line says it all (what was stored and what was not)
        raise StoreIncomplete(folder.location, skipped)
    log.info("store %s: %d rows (%s), %d computed in %.1f s (%.0f clips/s), %.0f bytes/clip", folder.location,
             total_rows, ", ".join(f"{k} {v}" for k, v in n_rows.items()), n_new, dt, n_new / dt if dt else 0,
             manifest["bytes_per_clip"] or 0)
    return folder.location


def open_store(path, cfg: FeatureConfig | None = None, filesystem=None) -> StoreInfo:
    """Open a store written by :func:`build_store`, on this node or in a bucket.

    Args:
        path: the hashed folder `features-<hash>` or the `out` folder holding it: a path, or an
            `s3://` / `gs://` URI.
        cfg: if given, the store must have been written with exactly this feature config.
        filesystem: a bucket's pyarrow filesystem to use (e.g. ``StoreInfo.filesystem`` handed to
            another process); None builds one from this process's credentials (seld.storage).

    Raises:
        DataError: no store there, an incomplete one (no manifest), a missing shard, a store with
            another feature config, or several stores under `path` and no cfg to choose; in a
            bucket also one that cannot be reached or read. One line, naming the path or URI.
    """
    folder = _Folder.at(path, filesystem)
    try:
        return _open(folder, path, cfg)
    except OSError as e:
        if folder.fs is None:
            raise
        raise DataError(f"{folder.location}: cannot read the feature store ({_one_line(e)})") from None


def _open(folder: _Folder, path, cfg: FeatureConfig | None) -> StoreInfo:
    if folder.fs is not None and not folder.is_dir():
        import pyarrow.fs as pafs

        bucket = _bucket_path(folder.location).split("/", 1)[0]
        if folder.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise DataError(f"{folder.location}: bucket {bucket!r} not found (check the URI, or AWS_ENDPOINT_URL)")
    if not folder.is_dir():
        raise DataError(f"{folder.location}: no feature store folder; run `seld features DATA --out {path}`")
    if not folder.has("manifest.json") and not folder.names("shard-*.parquet"):
        candidates = folder.names("features-*")
        if cfg is not None:
            want = f"features-{config_hash(cfg)}"
            if want not in candidates:
                raise DataError(f"{folder.location}: no store for this feature config ({want}); "
                                f"found {candidates or 'none'}; run `seld features`")
            folder = folder.sub(want)
        elif len(candidates) == 1:
            folder = folder.sub(candidates[0])
        elif not candidates:
            raise DataError(f"{folder.location}: no features-<hash>/ store inside; run "
                            f"`seld features DATA --out {path}`")
        else:
            raise DataError(f"{folder.location}: several stores ({', '.join(candidates)}); pass the one to use")
    mf = folder.file("manifest.json")
    if not folder.has("manifest.json"):
        raise DataError(f"{folder.location}: incomplete store (no manifest.json; interrupted?); rerun "
                        "`seld features` to finish it")
    try:
        manifest = json.loads(folder.read_text("manifest.json"))
        stored_cfg = from_dict(FeatureConfig, manifest["feature_config"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{mf}: unreadable manifest ({e})") from None
    if cfg is not None and config_hash(cfg) != manifest["hash"]:
        diff = [f"{f.name}: store {getattr(stored_cfg, f.name)!r} vs wanted {getattr(cfg, f.name)!r}"
                for f in dataclasses.fields(cfg) if getattr(stored_cfg, f.name) != getattr(cfg, f.name)]
        raise DataError(f"{folder.location}: written with another feature config ({'; '.join(diff)}); "
                        "run `seld features` with this config (it writes a new features-<hash> folder)")
    names = [f"{s['name']}.parquet" for s in manifest["shards"]]
    missing = folder.missing(names)
    if missing:
        raise DataError(f"{folder.location}: shards listed in the manifest are missing: "
                        f"{', '.join(str(folder.file(n)) for n in missing)}")
    return StoreInfo(folder.location, manifest, tuple(folder.file(n) for n in names), manifest["hash"], stored_cfg,
                     dict(manifest["n_rows"]), dict(manifest.get("skipped", {})), folder.fs)


def convert_store(path, progress: bool = False) -> StoreInfo:
    """Rewrite a store's shards whose features column is a fixed-size list (stores written before
    the tensor encoding) with the fixed-shape tensor type: the same values, rows and row groups.

    Each shard is replaced atomically and the store reads throughout (its readers take either
    encoding, shard by shard); an interrupted conversion resumes where it stopped (converted shards
    are kept); the manifest, updated last, records ``feature_encoding`` and the new sizes. The
    folder name (the feature config's hash) does not change: the encoding is not part of it.

    Args:
        path: the store (as :func:`open_store` takes it: a folder or a bucket URI).
        progress: a progress bar on stderr.
    Returns:
        The converted store, opened.
    """
    info = open_store(path)
    folder = _Folder.at(info.path, info.filesystem)
    type_ = feature_type(info.manifest["feature_dtype"], info.manifest["feature_shape"])
    sizes, n_new = [], 0
    try:
        folder.prepare()
        for entry in tqdm(info.manifest["shards"], desc="convert", unit="shard", disable=not progress):
            size, rewritten = _convert_shard(folder, f"{entry['name']}.parquet", type_)
            sizes.append(size)
            n_new += rewritten
    except OSError as e:
        if folder.fs is None:
            raise
        raise DataError(f"{folder.location}: cannot convert the store ({_one_line(e)})") from None
    if n_new or info.encoding != ENCODING_TENSOR:
        shards = [{**entry, "bytes": size} for entry, size in zip(info.manifest["shards"], sizes, strict=True)]
        total = sum(sizes)
        rows = info.manifest["n_rows_total"]
        folder.write_json("manifest.json", {**info.manifest, "feature_encoding": ENCODING_TENSOR, "shards": shards,
                                            "bytes_total": total,
                                            "bytes_per_clip": round(total / rows, 1) if rows else None})
    log.info("store %s: %d of %d shards converted to the %s encoding", folder.location, n_new,
             len(info.shards), ENCODING_TENSOR)
    return open_store(info.path, filesystem=info.filesystem)


def replicate_store(src, out, n_rows: int, synth_fraction: float | None = None,
                    shard_rows: int = SHARD_ROWS) -> Path | str:
    """A store of `n_rows` rows in the format of `src` (its tensor encoding; a fixed-size-list `src`
    gives a tensor store), made by repeating its rows under fresh clip ids (`<clip>-rep<k>`: fold
    and room kept, so validation rooms and splits plan as in `src`).

    For sizing and benchmarks (memory, throughput, time to first batch at paper scale) without paper
    data: every row is a real row of `src`, repeated. `synth_fraction`: the share of rows from the
    synthetic splits (the paper's set: ~105 000 synthetic of ~121 000, 0.87); None keeps `src`'s
    proportions. Within a domain, splits keep their proportions in `src`. Written shard by shard
    (memory bounded by one shard), with the store's manifest last. `src` and `out` may be buckets.

    Returns:
        The new store folder `out/features-<hash>` (the same feature config and hash as `src`).
    """
    info = open_store(src)
    by_split = {}
    for entry, path in zip(info.manifest["shards"], info.shards, strict=True):
        by_split.setdefault(entry["split"], []).append(path)
    counts = {s: info.n_rows[s] for s in by_split}
    domain = {s: split_info(s)["domain"] for s in by_split}
    if synth_fraction is None:
        weights = {s: counts[s] / sum(counts.values()) for s in counts}
    else:  # synthetic train splits share synth_fraction, real splits the rest (train and test)
        role = {s: split_info(s)["role"] for s in by_split}
        weights = {}
        for group, frac in ((lambda s: domain[s] == "synthetic" and role[s] == "train", synth_fraction),
                            (lambda s: domain[s] == "real", 1.0 - synth_fraction)):
            total = sum(counts[s] for s in counts if group(s))
            weights.update({s: frac * counts[s] / total for s in counts if group(s) and total})
        # A synthetic test split (generated data only) keeps its size relative to the real test rows.
        real_test = sum(counts[s] for s in counts if domain[s] == "real" and role[s] == "test")
        scale = sum(weights[s] for s in counts if domain[s] == "real" and role[s] == "test") / max(real_test, 1)
        weights.update({s: counts[s] * scale for s in counts if domain[s] == "synthetic" and role[s] != "train"})
    targets = {s: int(round(n_rows * w)) for s, w in weights.items()}
    name = info.path.name if isinstance(info.path, Path) else info.path.rsplit("/", 1)[-1]
    folder = _Folder.at(out).sub(name)
    folder.prepare()
    for old in folder.names("shard-*.parquet"):
        folder.delete(old)
    type_ = feature_type(info.manifest["feature_dtype"], info.manifest["feature_shape"])
    shards = []
    for split, paths in by_split.items():
        table = pa.concat_tables([open_shard(p, info.filesystem).read() for p in paths])
        if not isinstance(table.schema.field("features").type, pa.FixedShapeTensorType):
            table = table.set_column(table.schema.get_field_index("features"), pa.field("features", type_),
                                     _as_tensor_column(table["features"], type_))
        meta = table.schema.metadata or {}
        clips = np.asarray(table["clip"].to_pylist(), dtype=object)
        for k, start in enumerate(range(0, targets[split], shard_rows)):
            pos = np.arange(start, min(start + shard_rows, targets[split]))
            part = table.take(pa.array(pos % table.num_rows))
            ids = [f"{clips[p % len(clips)]}-rep{p // len(clips):05d}" for p in pos]
            part = part.set_column(part.schema.get_field_index("clip"), "clip", pa.array(ids, pa.string()))
            shard = f"shard-{split}-{k:05d}"
            summary = {"name": shard, "split": split, "rows": len(pos), "skipped": {},
                       "sources_sha256": hashlib.sha256(f"{split}:{start}:{len(pos)}".encode()).hexdigest(),
                       "fingerprint": f"replicated from {info.path}"}
            part = part.replace_schema_metadata({**meta, _META_KEY: json.dumps(summary).encode()})
            size = folder.write_parquet(f"{shard}.parquet", part)
            shards.append({**{k2: summary[k2] for k2 in ("name", "split", "rows", "sources_sha256")}, "bytes": size})
    n_by_split = {s: targets[s] for s in by_split if targets[s]}
    total_bytes = sum(s["bytes"] for s in shards)
    manifest = {**info.manifest, "data_root": f"replicated from {info.path}", "n_rows": n_by_split,
                "feature_encoding": ENCODING_TENSOR,
                "n_rows_total": sum(n_by_split.values()), "bytes_total": total_bytes,
                "bytes_per_clip": round(total_bytes / max(1, sum(n_by_split.values())), 1),
                "shards": shards, "skipped": {}}
    folder.write_json("manifest.json", manifest)
    log.info("replicated %s to %s: %d rows (%s)", info.path, folder.location, manifest["n_rows_total"],
             ", ".join(f"{k} {v}" for k, v in n_by_split.items()))
    return folder.location
