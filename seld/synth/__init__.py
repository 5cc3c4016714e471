"""Generated SELD dataset in the DCASE2025 layout (docs/DESIGN.md "Generated dataset").

Reads a :class:`SynthConfig`; writes under ``out``:
* ``foa/<split>/foa_dev/<split>/fold<F>_room<R>_mix<NNN>.wav``: 4-channel FOA recordings (ACN/SN3D
  W Y Z X, 24 kHz, 16-bit) and ``foa/<split>/metadata_dev/<split>/*.csv`` (frame, class, source,
  azimuth, elevation, distance; 100 ms frames): one DCASE2024-style FOA root per split;
* ``stereo_dev/<split>/*.wav`` + ``metadata_dev/<split>/*.csv``: 5-s stereo clips and 2025 CSVs made
  from those recordings by the project's FOA->stereo converter (:func:`seld.stereo.convert_foa`),
  the same code path as for real FOA data;
* ``synth.json``: the config, its hash and which stages are complete.

Splits (docs/DESIGN.md table): dev-train-tau/sony (fold3) and dev-test-tau/sony (fold4) hold the
"real-like" domain, dev-train-synth (fold3) and dev-test-synth (fold4) the synthetic domain.
Rooms are disjoint between all six splits; room numbers are unique over sites and domains.
The same config and seed give byte-identical files; each recording has its own seed, so the
output does not depend on the number of worker processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf

from seld.config import CLIP_S, LABEL_HOP_S, SAMPLE_RATE_HZ, SPLITS, SynthConfig, to_dict
from seld.errors import UserError
from seld.runfolder import atomic_write, write_json_atomic
from seld.synth import rooms, scenes

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the generator's output changes for the same config
SPLIT_ORDER = ("dev-train-tau", "dev-train-sony", "dev-test-tau", "dev-test-sony",
               "dev-train-synth", "dev-test-synth")
FOLDS = {"train": 3, "test": 4}
FOA_DIR = "foa"


@dataclass(frozen=True)
class SplitPlan:
    """What one split folder gets: its rooms, FOA recordings and the number of stereo clips."""

    split: str
    domain: str  # "real" (real-like) or "synthetic"
    fold: int
    room_ids: tuple[int, ...]
    n_clips: int
    n_recordings: int


@dataclass(frozen=True)
class RecordingTask:
    split: str
    index: int  # recording index within the split
    room_id: int
    stem: str
    forced_classes: tuple[int, ...]


def dataset_hash(cfg: SynthConfig) -> str:
    """Hash of the generator version and config: the key of a generated dataset."""
    blob = json.dumps({"generator_version": GENERATOR_VERSION, "config": to_dict(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def plan_splits(cfg: SynthConfig) -> list[SplitPlan]:
    """Rooms, recordings and clips of every split (room ids 1.. allocated in SPLIT_ORDER)."""
    clips = {
        "dev-train-tau": math.ceil(cfg.n_real_train / 2), "dev-train-sony": cfg.n_real_train // 2,
        "dev-test-tau": math.ceil(cfg.n_real_test / 2), "dev-test-sony": cfg.n_real_test // 2,
        "dev-train-synth": cfg.n_synth_train, "dev-test-synth": cfg.n_synth_test,
    }
    n_rooms = {
        "dev-train-tau": cfg.n_real_train_rooms_per_site, "dev-train-sony": cfg.n_real_train_rooms_per_site,
        "dev-test-tau": cfg.n_real_test_rooms_per_site, "dev-test-sony": cfg.n_real_test_rooms_per_site,
        "dev-train-synth": cfg.n_synth_train_rooms, "dev-test-synth": cfg.n_synth_test_rooms,
    }
    plans, next_room = [], 1
    for split in SPLIT_ORDER:
        info = SPLITS[split]
        room_ids = tuple(range(next_room, next_room + n_rooms[split]))
        next_room += n_rooms[split]
        n_clips = clips[split]
        # `clip_reuse` 5-s clips per 5 s of recording, and every room recorded at least once.
        n_rec = max(len(room_ids), math.ceil(n_clips * CLIP_S / (cfg.recording_s * cfg.clip_reuse))) if n_clips else 0
        plans.append(SplitPlan(split, info["domain"], FOLDS[info["role"]], room_ids, n_clips, n_rec))
    return plans


def domain_spec(cfg: SynthConfig, domain: str) -> scenes.DomainSpec:
    """Scene statistics of the "synthetic" or "real" (real-like) domain."""
    real = domain == "real"
    weights = np.asarray(cfg.real_class_weights if real else (cfg.class_weights or (1.0,) * 13), dtype=np.float64)
    mask = np.zeros(len(weights))
    mask[list(cfg.classes)] = 1.0
    weights = weights * mask
    return scenes.DomainSpec(
        class_weights=tuple(float(w) for w in weights / weights.sum()),
        max_polyphony=cfg.max_polyphony,
        first_track_fill=cfg.first_track_fill,
        same_class_overlap_p=cfg.same_class_overlap_p,
        distance_m_range=cfg.distance_m_range,
        elevation_deg_range=cfg.elevation_deg_range,
        moving_fraction=cfg.moving_fraction,
        max_speed_deg_s=cfg.max_speed_deg_s,
        snr_db_range=cfg.real_snr_db_range if real else cfg.snr_db_range,
        level_db_range=cfg.real_level_db_range if real else cfg.level_db_range,
        device_response=cfg.real_device_response if real else False,
        recording_gain_db_range=cfg.real_gain_db_range if real else (0.0, 0.0),
    )


@lru_cache(maxsize=64)
def make_room(cfg: SynthConfig, domain: str, room_id: int) -> rooms.Room:
    """The room `room_id` of a domain: size, RT60 and microphone position drawn from its own seed."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1, room_id]))
    real = domain == "real"
    smin = np.asarray(cfg.real_room_size_m_min if real else cfg.room_size_m_min)
    smax = np.asarray(cfg.real_room_size_m_max if real else cfg.room_size_m_max)
    size = rng.uniform(smin, smax)
    rt_lo, rt_hi = cfg.real_rt60_s_range if real else cfg.rt60_s_range
    rt60 = float(rng.uniform(rt_lo, rt_hi))
    clear = cfg.distance_m_range[0] + rooms.MIN_WALL_DISTANCE_M + 0.05
    mic_xy = [rng.uniform(clear, length - clear) for length in size[:2]]
    mic_z = float(np.clip(rng.uniform(1.2, 1.8), 0.5, size[2] - 0.5))
    return rooms.Room(room_id=room_id, size_m=tuple(float(v) for v in size), rt60_s=rt60,
                      mic_m=(float(mic_xy[0]), float(mic_xy[1]), mic_z),
                      tail_seed=int(rng.integers(0, 2**31 - 1)))


