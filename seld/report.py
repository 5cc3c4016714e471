"""Study rows -> tables and plots (pure: reads a DataFrame, writes files; no Ray, no training).

Reads the tidy rows of ``results/<study>/summary.csv`` (one row per run: study, variant, seed,
status, cost, and the run's metrics as flat ``split/metric`` columns) and, optionally, the
per-epoch ``curves.csv``; writes ``<table>.md``, ``.csv``, ``.tex``, ``<table>.png`` (bars with 95 %
intervals over seeds), ``<table>_classwise.png`` (per-class F20), ``curves.png`` and the breakdown
tables. The same rows always give the same bytes (``--report-only`` relies on it).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from seld.config import CLASS_NAMES
from seld.errors import DataError
from seld.runfolder import atomic_write

log = logging.getLogger(__name__)

# The three official metrics: column suffix, header, arrow, decimals, scale applied for display.
METRICS: tuple[tuple[str, str, int], ...] = (
    ("f20", "F20 (%) ↑", 1),
    ("doae_cd", "DOAE_CD (°) ↓", 1),
    ("rde_cd", "RDE_CD ↓", 3),
)
# Breakdown groups of a row's metrics (``<prefix>/<group>/<key>/<metric>`` columns), e.g.
# ``test_pp/site/tau/f20``; shown for the row marked ``breakdowns=True``.
BREAKDOWN_GROUPS: tuple[str, ...] = ("site", "distance", "polyphony")
REQUIRED_COLUMNS: tuple[str, ...] = ("variant", "seed", "status")
COUNTERS_NPZ = "counters.npz"  # a study's per-test-file counters of its runs (seld.paired)
SEQUENTIAL_JSON = "sequential.json"  # the plan of a study that added seeds sequentially (--seeds auto)


@dataclass(frozen=True)
class TableRow:
    """One row of a results table, read from the runs of one variant.

    Attributes:
        label: row label in the table ("Stage 2 + PP").
        variant: the ``variant`` value of the summary rows it aggregates.
        prefix: metric prefix of the columns it reads ("test_pp" reads ``test_pp/f20`` ...).
        cost_key: column holding the row's wall time in seconds; falls back to ``wall_s``.
        breakdowns: also tabulate the per-site/distance/polyphony breakdown of this row.
    """

    label: str
    variant: str
    prefix: str = "test"
    cost_key: str = "wall_s"
    breakdowns: bool = False


@dataclass(frozen=True)
class Comparison:
    """A paired difference between two rows of a table (by label): ``a`` - ``b``.

    ``verdict``: show the better / no difference detected / worse column (seld.paired.verdict).
    """

    a: str
    b: str
    verdict: bool = False


@dataclass(frozen=True)
class TableSpec:
    """A table: its file stem, caption, rows and (optionally) the paper's own figures.

    ``paper`` maps a row label to the paper's (F20 %, DOAE_CD °, RDE_CD) on the real DCASE2025
    development set; they are printed in a separate, labelled table, never among our rows.
    ``domain_gap_prefix`` names the metric prefix of the synthetic-domain test split (dev-test-synth).
    """

    name: str
    title: str
    rows: tuple[TableRow, ...]
    paper: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    paper_source: str = ""
    domain_gap_prefix: str = "synth_test"
    comparisons: tuple[Comparison, ...] = ()


@dataclass(frozen=True)
class Interval:
    """Mean and half-width of the 95 % Student-t interval over ``n`` values (NaN half-width if n < 2)."""

    mean: float
    half: float
    n: int


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean +- t_{(1+level)/2, n-1} * s / sqrt(n) over the finite entries of ``values``."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, 1)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(mean, half, n)


def _fmt(iv: Interval, decimals: int) -> str:
    if iv.n == 0 or not np.isfinite(iv.mean):
        return "–"
    if not np.isfinite(iv.half):
        return f"{iv.mean:.{decimals}f}"
    return f"{iv.mean:.{decimals}f} ± {iv.half:.{decimals}f}"


def _fmt_plain(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}" if np.isfinite(value) else ""


def check_rows(rows: pd.DataFrame, source: str = "summary.csv") -> pd.DataFrame:
    """Check the columns the report needs and return the rows sorted (variant, seed)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; expected a study summary with {list(REQUIRED_COLUMNS)}")
    return rows.sort_values(["variant", "seed"], kind="stable").reset_index(drop=True)


def _ok(rows: pd.DataFrame, variant: str) -> pd.DataFrame:
    return rows[(rows["variant"] == variant) & (rows["status"] == "ok")]


def _col(runs: pd.DataFrame, key: str) -> list[float]:
    if key not in runs.columns:
        return []
    return [float(v) for v in pd.to_numeric(runs[key], errors="coerce")]


def device_hours(wall_s: float, n_devices: int) -> float:
    """Device-hours of a run: its wall time on all the devices it held (Train workers)."""
    return wall_s * n_devices / 3600.0


