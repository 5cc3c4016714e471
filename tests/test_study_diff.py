"""bench/study_diff.py, the check behind "the main job reproduces the committed Table 1 bit for bit"."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIFF = ROOT / "bench" / "study_diff.py"
STUDY = ROOT / "results" / "ablation"


def _edit_summary(study: Path, edit) -> None:
    """Rewrite study/summary.csv with `edit(rows)` applied to its list of dict rows."""
    with open(study / "summary.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    rows = edit(rows)
    with open(study / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _run(a: Path, b: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DIFF), str(a), str(b)], capture_output=True, text=True, timeout=120)


def test_a_study_is_identical_to_its_copy_with_other_timings(tmp_path):
    copy = tmp_path / "ablation"
    shutil.copytree(STUDY, copy)
    _edit_summary(copy, lambda rows: [{**r, "wall_s": "1.0", "cost/wall_s": "1.0"} for r in rows])  # other timings
    out = _run(STUDY, copy)
    assert out.returncode == 0, out.stdout
    assert "0 differ" in out.stdout and out.stdout.strip().endswith("identical")


@pytest.mark.parametrize("what", ["metric", "missing row"])
def test_one_changed_number_or_a_missing_run_is_a_difference(tmp_path, what):
    copy = tmp_path / "ablation"
    shutil.copytree(STUDY, copy)
    if what == "metric":
        _edit_summary(copy, lambda rows: [{**rows[0], "test_pp/f20": repr(float(rows[0]["test_pp/f20"]) + 1e-9)},
                                          *rows[1:]])
    else:
        _edit_summary(copy, lambda rows: rows[:-1])
    out = _run(STUDY, copy)
    assert out.returncode == 1
    assert ("test_pp/f20" in out.stdout) if what == "metric" else ("only in" in out.stdout)
    assert out.stdout.strip().endswith("DIFFERENT")


def test_the_float32_study_differs_from_the_bf16_one():
    out = _run(STUDY, ROOT / "results" / "ablation-float32")
    assert out.returncode == 1
    assert "counters.npz: 16 arrays, DIFFER" in out.stdout
