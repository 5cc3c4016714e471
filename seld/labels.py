"""DCASE2025 label files and model targets: read/write the stereo and FOA CSVs (spec §3), fold
azimuths (spec §4), encode events as ACCDOA / multi-ACCDOA (ADPIT) targets at 100 ms and decode
model outputs back to events.

Events are numpy structured arrays of :data:`EVENT_DTYPE` (azimuth in degrees, positive = left;
distance in cm); targets are float32 arrays with distance in metres, one row per 100 ms label frame.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from seld.config import N_CLASSES, N_LABEL_FRAMES
from seld.errors import DataError
from seld.runfolder import write_text_atomic

log = logging.getLogger(__name__)

EVENT_DTYPE = np.dtype(
    [("frame", "i4"), ("class", "i4"), ("source", "i4"), ("azimuth", "f8"), ("distance", "f8"),
     ("onscreen", "i4")]
)
FOA_EVENT_DTYPE = np.dtype(
    [("frame", "i4"), ("class", "i4"), ("source", "i4"), ("azimuth", "f8"), ("elevation", "f8"),
     ("distance", "f8")]
)
STEREO_HEADER = "frame,class,source,azimuth,distance,onscreen"
FOA_HEADER = "frame,class,source,azimuth,elevation,distance"
# Channels of a target cell: activity, activity * cos(az), activity * sin(az), distance in metres.
N_TARGET_CHANNELS = 4
# ADPIT slots (spec §7): A0 (one event of the class), B0 B1 (two), C0 C1 C2 (three).
N_ADPIT_SLOTS = 6
N_TRACKS = 3
_SLOT_OFFSET = (None, 0, 1, 3)  # first slot used when a class has 1, 2, 3 events in a frame

# A body of lines that Python's int()/float() parse exactly as pandas' C parser does; files
# outside this form go through the line-by-line readers (same result, exact error messages).
_NUM = rb"-?\d+"
_FLT = rb"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|inf)"
_CANONICAL_BODY = {
    kind: re.compile(rb"(?:" + rb",".join([_NUM, _NUM, _NUM, num, num, _NUM]) + rb"\r?\n)*")
    for kind, num in (("prediction", _FLT), ("reference", _NUM))
}


def empty_events(dtype: np.dtype = EVENT_DTYPE) -> np.ndarray:
    """An event array with no rows."""
    return np.zeros(0, dtype=dtype)


def make_events(rows: Sequence[Sequence[float]] | np.ndarray, dtype: np.dtype = EVENT_DTYPE
                ) -> np.ndarray:
    """Events from rows of (frame, class, source, azimuth, distance, onscreen) (or the FOA columns)."""
    rows = [tuple(r) for r in rows]
    return np.array(rows, dtype=dtype) if rows else empty_events(dtype)


# --- Azimuth conventions (spec §4) ----------------------------------------------------------------
def wrap_azimuth(deg):
    """Wrap degrees to [-180, 180). Scalar or array in, same out."""
    return np.mod(np.asarray(deg, dtype=np.float64) + 180.0, 360.0) - 180.0


def fold_azimuth(deg):
    """Fold degrees to [-90, 90] after wrapping (mirror about the left-right axis, asin(sin φ)).

    φ in [-180, -90) -> -180 - φ; φ in (90, 180) -> 180 - φ; else φ. Exact for integer degrees
    (no trigonometry), so 150° folds to exactly 30°.
    """
    w = wrap_azimuth(deg)
    return np.where(w < -90.0, -180.0 - w, np.where(w > 90.0, 180.0 - w, w))


# --- Reading and writing CSVs ----------------------------------------------------------------------
def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: label file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read label file ({e})") from None


def _parse_int(text: str, path: Path, lineno: int, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(f"{path}:{lineno}: {name} must be an integer, got {text.strip()!r}") from None


def _parse_float(text: str, path: Path, lineno: int, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{path}:{lineno}: {name} must be a number, got {text.strip()!r}") from None


def read_reference_csv(path: str | Path, n_frames: int | None = N_LABEL_FRAMES) -> np.ndarray:
    """Read a reference (ground-truth) stereo CSV strictly.

    Every row must have the six integer columns of the 2025 header; class in 0..12, frame in
    [0, n_frames) (any frame >= 0 when n_frames is None), azimuth in [-90, 90], distance >= 0,
    onscreen 0/1. Any violation raises :class:`DataError` naming ``file:line``; nothing is dropped.

    Returns:
        events of EVENT_DTYPE in file order (azimuth deg, distance cm).
    """
    path = Path(path)
    lines = _read_text(path).splitlines()
    if not lines or lines[0].strip().lower() != STEREO_HEADER:
        got = lines[0].strip() if lines else "an empty file"
        raise DataError(f"{path}:1: expected the header {STEREO_HEADER!r}, got {got!r}")
    rows = []
    for lineno, (frame, cls, src, az, dist, onscreen) in _strict_int_rows(path, lines, 1, STEREO_HEADER):
        _check_row(path, lineno, frame, cls, n_frames)
        if not -90 <= az <= 90:
            raise DataError(f"{path}:{lineno}: stereo azimuth {az} is outside [-90, 90] degrees")
        if dist < 0:
            raise DataError(f"{path}:{lineno}: distance {dist} cm is negative")
        if onscreen not in (0, 1):
            raise DataError(f"{path}:{lineno}: onscreen must be 0 or 1, got {onscreen}")
        rows.append((frame, cls, src, az, dist, onscreen))
    return make_events(rows)


def _strict_int_rows(path: Path, lines: list[str], start: int, header: str):
    """Yield (line number, six ints) for every data line from index `start`; an empty line, a wrong
    column count or a non-integer value raises DataError naming ``file:line`` and the column."""
    names = header.split(",")
    for lineno, line in enumerate(lines[start:], start=start + 1):
        if not line.strip():
            raise DataError(f"{path}:{lineno}: empty line inside the label file")
        values = line.split(",")
        if len(values) != len(names):
            raise DataError(f"{path}:{lineno}: expected {len(names)} comma-separated values, got {len(values)}")
        yield lineno, tuple(_parse_int(v, path, lineno, n) for v, n in zip(values, names, strict=True))


def _check_row(path: Path, lineno: int, frame: int, cls: int, n_frames: int | None) -> None:
    if not 0 <= cls < N_CLASSES:
        raise DataError(f"{path}:{lineno}: class {cls} is outside 0..{N_CLASSES - 1}")
    if frame < 0 or (n_frames is not None and frame >= n_frames):
        limit = f"[0, {n_frames})" if n_frames is not None else ">= 0"
        raise DataError(f"{path}:{lineno}: frame {frame} is outside the clip (expected {limit})")


def read_prediction_csv(path: str | Path) -> np.ndarray:
    """Read a prediction CSV as the official scorer does.

    The first line is skipped whatever it holds; frame, class, source, onscreen are parsed as
    integers and azimuth, distance as floats (any azimuth: the metric folds it; frames past the
    clip are kept: the metric decides what is scored). Blank lines are skipped. A row the official
    code could not parse (too few columns, a non-integer frame) or that it could not score
    (class outside 0..12, negative frame, a NaN or infinite azimuth) raises :class:`DataError` naming ``file:line``.
    """
    path = Path(path)
    lines = _read_text(path).splitlines()
    rows = []
    names = STEREO_HEADER.split(",")
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        values = line.split(",")
        if len(values) < 6:
            raise DataError(f"{path}:{lineno}: expected 6 comma-separated values, got {len(values)}")
        frame, cls, src = (_parse_int(values[i], path, lineno, names[i]) for i in range(3))
        az, dist = (_parse_float(values[i], path, lineno, names[i]) for i in (3, 4))
        onscreen = _parse_int(values[5], path, lineno, names[5])
        _check_row(path, lineno, frame, cls, None)
        if not np.isfinite(az):  # the official scorer's assignment step fails on it
            raise DataError(f"{path}:{lineno}: azimuth must be a finite number, got {values[3]!r}")
        rows.append((frame, cls, src, az, dist, onscreen))
    return make_events(rows)


def read_csv_table(paths: Sequence[str | Path], kind: str, n_frames: int | None = N_LABEL_FRAMES
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Read many stereo CSVs at once; same result as the per-file readers, much faster.

    Args:
        paths: CSV files.
        kind: "reference" (as :func:`read_reference_csv`) or "prediction" (as
            :func:`read_prediction_csv`).
        n_frames: clip length in frames for references.
    Returns:
        (events, file_index): all rows concatenated in file order (EVENT_DTYPE) and, per row, the
        position of its file in ``paths`` (int64).
    """
    if kind not in ("reference", "prediction"):
        raise ValueError(f"kind must be 'reference' or 'prediction', got {kind!r}")
    bodies, counts, slow = [], np.zeros(len(paths), dtype=np.int64), set()
    header = STEREO_HEADER.encode()
    for i, p in enumerate(paths):
        try:
            with open(p, "rb") as f:
                data = f.read()
        except OSError as e:
            raise DataError(f"{p}: cannot read label file ({e})") from None
        head, _, body = data.partition(b"\n")
        if body and not body.endswith(b"\n"):
            body += b"\n"
        if (kind == "prediction" or head.strip().lower() == header) and _is_canonical(body, kind):
            bodies.append(body)
            counts[i] = body.count(b"\n")
        else:
            slow.add(i)
    try:
        events = _parse_bodies(b"".join(bodies), int(counts.sum()))
    except (ValueError, pd.errors.ParserError):  # something the quick checks let through
        slow, events = set(range(len(paths))), empty_events()
    if slow:  # files outside the canonical form: exact line-by-line readers
        reader = read_prediction_csv if kind == "prediction" else (
            lambda q: read_reference_csv(q, n_frames))
        parts, pos = [], 0
        for i, p in enumerate(paths):
            if i in slow:
                ev = reader(p)
                counts[i] = len(ev)
            else:
                ev = events[pos:pos + counts[i]]
                pos += counts[i]
            parts.append(ev)
        events = np.concatenate(parts) if parts else empty_events()
    file_index = np.repeat(np.arange(len(paths), dtype=np.int64), counts)
    bad = _invalid_rows(events, kind, n_frames)
    if bad.any():  # re-read the first offending file line by line for an exact error message
        p = paths[int(file_index[np.argmax(bad)])]
        (read_prediction_csv(p) if kind == "prediction" else read_reference_csv(p, n_frames))
        raise DataError(f"{p}: invalid label values")  # pragma: no cover (reader raises first)
    return events, file_index