def _cost(runs: pd.DataFrame, row: TableRow) -> tuple[float, float]:
    """(mean wall minutes, mean device-hours) of one table row's runs."""
    key = row.cost_key if row.cost_key in runs.columns and runs[row.cost_key].notna().any() else "wall_s"
    wall = t_interval(_col(runs, key)).mean
    if "n_devices" in runs.columns and key in runs.columns:
        dev_h = t_interval([device_hours(w, d) for w, d in zip(_col(runs, key), _col(runs, "n_devices"), strict=True)]).mean
    else:
        dev_h = t_interval(_col(runs, "device_hours")).mean
    return wall / 60.0, dev_h


@dataclass(frozen=True)
class _RowStats:
    row: TableRow
    metrics: dict[str, Interval]
    jackknife: dict[str, str]
    wall_min: float
    device_h: float
    n_failed: int


def _row_stats(rows: pd.DataFrame, row: TableRow) -> _RowStats:
    runs = _ok(rows, row.variant)
    metrics = {m: t_interval(_col(runs, f"{row.prefix}/{m}")) for m, _, _ in METRICS}
    jack = {}
    for m, _, dec in METRICS:
        lo, hi = _col(runs, f"{row.prefix}/{m}_ci_lo"), _col(runs, f"{row.prefix}/{m}_ci_hi")
        if lo and hi:
            jack[m] = f"[{np.nanmean(lo):.{dec}f}, {np.nanmean(hi):.{dec}f}]"
    wall, dev_h = _cost(runs, row) if len(runs) else (math.nan, math.nan)
    n_failed = int(((rows["variant"] == row.variant) & (rows["status"] != "ok")).sum())
    return _RowStats(row, metrics, jack, wall, dev_h, n_failed)


def _context(rows: pd.DataFrame) -> dict[str, str]:
    def one(col: str, default: str) -> str:
        if col not in rows.columns:
            return default
        vals = sorted({str(v) for v in rows[col].dropna()})
        return ", ".join(vals) if vals else default

    return {
        "study": one("study", "study"),
        "preset": one("preset", "?"),
        "dataset": one("dataset", "generated"),
        "protocol": one("protocol", "dcase"),
        "precision": one("precision", ""),
        "machine": one("machine/kind", ""),
        "git_sha": one("git_sha", ""),
    }


def _caption(spec: TableSpec, ctx: dict[str, str], stats_: list[_RowStats]) -> str:
    ns = sorted({s.metrics["f20"].n for s in stats_ if s.metrics["f20"].n})
    seeds = "/".join(str(n) for n in ns) or "0"
    data = (
        "the generated dataset (not the paper's real DCASE2025 data)"
        if ctx["dataset"] == "generated"
        else f"the {ctx['dataset']} dataset"
    )
    caption = (
        f"{spec.title}. Study `{ctx['study']}`, preset `{ctx['preset']}`, on {data}, test split. "
        f"Each cell is the mean ± the half-width of the 95 % Student-t interval **over seeds** "
        f"(n = {seeds} seeds per row; a single seed shows the mean only). "
        "Stage rows come from the same trainings: Stage 1 is the checkpoint after stage 1, Stage 2 is "
        "scored at the activity threshold 0.5, Stage 2 + PP with the class-wise thresholds fitted on "
        "the validation split. Cost: mean wall time and device-hours of one run."
    )
    if ctx["precision"]:
        caption += f" Training precision: {ctx['precision']} (`train.amp_bf16`: bf16 autocast where native)."
    if ctx["machine"]:  # summaries from before metrics.json recorded the machine have no column
        kinds = ctx["machine"].split(", ")
        if len(kinds) == 1:
            caption += f" Machine: {kinds[0]}."
        else:
            caption += (f" **Trained on {len(kinds)} kinds of machine** ({'; '.join(kinds)}): float32 "
                        "kernels round differently on each, so a run repeated on another kind differs "
                        "in its last digits.")
    if ctx["git_sha"]:
        shas = ctx["git_sha"].split(", ")
        if any(sha.endswith("-dirty") or sha == "unknown" for sha in shas) or len(shas) > 1:
            caption += (
                f" **Not from one clean commit:** the runs were trained at `{ctx['git_sha']}` (`-dirty`: with "
                "uncommitted changes; `unknown`: outside git); rerun the study from a clean checkout before "
                "citing these numbers."
            )
        else:
            caption += f" Trained at commit `{shas[0]}`."
    if ctx["protocol"] == "paper":
        caption += (
            " Footnote: protocol `paper` — model selection and thresholds were tuned on the test "
            "split, as the paper did; these are not held-out numbers."
        )
    return caption


