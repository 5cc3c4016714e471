"""Post-processing: model outputs -> DCASE events, and dynamic per-class thresholds (paper §2.6).

Reads (multi-)ACCDOA outputs at 100 ms, (N, 50, 13, 3) or (N, 50, n_tracks, 13, 3) with
(x, y, distance_m); gives event arrays (labels.EVENT_DTYPE: azimuth deg, distance cm) and one
activity threshold per class, fitted on validation predictions (seld/runfolder.py saves them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from seld.config import N_CLASSES
from seld.labels import as_written, decode_accdoa, decode_multi_accdoa
from seld.metrics import count_errors, score_counters

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95
N_REFINE_STEPS = 4  # the refining sweep tries best +- 1..4 fine steps
GLOBAL_GRID = tuple(round(0.1 * i, 1) for i in range(1, 10))  # 0.1 .. 0.9, one threshold for all classes


def _as_numpy(outputs) -> np.ndarray:
    if hasattr(outputs, "detach"):
        outputs = outputs.detach().float().cpu().numpy()
    return np.asarray(outputs, dtype=np.float64)


def decode_outputs(outputs, output_format: str, thresholds=DEFAULT_THRESHOLD,
                   merge_deg: float = 15.0) -> list[np.ndarray]:
    """Events of every clip of a batch of outputs.

    Args:
        outputs: (N, T, 13, 3) ACCDOA or (N, T, n_tracks, 13, 3) multi-ACCDOA, numpy or torch.
        output_format: "accdoa" or "multi_accdoa".
        thresholds: activity threshold on ||(x, y)||, a float or one per class (13,).
        merge_deg: multi-ACCDOA only: same-class tracks closer than this are merged.
    Returns:
        N arrays of EVENT_DTYPE rows (frame 0..T-1, azimuth deg, distance cm), one per clip.
    """
    out = _as_numpy(outputs)
    expected = {"accdoa": 4, "multi_accdoa": 5}
    if output_format not in expected:
        raise ValueError(f"unknown output_format {output_format!r}; use accdoa or multi_accdoa")
    if out.ndim != expected[output_format] or out.shape[-2:] != (N_CLASSES, 3):
        raise ValueError(f"{output_format} outputs need shape (N, T{', tracks' if out.ndim == 5 else ''}, "
                         f"{N_CLASSES}, 3), got {out.shape}")
    n_clips, n_frames = out.shape[:2]
    # Frames are decoded independently, so all clips go through one call as one long clip.
    flat = out.reshape(n_clips * n_frames, *out.shape[2:])
    if output_format == "accdoa":
        events = decode_accdoa(flat, thresholds)
    else:
        events = decode_multi_accdoa(flat, thresholds, merge_deg=merge_deg)
    clip = events["frame"] // n_frames
    events["frame"] %= n_frames
    bounds = np.searchsorted(clip, np.arange(n_clips + 1))
    return [events[bounds[i]:bounds[i + 1]] for i in range(n_clips)]


def classwise_f(outputs, refs: Sequence[np.ndarray], output_format: str, thresholds,
                score_all_frames: bool = False) -> np.ndarray:
    """Per-class location-sensitive F (fraction, (13,)) of the official metric at `thresholds`."""
    preds = decode_outputs(outputs, output_format, thresholds)
    score = score_counters(count_errors(refs, preds, score_all_frames).sum(axis=0))
    return np.array([row["f20"] / 100.0 for row in score.classwise])


def _accdoa_cell_counters(outputs: np.ndarray, refs: Sequence[np.ndarray], score_all_frames: bool
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per scored (clip, frame) the official counters with every class predicted, and with none.

    An ACCDOA cell holds at most one prediction, and the counters add up over frames, so a
    threshold only chooses, cell by cell, between these two contributions. Each scored frame is
    scored as its own file (frame 0, every frame scored) by the official counting code.

    Returns:
        (norms (n_cells, 13), active counters (n_cells, 13, K), inactive counters (n_cells, 13, K)).
    """
    n_clips, n_frames = outputs.shape[:2]
    if score_all_frames:
        n_scored = np.full(n_clips, n_frames)
    else:  # official window: frames 0 .. N-1, N = the last reference frame index
        n_scored = np.array([int(r["frame"].max(initial=0)) for r in refs])
    clip_of_cell = np.repeat(np.arange(n_clips), np.minimum(n_scored, n_frames))
    frame_of_cell = np.concatenate([np.arange(min(n, n_frames)) for n in n_scored] or [np.zeros(0, int)])
    cells = outputs[clip_of_cell, frame_of_cell]  # (n_cells, 13, 3)
    n_cells = len(cells)
    cell_id = np.full((n_clips, n_frames), -1)
    cell_id[clip_of_cell, frame_of_cell] = np.arange(n_cells)

    def per_cell(events_per_clip: Sequence[np.ndarray]) -> list[np.ndarray]:
        ev = np.concatenate([np.asarray(e) for e in events_per_clip]) if n_clips else decode_accdoa(cells[:0])
        clip = np.repeat(np.arange(n_clips), [len(e) for e in events_per_clip])
        inside = ev["frame"] < n_frames
        ev, clip = ev[inside], clip[inside]
        cid = cell_id[clip, ev["frame"]]
        ev, cid = ev[cid >= 0], cid[cid >= 0]
        order = np.argsort(cid, kind="stable")
        ev, cid = ev[order], cid[order]
        ev["frame"] = 0
        return np.split(ev, np.searchsorted(cid, np.arange(1, n_cells)))

    ref_cells = per_cell(refs)
    all_active = decode_accdoa(cells, -1.0)  # every class of every cell, one frame per cell
    bounds = np.searchsorted(all_active["frame"], np.arange(1, n_cells))
    all_active["frame"] = 0
    pred_cells = np.split(all_active, bounds)
    active = count_errors(ref_cells, pred_cells, score_all_frames=True)
    inactive = count_errors(ref_cells, [all_active[:0]] * n_cells, score_all_frames=True)
    return np.hypot(cells[..., 0], cells[..., 1]), active, inactive


