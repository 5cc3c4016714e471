"""Model-level options of a `local` training step and inference, each beside the plain step (issue 28).

    python bench/model_options.py [--models stereo,baseline] [--precision both|bf16|float32]
                                  [--threads 1] [--steps 20] [--compile-timeout 300]
                                  [--infer-clips 256] [--no-compile] [--no-infer]

Per model (`local` Stereo-RCnet: `preset_config("local")`; `local` Baseline-A: its
BASELINE_OVERRIDES) and precision (bf16 autocast, float32), batch 32, Gaussian-noise features
(B, 2, 251, n_mels) and random targets of the model's shape ((B, 50, 13, 4) ACCDOA or
(B, 50, 6, 13, 4) multi-ACCDOA; activity, activity*x, activity*y, distance), it runs full training
steps (`seld.train.train_step`: forward, loss, backward, grad clip, Adam at the stage-1 lr) of
these arms, all from the same initial weights (`seld.train.init_model`):

- plain: what a run does (`seld.train.stage_optimizer`);
- channels_last: model and input in `torch.channels_last`;
- fused_adam: `torch.optim.Adam(fused=True)`; foreach_adam: `torch.optim.Adam(foreach=True)`;
- compile: `torch.compile(model)` (inductor), in a child process bounded by `--compile-timeout`
  (an earlier attempt never finished compiling under load), beside its own plain arm there; the
  first step's time (compilation of forward and backward included) is reported apart as compile_s.

Arms step in turn on the same batches, the order rotating each step, and each arm's figure is the
median over steps of its step time / the plain arm's time of the same batch: the host's speed
drifts by 10-25 % within minutes and other processes share the CPUs, a ratio of interleaved steps
does not. Two warm-up steps are not counted. Results equality: each arm's first step (same weights,
same batch, same dropout masks) is compared with the plain arm's: loss and every parameter and
buffer after the step, bitwise or as the largest absolute difference, beside the largest absolute
change the plain step made (Adam's first step moves a weight by about lr whatever its gradient, so
the comparison is repeated after the second step).

Inference (`--no-infer` skips it): `seld.predict.infer` in eval mode on `--infer-clips` clips of
normalised noise with batch sizes 32, 64, 128, 256, interleaved in rounds; ms per clip, the median
per-round ratio against batch 32, and the largest output difference from batch 32.

Prints one JSON line per (model, precision) with the training arms, one per (model, precision)
for inference; BENCHMARKS.md "Model-level options (issue 28)" holds a run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from seld.config import BASELINE_OVERRIDES, ExperimentConfig, preset_config
from seld.losses import build_loss
from seld.predict import infer
from seld.train import init_model, stage_optimizer, train_step

ARMS = ("plain", "channels_last", "fused_adam", "foreach_adam")
INFER_BATCHES = (32, 64, 128, 256)
WARMUP = 2


def model_config(name: str) -> ExperimentConfig:
    """The `local` Stereo-RCnet ("stereo") or Baseline-A ("baseline") config."""
    return preset_config("local", BASELINE_OVERRIDES if name == "baseline" else None)


def random_batches(cfg: ExperimentConfig, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` batches of normalised noise features and targets of the model's output format."""
    gen = torch.Generator().manual_seed(seed)
    b = cfg.train.batch_size
    slots = (6,) if cfg.model.output_format == "multi_accdoa" else ()
    out = []
    for _ in range(n):
        x = torch.randn(b, 2, 251, cfg.features.n_mels, generator=gen)
        shape = (b, 50, *slots, 13)
        act = (torch.rand(shape, generator=gen) < 0.1).float()
        az = torch.rand(shape, generator=gen) * 2 * torch.pi
        dist = (0.5 + 4.5 * torch.rand(shape, generator=gen)) * act
        out.append((x, torch.stack([act, act * az.cos(), act * az.sin(), dist], dim=-1)))
    return out


