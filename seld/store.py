"""Parquet feature store: a DCASE2025-layout dataset -> one row per 5-s clip (log-mel + raw events).

Reads `DATA/stereo_dev/<split>/*.wav` with `DATA/metadata_dev/<split>/*.csv` (and
`DATA/stereo_eval/eval/*.wav`, no labels) and writes `OUT/features-<hash>/shard-<split>-NNNNN.parquet`
plus `manifest.json`, where <hash> is the hash of the FeatureConfig. Features are (2, 251, 64) dB
at 20 ms frames, stored flat (C order) as a fixed-size list in `FeatureConfig.store_dtype`; events
keep the CSV's 100 ms frames, azimuth in degrees and distance in cm. See docs/CONTRACT.md.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from seld import labels
from seld.config import LABEL_HOP_S, SPLITS, FeatureConfig, config_hash, from_dict, to_dict
from seld.errors import DataError, UserError
from seld.runfolder import atomic_write, temp_glob, write_json_atomic

log = logging.getLogger(__name__)

STORE_FORMAT = 1  # bump when the row layout changes (part of every shard's fingerprint)
SHARD_ROWS = 512  # clips per shard: 16 MB at float16, a good Ray Data block; the unit of resume
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
    """An opened store: ``path`` (the hashed folder), ``manifest`` (dict), ``shards`` (paths),
    ``hash`` (feature config hash), ``config`` (FeatureConfig), ``n_rows`` per split,
    ``skipped`` input files ({path: reason})."""

    path: Path
    manifest: dict
    shards: tuple[Path, ...]
    hash: str
    config: FeatureConfig
    n_rows: dict
    skipped: dict


class StoreIncomplete(DataError):
    """Some input files were unreadable; the store holds every other clip. ``skipped``: {file: reason}."""

    def __init__(self, path: Path, skipped: dict[str, str]):
        self.path, self.skipped = path, dict(skipped)
        lines = "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
        super().__init__(f"{len(skipped)} input file(s) skipped, store {path} holds the others "
                         f"(fix them and rerun; finished shards are kept): {lines}")


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
def _schema(cfg: FeatureConfig, n_features: int) -> pa.Schema:
    value = pa.float16() if cfg.store_dtype == "float16" else pa.float32()
    ints, floats = pa.list_(pa.int32()), pa.list_(pa.float64())
    return pa.schema([
        ("clip", pa.string()), ("split", pa.string()), ("domain", pa.string()), ("role", pa.string()),
        ("site", pa.string()), ("room", pa.int32()), ("fold", pa.int32()),
        ("features", pa.list_(value, n_features)),
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


def extract_shard(job: ShardJob, cfg: FeatureConfig, out_dir: str) -> dict:
    """Compute one shard and write it atomically (temporary name, then rename).

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
    n_features = 2 * (1 + int(round(cfg.clip_s * cfg.sample_rate_hz)) // cfg.hop_length) * cfg.n_mels
    flat = np.concatenate(feats) if feats else np.zeros((0, n_features), store_np)
    schema = _schema(cfg, flat.shape[1])
    ev = rows["ev"]
    table = pa.table({
        "clip": rows["clip"], "split": [job.split] * n, "domain": [info["domain"]] * n,
        "role": [info["role"]] * n, "site": [info["site"]] * n,
        "room": pa.array(rows["room"], pa.int32()), "fold": pa.array(rows["fold"], pa.int32()),
        "features": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1]),
        "ev_frame": [e["frame"].tolist() for e in ev], "ev_class": [e["class"].tolist() for e in ev],
        "ev_source": [e["source"].tolist() for e in ev], "ev_azimuth": [e["azimuth"].tolist() for e in ev],
        "ev_distance": [e["distance"].tolist() for e in ev],
    }, schema=schema)
    summary = {"name": job.name, "split": job.split, "rows": n, "sources_sha256": digest.hexdigest(),
               "skipped": skipped, "fingerprint": job.fingerprint}
    table = table.replace_schema_metadata({_META_KEY: json.dumps(summary).encode()})
    final = Path(out_dir) / f"{job.name}.parquet"
    with atomic_write(final) as tmp:
        pq.write_table(table, tmp, row_group_size=64, use_dictionary=["clip", "split", "domain", "role", "site"],
                       compression={"features": "none", **{c: "snappy" for c in schema.names if c != "features"}})
    summary["bytes"] = final.stat().st_size
    return summary


def _finished(path: Path, job: ShardJob) -> dict | None:
    """The summary of an existing shard written from the same inputs and settings, else None."""
    try:
        meta = pq.read_schema(path).metadata or {}
        summary = json.loads(meta[_META_KEY])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None
    if summary.get("fingerprint") != job.fingerprint:
        return None
    summary["bytes"] = path.stat().st_size
    return summary


