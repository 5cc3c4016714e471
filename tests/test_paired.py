"""seld.paired: paired intervals over seeds and test files, the verdict rule, counters files, and the
tables' paired-differences section (checked against direct computations; no training, no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from seld.errors import DataError
from seld.labels import EVENT_DTYPE
from seld.metrics import count_errors, score_counters
from seld.paired import (
    PairedInterval,
    load_counters,
    paired_file_jackknife,
    paired_t,
    run_counters_key,
    save_counters,
    verdict,
)
from seld.report import Comparison, TableRow, TableSpec, report_from_files, write_report


def _events(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    ev = np.zeros(n, dtype=EVENT_DTYPE)
    ev["frame"] = rng.integers(0, 50, n)
    ev["class"] = rng.integers(0, 13, n)
    ev["azimuth"] = np.clip(rng.normal(shift, 40, n), -90, 90).round()
    ev["distance"] = rng.uniform(50, 400, n).round()
    return ev


def _counters(seed: int, n_files: int, noise: float) -> np.ndarray:
    """Real per-file counters: random reference events (fixed by ``seed``) and predictions that
    perturb them (more with more ``noise``)."""
    rng_ref = np.random.default_rng(seed)
    rng = np.random.default_rng([seed, int(noise * 1000)])
    refs = [_events(rng_ref, int(rng_ref.integers(5, 40))) for _ in range(n_files)]
    preds = []
    for ref in refs:
        keep = ref[rng.random(len(ref)) > noise].copy()
        keep["azimuth"] = np.clip(keep["azimuth"] + rng.normal(0, 30 * noise, len(keep)), -90, 90).round()
        preds.append(np.concatenate([keep, _events(rng, int(rng.integers(0, 6)))]))
    return count_errors(refs, preds)


def test_paired_t_equals_scipys_paired_t_interval():
    a = {0: 30.1, 1: 27.4, 2: 33.0, 3: 29.9}
    b = {0: 25.0, 1: 26.1, 2: 28.2, 3: 24.7, 7: 99.0}  # seed 7 has no partner: left out
    iv = paired_t(a, b)
    seeds = [0, 1, 2, 3]
    ci = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).confidence_interval(0.95)
    assert iv.n == 4
    assert iv.estimate == pytest.approx(np.mean([a[s] - b[s] for s in seeds]), rel=1e-12)
    assert (iv.lo, iv.hi) == (pytest.approx(ci.low, rel=1e-10), pytest.approx(ci.high, rel=1e-10))
    one = paired_t({0: 2.0}, {0: 1.5})
    assert one.n == 1 and one.estimate == 0.5 and not one.defined
    assert paired_t({0: 1.0}, {1: 1.0}).n == 0
    assert paired_t({0: 1.0, 1: float("nan")}, {0: 0.5, 1: 0.2}).n == 1  # NaN seeds dropped


@pytest.mark.parametrize("metric", ["f20", "doae_cd", "rde_cd"])
def test_paired_file_jackknife_equals_a_direct_leave_one_file_out(metric):
    n_files, seeds = 12, 3
    ca = np.stack([_counters(10 + s, n_files, noise=0.2) for s in range(seeds)])
    # The same reference files for B (same rng seeds), noisier predictions.
    cb = np.stack([_counters(10 + s, n_files, noise=0.5) for s in range(seeds)])
    assert np.array_equal(ca[..., 8], cb[..., 8])  # n_ref: B scores the same files as A

    def stat(keep: list[int]) -> float:
        return float(np.mean([getattr(score_counters(ca[s, keep]), metric)
                              - getattr(score_counters(cb[s, keep]), metric) for s in range(seeds)]))

    g = stat(list(range(n_files)))
    partial = np.asarray([stat([j for j in range(n_files) if j != i]) for i in range(n_files)])
    bias = (n_files - 1) * (partial.mean() - g)
    se = math.sqrt((n_files - 1) * np.mean((partial - partial.mean()) ** 2))
    t = stats.t.ppf(0.975, n_files - 1)
    iv = paired_file_jackknife(ca, cb, metric)
    assert iv.n == n_files
    assert iv.estimate == pytest.approx(g - bias, rel=1e-9, abs=1e-12)
    assert iv.lo == pytest.approx(g - bias - t * se, rel=1e-9, abs=1e-12)
    assert iv.hi == pytest.approx(g - bias + t * se, rel=1e-9, abs=1e-12)
    if metric == "f20":
        assert iv.lo > 0  # less noise gives a clearly higher F20 on these files


def test_paired_file_jackknife_of_a_row_with_itself_is_zero_and_shapes_are_checked():
    c = np.stack([_counters(3, 6, 0.3)])
    iv = paired_file_jackknife(c, c, "f20")
    assert (iv.estimate, iv.lo, iv.hi) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="one shape"):
        paired_file_jackknife(c, c[:, :5], "f20")


def _iv(lo: float, hi: float, n: int = 3) -> PairedInterval:
    return PairedInterval((lo + hi) / 2, lo, hi, n)


@pytest.mark.parametrize(("seeds", "files", "higher", "expected"), [
    (_iv(0.5, 2.0), _iv(0.1, 3.0), True, "better"),
    (_iv(0.5, 2.0), _iv(-0.1, 3.0), True, "no difference detected"),  # files do not agree
    (_iv(-2.0, 2.0), _iv(0.1, 3.0), True, "no difference detected"),  # seeds do not agree
    (_iv(-3.0, -0.2), _iv(-2.0, -0.5), True, "worse"),
    (_iv(-3.0, -0.2), _iv(-2.0, -0.5), False, "better"),  # e.g. DOAE: lower is better
    (_iv(0.5, 2.0), None, True, "better"),  # no per-file counters: seeds alone
    (PairedInterval(1.0, math.nan, math.nan, 1), _iv(0.2, 1.8, 240), True, "better"),  # one seed
    (PairedInterval(1.0, math.nan, math.nan, 1), None, True, "no difference detected"),
])
def test_verdict_rule(seeds, files, higher, expected):
    assert verdict(seeds, files, higher) == expected


def test_counters_file_round_trip_sorted_by_clip_and_errors(tmp_path):
    c = _counters(1, 3, 0.2)
    save_counters(tmp_path / "c.npz", ["b", "c", "a"], {"test": c})
    clips, data = load_counters(tmp_path / "c.npz")
    assert list(clips) == ["a", "b", "c"]
    assert np.array_equal(data["test"], c[[2, 0, 1]])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz: not a readable counters file"):
        load_counters(tmp_path / "junk.npz")
    np.savez(tmp_path / "noclips.npz", test=c)
    with pytest.raises(DataError, match="noclips.npz: no 'clips' array"):
        load_counters(tmp_path / "noclips.npz")


def test_table_paired_section_from_summary_and_counters(tmp_path):
    """Stage 2 − Stage 1 and a verdict, regenerated byte for byte from the study's files."""
    spec = TableSpec(
        name="t", title="T",
        rows=(TableRow("Stage 1", "m", "stage1_test"), TableRow("Stage 2", "m", "test"),
              TableRow("other", "o", "test")),
        comparisons=(Comparison("Stage 2", "Stage 1"), Comparison("other", "Stage 2", verdict=True)),
    )
    recs, arrays = [], {}
    for s in range(3):
        c1, c2, c3 = _counters(20 + s, 10, 0.6), _counters(20 + s, 10, 0.3), _counters(20 + s, 10, 0.3)
        arrays[run_counters_key("m", s, "stage1_test")] = c1
        arrays[run_counters_key("m", s, "test")] = c2
        arrays[run_counters_key("o", s, "test")] = c3
        for variant, prefix, c in (("m", "stage1_test", c1), ("m", "test", c2), ("o", "test", c3)):
            sc = score_counters(c)
            rec = next((r for r in recs if r["variant"] == variant and r["seed"] == s), None)
            if rec is None:
                rec = {"variant": variant, "seed": s, "status": "ok"}
                recs.append(rec)
            rec.update({f"{prefix}/f20": sc.f20, f"{prefix}/doae_cd": sc.doae_cd, f"{prefix}/rde_cd": sc.rde_cd})
    rows = pd.DataFrame.from_records(recs)
    rows.to_csv(tmp_path / "summary.csv", index=False)
    save_counters(tmp_path / "counters.npz", [f"clip{i:02d}" for i in range(10)], arrays)
    paths = report_from_files(tmp_path, [spec])
    md = (tmp_path / "t.md").read_text()
    assert "## Paired differences" in md
    d = paired_t({s: rows.loc[(rows.variant == "m") & (rows.seed == s), "test/f20"].item() for s in range(3)},
                 {s: rows.loc[(rows.variant == "m") & (rows.seed == s), "stage1_test/f20"].item() for s in range(3)})
    f = paired_file_jackknife(np.stack([arrays[run_counters_key("m", s, "test")] for s in range(3)]),
                              np.stack([arrays[run_counters_key("m", s, "stage1_test")] for s in range(3)]), "f20")
    line = next(ln for ln in md.splitlines() if ln.startswith("| Stage 2 − Stage 1 |"))
    assert f"{d.estimate:+.1f} [{d.lo:+.1f}, {d.hi:+.1f}]" in line
    assert f"{f.estimate:+.1f} [{f.lo:+.1f}, {f.hi:+.1f}]" in line
    other = next(ln for ln in md.splitlines() if ln.startswith("| other − Stage 2 |"))
    assert other.rstrip(" |").endswith("no difference detected")  # the same predictions' statistics
    paired = pd.read_csv(tmp_path / "t_paired.csv")
    row = paired[(paired.a == "Stage 2") & (paired.metric == "f20")].iloc[0]
    assert row.seeds_lo == pytest.approx(d.lo, rel=1e-5) and row.files_hi == pytest.approx(f.hi, rel=1e-5)
    assert row.n_seeds == 3 and row.n_files == 10
    before = {p: p.read_bytes() for p in paths if p.suffix in (".md", ".csv", ".tex")}
    report_from_files(tmp_path, [spec])
    assert {p: p.read_bytes() for p in before} == before
    # Without counters the file column is a dash, the seed interval stays.
    out2 = tmp_path / "nocounters"
    write_report(rows, out2, [spec])
    line2 = next(ln for ln in (out2 / "t.md").read_text().splitlines() if ln.startswith("| Stage 2 − Stage 1 |"))
    assert line2.split(" | ")[2] == "–" and f"{d.estimate:+.1f} [" in line2
