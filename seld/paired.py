"""Paired comparisons of study rows (Ray-free, pure numpy/scipy): differences within a seed and
within a test file, their 95 % intervals, and the verdict rule of the ablation tables.

Two rows of a study are *paired* when they share seeds (Stage 1 and Stage 2 of one training; two
variants trained with the same seed) and test files (always: one store). The difference of two
rows has far less noise than either row's own interval, so tables show it directly:

* **over seeds**: the Student-t interval of the per-seed differences d_s = A_s - B_s (a paired t
  interval; seeds present in both rows);
* **over test files**: the leave-one-file-out jackknife of the seed-mean difference
  mean_s [M(A_s) - M(B_s)], the same file left out of every run (the official metric's jackknife,
  :func:`seld.metrics.jackknife_intervals`, applied to a difference). It measures how much the
  difference depends on which clips are in the test set, not on training randomness.

Per-file counters travel in ``counters.npz`` files: a run's ``RUN/test_counters.npz`` (written at the
end of training) and a study's ``results/<study>/counters.npz`` (gathered from its runs, committed,
so ``--report-only`` recomputes the file intervals).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from seld.errors import DataError
from seld.metrics import N_COUNTERS, jackknife_from_partials, summary_metrics
from seld.runfolder import atomic_write

# Metrics compared, and whether a larger value is better.
HIGHER_IS_BETTER = {"f20": True, "doae_cd": False, "rde_cd": False}
VERDICTS = ("better", "no difference detected", "worse")
CLIPS_KEY = "clips"


@dataclass(frozen=True)
class PairedInterval:
    """A difference A - B: its estimate and 95 % interval; ``n``: seeds (or files) it rests on.
    ``lo``/``hi`` are NaN when the interval is undefined (one seed, one file)."""

    estimate: float
    lo: float
    hi: float
    n: int

    @property
    def defined(self) -> bool:
        return self.n > 0 and math.isfinite(self.lo) and math.isfinite(self.hi)


def paired_t(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> PairedInterval:
    """Paired Student-t interval of A - B over the seeds both have (finite values only).

    Args:
        a, b: seed -> the row's metric for that seed.
    """
    seeds = sorted(s for s in set(a) & set(b) if _finite(a[s]) and _finite(b[s]))
    d = np.asarray([float(a[s]) - float(b[s]) for s in seeds], dtype=np.float64)
    n = int(d.size)
    if n == 0:
        return PairedInterval(math.nan, math.nan, math.nan, 0)
    mean = float(d.mean())
    if n < 2:
        return PairedInterval(mean, math.nan, math.nan, 1)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return PairedInterval(mean, mean - half, mean + half, n)


def paired_file_jackknife(counters_a: np.ndarray, counters_b: np.ndarray, metric: str,
                          level: float = 0.95) -> PairedInterval:
    """Leave-one-file-out jackknife of mean_s [M(A_s) - M(B_s)] for one metric.

    Args:
        counters_a, counters_b: (S, n_files, 13, K) per-file counters of the two rows for the same
            S seeds and the same files in the same order (:func:`seld.metrics.count_errors`).
        metric: "f20" | "doae_cd" | "rde_cd" | "dist_err_cd".
    Returns:
        The bias-corrected estimate and its interval (as the official jackknife); n = files.
    """
    a = np.asarray(counters_a, dtype=np.float64)
    b = np.asarray(counters_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != N_COUNTERS:
        raise ValueError(f"expected two (seeds, files, 13, {N_COUNTERS}) arrays of one shape, got "
                         f"{a.shape} and {b.shape}")
    n = a.shape[1]
    if n < 2:
        return PairedInterval(math.nan, math.nan, math.nan, n)

    def stat(tot_a: np.ndarray, tot_b: np.ndarray) -> np.ndarray:  # (S, ..., 13, K) -> (...)
        with np.errstate(invalid="ignore"):
            return np.mean(summary_metrics(tot_a)[metric] - summary_metrics(tot_b)[metric], axis=0)

    ta, tb = a.sum(axis=1), b.sum(axis=1)
    g = float(stat(ta, tb))
    partial = stat(ta[:, None] - a, tb[:, None] - b)  # (n,)
    jk = jackknife_from_partials(g, partial, 1 - level)
    return PairedInterval(jk["estimate"], jk["low"], jk["high"], n)


def verdict(seeds: PairedInterval, files: PairedInterval | None, higher_is_better: bool = True) -> str:
    """The ablation tables' verdict on A - B at 95 %.

    "better" when every defined interval (over seeds, over files) lies entirely on the good side of
    0, "worse" when every one lies entirely on the bad side, else "no difference detected". With a
    single seed only the file interval decides; with neither defined, "no difference detected".
    """
    ivs = [iv for iv in (seeds, files) if iv is not None and iv.defined]
    if not ivs:
        return VERDICTS[1]
    if all(iv.lo > 0 for iv in ivs):
        return VERDICTS[0] if higher_is_better else VERDICTS[2]
    if all(iv.hi < 0 for iv in ivs):
        return VERDICTS[2] if higher_is_better else VERDICTS[0]
    return VERDICTS[1]


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


# --- counters.npz ------------------------------------------------------------------------------------


def run_counters_key(variant: str, seed: int, prefix: str) -> str:
    """The key of one run's counters of one scored set in a study's counters.npz."""
    return f"{variant}|{int(seed)}|{prefix}"


def save_counters(path: str | Path, clips: Sequence[str], arrays: Mapping[str, np.ndarray]) -> None:
    """Write per-file counters, clips in sorted order (atomic; compressed npz).

    Args:
        clips: the file (clip) names of the arrays' first axis, in the arrays' order.
        arrays: key -> (n_files, 13, K) counters.
    """
    clips = [str(c) for c in clips]
    order = np.argsort(np.asarray(clips, dtype=object), kind="stable")
    out = {CLIPS_KEY: np.asarray([clips[i] for i in order])}
    for key, arr in arrays.items():
        arr = np.asarray(arr, dtype=np.float64)
        if arr.shape[0] != len(clips):
            raise ValueError(f"{key}: counters of {arr.shape[0]} files for {len(clips)} clips")
        out[key] = arr[order]
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **out)


def load_counters(path: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(clips, key -> counters) of a counters.npz; a file that is not one is one DataError."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable counters file ({e})") from None
    if CLIPS_KEY not in data:
        raise DataError(f"{path}: no '{CLIPS_KEY}' array; expected a counters file written by seld")
    clips = data.pop(CLIPS_KEY)
    for key, arr in data.items():
        if arr.ndim != 3 or arr.shape[0] != len(clips) or arr.shape[2] != N_COUNTERS:
            raise DataError(f"{path}: '{key}' has shape {arr.shape}; expected ({len(clips)}, 13, {N_COUNTERS})")
    return clips, data


def gather_study_counters(path: str | Path, runs: Sequence[tuple[str, int, Path]]) -> int:
    """Gather the runs' ``test_counters.npz`` into one study file (``results/<study>/counters.npz``).

    Args:
        runs: (variant, seed, run folder) of the study's finished runs; runs without the file
            (trained before it existed) are skipped.
    Returns:
        How many runs contributed. Nothing is written when none did. Runs scored on other clips
        than the first run (another store) are an error naming the run.
    """
    from seld.runfolder import TEST_COUNTERS

    clips_ref: np.ndarray | None = None
    arrays: dict[str, np.ndarray] = {}
    n = 0
    for variant, seed, run_dir in runs:
        f = Path(run_dir) / TEST_COUNTERS
        if not f.is_file():
            continue
        clips, data = load_counters(f)
        if clips_ref is None:
            clips_ref = clips
        elif len(clips) != len(clips_ref) or not np.array_equal(clips, clips_ref):
            raise DataError(f"{f}: scored on other test clips than the study's other runs")
        for prefix, arr in sorted(data.items()):
            arrays[run_counters_key(variant, seed, prefix)] = arr
        n += 1
    if n:
        save_counters(path, [str(c) for c in clips_ref], arrays)
    return n


__all__ = ["HIGHER_IS_BETTER", "PairedInterval", "VERDICTS", "gather_study_counters", "load_counters",
           "paired_file_jackknife", "paired_t", "run_counters_key", "save_counters", "verdict"]
