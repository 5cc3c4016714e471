"""Benchmark: decoding the features column of a batch, fixed-size list (stores before) vs fixed-shape tensor.

Builds a store from --clips generated noise clips, replicates it to --rows rows
(`seld.store.replicate_store`), copies it with the features column as a fixed-size list (the
encoding of stores written before), and measures on both, in the same run, interleaved, one thread:
* `rowgroup`: what a row-group-engine worker does per row group (seld.data.StoreReader): read the
  group's features from Parquet and decode it to one (n, 2, 251, 64) array;
* `decode`: that decode step alone, on row groups already in memory (seld.store.decode_features);
* `ray_numpy`: what Ray Data does to hand a batch to `iter_batches(batch_format="numpy")` /
  `iter_torch_batches` (its block accessor's numpy conversion), plus the `np.stack` of per-row
  arrays that the fixed-size list needs to become one array.
Prints clips per CPU second (one thread: per core) and per wall second for each encoding, and the
tensor/list ratio (median of --repeats passes).
Run: PYTHONPATH=. .venv/bin/python bench/store_decode.py [--clips 64] [--rows 2048] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from seld import labels
from seld.config import FeatureConfig
from seld.store import build_store, decode_features, open_store, replicate_store

SR = 24_000


# How stores were written before the tensor encoding (seld/store.py at aa49798).
OLD_WRITER = {"use_dictionary": ["clip", "split", "domain", "role", "site"],
              "compression": {c: "none" if c == "features" else "snappy"
                              for c in ("clip", "split", "domain", "role", "site", "room", "fold", "features",
                                        "ev_frame", "ev_class", "ev_source", "ev_azimuth", "ev_distance")}}


def write_dataset(root: Path, n_clips: int) -> None:
    """n 5-s stereo noise clips with a few random events (content does not matter for decoding)."""
    rng = np.random.default_rng(0)
    for i in range(n_clips):
        stem = f"fold3_room{1 + i % 5}_mix{i:03d}"
        wav = root / "stereo_dev" / "dev-train-tau" / f"{stem}.wav"
        wav.parent.mkdir(parents=True, exist_ok=True)
        sf.write(wav, (0.1 * rng.standard_normal((5 * SR, 2))).astype(np.float32), SR, subtype="PCM_16")
        events = [(int(rng.integers(0, 50)), int(rng.integers(0, 13)), 0, 30, 200, 0) for _ in range(5)]
        labels.write_csv(root / "metadata_dev" / "dev-train-tau" / f"{stem}.csv", labels.make_events(events))


def to_list_encoding(folder: Path) -> None:
    """Rewrite a store's shards with the features column as a flat fixed-size list (same row groups)."""
    for path in sorted(folder.glob("shard-*.parquet")):
        f = pq.ParquetFile(path)
        groups = [f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)]
        table = f.read()
        col = table["features"]
        flat = pa.chunked_array([c.storage for c in col.chunks], col.type.storage_type)
        table = table.set_column(table.schema.get_field_index("features"), "features", flat)
        del f
        with pq.ParquetWriter(path, table.schema, **OLD_WRITER) as w:
            start = 0
            for n in groups:
                w.write_table(table.slice(start, n), row_group_size=n)
                start += n


def groups_of(shards) -> list[tuple[str, int]]:
    return [(str(p), g) for p in shards for g in range(pq.ParquetFile(p).metadata.num_row_groups)]


def rowgroup_pass(groups, shape) -> int:
    n = 0
    for path, g in groups:
        table = pq.ParquetFile(path).read_row_group(g, columns=["features"], use_threads=False)
        n += len(decode_features(table["features"], shape))
    return n


def decode_pass(tables, shape) -> int:
    return sum(len(decode_features(t["features"], shape)) for t in tables)


def ray_numpy_pass(tables, shape) -> int:
    from ray.data.block import BlockAccessor

    n = 0
    for t in tables:
        x = BlockAccessor.for_block(t).to_batch_format("numpy")["features"]
        if x.dtype == object:  # one array per row: stacked (and reshaped) into the batch
            x = np.stack(x).reshape(len(x), *shape)
        assert x.shape == (t.num_rows, *shape)
        n += len(x)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=64, help="clips of the generated dataset")
    ap.add_argument("--rows", type=int, default=2048, help="rows of the replicated store")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    res: dict = {"rows": args.rows, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_dataset(root, args.clips)
        src = build_store(root, Path(tmp) / "src", FeatureConfig(), n_procs=2)
        stores = {"tensor": Path(replicate_store(src, Path(tmp) / "tensor", args.rows))}
        stores["list"] = Path(replicate_store(src, Path(tmp) / "list", args.rows))
        to_list_encoding(stores["list"])
        shape = tuple(open_store(stores["tensor"]).manifest["feature_shape"])
        groups = {k: groups_of(open_store(s).shards) for k, s in stores.items()}
        tables = {k: [pq.ParquetFile(p).read_row_group(g, columns=["features"]) for p, g in gs]
                  for k, gs in groups.items()}
        res["batch_rows"] = tables["tensor"][0].num_rows
        passes = {"rowgroup": lambda k: rowgroup_pass(groups[k], shape),
                  "decode": lambda k: decode_pass(tables[k], shape),
                  "ray_numpy": lambda k: ray_numpy_pass(tables[k], shape)}
        cpu: dict = {(p, k): [] for p in passes for k in stores}
        wall: dict = {(p, k): [] for p in passes for k in stores}
        for fn in passes.values():  # warm-up (imports, file cache), not timed
            for k in stores:
                fn(k)
        for _ in range(args.repeats):
            for p, fn in passes.items():
                for k in stores:  # interleaved: both encodings see the same machine load
                    t0, c0 = time.perf_counter(), time.process_time()
                    n = fn(k)
                    cpu[(p, k)].append(time.process_time() - c0)
                    wall[(p, k)].append(time.perf_counter() - t0)
                    assert n == args.rows
        for p in passes:
            for k in stores:
                # CPU time of this one-threaded process: clips per core, less sensitive to other
                # processes than wall time on a shared machine (both reported).
                res[f"{p}_{k}_clips_per_cpu_s"] = args.rows / max(statistics.median(cpu[(p, k)]), 1e-9)
                res[f"{p}_{k}_clips_per_wall_s"] = args.rows / statistics.median(wall[(p, k)])
            res[f"{p}_tensor_over_list_cpu"] = res[f"{p}_tensor_clips_per_cpu_s"] / res[f"{p}_list_clips_per_cpu_s"]
    for k, v in res.items():
        print(f"{k:34s} {v:.4g}" if isinstance(v, float) else f"{k:34s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
