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
    SequentialPlan,
    load_counters,
    minimum_detectable_effect,
    paired_file_jackknife,
    paired_t,
    read_plan,
    run_counters_key,
    save_counters,
    seeds_for_effect,
    sequential_look,
    t_test_power,
    verdict,
    write_plan,
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


@pytest.mark.parametrize(("sd", "n"), [(1.108, 3), (2.4, 8)])
def test_minimum_detectable_effect_has_80_percent_power_by_direct_simulation(sd, n):
    """At the MDE, 40 000 simulated paired t-tests reject H0 80 % of the time (+-0.6 pp at 3 SE)."""
    mde = minimum_detectable_effect(sd, n)
    d = np.random.default_rng(n).normal(mde, sd, (40_000, n))
    p = stats.ttest_1samp(d, 0.0, axis=1).pvalue
    assert np.mean(p < 0.05) == pytest.approx(0.80, abs=0.006)
    assert t_test_power(mde, sd, n) == pytest.approx(0.80, abs=1e-8)
    # The textbook approximation (t_{0.975,n-1} + t_{0.8,n-1}) s / sqrt(n) is below it at few seeds.
    approx = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / math.sqrt(n)
    assert approx < mde < 1.1 * approx


def test_minimum_detectable_effect_edges_and_many_seeds():
    approx = (stats.t.ppf(0.975, 199) + stats.t.ppf(0.8, 199)) * 1.0 / math.sqrt(200)
    assert minimum_detectable_effect(1.0, 200) == pytest.approx(approx, rel=0.01)
    assert math.isnan(minimum_detectable_effect(1.0, 1)) and minimum_detectable_effect(0.0, 3) == 0.0


def test_seeds_for_effect_is_the_fewest_that_reach_80_percent_power():
    n = seeds_for_effect(2.0, 1.108)
    assert n == 5 and t_test_power(2.0, 1.108, n) >= 0.8 > t_test_power(2.0, 1.108, n - 1)
    n = seeds_for_effect(1.0, 2.4)
    assert t_test_power(1.0, 2.4, n) >= 0.8 > t_test_power(1.0, 2.4, n - 1)
    assert seeds_for_effect(0.01, 5.0) is None  # beyond 1000 seeds
    # A well-separated pair at 2 seeds (1 degree of freedom, noncentrality 12.9), where scipy's
    # noncentral t gives NaN: the power still matches a direct simulation, and 3 seeds suffice.
    d = np.random.default_rng(9).normal(2.0, 0.22, (100_000, 2))
    assert t_test_power(2.0, 0.22, 2) == pytest.approx(np.mean(stats.ttest_1samp(d, 0.0, axis=1).pvalue < 0.05),
                                                       abs=0.005)
    assert seeds_for_effect(2.0, 0.22) == 3


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
    # What the seeds can see: the MDE and the seeds for the 2 pp default target, in the csv and the table.
    sd = np.std([rows.loc[(rows.variant == "m") & (rows.seed == s), "test/f20"].item()
                 - rows.loc[(rows.variant == "m") & (rows.seed == s), "stage1_test/f20"].item() for s in range(3)],
                ddof=1)
    assert row.mde == pytest.approx(minimum_detectable_effect(sd, 3), rel=1e-5) and row.mde_target == 2.0
    assert row.n_seeds_for_target == seeds_for_effect(2.0, sd)
    assert line.split(" | ")[6:8] == [f"{row.mde:.1f}", str(seeds_for_effect(2.0, sd))]
    assert "| seeds | MDE F20 (pp) | seeds for 2 pp |" in md
    before = {p: p.read_bytes() for p in paths if p.suffix in (".md", ".csv", ".tex")}
    report_from_files(tmp_path, [spec])
    assert {p: p.read_bytes() for p in before} == before
    # Without counters the file column is a dash, the seed interval stays.
    out2 = tmp_path / "nocounters"
    write_report(rows, out2, [spec])
    line2 = next(ln for ln in (out2 / "t.md").read_text().splitlines() if ln.startswith("| Stage 2 − Stage 1 |"))
    assert line2.split(" | ")[2] == "–" and f"{d.estimate:+.1f} [" in line2


def _seq_rows(diffs: dict[str, list[float]]) -> pd.DataFrame:
    """Summary rows of a reference "ref" (F20 30 at every seed) and variants with the given per-seed
    differences (as many seeds as listed)."""
    n = max(len(d) for d in diffs.values())
    recs = [{"variant": "ref", "seed": s, "status": "ok", "test/f20": 30.0} for s in range(n)]
    for v, ds in diffs.items():
        recs += [{"variant": v, "seed": s, "status": "ok", "test/f20": 30.0 + d} for s, d in enumerate(ds)]
    return pd.DataFrame.from_records(recs)


