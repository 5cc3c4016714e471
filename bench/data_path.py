"""The training data path alone: clips/s delivered as ready torch batches to a step that does nothing.

    python bench/data_path.py STORE [--cpus 1 2] [--formats accdoa multi_accdoa] [--paths held streamed]
                              [--batches 200] [--workers 2]

For each CPU count N (the process pinned to N cores with sched_setaffinity; N reading threads,
`data.read_threads`, and one torch thread for the tensor conversion), output format and path (the share held in memory, or streamed from
Parquet by row group), worker 0 of `--workers` does what a Train worker does before its step: plan
(driver), read its share or nothing (`seld.data.worker_sets`), normalisation sums, then batches from
`TrainSet.batches` (reading threads: read, gather, encode targets) turned into normalised float32
tensors (`seld.predict.prepare_batch`) and target tensors. Reports per arm: time to the first batch
from the start of the worker's set-up, clips/s over `--batches` batches after it, and clips/s per
CPU. Preset `smoke` (batch 32 as `local`), stage 1, seed 0. Results as one JSON line per arm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

from seld import data as seld_data
from seld.config import preset_config
from seld.predict import prepare_batch


def run_arm(store: str, fmt: str, path: str, n_batches: int, workers: int, batch_size: int,
            threads: int) -> dict:
    cfg = preset_config("smoke", {"model.output_format": fmt, "train.stages": "stage1",
                                  "train.num_workers": workers, "train.batch_size": batch_size,
                                  "data.read_threads": threads})
    t0 = time.perf_counter()
    plan = dataclasses.replace(seld_data.plan_run(cfg, store), materialize=path == "held")
    t_plan = time.perf_counter() - t0
    t1 = time.perf_counter()
    train_sets = seld_data.worker_sets(cfg, plan, 0, workers).train_sets
    tset = train_sets[1]
    mean, std = seld_data.norm_from_sums(tset.sums())
    t_ready = time.perf_counter() - t1
    delivered, t_first, epoch = 0, None, 0
    t_start = None
    while delivered < n_batches + 1:
        n = tset.n_batches(epoch)
        for feats, targets in tset.batches(epoch, n):
            x = prepare_batch(feats, mean, std, "cpu")
            y = torch.from_numpy(targets)
            del x, y
            if t_first is None:
                t_first = time.perf_counter() - t1
                t_start = time.perf_counter()
            delivered += 1
            if delivered >= n_batches + 1:
                break
        epoch += 1
    dt = time.perf_counter() - t_start
    clips = n_batches * batch_size
    return {"format": fmt, "path": path, "plan_s": round(t_plan, 2), "set_up_s": round(t_ready, 2),
            "first_batch_s": round(t_first, 2), "clips_per_s": round(clips / dt, 1),
            "share_rows": len(tset.rows), "epochs_touched": epoch + 1}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--formats", nargs="+", default=["accdoa", "multi_accdoa"])
    ap.add_argument("--paths", nargs="+", default=["held", "streamed"], choices=["held", "streamed"])
    ap.add_argument("--batches", type=int, default=200, help="timed batches per arm (after the first)")
    ap.add_argument("--workers", type=int, default=2, help="the run's workers (this measures worker 0)")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    for n_cpus in args.cpus:
        os.sched_setaffinity(0, cores[:n_cpus])
        torch.set_num_threads(1)  # the step does nothing: the CPUs are the data path's
        for fmt in args.formats:
            for path in args.paths:
                out = run_arm(args.store, fmt, path, args.batches, args.workers, args.batch_size, n_cpus)
                out.update(cpus=n_cpus, clips_per_s_per_cpu=round(out["clips_per_s"] / n_cpus, 1))
                print(json.dumps(out), flush=True)
    os.sched_setaffinity(0, cores)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
