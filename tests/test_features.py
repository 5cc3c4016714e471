"""Log-mel features (spec §5): batched torch path against the per-file librosa recipe; wav loading."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from seld.config import FeatureConfig
from seld.errors import DataError
from seld.features import load_audio, log_mel, log_mel_librosa

N = 120_000
T = np.arange(N) / 24_000
TOL_DB = 1e-3


def _varied_clips(seed: int = 0) -> np.ndarray:
    """(8, 2, N) float32: noise, tones, a transient, an impulse, a silent channel, levels 60 dB apart."""
    rng = np.random.default_rng(seed)
    clips = [
        0.5 * rng.standard_normal((2, N)),
        1e-3 * np.stack([np.sin(2 * np.pi * 440 * T), np.sin(2 * np.pi * 3000 * T + 1)]),
        np.stack([0.3 * rng.standard_normal(N), np.zeros(N)]),  # one silent channel
        0.9 * np.stack([np.sin(2 * np.pi * 1000.3 * T) * np.exp(-T), 0.5 * np.sign(np.sin(2 * np.pi * 50 * T))]),
        np.zeros((2, N)),
        1e-5 * rng.standard_normal((2, N)),
        np.stack([np.sin(2 * np.pi * 10_700 * T), 0.01 * np.sin(2 * np.pi * 322.6 * T)]) * 0.7,
        0.05 * np.stack([np.convolve(rng.standard_normal(N), np.ones(40) / 40, "same"),
                         np.sin(2 * np.pi * (100 + 2000 * T) * T)]),
    ]
    clips[4][:, 60_000] = 1.0  # impulse
    clips[5][:, :24_000] *= 1000.0  # 60 dB step inside one clip
    return np.stack(clips).astype(np.float32)


def _max_err_db(ours: np.ndarray, batch: np.ndarray) -> float:
    return max(float(np.abs(ours[i] - log_mel_librosa(batch[i])).max()) for i in range(len(batch)))


def test_batch_equals_per_clip_librosa():
    x = _varied_clips()
    ours = log_mel(x)
    assert ours.shape == (8, 2, 251, 64) and ours.dtype == np.float32
    assert _max_err_db(ours, x) <= TOL_DB
    # Levels across the batch differ by far more than 40 dB, each clip has its own floor.
    peaks = ours.reshape(8, -1).max(1)
    assert peaks.max() - peaks.min() > 40
    assert np.all(ours.reshape(8, -1).min(1) >= peaks - 80.0 - 1e-4)
    for i in (2, 4):  # silence reaches the floor of its own clip (others stop at amin, -100 dB)
        assert ours[i].min() == pytest.approx(peaks[i] - 80.0, abs=1e-4)


def test_levels_40db_apart_each_get_own_floor():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((2, N)) * (0.05 + np.exp(-3 * T))  # decaying noise
    gains = np.array([1.0, 1e-2, 1e-4, 0.3])  # 40 and 80 dB below the first clip
    x = (gains[:, None, None] * base[None]).astype(np.float32)
    ours = log_mel(x)
    assert _max_err_db(ours, x) <= TOL_DB
    # A batch-wide floor would flatten the quiet clips; per-clip floors keep clip 1 an exact
    # 40 dB shift of clip 0 (both stay above librosa's amin of -100 dB).
    assert ours[0].max() - ours[2].max() == pytest.approx(80.0, abs=1e-3)
    assert ours[1].min() > -100.0
    assert ours[2].std() > 1.0  # a floor shared with clip 0 would flatten clip 2 completely
    assert np.allclose(ours[0] - 40.0, ours[1], atol=2e-3)


def test_silent_channel_floor_follows_the_other_channel():
    rng = np.random.default_rng(4)
    x = np.stack([0.2 * rng.standard_normal(N), np.zeros(N)]).astype(np.float32)
    ours = log_mel(x)
    ref = log_mel_librosa(x)
    assert np.abs(ours - ref).max() <= TOL_DB
    assert np.allclose(ours[1], ours[0].max() - 80.0)


def test_torch_in_torch_out_and_leading_dims():
    x = _varied_clips()[:4]
    t = log_mel(torch.from_numpy(x).double())
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"
    # Bit-equal on every CPU: a CPU tensor is converted to the same float32 array and takes the same
    # path; the nested shape below is the same (4, 2, N) array, reshaped before and after.
    np.testing.assert_array_equal(t.numpy(), log_mel(x))
    assert log_mel(x[0]).shape == (2, 251, 64)
    nested = log_mel(x.reshape(2, 2, 2, N))
    np.testing.assert_array_equal(nested.reshape(4, 2, 251, 64), log_mel(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_gpu_matches_librosa():
    x = _varied_clips()
    out = log_mel(torch.from_numpy(x).cuda())
    assert out.device.type == "cuda"
    assert _max_err_db(out.cpu().numpy(), x) <= TOL_DB


def test_wrong_rate_rejected():
    with pytest.raises(ValueError, match="48000 Hz"):
        log_mel(np.zeros((2, N), np.float32), sample_rate_hz=48_000)


# --- load_audio ---------------------------------------------------------------------------------
def test_load_exact_clip(tmp_path):
    x = (0.1 * np.random.default_rng(0).standard_normal((N, 2))).astype(np.float32)
    p = tmp_path / "a.wav"
    sf.write(p, x, 24_000, subtype="PCM_16")
    audio = load_audio(p)
    assert audio.shape == (2, N) and audio.dtype == np.float32
    np.testing.assert_allclose(audio, x.T, atol=1 / 32768)


def test_load_short_file_zero_padded_with_warning(tmp_path, caplog):
    p = tmp_path / "short.wav"
    sf.write(p, np.full((24_000, 2), 0.25, np.float32), 24_000, subtype="PCM_16")
    with caplog.at_level(logging.WARNING, logger="seld.features"):
        audio = load_audio(p)
    assert audio.shape == (2, N)
    assert np.all(audio[:, :24_000] == 0.25) and np.all(audio[:, 24_000:] == 0)
    assert "short.wav" in caplog.text and "zero-padded" in caplog.text


def test_load_resamples_with_warning(tmp_path, caplog):
    p = tmp_path / "hi.wav"
    tone = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(240_000) / 48_000)
    sf.write(p, np.stack([tone, -tone], 1), 48_000, subtype="FLOAT")
    with caplog.at_level(logging.WARNING, logger="seld.features"):
        audio = load_audio(p)
    assert audio.shape == (2, N)
    assert "resampling" in caplog.text and "48000" in caplog.text
    np.testing.assert_allclose(audio[0, 1000:-1000], 0.5 * np.sin(2 * np.pi * 1000 * T[1000:-1000]), atol=1e-3)


@pytest.mark.parametrize("n_ch", [1, 4])
def test_load_rejects_channel_count(tmp_path, n_ch):
    p = tmp_path / f"ch{n_ch}.wav"
    sf.write(p, np.zeros((N, n_ch), np.float32), 24_000)
    with pytest.raises(DataError, match=rf"ch{n_ch}\.wav.*stereo.*{n_ch} channel"):
        load_audio(p)


def test_load_rejects_truncated_and_corrupt(tmp_path):
    p = tmp_path / "cut.wav"
    sf.write(p, np.zeros((N, 2), np.float32), 24_000, subtype="PCM_16")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.wav.*truncated"):
        load_audio(p)
    q = tmp_path / "junk.wav"
    q.write_bytes(b"not a wav file" * 50)
    with pytest.raises(DataError, match=r"junk\.wav"):
        load_audio(q)
    with pytest.raises(DataError, match=r"missing\.wav"):
        load_audio(tmp_path / "missing.wav")


def test_feature_config_changes_shape():
    cfg = FeatureConfig(n_mels=32)
    assert log_mel(np.zeros((2, N), np.float32), cfg=cfg).shape == (2, 251, 32)
