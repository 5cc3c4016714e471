"""Model assembly: `build_model(cfg)` and cost accounting (parameters, FLOPs per clip).

Stereo-RCnet lives in `stereo_rcnet.py` (blocks in `blocks.py`, `conformer.py`); the official
baseline in `baseline.py`. Both read log-mel (B, 2, 251, 64) and write (multi-)ACCDOA at 100 ms.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import (
    FlopCounterMode,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from seld.config import N_FEATURE_FRAMES, ModelConfig
from seld.model.baseline import BaselineSELD
from seld.model.stereo_rcnet import StereoRCnet

__all__ = ["BaselineSELD", "StereoRCnet", "build_model", "count_flops", "count_parameters"]


def build_model(cfg: ModelConfig, n_mels: int = 64) -> nn.Module:
    """The model named by `cfg.name`: input (B, 2, 251, n_mels) log-mel; output ACCDOA
    (B, 50, 13, 3) or multi-ACCDOA (B, 50, n_tracks, 13, 3) = (x, y, distance_m)."""
    if cfg.name == "baseline":
        return BaselineSELD(cfg, n_mels=n_mels)
    return StereoRCnet(cfg, n_mels=n_mels, n_frames=N_FEATURE_FRAMES)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# The CPU fused attention kernel has no FLOP formula in torch; it is the same computation as flash.
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
    def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                                out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(model: nn.Module, n_mels: int = 64, batch_size: int = 1, training: bool = False) -> int:
    """FLOPs (multiply-adds count 2) per clip of one forward pass, or of forward + backward when
    `training`; matrix products, convolutions and attention only (norms and activations excluded).

    Counted with torch's FlopCounterMode on a (batch_size, 2, 251, n_mels) input on CPU.
    """
    was_training = model.training
    model.train(training)
    x = torch.randn(batch_size, 2, N_FEATURE_FRAMES, n_mels)
    try:
        with FlopCounterMode(display=False) as counter:
            if training:
                model(x).square().mean().backward()
            else:
                with torch.no_grad():
                    model(x)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return counter.get_total_flops() // batch_size
