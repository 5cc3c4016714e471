"""Prediction: a trained run's selected checkpoint + thresholds -> one DCASE2025 CSV per wav.

Reads wavs of any length (24 kHz stereo), cuts them into 5-s windows (120 000 samples, zero-padded
at the end), computes the official log-mel (2, 251, 64) per window exactly as the feature store did
(same function, quantised to the store dtype), normalises with the run's statistics and runs the
model in eval mode in batches of the run's batch size; window w gives label frames 50w .. 50w+49
(100 ms), so the alignment rule of the 5-s clips holds across windows. Also the pure-torch helpers
that training uses for validation and test, so both paths feed the model the same numbers.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from seld import labels
from seld.config import (
    N_LABEL_FRAMES,
    SAMPLES_PER_LABEL_FRAME,
    ConfigError,
    ExperimentConfig,
    from_dict,
)
from seld.errors import DataError, UserError
from seld.postprocess import decode_outputs
from seld.runfolder import CHECKPOINT_DIR, SELECTED, THRESHOLDS, load_thresholds, read_model_file

log = logging.getLogger(__name__)

# --- Checkpoints -------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model ready for inference with what it needs to be fed like in training.

    mean, std: float32 (2, 1, n_mels) feature normalisation of the run (None when not normalised).
    """

    model: torch.nn.Module
    cfg: ExperimentConfig
    mean: np.ndarray | None
    std: np.ndarray | None
    meta: dict = field(default_factory=dict)


def load_weights(model: torch.nn.Module, state: dict, path: str | Path) -> None:
    """Load a state dict, turning a shape/key mismatch into a DataError naming the checkpoint."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[:3]
        raise DataError(f"{path}: checkpoint does not fit this model config ({' '.join(first)})") from None


def load_model(path: str | Path, device: str = "cpu") -> LoadedModel:
    """Build the model of a checkpoint's own config and load its weights (eval mode)."""
    from seld.model import build_model

    blob = read_model_file(path)
    try:
        cfg = from_dict(ExperimentConfig, json.loads(blob["config"]))
    except (ConfigError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: checkpoint config is not valid ({e})") from None
    model = build_model(cfg.model, n_mels=cfg.features.n_mels)
    load_weights(model, blob["model"], path)
    model.to(device).eval()
    mean = None if blob.get("norm_mean") is None else blob["norm_mean"].numpy()
    std = None if blob.get("norm_std") is None else blob["norm_std"].numpy()
    return LoadedModel(model, cfg, mean, std, dict(blob.get("meta") or {}))


# --- The one forward path (training validation/test and prediction) ----------------------------------
PRECISION_ENV = "SELD_PRECISION"


def precision_override() -> str:
    """The machine-wide precision switch: ``$SELD_PRECISION``, read by :func:`bf16_autocast`.

    ``auto`` (unset): the hardware decides. ``float32``: every run of this process and its Ray workers
    trains and infers in float32, as a machine without native bf16 does. ``bf16``: bf16 autocast on
    every CPU (emulated, slower, where there is no AMX) and on CUDA GPUs with bf16, as a machine with
    native bf16 does. The test suite runs in each mode on any machine this way.
    """
    value = os.environ.get(PRECISION_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "float32", "bf16"):
        raise UserError(f"${PRECISION_ENV}={os.environ[PRECISION_ENV]!r}: expected 'auto', 'float32' or 'bf16'")
    return value


def bf16_autocast(device, wanted: bool = True) -> bool:
    """Whether training and inference on `device` run under bf16 autocast (`train.amp_bf16`).

    Only where the hardware computes bf16 natively: CUDA GPUs with bf16 (Ampere and newer), and CPUs
    whose bf16 matmul measures faster than their float32 one (:func:`cpu_bf16_decision`: AMX or
    AVX512-BF16, confirmed by a timing). A `local` training step is then 1.4-2.2x faster
    (bench/step_profile.py --precision both, BENCHMARKS.md). Other CPUs emulate bf16 more slowly
    than they compute float32, so they stay in float32. A run records the result as `precision`
    (and its reason as `precision_reason`) in metrics.json; ``SELD_PRECISION=float32|bf16``
    (:func:`precision_override`) forces one precision; bf16 and float32 runs of one config are
    different computations (bf16 keeps 8 bits of mantissa), so compare figures of the same precision.
    """
    return precision_decision(device, wanted)[0]


def precision_decision(device, wanted: bool = True) -> tuple[bool, str]:
    """(bf16 autocast on `device`, the reason in words): what :func:`bf16_autocast` decides and why."""
    dev = torch.device(device)
    override = precision_override()
    if not wanted:
        return False, "train.amp_bf16=false"
    if override != "auto":
        return override == "bf16", f"${PRECISION_ENV}={override}"
    if dev.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, "CUDA device with bf16" if ok else "CUDA device without bf16"
    if dev.type == "cpu":
        return cpu_bf16_decision()
    return False, f"{dev.type}: float32"


# The measured bf16/float32 matmul speed ratio a CPU must reach for bf16 autocast. Native bf16 CPUs
# measure 2.26x (AVX512-BF16, AMD EPYC Zen 4) and more with AMX; emulated bf16 measures below 1.
BF16_MIN_SPEEDUP = 1.3


@functools.cache
def cpu_bf16_decision() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, from its instruction set *and* a measurement.

    Candidates are CPUs with AMX tiles or AVX512-BF16 (what oneDNN uses for bf16 matmuls and
    convolutions). A flag alone is not trusted (a hypervisor can expose a flag that the host
    emulates, and oneDNN may not use it): the candidate's bf16 matmul is timed against float32 on
    the threads this process runs with, interleaved and best-of-N, so a transient load hits both
    alike. bf16 is chosen when it is at least :data:`BF16_MIN_SPEEDUP` times faster. Measured once
    per process (about 0.1 s)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch >= 2.4; private but stable
    avx = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    isa = "AMX" if amx and amx() else "AVX512-BF16" if avx and avx() else None
    if isa is None:
        return False, "CPU without AMX or AVX512-BF16: float32"
    speedup = _bf16_matmul_speedup()
    ok = speedup >= BF16_MIN_SPEEDUP
    verdict = "bf16" if ok else "float32"
    return ok, f"{isa}, bf16 matmul measured {speedup:.2f}x float32 (>= {BF16_MIN_SPEEDUP} for bf16): {verdict}"


def _bf16_matmul_speedup(n: int = 512, reps: int = 7) -> float:
    """Best-of-`reps` float32 time / best bf16 time of an (n, n) @ (n, n) matmul, interleaved."""
    g = torch.Generator().manual_seed(0)
    a32 = torch.randn(n, n, generator=g)
    b32 = torch.randn(n, n, generator=g)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    best = {torch.float32: math.inf, torch.bfloat16: math.inf}
    for _ in range(2):  # warm-up: oneDNN builds its kernels on first use
        a32 @ b32, a16 @ b16
    for _ in range(reps):
        for a, b in ((a32, b32), (a16, b16)):
            t0 = time.perf_counter()
            for _ in range(4):
                a @ b
            best[a.dtype] = min(best[a.dtype], time.perf_counter() - t0)
    return best[torch.float32] / best[torch.bfloat16]


def _cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; platform.processor() elsewhere), or "unknown"."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_record(device) -> dict[str, str]:
    """What the numbers of a run depend on beyond its config, seed and data: the device, and on
    CPU the instruction set ATen's vectorised kernels were dispatched to. Float32 kernels round
    differently across instruction sets and devices, so one config and seed trained on two kinds of
    machine agree to about 5 digits at first and drift apart over epochs (docs/reproducibility.md).
    Recorded in metrics.json as ``machine/*``; ``machine/kind`` is the one-line summary the study
    tables quote (no commas: a caption lists kinds comma-separated)."""
    dev = torch.device(device)
    cpu = _cpu_model()
    capability = torch.backends.cpu.get_cpu_capability()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    kind = f"{name} / " if dev.type == "cuda" else ""
    kind += f"{capability} {cpu} / torch {torch.__version__}"
    return {"machine/device": name, "machine/cpu": cpu, "machine/cpu_capability": capability,
            "machine/torch": torch.__version__, "machine/kind": kind.replace(",", "")}


