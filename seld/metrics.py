"""The official DCASE2025 Task 3 (stereo, audio-only) metric: F20°, DOAE_CD, RDE_CD, with per-file
counters for jackknife intervals. Reads DCASE CSVs (100 ms frames, azimuth deg, distance cm) or
event arrays in memory; both entry points share one counting implementation.

Settings (spec §6): angular threshold 20°, relative distance threshold 1.0, no absolute distance
threshold, onscreen not required, 13 classes, macro averaging, frame-based at 100 ms.

Quirks of the official code (partha2409/DCASE2025_seld_baseline, metrics.py and utils.py) that are
reproduced on purpose, so that our numbers equal the official scorer's:

* Frames scored: with N = the largest frame index in the reference file (0 if it has no rows), only
  frames 0 .. N-1 are scored. The last annotated frame, any later frame and all of an empty
  reference are never scored; predictions there cost nothing. ``score_all_frames=True``
  (``--score-all-frames``) scores every frame of every file instead (not the official number).
* Files are paired by name; only files that have a prediction are scored (a reference without a
  prediction is ignored, as the official loop runs over the prediction files). Jackknife leaves
  one prediction file out at a time.
* Instances: events of one class in one frame are separate instances, stored in a dict of at most
  10 tracks keyed by source id (or the first free track); an 11th instance overwrites track 0.
* Matching: per frame and class, the cost is |fold(az_ref) - fold(az_pred)| (degrees, fold to
  [-90, 90] after wrapping), distance is not part of the cost; ``scipy.optimize.
  linear_sum_assignment`` (references as rows, in file order) pairs K = min(R, P) instances.
  A pair is a spatial false positive when e > 20 or |d_ref - d_pred| / (d_ref + eps) > 1.0
  (strict: exactly 20° or exactly 1.0 is correct).
* F_c = TP / (eps + TP + FP_spatial + 0.5 (FP + FN)); DOAE_c = Σe / (matched + eps) and likewise
  RDE_c, DistE_c (NaN where matched = 0). F20 = mean over all 13 classes (a class that never
  occurs scores 0 and still counts), DOAE_CD / RDE_CD / DistE_CD = nanmean over classes.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats
from scipy.optimize import linear_sum_assignment

from seld.config import CLASS_NAMES, N_CLASSES, N_LABEL_FRAMES
from seld.errors import DataError, UserError
from seld.labels import EVENT_DTYPE, fold_azimuth, read_csv_table

log = logging.getLogger(__name__)

ANGLE_THRESHOLD_DEG = 20.0
REL_DIST_THRESHOLD = 1.0
MAX_TRACKS = 10  # instances of one class in one frame kept by the official scorer
EPS = float(np.finfo(float).eps)
_MAX_ENUM = 4  # cells with up to this many instances per side are solved by enumeration
_TIE_MARGIN_DEG = 1e-9  # closer total costs count as a tie: scipy decides those
# Per-file, per-class counters (last axis of count_errors' output).
COUNTER_NAMES = ("tp", "fp_spatial", "fp", "fn", "matched", "sum_doa_err_deg", "sum_dist_err_cm",
                 "sum_rel_dist_err", "n_ref", "n_pred")
_C = {name: i for i, name in enumerate(COUNTER_NAMES)}
N_COUNTERS = len(COUNTER_NAMES)


# --- Counting -------------------------------------------------------------------------------------
def _concat(events_per_file: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    arrays = [a for a in events_per_file if len(a)]
    lengths = np.array([len(a) for a in events_per_file], dtype=np.int64)
    out = np.empty(int(lengths.sum()), dtype=EVENT_DTYPE)
    if arrays:  # field by field: much faster than concatenating structured arrays
        for name in EVENT_DTYPE.names:
            out[name] = np.concatenate([a[name] for a in arrays])
    return out, np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)


def count_errors(refs: Sequence[np.ndarray], preds: Sequence[np.ndarray],
                 score_all_frames: bool = False) -> np.ndarray:
    """Per-file, per-class counters of the official metric.

    Args:
        refs: per file, reference events (EVENT_DTYPE: frame at 100 ms, class, source, azimuth
            deg, distance cm).
        preds: per file (same order and length), predicted events; any azimuth (folded here).
        score_all_frames: score every frame instead of the official frames 0 .. N-1.
    Returns:
        float64 (n_files, 13, len(COUNTER_NAMES)) counters; sums over files give the pooled
        counters of the official scorer.
    """
    if len(refs) != len(preds):
        raise ValueError(f"{len(refs)} reference files but {len(preds)} prediction files")
    ref_ev, ref_file = _concat(refs)
    pred_ev, pred_file = _concat(preds)
    return _count_table(ref_ev, ref_file, pred_ev, pred_file, len(refs), score_all_frames)


def _organize(sources: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The official ``organize_labels`` for one frame and class (only needed past 10 instances)."""
    tracks: dict[int, int] = {}
    for i, s in enumerate(sources.tolist()):
        if s not in tracks and s < MAX_TRACKS:
            key = s
        else:
            free = list(set(range(MAX_TRACKS)) - tracks.keys())  # set order, as the official
            key = free[0] if free else 0
        tracks[key] = i
    return rows[list(tracks.values())]