_INTEGER_BYTES = b"0123456789,-\r\n"


def _is_canonical(body: bytes, kind: str) -> bool:
    """Whether Python's int()/float() and pandas' C parser read this CSV body identically."""
    if not body:
        return True
    if (body.startswith((b"\n", b"\r", b",")) or b"\n\n" in body or b"\n\r" in body
            or b",," in body or b",\n" in body or b",\r" in body or b"\n," in body):
        return False  # blank lines and empty fields
    if not body.translate(None, _INTEGER_BYTES):  # integers only (what DCASE writers produce)
        return body.count(b",") == 5 * body.count(b"\n")
    return _CANONICAL_BODY[kind].fullmatch(body) is not None


def _parse_bodies(data: bytes, n_rows: int) -> np.ndarray:
    events = np.zeros(n_rows, dtype=EVENT_DTYPE)
    if n_rows == 0:
        return events
    df = pd.read_csv(io.BytesIO(data), header=None, names=list(EVENT_DTYPE.names), engine="c",
                     dtype={n: np.float64 if EVENT_DTYPE[n].kind == "f" else np.int64
                            for n in EVENT_DTYPE.names})
    if len(df) != n_rows:
        raise ValueError(f"parsed {len(df)} rows, expected {n_rows}")
    for name in EVENT_DTYPE.names:
        events[name] = df[name].to_numpy()
    return events