def _main_table(stats_: list[_RowStats]) -> tuple[list[str], list[list[str]]]:
    header = ["System", *[h for _, h, _ in METRICS], "seeds", "failed", "wall (min)", "device-h"]
    if any(s.jackknife for s in stats_):
        header.insert(4, "F20 jackknife 95 % (files)")
    body = []
    for s in stats_:
        cells = [s.row.label, *[_fmt(s.metrics[m], d) for m, _, d in METRICS]]
        if len(header) > 8:
            cells.append(s.jackknife.get("f20", "–"))
        cells += [str(s.metrics["f20"].n), str(s.n_failed), _fmt_plain(s.wall_min, 1), _fmt_plain(s.device_h, 3)]
        body.append(cells)
    return header, body


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def _breakdowns(rows: pd.DataFrame, stats_: list[_RowStats]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per-site / distance-bin / polyphony tables of the rows marked ``breakdowns``."""
    out = []
    for s in stats_:
        if not s.row.breakdowns:
            continue
        runs = _ok(rows, s.row.variant)
        for group in BREAKDOWN_GROUPS:
            pat = re.compile(rf"^{re.escape(s.row.prefix)}/{group}/([^/]+)/f20$")
            keys = [m.group(1) for c in rows.columns if (m := pat.match(c))]
            if not keys:
                continue
            header = [group, *[h for _, h, _ in METRICS], "seeds"]
            body = []
            for key in sorted(keys, key=_natural):
                ivs = {m: t_interval(_col(runs, f"{s.row.prefix}/{group}/{key}/{m}")) for m, _, _ in METRICS}
                body.append([key, *[_fmt(ivs[m], d) for m, _, d in METRICS], str(ivs["f20"].n)])
            out.append((f"{s.row.label} by {group}", header, body))
    return out


def _natural(key: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key))


def _domain_gap(rows: pd.DataFrame, spec: TableSpec, stats_: list[_RowStats]) -> tuple[list[str], list[list[str]]] | None:
    """Real test vs synthetic-domain test (both at threshold 0.5) of the rows scored at 0.5."""
    gap = spec.domain_gap_prefix
    if f"{gap}/f20" not in rows.columns:
        return None
    body = []
    for s in stats_:
        if s.row.prefix != "test":
            continue
        runs = _ok(rows, s.row.variant)
        synth = {m: t_interval(_col(runs, f"{gap}/{m}")) for m, _, _ in METRICS}
        if synth["f20"].n == 0:
            continue
        cells = [s.row.label]
        for m, _, d in METRICS:
            cells += [_fmt(s.metrics[m], d), _fmt(synth[m], d)]
        body.append(cells + [str(synth["f20"].n)])
    if not body:
        return None
    header = ["System (threshold 0.5)"]
    for _, h, _ in METRICS:
        header += [f"{h} real", f"{h} synthetic"]
    return header + ["seeds"], body


def _signed(x: float, dec: int) -> str:
    return f"{x:+.{dec}f}"


def _fmt_diff(iv, dec: int) -> str:
    """"+3.2 [+1.1, +5.3]"; the estimate alone when the interval is undefined; "–" without data."""
    if iv is None or iv.n == 0 or not np.isfinite(iv.estimate):
        return "–"
    if not iv.defined:
        return _signed(iv.estimate, dec)
    return f"{_signed(iv.estimate, dec)} [{_signed(iv.lo, dec)}, {_signed(iv.hi, dec)}]"


def _seed_values(rows: pd.DataFrame, row: TableRow, metric: str) -> dict[int, float]:
    runs = _ok(rows, row.variant)
    key = f"{row.prefix}/{metric}"
    if key not in runs.columns:
        return {}
    vals = pd.to_numeric(runs[key], errors="coerce")
    return {int(s): float(v) for s, v in zip(runs["seed"], vals, strict=True) if np.isfinite(v)}


def _paired(rows: pd.DataFrame, spec: TableSpec, counters: dict[str, np.ndarray] | None,
            mde_target: float = 2.0, plan=None) -> tuple[list[str], list[list[str]], pd.DataFrame] | None:
    """The table's paired differences (``spec.comparisons``): markdown header and body, and the
    long-format records of ``<table>_paired.csv``.

    Args:
        mde_target: the F20 difference (pp) whose seeds-to-detect each comparison reports.
        plan: the study's :class:`seld.paired.SequentialPlan` (``--seeds auto``), or None: each
            verdict comparison then rests on the seeds its sequential test used, its interval over
            seeds is the repeated confidence interval, and a column says how it ended.
    """
    from seld.paired import (
        HIGHER_IS_BETTER,
        minimum_detectable_effect,
        paired_t,
        seeds_for_effect,
        sequential_look,
        verdict,
    )

    if not spec.comparisons:
        return None
    by_label = {r.label: r for r in spec.rows}
    with_verdict = any(c.verdict for c in spec.comparisons)
    sequential = plan is not None and with_verdict
    header = ["Comparison (A − B)", "Δ F20 (pp), seeds", "Δ F20 (pp), files", "Δ DOAE_CD (°), seeds",
              "Δ RDE_CD, seeds", "seeds", "MDE F20 (pp)", f"seeds for {mde_target:g} pp"]
    header += ["verdict (F20)"] if with_verdict else []
    header += ["sequential seeds"] if sequential else []
    body, recs = [], []
    for comp in spec.comparisons:
        a, b = by_label[comp.a], by_label[comp.b]

        def files_at(seeds: tuple[int, ...], m: str, a: TableRow = a, b: TableRow = b):
            return _files_interval(counters, a, b, seeds, m)

        seeds_iv, files_iv, verdicts, mde, n_target, ends = {}, {}, {}, {}, {}, {}
        seq = None
        if sequential and comp.verdict:  # the test is on F20; the other metrics over the same seeds
            va, vb = _seed_values(rows, a, "f20"), _seed_values(rows, b, "f20")
            seq = sequential_look(va, vb, plan, HIGHER_IS_BETTER["f20"], lambda sd: files_at(sd, "f20"))
            prefix = []
            for s in plan.seeds:
                if s not in va or s not in vb:
                    break
                prefix.append(s)
            seq_seeds = prefix[:seq.n_seeds]
        for m, _, _ in METRICS:
            va, vb = _seed_values(rows, a, m), _seed_values(rows, b, m)
            if seq is not None and m == "f20":
                used = seq_seeds
                seeds_iv[m], files_iv[m], verdicts[m] = seq.interval, seq.files, seq.verdict
                ends[m] = _sequential_end(seq.state, seq.n_seeds, plan)
            else:
                used = sorted(set(va) & set(vb)) if seq is None else [s for s in seq_seeds if s in va and s in vb]
                seeds_iv[m] = paired_t({s: va[s] for s in used}, {s: vb[s] for s in used})
                files_iv[m] = files_at(tuple(used), m) if used else None
                verdicts[m] = verdict(seeds_iv[m], files_iv[m], HIGHER_IS_BETTER[m]) if comp.verdict else ""
                ends[m] = ""
            d = np.asarray([va[s] - vb[s] for s in used], dtype=np.float64)
            sd = float(d.std(ddof=1)) if d.size >= 2 else math.nan
            mde[m] = minimum_detectable_effect(sd, int(d.size))
            n_target[m] = seeds_for_effect(mde_target, sd) if m == "f20" and d.size >= 2 else None
        f20_target = ("–" if not np.isfinite(mde["f20"]) else
                      str(n_target["f20"]) if n_target["f20"] is not None else "> 1000")
        cells = [f"{comp.a} − {comp.b}", _fmt_diff(seeds_iv["f20"], 1), _fmt_diff(files_iv["f20"], 1),
                 _fmt_diff(seeds_iv["doae_cd"], 1), _fmt_diff(seeds_iv["rde_cd"], 3),
                 str(seeds_iv["f20"].n), _fmt_plain(mde["f20"], 1) or "–", f20_target]
        cells += [verdicts["f20"]] if with_verdict else []
        cells += [ends["f20"] or "–"] if sequential else []
        body.append(cells)
        for m, _, _ in METRICS:
            fi = files_iv[m]
            rec = {
                "a": comp.a, "b": comp.b, "metric": m,
                "seeds_estimate": seeds_iv[m].estimate, "seeds_lo": seeds_iv[m].lo,
                "seeds_hi": seeds_iv[m].hi, "n_seeds": seeds_iv[m].n,
                "files_estimate": fi.estimate if fi else math.nan, "files_lo": fi.lo if fi else math.nan,
                "files_hi": fi.hi if fi else math.nan, "n_files": fi.n if fi else 0,
                "verdict": verdicts[m],
                "mde": mde[m],
                "mde_target": mde_target if m == "f20" else math.nan,
                "n_seeds_for_target": n_target[m] if n_target[m] is not None else math.nan,
            }
            if sequential:
                rec["sequential"] = ends[m]
            recs.append(rec)
    return header, body, pd.DataFrame.from_records(recs)


def _files_interval(counters: dict[str, np.ndarray] | None, a: TableRow, b: TableRow, seeds: Sequence[int],
                    metric: str):
    """The paired file interval of rows A - B over ``seeds`` (None unless every run's counters exist)."""
    from seld.paired import paired_file_jackknife, run_counters_key

    keys = [(run_counters_key(a.variant, s, a.prefix), run_counters_key(b.variant, s, b.prefix)) for s in seeds]
    if not (counters and keys and all(ka in counters and kb in counters for ka, kb in keys)):
        return None
    return paired_file_jackknife(np.stack([counters[ka] for ka, _ in keys]),
                                 np.stack([counters[kb] for _, kb in keys]), metric)


def sequential_status(rows: pd.DataFrame, spec: TableSpec, counters: dict[str, np.ndarray] | None, plan
                      ) -> list[tuple[TableRow, TableRow, object]]:
    """Where each verdict comparison of ``spec`` stands on F20 under ``plan`` (a
    :class:`seld.paired.SequentialPlan`): (row A, row B, :class:`seld.paired.SequentialResult`), the
    same replay the tables show (a study with ``--seeds auto`` decides which runs to add from it)."""
    from seld.paired import HIGHER_IS_BETTER, sequential_look

    rows = check_rows(rows)
    by_label = {r.label: r for r in spec.rows}
    out = []
    for comp in spec.comparisons:
        if not comp.verdict:
            continue
        a, b = by_label[comp.a], by_label[comp.b]
        res = sequential_look(_seed_values(rows, a, "f20"), _seed_values(rows, b, "f20"), plan,
                              HIGHER_IS_BETTER["f20"], lambda seeds, a=a, b=b: _files_interval(counters, a, b, seeds, "f20"))
        out.append((a, b, res))
    return out


def _sequential_end(state: str, n: int, plan) -> str:
    """How a comparison's sequential test ended, in words for the table."""
    if state == "settled":
        return f"settled at {n}"
    if state == "cannot settle":
        return f"stopped at {n}: cannot settle by {plan.max_seeds}"
    if state == "max":
        return f"open at MAX ({n})"
    return f"stopped at {n} by the budget" if plan.stopped_by_budget else f"open at {n}: unfinished"


PAIRED_NOTE = (
    "Each cell is the mean difference A − B and its 95 % interval. *Seeds*: the paired Student-t "
    "interval of the per-seed differences (rows trained with the same seed; the stage rows of one "
    "training), which holds training randomness. *Files*: the leave-one-file-out jackknife of the "
    "seed-mean difference, the same test file left out of both rows (the official metric's jackknife "
    "applied to the difference), which holds the choice of test clips; `–` where the runs' per-file "
    "counters are not recorded. Verdict on F20 at 95 %: *better* or *worse* only when every defined "
    "interval (seeds, files) excludes 0 on the same side, else *no difference detected*; with one seed "
    "the file interval alone decides. *MDE*: the minimum detectable effect over seeds, the smallest true "
    "F20 difference the two-sided paired t-test on these seeds detects at 95 % confidence with 80 % "
    "power (exact noncentral-t power, at the observed standard deviation of the per-seed differences); "
    "*seeds for N pp*: the fewest seeds that would detect a difference of N pp at that standard deviation."
)
SEQUENTIAL_NOTE = (
    "Seeds were added sequentially (`--seeds auto:{max}`): after the planned seeds ({n0}), a comparison got "
    "one more seed at a time while its verdict was unsettled, up to {max}. Its interval over seeds is the "
    "*repeated* 95 % confidence interval at its last look (a group-sequential paired t-test with "
    "Lan-DeMets O'Brien-Fleming-type alpha spending, one look per seed: the false-verdict rate over all "
    "looks stays within 5 % per comparison, not for the whole table), its verdict the first look at which it settled; DOAE_CD and RDE_CD are shown over the "
    "same seeds with their plain intervals. *stopped … cannot settle*: its "
    "conditional power at {max} seeds fell below {futility:.0f} %; *open at MAX*: unsettled at {max} seeds."
)


def _tex_escape(text: str) -> str:
    return (text.replace("\\", r"\textbackslash{}").replace("%", r"\%").replace("_", r"\_")
            .replace("&", r"\&").replace("#", r"\#").replace("±", r"$\pm$").replace("°", r"$^\circ$")
            .replace("↑", r"$\uparrow$").replace("↓", r"$\downarrow$").replace("–", "--"))


def _tex_table(caption: str, header: list[str], body: list[list[str]], label: str) -> str:
    cols = "l" + "r" * (len(header) - 1)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{_tex_escape(caption.replace('**', ''))}}}",
        rf"\label{{tab:{label}}}",
        rf"\begin{{tabular}}{{{cols}}}",
        r"\toprule",
        " & ".join(_tex_escape(h) for h in header) + r" \\",
        r"\midrule",
        *[" & ".join(_tex_escape(c) for c in r) + r" \\" for r in body],
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


