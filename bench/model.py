"""Training throughput of Stereo-RCnet and Baseline-A (clips/s for forward + backward + optimiser
step, the optimiser the training builds: Adam with L2 weight decay, seld.train.stage_optimizer),
FLOPs per clip and achieved FLOP/s against the machine's measured matmul peak.

    .venv/bin/python bench/model.py                          # CPU: local and paper sizes, variants
    python bench/model.py --device cuda --amp bf16 --presets paper --out bench_gpu.json

On CPU it also measures what makes training fast (threads, channels-last, torch.compile, fused
Adam) for the local Stereo-RCnet, against the plain run measured in the same process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seld.config import BASELINE_OVERRIDES, apply_overrides, preset_config  # noqa: E402
from seld.model import build_model, count_flops  # noqa: E402
from seld.train import stage_optimizer  # noqa: E402

log = logging.getLogger("bench.model")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, n: int, seconds: float = 1.0) -> float:
    """Measured FLOP/s of square n x n matrix products (the machine's practical peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        if device == "cuda" and reps % 20:
            continue
        sync(device)
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def model_cfg(preset: str, name: str):
    cfg = preset_config(preset).model
    if name == "baseline":
        cfg = apply_overrides(cfg, {k[6:]: v for k, v in BASELINE_OVERRIDES.items() if k.startswith("model.")})
    return cfg


def throughput(cfg, stage, device: str, batch: int, steps: int, warmup: int, amp: str | None = None,
               channels_last: bool = False, compile_model: bool = False, fused_adam: bool = False) -> float:
    """Clips per second of full training steps (forward, MSE-style loss, backward, optimiser step).

    Args:
        cfg: the model config; stage: the StageConfig whose optimiser the training builds
            (:func:`seld.train.stage_optimizer`); fused_adam: that optimiser with ``fused=True``.
    """
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = stage_optimizer(model, stage)
    if fused_adam:  # the same optimiser and hyper-parameters, fused kernel
        opt = type(opt)(model.parameters(), **{**opt.defaults, "fused": True})
    fwd = torch.compile(model) if compile_model else model
    x = torch.randn(batch, 2, 251, 64, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = (torch.autocast(device_type=device, dtype=torch.bfloat16) if amp == "bf16"
           else contextlib.nullcontext())

    def step():
        with ctx:
            loss = fwd(x).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", default=None, choices=("bf16",), help="autocast dtype (GPU)")
    p.add_argument("--presets", default="local,paper")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for the main runs")
    p.add_argument("--no-variants", action="store_true", help="skip the CPU speed-up variants")
    p.add_argument("--compile", action="store_true", help="also time torch.compile on the device")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dev = args.device
    if dev == "cpu":
        torch.set_num_threads(args.threads)
    peak_dtype = torch.bfloat16 if args.amp == "bf16" else torch.float32
    peak = matmul_peak(dev, peak_dtype, 8192 if dev == "cuda" else 1024)
    info = {"device": torch.cuda.get_device_name() if dev == "cuda" else f"{platform.processor() or 'cpu'}",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "amp": args.amp,
            f"matmul_peak_{str(peak_dtype).split('.')[-1]}_tflops": peak / 1e12}
    log.info("%s", json.dumps(info))
    rows = []
    for preset in args.presets.split(","):
        for name in ("stereo_rcnet", "baseline"):
            cfg = model_cfg(preset, name)
            flops = count_flops(build_model(cfg), training=True)
            big = preset == "paper" and name == "stereo_rcnet"
            if dev == "cuda":
                batch, steps, warm = (64, 10, 3) if big else (256, 10, 3)
            else:
                batch, steps, warm = (2, 1, 1) if big else (32, 5, 2)
            variants = [("plain", {})]
            if dev == "cuda":
                variants = [("plain", {"amp": args.amp}), ("channels_last", {"amp": args.amp, "channels_last": True})]
                if args.compile:
                    variants.append(("compile", {"amp": args.amp, "compile_model": True}))
            elif preset == "local" and name == "stereo_rcnet" and not args.no_variants:
                variants += [("channels_last", {"channels_last": True}), ("fused_adam", {"fused_adam": True}),
                             ("1_thread", {"threads": 1})]
                if args.compile:
                    variants.append(("compile", {"compile_model": True}))
            for label, kw in variants:
                threads = kw.pop("threads", None)
                if threads:
                    torch.set_num_threads(threads)
                try:
                    cps = throughput(cfg, preset_config(preset).train.stage1, dev, batch, steps, warm, **kw)
                except Exception as e:  # report and go on: one variant failing must not hide the rest
                    log.warning("%s %s %s failed: %s", preset, name, label, e)
                    continue
                finally:
                    if threads:
                        torch.set_num_threads(args.threads)
                row = {"preset": preset, "model": name, "variant": label, "batch": batch,
                       "clips_per_s": round(cps, 2), "train_gflop_per_clip": round(flops / 1e9, 4),
                       "achieved_tflops": round(cps * flops / 1e12, 4),
                       "fraction_of_matmul_peak": round(cps * flops / peak, 4)}
                rows.append(row)
                log.info("%s", json.dumps(row))
    print("| preset | model | variant | batch | clips/s | train GFLOP/clip | achieved TFLOP/s | of matmul peak |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['model']} | {r['variant']} | {r['batch']} | {r['clips_per_s']} | "
              f"{r['train_gflop_per_clip']} | {r['achieved_tflops']} | {100 * r['fraction_of_matmul_peak']:.1f} % |")
    if args.out:
        args.out.write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