@lru_cache(maxsize=64)
def _room_tail(room: rooms.Room) -> np.ndarray:
    return rooms.late_tail(room)


def recording_tasks(cfg: SynthConfig, plan: SplitPlan) -> list[RecordingTask]:
    """The split's recordings: rooms round-robin, every allowed class forced into the split once."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 2, SPLIT_ORDER.index(plan.split)]))
    classes = [int(c) for c in rng.permutation(sorted(set(cfg.classes)))]
    tasks, mix_counter = [], {r: 0 for r in plan.room_ids}
    for i in range(plan.n_recordings):
        room_id = plan.room_ids[i % len(plan.room_ids)]
        mix_counter[room_id] += 1
        stem = f"fold{plan.fold}_room{room_id}_mix{mix_counter[room_id]:03d}"
        tasks.append(RecordingTask(plan.split, i, room_id, stem, tuple(classes[i::plan.n_recordings])))
    return tasks


def _plan_task(cfg: SynthConfig, domain: str, task: RecordingTask
               ) -> tuple[list[scenes.Event], np.random.Generator, int]:
    room = make_room(cfg, domain, task.room_id)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 3, SPLIT_ORDER.index(task.split), task.index]))
    n_frames = int(round(cfg.recording_s / LABEL_HOP_S))
    return scenes.plan_recording(rng, room, domain_spec(cfg, domain), n_frames, task.forced_classes), rng, n_frames


def plan_task(cfg: SynthConfig, domain: str, task: RecordingTask) -> list[scenes.Event]:
    """The planned events of one recording (what :func:`render_task` renders and labels)."""
    return _plan_task(cfg, domain, task)[0]


def render_task(cfg: SynthConfig, domain: str, task: RecordingTask) -> tuple[np.ndarray, list]:
    """FOA audio (4, n) float32 and FOA label rows of one recording (pure function of its inputs)."""
    room = make_room(cfg, domain, task.room_id)
    spec = domain_spec(cfg, domain)
    events, rng, n_frames = _plan_task(cfg, domain, task)
    tail = _room_tail(room)
    audio = scenes.render_recording(events, room, spec, n_frames, rng, tail=tail)
    return audio, scenes.event_labels(events)


def _write_recording(args: tuple[SynthConfig, str, RecordingTask, str]) -> str:
    """Render one recording and write its CSV, then its wav (temporary name, then rename)."""
    from seld.labels import FOA_EVENT_DTYPE, make_events, write_foa_csv

    cfg, domain, task, foa_root = args
    root = Path(foa_root)
    wav = root / task.split / "foa_dev" / task.split / f"{task.stem}.wav"
    csv = root / task.split / "metadata_dev" / task.split / f"{task.stem}.csv"
    if wav.exists() and csv.exists():
        return task.stem  # finished by an earlier, interrupted run (the wav is renamed last)
    audio, rows = render_task(cfg, domain, task)
    write_foa_csv(csv, make_events(rows, FOA_EVENT_DTYPE))
    with atomic_write(wav) as tmp:
        sf.write(tmp, audio.T, SAMPLE_RATE_HZ, subtype="PCM_16", format="WAV")
    return task.stem


def _read_manifest(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the dataset record ({e}); delete the folder and generate again") from None


def generate_dataset(cfg: SynthConfig, out: Path | str, progress: bool = True, n_procs: int | None = None) -> Path:
    """Generate (or reuse) the dataset of `cfg` in `out`.

    Args:
        cfg: generator config (validated when it was built).
        out: dataset root; created if missing. A folder holding another config's dataset is an
            error; one holding this config's finished dataset is returned at once; an interrupted
            run of this config is resumed.
        progress: show a progress bar over recordings.
        n_procs: worker processes (default: all cores); the output does not depend on it.

    Returns:
        `out`, the dataset root in the DCASE2025 layout (plus ``foa/`` and ``synth.json``).
    """
    out = Path(out)
    manifest_path = out / "synth.json"
    digest = dataset_hash(cfg)
    manifest = _read_manifest(manifest_path)
    if manifest is not None:
        if manifest.get("hash") != digest:
            raise UserError(
                f"{manifest_path}: this folder holds a generated dataset of another config (hash "
                f"{manifest.get('hash')}, wanted {digest}); choose another --out or delete the folder")
        if manifest.get("complete"):
            log.info("reusing the generated dataset in %s (hash %s)", out, digest)
            return out
        log.info("resuming the interrupted generation in %s", out)
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: folder is not empty and has no synth.json; choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    manifest = manifest or {"hash": digest, "generator_version": GENERATOR_VERSION, "config": to_dict(cfg),
                            "complete": False, "converted": []}
    write_json_atomic(manifest_path, manifest)

    plans = plan_splits(cfg)
    foa_root = out / FOA_DIR
    jobs = [(cfg, p.domain, t, str(foa_root)) for p in plans for t in recording_tasks(cfg, p)]
    for p in plans:  # every split folder exists, even an empty one
        (foa_root / p.split / "foa_dev" / p.split).mkdir(parents=True, exist_ok=True)
        (foa_root / p.split / "metadata_dev" / p.split).mkdir(parents=True, exist_ok=True)
    n_procs = max(1, min(n_procs or os.cpu_count() or 1, len(jobs)))
    # One spawn pool for both stages (spawn: safe whatever the parent holds: threads, torch, Ray).
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(n_procs)) if n_procs > 1 else None
        for _ in _map(_write_recording, jobs, pool, progress, "synth recordings", "rec"):
            pass
        _convert_all(cfg, out, plans, manifest, manifest_path, pool, progress)
        if pool is not None:  # a clean shutdown (terminate, the context's exit, leaks semaphores)
            pool.close()
            pool.join()
    manifest["complete"] = True
    manifest["splits"] = {p.split: {"domain": p.domain, "rooms": list(p.room_ids), "n_recordings": p.n_recordings,
                                    "n_clips": p.n_clips} for p in plans}
    write_json_atomic(manifest_path, manifest)
    log.info("generated dataset in %s (hash %s)", out, digest)
    return out


def _convert_all(cfg: SynthConfig, out: Path, plans: list[SplitPlan], manifest: dict, manifest_path: Path,
                 pool, progress: bool) -> None:
    """Convert every split not yet converted (largest first), recording each one as done."""
    foa_root = out / FOA_DIR
    todo = []
    for i, p in enumerate(plans):
        if p.split in manifest["converted"]:
            continue
        for sub in ("stereo_dev", "metadata_dev"):  # drop what an interrupted conversion left
            shutil.rmtree(out / sub / p.split, ignore_errors=True)
            (out / sub / p.split).mkdir(parents=True, exist_ok=True)
        seed = int(np.random.SeedSequence([cfg.seed, 4, i]).generate_state(1)[0])
        todo.append((str(foa_root / p.split), str(out), p.split, p.n_clips, seed))
    todo.sort(key=lambda job: -job[3])
    for split in _map(_convert_split, todo, pool, progress, "FOA->stereo splits", "split"):
        manifest["converted"] = sorted({*manifest["converted"], split})
        write_json_atomic(manifest_path, manifest)


def _convert_split(args: tuple[str, str, str, int, int]) -> str:
    """Cut one split's stereo clips from its FOA root (seld.stereo, the path real FOA data takes)."""
    from seld.stereo import convert_foa

    foa_root, out, split, n_clips, seed = args
    if n_clips:
        convert_foa(foa_root, out, split, n_clips, seed=seed)
    return split


def _map(fn, jobs: list, pool, progress: bool, desc: str, unit: str):
    """Yield fn(job) for every job, in completion order, on `pool` (None: in this process)."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=desc, unit=unit, disable=not progress)
    try:
        results = map(fn, jobs) if pool is None or len(jobs) < 2 else pool.imap_unordered(fn, jobs, chunksize=1)
        for result in results:
            yield result
            bar.update()
    finally:
        bar.close()