def _csv_table(rows: pd.DataFrame, stats_: list[_RowStats]) -> pd.DataFrame:
    recs = []
    for s in stats_:
        rec: dict[str, object] = {"system": s.row.label, "variant": s.row.variant, "prefix": s.row.prefix}
        for m, _, _ in METRICS:
            rec[f"{m}_mean"] = s.metrics[m].mean
            rec[f"{m}_ci95"] = s.metrics[m].half
        rec["n_seeds"] = s.metrics["f20"].n
        rec["n_failed"] = s.n_failed
        rec["wall_min"] = s.wall_min
        rec["device_hours"] = s.device_h
        recs.append(rec)
    return pd.DataFrame.from_records(recs)


# --- Plots ---------------------------------------------------------------------------------------
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # From matplotlib's defaults every time: another library in the process may have changed the
    # style (Optuna's plots use "ggplot"), and the same rows must give the same bytes.
    plt.style.use("default")
    plt.rcParams.update({"svg.hashsalt": "seld", "font.size": 9})
    return plt


def _save(fig, path: Path) -> None:
    # No software/date metadata so that the same rows give the same bytes.
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)


# Range of each metric, for error bars that stay inside it (F20 in %, DOAE_CD in degrees, RDE_CD >= 0).
METRIC_RANGE: dict[str, tuple[float, float]] = {"f20": (0.0, 100.0), "doae_cd": (0.0, 180.0), "rde_cd": (0.0, math.inf)}
CLIPPED = "95 % Student-t interval over seeds, clipped to the metric's range"


