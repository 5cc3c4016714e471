"""Paper-size training on one GPU, fed by the real data path: clips/s, data wait, MFU, host memory.

    python bench/gpu_pipeline.py SMOKE_STORE --rows 20000 --work /tmp/gpu --out result.json

What a Train worker does in an epoch, without Ray (Ray only places it): a store of `--rows` rows
(`seld.store.replicate_store` of SMOKE_STORE, paper proportions), planned as the driver plans it
(`seld.data.plan_run`), worker 0 of 1 reading its share held or streamed (`worker_sets`), and
`seld.train.train_epoch` (normalise, augment, bf16 step) on CUDA over `--batches` batches. Against
it, in the same process: the model alone, the same step on one batch already on the GPU (no data
path, no augmentation). Reports per model (`paper` Stereo-RCnet, Baseline-A at the official sizes)
and path: clips/s, the fraction of the epoch spent waiting for batches, achieved training FLOP/s
(3 x the forward FLOPs per clip, `seld.model.count_flops`) as a fraction of the measured bf16 matmul
peak (MFU), peak GPU memory, and the process's host memory (RSS and PSS). One JSON document.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seld import data as seld_data  # noqa: E402
from seld.augment import Augmenter  # noqa: E402
from seld.config import baseline_overrides, preset_config  # noqa: E402
from seld.losses import build_loss  # noqa: E402
from seld.model import count_flops  # noqa: E402
from seld.store import replicate_store  # noqa: E402
from seld.train import init_model, seed_epoch, stage_optimizer, train_epoch, train_step  # noqa: E402


def host_memory_mib() -> dict:
    """This process's RSS and PSS (MiB), from /proc/self/smaps_rollup (PSS counts shared pages once)."""
    out = {}
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                out[key.lower() + "_mib"] = round(int(rest.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak_bf16(device: str, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def model_only(cfg, batch, n_batches: int, device: str) -> float:
    """clips/s of the bf16 step alone on one batch resident on the device."""
    net = init_model(cfg).to(device).train()
    loss_fn = build_loss(cfg.loss, cfg.model.output_format).to(device)
    opt = stage_optimizer(net, cfg.train.stage1)
    x, y = batch
    for _ in range(5):
        train_step(net, loss_fn, opt, x, y, amp=True, grad_clip=cfg.train.grad_clip)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        train_step(net, loss_fn, opt, x, y, amp=True, grad_clip=cfg.train.grad_clip)
    sync(device)
    return n_batches * len(x) / (time.perf_counter() - t0)


def pipeline(cfg, store: Path, path: str, n_batches: int, device: str) -> dict:
    """The worker's data path into train_epoch on the device: set-up time, clips/s, data wait."""
    t0 = time.perf_counter()
    plan = dataclasses.replace(seld_data.plan_run(cfg, store), materialize=path == "held")
    train_sets = seld_data.worker_sets(cfg, plan, 0, 1).train_sets
    tset = train_sets[cfg.train.stage_numbers[0]]
    mean, std = seld_data.norm_from_sums(tset.sums())
    set_up = time.perf_counter() - t0
    net = init_model(cfg).to(device)
    loss_fn = build_loss(cfg.loss, cfg.model.output_format).to(device)
    opt = stage_optimizer(net, cfg.train.stage1)
    augment = Augmenter(cfg.augment)
    n = min(n_batches, tset.n_batches(0))
    warm = min(5, n)
    # Warm-up (CUDA context, kernels) on the first batches of epoch 1, then the measured epoch 0.
    train_epoch(net, loss_fn, opt, tset.batches(1, warm), mean=mean, std=std, device=device,
                augment=augment, gen=seed_epoch(cfg.seed, 0, 1, device), amp=True, grad_clip=cfg.train.grad_clip)
    sync(device)
    t1 = time.perf_counter()
    loss_sum, clips, wait, _ = train_epoch(net, loss_fn, opt, tset.batches(0, n), mean=mean, std=std,
                                           device=device, augment=augment, gen=seed_epoch(cfg.seed, 0, 0, device),
                                           amp=True, grad_clip=cfg.train.grad_clip)
    sync(device)
    dt = time.perf_counter() - t1
    return {"path": path, "set_up_s": round(set_up, 2), "batches": n, "clips": int(clips),
            "clips_per_s": round(clips / dt, 1), "data_wait_frac": round(wait / dt, 4),
            "held_gib": round(plan.held_bytes / 2**30, 3) if path == "held" else 0.0,
            **host_memory_mib()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", help="a feature store (e.g. the smoke store) to replicate")
    ap.add_argument("--rows", type=int, default=20_000, help="rows of the replicated store")
    ap.add_argument("--work", required=True, help="folder for the replicated store")
    ap.add_argument("--batches", type=int, default=150, help="measured batches per arm")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--read-threads", type=int, default=4, help="data.read_threads of the worker")
    ap.add_argument("--out", required=True, help="JSON result file")
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a quick check of the script)")
    ap.add_argument("--preset", default="paper", help="model sizes (paper; smoke for a quick check)")
    args = ap.parse_args()
    dev = args.device
    if dev == "cuda":
        assert torch.cuda.is_available(), "needs a CUDA device"
        torch.backends.cudnn.benchmark = True
    result: dict = {"gpu": torch.cuda.get_device_name(0) if dev == "cuda" else platform.processor(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "python": platform.python_version(), "arms": []}
    t0 = time.perf_counter()
    store = replicate_store(args.store, Path(args.work) / "store", args.rows, synth_fraction=0.87)
    result["store"] = {"rows": args.rows, "replicate_s": round(time.perf_counter() - t0, 1)}
    peak = matmul_peak_bf16(dev, 8192 if dev == "cuda" else 512, 20 if dev == "cuda" else 3)
    result["bf16_matmul_peak_tflops"] = round(peak / 1e12, 1)
    for model in ("stereo_rcnet", "baseline"):
        for bs in args.batch_sizes:
            over = {"train.batch_size": bs, "train.stages": "stage1", "data.read_threads": args.read_threads,
                    "train.amp_bf16": True, "train.use_gpu": dev == "cuda"}
            if model == "baseline":
                over = {**baseline_overrides(args.preset), **over}
            cfg = preset_config(args.preset, over)
            net = init_model(cfg)
            flops = count_flops(net, cfg.features.n_mels)
            x = torch.randn(bs, 2, 251, cfg.features.n_mels, device=dev)
            shape = (bs, 50, 6, 13, 4) if cfg.model.output_format == "multi_accdoa" else (bs, 50, 13, 4)
            y = torch.zeros(shape, device=dev)
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            alone = model_only(cfg, (x, y), args.batches, dev)
            arm = {"model": model, "batch_size": bs, "params": sum(p.numel() for p in net.parameters()),
                   "fwd_gflop_per_clip": round(flops / 1e9, 3), "model_only_clips_per_s": round(alone, 1),
                   "model_only_mfu": round(3 * flops * alone / peak, 4),
                   "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None,
                   "paths": []}
            for path in ("held", "streamed"):
                p = pipeline(cfg, store, path, args.batches, dev)
                p["mfu"] = round(3 * flops * p["clips_per_s"] / peak, 4)
                p["vs_model_only"] = round(p["clips_per_s"] / alone, 3)
                arm["paths"].append(p)
            result["arms"].append(arm)
            print(json.dumps(arm), flush=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
