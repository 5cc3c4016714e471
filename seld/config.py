"""Typed, frozen configuration for every stage, the presets, and dotted-key overrides.

One source for every setting: the CLI (`--set model.n_conformer_layers=2`), study variants and
Tune search spaces all go through :func:`apply_overrides`. Configs are saved as JSON
(:func:`to_dict` / :func:`from_dict`), never pickled. Defaults are the paper's where it gives one.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

# --- Fixed facts of the DCASE2025 stereo task (spec §1-3) --------------------------------------
CLASS_NAMES: tuple[str, ...] = (
    "Female speech",
    "Male speech",
    "Clapping",
    "Telephone",
    "Laughter",
    "Domestic sounds",
    "Walk, footsteps",
    "Door, open or close",
    "Music",
    "Musical instrument",
    "Water tap, faucet",
    "Bell",
    "Knock",
)
N_CLASSES = len(CLASS_NAMES)
SAMPLE_RATE_HZ = 24_000
CLIP_S = 5.0
N_CLIP_SAMPLES = 120_000
LABEL_HOP_S = 0.1
N_LABEL_FRAMES = 50
FEATURE_HOP_S = 0.02
N_FEATURE_FRAMES = 251
# Alignment rule (docs/DESIGN.md): label frame f covers feature frames 5f .. 5f+4; frame 250 is dropped.
FEATURE_FRAMES_PER_LABEL = 5
SAMPLES_PER_LABEL_FRAME = 2_400

# Split folders of the DCASE2025 layout and what each is for (docs/DESIGN.md split table).
SPLITS: dict[str, dict[str, str]] = {
    "dev-train-tau": {"domain": "real", "role": "train", "site": "tau"},
    "dev-train-sony": {"domain": "real", "role": "train", "site": "sony"},
    "dev-test-tau": {"domain": "real", "role": "test", "site": "tau"},
    "dev-test-sony": {"domain": "real", "role": "test", "site": "sony"},
    "dev-train-synth": {"domain": "synthetic", "role": "train", "site": "synth"},
    "dev-test-synth": {"domain": "synthetic", "role": "test", "site": "synth"},
}


def sabine_absorption(size_m, rt60_s: float) -> float:
    """Mean absorption coefficient of a shoebox room of ``size_m`` (x, y, z in m) with reverberation
    time ``rt60_s`` (s), from Sabine's formula RT60 = 0.161 V / (S ᾱ); above 1 the RT60 is impossible."""
    lx, ly, lz = size_m
    return 0.161 * (lx * ly * lz) / (2.0 * (lx * ly + lx * lz + ly * lz) * rt60_s)


class ConfigError(ValueError):
    """A configuration value or override key is invalid; the message names the field."""


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def _check_literal(obj: Any) -> None:
    """Check every `Literal[...]` field of a dataclass instance against its allowed values."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp = hints[f.name]
        if typing.get_origin(tp) is Literal:
            allowed = typing.get_args(tp)
            value = getattr(obj, f.name)
            _check(value in allowed, f"{type(obj).__name__}.{f.name}", f"{value!r} is not one of {allowed}")


# --- Per-concern configs -------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureConfig:
    """Official log-mel recipe (spec §5). Changing any field changes the store's hash."""

    sample_rate_hz: int = SAMPLE_RATE_HZ  # audio is resampled to this rate on load
    # Clip length; shorter files are zero-padded with a warning. Fixed at 5 s: the models, targets
    # and stitching are built for 50 label frames of 100 ms (checked below).
    clip_s: float = CLIP_S
    win_length: int = 960  # STFT window, samples (40 ms Hann)
    # STFT hop, samples: fixed at 20 ms (480 at 24 kHz), 5 feature frames per label frame (checked).
    hop_length: int = 480
    n_fft: int = 1024  # DFT size
    n_mels: int = 64  # mel bands (librosa Slaney mel, fmin..fmax)
    fmin_hz: float = 0.0
    fmax_hz: float = 12_000.0
    top_db: float = 80.0  # power_to_db floor relative to the loudest bin of the stereo clip
    store_dtype: Literal["float16", "float32"] = "float16"  # feature precision in the Parquet store

    def __post_init__(self) -> None:
        _check_literal(self)
        _check(self.sample_rate_hz > 0, "features.sample_rate_hz", "must be > 0")
        _check(0 < self.win_length <= self.n_fft, "features.win_length", "must be in (0, n_fft]")
        _check(self.clip_s == CLIP_S, "features.clip_s",
               f"the models and targets are built for {CLIP_S:g}-s clips ({N_LABEL_FRAMES} label frames of "
               f"{LABEL_HOP_S:g} s), got {self.clip_s}")
        hop = round(FEATURE_HOP_S * self.sample_rate_hz)
        _check(self.hop_length == hop, "features.hop_length",
               f"the label alignment needs {FEATURE_HOP_S * 1000:g}-ms frames ({hop} samples at "
               f"{self.sample_rate_hz} Hz, {N_FEATURE_FRAMES} per clip), got {self.hop_length}")
        _check(0 <= self.fmin_hz < self.fmax_hz <= self.sample_rate_hz / 2, "features.fmax_hz",
               "need 0 <= fmin_hz < fmax_hz <= sample_rate_hz / 2")