def clipped_error_bars(means: np.ndarray, halves: np.ndarray, metric: str) -> np.ndarray:
    """Error bars of a bounded metric that stay in its range.

    Args:
        means, halves: (n,) means and interval half-widths (NaN: drawn as 0).
        metric: "f20" (0..100 %), "doae_cd" (0..180°) or "rde_cd" (>= 0).
    Returns:
        (2, n) float: the lengths below and above each mean (matplotlib's ``yerr``), the interval
        mean -+ half cut at the metric's bounds.
    """
    lo, hi = METRIC_RANGE[metric]
    means = np.nan_to_num(means)
    halves = np.nan_to_num(halves)
    return np.stack([means - np.maximum(means - halves, lo), np.minimum(means + halves, hi) - means])


def _bars_png(path: Path, spec: TableSpec, stats_: list[_RowStats]) -> None:
    plt = _figure()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.4), constrained_layout=True)
    labels = [s.row.label for s in stats_]
    x = np.arange(len(labels))
    for ax, (m, head, _) in zip(axes, METRICS, strict=True):
        means = np.array([s.metrics[m].mean for s in stats_])
        halves = np.array([s.metrics[m].half if np.isfinite(s.metrics[m].half) else 0.0 for s in stats_])
        ax.bar(x, np.nan_to_num(means), yerr=clipped_error_bars(means, halves, m), capsize=4, color="#4C72B0",
               alpha=0.85)
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.set_title(head)
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{spec.title}\n(mean; bars: {CLIPPED})", fontsize=9)
    _save(fig, path)


