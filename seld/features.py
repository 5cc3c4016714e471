"""Log-mel input features (spec §5): stereo wav at 24 kHz -> (2, 251, 64) float32 dB per 5-s clip.

Reads wav files (:func:`load_audio`) and computes the official baseline recipe in batches with torch
(:func:`log_mel`): STFT (Hann 960 / hop 480 / n_fft 1024, centred, zero padded; 20 ms frames),
power, librosa's Slaney mel filterbank (64 bands, 0-12 kHz), ``power_to_db`` (ref 1, amin 1e-10) with
an 80 dB floor under the loudest bin of each stereo clip. :func:`log_mel_librosa` is the per-file
librosa recipe itself, kept as the reference the batched path is tested and benchmarked against.
"""

from __future__ import annotations

import functools
import logging
import struct
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf
import torch

from seld.config import FeatureConfig
from seld.errors import DataError

log = logging.getLogger(__name__)

_AMIN = 1e-10  # librosa.power_to_db default
DEFAULT_CONFIG = FeatureConfig()  # the official recipe


@functools.lru_cache(maxsize=16)
def _mel_basis(cfg: FeatureConfig, device: str) -> torch.Tensor:
    """librosa's mel filterbank transposed for a right matmul: (n_fft // 2 + 1, n_mels) float32."""
    mel = librosa.filters.mel(sr=cfg.sample_rate_hz, n_fft=cfg.n_fft, n_mels=cfg.n_mels,
                              fmin=cfg.fmin_hz, fmax=cfg.fmax_hz)
    return torch.from_numpy(np.ascontiguousarray(mel.T, dtype=np.float32)).to(device)


@functools.lru_cache(maxsize=16)
def _window(win_length: int, device: str) -> torch.Tensor:
    """Periodic Hann window in float64, as ``scipy.signal.get_window('hann', n, fftbins=True)`` (librosa)."""
    return torch.hann_window(win_length, periodic=True, dtype=torch.float64, device=device)


def n_frames(n_samples: int, cfg: FeatureConfig = DEFAULT_CONFIG) -> int:
    """Number of centred STFT frames for ``n_samples`` (251 for a 5-s clip at 24 kHz)."""
    return 1 + n_samples // cfg.hop_length


def log_mel(audio, sample_rate_hz: int = 24_000, cfg: FeatureConfig = DEFAULT_CONFIG):
    """Batched official log-mel features.

    Args:
        audio: (..., 2, n_samples) waveform in [-1, 1], numpy array or torch tensor, on CPU or GPU.
        sample_rate_hz: rate of ``audio``; must equal ``cfg.sample_rate_hz`` (resample on load).
        cfg: feature settings.

    Returns:
        (..., 2, n_frames, n_mels) float32 log-mel power in dB (251 x 64 for a 5-s clip); numpy in
        gives numpy out, torch in gives torch out on the same device. Each clip (the last two input
        axes) gets its own 80 dB floor relative to its loudest bin over both channels, as one
        ``librosa.power_to_db`` call per clip makes it.

    The DFT runs in float64: a float32 FFT (MKL, cuFFT) has absolute errors near 1e-8 of a frame's
    peak, which is up to 1e-3 dB in bins 80 dB down. On CPU (numpy arrays and CPU tensors) it is
    numpy's pocketfft, the FFT librosa calls, which was also faster per core than torch's MKL FFT
    (BENCHMARKS.md); on GPU it is torch's cuFFT. Power, the mel matmul and the dB step are float32.
    """
    if sample_rate_hz != cfg.sample_rate_hz:
        raise ValueError(f"log_mel: audio at {sample_rate_hz} Hz, features need {cfg.sample_rate_hz} Hz; "
                         "resample first (load_audio does)")
    is_numpy = not isinstance(audio, torch.Tensor)
    if is_numpy or audio.device.type == "cpu":
        x = np.asarray(audio if is_numpy else audio.detach().to(torch.float32).numpy(), dtype=np.float32)
        out = _log_mel_cpu(x, cfg)
        return out if is_numpy else torch.from_numpy(out)
    x = audio
    if x.ndim < 2:
        raise ValueError(f"log_mel: expected (..., channels, samples), got shape {tuple(x.shape)}")
    lead, n_channels, n_samples = x.shape[:-2], x.shape[-2], x.shape[-1]
    x = x.reshape(-1, n_channels, n_samples)
    out = torch.empty(x.shape[0], n_channels, n_frames(n_samples, cfg), cfg.n_mels, dtype=torch.float32,
                      device=x.device)
    with torch.no_grad():
        for i in range(0, x.shape[0], 256):  # chunks bound the float64 frame buffer (4 MB per clip)
            out[i:i + 256] = _log_mel_chunk(x[i:i + 256], cfg)
    return out.reshape(*lead, n_channels, out.shape[-2], out.shape[-1])