def test_sequential_tables_show_the_seeds_used_and_how_each_comparison_ended(tmp_path):
    plan = SequentialPlan(tuple(range(8)), n_planned=3)
    diffs = {"big": [9.0, 10.0, 11.0, 10.5],  # t = 17 at 3 seeds: short of the first look's 27; settles at 4
             "same": [0.2, -0.3, 0.1],  # cannot settle by 8
             "open": [2.0, -0.5, 3.0, 1.0],  # still running at 4
             "max": [1.6, 0.4, 0.0, 0.4, 3.5, 0.7, 0.9, -1.4]}  # unsettled at MAX
    rows = _seq_rows(diffs)
    spec = TableSpec("s", "S", rows=(TableRow("ref", "ref", "test"), *(TableRow(v, v, "test") for v in diffs)),
                     comparisons=tuple(Comparison(v, "ref", verdict=True) for v in diffs))
    write_plan(tmp_path / "sequential.json", plan)
    assert read_plan(tmp_path / "sequential.json") == plan
    rows.to_csv(tmp_path / "summary.csv", index=False)
    report_from_files(tmp_path, [spec])
    md = (tmp_path / "s.md").read_text()
    assert "Lan-DeMets O'Brien-Fleming-type" in md and "| sequential seeds |" in md
    cells = {ln.split(" | ")[0].lstrip("| "): ln.rstrip(" |").split(" | ")
             for ln in md.splitlines() if " − ref |" in ln}
    assert cells["big − ref"][-1] == "settled at 4" and cells["big − ref"][-2] == "better"
    assert cells["big − ref"][5] == "4"
    assert cells["same − ref"][-1] == "stopped at 3: cannot settle by 8"
    assert cells["open − ref"][-1] == "open at 4: unfinished"
    assert cells["max − ref"][-1] == "open at MAX (8)" and cells["max − ref"][-2] == "no difference detected"
    res = sequential_look({s: 30.0 + d for s, d in enumerate(diffs["big"])}, {s: 30.0 for s in range(8)}, plan)
    assert cells["big − ref"][1] == f"{res.interval.estimate:+.1f} [{res.interval.lo:+.1f}, {res.interval.hi:+.1f}]"
    paired = pd.read_csv(tmp_path / "s_paired.csv")
    assert paired.loc[(paired.a == "open") & (paired.metric == "f20"), "sequential"].item() == "open at 4: unfinished"
    write_plan(tmp_path / "sequential.json", SequentialPlan(plan.seeds, 3, stopped_by_budget=True))
    report_from_files(tmp_path, [spec])
    assert "| stopped at 4 by the budget |" in (tmp_path / "s.md").read_text()
    (tmp_path / "sequential.json").write_text("{}")
    with pytest.raises(DataError, match="sequential.json: not a sequential plan"):
        report_from_files(tmp_path, [spec])


def test_runs_wanted_are_the_next_seed_of_the_running_comparisons_rows():
    from seld.study.ablation import runs_wanted

    plan = SequentialPlan(tuple(range(8)), n_planned=3)
    rows = _seq_rows({"same": [0.2, -0.3, 0.1], "open": [2.0, -0.5, 3.0, 1.0], "fresh": [2.0]})
    spec = TableSpec("s", "S", rows=(TableRow("ref", "ref", "test"), TableRow("same", "same", "test"),
                                     TableRow("open", "open", "test"), TableRow("fresh", "fresh", "test")),
                     comparisons=(Comparison("same", "ref", verdict=True), Comparison("open", "ref", verdict=True),
                                  Comparison("fresh", "ref", verdict=True), Comparison("open", "same")))
    wanted = runs_wanted(rows, None, (spec,), plan)
    # "same" cannot settle: nothing; "open" runs at 4 seeds: seed 4 for it and ref; "fresh" has one
    # seed, short of the first look: seed 1 next; the comparison without a verdict adds nothing.
    assert wanted - {(v, s) for v, s in zip(rows.variant, rows.seed, strict=True)} == {("open", 4), ("ref", 4),
                                                                                       ("fresh", 1)}


def test_the_budget_counts_a_failed_run_as_a_typical_one():
    """--budget-device-hours: failed or cut-short rows record no device-hours but spent some."""
    import pandas as pd

    from seld.study.ablation import device_hours_used

    rows = pd.DataFrame({"status": ["ok", "ok", "failed", "time_budget"], "device_hours": [0.1, 0.3, None, None]})
    used, per_run = device_hours_used(rows)
    assert per_run == pytest.approx(0.2) and used == pytest.approx(0.8)
    assert device_hours_used(rows.iloc[:2]) == (pytest.approx(0.4), pytest.approx(0.2))
    assert device_hours_used(pd.DataFrame({"status": ["failed"], "device_hours": [None]})) == (0.0, 0.0)
    assert device_hours_used(pd.DataFrame({"status": ["ok"]})) == (0.0, 0.0)
