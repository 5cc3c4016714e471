"""End to end through the command line: train (Ray Train, 1 and 2 workers) -> predict -> evaluate
reproduces the run's recorded test metrics exactly; same seed twice -> the same metrics.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from seld.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TIMING_COLUMNS = {"train/time_s", "train/data_wait_frac", "val/time_s", "elapsed_s"}


def _train(store: Path, out: Path, *extra: str) -> dict:
    assert main(["train", str(store), "--preset", "smoke", "--out", str(out), *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def smoke_run(smoke_store, ray_session, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("pipeline") / "run1"
    _train(smoke_store, run, "--workers", "1")
    return run


def _test_dirs(data: Path) -> list[str]:
    return [str(p) for p in sorted((data / "stereo_dev").glob("dev-test-*")) if not p.name.endswith("synth")]


def _check_reproduced(run: Path, data: Path, tmp_path: Path, capsys) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    for name in ("config.json", "metrics.csv", "thresholds.json", "norm.npz", "checkpoints/selected.pt",
                 "checkpoints/stage1_best.pt"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(metrics["cost/epochs"]))
    assert {r["stage"] for r in rows} == {"1", "2"}
    # The machine that trained it (here, this one: the suite's workers run on it), for readers who
    # compare numbers across machines.
    import torch

    from seld.predict import machine_record

    here = machine_record("cpu")
    assert {k: metrics[k] for k in here} == here
    assert here["machine/kind"].startswith(f"{torch.backends.cpu.get_cpu_capability()} ")
    for flags, prefix in (([], "test_pp"), (["--threshold", "0.5"], "test")):
        pred = tmp_path / f"pred_{prefix}"
        assert main(["predict", str(run), *_test_dirs(data), "--out", str(pred), *flags]) == 0
        capsys.readouterr()
        assert main(["evaluate", str(data / "metadata_dev"), str(pred), "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        # Exact on every CPU, on the machine that trained: `seld predict` computes a clip's features
        # with the store's function and shapes (log_mel's per-clip matmul) and rounds them to the
        # store's dtype, runs the network on the same batches (the run's batch size, split order)
        # with the run's precision decision, and decodes and scores with the same functions.
        for key in ("f20", "doae_cd", "rde_cd", "dist_err_cd"):
            assert got[key] == metrics[f"{prefix}/{key}"], (prefix, key)
    # One validation measure: the selected epoch's per-epoch validation (metrics.csv: what selected
    # it) is metrics.json's val/f20 and val/best_f20, and the official scorer's on the selected
    # checkpoint's written validation predictions, to the last digit (with two workers too: each
    # scores its slice batched per split, and on CPU a clip's outputs do not depend on its batch).
    selected = next(r for r in rows if int(r["epoch"]) == metrics["selected_epoch"])
    assert float(selected["val/f20"]) == metrics["val/f20"] == metrics["val/best_f20"]
    assert main(["evaluate", str(data / "metadata_dev"), str(run / "predictions_val"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["f20"] == metrics["val/f20"]
    # The run's own prediction folder holds the same CSVs as `seld predict` wrote.
    for path in sorted((tmp_path / "pred_test_pp").glob("*.csv")):
        assert path.read_text() == (run / "predictions" / path.name).read_text()
    # The breakdowns the run scored in memory (store rows) are those of its predictions/ CSVs against
    # the dataset's reference CSVs, key for key and exactly.
    assert main(["evaluate", str(data / "metadata_dev"), str(run / "predictions"), "--json", "--breakdowns"]) == 0
    got = json.loads(capsys.readouterr().out)["breakdowns"]
    recorded = {k: v for k, v in metrics.items()
                if k.startswith(("test_pp/site/", "test_pp/distance/", "test_pp/polyphony/")) or "_ci_" in k}
    assert got and got == recorded


def test_train_predict_evaluate_one_worker(smoke_run, smoke_data, tmp_path, capsys):
    _check_reproduced(smoke_run, smoke_data, tmp_path, capsys)


def test_train_predict_evaluate_two_workers(smoke_store, smoke_data, ray_session, tmp_path, capsys):
    run = tmp_path / "run2"
    _train(smoke_store, run, "--workers", "2")
    _check_reproduced(run, smoke_data, tmp_path, capsys)


def test_same_seed_same_metrics_csv(smoke_run, smoke_store, ray_session, tmp_path):
    again = tmp_path / "again"
    _train(smoke_store, again, "--workers", "1")

    def table(run):
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS}
                for r in csv.DictReader((run / "metrics.csv").open())]

    assert table(again) == table(smoke_run)
    assert (again / "thresholds.json").read_text() == (smoke_run / "thresholds.json").read_text()


def test_existing_run_needs_resume(smoke_run, smoke_store, capsys):
    assert main(["train", str(smoke_store), "--preset", "smoke", "--out", str(smoke_run)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_streaming_mode_two_workers(smoke_store, ray_session, tmp_path):
    """Stores too large to materialise are streamed every epoch: each worker reads its own share by row group."""
    from seld.config import preset_config
    from seld.train import run_training

    cfg = preset_config("smoke", {"data.materialize": False, "train.num_workers": 2, "train.stages": "stage1"})
    metrics = run_training(cfg, smoke_store, tmp_path / "run")
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert len(rows) == metrics["cost/epochs"] == 1
    assert int(rows[0]["train/clips"]) > 0 and metrics["test/f20"] is not None