@dataclass(frozen=True)
class SynthConfig:
    """Generated dataset (seld/synth): FOA scenes in shoebox rooms, converted to stereo clips.

    Two domains: "synthetic" (dev-*-synth; DCASE2024-style, moderate rooms and noise, balanced
    classes) and "real-like" (dev-*-tau/sony; other rooms, more noise, a device response, level
    variation and a STARSS23-like skewed class balance). Every field enters the dataset hash.
    """

    seed: int = 0
    n_synth_train: int = 1000  # 5-s clips in dev-train-synth
    n_synth_test: int = 200  # 5-s clips in dev-test-synth
    n_real_train: int = 400  # 5-s clips over dev-train-tau + dev-train-sony
    n_real_test: int = 200  # 5-s clips over dev-test-tau + dev-test-sony
    recording_s: float = 30.0  # length of each generated FOA recording that clips are cut from
    # 5-s clips cut per 5 s of FOA recording (> 1: clips overlap in time with different viewing
    # angles, as the official stereo set reuses its FOA recordings); halves the work at 2.
    clip_reuse: float = 1.0
    distance_m_range: tuple[float, float] = (0.5, 5.0)
    elevation_deg_range: tuple[float, float] = (-45.0, 45.0)
    max_polyphony: int = 3  # simultaneous events at most (one track each)
    first_track_fill: float = 0.7  # fraction of time track 0 is busy; track i is busy fill * 0.5**i
    same_class_overlap_p: float = 0.1  # chance an event may share its class with an overlapping one
    moving_fraction: float = 0.3  # fraction of events that move
    max_speed_deg_s: float = 40.0  # moving sources turn at 10..max deg/s around the microphone
    classes: tuple[int, ...] = tuple(range(N_CLASSES))  # classes that may occur
    # Synthetic domain
    rt60_s_range: tuple[float, float] = (0.2, 0.5)
    room_size_m_min: tuple[float, float, float] = (6.0, 5.0, 2.8)  # length, width, height
    room_size_m_max: tuple[float, float, float] = (10.0, 8.0, 4.0)
    snr_db_range: tuple[float, float] = (10.0, 30.0)  # event mixture vs diffuse ambience, FOA W
    level_db_range: tuple[float, float] = (-6.0, 0.0)  # per-event level
    class_weights: tuple[float, ...] = ()  # 13 relative weights; () = balanced
    n_synth_train_rooms: int = 8
    n_synth_test_rooms: int = 2
    # Real-like domain (dev-*-tau, dev-*-sony)
    real_rt60_s_range: tuple[float, float] = (0.3, 0.8)
    real_room_size_m_min: tuple[float, float, float] = (5.0, 4.5, 2.6)
    real_room_size_m_max: tuple[float, float, float] = (9.0, 7.0, 3.5)
    real_snr_db_range: tuple[float, float] = (5.0, 20.0)
    real_level_db_range: tuple[float, float] = (-12.0, 0.0)
    real_gain_db_range: tuple[float, float] = (-6.0, 3.0)  # per-recording level variation
    real_device_response: bool = True  # random high-pass, resonance and low-pass per recording
    # STARSS23-like: speech and music dominate; door, tap, bell, knock are rare.
    real_class_weights: tuple[float, ...] = (20.0, 20.0, 5.0, 4.0, 10.0, 6.0, 7.0, 3.0, 12.0, 6.0, 3.0, 2.0, 2.0)
    n_real_train_rooms_per_site: int = 3  # >= 2 so whole rooms can be held out for validation
    n_real_test_rooms_per_site: int = 2

    def __post_init__(self) -> None:
        lo, hi = self.distance_m_range
        _check(0 < lo < hi, "synth.distance_m_range", f"need 0 < min < max, got {self.distance_m_range}")
        lo, hi = self.elevation_deg_range
        _check(-90 <= lo <= hi <= 90, "synth.elevation_deg_range", "need -90 <= min <= max <= 90")
        _check(1 <= self.max_polyphony <= 6, "synth.max_polyphony", "must be in 1..6")
        _check(0 < self.first_track_fill < 1, "synth.first_track_fill", "must be in (0, 1)")
        _check(0 <= self.same_class_overlap_p <= 1, "synth.same_class_overlap_p", "must be in [0, 1]")
        _check(0 <= self.moving_fraction <= 1, "synth.moving_fraction", "must be in [0, 1]")
        _check(self.max_speed_deg_s >= 0, "synth.max_speed_deg_s", "must be >= 0")
        _check(self.recording_s >= CLIP_S, "synth.recording_s", f"must be >= {CLIP_S}")
        _check(0 < self.clip_reuse <= 10, "synth.clip_reuse", "must be in (0, 10]")
        bad = [c for c in self.classes if not 0 <= c < N_CLASSES]
        _check(not bad and len(self.classes) > 0, "synth.classes", f"unknown class ids {bad}; valid 0..{N_CLASSES - 1}")
        for name in ("n_synth_train", "n_synth_test", "n_real_train", "n_real_test"):
            _check(getattr(self, name) >= 0, f"synth.{name}", "must be >= 0")
        for name in ("n_synth_train_rooms", "n_synth_test_rooms", "n_real_test_rooms_per_site"):
            _check(getattr(self, name) >= 1, f"synth.{name}", "must be >= 1")
        _check(self.n_real_train_rooms_per_site >= 2, "synth.n_real_train_rooms_per_site",
               "must be >= 2 (whole train rooms are held out for validation)")
        for name in ("class_weights", "real_class_weights"):
            w = getattr(self, name)
            _check(len(w) in ((0, N_CLASSES) if name == "class_weights" else (N_CLASSES,)), f"synth.{name}",
                   f"needs {N_CLASSES} weights, got {len(w)}")
            _check(all(v >= 0 for v in w), f"synth.{name}", "weights must be >= 0")
            if w:
                _check(sum(w[c] for c in self.classes) > 0, f"synth.{name}", "no weight on any class in synth.classes")
        for prefix in ("", "real_"):
            rt_name = f"synth.{prefix}rt60_s_range"
            lo, hi = getattr(self, f"{prefix}rt60_s_range")
            _check(0 < lo <= hi, rt_name, f"need 0 < min <= max, got {(lo, hi)}")
            smin, smax = getattr(self, f"{prefix}room_size_m_min"), getattr(self, f"{prefix}room_size_m_max")
            room = f"synth.{prefix}room_size_m_min"
            _check(all(0 < a <= b for a, b in zip(smin, smax, strict=True)), room,
                   f"impossible room: need 0 < min <= max per dimension, got min {smin}, max {smax}")
            # The microphone must sit at least (nearest source distance + 0.3 m) from every side wall,
            # so that a source at the nearest distance fits in every horizontal direction.
            need = 2 * (self.distance_m_range[0] + 0.3) + 0.2
            _check(min(smin[:2]) >= need, room, f"impossible room: length and width must be >= {need:.2f} m "
                   f"to hold a source at {self.distance_m_range[0]} m from the microphone, got {smin}")
            _check(smin[2] >= 2.0, room, f"impossible room: height must be >= 2.0 m, got {smin[2]}")
            alpha = sabine_absorption(smax, lo)
            _check(alpha < 0.95, rt_name, f"impossible room: RT60 {lo} s needs absorption {alpha:.2f} "
                   f"(>= 0.95) in the largest room {smax}; raise the RT60 or shrink the room")
            for r in ("snr_db_range", "level_db_range"):
                a, b = getattr(self, f"{prefix}{r}")
                _check(a <= b, f"synth.{prefix}{r}", f"need min <= max, got {(a, b)}")
        a, b = self.real_gain_db_range
        _check(a <= b, "synth.real_gain_db_range", f"need min <= max, got {(a, b)}")