def _log_mel_cpu(x: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """CPU path: (..., channels, samples) float32 -> (..., channels, frames, n_mels) float32 dB.

    The DFT is numpy's (pocketfft, float64), the one librosa calls, so results agree with the
    librosa recipe to ~1e-5 dB; batching, a float32 power spectrum and one mel matmul per chunk
    make it faster than per-file librosa. numpy's FFT, torch's matmul (which follows
    ``torch.set_num_threads``) and the elementwise steps release the GIL, so worker threads scale.
    """
    if x.ndim < 2:
        raise ValueError(f"log_mel: expected (..., channels, samples), got shape {x.shape}")
    lead, n_channels, n_samples = x.shape[:-2], x.shape[-2], x.shape[-1]
    x = x.reshape(-1, n_channels, n_samples)
    n_out = n_frames(n_samples, cfg)
    out = np.empty((x.shape[0], n_channels, n_out, cfg.n_mels), dtype=np.float32)
    pad = cfg.n_fft // 2
    off = (cfg.n_fft - cfg.win_length) // 2  # librosa centres the short window inside n_fft
    window = _window(cfg.win_length, "cpu").numpy()
    mel_basis = _mel_basis(cfg, "cpu")
    chunk = 8  # clips per step: the float64 frames (4 MB per clip) stay cache-friendly
    for i in range(0, x.shape[0], chunk):
        xp = np.pad(x[i:i + chunk], ((0, 0), (0, 0), (pad, pad)))
        frames = np.lib.stride_tricks.sliding_window_view(xp, cfg.win_length, axis=-1)
        frames = frames[..., off::cfg.hop_length, :][..., :n_out, :]
        # Zero padding at the end instead of around the window only rotates each frame, which
        # changes the DFT's phase, not its magnitude.
        spec = np.fft.rfft(frames * window, n=cfg.n_fft, axis=-1)  # complex128 (c, ch, frames, bins)
        power = np.square(spec.real, dtype=np.float32)
        power += np.square(spec.imag, dtype=np.float32)
        # One matmul per clip, not per chunk: a clip's rows then go through the same GEMM shape
        # whichever clips share its chunk (store extraction batches clips, `seld predict` does one
        # window at a time), so its features do not depend on its neighbours' count.
        power_t = torch.from_numpy(power)
        mel = torch.empty(*power.shape[:-1], cfg.n_mels, dtype=torch.float32)
        for j in range(len(power_t)):
            torch.matmul(power_t[j], mel_basis, out=mel[j])
        mel = mel.numpy()  # (c, ch, frames, n_mels)
        db = 10.0 * np.log10(np.maximum(mel, _AMIN))
        peak = db.reshape(len(db), -1).max(axis=1).reshape(-1, 1, 1, 1)
        out[i:i + chunk] = np.maximum(db, peak - cfg.top_db)
    return out.reshape(*lead, n_channels, n_out, cfg.n_mels)


def _log_mel_chunk(x: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """GPU path: (clips, channels, samples) -> (clips, channels, frames, n_mels) float32 dB."""
    device = str(x.device)
    n_clips, n_channels, _ = x.shape
    pad = cfg.n_fft // 2
    off = (cfg.n_fft - cfg.win_length) // 2  # librosa centres the short window inside n_fft
    xp = torch.nn.functional.pad(x.to(torch.float32), (pad, pad))
    frames = xp.unfold(-1, cfg.n_fft, cfg.hop_length)[..., off:off + cfg.win_length]
    # Window straight into a zero-edged float64 buffer of n_fft (one pass, no extra padding copy).
    windowed = torch.empty(*frames.shape[:-1], cfg.n_fft, dtype=torch.float64, device=x.device)
    windowed[..., :off] = 0.0
    windowed[..., off + cfg.win_length:] = 0.0
    torch.mul(frames, _window(cfg.win_length, device), out=windowed[..., off:off + cfg.win_length])
    spec = torch.view_as_real(torch.fft.rfft(windowed, dim=-1))  # (c, ch, frames, bins, 2)
    power = torch.addcmul(spec[..., 0].square(), spec[..., 1], spec[..., 1]).to(torch.float32)
    mel = torch.matmul(power, _mel_basis(cfg, device))  # (c, ch, frames, n_mels)
    db = 10.0 * torch.log10(mel.clamp_min(_AMIN))
    peak = db.reshape(n_clips, -1).amax(dim=1).reshape(n_clips, 1, 1, 1)
    return torch.maximum(db, peak - cfg.top_db)


def log_mel_librosa(audio: np.ndarray, cfg: FeatureConfig = DEFAULT_CONFIG) -> np.ndarray:
    """The official per-file recipe with librosa (spec §5), the reference for :func:`log_mel`.

    Args:
        audio: (2, n_samples) float32 waveform at ``cfg.sample_rate_hz``.

    Returns:
        (2, n_frames, n_mels) float32 dB; one ``power_to_db`` call over both channels.
    """
    stft = librosa.stft(y=np.asarray(audio, dtype=np.float32), n_fft=cfg.n_fft, hop_length=cfg.hop_length,
                        win_length=cfg.win_length, window="hann", center=True)
    power = np.abs(stft) ** 2
    mel = librosa.feature.melspectrogram(S=power, sr=cfg.sample_rate_hz, n_fft=cfg.n_fft, n_mels=cfg.n_mels,
                                         fmin=cfg.fmin_hz, fmax=cfg.fmax_hz)
    db = librosa.power_to_db(mel, top_db=cfg.top_db)
    return np.ascontiguousarray(np.swapaxes(db, -1, -2), dtype=np.float32)


def _check_wav_complete(path: Path) -> None:
    """Raise DataError if a RIFF/WAVE file's data chunk declares more bytes than the file holds.

    libsndfile reads a truncated wav without complaint (it just returns fewer frames), so a file cut
    short by an interrupted copy would otherwise pass as a shorter recording.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return  # not a plain RIFF wav (RF64, other containers): libsndfile checks it
        pos = 12
        while pos + 8 <= size:
            fh.seek(pos)
            chunk_id, chunk_size = struct.unpack("<4sI", fh.read(8))
            if chunk_id == b"data":
                if chunk_size != 0xFFFFFFFF and pos + 8 + chunk_size > size:
                    raise DataError(f"{path}: truncated wav: data chunk declares {chunk_size} bytes, "
                                    f"file holds {size - pos - 8}")
                return
            pos += 8 + chunk_size + (chunk_size & 1)
    raise DataError(f"{path}: corrupt wav: no 'data' chunk")


def load_audio(path, cfg: FeatureConfig = DEFAULT_CONFIG) -> np.ndarray:
    """Read a stereo wav with soundfile.

    Args:
        path: wav file.
        cfg: gives the target rate and clip length.

    Returns:
        float32 (2, n_samples) at ``cfg.sample_rate_hz``; n_samples >= clip length (shorter files are
        zero-padded to ``cfg.clip_s`` with a warning; longer files are returned whole).

    Raises:
        DataError: unreadable, corrupt or truncated file; mono or more than 2 channels.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such audio file")
    _check_wav_complete(path)
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise DataError(f"{path}: cannot decode audio ({e})") from None
    if data.shape[1] != 2:
        raise DataError(f"{path}: expected a stereo (2-channel) file, got {data.shape[1]} channel(s)")
    audio = np.ascontiguousarray(data.T)
    if sr != cfg.sample_rate_hz:
        log.warning("%s: sample rate %d Hz, resampling to %d Hz", path, sr, cfg.sample_rate_hz)
        audio = librosa.resample(audio, orig_sr=sr, target_sr=cfg.sample_rate_hz).astype(np.float32)
    n_clip = int(round(cfg.clip_s * cfg.sample_rate_hz))
    if audio.shape[1] < n_clip:
        log.warning("%s: %.3f s long, zero-padded to %.1f s", path, audio.shape[1] / cfg.sample_rate_hz, cfg.clip_s)
        audio = np.pad(audio, ((0, 0), (0, n_clip - audio.shape[1])))
    return audio
