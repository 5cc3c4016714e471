"""Where a training step's time goes: the Ray Train worker's stage-1 loop, replayed stand-alone.

    python bench/step_profile.py STORE [--preset local] [--batches 30] [--threads 2] [--random]

Builds what `train_loop_per_worker` builds (the stage-1 rows of the store, their targets, the
normalisation, the model, loss, augmenter, Adam at the stage-1 lr) without Ray, and times each phase
of every step: batch (row selection), prep (float16 -> normalised float32), augment, forward (+
loss), backward, clip (gradient clipping), step (optimizer). The first two steps are warm-up and not
counted. `--random` replaces the features by Gaussian noise (what a model-only benchmark feeds).
Compare its ms/batch with a run's `train/time_s` per epoch / batches per epoch.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from seld import data as seld_data
from seld.augment import Augmenter
from seld.config import preset_config
from seld.losses import build_loss
from seld.model import build_model
from seld.predict import prepare_batch
from seld.train import _seed_everything, _TrainSet

PHASES = ("batch", "prep", "augment", "forward", "backward", "clip", "step")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--preset", default="local")
    ap.add_argument("--batches", type=int, default=30, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--random", action="store_true", help="Gaussian-noise features instead of the store's")
    ap.add_argument("--bf16", action="store_true", help="forward under torch.autocast('cpu', bfloat16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = preset_config(args.preset)
    rows = seld_data.plan_rows(seld_data.read_index(args.store, cfg.features), cfg)
    table = pa.concat_tables([pq.read_table(p, columns=list(seld_data.ROW_COLUMNS))
                              for p in seld_data.shard_paths(args.store, cfg.features)])
    everything = seld_data.to_clip_batch({c: table[c].to_numpy(zero_copy_only=False) for c in seld_data.ROW_COLUMNS})
    tset = _TrainSet("stage1", cfg, 0, rows=seld_data.select(seld_data.concat([everything]), rows["stage1"]))
    mean, std = seld_data.norm_from_sums(tset.sums())
    _seed_everything(cfg.seed, 0)
    net = build_model(cfg.model, n_mels=cfg.features.n_mels).train()
    loss_fn = build_loss(cfg.loss, cfg.model.output_format)
    augment = Augmenter(cfg.augment)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.train.stage1.lr, weight_decay=cfg.train.stage1.weight_decay)
    gen = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(0)
    spent = dict.fromkeys(PHASES, 0.0)
    n_timed, epoch = 0, 0
    while n_timed < args.batches:
        batches = tset.batches(epoch, tset.n_batches(epoch))
        for i in range(tset.n_batches(epoch)):
            t = [time.perf_counter()]
            feats, targets = next(batches)
            if args.random:
                feats = rng.standard_normal(feats.shape).astype(feats.dtype)
            t.append(time.perf_counter())
            x, y = prepare_batch(feats, mean, std, "cpu"), torch.from_numpy(targets)
            t.append(time.perf_counter())
            x, y = augment(x, y, gen)
            t.append(time.perf_counter())
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                out = net(x)
            loss = loss_fn(out.float(), y)
            t.append(time.perf_counter())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t.append(time.perf_counter())
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.train.grad_clip)
            t.append(time.perf_counter())
            opt.step()
            t.append(time.perf_counter())
            if epoch == 0 and i < 2:
                continue
            for k, a, b in zip(PHASES, t[:-1], t[1:], strict=True):
                spent[k] += b - a
            n_timed += 1
            if n_timed >= args.batches:
                break
        epoch += 1
    per = {k: round(1000 * v / n_timed, 1) for k, v in spent.items()}
    total = sum(spent.values()) / n_timed
    print(json.dumps({"preset": args.preset, "threads": args.threads, "input": "random" if args.random else "store", "bf16": args.bf16,
                      "batch_size": cfg.train.batch_size, "ms_per_batch": round(1000 * total, 1),
                      "clips_per_s": round(cfg.train.batch_size / total, 1), "ms_by_phase": per}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