@dataclass(frozen=True)
class DataConfig:
    """Which store rows each stage reads (docs/DESIGN.md split table)."""

    # Rooms of the real train folders held out as validation; empty = the last room of each site.
    val_rooms: tuple[int, ...] = ()
    # "dcase": select on validation rooms, test on dev-test. "paper": tune on dev-test (as the paper did).
    protocol: Literal["dcase", "paper"] = "dcase"
    # Stage 1 draws synthetic clips at this many per real clip each epoch (None = all of them).
    stage1_synth_per_real: float | None = None
    stage1_domains: tuple[str, ...] = ("synthetic", "real")  # ("synthetic",) = stage 1 on synthetic only
    # How a Train worker holds its share of the training rows: "auto" = choose per run (materialise
    # when the share fits in `memory_fraction` of the worker's memory, else stream; the log says
    # which and why), true = hold it in memory once, false = stream it from Parquet every epoch.
    materialize: bool | Literal["auto"] = "auto"
    memory_fraction: float = 0.25  # of a worker's memory (node memory / its workers) a held share may use
    worker_memory_gib: float | None = None  # a worker's memory; None = Ray's memory of its node / workers there
    norm_max_rows: int | None = 4096  # rows (whole row groups, seeded) for the normalisation; None = all
    shuffle_groups: int = 16  # streaming: Parquet row groups (64 rows each) mixed at a time
    prefetch_batches: int = 4  # batches read, gathered and encoded ahead of the training step
    read_threads: int = 0  # threads reading/encoding batches; 0 = 1 on CPU, a GPU worker's CPUs but one
    # Normalise features with mean/std over the training rows (computed once, saved in the run).
    normalize: bool = True
    # What feeds the Train workers (seld/data.py): "rowgroups" = each worker reads its share of the
    # store itself (Parquet row groups, one machine); "ray_data" = Ray Data tasks read the store
    # (a path or s3:// / gs://) and encode targets on CPU workers (data nodes on a cluster) and
    # the workers take batches from get_dataset_shard; "auto" = rowgroups (one machine), which
    # measured faster here (BENCHMARKS.md "Ingest"); `--cluster` plans set ray_data.
    engine: Literal["rowgroups", "ray_data", "auto"] = "auto"
    shuffle_buffer_rows: int = 1024  # ray_data: rows of each worker's seeded local shuffle buffer
    # ray_data: logical CPUs Ray Data may use at once for one run (ExecutionOptions.resource_limits);
    # none = what Ray leaves after Train's reservation, which concurrent runs divide among
    # themselves (integer division: 0 each, a hang, on a small machine; study plans set it).
    ray_data_cpus: float | None = None
    # Write RUN/data/clip-order-rank<r>.txt: each epoch's training clip ids in the order the worker
    # trained them (one line per epoch; determinism tests and debugging).
    record_order: bool = False

    def __post_init__(self) -> None:
        _check_literal(self)
        bad = [d for d in self.stage1_domains if d not in ("synthetic", "real")]
        _check(not bad and self.stage1_domains, "data.stage1_domains", f"unknown domains {bad}; use synthetic/real")
        _check(0 < self.memory_fraction <= 1, "data.memory_fraction", "must be in (0, 1]")
        _check(self.worker_memory_gib is None or self.worker_memory_gib > 0, "data.worker_memory_gib",
               "must be > 0 or none")
        _check(self.norm_max_rows is None or self.norm_max_rows >= 1, "data.norm_max_rows", "must be >= 1 or none")
        _check(self.shuffle_groups >= 1, "data.shuffle_groups", "must be >= 1")
        _check(self.prefetch_batches >= 0, "data.prefetch_batches", "must be >= 0")
        _check(self.read_threads >= 0, "data.read_threads", "must be >= 0 (0 = automatic)")
        _check(self.shuffle_buffer_rows >= 1, "data.shuffle_buffer_rows", "must be >= 1")
        _check(self.ray_data_cpus is None or self.ray_data_cpus > 0, "data.ray_data_cpus", "must be > 0 or none")