def build_arm(cfg: ExperimentConfig, arm: str):
    """(model, optimiser, input transform) of one arm, from the run's initial weights."""
    net = init_model(cfg).train()
    scfg = cfg.train.stage1
    prep = lambda x: x  # noqa: E731
    if arm == "channels_last":
        net = net.to(memory_format=torch.channels_last)
        prep = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731
    if arm == "fused_adam":
        opt = torch.optim.Adam(net.parameters(), lr=scfg.lr, weight_decay=scfg.weight_decay, fused=True)
    elif arm == "foreach_adam":
        opt = torch.optim.Adam(net.parameters(), lr=scfg.lr, weight_decay=scfg.weight_decay, foreach=True)
    else:
        opt = stage_optimizer(net, scfg)
    model = torch.compile(net) if arm == "compile" else net
    return net, model, opt, prep


def equality(ref: dict, net: torch.nn.Module, loss: float, start: dict) -> dict:
    """How one arm's first step compares with the plain arm's (same weights, same batch)."""
    diffs = [float((p.detach() - ref["params"][k]).abs().max()) for k, p in net.state_dict().items()
             if p.is_floating_point()]
    moved = max(float((ref["params"][k] - start[k]).abs().max()) for k in ref["params"])
    return {"loss_equal": loss == ref["loss"], "loss_diff": abs(loss - ref["loss"]),
            "params_equal": max(diffs) == 0.0, "params_max_abs_diff": max(diffs),
            "plain_step_max_abs_change": moved}


def run_arms(cfg: ExperimentConfig, arms: tuple[str, ...], bf16: bool, steps: int) -> dict:
    """Interleaved training steps of `arms` (the first is "plain") on the same batches."""
    loss_fn = build_loss(cfg.loss, cfg.model.output_format)
    batches = random_batches(cfg, 4)
    built = {a: build_arm(cfg, a) for a in arms}
    start = {k: v.detach().clone() for k, v in built["plain"][0].state_dict().items() if v.is_floating_point()}
    out: dict = {a: {} for a in arms}
    times: dict[str, list[float]] = {a: [] for a in arms}
    ref: dict[int, dict] = {}
    for i in range(WARMUP + steps):
        x, y = batches[i % len(batches)]
        order = arms[i % len(arms):] + arms[:i % len(arms)]  # rotate which arm goes first
        for a in order:
            net, model, opt, prep = built[a]
            torch.manual_seed(1000 + i)  # the same dropout masks in every arm
            t0 = time.perf_counter()
            loss = float(train_step(model, loss_fn, opt, prep(x), y, amp=bf16, grad_clip=cfg.train.grad_clip))
            dt = time.perf_counter() - t0
            if i == 0:
                out[a]["first_step_s"] = round(dt, 2)
            if i in (0, WARMUP - 1):
                if a == "plain":
                    ref[i] = {"loss": loss, "params": {k: v.detach().clone() for k, v in net.state_dict().items()
                                                       if v.is_floating_point()}}
                else:
                    out[a][f"_step{i}"] = (net, loss)
            if i >= WARMUP:
                times[a].append(dt)
        if i in (0, WARMUP - 1):  # the plain arm has stepped by now, whatever the order
            for a in arms[1:]:
                net, loss = out[a].pop(f"_step{i}")
                out[a]["equality" if i == 0 else f"equality_after_{i + 1}_steps"] = equality(ref[i], net, loss, start)
    plain = np.array(times["plain"])
    for a in arms:
        t = np.array(times[a])
        out[a]["ms_median"] = round(1000 * float(np.median(t)), 1)
        out[a]["ratio_to_plain_median"] = round(float(np.median(t / plain)), 3)
    return out