def _classwise_png(path: Path, rows: pd.DataFrame, stats_: list[_RowStats]) -> bool:
    series = []
    for s in stats_:
        runs = _ok(rows, s.row.variant)
        vals = [t_interval(_col(runs, f"{s.row.prefix}/class/{c}/f20")) for c in range(len(CLASS_NAMES))]
        if any(v.n for v in vals):
            n_ref = [_col(runs, f"{s.row.prefix}/class/{c}/n_ref") for c in range(len(CLASS_NAMES))]
            series.append((s.row.label, vals, n_ref))
    if not series:
        return False
    plt = _figure()
    fig, ax = plt.subplots(figsize=(10, 4.2), constrained_layout=True)
    width = 0.8 / len(series)
    x = np.arange(len(CLASS_NAMES))
    for i, (label, vals, n_ref) in enumerate(series):
        means = np.array([v.mean for v in vals])
        halves = np.array([v.half for v in vals])
        xs = x + (i - (len(series) - 1) / 2) * width
        bars = ax.bar(xs, np.nan_to_num(means), width, yerr=clipped_error_bars(means, halves, "f20"), capsize=2,
                      label=label)
        color = bars.patches[0].get_facecolor()
        for c, (xc, mean) in enumerate(zip(xs, means, strict=True)):
            # A bar of height 0 is invisible: say what it is (no test event of the class, or none found).
            if n_ref[c] and np.nansum(n_ref[c]) == 0:
                text = "no events"
            elif not np.isfinite(mean):
                text = "n/a"
            elif mean == 0:
                text = "0"
            else:
                continue
            ax.text(xc, 0.6, text, rotation=0 if text == "0" else 90, ha="center", va="bottom", fontsize=7,
                    color=color, fontweight="bold")
    ax.set_xticks(x, CLASS_NAMES, rotation=35, ha="right")
    ax.set_ylabel("F20 (%)")
    ax.set_ylim(bottom=0)
    ax.set_title("Per-class F20 on the test split (mean; bars: " + CLIPPED + ")\n"
                 "'0': F20 is 0 in every seed (no event of the class correctly detected)"
                 + ("; 'no events': the class has no event in the test split"
                    if any(any(n) for _, _, ns in series for n in ns) else ""), fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return True


# Panels of the training curves: metrics.csv column, axis label.
CURVE_PANELS: tuple[tuple[str, str], ...] = (
    ("train/loss", "training loss"),
    ("val/f20", "validation F20 (%, threshold 0.5)"),
    ("val/doae_cd", "validation DOAE_CD (°)"),
    ("val/rde_cd", "validation RDE_CD"),
)


def _selected_epochs(rows: pd.DataFrame | None) -> dict[tuple[str, int], int]:
    """(variant, seed) -> the epoch (from 0, over both stages) of the checkpoint each run selected."""
    if rows is None or "selected_epoch" not in rows.columns:
        return {}
    out = {}
    for r in rows[rows["status"] == "ok"].itertuples(index=False):
        ep = pd.to_numeric(r.selected_epoch, errors="coerce")
        if np.isfinite(ep):
            out[(str(r.variant), int(r.seed))] = int(ep)
    return out


def _curves_png(path: Path, curves: pd.DataFrame, rows: pd.DataFrame | None = None) -> bool:
    """Training curves, one line per run: training loss (and validation loss where recorded), validation
    F20, DOAE_CD and RDE_CD per epoch; where stage 2 starts; each run's selected checkpoint."""
    if curves is None or curves.empty or "val/f20" not in curves.columns:
        return False
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    plt = _figure()
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.2), constrained_layout=True, sharex=True)
    order = "epoch" if "epoch" in curves.columns else "step"
    curves = curves.sort_values(["variant", "seed", order], kind="stable")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    selected = _selected_epochs(rows)
    has_val_loss = "val/loss" in curves.columns
    handles = []
    boundaries: set[float] = set()
    for i, (variant, runs) in enumerate(curves.groupby("variant", sort=True)):
        color = colors[i % len(colors)]
        handles.append(Line2D([], [], color=color, label=str(variant)))
        for _, run in runs.groupby("seed", sort=True):
            # Epochs from 1 on the axis (metrics.csv counts from 0 over both stages).
            x = (pd.to_numeric(run[order], errors="coerce").to_numpy() + (1 if order == "epoch" else 0))
            if "stage" in run.columns:
                stage2 = x[pd.to_numeric(run["stage"], errors="coerce").to_numpy() == 2]
                if len(stage2) and len(stage2) < len(x):
                    boundaries.add(float(stage2.min()) - 0.5)
            sel = selected.get((str(variant), int(run["seed"].iloc[0])))
            for ax, (col, _) in zip(axes.flat, CURVE_PANELS, strict=True):
                if col not in run.columns:
                    continue
                y = pd.to_numeric(run[col], errors="coerce").to_numpy()
                ax.plot(x, y, color=color, alpha=0.8, lw=1)
                if col == "train/loss" and has_val_loss:
                    ax.plot(x, pd.to_numeric(run["val/loss"], errors="coerce").to_numpy(), color=color,
                            alpha=0.8, lw=1, ls="--")
                if sel is not None and order == "epoch":
                    at = np.flatnonzero(x == sel + 1)
                    if at.size and np.isfinite(y[at[0]]):
                        ax.plot(x[at[0]], y[at[0]], marker="*", ms=9, color=color, mec="black", mew=0.5, ls="none")
    for ax, (col, label) in zip(axes.flat, CURVE_PANELS, strict=True):
        for b in sorted(boundaries):
            ax.axvline(b, color="grey", ls=":", lw=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if col not in curves.columns:
            ax.text(0.5, 0.5, f"{col} not recorded", transform=ax.transAxes, ha="center")
    for ax in axes[1]:
        ax.set_xlabel("epoch (stage 1, then stage 2)")
    if boundaries:
        handles.append(Line2D([], [], color="grey", ls=":", label="stage 2 starts"))
    if selected:
        handles.append(Line2D([], [], marker="*", ms=9, color="white", mec="black", ls="none",
                              label="selected checkpoint"))
    if has_val_loss:
        handles.append(Line2D([], [], color="black", ls="--", label="validation loss"))
    axes[0, 0].legend(handles=handles, fontsize=7)
    note = "" if has_val_loss else " — validation loss is not recorded (metrics.csv holds the training loss only)"
    fig.suptitle("Training curves, one line per run (seed)" + note, fontsize=9)
    _save(fig, path)
    return True


# --- Entry point -----------------------------------------------------------------------------------
def write_report(rows: pd.DataFrame, out_dir: Path, tables: Sequence[TableSpec],
                 curves: pd.DataFrame | None = None,
                 counters: dict[str, np.ndarray] | None = None, mde_target: float = 2.0,
                 plan=None) -> list[Path]:
    """Write every table and plot of a study from its rows.

    Args:
        rows: the study's summary rows (``summary.csv``), one per run; needs ``variant``, ``seed``,
            ``status`` and the metric columns the tables read (``test/f20`` ...).
        out_dir: folder for the outputs (usually ``results/<study>``).
        tables: what to tabulate (declared by the study script).
        curves: per-epoch rows (``curves.csv``: variant, seed, epoch, ``val/f20`` ...), optional.
        counters: per-test-file counters of the runs (``counters.npz``: ``variant|seed|prefix`` ->
            (n_files, 13, K)), optional: the paired differences' file intervals.
        mde_target: the F20 difference (pp) whose seeds-to-detect the paired sections report.
        plan: the study's :class:`seld.paired.SequentialPlan` when it added seeds sequentially.

    Returns:
        The paths written, in order. Deterministic: the same rows give the same bytes.
    """
    rows = check_rows(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = _context(rows)
    written: list[Path] = []
    for spec in tables:
        stats_ = [_row_stats(rows, r) for r in spec.rows]
        caption = _caption(spec, ctx, stats_)
        header, body = _main_table(stats_)
        md = [f"# {spec.title}", "", caption, "", _md_table(header, body)]
        tex = [_tex_table(caption, header, body, spec.name)]
        if spec.paper:
            md += [
                f"**The paper's own figures (real DCASE2025 development data{', ' + spec.paper_source if spec.paper_source else ''}); "
                "shown for reference only, not comparable with the rows above and not mixed with them:**",
                "",
                _md_table(["System (paper, real data)", *[h for _, h, _ in METRICS]],
                          [[label, f"{f:.2f}", f"{d:.1f}", f"{r:.2f}"] for label, (f, d, r) in spec.paper.items()]),
            ]
        paired = _paired(rows, spec, counters, mde_target, plan)
        if paired:
            md += ["## Paired differences", "", PAIRED_NOTE, ""]
            if plan is not None and "sequential seeds" in paired[0]:
                md += [SEQUENTIAL_NOTE.format(max=plan.max_seeds, n0=plan.n_planned, futility=100 * plan.futility), ""]
            md += [_md_table(paired[0], paired[1])]
        gap = _domain_gap(rows, spec, stats_)
        if gap:
            md += ["## Domain gap: the synthetic-domain test split (dev-test-synth)", "", _md_table(*gap)]
        for title, h, b in _breakdowns(rows, stats_):
            md += [f"## {title}", "", _md_table(h, b)]
        failed = rows[rows["status"] != "ok"]
        if len(failed):
            # Failed and truncated (status time_budget) runs: left out of every row above, listed here.
            md += ["## Failed runs", "", _md_table(
                ["variant", "seed", "status", "error"],
                [[str(r.variant), str(r.seed), str(r.status),
                  str(getattr(r, "error", "")).splitlines()[0][:120] if str(getattr(r, "error", "")) else ""]
                 for r in failed.itertuples()])]
        paths = {
            "md": out_dir / f"{spec.name}.md",
            "csv": out_dir / f"{spec.name}.csv",
            "tex": out_dir / f"{spec.name}.tex",
            "png": out_dir / f"{spec.name}.png",
        }
        with atomic_write(paths["md"]) as tmp:
            tmp.write_text("\n".join(md), encoding="utf-8")
        with atomic_write(paths["csv"]) as tmp:
            _csv_table(rows, stats_).to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")
        with atomic_write(paths["tex"]) as tmp:
            tmp.write_text("".join(tex), encoding="utf-8")
        _bars_png(paths["png"], spec, stats_)
        written += list(paths.values())
        if paired:
            ppath = out_dir / f"{spec.name}_paired.csv"
            with atomic_write(ppath) as tmp:
                paired[2].to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")
            written.append(ppath)
        cw = out_dir / f"{spec.name}_classwise.png"
        if _classwise_png(cw, rows, stats_):
            written.append(cw)
    cpath = out_dir / "curves.png"
    if curves is not None and _curves_png(cpath, curves, rows):
        written.append(cpath)
    log.info("report: wrote %d files to %s", len(written), out_dir)
    return written


def report_from_files(study_dir: Path, tables: Sequence[TableSpec], mde_target: float = 2.0) -> list[Path]:
    """`--report-only`: read ``summary.csv`` (and ``curves.csv``, ``counters.npz``, ``sequential.json``
    if present) and write the report."""
    from seld.paired import load_counters, read_plan

    study_dir = Path(study_dir)
    summary = study_dir / "summary.csv"
    if not summary.is_file():
        raise DataError(f"{summary}: no summary to report from; run the study first (without --report-only)")
    rows = pd.read_csv(summary)
    curves_path = study_dir / "curves.csv"
    curves = pd.read_csv(curves_path) if curves_path.is_file() else None
    counters_path = study_dir / COUNTERS_NPZ
    counters = load_counters(counters_path)[1] if counters_path.is_file() else None
    plan = read_plan(study_dir / SEQUENTIAL_JSON)
    return write_report(rows, study_dir, tables, curves, counters, mde_target, plan)


def marked_file(readme: Path, marker: str) -> Path:
    """The file that holds the ``<!-- marker:start -->`` ... ``<!-- marker:end -->`` block: `readme`
    itself, or else one of the ``docs/*.md`` beside it (Table 1 lives in the README, the extended
    ablation and the sweep confirmation in docs/results.md). A marker held nowhere is an error naming it."""
    readme = Path(readme)
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    for path in (readme, *sorted((readme.parent / "docs").glob("*.md"))):
        if path.is_file():
            text = path.read_text()
            if start in text and end in text:
                return path
    raise DataError(f"{readme}: no '{start}' ... '{end}' block in it or in {readme.parent / 'docs'}/*.md "
                    "to paste the table into")


def paste_into_readme(readme: Path, table_md: Path, marker: str) -> Path | None:
    """Replace the block between ``<!-- marker:start -->`` and ``<!-- marker:end -->`` in the file
    that holds it (`readme`, or one of the ``docs/*.md`` beside it: see `marked_file`) by the
    contents of `table_md`, so the documented results are generated, never typed.

    Returns the file changed, or None when it already held this table.
    """
    target, table_md = marked_file(readme, marker), Path(table_md)
    text = target.read_text()
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    body = table_md.read_text().strip()
    new = f"{head}{start}\n{body}\n{end}{tail}"
    if new == text:
        return None
    with atomic_write(target) as tmp:
        tmp.write_text(new)
    return target
