"""Models (seld/model/): shapes for every switch, backward, shared weights, sizes, FLOPs, the
model-summary CLI, and an overfit check through the real feature, label, post-processing and
metric code."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
import torch

from seld.config import BASELINE_OVERRIDES, ModelConfig, apply_overrides, preset_config
from seld.model import build_model, count_flops, count_parameters
from seld.model.blocks import AttentionalFeatureFusion, FreqAvgPool
from seld.model.stereo_rcnet import pool_to_label_frames

SMOKE = preset_config("smoke").model
LOCAL = preset_config("local").model


def _x(b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 2, 251, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fusion,attention,encoding,fmt", list(itertools.product(
    ("aff", "add", "concat", "early"), (True, False), (True, False), ("accdoa", "multi_accdoa"))))
def test_forward_shapes_for_every_switch(fusion, attention, encoding, fmt):
    cfg = apply_overrides(SMOKE, {"fusion": fusion, "channel_attention": attention,
                                  "temporal_encoding": encoding, "output_format": fmt})
    with torch.no_grad():
        y = build_model(cfg)(_x())
    assert y.shape == ((2, 50, 13, 3) if fmt == "accdoa" else (2, 50, 3, 13, 3))
    assert torch.all(y[..., :2].abs() <= 1) and torch.all(y[..., 2] >= 0)


@pytest.mark.parametrize("overrides", [{"n_conformer_layers": 0}, {"input_mode": "mono"},
                                       {"name": "baseline", "output_format": "multi_accdoa"}])
def test_backward_gives_finite_gradients_everywhere(overrides):
    model = build_model(apply_overrides(SMOKE, overrides))
    model(_x()).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_shared_weights_make_symmetric_fusion_swap_invariant():
    model = build_model(apply_overrides(SMOKE, {"fusion": "add"})).eval()
    x = _x()
    torch.testing.assert_close(model(x), model(x.flip(1)))
    mono = build_model(apply_overrides(SMOKE, {"input_mode": "mono"})).eval()
    torch.testing.assert_close(mono(x), mono(x.mean(1, keepdim=True).expand(-1, 2, -1, -1)))
    aff = build_model(SMOKE).eval()
    assert not torch.allclose(aff(x), aff(x.flip(1)))  # AFF weighs left and right differently


def test_aff_weights_in_0_2_and_equal_inputs_give_twice():
    aff = AttentionalFeatureFusion(8).eval()
    a = torch.randn(2, 8, 20, 4)
    torch.testing.assert_close(aff(a, a), 2 * a)
    w = 2 * aff.attention(a + torch.randn_like(a))
    assert torch.all((w > 0) & (w < 2))


@pytest.mark.parametrize("size,n_freq", [(2, 64), (2, 63), (3, 64), (4, 10)])
def test_freq_pool_is_bitwise_avgpool2d_forward_and_backward(size, n_freq):
    x = torch.randn(3, 5, 17, n_freq, requires_grad=True)
    want, got = torch.nn.AvgPool2d((1, size))(x), FreqAvgPool(size)(x)
    grad = torch.randn_like(want)
    assert torch.equal(got, want)
    assert torch.equal(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0])


def test_temporal_pooling_follows_the_alignment_rule():
    x = torch.arange(251.0).view(1, 251, 1)
    pooled = pool_to_label_frames(x)
    assert pooled.shape == (1, 50, 1)
    torch.testing.assert_close(pooled[0, :, 0], torch.arange(50.0) * 5 + 2)  # mean of 5f..5f+4


def test_sizes_and_flops_within_stated_bands():
    official = apply_overrides(ModelConfig(), {k[6:]: v for k, v in BASELINE_OVERRIDES.items() if k.startswith("model.")})
    assert count_parameters(build_model(official)) == 734_261  # official baseline architecture
    paper = build_model(ModelConfig())
    assert 5e6 < count_parameters(paper) < 12e6
    local = build_model(LOCAL)
    assert 50_000 < count_parameters(local) < 150_000
    fwd, train = count_flops(local), count_flops(local, training=True)
    assert 35e6 < fwd < 70e6  # about 48 MFLOP per clip with the Conformer at the label rate
    assert 2.5 < train / fwd < 3.8
    feature_rate = build_model(apply_overrides(LOCAL, {"conformer_rate": "feature"}))
    assert 60e6 < count_flops(feature_rate) < 150e6  # about 99 MFLOP: the paper's order costs 2x
    base_fwd = count_flops(build_model(official))
    assert 140e6 < base_fwd < 190e6


def test_model_summary_cli_prints_both_models(capsys):
    from seld.cli import main

    assert main(["model-summary", "--preset", "local", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["models"]
    assert [r["model"] for r in rows] == ["stereo_rcnet", "baseline"]
    assert rows[0]["params"] == count_parameters(build_model(LOCAL))
    assert rows[0]["train_step_flops_per_clip"] > rows[0]["forward_flops_per_clip"] > 0
    assert main(["model-summary", "--preset", "local", "--set", "model.fusion=nope"]) == 2


# --- Overfit through the real pipeline pieces ------------------------------------------------------
def _clips(root, n: int = 8):
    """Features, targets and references of the n clips with the most events of a dataset."""
    from seld.features import load_audio, log_mel
    from seld.labels import read_reference_csv

    wavs = sorted((root / "stereo_dev").glob("*/*.wav"))
    refs = {w: read_reference_csv(root / "metadata_dev" / w.parent.name / (w.stem + ".csv")) for w in wavs}
    chosen = sorted(wavs, key=lambda w: -len(refs[w]))[:n]
    feats = np.stack([log_mel(load_audio(w)) for w in chosen]).astype(np.float32)
    feats = (feats - feats.mean()) / feats.std()
    return torch.from_numpy(feats), [refs[w] for w in chosen]


def _overfit(model_cfg: ModelConfig, feats: torch.Tensor, refs, max_steps: int = 300):
    from seld.config import LossConfig
    from seld.labels import encode_accdoa, encode_multi_accdoa
    from seld.losses import build_loss
    from seld.metrics import count_errors, score_counters
    from seld.postprocess import decode_outputs

    fmt = model_cfg.output_format
    encode = encode_accdoa if fmt == "accdoa" else encode_multi_accdoa
    targets = torch.from_numpy(np.stack([encode(r)[0] for r in refs]))
    torch.manual_seed(0)
    model = build_model(model_cfg)
    loss_fn = build_loss(LossConfig(), fmt)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(max_steps):
        loss = loss_fn(model(feats), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] <= 0.02 * losses[0]:
            break
    model.eval()
    with torch.no_grad():
        final = loss_fn(model(feats), targets).item()
        events = decode_outputs(model(feats), fmt, 0.5)
    classwise = score_counters(count_errors(refs, events)).classwise
    present = [row["f20"] for row in classwise if row["n_ref"] > 0]
    return losses[0], min(losses), final, float(np.mean(present)), len(losses)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stereo_rcnet", "baseline"])
def test_local_model_overfits_8_real_clips(smoke_data, name):
    """<= 5 % of the initial loss within 300 steps, then F20 >= 90 % through the real decoding and
    metric. F20 is averaged over the classes present in the 8 clips (the official average over all
    13 counts absent classes as 0, which would cap it at n_present / 13)."""
    feats, refs = _clips(smoke_data)
    cfg = apply_overrides(LOCAL, {"dropout": 0.0, "baseline_dropout": 0.0})
    if name == "baseline":
        cfg = apply_overrides(cfg, {k[6:]: v for k, v in BASELINE_OVERRIDES.items() if k.startswith("model.")})
    initial, best, final, f20, steps = _overfit(cfg, feats, refs)
    assert best <= 0.05 * initial, (initial, best, steps)
    assert final <= 0.05 * initial, (initial, final)
    assert f20 >= 90.0, f20


class _SdpaDtypes(torch.overrides.TorchFunctionMode):
    """Records the dtypes that reach `scaled_dot_product_attention` (torch's own dispatch hook)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[torch.dtype, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.seen.append(tuple(a.dtype for a in args[:3]))
        return func(*args, **(kwargs or {}))


def test_attention_under_cpu_bf16_autocast_runs_in_float32():
    """CPU bf16 autocast leaves the projections in bf16 but computes softmax(QK^T/sqrt(d))V in float32
    (the bf16 CPU kernel's backward is ~10x slower)."""
    from seld.model.conformer import SelfAttention

    att = SelfAttention(16, 2, dropout=0.0)
    x = torch.randn(3, 50, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with _SdpaDtypes() as spy, torch.autocast("cpu", dtype=torch.bfloat16):
        got = att(x)
    assert spy.seen == [(torch.float32,) * 3]  # the property itself, independent of kernel rounding
    with _SdpaDtypes() as spy:
        att(x)
    assert spy.seen == [(torch.float32,) * 3]  # and without autocast, unchanged
    # The value: the explicit formula on the module's bf16 projections. Not bit-equal on every CPU
    # (the fused kernel and this matmul/softmax accumulate in different orders, and the output
    # projection rounds to bf16 again), so the tolerance is one bf16 step (2^-8 relative) of the
    # output's scale.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = att.qkv(att.norm(x)).view(3, 50, 3, 2, 8).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q.float() @ k.float().transpose(-1, -2) / 8 ** 0.5, dim=-1)
    y = (w @ v.float()).transpose(1, 2).reshape(3, 50, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = att.proj(y)
    step = 2.0 ** -8 * want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=2.0 ** -8, atol=step)
    got.float().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bf16_autocast_decision_follows_the_flag_and_the_hardware():
    """On CPU: bf16 exactly when the kernel reports native bf16 (/proc/cpuinfo's `amx_tile` or
    `avx512_bf16` flag, an independent source from torch's own check) *and* the measured bf16 matmul
    is at least BF16_MIN_SPEEDUP times float32's; the reason names both; never when the config says
    no."""
    from pathlib import Path

    from seld.predict import BF16_MIN_SPEEDUP, bf16_autocast, precision_decision, precision_override

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("needs Linux's /proc/cpuinfo")
    flags = {f for line in cpuinfo.read_text().splitlines() if line.startswith("flags") for f in line.split()}
    native = bool({"amx_tile", "avx512_bf16"} & flags)
    on, reason = precision_decision("cpu", wanted=True)
    if precision_override() == "auto":
        if native:
            isa = "AMX" if "amx_tile" in flags else "AVX512-BF16"
            m = re.fullmatch(rf"{isa}, bf16 matmul measured ([\d.]+)x float32 \(>= [\d.]+ for bf16\): (bf16|float32)",
                             reason)
            assert m, reason
            assert on is (float(m[1]) >= BF16_MIN_SPEEDUP) and m[2] == ("bf16" if on else "float32")
        else:
            assert (on, reason) == (False, "CPU without AMX or AVX512-BF16: float32")
    else:
        assert on is (precision_override() == "bf16") and reason == f"$SELD_PRECISION={precision_override()}"
    assert bf16_autocast("cpu", wanted=True) is on
    assert bf16_autocast("cpu", wanted=False) is False
    assert bf16_autocast("meta", wanted=True) is False


def test_precision_switch_forces_float32(monkeypatch):
    """SELD_PRECISION=float32 makes every decision float32 (the suite as a machine without AMX runs
    it), =bf16 makes every CPU decision bf16 (as a machine with AMX); an unknown value is an error
    naming the variable."""
    from seld.errors import UserError
    from seld.predict import bf16_autocast, precision_override

    monkeypatch.setenv("SELD_PRECISION", "float32")
    assert precision_override() == "float32"
    assert bf16_autocast("cpu", wanted=True) is False and bf16_autocast("cuda", wanted=True) is False
    monkeypatch.setenv("SELD_PRECISION", "bf16")
    assert bf16_autocast("cpu", wanted=True) is True and bf16_autocast("cpu", wanted=False) is False
    monkeypatch.setenv("SELD_PRECISION", "fp8")
    with pytest.raises(UserError, match=r"SELD_PRECISION='fp8': expected 'auto', 'float32' or 'bf16'"):
        bf16_autocast("cpu", wanted=True)
