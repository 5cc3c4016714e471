"""FOA -> stereo conversion, the organisers' recipe (spec §4).

Reads DCASE2024-style first-order Ambisonics recordings (`foa_dev/<sub>/*.wav`, 4 channels ACN/SN3D
W Y Z X at 24 kHz, any length, with FOA label CSVs at 100 ms in `metadata_dev/<sub>/*.csv`) and
writes 5-s stereo clips with 2025 labels (`stereo_dev/<split>/*.wav`, `metadata_dev/<split>/*.csv`):
per clip a viewing angle θ rotates the scene, L = W + Y_rot, R = W - Y_rot, azimuths are folded.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from seld import labels
from seld.config import N_LABEL_FRAMES, SAMPLE_RATE_HZ, SAMPLES_PER_LABEL_FRAME, SPLITS
from seld.errors import DataError, UserError
from seld.runfolder import atomic_write

log = logging.getLogger(__name__)

PEAK_LIMIT = 0.9999  # clips whose stereo peak exceeds this are discarded and redrawn (spec §4)
MAX_DRAWS_PER_RECORDING = 50  # redraws before a recording that always clips is given up
_NAME = re.compile(r"fold(\d+)_room(\d+)_mix(\d+)")


def foa_to_stereo(foa: np.ndarray, viewing_deg: float) -> np.ndarray:
    """Stereo from FOA for one viewing angle.

    Args:
        foa: (4, n_samples) ACN/SN3D channels W, Y, Z, X.
        viewing_deg: viewing angle θ in degrees (counter-clockwise, positive = left).

    Returns:
        (2, n_samples) float32 [L, R] with Y_rot = sin θ X + cos θ Y, L = W + Y_rot, R = W - Y_rot
        (no scaling). A plane wave from azimuth φ, elevation ε gives L = 1 + sin(φ + θ) cos ε.
    """
    foa = np.asarray(foa)
    if foa.ndim != 2 or foa.shape[0] != 4:
        raise ValueError(f"foa_to_stereo: expected (4, n_samples) W Y Z X, got shape {foa.shape}")
    theta = np.deg2rad(viewing_deg)
    w, y, x = foa[0].astype(np.float64), foa[1].astype(np.float64), foa[3].astype(np.float64)
    y_rot = np.sin(theta) * x + np.cos(theta) * y
    return np.stack([w + y_rot, w - y_rot]).astype(np.float32)


def rotate_labels(foa_events: np.ndarray, viewing_deg: float) -> np.ndarray:
    """FOA events -> stereo events for a viewing angle.

    Args:
        foa_events: array of ``labels.FOA_EVENT_DTYPE`` (azimuth in degrees, distance in cm).
        viewing_deg: viewing angle θ in degrees.

    Returns:
        ``labels.EVENT_DTYPE`` events: azimuth = fold(wrap(az + θ)) in [-90, 90], elevation dropped,
        frame, class, source and distance (cm) kept, onscreen 0 (the audio-only task does not use it).
    """
    ev = np.asarray(foa_events)
    out = np.zeros(len(ev), dtype=labels.EVENT_DTYPE)
    for name in ("frame", "class", "source", "distance"):
        out[name] = ev[name]
    out["azimuth"] = labels.fold_azimuth(np.asarray(ev["azimuth"], dtype=np.float64) + viewing_deg)
    return out


@dataclass(frozen=True)
class FoaRecording:
    """One FOA recording and its label file."""

    wav: Path
    csv: Path
    fold: int
    room: int
    mix: int


def find_foa_recordings(foa_root: str | Path) -> list[FoaRecording]:
    """All (wav, csv) pairs under any ``foa_dev/[<sub>/]*.wav`` below ``foa_root``.

    Subfolder names are free; each wav needs ``metadata_dev/<same sub>/<same stem>.csv`` next to its
    ``foa_dev``, and its name must contain ``fold<F>_room<R>_mix<M>`` (as DCASE2024 names do).

    Raises:
        UserError: no ``foa_dev`` folder with wavs under ``foa_root``.
        DataError: a wav without its csv, or a name without fold/room/mix (all listed).
    """
    root = Path(foa_root)
    if not root.is_dir():
        raise UserError(f"{root}: FOA root folder does not exist")
    foa_dirs = sorted(p for p in [root, *root.rglob("*")] if p.is_dir() and p.name == "foa_dev")
    recordings, missing, unnamed = [], [], []
    for foa_dir in foa_dirs:
        meta_dir = foa_dir.parent / "metadata_dev"
        for wav in sorted(foa_dir.rglob("*.wav")):
            rel = wav.relative_to(foa_dir)
            csv = (meta_dir / rel).with_suffix(".csv")
            if not csv.is_file():
                missing.append(f"{wav} (expected {csv})")
                continue
            m = _NAME.search(wav.stem)
            if not m:
                unnamed.append(str(wav))
                continue
            recordings.append(FoaRecording(wav, csv, *(int(g) for g in m.groups())))
    if missing:
        raise DataError(f"{len(missing)} FOA wav file(s) without a label csv: " + "; ".join(missing))
    if unnamed:
        raise DataError("FOA wav names must contain fold<F>_room<R>_mix<M> (as in DCASE2024): "
                        + "; ".join(unnamed))
    if not recordings:
        raise UserError(f"{root}: no FOA recordings found; expected <root>/**/foa_dev/<sub>/*.wav with "
                        "<root>/**/metadata_dev/<sub>/*.csv (DCASE2024 layout)")
    return recordings


def _read_foa(rec: FoaRecording) -> tuple[sf.SoundFile, int]:
    """Open a recording, check its format; returns (open file, n_label_frames)."""
    try:
        f = sf.SoundFile(str(rec.wav))
    except (sf.LibsndfileError, RuntimeError) as e:
        raise DataError(f"{rec.wav}: cannot decode audio ({e})") from None
    if f.channels != 4:
        f.close()
        raise DataError(f"{rec.wav}: expected 4 FOA channels (W Y Z X), got {f.channels}")
    if f.samplerate != SAMPLE_RATE_HZ:
        f.close()
        raise DataError(f"{rec.wav}: FOA audio must be {SAMPLE_RATE_HZ} Hz, got {f.samplerate} Hz")
    return f, f.frames // SAMPLES_PER_LABEL_FRAME


def _write_wav(path: Path, stereo: np.ndarray) -> None:
    with atomic_write(path) as tmp:
        sf.write(str(tmp), stereo.T, SAMPLE_RATE_HZ, subtype="PCM_16", format="WAV")


def convert_foa(foa_root: str | Path, out_root: str | Path, split: str, n_clips: int, seed: int = 0,
                progress: bool = False) -> list[Path]:
    """Cut ``n_clips`` random 5-s stereo clips from the FOA recordings under ``foa_root``.

    Recordings are visited in a seeded random order, one clip per recording per round, until
    ``n_clips`` are written. Per clip: viewing angle θ ~ U{0..359}, start frame ~ U{0..len-50}
    (100 ms frames), audio samples [start*2400, (start+50)*2400), labels shifted by -start (rows
    outside the clip dropped) and rotated (:func:`rotate_labels`). A clip whose peak exceeds
    0.9999 is redrawn. Recordings shorter than 5 s are skipped with a warning.

    Args:
        foa_root: folder searched for ``foa_dev``/``metadata_dev`` (see :func:`find_foa_recordings`).
        out_root: dataset root; writes ``stereo_dev/<split>/<name>.wav`` (24 kHz, 16-bit) and
            ``metadata_dev/<split>/<name>.csv`` with names
            ``fold<F>_room<R>_mix<NNN>_deg<VVV>_start<SSSS>``.
        split: split folder, one of ``config.SPLITS`` (e.g. ``dev-train-synth``).
        n_clips: number of clips to write.
        seed: the same seed and inputs give the same clips, byte for byte.
        progress: show a progress bar (stderr).

    Returns:
        Paths of the written wav files, in the order they were drawn.
    """
    if split not in SPLITS:
        raise UserError(f"--split {split!r}: unknown split folder; choose one of {', '.join(SPLITS)}")
    if n_clips < 0:
        raise UserError(f"--clips {n_clips}: must be >= 0")
    recs = find_foa_recordings(foa_root)
    rng = np.random.default_rng(seed)
    out_root = Path(out_root)
    wav_dir, csv_dir = out_root / "stereo_dev" / split, out_root / "metadata_dev" / split

    usable = []
    for rec in recs:
        f, n_frames = _read_foa(rec)
        f.close()
        if n_frames < N_LABEL_FRAMES:
            log.warning("%s: %.2f s long, shorter than a 5-s clip; skipped", rec.wav,
                        n_frames * SAMPLES_PER_LABEL_FRAME / SAMPLE_RATE_HZ)
            continue
        usable.append((rec, n_frames, labels.read_foa_csv(rec.csv)))
    if n_clips and not usable:
        raise DataError(f"{foa_root}: no FOA recording is at least 5 s long")

    written: list[Path] = []
    taken: set[str] = set()
    bar = tqdm(total=n_clips, desc=f"convert-foa {split}", unit="clip", disable=not progress)
    order = rng.permutation(len(usable)) if usable else np.zeros(0, int)
    while len(written) < n_clips and len(order):
        given_up = []
        for idx in order:
            if len(written) >= n_clips:
                break
            rec, n_frames, events = usable[idx]
            path = _draw_clip(rec, n_frames, events, rng, wav_dir, csv_dir, taken)
            if path is None:
                given_up.append(idx)
                log.warning("%s: every one of %d draws peaked above %.4f; recording dropped", rec.wav,
                            MAX_DRAWS_PER_RECORDING, PEAK_LIMIT)
            else:
                written.append(path)
                bar.update()
        order = np.array([i for i in order if i not in given_up], dtype=int)
    bar.close()
    if len(written) < n_clips:
        raise DataError(f"{foa_root}: only {len(written)} of {n_clips} clips could be drawn without clipping")
    log.info("wrote %d stereo clips to %s", len(written), wav_dir)
    return written


def _draw_clip(rec: FoaRecording, n_frames: int, events: np.ndarray, rng: np.random.Generator,
               wav_dir: Path, csv_dir: Path, taken: set[str]) -> Path | None:
    """Draw (θ, start) until the clip stays under the peak limit and its name is new; write it."""
    with sf.SoundFile(str(rec.wav)) as f:
        for _ in range(MAX_DRAWS_PER_RECORDING):
            viewing_deg = int(rng.integers(0, 360))
            start = int(rng.integers(0, n_frames - N_LABEL_FRAMES + 1))
            name = f"fold{rec.fold}_room{rec.room}_mix{rec.mix:03d}_deg{viewing_deg:03d}_start{start:04d}"
            if name in taken:
                continue
            f.seek(start * SAMPLES_PER_LABEL_FRAME)
            foa = f.read(N_LABEL_FRAMES * SAMPLES_PER_LABEL_FRAME, dtype="float32", always_2d=True).T
            stereo = foa_to_stereo(foa, viewing_deg)
            if np.abs(stereo).max() > PEAK_LIMIT:
                continue
            in_clip = (events["frame"] >= start) & (events["frame"] < start + N_LABEL_FRAMES)
            clip_events = rotate_labels(events[in_clip], viewing_deg)
            clip_events["frame"] -= start
            taken.add(name)
            _write_wav(wav_dir / f"{name}.wav", stereo)
            labels.write_csv(csv_dir / f"{name}.csv", clip_events)
            return wav_dir / f"{name}.wav"
    return None