def _invalid_rows(events: np.ndarray, kind: str, n_frames: int | None) -> np.ndarray:
    bad = (events["class"] < 0) | (events["class"] >= N_CLASSES) | (events["frame"] < 0)
    bad |= ~np.isfinite(events["azimuth"])
    if kind == "reference":
        az, dist = events["azimuth"], events["distance"]
        bad |= (az < -90) | (az > 90) | ~(dist >= 0) | (az != np.round(az)) | (dist != np.round(dist))
        bad |= (events["onscreen"] != 0) & (events["onscreen"] != 1)
        if n_frames is not None:
            bad |= events["frame"] >= n_frames
    return bad


def _int_column(values: np.ndarray) -> np.ndarray:
    """A column as the CSV writers store it: rounded half to even to an integer (the one rounding
    rule "as written"; :func:`as_written` applies it in memory)."""
    return np.rint(np.asarray(values, dtype=np.float64)).astype(np.int64)


def as_written(events: np.ndarray) -> np.ndarray:
    """Events exactly as :func:`write_csv` stores them (integer azimuth deg and distance cm), so a
    score computed in memory equals the score of the written files."""
    ev = np.array(events, dtype=EVENT_DTYPE, copy=True)
    ev["azimuth"] = _int_column(ev["azimuth"])
    ev["distance"] = _int_column(ev["distance"])
    return ev


