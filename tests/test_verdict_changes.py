"""bench/verdict_changes.py: which F20 verdicts of a paired table changed between two versions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "verdict_changes.py"
COLUMNS = ["a", "b", "metric", "seeds_estimate", "seeds_lo", "seeds_hi", "n_seeds", "files_estimate", "files_lo",
           "files_hi", "n_files", "verdict", "mde", "mde_target", "n_seeds_for_target"]


def _table(path: Path, rows: list[tuple], sequential: list[str] | None = None) -> Path:
    df = pd.DataFrame([dict(zip(COLUMNS, r, strict=True)) for r in rows])
    if sequential is not None:
        df["sequential"] = sequential
    df.to_csv(path, index=False)
    return path


def test_changed_verdicts_come_first_with_both_sides_and_the_sequential_status(tmp_path):
    old = _table(tmp_path / "old.csv", [
        ("x", "ref", "f20", -18.3, -20.6, -16.0, 3, -18.4, -20.8, -15.9, 240, "worse", 3.0, 2, 4),
        ("x", "ref", "doae_cd", 2.0, 1.0, 3.0, 3, 2.0, 1.0, 3.0, 240, "worse", 1.0, None, None),
        ("y", "ref", "f20", 3.0, -0.3, 6.3, 3, 3.0, 1.6, 4.4, 240, "no difference detected", 3.8, 2, 5),
    ])
    new = _table(tmp_path / "new.csv", [
        ("y", "ref", "f20", 2.5, 0.4, 4.6, 6, 2.5, 1.5, 3.5, 240, "better", 1.9, 2, 4),
        ("x", "ref", "f20", -19.0, -22.0, -16.0, 4, -19.1, -21.0, -17.2, 240, "worse", 2.0, 2, 3),
        ("z", "ref", "f20", -0.1, -2.0, 1.8, 8, -0.1, -0.9, 0.7, 240, "no difference detected", 1.5, 2, 8),
    ], sequential=["settled at 6", "settled at 4", "open at 8"])
    done = subprocess.run([sys.executable, str(SCRIPT), str(old), str(new), "--labels", "3 seeds", "auto:8"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [x for x in done.stdout.splitlines() if x.startswith("| ")]
    assert lines[0].startswith("| comparison (A − B) | changed | verdict (3 seeds) |")
    body = lines[1:]
    assert [x.split(" | ")[0] for x in body] == ["| y − ref", "| z − ref", "| x − ref"]  # changed first
    assert body[0] == ("| y − ref | yes | no difference detected | 3 | +3.0 [-0.3, +6.3] | +3.0 [+1.6, +4.4] | "
                       "better | 6 (settled at 6) | +2.5 [+0.4, +4.6] | +2.5 [+1.5, +3.5] |")
    assert body[1].startswith("| z − ref | yes | (absent) | – | – | – | no difference detected | 8 (open at 8) |")
    assert body[2].startswith("| x − ref | no | worse | 3 | -18.3 [-20.6, -16.0] |")  # the DOAE row left out
    assert "2 of 3 F20 verdicts changed" in done.stdout


def test_a_file_that_is_not_a_paired_table_is_named(tmp_path):
    bad = tmp_path / "summary.csv"
    pd.DataFrame({"variant": ["x"], "seed": [0]}).to_csv(bad, index=False)
    done = subprocess.run([sys.executable, str(SCRIPT), str(bad), str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and f"{bad}: not a paired table (no column a, b, " in done.stderr


def test_fixed_seeds_view_reports_a_study_cut_to_some_of_its_seeds(tmp_path):
    """bench/fixed_seeds_view.py: Table 1's study cut to seeds 0 and 1, reported as a fixed-seed study."""
    study = ROOT / "results" / "ablation"
    script = ROOT / "bench" / "fixed_seeds_view.py"
    out = tmp_path / "two-seeds"
    done = subprocess.run([sys.executable, str(script), str(study), "--preset", "local", "--seeds", "0,1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(pd.read_csv(out / "summary.csv")["seed"].unique()) == [0, 1]
    paired = pd.read_csv(out / "table1_paired.csv")
    row = paired[(paired["a"] == "Stage 2 + PP") & (paired["b"] == "Stage 2") & (paired["metric"] == "f20")].iloc[0]
    ours = pd.read_csv(study / "summary.csv").query("variant == 'stereo_rcnet' and seed in (0, 1)")
    assert row["n_seeds"] == 2
    assert abs(row["seeds_estimate"] - (ours["test_pp/f20"] - ours["test/f20"]).mean()) < 1e-4
    assert row["seeds_estimate"] != pd.read_csv(study / "table1_paired.csv").query(
        "a == 'Stage 2 + PP' and b == 'Stage 2' and metric == 'f20'")["seeds_estimate"].iloc[0]
    assert not (out / "sequential.json").exists()

    bad = subprocess.run([sys.executable, str(script), str(study), "--preset", "local", "--seeds", "0,7",
                          "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "no rows of seed(s) [7]" in bad.stderr
    same = subprocess.run([sys.executable, str(script), str(study), "--preset", "local", "--seeds", "0",
                           "--out", str(study)], capture_output=True, text=True, timeout=120)
    assert same.returncode != 0 and "is the study itself" in same.stderr
    word = subprocess.run([sys.executable, str(script), str(study), "--preset", "local", "--seeds", "0,one",
                           "--out", str(tmp_path / "word")], capture_output=True, text=True, timeout=120)
    assert word.returncode == 2 and "expected comma-separated integers" in word.stderr
    none = subprocess.run([sys.executable, str(script), str(tmp_path), "--preset", "local", "--seeds", "0",
                           "--out", str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert none.returncode != 0 and "summary.csv: no such file" in none.stderr