def _count_table(ref_ev: np.ndarray, ref_file: np.ndarray, pred_ev: np.ndarray,
                 pred_file: np.ndarray, n_files: int, score_all_frames: bool) -> np.ndarray:
    if not np.all(np.isfinite(pred_ev["azimuth"])):
        raise DataError("a predicted azimuth is NaN or infinite; the official scorer cannot score it")
    bad = (pred_ev["class"] < 0) | (pred_ev["class"] >= N_CLASSES) | (pred_ev["frame"] < 0)
    bad_ref = (ref_ev["class"] < 0) | (ref_ev["class"] >= N_CLASSES) | (ref_ev["frame"] < 0)
    if bad.any() or bad_ref.any():
        raise DataError("an event has a class outside 0..12 or a negative frame")
    if not score_all_frames:  # official: frames 0 .. N-1, N = last reference frame index
        n_scored = np.zeros(n_files, dtype=np.int64)
        np.maximum.at(n_scored, ref_file, ref_ev["frame"].astype(np.int64))
        keep = ref_ev["frame"] < n_scored[ref_file]
        ref_ev, ref_file = ref_ev[keep], ref_file[keep]
        keep = pred_ev["frame"] < n_scored[pred_file]
        pred_ev, pred_file = pred_ev[keep], pred_file[keep]

    n_frames = int(max(ref_ev["frame"].max(initial=0), pred_ev["frame"].max(initial=0))) + 1

    def cells(ev, file_idx):
        key = (file_idx * n_frames + ev["frame"]) * N_CLASSES + ev["class"]
        order = np.argsort(key, kind="stable")
        return key[order], ev[order]

    ref_key, ref_ev = cells(ref_ev, ref_file)
    pred_key, pred_ev = cells(pred_ev, pred_file)
    keys = np.concatenate([ref_key, pred_key])
    keys.sort()
    keys = keys[np.r_[True, keys[1:] != keys[:-1]]] if len(keys) else keys
    r0 = np.searchsorted(ref_key, keys, side="left")
    n_ref = np.searchsorted(ref_key, keys, side="right") - r0
    p0 = np.searchsorted(pred_key, keys, side="left")
    n_pred = np.searchsorted(pred_key, keys, side="right") - p0
    slot = (keys // (n_frames * N_CLASSES)) * N_CLASSES + keys % N_CLASSES  # file * 13 + class

    ref_az = fold_azimuth(ref_ev["azimuth"])
    pred_az = fold_azimuth(pred_ev["azimuth"])
    ref_d, pred_d = ref_ev["distance"], pred_ev["distance"]
    parts: list[tuple[np.ndarray, np.ndarray]] = []  # (cell indices, counter rows (n, K))

    # One side only (at most 10 instances): plain counts, vectorised.
    small = (n_ref <= MAX_TRACKS) & (n_pred <= MAX_TRACKS)
    one_side = np.flatnonzero(small & ((n_ref == 0) | (n_pred == 0)))
    rows_k = np.zeros((len(one_side), N_COUNTERS))
    rows_k[:, _C["fn"]] = rows_k[:, _C["n_ref"]] = n_ref[one_side]
    rows_k[:, _C["fp"]] = rows_k[:, _C["n_pred"]] = n_pred[one_side]
    parts.append((one_side, rows_k))
    done = np.zeros(len(keys), dtype=bool)
    done[one_side] = True

    # Both sides with up to _MAX_ENUM instances: every assignment enumerated at once per shape.
    # Where the cheapest is unique (by a margin) it is the one the Hungarian solver returns; cells
    # with near-ties, larger cells and crowded ones (> 10) go through scipy one by one below.
    both = (n_ref > 0) & (n_pred > 0) & (n_ref <= _MAX_ENUM) & (n_pred <= _MAX_ENUM)
    shape_id = n_ref * (_MAX_ENUM + 1) + n_pred
    for shape in np.unique(shape_id[both]).tolist():
        n_r, n_p = divmod(shape, _MAX_ENUM + 1)
        cells_k = np.flatnonzero(both & (shape_id == shape))
        rows, cols = _assignments(n_r, n_p)  # (n_assign, K) each
        cost = np.abs(ref_az[r0[cells_k, None, None] + rows[None]]
                      - pred_az[p0[cells_k, None, None] + cols[None]])  # (n_cells, n_assign, K)
        total = cost.sum(axis=2)
        best = np.argmin(total, axis=1)
        if len(rows) > 1:
            ordered = np.sort(total, axis=1)
            unique = ordered[:, 1] - ordered[:, 0] > _TIE_MARGIN_DEG
            cells_k, best, cost = cells_k[unique], best[unique], cost[unique]
        e = cost[np.arange(len(cells_k)), best]  # (n_cells, K)
        ri = r0[cells_k, None] + rows[best]
        pi = p0[cells_k, None] + cols[best]
        a = np.abs(ref_d[ri] - pred_d[pi])
        q = a / (ref_d[ri] + EPS)
        n_wrong = ((e > ANGLE_THRESHOLD_DEG) | (q > REL_DIST_THRESHOLD)).sum(axis=1)
        k = min(n_r, n_p)
        rows_k = np.zeros((len(cells_k), N_COUNTERS))
        for name, values in (("tp", k - n_wrong), ("fp_spatial", n_wrong),
                             ("fp", max(0, n_p - n_r)), ("fn", max(0, n_r - n_p)), ("matched", k),
                             ("sum_doa_err_deg", e.sum(axis=1)), ("sum_dist_err_cm", a.sum(axis=1)),
                             ("sum_rel_dist_err", q.sum(axis=1)), ("n_ref", n_r), ("n_pred", n_p)):
            rows_k[:, _C[name]] = values
        parts.append((cells_k, rows_k))
        done[cells_k] = True

    rest = np.flatnonzero(~done)
    rows_k = np.zeros((len(rest), N_COUNTERS))
    for j, k in enumerate(rest.tolist()):
        rr = np.arange(r0[k], r0[k] + n_ref[k])
        pp = np.arange(p0[k], p0[k] + n_pred[k])
        if len(rr) > MAX_TRACKS:
            rr = _organize(ref_ev["source"][rr], rr)
        if len(pp) > MAX_TRACKS:
            pp = _organize(pred_ev["source"][pp], pp)
        rows_k[j] = _count_cell(ref_az[rr], ref_d[rr], pred_az[pp], pred_d[pp])
    parts.append((rest, rows_k))

    cell_idx = np.concatenate([c for c, _ in parts])
    values = np.concatenate([v for _, v in parts])
    where = slot[cell_idx]
    counters = np.stack([np.bincount(where, weights=values[:, i], minlength=n_files * N_CLASSES)
                         for i in range(N_COUNTERS)], axis=-1)
    return counters.reshape(n_files, N_CLASSES, N_COUNTERS)


@functools.cache
def _assignments(n_r: int, n_p: int) -> tuple[np.ndarray, np.ndarray]:
    """All maximal matchings of an n_r x n_p cost matrix: (rows, cols), each (n_assign, min)."""
    if n_r <= n_p:
        cols = np.array(list(itertools.permutations(range(n_p), n_r)), dtype=np.int64)
        rows = np.broadcast_to(np.arange(n_r), cols.shape).copy()
    else:
        rows = np.array(list(itertools.permutations(range(n_r), n_p)), dtype=np.int64)
        cols = np.broadcast_to(np.arange(n_p), rows.shape).copy()
    return rows, cols


def _count_cell(ref_az, ref_d, pred_az, pred_d) -> np.ndarray:
    """Counters of one frame and class with any number of instances (folded azimuths)."""
    out = np.zeros(N_COUNTERS)
    n_r, n_p = len(ref_az), len(pred_az)
    out[_C["n_ref"]], out[_C["n_pred"]] = n_r, n_p
    if n_r == 0 or n_p == 0:
        out[_C["fn"]], out[_C["fp"]] = n_r, n_p
        return out
    cost = np.abs(ref_az[:, None] - pred_az[None, :])
    rows, cols = linear_sum_assignment(cost)
    e = cost[rows, cols]
    a = np.abs(ref_d[rows] - pred_d[cols])
    q = a / (ref_d[rows] + EPS)
    n_wrong = np.count_nonzero((e > ANGLE_THRESHOLD_DEG) | (q > REL_DIST_THRESHOLD))
    k = len(rows)
    out[_C["tp"]] = k - n_wrong
    out[_C["fp_spatial"]] = n_wrong
    out[_C["fp"]] = max(0, n_p - n_r)
    out[_C["fn"]] = max(0, n_r - n_p)
    out[_C["matched"]] = k
    out[_C["sum_doa_err_deg"]], out[_C["sum_dist_err_cm"]], out[_C["sum_rel_dist_err"]] = (
        e.sum(), a.sum(), q.sum())
    return out


# --- Scores ----------------------------------------------------------------------------------------
def _class_metrics(totals: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class F, DOAE, RDE, DistE from pooled counters (..., 13, K) -> arrays (..., 13)."""
    c = {name: totals[..., i] for i, name in enumerate(COUNTER_NAMES)}
    f = c["tp"] / (EPS + c["tp"] + c["fp_spatial"] + 0.5 * (c["fp"] + c["fn"]))
    out = {"f": f}
    for key, name in (("doae", "sum_doa_err_deg"), ("rde", "sum_rel_dist_err"),
                      ("dist_err", "sum_dist_err_cm")):
        value = c[name] / (c["matched"] + EPS)
        out[key] = np.where(c["matched"] == 0, np.nan, value)
    return out


def _summary_metrics(totals: np.ndarray) -> dict[str, np.ndarray]:
    cls = _class_metrics(totals)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN classes -> NaN, as nanmean says
        return {
            "f20": 100.0 * cls["f"].mean(axis=-1),
            "doae_cd": np.nanmean(cls["doae"], axis=-1),
            "rde_cd": np.nanmean(cls["rde"], axis=-1),
            "dist_err_cd": np.nanmean(cls["dist_err"], axis=-1),
        }


def _json_float(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


@dataclass(frozen=True)
class SeldScore:
    """Official scores of a set of files.

    f20: location-sensitive F-score at 20° / relative distance 1.0, in percent (macro, 13 classes);
    doae_cd: class-dependent direction error (deg); rde_cd: relative distance error; dist_err_cd:
    absolute distance error (cm); classwise: one dict per class; intervals: jackknife results
    (metric -> dict with estimate, bias, std_err, low, high), when requested.
    """

    f20: float
    doae_cd: float
    rde_cd: float
    dist_err_cd: float
    n_files: int
    classwise: list[dict]
    intervals: dict[str, dict[str, float]] | None = None
    score_all_frames: bool = False
    counters: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """JSON-ready dict (NaN -> None; counters left out)."""
        out = {
            "f20": _json_float(self.f20),
            "doae_cd": _json_float(self.doae_cd),
            "rde_cd": _json_float(self.rde_cd),
            "dist_err_cd": _json_float(self.dist_err_cd),
            "n_files": self.n_files,
            "score_all_frames": self.score_all_frames,
            "classwise": [{k: _json_float(v) if isinstance(v, float) else v for k, v in row.items()}
                          for row in self.classwise],
        }
        if self.intervals is not None:
            out["jackknife"] = {m: {k: _json_float(v) for k, v in d.items()}
                                for m, d in self.intervals.items()}
        return out


def score_counters(counters: np.ndarray, jackknife: bool = False,
                   score_all_frames: bool = False) -> SeldScore:
    """Scores from per-file counters (n_files, 13, K) (or pooled (13, K))."""
    counters = np.asarray(counters, dtype=np.float64)
    per_file = counters if counters.ndim == 3 else counters[None]
    totals = per_file.sum(axis=0)
    summary = _summary_metrics(totals)
    cls = _class_metrics(totals)
    classwise = []
    for c in range(N_CLASSES):
        row = {"class": c, "name": CLASS_NAMES[c], "f20": 100.0 * float(cls["f"][c]),
               "doae": float(cls["doae"][c]), "rde": float(cls["rde"][c]),
               "dist_err": float(cls["dist_err"][c])}
        row.update({name: int(totals[c, _C[name]]) for name in
                    ("tp", "fp_spatial", "fp", "fn", "matched", "n_ref", "n_pred")})
        classwise.append(row)
    return SeldScore(
        f20=float(summary["f20"]), doae_cd=float(summary["doae_cd"]),
        rde_cd=float(summary["rde_cd"]), dist_err_cd=float(summary["dist_err_cd"]),
        n_files=len(per_file), classwise=classwise,
        intervals=jackknife_intervals(per_file) if jackknife else None,
        score_all_frames=score_all_frames, counters=per_file)


def jackknife_intervals(counters: np.ndarray, significance_level: float = 0.05
                        ) -> dict[str, dict[str, float]]:
    """Leave-one-file-out jackknife estimates and (1 - significance_level) intervals.

    Leaving a file out subtracts its counters from the totals (no rerun). As the official
    ``jackknife_estimation``: bias = (n-1)(mean(partial) - global), std_err =
    sqrt((n-1) mean((partial - mean)^2)), estimate = global - bias, interval = estimate ± t·std_err
    with Student's t at n-1 degrees of freedom.

    Args:
        counters: (n_files, 13, K) from :func:`count_errors`; n_files >= 2.
    Returns:
        {"f20" | "doae_cd" | "rde_cd" | "dist_err_cd": {global, estimate, bias, std_err, low, high}}
    """
    counters = np.asarray(counters, dtype=np.float64)
    n = len(counters)
    if n < 2:
        raise UserError(f"the jackknife needs at least 2 files, got {n}")
    totals = counters.sum(axis=0)
    global_values = _summary_metrics(totals)
    partial = _summary_metrics(totals[None] - counters)
    return {name: jackknife_from_partials(float(global_values[name]), pe, significance_level)
            for name, pe in partial.items()}


def jackknife_from_partials(global_value: float, partial: np.ndarray, significance_level: float = 0.05
                            ) -> dict[str, float]:
    """The official jackknife from a statistic on all n files and its n leave-one-out values:
    bias = (n-1)(mean(partial) - global), std_err = sqrt((n-1) mean((partial - mean)^2)),
    estimate = global - bias, interval = estimate +- t * std_err (Student's t, n-1 degrees of freedom).
    """
    pe = np.asarray(partial, dtype=np.float64)
    n = len(pe)
    t_value = float(stats.t.ppf(1 - significance_level / 2, n - 1))
    mean = float(np.mean(pe))
    g = float(global_value)
    bias = (n - 1) * (mean - g)
    std_err = float(np.sqrt((n - 1) * np.mean((pe - mean) ** 2)))
    est = g - bias
    return {"global": g, "estimate": est, "bias": bias, "std_err": std_err,
            "low": est - t_value * std_err, "high": est + t_value * std_err}


def summary_metrics(totals: np.ndarray) -> dict[str, np.ndarray]:
    """F20 (%), DOAE_CD, RDE_CD and DistE_CD from pooled counters (..., 13, K) -> arrays (...)."""
    return _summary_metrics(np.asarray(totals, dtype=np.float64))


def score_events(refs: Sequence[np.ndarray], preds: Sequence[np.ndarray],
                 score_all_frames: bool = False, jackknife: bool = False) -> SeldScore:
    """Official scores of in-memory events (one array per file, refs and preds in the same order).

    Used by validation and threshold fitting: no CSV round trip.
    """
    return score_counters(count_errors(refs, preds, score_all_frames), jackknife=jackknife,
                          score_all_frames=score_all_frames)


def _index_csvs(root: Path, what: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if not name.endswith(".csv"):
                continue
            path = os.path.join(folder, name)
            if name in found:
                raise DataError(f"{what} folder {root}: two files named {name} "
                                f"({found[name]} and {path}); files are paired by name")
            found[name] = path
    return found


def pair_files(reference_dir: str | Path, prediction_dir: str | Path
               ) -> tuple[list[str], list[str]]:
    """Pair prediction CSVs with reference CSVs by file name (both folders searched recursively).

    Returns:
        (reference paths, prediction paths) as strings, in the same order, sorted by file name.
    """
    reference_dir, prediction_dir = Path(reference_dir), Path(prediction_dir)
    for d, what in ((reference_dir, "reference"), (prediction_dir, "prediction")):
        if not d.is_dir():
            raise UserError(f"{what} folder {d} does not exist or is not a folder")
    refs = _index_csvs(reference_dir, "reference")
    preds = _index_csvs(prediction_dir, "prediction")
    if not preds:
        raise UserError(f"prediction folder {prediction_dir} holds no *.csv files")
    missing = sorted(set(preds) - set(refs))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"{len(missing)} prediction file(s) in {prediction_dir} have no reference "
                        f"file of the same name under {reference_dir}: {shown}")
    unscored = len(set(refs) - set(preds))
    if unscored:
        log.warning("%d reference file(s) under %s have no prediction and are not scored "
                    "(as in the official scorer)", unscored, reference_dir)
    names = sorted(preds)
    return [refs[n] for n in names], [preds[n] for n in names]


def score_dirs(reference_dir: str | Path, prediction_dir: str | Path,
               score_all_frames: bool = False, jackknife: bool = False,
               n_frames: int | None = N_LABEL_FRAMES) -> SeldScore:
    """Official scores of a folder of prediction CSVs against a folder of reference CSVs.

    Args:
        reference_dir: searched recursively; references are read strictly (clip of n_frames
            frames; None allows any length).
        prediction_dir: searched recursively; read as the official scorer reads them.
    """
    ref_paths, pred_paths = pair_files(reference_dir, prediction_dir)
    ref_ev, ref_file = read_csv_table(ref_paths, "reference", n_frames)
    pred_ev, pred_file = read_csv_table(pred_paths, "prediction")
    counters = _count_table(ref_ev, ref_file, pred_ev, pred_file, len(pred_paths),
                            score_all_frames)
    return score_counters(counters, jackknife=jackknife, score_all_frames=score_all_frames)