def _write_rows(path: Path, header: str, cols: list[np.ndarray]) -> None:
    table = np.column_stack([np.asarray(c, dtype=np.int64) for c in cols]).tolist() if len(
        cols[0]) else []
    lines = [header] + [",".join(map(str, row)) for row in table]
    write_text_atomic(path, "\n".join(lines) + "\n")


def write_csv(path: str | Path, events: np.ndarray) -> None:
    """Write events as a 2025 stereo CSV (header + integer rows, azimuth and distance rounded).

    Rows are written sorted by (frame, class) and stably otherwise; the file appears atomically
    (temporary name, then rename), so a reader never sees half a file.
    """
    events = np.asarray(events)
    order = np.lexsort((events["class"], events["frame"])) if len(events) else []
    ev = events[order]
    cols = [ev["frame"], ev["class"], ev["source"], _int_column(ev["azimuth"]),
            _int_column(ev["distance"]), ev["onscreen"]]
    _write_rows(Path(path), STEREO_HEADER, cols)


def read_foa_csv(path: str | Path, n_frames: int | None = None) -> np.ndarray:
    """Read a DCASE2024-style FOA CSV strictly (header line optional, as in the 2024 data).

    Columns frame, class, source, azimuth, elevation, distance (integers; azimuth in [-180, 180],
    stored wrapped to [-180, 180); elevation in [-90, 90]; distance in cm >= 0).

    Returns:
        events of FOA_EVENT_DTYPE in file order.
    """
    path = Path(path)
    lines = _read_text(path).splitlines()
    start = 0
    if lines and not lines[0].strip()[:1].lstrip("-").isdigit():
        if lines[0].strip().lower() != FOA_HEADER:
            raise DataError(f"{path}:1: expected the header {FOA_HEADER!r} or a data row, "
                            f"got {lines[0].strip()!r}")
        start = 1
    rows = []
    for lineno, (frame, cls, src, az, el, dist) in _strict_int_rows(path, lines, start, FOA_HEADER):
        _check_row(path, lineno, frame, cls, n_frames)
        if not -180 <= az <= 180:
            raise DataError(f"{path}:{lineno}: azimuth {az} is outside [-180, 180] degrees")
        if not -90 <= el <= 90:
            raise DataError(f"{path}:{lineno}: elevation {el} is outside [-90, 90] degrees")
        if dist < 0:
            raise DataError(f"{path}:{lineno}: distance {dist} cm is negative")
        rows.append((frame, cls, src, float(wrap_azimuth(az)), el, dist))
    return make_events(rows, FOA_EVENT_DTYPE)


