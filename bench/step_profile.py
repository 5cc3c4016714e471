"""Where a training step's time goes: the Ray Train worker's stage-1 loop, replayed stand-alone.

    python bench/step_profile.py STORE [--preset local] [--batches 30] [--threads 2] [--random]
                                       [--precision auto|bf16|float32|both] [--baseline] [--val]

Builds what `train_loop_per_worker` builds (the stage-1 rows of the store, their targets, the
normalisation, the model, loss, augmenter, Adam at the stage-1 lr) without Ray, and runs the
worker's own step (`seld.train.train_step`), timing each phase of every step: batch (row
selection), prep (float16 -> normalised float32), augment, forward (+ loss), backward, clip
(gradient clipping), step (optimizer). The first two steps are warm-up and not
counted. `--random` replaces the features by Gaussian noise (what a model-only benchmark feeds).
`--precision both` runs a bf16-autocast model and a float32 one (same initial weights) step by step
on the same batches, alternating which goes first, and reports the median per-step ratio: the
host's speed drifts by 10-25 % within minutes, a ratio of interleaved steps does not.
Compare its ms/batch with a run's `train/time_s` per epoch / batches per epoch. `--val` also times
one validation pass per arm (`seld.train.validate` on the worker's validation rows, best of 3),
what a run's `val/time_s` column holds besides the selection's model file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from seld import data as seld_data
from seld.augment import Augmenter
from seld.config import BASELINE_OVERRIDES, preset_config
from seld.losses import build_loss
from seld.predict import bf16_autocast, prepare_batch
from seld.train import init_model, stage_optimizer, train_step, validate

PHASES = ("batch", "prep", "augment", "forward", "backward", "clip", "step")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--preset", default="local")
    ap.add_argument("--batches", type=int, default=30, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", action="store_true", help="Baseline-A (its own overrides) instead of Stereo-RCnet")
    ap.add_argument("--val", action="store_true", help="also time one validation pass per arm")
    ap.add_argument("--random", action="store_true", help="Gaussian-noise features instead of the store's")
    ap.add_argument("--precision", choices=("auto", "bf16", "float32", "both"), default="auto",
                    help="auto: what the worker does (seld.predict.bf16_autocast: bf16 on CPUs with AMX); "
                         "both: bf16 and float32 steps interleaved on the same batches, with their ratio")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = preset_config(args.preset, BASELINE_OVERRIDES if args.baseline else None)
    if args.precision == "both":
        arms = (True, False)
    elif args.precision == "auto":
        arms = (bf16_autocast("cpu", cfg.train.amp_bf16),)
    else:
        arms = (args.precision == "bf16",)
    plan = dataclasses.replace(seld_data.plan_run(cfg, args.store), materialize=True)  # one worker, share held
    sets = seld_data.worker_sets(cfg, plan, 0, 1)
    tset = sets.train_sets[1]
    mean, std = seld_data.norm_from_sums(tset.sums())
    loss_fn = build_loss(cfg.loss, cfg.model.output_format)
    augment = Augmenter(cfg.augment)
    models = {}
    for bf16 in arms:  # the same initial weights for every arm
        net = init_model(cfg).train()
        models[bf16] = (net, stage_optimizer(net, cfg.train.stage1))
    gen = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(0)
    spent = {bf16: dict.fromkeys(PHASES, 0.0) for bf16 in arms}
    steps: dict[bool, list[float]] = {bf16: [] for bf16 in arms}
    n_timed, epoch = 0, 0
    while n_timed < args.batches:
        batches = tset.batches(epoch, tset.n_batches(epoch))
        for i in range(tset.n_batches(epoch)):
            t0 = time.perf_counter()
            feats, targets = next(batches)
            if args.random:
                feats = rng.standard_normal(feats.shape).astype(feats.dtype)
            t1 = time.perf_counter()
            x, y = prepare_batch(feats, mean, std, "cpu"), torch.from_numpy(targets)
            t2 = time.perf_counter()
            x, y = augment(x, y, gen)
            t3 = time.perf_counter()
            data = dict(zip(PHASES[:3], (t1 - t0, t2 - t1, t3 - t2), strict=True))
            order = arms if n_timed % 2 == 0 else arms[::-1]  # alternate which arm goes first
            for bf16 in order:
                net, opt = models[bf16]
                t = [time.perf_counter()]
                train_step(net, loss_fn, opt, x, y, amp=bf16, grad_clip=cfg.train.grad_clip,
                           on_phase=lambda _phase, t=t: t.append(time.perf_counter()))
                if epoch == 0 and i < 2:
                    continue
                phases = {**data, **dict(zip(PHASES[3:], np.diff(t), strict=True))}
                for k, v in phases.items():
                    spent[bf16][k] += v
                steps[bf16].append(sum(phases.values()))
            if epoch == 0 and i < 2:
                continue
            n_timed += 1
            if n_timed >= args.batches:
                break
        epoch += 1
    out = {"preset": args.preset, "model": cfg.model.name, "threads": args.threads, "input": "random" if args.random else "store",
           "batch_size": cfg.train.batch_size, "timed_steps": n_timed}
    for bf16 in arms:
        total = float(np.median(steps[bf16]))
        out["bf16" if bf16 else "float32"] = {
            "ms_per_batch_median": round(1000 * total, 1), "clips_per_s": round(cfg.train.batch_size / total, 1),
            # an epoch is the sum of its steps: the mean, not the median, is what it costs per step
            "ms_per_batch_mean": round(1000 * float(np.mean(steps[bf16])), 1),
            "ms_by_phase_mean": {k: round(1000 * v / n_timed, 1) for k, v in spent[bf16].items()}}
    if args.val:
        for bf16 in arms:
            net = models[bf16][0]
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                validate(net, sets.val_mine, mean, std, cfg, "cpu", bf16)
                best = min(best, time.perf_counter() - t0)
            out["bf16" if bf16 else "float32"]["val_s"] = round(best, 2)
        out["val_clips"] = len(sets.val_mine)
        out["batches_per_epoch"] = tset.n_batches(0)
    if len(arms) == 2:  # per-step pairs: the host's drift cancels
        out["float32_over_bf16_median"] = round(float(np.median(np.array(steps[False]) / np.array(steps[True]))), 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
