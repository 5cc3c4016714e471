"""The ablation study end to end on the smoke preset: Tune trials over Train V2 runs, tidy rows,
tables, --report-only byte for byte, --resume without retraining, a failing run recorded."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from seld.config import preset_config
from seld.report import TableRow, TableSpec
from seld.study import Options, Study, Variant, flatten_metrics, run_study

ROOT = Path(__file__).resolve().parent.parent


def _load_studies():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ablation_study", ROOT / "studies/ablation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cache(tmp_path_factory, smoke_data) -> Path:
    """A study cache whose generated dataset is the session's smoke dataset (the store is built
    once, by the first test, and reused by the next)."""
    from seld.synth import dataset_hash

    cache = tmp_path_factory.mktemp("study-cache")
    (cache / f"synth-{dataset_hash(preset_config('smoke').synth)}").symlink_to(smoke_data, target_is_directory=True)
    return cache


def _attempts(out: Path) -> dict[str, int]:
    return {p.parent.name: len(p.read_text().splitlines()) for p in sorted((out / "runs").glob("*/attempts.jsonl"))}


def test_flatten_metrics_keeps_scalars_and_classwise_f20():
    flat = flatten_metrics({"test/f20": 12.5, "thresholds": [0.5] * 13, "selected_checkpoint": "x",
                            "precision": "bf16", "classwise": {"test_pp": [{"class": 3, "f20": 40.0, "doae": 2.0}]}})
    assert flat == {"test/f20": 12.5, "selected_checkpoint": "x", "precision": "bf16", "test_pp/class/3/f20": 40.0}


def _check_study_wandb(out: Path, study: str, rows: pd.DataFrame) -> None:
    """--wandb: one offline run per trial in its run folder, grouped by study, tagged with variant and
    seed, its summary holding the trial's test F20; and one report run holding the study's tables."""
    from wandb_records import items, read_wandb_records

    for _, row in rows.iterrows():
        run_dir = next((out / "runs").glob(f"{row['variant']}-s{row['seed']}-*"))
        logs = sorted(run_dir.glob("wandb/**/offline-run-*/*.wandb"))
        assert len(logs) == 1, (run_dir, logs)
        records = read_wandb_records(logs[0])
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert (run.project, run.run_group) == ("seld", study)
        assert {study, row["variant"], f"seed{row['seed']}"} <= set(run.tags)
        summary: dict = {}
        for r in records:
            if r.WhichOneof("record_type") == "summary":
                summary.update(items(r.summary.update))
        # summary.csv keeps 6 significant digits (float_format "%.6g"): relative error <= 5e-6.
        assert summary["test/f20"] == pytest.approx(row["test/f20"], rel=5e-6)
    report = [p for p in out.glob("wandb/**/offline-run-*/*.wandb")]
    assert len(report) == 1, report
    records = read_wandb_records(report[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_group == study and "report" in set(run.tags)
    logged: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            logged.update(items(r.history.item))
    table1 = pd.read_csv(out / "table1.csv")
    assert logged["table1/_type"] == "table-file" and logged["table1/nrows"] == len(table1)
    assert logged["summary/nrows"] == len(rows)
    assert logged["plots/table1/_type"] == "image-file"


@pytest.mark.ray
@pytest.mark.slow
def test_smoke_ablation_end_to_end_report_only_and_resume(tmp_path, cache, ray_session, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    # A relative --out, as users type it: trials run in Tune workers with another working
    # directory, so every path handed to them must be absolute (a bug once: the first run failed).
    monkeypatch.chdir(tmp_path)
    out = Path("ablation")
    smoke = _load_studies().STUDIES["smoke"]
    opts = Options(out=out, preset="smoke", cache_dir=cache, max_retries=0, wandb=True)
    summary = run_study(smoke, opts)
    rows = pd.read_csv(summary)
    assert list(rows["variant"]) == ["baseline", "stereo_rcnet"] and set(rows["status"]) == {"ok"}
    for col in ("git_sha", "config_hash", "data_hash", "wall_s", "device_hours", "test/f20",
                "test_pp/f20", "test/doae_cd", "test/rde_cd"):
        assert rows[col].notna().all(), col
    assert rows.loc[1, "stage1_test/f20"] >= 0 and "test_pp/site/tau/f20" in rows.columns
    assert _attempts(out) == {d: 1 for d in _attempts(out)} and len(_attempts(out)) == 2
    md = (out / "table1.md").read_text()
    for label in ("Baseline-A", "Stage 1", "Stage 2", "Stage 2 + PP"):
        line = next(x for x in md.splitlines() if x.startswith(f"| {label} |"))
        assert "–" not in line.split("|")[2], line  # a number in the F20 cell
    _check_study_wandb(out, smoke.name, rows)
    outputs = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".md", ".csv", ".tex", ".png")}
    assert {"table1.md", "table1.csv", "table1.tex", "table1.png", "curves.png", "summary.csv"} <= set(outputs)

    # --report-only: the same bytes from the recorded rows.
    for name in outputs:
        if name not in ("summary.csv", "curves.csv"):
            (out / name).unlink()
    run_study(smoke, Options(out=out, preset="smoke", report_only=True))
    for name, blob in outputs.items():
        assert (out / name).read_bytes() == blob, name

    # --resume after a "kill" that lost one run, with a variant added that keeps failing: only the
    # lost run and the new one start; the failing run is recorded with its error and the study goes on.
    before = _attempts(out)
    lost = next(d for d in (out / "runs").iterdir() if d.name.startswith("baseline"))
    import shutil

    shutil.rmtree(lost)
    broken = Variant("broken", {"train.init_checkpoint": str(tmp_path / "missing.pt"), "train.stages": "stage1"})
    table = TableSpec("failing", "with a failing variant",
                      (*smoke.tables[0].rows, TableRow("Broken", "broken", "test")))
    study = Study("ablation", "smoke", (*smoke.variants, broken), seeds=(0,), tables=(table,))
    run_study(study, Options(out=out, preset="smoke", cache_dir=cache, resume=True, max_retries=1))
    after = _attempts(out)
    broken_dir = next(k for k in after if k.startswith("broken"))
    assert after.pop(broken_dir) == 2  # one retry, then recorded as failed
    assert after == before  # the lost run started once more, the finished one never
    rows = pd.read_csv(out / "summary.csv").set_index("variant")
    assert rows["status"].to_dict() == {"baseline": "ok", "stereo_rcnet": "ok", "broken": "failed"}
    assert rows.loc["broken", "attempts"] == 2
    assert rows.loc["broken", "error"].startswith("seld.errors.DataError:") and "missing.pt" in rows.loc["broken", "error"]
    md = (out / "failing.md").read_text()
    assert "## Failed runs" in md and "missing.pt" in md


def test_report_only_on_a_cluster_reads_the_storage_results(tmp_path):
    """`ablation.py --report-only --cluster FILE` (no --out) on a cluster with shared storage redoes
    the tables in <storage>/results/<study>, where the study wrote them, not in a placeholder."""
    storage = tmp_path / "shared"
    out = storage / "results" / "ablation"
    out.mkdir(parents=True)
    for name in ("summary.csv", "curves.csv"):
        (out / name).write_bytes((ROOT / "results/ablation" / name).read_bytes())
    import os
    import subprocess
    import sys

    cmd = [sys.executable, str(ROOT / "studies/ablation.py"), "--report-only", "--cluster", str(ROOT / "cluster/local.yaml")]
    done = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "SELD_STORAGE": str(storage)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "table1.md").read_bytes() == (ROOT / "results/ablation/table1.md").read_bytes()
    assert not (tmp_path / "results").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_a_run_stopped_by_its_time_budget_is_marked_and_the_study_exits_nonzero(tmp_path, cache, ray_session, capsys):
    """--time-budget-s 1: every run trains its first epoch, then stops at the budget. Baseline-A
    (stage 1 only, 1 epoch) finishes; Stereo-RCnet stops before stage 2: status time_budget in
    metrics.json and summary.csv, no Stage 1/Stage 2 figure from it in Table 1, the table lists it,
    and the study script exits 1 after writing the tables."""
    import json

    from seld.study import main

    mod = _load_studies()
    out = tmp_path / "abl"
    rc = main(mod.STUDIES, ["--preset", "smoke", "--out", str(out), "--cache-dir", str(cache),
                            "--time-budget-s", "1", "--max-retries", "0"], description="", example="")
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "1 run(s) failed or truncated: stereo_rcnet-s0: time_budget" in err
    rows = pd.read_csv(out / "summary.csv").set_index("variant")
    assert rows["status"].to_dict() == {"baseline": "ok", "stereo_rcnet": "time_budget"}
    assert "stage(s) 2 not finished" in rows.loc["stereo_rcnet", "error"]
    metrics = json.loads((out / rows.loc["stereo_rcnet", "run_dir"] / "metrics.json").read_text())
    assert (metrics["status"], metrics["stages_done"], metrics["selected_stage"]) == ("time_budget", [1], 1)
    assert metrics["cost/stage2_epochs"] == 0
    md = (out / "table1.md").read_text()
    main_table = md.split("| System |", 1)[1].split("\n\n", 1)[0]  # ours, not the paper's figures
    cells = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in main_table.splitlines()
             if line.startswith("| ")}
    assert cells["Baseline-A"] != "–"
    assert cells["Stage 1"] == cells["Stage 2"] == cells["Stage 2 + PP"] == "–"  # no figure from the cut run
    assert "## Failed runs" in md and "| stereo_rcnet | 0 | time_budget |" in md


def test_unfinished_runs_names_failed_and_truncated_runs_of_both_tables(tmp_path):
    """The exit status rule of the study scripts, on an ablation's summary.csv and a sweep's
    trials.csv: failed and truncated runs count; finished, ASHA-stopped and pruned trials do not."""
    from seld.study.cli import unfinished_runs

    summary = tmp_path / "summary.csv"
    pd.DataFrame({"variant": ["a", "b", "c"], "seed": [0, 0, 1],
                  "status": ["ok", "failed", "time_budget"]}).to_csv(summary, index=False)
    assert unfinished_runs(summary) == ["b-s0: failed", "c-s1: time_budget"]
    trials = tmp_path / "trials.csv"
    pd.DataFrame({"number": [0, 1, 2, 3, 4],
                  "status": ["finished", "stopped_early", "pruned", "fail", "time_budget"]}).to_csv(trials, index=False)
    assert unfinished_runs(trials) == ["trial 3: fail", "trial 4: time_budget"]
    pd.DataFrame({"variant": ["a"], "seed": [0], "status": ["ok"]}).to_csv(summary, index=False)
    assert unfinished_runs(summary) == []