def write_foa_csv(path: str | Path, events: np.ndarray) -> None:
    """Write FOA events with the header ``frame,class,source,azimuth,elevation,distance`` (atomic)."""
    events = np.asarray(events)
    order = np.lexsort((events["class"], events["frame"])) if len(events) else []
    ev = events[order]
    cols = [ev["frame"], ev["class"], ev["source"], _int_column(ev["azimuth"]),
            _int_column(ev["elevation"]), _int_column(ev["distance"])]
    _write_rows(Path(path), FOA_HEADER, cols)


# --- Target encoding --------------------------------------------------------------------------------
def _events_in_clips(events: np.ndarray, clip: np.ndarray, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows inside the label grid (frame in [0, n_frames), a known class) and their clips (int64)."""
    events = np.asarray(events)
    keep = (events["frame"] >= 0) & (events["frame"] < n_frames)
    keep &= (events["class"] >= 0) & (events["class"] < N_CLASSES)
    return events[keep], np.asarray(clip, dtype=np.int64)[keep]


def _sorted_cells(events: np.ndarray, clip_of_event: np.ndarray, n_frames: int, nearest_first: bool):
    """The rows inside the label grid sorted by (clip, frame, class, [distance,] file order), their
    clips, and each row's cell id (clip, frame, class) as one int64."""
    ev, clip = _events_in_clips(events, clip_of_event, n_frames)
    keys = (np.arange(len(ev)), *((ev["distance"],) if nearest_first else ()), ev["class"], ev["frame"], clip)
    order = np.lexsort(keys)
    ev, clip = ev[order], clip[order]
    return ev, clip, (clip * n_frames + ev["frame"]) * N_CLASSES + ev["class"]


def _fill_cells(target: np.ndarray, index: tuple, events: np.ndarray) -> None:
    az = np.deg2rad(fold_azimuth(events["azimuth"]))
    target[index + (0,)] = 1.0
    target[index + (1,)] = np.cos(az)
    target[index + (2,)] = np.sin(az)
    target[index + (3,)] = events["distance"] / 100.0


def encode_accdoa(events: np.ndarray, n_frames: int = N_LABEL_FRAMES) -> tuple[np.ndarray, int]:
    """ACCDOA-with-distance targets of one clip (Stereo-RCnet output format).

    Same-class overlap rule: when one class has several events in one frame, the target keeps the
    **nearest** source (smallest distance; the first in file order on ties); the others are not
    represented. Events outside [0, n_frames) are ignored.

    Args:
        events: EVENT_DTYPE rows (azimuth deg, any range: folded here; distance cm).
    Returns:
        (target float32 (n_frames, 13, 4) with channels [activity, activity*x, activity*y,
        distance_m], x = cos(az), y = sin(az) of the folded azimuth, distance not activity-scaled
        (0 where inactive); n_same_class_overlaps = number of (frame, class) cells that had more
        than one event).
    """
    events = np.asarray(events)
    target, n = encode_accdoa_batch(events, np.zeros(len(events), np.int64), 1, n_frames)
    return target[0], int(n[0])


def encode_accdoa_batch(events: np.ndarray, clip_of_event: np.ndarray, n_clips: int,
                        n_frames: int = N_LABEL_FRAMES) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode_accdoa` of many clips at once (no loop over clips; the same bits).

    Args:
        events: EVENT_DTYPE rows of all clips, each clip's in its file order.
        clip_of_event: (len(events),) int, the clip (0 .. n_clips - 1) of each row.
    Returns:
        (target float32 (n_clips, n_frames, 13, 4); same-class overlap cells per clip, int64 (n_clips,)).
    """
    target = np.zeros((n_clips, n_frames, N_CLASSES, N_TARGET_CHANNELS), dtype=np.float32)
    n_overlaps = np.zeros(n_clips, dtype=np.int64)
    ev, clip, cell = _sorted_cells(events, clip_of_event, n_frames, nearest_first=True)
    if len(ev) == 0:
        return target, n_overlaps
    first = np.r_[True, cell[1:] != cell[:-1]]
    starts = np.flatnonzero(first)
    sizes = np.diff(np.r_[starts, len(ev)])
    n_overlaps += np.bincount(clip[starts][sizes > 1], minlength=n_clips)
    kept = ev[first]
    _fill_cells(target, (clip[first], kept["frame"], kept["class"]), kept)
    return target, n_overlaps


def encode_multi_accdoa(events: np.ndarray, n_frames: int = N_LABEL_FRAMES
                        ) -> tuple[np.ndarray, int]:
    """Multi-ACCDOA / ADPIT targets of one clip (official baseline format, spec §7).

    Per frame and class, k same-class events fill the slots of their count: one event -> A0; two ->
    B0, B1; three -> C0, C1, C2 (in file order). A fourth and later same-class event in one frame
    is dropped (as the official label code does) and counted.

    Returns:
        (target float32 (n_frames, 6, 13, 4), slots [A0, B0, B1, C0, C1, C2], channels
        [activity, activity*x, activity*y, distance_m]; n_dropped events).
    """
    events = np.asarray(events)
    target, n = encode_multi_accdoa_batch(events, np.zeros(len(events), np.int64), 1, n_frames)
    return target[0], int(n[0])


def encode_multi_accdoa_batch(events: np.ndarray, clip_of_event: np.ndarray, n_clips: int,
                              n_frames: int = N_LABEL_FRAMES) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode_multi_accdoa` of many clips at once (no loop over clips; the same bits).

    Returns:
        (target float32 (n_clips, n_frames, 6, 13, 4); dropped events per clip, int64 (n_clips,)).
    """
    target = np.zeros((n_clips, n_frames, N_ADPIT_SLOTS, N_CLASSES, N_TARGET_CHANNELS), dtype=np.float32)
    n_dropped = np.zeros(n_clips, dtype=np.int64)
    ev, clip, cell = _sorted_cells(events, clip_of_event, n_frames, nearest_first=False)
    if len(ev) == 0:
        return target, n_dropped
    starts = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]])
    group = np.searchsorted(starts, np.arange(len(ev)), side="right") - 1
    rank = np.arange(len(ev)) - starts[group]  # position of the event within its cell
    size = np.bincount(group)[group]
    keep = rank < N_TRACKS
    n_dropped += np.bincount(clip[~keep], minlength=n_clips)
    size = np.minimum(size, N_TRACKS)
    for k in range(1, N_TRACKS + 1):
        sel = keep & (size == k)
        slot = _SLOT_OFFSET[k] + rank[sel]
        _fill_cells(target, (clip[sel], ev["frame"][sel], slot, ev["class"][sel]), ev[sel])
    return target, n_dropped


# --- Decoding --------------------------------------------------------------------------------------
def _thresholds(thresholds) -> np.ndarray:
    return np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (N_CLASSES,))


def _events_from_cells(frame, cls, x, y, dist_m) -> np.ndarray:
    ev = np.zeros(len(frame), dtype=EVENT_DTYPE)
    ev["frame"], ev["class"] = frame, cls
    ev["azimuth"] = fold_azimuth(np.rad2deg(np.arctan2(y, x)))
    ev["distance"] = np.rint(np.asarray(dist_m, dtype=np.float64) * 100.0)
    order = np.lexsort((ev["class"], ev["frame"]))
    return ev[order]


def decode_accdoa(output, thresholds=0.5) -> np.ndarray:
    """Events from one clip's ACCDOA output.

    Args:
        output: (T, 13, 3) = (x, y, distance_m) per frame and class (numpy or torch).
        thresholds: activity threshold on ||(x, y)||, a float or one per class (13,).
    Returns:
        EVENT_DTYPE rows sorted by (frame, class): azimuth = atan2(y, x) folded to [-90, 90] deg,
        distance = round(100 * distance_m) cm, source = onscreen = 0.
    """
    out = np.asarray(output.detach().cpu() if hasattr(output, "detach") else output, np.float64)
    x, y, d = out[..., 0], out[..., 1], out[..., 2]
    active = np.hypot(x, y) > _thresholds(thresholds)[None, :]
    frame, cls = np.nonzero(active)
    return _events_from_cells(frame, cls, x[active], y[active], d[active])


def decode_multi_accdoa(output, thresholds=0.5, merge_deg: float = 15.0) -> np.ndarray:
    """Events from one clip's multi-ACCDOA output, merging same-class tracks closer than merge_deg.

    Args:
        output: (T, 3, 13, 3) = (x, y, distance_m) per frame, track and class.
        thresholds: activity threshold on ||(x, y)||, a float or one per class (13,).
        merge_deg: active tracks of one class and frame whose directions differ by less than this
            angle are linked (transitively) and replaced by one event with the mean x, y, distance.
    Returns:
        EVENT_DTYPE rows sorted by (frame, class); the tracks' groups of one cell in the order of
        their first track.
    """
    out = np.asarray(output.detach().cpu() if hasattr(output, "detach") else output, np.float64)
    n_tracks = out.shape[1]
    active = np.hypot(out[..., 0], out[..., 1]) > _thresholds(thresholds)[None, None, :]
    # The (frame, class) cells with an active track, in (frame, class) order. Every cell is decoded
    # with the same numpy operations, on the same shapes, as one cell alone would be (the same bits),
    # but all cells with the same active tracks at once: threshold fitting decodes every validation
    # clip for each of ~30 candidates, and a loop over cells cost seconds per candidate.
    frames, classes = np.nonzero(active.any(axis=1))
    vec_all = out[frames, :, classes, :]  # (cells, tracks, 3)
    act = active[frames, :, classes]  # (cells, tracks)
    cos_merge = np.cos(np.deg2rad(merge_deg))
    pattern = act @ (1 << np.arange(n_tracks))
    rows = []  # (cell index, group label, mean (x, y, distance)) blocks
    for code in np.unique(pattern):
        cells = np.flatnonzero(pattern == code)
        tracks = np.flatnonzero(act[cells[0]])
        vec = vec_all[cells][:, tracks, :]  # (n, k, 3): each cell's active tracks, in track order
        k = len(tracks)
        unit = vec[..., :2] / np.linalg.norm(vec[..., :2], axis=2, keepdims=True)
        close = unit @ np.swapaxes(unit, 1, 2) > cos_merge  # angle < merge_deg
        label = np.broadcast_to(np.arange(k), (len(cells), k))
        for _ in range(k):  # transitive closure on at most 3 tracks
            label = np.where(close, label[:, None, :], k).min(axis=2)
        for g in range(k):  # groups in label order; each cell's group g, by its members
            members = label == g
            has = members.any(axis=1)
            for code_m in np.unique(members[has] @ (1 << np.arange(k))):
                sel = has & ((members @ (1 << np.arange(k))) == code_m)
                idx = np.flatnonzero((code_m >> np.arange(k)) & 1)
                rows.append((cells[sel], np.full(int(sel.sum()), g), vec[sel][:, idx, :].mean(axis=1)))
    if not rows:
        return _events_from_cells(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0),
                                  np.zeros(0))
    cell = np.concatenate([r[0] for r in rows])
    group = np.concatenate([r[1] for r in rows])
    mean = np.concatenate([r[2] for r in rows])
    order = np.lexsort((group, cell))  # cell by cell, its groups in label order
    cell, mean = cell[order], mean[order]
    return _events_from_cells(frames[cell].astype(np.int64), classes[cell].astype(np.int64),
                              mean[:, 0], mean[:, 1], mean[:, 2])