def run_infer(cfg: ExperimentConfig, bf16: bool, n_clips: int, rounds: int) -> dict:
    """`seld.predict.infer` at each batch size of INFER_BATCHES, interleaved in rounds."""
    net = init_model(cfg).eval()
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((n_clips, 2, 251, cfg.features.n_mels)).astype(np.float16)
    ref = infer(net, feats, None, None, INFER_BATCHES[0], "cpu", bf16)
    out: dict = {}
    for bs in INFER_BATCHES:  # warm-up, and the outputs against batch 32's
        y = infer(net, feats, None, None, bs, "cpu", bf16)
        out[bs] = {"outputs_equal": bool(np.array_equal(y, ref)), "outputs_max_abs_diff": float(np.abs(y - ref).max())}
    times: dict[int, list[float]] = {bs: [] for bs in INFER_BATCHES}
    for r in range(rounds):
        k = r % len(INFER_BATCHES)
        for bs in INFER_BATCHES[k:] + INFER_BATCHES[:k]:
            t0 = time.perf_counter()
            infer(net, feats, None, None, bs, "cpu", bf16)
            times[bs].append(time.perf_counter() - t0)
    base = np.array(times[INFER_BATCHES[0]])
    for bs in INFER_BATCHES:
        t = np.array(times[bs])
        out[bs]["ms_per_clip_median"] = round(1000 * float(np.median(t)) / n_clips, 2)
        out[bs]["ratio_to_b32_median"] = round(float(np.median(t / base)), 3)
    return out


def compile_child(args) -> int:
    """The compile arm beside a plain arm, in this (child) process; prints progress lines."""
    cfg = model_config(args.models)
    bf16 = args.precision == "bf16"
    t0 = time.perf_counter()
    res = run_arms(cfg, ("plain", "compile"), bf16, args.steps)
    res["compile"]["compile_s"] = res["compile"].pop("first_step_s")
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res), flush=True)
    return 0


def run_compile(model: str, precision: str, args) -> dict:
    """The compile arm in a child process, killed after `--compile-timeout` s."""
    cmd = [sys.executable, __file__, "--compile-child", "--models", model, "--precision", precision,
           "--threads", str(args.threads), "--steps", str(args.steps)]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)
    try:
        out, err = child.communicate(timeout=args.compile_timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        return {"finished": False, "note": f"did not finish compiling and stepping in {args.compile_timeout} s"}
    if child.returncode != 0:
        return {"finished": False, "note": f"exit {child.returncode}: {err.strip().splitlines()[-1:]}"}
    res = json.loads(out.strip().splitlines()[-1])
    res["finished"] = True
    res["child_wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="stereo,baseline", help="stereo, baseline or both, comma-separated")
    ap.add_argument("--precision", choices=("both", "bf16", "float32"), default="both")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a study run uses 1 on 2 cores)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per arm (after 2 warm-up steps)")
    ap.add_argument("--compile-timeout", type=float, default=300.0, help="seconds for the compile child")
    ap.add_argument("--infer-clips", type=int, default=256)
    ap.add_argument("--infer-rounds", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-infer", action="store_true")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.compile_child:
        return compile_child(args)
    precisions = ("bf16", "float32") if args.precision == "both" else (args.precision,)
    for model in args.models.split(","):
        cfg = model_config(model)
        for precision in precisions:
            head = {"model": cfg.model.name, "precision": precision, "threads": args.threads,
                    "batch_size": cfg.train.batch_size, "torch": torch.__version__}
            if not args.no_train:
                t0 = time.perf_counter()
                res = run_arms(cfg, ARMS, precision == "bf16", args.steps)
                res["wall_s"] = round(time.perf_counter() - t0, 1)
                if not args.no_compile:
                    res["compile"] = run_compile(model, precision, args)
                print(json.dumps({**head, "kind": "train", "steps": args.steps, **res}), flush=True)
            if not args.no_infer:
                res = run_infer(cfg, precision == "bf16", args.infer_clips, args.infer_rounds)
                print(json.dumps({**head, "kind": "infer", "clips": args.infer_clips, **res}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