@dataclass(frozen=True)
class ModelConfig:
    """Stereo-RCnet (paper §2.2) or the official baseline (spec §7); every ablation is a field."""

    name: Literal["stereo_rcnet", "baseline"] = "stereo_rcnet"
    output_format: Literal["accdoa", "multi_accdoa"] = "accdoa"
    input_mode: Literal["stereo", "mono"] = "stereo"  # mono: both channels replaced by their mean
    fusion: Literal["aff", "add", "concat", "early"] = "aff"
    channel_attention: bool = True  # MS-CAM inside each residual block
    temporal_encoding: bool = True  # fixed sinusoidal encoding after the embedding (eq. 2)
    # Widths are not in the paper: these `paper` sizes are our documented guesses (docs/configuration.md).
    stem_channels: int = 32  # width of MCSAnet's stem conv3x3 (before the residual stages)
    stem_freq_pool: int = 2  # frequency pooling right after the stem (1 = none)
    resnet_channels: tuple[int, ...] = (64, 128, 256)  # one entry per residual stage
    freq_pool: tuple[int, ...] = (2, 2, 2)  # frequency pooling after each stage (time is kept)
    attention_reduction: int = 4  # MS-CAM bottleneck ratio r
    d_model: int = 256
    n_conformer_layers: int = 4
    # "feature": Conformer on all 251 feature frames, T-Pooling after it (paper, eq. 3).
    # "label": T-Pooling to 50 label frames first (about 5x cheaper; used by the CPU presets).
    conformer_rate: Literal["feature", "label"] = "feature"
    n_heads: int = 8
    conformer_kernel: int = 31  # depthwise conv kernel (frames)
    ff_mult: int = 4
    dropout: float = 0.1
    n_tracks: int = 3  # multi-ACCDOA tracks
    # Baseline (spec §7) sizes
    baseline_filters: int = 64
    baseline_rnn_hidden: int = 128
    baseline_n_rnn_layers: int = 2
    baseline_n_mhsa_layers: int = 2
    baseline_n_heads: int = 8
    baseline_dropout: float = 0.05

    def __post_init__(self) -> None:
        _check_literal(self)
        _check(len(self.resnet_channels) == len(self.freq_pool), "model.freq_pool",
               "needs one entry per resnet_channels entry")
        _check(self.n_conformer_layers >= 0, "model.n_conformer_layers", "must be >= 0")
        _check(self.stem_channels > 0 and all(c > 0 for c in self.resnet_channels), "model.resnet_channels",
               "widths must be > 0")
        _check(self.stem_freq_pool >= 1 and all(p >= 1 for p in self.freq_pool), "model.freq_pool",
               "pooling factors must be >= 1")
        _check(self.n_tracks >= 1, "model.n_tracks", "must be >= 1")
        _check(self.d_model % self.n_heads == 0, "model.d_model", f"{self.d_model} not divisible by n_heads={self.n_heads}")
        _check(0 <= self.dropout < 1, "model.dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class LossConfig:
    """L = alpha * L_DOA + beta * L_dist (paper eqs. 4-6), both divided by C*T."""

    alpha: float = 1.0
    beta: float = 2.0

    def __post_init__(self) -> None:
        _check(self.alpha >= 0 and self.beta >= 0, "loss.alpha/beta", "must be >= 0")


@dataclass(frozen=True)
class AugmentConfig:
    """Batch augmentations (seld/augment.py); a probability of 0 switches one off."""

    cutout_p: float = 0.5  # random cutout (random erasing) of a time-frequency rectangle
    cutout_max_frac: float = 0.25  # max side of the rectangle as a fraction of time/freq size
    specaug_p: float = 0.5  # time and frequency masking (SpecAugment)
    specaug_max_time: int = 25  # frames
    specaug_max_freq: int = 8  # mel bins
    freq_shift_p: float = 0.5  # roll along mel bins
    freq_shift_max: int = 4  # mel bins
    augmix_p: float = 0.3  # AugMix of the above
    augmix_width: int = 3
    augmix_depth: int = 2
    augmix_alpha: float = 1.0
    swap_p: float = 0.0  # left/right swap with azimuth negation (not in the paper)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name.endswith("_p"):
                v = getattr(self, f.name)
                _check(0 <= v <= 1, f"augment.{f.name}", f"probability {v} not in [0, 1]")

    def disabled(self) -> AugmentConfig:
        return dataclasses.replace(self, cutout_p=0.0, specaug_p=0.0, freq_shift_p=0.0, augmix_p=0.0, swap_p=0.0)


@dataclass(frozen=True)
class StageConfig:
    """One training stage (paper §2.5)."""

    epochs: int = 20  # fixed epochs; with patience set, the maximum
    lr: float = 1e-4
    patience: int | None = None  # early stopping on val F20 (None = run all epochs)
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _check(self.epochs >= 0, "train.stageN.epochs", "must be >= 0")
        _check(self.lr > 0, "train.stageN.lr", "must be > 0")


@dataclass(frozen=True)
class TrainConfig:
    """Two-stage schedule, batch, workers and time bound (Ray Train)."""

    stages: Literal["both", "stage1", "stage2"] = "both"
    stage1: StageConfig = field(default_factory=lambda: StageConfig(epochs=20, lr=1e-4))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(epochs=200, lr=2e-5, patience=20))
    batch_size: int = 32
    grad_clip: float | None = 5.0
    num_workers: int = 1  # Ray Train workers (DDP when > 1)
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    amp_bf16: bool = True  # bf16 autocast where native: GPUs with bf16, CPUs with AMX or AVX512-BF16 measured faster (predict.bf16_autocast)
    torch_threads: int = 0  # 0 = the machine's cores / its workers; cluster plans set the CPUs reserved
    time_budget_s: float = 3600.0  # hard bound for the whole run
    max_failures: int = 0  # Ray Train restarts from the last checkpoint
    val_threshold: float = 0.5  # activity threshold for selection / early stopping
    init_checkpoint: str | None = None  # model file to start from (e.g. stage 2 from a stage-1 run)

    def __post_init__(self) -> None:
        _check_literal(self)
        _check(self.batch_size > 0, "train.batch_size", "must be > 0")
        _check(self.num_workers >= 1, "train.num_workers", "must be >= 1")
        _check(self.time_budget_s > 0, "train.time_budget_s", "must be > 0")

    @property
    def stage_numbers(self) -> tuple[int, ...]:
        """The stages this config trains, in order: (1, 2), (1,) or (2,)."""
        return {"both": (1, 2), "stage1": (1,), "stage2": (2,)}[self.stages]

    def stage_config(self, stage: int) -> StageConfig:
        """The schedule of stage 1 or 2."""
        return {1: self.stage1, 2: self.stage2}[stage]

    @property
    def max_epochs(self) -> int:
        """Epochs of the stages this config trains, at most (stage 2 may stop early)."""
        return sum(self.stage_config(s).epochs for s in self.stage_numbers)


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one training run depends on."""

    preset: str = "paper"
    seed: int = 0
    features: FeatureConfig = field(default_factory=FeatureConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _check(self.seed >= 0, "seed", "must be >= 0 (it seeds numpy's default_rng)")
        if self.model.name == "baseline":
            _check(self.model.output_format == "multi_accdoa", "model.output_format",
                   "the baseline uses multi_accdoa (spec §7)")


# --- Presets -------------------------------------------------------------------------------------
# Each preset is a set of dotted overrides over the paper defaults, so a preset is a readable diff.
PRESET_OVERRIDES: dict[str, dict[str, Any]] = {
    "paper": {},
    "local": {
        "synth.n_synth_train": 1000,
        "synth.n_synth_test": 200,
        "synth.n_real_train": 600,
        "synth.n_real_test": 240,
        "synth.clip_reuse": 2.0,
        "model.stem_channels": 8,
        "model.stem_freq_pool": 4,
        "model.resnet_channels": (8, 16),
        "model.freq_pool": (4, 2),
        "model.d_model": 48,
        "model.n_heads": 4,
        "model.n_conformer_layers": 2,
        "model.conformer_rate": "label",
        "model.conformer_kernel": 15,
        "model.ff_mult": 2,
        "model.dropout": 0.05,
        "model.baseline_filters": 32,
        "model.baseline_rnn_hidden": 64,
        "model.baseline_n_heads": 4,
        "train.batch_size": 32,
        # The fair training policy (docs/training-policy.md): every stage stops once validation F20
        # has not improved for 4 epochs, under one budget of 20 epochs per run shared by every row of
        # a study (Stereo-RCnet: 12 + 8; Baseline-A: 20 in its one stage, see baseline_overrides).
        "train.stage1.epochs": 12,
        "train.stage1.lr": 3e-3,
        "train.stage1.patience": 4,
        "train.stage2.epochs": 8,
        "train.stage2.lr": 6e-4,
        "train.stage2.patience": 4,
        "train.time_budget_s": 2400.0,  # a safety bound: the 20-epoch budget takes 4-8 min alone
        # A 4-minute schedule: lr 3e-3 with light augmentation (every kind stays on) reached val F20
        # 9.6 % after 9 stage-1 epochs, against 1.9 % with lr 1e-3 and the default (heavier) mix.
        "augment.cutout_p": 0.1,
        "augment.specaug_p": 0.1,
        "augment.freq_shift_p": 0.1,
        "augment.augmix_p": 0.1,
    },
    "smoke": {
        "synth.n_synth_train": 24,
        "synth.n_synth_test": 8,
        "synth.n_real_train": 24,
        "synth.n_real_test": 12,
        "synth.recording_s": 5.0,  # one clip per recording: every planned event is in a clip
        "model.stem_channels": 4,
        "model.stem_freq_pool": 4,
        "model.resnet_channels": (8,),
        "model.freq_pool": (8,),
        "model.d_model": 32,
        "model.n_heads": 2,
        "model.n_conformer_layers": 1,
        "model.conformer_kernel": 7,
        "model.ff_mult": 2,
        "model.baseline_filters": 8,
        "model.baseline_rnn_hidden": 16,
        "model.baseline_n_heads": 2,
        "train.batch_size": 8,
        "train.stage1.epochs": 1,
        "train.stage1.lr": 1e-3,
        "train.stage2.epochs": 1,
        "train.stage2.lr": 1e-3,
        "train.stage2.patience": 1,
        "train.time_budget_s": 300.0,
    },
}
PRESET_OVERRIDES["local-extended"] = dict(PRESET_OVERRIDES["local"])
PRESETS = tuple(PRESET_OVERRIDES)

# Baseline-A (spec §7): its own model, output format and recipe through the same entry point: Adam
# at lr 1e-3 with no augmentation, one stage on the same training clips (the official recipe; batch
# size stays the preset's, see baseline_overrides).
BASELINE_OVERRIDES: dict[str, Any] = {
    "model.name": "baseline",
    "model.output_format": "multi_accdoa",
    "augment.cutout_p": 0.0,
    "augment.specaug_p": 0.0,
    "augment.freq_shift_p": 0.0,
    "augment.augmix_p": 0.0,
    "augment.swap_p": 0.0,
    "train.stages": "stage1",
    "train.stage1.lr": 1e-3,
}
# The official Baseline-A sizes (spec §7), for presets that shrink it (`local`, `smoke`).
BASELINE_OFFICIAL_WIDTH: dict[str, Any] = {
    "model.baseline_filters": 64,
    "model.baseline_rnn_hidden": 128,
    "model.baseline_n_heads": 8,
}


def baseline_overrides(preset: str, official_width: bool = False) -> dict[str, Any]:
    """Baseline-A under a preset's fair training policy: its official recipe (BASELINE_OVERRIDES),
    trained in its one stage for at most the epochs a Stereo-RCnet run of the preset may take in
    both stages (the study's shared budget), stopping when validation F20 has not improved for the
    preset's stage-2 patience, and selected on validation.

    Args:
        preset: a preset name.
        official_width: also the official sizes (64 filters, GRU 128, 8 heads) instead of the preset's.
    """
    ref = preset_config(preset).train
    out = {**BASELINE_OVERRIDES, "train.stage1.epochs": ref.stage1.epochs + ref.stage2.epochs,
           "train.stage1.patience": ref.stage2.patience}
    if official_width:
        out.update(BASELINE_OFFICIAL_WIDTH)
    return out


def preset_config(name: str, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """The named preset with optional dotted-key overrides applied on top."""
    if name not in PRESET_OVERRIDES:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = apply_overrides(ExperimentConfig(), {"preset": name, **PRESET_OVERRIDES[name]})
    return apply_overrides(cfg, overrides or {})


# --- Overrides, serialisation, hashing -----------------------------------------------------------
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce `value` (possibly a string from the command line) to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not fit {tp}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {args}")
    if origin is tuple:
        if isinstance(value, str):
            text = value.strip().strip("()[]")
            value = [v.strip() for v in text.split(",") if v.strip()] if text else []
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list like 1,2,3, got {value!r}")
        elem = args[0] if args else Any
        if len(args) == 2 and args[1] is Ellipsis or len(args) == 1:
            return tuple(_coerce(v, elem, key) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, prefix=key + ".")
        raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
    return value


def _apply(obj: Any, tree: dict[str, Any], prefix: str) -> Any:
    """Apply a nested dict of changes to one dataclass level at once (so that checks that
    relate two fields, such as resnet_channels and freq_pool, see both new values)."""
    hints = _field_types(type(obj))
    choices = [f.name for f in dataclasses.fields(obj)]
    changes: dict[str, Any] = {}
    for name, value in tree.items():
        full_key = prefix + name
        if name not in hints:
            near = difflib.get_close_matches(name, choices, n=3)
            hint = f"; did you mean {', '.join(prefix + n for n in near)}?" if near else f"; valid: {', '.join(choices)}"
            raise ConfigError(f"unknown config key {full_key!r}{hint}")
        if isinstance(value, _Subtree):
            child = getattr(obj, name)
            if not dataclasses.is_dataclass(child):
                raise ConfigError(f"unknown config key {full_key + '.' + next(iter(value))!r}: {full_key} is a value, not a section")
            changes[name] = _apply(child, value, full_key + ".")
        else:
            changes[name] = _coerce(value, hints[name], full_key)
    try:
        return dataclasses.replace(obj, **changes)
    except TypeError as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


class _Subtree(dict):
    """Marks a nested group of dotted overrides (as opposed to a dict-valued field)."""


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Return `cfg` with dotted-key overrides applied, e.g. ``{"model.n_conformer_layers": 2}``.

    Values may be typed or strings (from ``--set``); each is coerced to the field's annotated type
    and the dataclass checks run again. Unknown keys and wrong types raise :class:`ConfigError`.
    """
    tree = _Subtree()
    for key, value in overrides.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, _Subtree())
            if not isinstance(node, _Subtree):
                raise ConfigError(f"config key {key!r} conflicts with another override of {part!r}")
        node[leaf] = value
    return _apply(cfg, tree, "")


