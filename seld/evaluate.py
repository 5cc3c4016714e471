"""End-of-run scoring in memory, once (Ray-free): a network, its checkpoints' weights and store rows
(`seld.data.ClipBatch`, events at 100 ms, azimuth deg, distance cm) -> metrics.json's scores and the
test prediction events; writes only prediction CSVs (:func:`write_predictions`) and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seld.config import SPLITS, ExperimentConfig
from seld.data import ClipBatch
from seld.labels import as_written, read_csv_table, write_csv
from seld.metrics import SeldScore, count_errors, pair_files, score_counters, score_events
from seld.postprocess import GLOBAL_GRID, decode_outputs, fit_thresholds, scan_global_threshold
from seld.predict import infer
from seld.runfolder import PREDICTIONS, PREDICTIONS_T05

SCALAR_KEYS = ("f20", "doae_cd", "rde_cd", "dist_err_cd")  # the `prefix/name` scores of a set
BREAKDOWN_METRICS = ("f20", "doae_cd", "rde_cd")  # the scores of each breakdown cell
DISTANCE_BINS_M = (0.0, 1.5, 3.0, 100.0)  # reference/predicted event distance bins; the last is ">=3m"
POLYPHONY = (1, 2, 3)  # reference events in a frame; 3 means 3 or more


# --- Scores of a set of clips ----------------------------------------------------------------------
def pooled_counters(refs: Sequence[np.ndarray], preds: Sequence[np.ndarray]) -> np.ndarray:
    """Official metric counters of some clips pooled over the clips (so workers can sum theirs).

    Args:
        refs, preds: per clip, reference and predicted events (labels.EVENT_DTYPE), same order.
    Returns:
        float64 (1, 13, len(metrics.COUNTER_NAMES)).
    """
    return count_errors(refs, preds).sum(axis=0, keepdims=True)


def flat_scores(score: SeldScore, prefix: str) -> dict[str, float | None]:
    """Scalar scores as ``prefix/<f20|doae_cd|rde_cd|dist_err_cd>`` (f20 in %, DOAE deg, DistE cm;
    None where undefined, e.g. DOAE with no match), as in ``seld evaluate --json``."""
    d = score.to_dict()
    return {f"{prefix}/{k}": d[k] for k in SCALAR_KEYS}


def score_outputs(outputs: np.ndarray, refs: Sequence[np.ndarray], output_format: str,
                  thresholds) -> tuple[SeldScore, list[np.ndarray]]:
    """Score network outputs as their prediction CSVs would be scored.

    Args:
        outputs: (n, 50, 13, 3) ACCDOA or (n, 50, 3, 13, 3) multi-ACCDOA, (x, y, distance_m).
        refs: n reference event arrays, in the same order.
        output_format: "accdoa" or "multi_accdoa".
        thresholds: activity threshold, a float or one per class (13,).
    Returns:
        (the SeldScore with per-clip counters (n, 13, K), the n predicted event arrays as written:
        integer azimuth deg and distance cm, see :func:`seld.labels.as_written`).
    """
    preds = decode_as_written(outputs, output_format, thresholds)
    return score_counters(count_errors(refs, preds)), preds


def decode_as_written(outputs: np.ndarray, output_format: str, thresholds) -> list[np.ndarray]:
    """Predicted events of network outputs as their CSVs hold them (integer azimuth deg and distance
    cm, :func:`seld.labels.as_written`): the one decoding every validation and test score uses.

    The rounding matters: references are integers and the thresholds (20 deg, relative distance 1)
    too, so rounding moves an error in (20, 20.5) deg to 20, a hit (the criterion is > 20), and
    never a hit to a miss; scores of unrounded events read up to ~1 point lower than those of the
    written files (measured over the committed runs: +0.09 to +0.99 points, median +0.48).
    """
    return [as_written(e) for e in decode_outputs(outputs, output_format, thresholds)]


def infer_by_split(model: torch.nn.Module, rows: ClipBatch, mean, std, batch_size: int,
                   device="cpu", amp_bf16: bool = False) -> np.ndarray:
    """Outputs of rows in row order, batched per split folder as `seld predict` batches a folder.

    Args:
        rows: store rows (features (n, 2, 251, n_mels) in the store dtype).
        mean, std: float32 (2, 1, n_mels) normalisation of the run, or None.
    Returns:
        float32 (n, 50, 13, 3) ACCDOA or (n, 50, 3, 13, 3) multi-ACCDOA.
    """
    outputs = [None] * len(rows)
    for split in sorted(set(rows.splits)):
        idx = np.flatnonzero(rows.splits == split)
        out = infer(model, rows.features[idx], mean, std, batch_size, device, amp_bf16)
        for i, o in zip(idx, out, strict=True):
            outputs[i] = o
    return np.stack(outputs)


# --- Breakdowns -----------------------------------------------------------------------------------------
def _value(x) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def _frame_polyphony(events: np.ndarray) -> dict[int, int]:
    """Reference events per label frame: {frame: count}."""
    frames, counts = np.unique(np.asarray(events["frame"], dtype=np.int64), return_counts=True)
    return {int(f): int(c) for f, c in zip(frames, counts, strict=True)}


def site_of(split: str) -> str:
    """The recording site of a split folder (``SPLITS``); an unknown folder is its own site."""
    return SPLITS[split]["site"] if split in SPLITS else str(split)


def score_breakdowns(refs: Sequence[np.ndarray], preds: Sequence[np.ndarray], splits: Sequence[str],
                     names: Sequence[str], *, counters: np.ndarray | None = None, prefix: str = "test_pp",
                     distance_bins_m: Sequence[float] = DISTANCE_BINS_M) -> dict[str, float | None]:
    """Per-site, per-distance-bin and per-polyphony scores of some files, plus the jackknife interval
    (leave one file out) of the overall scores when there are more than 2 files.

    Files are scored in one canonical order, by split folder (in ``SPLITS`` order) then by name, so
    the result does not depend on the order given (float sums and the jackknife see the same order
    whether the events come from store rows or from CSVs). Distance bins keep reference and
    predicted events by their own distance (lo <= d < hi, in m); polyphony keeps every event of the
    frames with exactly k reference events (k = 3: 3 or more).

    Args:
        refs, preds: per file, reference and predicted events (labels.EVENT_DTYPE; predictions as
            written, so the scores equal those of the CSVs).
        splits: per file, its split folder (e.g. ``dev-test-tau``); gives the site.
        names: per file, its CSV file name (orders the files within a split).
        counters: optional per-file counters (n, 13, K) of refs and preds from
            :func:`seld.metrics.count_errors`, in the given order: the overall and per-site scores
            reuse them instead of counting again.
        prefix: the key prefix (``test_pp`` for the run's ``predictions/``).
        distance_bins_m: bin edges in m; a bin whose upper edge is >= 100 is named ``>=<lo>m``.
    Returns:
        flat keys ``<prefix>/site/<site>/<m>``, ``<prefix>/distance/<lo>-<hi>m/<m>`` (or
        ``>=<lo>m``), ``<prefix>/polyphony/<k>/<m>`` for m in f20 (%), doae_cd (deg), rde_cd, and
        ``<prefix>/<m>_ci_lo`` / ``_ci_hi`` (95 %); None where a score is undefined; {} for no files.
    """
    n = len(refs)
    if not (len(preds) == len(splits) == len(names) == n):
        raise ValueError(f"{n} reference files but {len(preds)} predictions, {len(splits)} splits, "
                         f"{len(names)} names")
    if not n:
        return {}
    rank = {s: i for i, s in enumerate(SPLITS)}
    order = sorted(range(n), key=lambda i: (rank.get(splits[i], len(rank)), str(splits[i]), str(names[i])))
    refs = [refs[i] for i in order]
    preds = [preds[i] for i in order]
    sites = [site_of(splits[i]) for i in order]
    counters = count_errors(refs, preds) if counters is None else np.asarray(counters)[order]
    out: dict[str, float | None] = {}

    def put(key: str, score: SeldScore) -> None:
        for m in BREAKDOWN_METRICS:
            out[f"{prefix}/{key}/{m}"] = _value(getattr(score, m))

    full = score_counters(counters, jackknife=n > 2)
    for m in BREAKDOWN_METRICS:
        iv = (full.intervals or {}).get(m)
        if iv:
            out[f"{prefix}/{m}_ci_lo"], out[f"{prefix}/{m}_ci_hi"] = _value(iv["low"]), _value(iv["high"])
    for site in sorted(set(sites)):
        put(f"site/{site}", score_counters(counters[[i for i, s in enumerate(sites) if s == site]]))
    for lo, hi in zip(distance_bins_m[:-1], distance_bins_m[1:], strict=True):
        def keep(ev, lo=lo, hi=hi):
            return ev[(ev["distance"] >= lo * 100) & (ev["distance"] < hi * 100)]
        name = f"{lo:g}-{hi:g}m" if hi < 100 else f">={lo:g}m"
        put(f"distance/{name}", score_events([keep(r) for r in refs], [keep(p) for p in preds]))
    for k in POLYPHONY:
        def frames_with(ref, pred, k=k):
            poly = _frame_polyphony(ref)
            sel = {f for f, c in poly.items() if (c >= k if k == POLYPHONY[-1] else c == k)}
            return (ref[np.isin(ref["frame"], list(sel))] if len(ref) else ref,
                    pred[np.isin(pred["frame"], list(sel))] if len(pred) else pred)
        pairs = [frames_with(r, p) for r, p in zip(refs, preds, strict=True)]
        put(f"polyphony/{k}", score_events([a for a, _ in pairs], [b for _, b in pairs]))
    return out


def _per_file(events: np.ndarray, file_index: np.ndarray, n_files: int) -> list[np.ndarray]:
    bounds = np.searchsorted(file_index, np.arange(n_files + 1))
    return [events[bounds[i]:bounds[i + 1]] for i in range(n_files)]


def score_breakdowns_of_dirs(reference_dir: str | Path, prediction_dir: str | Path,
                             prefix: str = "test_pp") -> dict[str, float | None]:
    """:func:`score_breakdowns` of a folder of prediction CSVs against reference CSVs.

    Files are paired by name as ``seld evaluate`` pairs them (:func:`seld.metrics.pair_files`; only
    references with a prediction are scored); a file's split (hence its site) is the name of the
    folder its reference lies in (``metadata_dev/<split>/``).
    """
    ref_paths, pred_paths = pair_files(reference_dir, prediction_dir)
    refs = _per_file(*read_csv_table(ref_paths, "reference"), len(ref_paths))
    preds = _per_file(*read_csv_table(pred_paths, "prediction"), len(pred_paths))
    return score_breakdowns(refs, preds, [Path(p).parent.name for p in ref_paths],
                            [Path(p).name for p in pred_paths], prefix=prefix)


# --- Prediction CSVs ----------------------------------------------------------------------------------
def prediction_csv_name(clip: str) -> str:
    """The file name of a clip's prediction CSV (the stem of its wav)."""
    return f"{Path(clip).stem}.csv"


def write_predictions(folder: str | Path, clips: Sequence[str], events: Sequence[np.ndarray]) -> None:
    """Write one DCASE2025 CSV per clip into `folder` (``<stem>.csv``; integer azimuth deg, distance cm)."""
    for clip, ev in zip(clips, events, strict=True):
        write_csv(Path(folder) / prediction_csv_name(clip), ev)


# --- The end of a run ------------------------------------------------------------------------------------
@dataclass
class RunScores:
    """What the end of a run scored.

    metrics: metrics.json's scores (flat ``split/metric`` keys, ``*_epoch``, ``global_threshold``,
    ``threshold_scan``, ``thresholds``, ``classwise``, the test breakdowns); thresholds: float64
    (13,) fitted on validation; predictions: {"predictions": test events at the thresholds,
    "predictions_t05": at the default threshold}, one array per test clip (as written);
    val_predictions: the validation events at the default threshold (as written), one per clip.
    """

    metrics: dict[str, Any]
    thresholds: np.ndarray
    predictions: dict[str, list[np.ndarray]] = field(default_factory=dict)
    counters: dict[str, np.ndarray] = field(default_factory=dict)  # prefix -> (n_test, 13, K), test order
    # The validation events at the default threshold, as written (one array per validation clip):
    # what ``val/f20`` scored, and what the selection scored at the selected epoch.
    val_predictions: list[np.ndarray] = field(default_factory=list)


def evaluate_run(net: torch.nn.Module, selected: dict, val: ClipBatch, tests: dict[str, ClipBatch],
                 cfg: ExperimentConfig, mean, std, device="cpu", amp_bf16: bool = False,
                 stage1: dict | None = None) -> RunScores:
    """Infer, decode and score the end of a run in memory, each set once.

    With the selected checkpoint: validation at ``cfg.train.val_threshold`` (``val/``), the class
    thresholds fitted on validation (``val_pp/``), the global-threshold scan (``val_global/``,
    ``test_global/``), the test set at the default threshold (``test/``) and at the thresholds
    (``test_pp/``, with its breakdowns by site, distance and polyphony and the jackknife interval),
    the synthetic test set (``synth_test/``, when given); with ``stage1``, the test set at the
    default threshold (``stage1_test/``). The network ends with the selected weights loaded.

    Args:
        net: the run's model (any device); its weights are replaced by the checkpoints'.
        selected, stage1: checkpoint dicts as ``seld.predict.read_model_file`` returns them
            ("model": state dict, "meta": {"epoch": ...}).
        val: the validation rows; tests: {"test": real test rows, "synth_test": optional}.
        cfg: the run's config (output format, batch size, default threshold).
        mean, std: float32 (2, 1, n_mels) normalisation, or None.
        device, amp_bf16: where and in which precision to infer (``seld.predict.bf16_autocast``).
    Returns:
        RunScores.
    """
    fmt, t05, bs = cfg.model.output_format, cfg.train.val_threshold, cfg.train.batch_size
    test = tests["test"]
    metrics: dict[str, Any] = {}
    counters: dict[str, np.ndarray] = {}

    def outputs_of(blob: dict, name: str, sets: list[ClipBatch]) -> list[np.ndarray]:
        net.load_state_dict(blob["model"])
        metrics[f"{name}_epoch"] = int(blob["meta"].get("epoch", -1))
        return [infer_by_split(net, rows, mean, std, bs, device, amp_bf16) for rows in sets]

    if stage1 is not None:
        (out1,) = outputs_of(stage1, "stage1", [test])
        s_stage1 = score_outputs(out1, test.events, fmt, t05)[0]
        metrics.update(flat_scores(s_stage1, "stage1_test"))
        counters["stage1_test"] = s_stage1.counters
    out_val, out_test = outputs_of(selected, "selected", [val, test])
    s_val, preds_val = score_outputs(out_val, val.events, fmt, t05)
    metrics.update(flat_scores(s_val, "val"))
    thr = np.asarray(fit_thresholds(out_val, val.events, fmt), dtype=np.float64)
    metrics.update(flat_scores(score_outputs(out_val, val.events, fmt, thr)[0], "val_pp"))
    # The global-threshold grid on validation; its best value is also scored on test (no retraining).
    t_glob, scan = scan_global_threshold(out_val, val.events, fmt, GLOBAL_GRID)
    metrics["global_threshold"] = t_glob
    metrics["threshold_scan"] = {"threshold": list(GLOBAL_GRID), "val_f20": [float(f) for f in scan]}
    metrics.update(flat_scores(score_outputs(out_val, val.events, fmt, t_glob)[0], "val_global"))
    metrics.update(flat_scores(score_outputs(out_test, test.events, fmt, t_glob)[0], "test_global"))
    s_test, preds05 = score_outputs(out_test, test.events, fmt, t05)
    s_pp, preds_pp = score_outputs(out_test, test.events, fmt, thr)
    metrics.update(flat_scores(s_test, "test"))
    metrics.update(flat_scores(s_pp, "test_pp"))
    counters["test"], counters["test_pp"] = s_test.counters, s_pp.counters
    metrics.update(score_breakdowns(test.events, preds_pp, test.splits,
                                    [prediction_csv_name(c) for c in test.clips],
                                    counters=s_pp.counters, prefix="test_pp"))
    if "synth_test" in tests:
        o = infer_by_split(net, tests["synth_test"], mean, std, bs, device, amp_bf16)
        metrics.update(flat_scores(score_outputs(o, tests["synth_test"].events, fmt, t05)[0], "synth_test"))
    metrics["thresholds"] = [float(t) for t in np.broadcast_to(thr, (13,))]
    metrics["classwise"] = {"test": s_test.to_dict().get("classwise", []),
                            "test_pp": s_pp.to_dict().get("classwise", [])}
    return RunScores(metrics, thr, {PREDICTIONS: preds_pp, PREDICTIONS_T05: preds05}, counters,
                     val_predictions=preds_val)


__all__ = ["BREAKDOWN_METRICS", "DISTANCE_BINS_M", "SCALAR_KEYS", "RunScores", "decode_as_written", "evaluate_run",
           "flat_scores", "infer_by_split", "pooled_counters", "prediction_csv_name", "score_breakdowns",
           "score_breakdowns_of_dirs", "score_outputs", "site_of", "write_predictions"]
