"""seld.report: tables and plots from constructed study rows (no training, no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from seld.errors import DataError
from seld.report import (
    TableRow,
    TableSpec,
    clipped_error_bars,
    paste_into_readme,
    report_from_files,
    t_interval,
    write_report,
)

SPEC = TableSpec(
    name="table1",
    title="Table 1",
    rows=(
        TableRow("Baseline-A", "baseline", "test"),
        TableRow("Stage 1", "stereo_rcnet", "stage1_test", cost_key="stage1/wall_s"),
        TableRow("Stage 2", "stereo_rcnet", "test"),
        TableRow("Stage 2 + PP", "stereo_rcnet", "test_pp", breakdowns=True),
    ),
    paper={"Baseline-A": (22.78, 24.5, 0.41), "Stage 2 + PP": (42.5, 15.0, 0.30)},
)


def _rows() -> pd.DataFrame:
    recs = []
    for seed, f in zip((0, 1, 2), (40.0, 42.0, 44.0), strict=True):
        recs.append({"study": "ablation", "variant": "baseline", "seed": seed, "status": "ok", "error": "",
                     "preset": "local", "dataset": "generated", "protocol": "dcase",
                     "wall_s": 600.0, "n_devices": 1, "test/f20": 20.0 + seed,
                     "test/doae_cd": 30.0, "test/rde_cd": 0.5})
        rec = {"study": "ablation", "variant": "stereo_rcnet", "seed": seed, "status": "ok", "error": "",
               "preset": "local", "dataset": "generated", "protocol": "dcase",
               "wall_s": 1200.0, "stage1/wall_s": 720.0, "n_devices": 2,
               "stage1_test/f20": f - 10, "stage1_test/doae_cd": 20.0, "stage1_test/rde_cd": 0.4,
               "test/f20": f, "test/doae_cd": 15.0, "test/rde_cd": 0.3,
               "test_pp/f20": f + 1, "test_pp/doae_cd": 15.5, "test_pp/rde_cd": 0.31,
               "test_pp/site/tau/f20": f + 2, "test_pp/site/sony/f20": f,
               "synth_test/f20": 70.0, "synth_test/doae_cd": 8.0, "synth_test/rde_cd": 0.2}
        for c in range(13):
            rec[f"test_pp/class/{c}/f20"] = float(c + seed)
        recs.append(rec)
    recs.append({"study": "ablation", "variant": "stereo_rcnet", "seed": 3, "status": "failed",
                 "error": "RuntimeError: out of memory\ntraceback", "preset": "local",
                 "dataset": "generated", "protocol": "dcase"})
    return pd.DataFrame.from_records(recs)


def test_t_interval_matches_textbook_value():
    iv = t_interval([40.0, 42.0, 44.0])
    # s = 2, n = 3, t_{0.975, 2} = 4.302653 -> half = 4.302653 * 2 / sqrt(3)
    assert iv.mean == pytest.approx(42.0)
    assert iv.half == pytest.approx(4.302653 * 2 / math.sqrt(3), rel=1e-6)
    assert iv.n == 3
    one = t_interval([5.0, float("nan")])
    assert one.n == 1 and one.mean == 5.0 and math.isnan(one.half)


def test_table1_rows_values_caption_and_paper_figures(tmp_path):
    paths = write_report(_rows(), tmp_path, [SPEC])
    md = (tmp_path / "table1.md").read_text()
    half = 4.302653 * 2 / math.sqrt(3)
    # Stage 2 + PP: mean 43.0 over seeds; Stage 1: 32.0; Baseline: 21.0 with s=1.
    assert f"| Stage 2 + PP | 43.0 ± {half:.1f} | 15.5 ± 0.0 | 0.310 ± 0.000 | 3 | 1 | 20.0 | 0.667 |" in md
    assert f"| Stage 1 | 32.0 ± {half:.1f} |" in md
    assert "| 12.0 | 0.400 |" in md  # stage 1 cost: 720 s, 2 devices -> 0.4 device-h
    assert "| Baseline-A | 21.0 ± 2.5 |" in md  # s = 1: 4.3027 / sqrt(3) = 2.48
    assert "over seeds" in md and "95 %" in md
    assert "not the paper's real DCASE2025 data" in md
    # Paper figures are in their own labelled table, after ours.
    ours, paper = md.split("The paper's own figures")
    assert "42.50" not in ours and "| Stage 2 + PP | 42.50 | 15.0 | 0.30 |" in paper
    # Extras: breakdown by site, domain gap, failed run listed with the first line of its error.
    assert "| sony | 42.0 ±" in md and "| tau | 44.0 ±" in md
    assert "synthetic-domain" in md and f"| Stage 2 | 42.0 ± {half:.1f} | 70.0 ± 0.0 | 15.0 ± 0.0 | 8.0 ± 0.0 |" in md
    assert "RuntimeError: out of memory |" in md and "traceback" not in md
    csv = pd.read_csv(tmp_path / "table1.csv")
    assert list(csv["system"]) == ["Baseline-A", "Stage 1", "Stage 2", "Stage 2 + PP"]
    assert csv.loc[3, "f20_mean"] == pytest.approx(43.0)
    assert csv.loc[3, "f20_ci95"] == pytest.approx(half, rel=1e-5)
    tex = (tmp_path / "table1.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and "Stage 2 + PP" in tex
    names = {p.name for p in paths}
    assert {"table1.md", "table1.csv", "table1.tex", "table1.png", "table1_classwise.png"} <= names
    assert (tmp_path / "table1.png").read_bytes()[:4] == b"\x89PNG"


def test_protocol_paper_adds_footnote(tmp_path):
    rows = _rows().assign(protocol="paper")
    write_report(rows, tmp_path, [SPEC])
    assert "protocol `paper`" in (tmp_path / "table1.md").read_text()


def test_caption_states_the_training_precision(tmp_path):
    write_report(_rows(), tmp_path, [SPEC])
    assert "precision" not in (tmp_path / "table1.md").read_text()  # older summaries have no column
    rows = _rows()
    rows["precision"] = ["bf16"] * (len(rows) - 1) + ["float32"]  # a mixed study says so
    write_report(rows, tmp_path, [SPEC])
    assert "Training precision: bf16, float32 (`train.amp_bf16`" in (tmp_path / "table1.md").read_text()


def test_caption_names_the_machine_and_says_when_there_were_several(tmp_path):
    write_report(_rows(), tmp_path, [SPEC])
    assert "Machine" not in (tmp_path / "table1.md").read_text()  # older summaries have no column
    rows = _rows()
    rows["machine/kind"] = "AVX512 AMD EPYC / torch 2.13.0+cpu"
    write_report(rows, tmp_path, [SPEC])
    md = (tmp_path / "table1.md").read_text()
    assert "Machine: AVX512 AMD EPYC / torch 2.13.0+cpu." in md and "kinds of machine" not in md
    rows["machine/kind"] = ["AVX2 Intel Xeon / torch 2.13.0+cpu"] + ["AVX512 AMD EPYC / torch 2.13.0+cpu"] * (len(rows) - 1)
    write_report(rows, tmp_path, [SPEC])
    md = (tmp_path / "table1.md").read_text()
    assert ("**Trained on 2 kinds of machine** (AVX2 Intel Xeon / torch 2.13.0+cpu; AVX512 AMD EPYC / "
            "torch 2.13.0+cpu)") in md and "Machine:" not in md


def test_report_from_files_is_byte_for_byte_reproducible(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        _rows().to_csv(d / "summary.csv", index=False)
        curves = pd.DataFrame({"variant": ["stereo_rcnet"] * 4, "seed": [0, 0, 1, 1], "epoch": [0, 1, 0, 1],
                               "stage": [1, 2, 1, 2], "train/loss": [0.2, 0.1, 0.21, 0.11],
                               "val/f20": [10.0, 20.0, 12.0, 19.0], "val/doae_cd": [40.0, 30.0, 41.0, 31.0],
                               "val/rde_cd": [0.5, 0.4, 0.52, 0.41]})
        rows = _rows()
        rows["selected_epoch"] = [pd.NA if v == "baseline" else 1 for v in rows["variant"]]
        rows.to_csv(d / "summary.csv", index=False)
        curves.to_csv(d / "curves.csv", index=False)
    pa = report_from_files(a, [SPEC])
    pb = report_from_files(b, [SPEC])
    assert [p.name for p in pa] == [p.name for p in pb] and "curves.png" in {p.name for p in pa}
    for x, y in zip(pa, pb, strict=True):
        assert x.read_bytes() == y.read_bytes(), x.name
    first = {p.name: p.read_bytes() for p in pa}
    report_from_files(a, [SPEC])
    assert {p.name: p.read_bytes() for p in pa} == first
    # Another library's style in the same process (Optuna's sweep plots use "ggplot") changes nothing.
    import matplotlib.pyplot as plt

    plt.style.use("ggplot")
    report_from_files(a, [SPEC])
    assert {p.name: p.read_bytes() for p in pa} == first


def test_missing_summary_and_columns_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="summary.csv"):
        report_from_files(tmp_path, [SPEC])
    pd.DataFrame({"variant": ["x"]}).to_csv(tmp_path / "summary.csv", index=False)
    with pytest.raises(DataError, match="missing column"):
        report_from_files(tmp_path, [SPEC])


def test_single_seed_shows_mean_only(tmp_path):
    rows = _rows()
    rows = rows[rows["seed"] == 0]
    write_report(rows, tmp_path, [SPEC])
    md = (tmp_path / "table1.md").read_text()
    assert "| Stage 2 | 40.0 | 15.0 | 0.300 | 1 |" in md
    assert np.isnan(pd.read_csv(tmp_path / "table1.csv").loc[2, "f20_ci95"])


def test_caption_names_the_commit_and_marks_results_of_a_dirty_tree(tmp_path):
    rows = _rows().assign(git_sha="0123456789ab")
    write_report(rows, tmp_path, [SPEC])
    md = (tmp_path / "table1.md").read_text()
    assert "Trained at commit `0123456789ab`." in md and "Not from one clean commit" not in md
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- ablation:table1:start -->\nOLD BLOCK\n<!-- ablation:table1:end -->\nrest\n")
    rows["git_sha"] = "0123456789ab-dirty"
    write_report(rows, tmp_path, [SPEC])
    assert paste_into_readme(readme, tmp_path / "table1.md", "ablation:table1")
    text = readme.read_text()
    assert "**Not from one clean commit:** the runs were trained at `0123456789ab-dirty`" in text
    assert text.startswith("intro\n") and text.endswith("rest\n") and "OLD BLOCK" not in text


def test_paste_goes_to_the_file_that_holds_the_marker(tmp_path):
    """`--readme README.md` pastes Table 1 into the README and the other studies' tables into the
    docs/*.md that holds their markers; a marker held nowhere is one error naming it."""
    write_report(_rows().assign(git_sha="0123456789ab"), tmp_path, [SPEC])
    readme, results = tmp_path / "README.md", tmp_path / "docs" / "results.md"
    results.parent.mkdir()
    readme.write_text("front door\n")
    results.write_text("# Results\n<!-- ablation-extended:table1:start -->\nOLD\n<!-- ablation-extended:table1:end -->\nend\n")
    assert paste_into_readme(readme, tmp_path / "table1.md", "ablation-extended:table1") == results
    assert readme.read_text() == "front door\n"
    text = results.read_text()
    assert "OLD" not in text and "Trained at commit `0123456789ab`." in text and text.endswith("end\n")
    assert paste_into_readme(readme, tmp_path / "table1.md", "ablation-extended:table1") is None  # unchanged
    with pytest.raises(DataError, match=r"no '<!-- sweep-confirm:table1:start -->'.*docs/\*\.md"):
        paste_into_readme(readme, tmp_path / "table1.md", "sweep-confirm:table1")


def test_error_bars_of_bounded_metrics_stay_in_range():
    bars = clipped_error_bars(np.array([2.0, 99.0, 50.0, np.nan]), np.array([5.0, 5.0, 3.0, np.nan]), "f20")
    # [lengths below], [lengths above]: 2 - 5 would go under 0 %, 99 + 5 over 100 %.
    np.testing.assert_allclose(bars, [[2.0, 5.0, 3.0, 0.0], [5.0, 1.0, 3.0, 0.0]])
    np.testing.assert_allclose(clipped_error_bars(np.array([0.1]), np.array([0.3]), "rde_cd"), [[0.1], [0.3]])
    np.testing.assert_allclose(clipped_error_bars(np.array([170.0]), np.array([20.0]), "doae_cd"), [[20.0], [10.0]])