def parse_set_args(items: list[str] | None) -> dict[str, str]:
    """Parse ``["a.b=1", "c=x"]`` (from repeated ``--set``) into a dict of dotted keys."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. model.n_conformer_layers=2")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready nested dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Inverse of :func:`to_dict`; unknown keys are an error naming the key."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(prefix + k for k in unknown)} for {cls.__name__}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view of a config or of its JSON form (nested dicts): ``{"model.d_model": 256, ...}``."""
    items = cfg.items() if isinstance(cfg, dict) else ((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg))
    out: dict[str, Any] = {}
    for name, v in items:
        if dataclasses.is_dataclass(v) or isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{name}."))
        else:
            out[prefix + name] = v
    return out


def config_hash(cfg: Any, length: int = 12) -> str:
    """Stable short hash of a config (sorted-key JSON)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


# Settings that bound a run without changing what it trains: a run stopped by its time budget and
# continued under another budget is the same run (the same folder, `--resume` accepts the change).
RUN_BOUNDS = ("train.time_budget_s",)


def run_config_dict(cfg: ExperimentConfig | dict[str, Any]) -> dict[str, Any]:
    """The config (or its JSON form, e.g. a run's config.json) without :data:`RUN_BOUNDS`: what
    makes two runs the same run."""
    blob = json.loads(json.dumps(cfg)) if isinstance(cfg, dict) else to_dict(cfg)
    for key in RUN_BOUNDS:
        section, name = key.split(".")
        blob[section].pop(name, None)
    return blob


def run_hash(cfg: ExperimentConfig, length: int = 12) -> str:
    """Stable short hash of a run's identity (:func:`run_config_dict`): study run folders are named by it."""
    return hashlib.sha256(json.dumps(run_config_dict(cfg), sort_keys=True).encode()).hexdigest()[:length]