def _accdoa_classwise_f(norms: np.ndarray, active: np.ndarray, inactive: np.ndarray,
                        candidates: np.ndarray) -> np.ndarray:
    """Per-class F (n_candidates, 13) for per-class thresholds candidates (n_candidates, 13),
    from the per-cell counters of :func:`_accdoa_cell_counters` (exact, by suffix sums)."""
    f = np.zeros(candidates.shape)
    base = inactive.sum(axis=0)  # (13, K): nothing predicted
    for c in range(N_CLASSES):
        order = np.argsort(norms[:, c])
        sorted_norms = norms[order, c]
        gain = np.cumsum((active[order, c] - inactive[order, c])[::-1], axis=0)[::-1]  # suffix sums
        gain = np.vstack([gain, np.zeros((1, gain.shape[1]))])
        first_active = np.searchsorted(sorted_norms, candidates[:, c], side="right")  # norm > t
        pooled = np.zeros((len(candidates), N_CLASSES, base.shape[1]))
        pooled[:, c] = base[c] + gain[first_active]
        for i in range(len(candidates)):
            f[i, c] = score_counters(pooled[i]).classwise[c]["f20"] / 100.0
    return f


def fit_thresholds(outputs, refs: Sequence[np.ndarray], output_format: str,
                   grid: Sequence[float] = DEFAULT_GRID, n_sweeps: int = 2,
                   score_all_frames: bool = False) -> np.ndarray:
    """Dynamic thresholds (paper §2.6): one per class, maximising F20 with the official metric.

    Coordinate search: sweep 1 tries every grid value for every class, each later sweep tries
    best +- 1..4 steps of a step 5x finer than the last. F20 is the mean of per-class F and a
    class's F depends only on that class's threshold, so all 13 coordinates are searched at once
    and the search is exact on the grid. Ties keep the value closest to the default 0.5.
    ACCDOA counts each scored frame once with the official code and then scores every candidate
    by sums (2 000 clips in a few seconds); multi-ACCDOA decodes and counts once per candidate.

    Args:
        outputs: validation outputs (N, 50, 13, 3) or (N, 50, n_tracks, 13, 3).
        refs: N reference event arrays (labels.EVENT_DTYPE), in the same order.
        output_format: "accdoa" or "multi_accdoa".
        grid: coarse thresholds in (0, 1). n_sweeps: >= 1.
        score_all_frames: score every frame instead of the official frames 0 .. N-1.
    Returns:
        float64 (13,) thresholds.
    """
    out = _as_numpy(outputs)
    if len(refs) != len(out):
        raise ValueError(f"{len(out)} output clips but {len(refs)} reference clips")
    decode_outputs(out[:1], output_format)  # checks format and shape
    t0 = time.perf_counter()
    if output_format == "accdoa":
        cell_counters = _accdoa_cell_counters(out, refs, score_all_frames)

        def evaluate(candidates: np.ndarray) -> np.ndarray:
            return _accdoa_classwise_f(*cell_counters, candidates)
    else:
        def evaluate(candidates: np.ndarray) -> np.ndarray:
            return np.stack([classwise_f(out, refs, output_format, t, score_all_frames) for t in candidates])

    grid = np.asarray(sorted(grid), dtype=np.float64)
    best_t = np.full(N_CLASSES, DEFAULT_THRESHOLD)
    best_f = np.full(N_CLASSES, -1.0)

    def consider(candidates: np.ndarray) -> None:
        for t, f in zip(candidates, evaluate(candidates), strict=True):
            closer = np.abs(t - DEFAULT_THRESHOLD) < np.abs(best_t - DEFAULT_THRESHOLD)
            better = (f > best_f + 1e-12) | ((np.abs(f - best_f) <= 1e-12) & closer)
            best_t[better], best_f[better] = t[better], f[better]

    consider(np.repeat(grid[:, None], N_CLASSES, axis=1))
    step = float(np.min(np.diff(grid))) if len(grid) > 1 else 0.05
    for _ in range(n_sweeps - 1):
        step /= 5.0
        offsets = np.array([k for k in range(-N_REFINE_STEPS, N_REFINE_STEPS + 1) if k]) * step
        consider(np.clip(best_t[None, :] + offsets[:, None], 1e-3, 1.0 - 1e-3))
    log.info("fitted thresholds on %d clips in %.1f s: val F20 %.2f %% (%s)", len(refs),
             time.perf_counter() - t0, 100.0 * best_f.mean(), np.round(best_t, 3).tolist())
    return best_t


def scan_global_threshold(outputs, refs: Sequence[np.ndarray], output_format: str,
                          grid: Sequence[float] = GLOBAL_GRID, score_all_frames: bool = False
                          ) -> tuple[float, np.ndarray]:
    """The global-threshold grid: F20 (%) with one activity threshold shared by every class, for each
    grid value, by the official metric (decode, count, score: what the CSVs would score).

    Returns:
        (the best grid value, ties going to the one closest to 0.5; F20 % per grid value).
    """
    out = _as_numpy(outputs)
    if len(refs) != len(out):
        raise ValueError(f"{len(out)} output clips but {len(refs)} reference clips")
    grid = np.asarray(grid, dtype=np.float64)
    f20 = np.array([score_counters(count_errors(
        refs, [as_written(e) for e in decode_outputs(out, output_format, float(t))], score_all_frames).sum(axis=0)).f20
        for t in grid])
    best = np.flatnonzero(f20 >= f20.max() - 1e-9)
    return float(grid[best[np.argmin(np.abs(grid[best] - DEFAULT_THRESHOLD))]]), f20