def prepare_batch(features: np.ndarray, mean, std, device) -> torch.Tensor:
    """Store-dtype features (B, 2, T, n_mels) -> normalised float32 tensor on `device`."""
    x = torch.from_numpy(np.ascontiguousarray(features)).to(device=device).float()
    if mean is not None:
        m = torch.as_tensor(mean, device=device)
        s = torch.as_tensor(std, device=device)
        x = (x - m) / s
    return x


@torch.no_grad()
def infer(model: torch.nn.Module, features: np.ndarray, mean, std, batch_size: int,
          device="cpu", amp_bf16: bool = False) -> np.ndarray:
    """Model outputs of store-dtype features, in eval mode, in consecutive batches of `batch_size`.

    Args:
        features: (n, 2, 251, n_mels) in the store dtype (e.g. float16).
    Returns:
        float32 (n, 50, 13, 3) ACCDOA or (n, 50, 3, 13, 3) multi-ACCDOA, (x, y, distance_m).
    """
    was_training = model.training
    model.eval()
    outs = []
    dev = torch.device(device)
    for start in range(0, len(features), batch_size):
        x = prepare_batch(features[start:start + batch_size], mean, std, dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp_bf16):
            y = model(x)
        outs.append(y.float().cpu().numpy())
    model.train(was_training)
    if not outs:
        return np.zeros((0, N_LABEL_FRAMES), dtype=np.float32)
    return np.concatenate(outs)


