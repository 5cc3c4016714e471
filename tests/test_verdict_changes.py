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
