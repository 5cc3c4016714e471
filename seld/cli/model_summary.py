"""`seld model-summary`: sizes, parameter counts and FLOPs per clip of Stereo-RCnet and Baseline-A;
`--markdown` prints the presets' table of docs/configuration.md (generated, so it cannot drift)."""

from __future__ import annotations

import argparse
import json

from seld.config import (
    BASELINE_OVERRIDES,
    PRESETS,
    ExperimentConfig,
    StageConfig,
    apply_overrides,
    baseline_overrides,
    parse_set_args,
    preset_config,
)

NAME = "model-summary"
HELP = "Print the model sizes, parameter counts and FLOPs per clip (forward and training step)."
EXAMPLE = "Example: seld model-summary --preset local --set model.n_conformer_layers=0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=PRESETS, default="local", help="preset whose model sizes to use")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                        help="config override applied to Stereo-RCnet, e.g. model.fusion=concat (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--markdown", action="store_true",
                        help="print the Markdown table of the smoke, local and paper presets "
                             "(docs/configuration.md holds it; --preset and --set are ignored)")


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


TABLE_PRESETS = ("smoke", "local", "paper")


def _sci(x: float) -> str:
    """A learning rate as 3e-3, 2e-5, 1.5e-4."""
    mantissa, exp = f"{x:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


def _int(x: float) -> str:
    """An integer with thin-space thousands: 7 724 631."""
    return f"{round(x):,}".replace(",", " ")


def _stage(s: StageConfig) -> str:
    if s.patience is None:
        return f"{s.epochs} epochs at {_sci(s.lr)}"
    return f"up to {s.epochs} at {_sci(s.lr)}, patience {s.patience}"


def _preset_column(preset: str) -> list[str]:
    from seld.model import build_model, count_flops, count_parameters

    cfg: ExperimentConfig = preset_config(preset)
    base = preset_config(preset, baseline_overrides(preset))
    m, t, a = cfg.model, cfg.train, cfg.augment
    rcnet = build_model(m, n_mels=cfg.features.n_mels)
    baseline = build_model(base.model, n_mels=cfg.features.n_mels)
    frames = 251 if m.conformer_rate == "feature" else 50
    b1 = base.train.stage1
    decay = {s.weight_decay for s in (t.stage1, t.stage2, b1)}
    return [
        f"{m.stem_channels} ch, freq pool {m.stem_freq_pool} / "
        f"{'-'.join(map(str, m.resnet_channels))}, freq pool {'-'.join(map(str, m.freq_pool))}",
        f"{m.attention_reduction}" if m.channel_attention else "off",
        f"{m.n_conformer_layers} layer(s), d {m.d_model}, {m.n_heads} heads, kernel {m.conformer_kernel}, "
        f"FF x{m.ff_mult}, on {frames} frames",
        f"{m.dropout:g}",
        f"{_int(count_parameters(rcnet))} / {_int(count_flops(rcnet, cfg.features.n_mels) / 1e6)} MFLOP",
        f"{_int(count_parameters(baseline))} parameters: {base.model.baseline_filters} filters, "
        f"GRU {base.model.baseline_rnn_hidden} x {base.model.baseline_n_rnn_layers}, "
        f"{base.model.baseline_n_mhsa_layers} MHSA layers x {base.model.baseline_n_heads} heads",
        f"{t.batch_size}, Adam (L2 weight decay {' / '.join(f'{d:g}' for d in sorted(decay))})",
        _stage(t.stage1),
        _stage(t.stage2),
        f"Adam {_sci(b1.lr)}, no augmentation, {_stage(b1).replace(f' at {_sci(b1.lr)}', ' epochs')}",
        f"{cfg.loss.alpha:g} / {cfg.loss.beta:g}",
        f"{a.cutout_p:g} / {a.specaug_p:g} / {a.freq_shift_p:g} / {a.augmix_p:g} / {a.swap_p:g}",
        "bf16 autocast where native" if t.amp_bf16 else "float32",
    ]


def preset_table() -> str:
    """The presets' model sizes and schedules as a Markdown table, generated from `preset_config`
    (docs/configuration.md holds it; tests/test_docs.py checks the two are equal)."""
    labels = ["MCSAnet stem / stages", "MS-CAM reduction", "Conformer", "dropout",
              "Stereo-RCnet parameters / forward FLOPs per clip", "Baseline-A", "batch, optimiser",
              "stage 1", "stage 2", "Baseline-A schedule (one stage)", "loss α / β",
              "augmentation p: cutout / SpecAugment / freq shift / AugMix / L-R swap",
              "precision (`train.amp_bf16`)"]
    columns = [_preset_column(p) for p in TABLE_PRESETS]
    lines = ["| | " + " | ".join(f"`{p}`" for p in TABLE_PRESETS) + " |",
             "|---" * (len(TABLE_PRESETS) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(col[i] for col in columns) + " |" for i, label in enumerate(labels)]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.markdown:
        print(preset_table(), end="")
        return 0
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
