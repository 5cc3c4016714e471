"""The two ingest engines side by side: clips/s per core delivered to a step that does nothing.

    python bench/ingest.py STORE [--formats accdoa multi_accdoa] [--paths held streamed]
                           [--engines rowgroups ray_data] [--epochs 3] [--num-cpus 4]

One process starts a local Ray (`--num-cpus` logical CPUs, loopback) and, for each output format,
path (the share held once: rows in memory / Ray Data materialised; or streamed: read again every
epoch) and engine, back to back, does what worker 0 of one Train worker does: the driver's plan
(`seld.data.plan_run`), the worker's set-up (row groups: `worker_sets`; Ray Data: `ray_datasets` in
`ray_data_context`, materialised when held, then `RayTrainSet` over the dataset's iterator, as a
Train worker gets it from `get_dataset_shard`), the normalisation sums, then `--epochs` epochs of
`batches()` turned into normalised float32 tensors and target tensors. Per arm: set-up time, time
to the first batch of each epoch (per-epoch start-up), clips/s, and clips per CPU-second of the
whole process tree (this process and every Ray process under it, idle daemons included): the
"clips/s per core". Preset `smoke` with batch 32 (as `local`), stage 1, seed 0. One JSON line per
arm. The machine is shared: compare arms of one invocation, not invocations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch
from proctree import tree_cpu_s  # bench/proctree.py

from seld import data as seld_data
from seld.config import preset_config
from seld.predict import prepare_batch


def run_arm(store: str, fmt: str, path: str, engine: str, epochs: int, batch_size: int) -> dict:
    cfg = preset_config("smoke", {"model.output_format": fmt, "train.stages": "stage1", "train.num_workers": 1,
                                  "train.batch_size": batch_size, "data.engine": engine})
    t0 = time.perf_counter()
    plan = dataclasses.replace(seld_data.plan_run(cfg, store), materialize=path == "held")
    t_plan = time.perf_counter() - t0
    t1 = time.perf_counter()
    if engine == "rowgroups":
        tset = seld_data.worker_sets(cfg, plan, 0, 1).train_sets[1]
    else:
        with seld_data.ray_data_context(cfg):
            datasets = seld_data.ray_datasets(cfg, plan)
        tset = seld_data.RayTrainSet("stage1", cfg, 0, plan.shares[0]["stage1"], plan.layout,
                                     seld_data.train_dataset_name(1, 0), shards=lambda n: datasets[n].iterator())
    mean, std = seld_data.norm_from_sums(tset.sums())
    t_ready = time.perf_counter() - t1
    rows = []
    for epoch in range(epochs):
        n = tset.n_batches(epoch)
        cpu0, t_epoch = tree_cpu_s(), time.perf_counter()
        first, clips = None, 0
        for feats, targets in tset.batches(epoch, n):
            x = prepare_batch(feats, mean, std, "cpu")
            y = torch.from_numpy(targets)
            clips += len(x)
            del x, y
            if first is None:
                first = time.perf_counter() - t_epoch
        wall, cpu = time.perf_counter() - t_epoch, tree_cpu_s() - cpu0
        rows.append({"epoch": epoch, "first_batch_s": first, "clips": clips, "wall_s": wall, "cpu_s": cpu})
    steady = rows[1:] or rows  # epoch 0 may still warm Ray's worker pool
    clips = sum(r["clips"] for r in steady)
    wall = sum(r["wall_s"] for r in steady)
    cpu = sum(r["cpu_s"] for r in steady)
    return {"engine": engine, "format": fmt, "path": path, "rows": len(tset.rows), "plan_s": round(t_plan, 2),
            "set_up_s": round(t_ready, 2), "first_batch_s": [round(r["first_batch_s"], 3) for r in rows],
            "epoch_s": [round(r["wall_s"], 2) for r in rows], "clips_per_s": round(clips / wall, 1),
            "cpu_cores_used": round(cpu / wall, 2), "clips_per_cpu_s": round(clips / cpu, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--formats", nargs="+", default=["accdoa", "multi_accdoa"])
    ap.add_argument("--paths", nargs="+", default=["held", "streamed"], choices=["held", "streamed"])
    ap.add_argument("--engines", nargs="+", default=["rowgroups", "ray_data"], choices=["rowgroups", "ray_data"])
    ap.add_argument("--epochs", type=int, default=3, help="epochs per arm (the first is reported apart)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from seld.study.session import init_ray

    init_ray(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    torch.set_num_threads(1)  # the step does nothing: the CPUs are the data path's
    for fmt in args.formats:
        for path in args.paths:
            for engine in args.engines:
                print(json.dumps(run_arm(args.store, fmt, path, engine, args.epochs, args.batch_size)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
