"""`seld model-summary`: sizes, parameter counts and FLOPs per clip of Stereo-RCnet and Baseline-A."""

from __future__ import annotations

import argparse
import json

from seld.config import BASELINE_OVERRIDES, PRESETS, apply_overrides, parse_set_args, preset_config

NAME = "model-summary"
HELP = "Print the model sizes, parameter counts and FLOPs per clip (forward and training step)."
EXAMPLE = "Example: seld model-summary --preset local --set model.n_conformer_layers=0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=PRESETS, default="local", help="preset whose model sizes to use")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                        help="config override applied to Stereo-RCnet, e.g. model.fusion=concat (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def summarize(preset: str, overrides: dict | None = None) -> list[dict]:
    """One row per model: name, parameter count, forward and training-step FLOPs per clip, sizes."""
    from seld.model import build_model, count_flops, count_parameters

    cfg = preset_config(preset, overrides)
    baseline = apply_overrides(cfg, {k: v for k, v in BASELINE_OVERRIDES.items() if k.startswith("model.")})
    rows = []
    for label, model_cfg in (("stereo_rcnet", cfg.model), ("baseline", baseline.model)):
        model = build_model(model_cfg, n_mels=cfg.features.n_mels)
        rows.append({
            "model": label,
            "params": count_parameters(model),
            "forward_flops_per_clip": count_flops(model, cfg.features.n_mels),
            "train_step_flops_per_clip": count_flops(model, cfg.features.n_mels, training=True),
            "output_format": model_cfg.output_format,
        })
    m = cfg.model
    rows[0]["sizes"] = {"stem_channels": m.stem_channels, "stem_freq_pool": m.stem_freq_pool,
                        "resnet_channels": list(m.resnet_channels), "freq_pool": list(m.freq_pool),
                        "fusion": m.fusion, "d_model": m.d_model, "n_conformer_layers": m.n_conformer_layers,
                        "n_heads": m.n_heads, "conformer_kernel": m.conformer_kernel, "ff_mult": m.ff_mult}
    rows[1]["sizes"] = {"filters": m.baseline_filters, "rnn_hidden": m.baseline_rnn_hidden,
                        "n_rnn_layers": m.baseline_n_rnn_layers, "n_mhsa_layers": m.baseline_n_mhsa_layers,
                        "n_heads": m.baseline_n_heads}
    return rows


def run(args: argparse.Namespace) -> int:
    rows = summarize(args.preset, parse_set_args(args.set))
    if args.json:
        print(json.dumps({"preset": args.preset, "models": rows}, indent=2))
        return 0
    print(f"preset {args.preset}: FLOPs per clip (2 x 251 x 64 log-mel; multiply-add = 2 FLOPs)")
    print(f"{'model':<14}{'params':>12}{'fwd MFLOP':>12}{'train MFLOP':>13}  sizes")
    for r in rows:
        sizes = ", ".join(f"{k}={v}" for k, v in r["sizes"].items())
        print(f"{r['model']:<14}{r['params']:>12,}{r['forward_flops_per_clip'] / 1e6:>12.1f}"
              f"{r['train_step_flops_per_clip'] / 1e6:>13.1f}  {sizes}")
    return 0