# --- Wav folders ------------------------------------------------------------------------------------
def window_audio(audio: np.ndarray, clip_samples: int) -> tuple[np.ndarray, int]:
    """Cut (2, n) audio into 5-s windows.

    Returns:
        (windows float32 (n_windows, 2, clip_samples), n_label_frames of the recording =
        ceil(n / 2400)); the last window is zero-padded.
    """
    n = audio.shape[1]
    n_win = max(1, -(-n // clip_samples))
    padded = np.zeros((2, n_win * clip_samples), dtype=np.float32)
    padded[:, :n] = audio
    windows = padded.reshape(2, n_win, clip_samples).transpose(1, 0, 2)
    return np.ascontiguousarray(windows), max(1, -(-n // SAMPLES_PER_LABEL_FRAME))


def features_of_wav(path: Path, cfg: ExperimentConfig) -> tuple[np.ndarray, int]:
    """Store-dtype log-mel of each 5-s window of a wav: ((n_windows, 2, 251, n_mels), n_frames)."""
    from seld.features import load_audio, log_mel

    audio = load_audio(path, cfg.features)
    clip_samples = int(round(cfg.features.clip_s * cfg.features.sample_rate_hz))
    windows, n_frames = window_audio(audio, clip_samples)
    feats = np.stack([log_mel(w, cfg.features.sample_rate_hz, cfg.features) for w in windows])
    return feats.astype(cfg.features.store_dtype), n_frames


def stitch(outputs: np.ndarray, n_frames: int) -> np.ndarray:
    """Concatenate per-window outputs (n_windows, 50, ...) along time and cut to n_frames."""
    return np.concatenate(list(outputs), axis=0)[:n_frames]


@dataclass
class PredictReport:
    """What predict_dir did: CSVs written and per-file errors (path, message)."""

    written: list[Path]
    errors: list[tuple[Path, str]]


def resolve_checkpoint(run_dir: Path, checkpoint: str | Path | None) -> Path:
    """The checkpoint to use: the given one (a path, or a name inside RUN/checkpoints) or the run's
    selected one."""
    if checkpoint is None:
        path = run_dir / CHECKPOINT_DIR / SELECTED
        if not path.is_file():
            raise UserError(f"{run_dir}: no {CHECKPOINT_DIR}/{SELECTED}; has the training run finished? "
                            "(choose one with --checkpoint)")
        return path
    path = Path(checkpoint)
    if not path.is_file() and (run_dir / CHECKPOINT_DIR / path).is_file():
        path = run_dir / CHECKPOINT_DIR / path
    if not path.is_file():
        raise UserError(f"{checkpoint}: no such checkpoint (nor in {run_dir / CHECKPOINT_DIR})")
    return path


def predict_dir(run_dir: str | Path, wav_dirs: str | Path | Sequence[str | Path], out_dir: str | Path,
                checkpoint: str | Path | None = None, thresholds: float | None = None,
                device: str = "cpu") -> PredictReport:
    """Write one DCASE2025 CSV per wav of each folder into `out_dir` (same stem).

    Args:
        run_dir: a finished training run (checkpoints/selected.pt, thresholds.json).
        wav_dirs: one or more folders of wavs (each processed in sorted order, in batches of the
            run's batch size, as the run scored its test split).
        checkpoint: another checkpoint (path or name in RUN/checkpoints); default the selected one.
        thresholds: one activity threshold for all classes (e.g. 0.5); default RUN/thresholds.json.
    Returns:
        PredictReport; files that fail (corrupt, mono, ...) are listed with their error, the others
        are still written.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    loaded = load_model(resolve_checkpoint(run_dir, checkpoint), device)
    cfg = loaded.cfg
    if thresholds is None:
        thr_path = run_dir / THRESHOLDS
        if not thr_path.is_file():
            raise UserError(f"{thr_path}: missing; pass --threshold 0.5 to predict without it")
        thr = load_thresholds(thr_path)
    else:
        thr = float(thresholds)
    dirs = [wav_dirs] if isinstance(wav_dirs, str | Path) else list(wav_dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = PredictReport([], [])
    for wav_dir in map(Path, dirs):
        if not wav_dir.is_dir():
            raise UserError(f"{wav_dir}: no such folder of wav files")
        wavs = sorted(p for p in wav_dir.iterdir() if p.suffix.lower() == ".wav")
        if not wavs:
            log.warning("%s: no .wav files", wav_dir)
        feats, spans = [], []
        for path in wavs:
            try:
                f, n_frames = features_of_wav(path, cfg)
            except (DataError, ValueError, OSError) as e:
                report.errors.append((path, str(e)))
                log.debug("%s", e)  # the caller reports the failed files (`seld predict`: one line)
                continue
            spans.append((path, len(f), n_frames))
            feats.append(f)
        if not feats:
            continue
        outputs = infer(loaded.model, np.concatenate(feats), loaded.mean, loaded.std,
                        cfg.train.batch_size, device, bf16_autocast(device, cfg.train.amp_bf16))
        start = 0
        for path, n_win, n_frames in spans:
            out = stitch(outputs[start:start + n_win], n_frames)
            start += n_win
            events = decode_outputs(out[None], cfg.model.output_format, thr)[0]
            target = out_dir / (path.stem + ".csv")
            labels.write_csv(target, events)
            report.written.append(target)
        # DEBUG: the caller says what was written in all (`seld predict`: one line on stdout).
        log.debug("%s: %d CSVs written to %s", wav_dir, len(spans), out_dir)
    return report


__all__ = ["LoadedModel", "PredictReport", "infer", "load_model", "predict_dir"]