# --- Public API ------------------------------------------------------------------------------------
def store_folder(out: str | Path, cfg: FeatureConfig) -> Path:
    """`out/features-<hash>` for a feature config."""
    return Path(out) / f"features-{config_hash(cfg)}"


def build_store(data_root, out, cfg: FeatureConfig | None = None, splits=None, n_procs: int | None = None,
                progress: bool = False, shard_rows: int = SHARD_ROWS) -> Path:
    """Extract features of every clip of a DCASE2025-layout dataset into a Parquet store.

    Args:
        data_root: dataset root (`stereo_dev/<split>/*.wav`, `metadata_dev/<split>/*.csv`, optional
            `stereo_eval/eval/*.wav`).
        out: store root; the store is `out/features-<hash of cfg>/`.
        cfg: feature settings (default: the official recipe, float16 storage).
        splits: split folder names to include (default: all known ones present).
        n_procs: parallel workers (threads with one torch thread each; default: CPU count, at most
            the number of shards to compute).
        progress: progress bar on stderr.
        shard_rows: clips per shard.

    Returns:
        The store folder. Shards whose inputs and settings are unchanged are kept from an earlier
        (possibly interrupted) run; shards are written under a temporary name and renamed, so a
        visible shard is always complete. `manifest.json` is written last.

    Raises:
        StoreIncomplete: some inputs were unreadable; every other clip is in the store, the manifest
            lists the skipped files.
    """
    cfg = cfg or FeatureConfig()
    t0 = time.perf_counter()
    sources = find_clips(data_root, splits)
    jobs = plan_shards(sources, cfg, shard_rows)
    folder = store_folder(out, cfg)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(temp_glob()):
        stale.unlink(missing_ok=True)  # left by an interrupted run
    planned = {f"{j.name}.parquet" for j in jobs}
    for old in folder.glob("shard-*.parquet"):
        if old.name not in planned:
            log.info("removing %s: not part of this dataset's plan", old)
            old.unlink()
    (folder / "manifest.json").unlink(missing_ok=True)  # rewritten when every shard is done

    summaries: dict[str, dict] = {}
    todo = []
    for job in jobs:
        done = _finished(folder / f"{job.name}.parquet", job)
        if done is not None:
            summaries[job.name] = done
        else:
            todo.append(job)
    if summaries:
        log.info("%s: %d of %d shards already done", folder, len(summaries), len(jobs))
    n_procs = max(1, min(n_procs or os.cpu_count() or 1, len(todo)))
    bar = tqdm(total=sum(len(j.sources) for j in todo), desc="features", unit="clip", disable=not progress or not todo)
    if n_procs == 1:
        for job in todo:
            summaries[job.name] = extract_shard(job, cfg, str(folder))
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
                futures = {pool.submit(extract_shard, job, cfg, str(folder)): job for job in todo}
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
    n_mels = cfg.n_mels
    manifest = {
        "format": STORE_FORMAT,
        "hash": config_hash(cfg),
        "feature_config": to_dict(cfg),
        "feature_shape": [2, 1 + int(round(cfg.clip_s * cfg.sample_rate_hz)) // cfg.hop_length, n_mels],
        "feature_dtype": cfg.store_dtype,
        "data_root": str(Path(data_root).resolve()),
        "n_rows": n_rows,
        "n_rows_total": total_rows,
        "bytes_total": total_bytes,
        "bytes_per_clip": round(total_bytes / total_rows, 1) if total_rows else None,
        "shards": [{k: s[k] for k in ("name", "split", "rows", "bytes", "sources_sha256")} for s in ordered],
        "skipped": skipped,
    }
    write_json_atomic(folder / "manifest.json", manifest)
    dt = time.perf_counter() - t0
    n_new = sum(len(j.sources) for j in todo)
    if skipped:  # one line says it all (what was stored and what was not)
        raise StoreIncomplete(folder, skipped)
    log.info("store %s: %d rows (%s), %d computed in %.1f s (%.0f clips/s), %.0f bytes/clip", folder, total_rows,
             ", ".join(f"{k} {v}" for k, v in n_rows.items()), n_new, dt, n_new / dt if dt else 0,
             manifest["bytes_per_clip"] or 0)
    return folder


def open_store(path, cfg: FeatureConfig | None = None) -> StoreInfo:
    """Open a store written by :func:`build_store`.

    Args:
        path: the hashed folder `features-<hash>` or the `out` folder holding it.
        cfg: if given, the store must have been written with exactly this feature config.

    Raises:
        DataError: no store there, an incomplete one (no manifest), a missing shard, a store with
            another feature config, or several stores under `path` and no cfg to choose.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no feature store folder; run `seld features DATA --out {path}`")
    if not (path / "manifest.json").is_file() and not list(path.glob("shard-*.parquet")):
        candidates = sorted(p for p in path.glob("features-*") if p.is_dir())
        if cfg is not None:
            want = store_folder(path, cfg)
            if want not in candidates:
                raise DataError(f"{path}: no store for this feature config (features-{config_hash(cfg)}); "
                                f"found {[c.name for c in candidates] or 'none'}; run `seld features`")
            path = want
        elif len(candidates) == 1:
            path = candidates[0]
        elif not candidates:
            raise DataError(f"{path}: no features-<hash>/ store inside; run `seld features DATA --out {path}`")
        else:
            raise DataError(f"{path}: several stores ({', '.join(c.name for c in candidates)}); "
                            "pass the one to use")
    mf = path / "manifest.json"
    if not mf.is_file():
        raise DataError(f"{path}: incomplete store (no manifest.json; interrupted?); rerun `seld features` "
                        "to finish it")
    try:
        manifest = json.loads(mf.read_text())
        stored_cfg = from_dict(FeatureConfig, manifest["feature_config"])
    except (ValueError, KeyError) as e:
        raise DataError(f"{mf}: unreadable manifest ({e})") from None
    if cfg is not None and config_hash(cfg) != manifest["hash"]:
        diff = [f"{f.name}: store {getattr(stored_cfg, f.name)!r} vs wanted {getattr(cfg, f.name)!r}"
                for f in dataclasses.fields(cfg) if getattr(stored_cfg, f.name) != getattr(cfg, f.name)]
        raise DataError(f"{path}: written with another feature config ({'; '.join(diff)}); "
                        "run `seld features` with this config (it writes a new features-<hash> folder)")
    shards = tuple(path / f"{s['name']}.parquet" for s in manifest["shards"])
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise DataError(f"{path}: shards listed in the manifest are missing: {', '.join(missing)}")
    return StoreInfo(path, manifest, shards, manifest["hash"], stored_cfg, dict(manifest["n_rows"]),
                     dict(manifest.get("skipped", {})))


def replicate_store(src, out, n_rows: int, synth_fraction: float | None = None,
                    shard_rows: int = SHARD_ROWS) -> Path:
    """A store of `n_rows` rows in the exact format of `src`, made by repeating its rows under fresh
    clip ids (`<clip>-rep<k>`: fold and room kept, so validation rooms and splits plan as in `src`).

    For sizing and benchmarks (memory, throughput, time to first batch at paper scale) without paper
    data: every row is a real row of `src`, repeated. `synth_fraction`: the share of rows from the
    synthetic splits (the paper's set: ~105 000 synthetic of ~121 000, 0.87); None keeps `src`'s
    proportions. Within a domain, splits keep their proportions in `src`. Written shard by shard
    (memory bounded by one shard), with the store's manifest last.

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
    folder = Path(out) / info.path.name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("shard-*.parquet"):
        old.unlink()
    shards = []
    for split, paths in by_split.items():
        table = pa.concat_tables([pq.read_table(p) for p in paths])
        meta = table.schema.metadata or {}
        clips = np.asarray(table["clip"].to_pylist(), dtype=object)
        for k, start in enumerate(range(0, targets[split], shard_rows)):
            pos = np.arange(start, min(start + shard_rows, targets[split]))
            part = table.take(pa.array(pos % table.num_rows))
            ids = [f"{clips[p % len(clips)]}-rep{p // len(clips):05d}" for p in pos]
            part = part.set_column(part.schema.get_field_index("clip"), "clip", pa.array(ids, pa.string()))
            name = f"shard-{split}-{k:05d}"
            summary = {"name": name, "split": split, "rows": len(pos), "skipped": {},
                       "sources_sha256": hashlib.sha256(f"{split}:{start}:{len(pos)}".encode()).hexdigest(),
                       "fingerprint": f"replicated from {info.path}"}
            part = part.replace_schema_metadata({**meta, _META_KEY: json.dumps(summary).encode()})
            final = folder / f"{name}.parquet"
            with atomic_write(final) as tmp:
                pq.write_table(part, tmp, row_group_size=64,
                               use_dictionary=["clip", "split", "domain", "role", "site"],
                               compression={"features": "none",
                                            **{c: "snappy" for c in part.schema.names if c != "features"}})
            shards.append({**{k2: summary[k2] for k2 in ("name", "split", "rows", "sources_sha256")},
                           "bytes": final.stat().st_size})
    n_by_split = {s: targets[s] for s in by_split if targets[s]}
    total_bytes = sum(s["bytes"] for s in shards)
    manifest = {**info.manifest, "data_root": f"replicated from {info.path}", "n_rows": n_by_split,
                "n_rows_total": sum(n_by_split.values()), "bytes_total": total_bytes,
                "bytes_per_clip": round(total_bytes / max(1, sum(n_by_split.values())), 1),
                "shards": shards, "skipped": {}}
    write_json_atomic(folder / "manifest.json", manifest)
    log.info("replicated %s to %s: %d rows (%s)", info.path, folder, manifest["n_rows_total"],
             ", ".join(f"{k} {v}" for k, v in n_by_split.items()))
    return folder
