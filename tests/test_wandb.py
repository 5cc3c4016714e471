"""`seld train --wandb`: one offline W&B run in RUN/wandb whose history and summary match the run's
metrics.csv / metrics.json, and no API key written anywhere under the run folder.

The offline run is read from its `.wandb` file (tests/wandb_records.py).
"""

from __future__ import annotations

import csv
import json
import math

import pytest
from wandb_records import items as _items
from wandb_records import read_wandb_records

from seld.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CANARY = "seldcanary0123456789abcdef0123456789abcdef"  # 40 characters, the shape of a real key


def test_wandb_offline_run_matches_metrics_and_holds_no_key(smoke_store, ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", CANARY)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # restored after the test (train sets it per run)
    run = tmp_path / "run"
    assert main(["train", str(smoke_store), "--preset", "smoke", "--out", str(run), "--wandb",
                 "--wandb-group", "canary-test"]) == 0

    metrics = json.loads((run / "metrics.json").read_text())
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    logs = sorted(run.glob("wandb/**/offline-run-*/*.wandb"))
    assert len(logs) == 1, logs  # one W&B run per training run, inside the run folder
    records = read_wandb_records(logs[0])
    kinds = [r.WhichOneof("record_type") for r in records]

    # Config and group.
    run_rec = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_rec.run_group == "canary-test" and run_rec.project == "seld"
    config = _items(run_rec.config.update)
    saved = json.loads((run / "config.json").read_text())
    assert {k: config[k] for k in saved} == saved

    # History: one row per epoch of metrics.csv, with its values.
    history = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    epoch_rows = [h for h in history if "epoch" in h]
    assert [int(h["_step"]) for h in epoch_rows] == [int(r["epoch"]) for r in rows] == list(range(len(rows)))
    for h, r in zip(epoch_rows, rows, strict=True):
        for key, text in r.items():
            if text not in ("", None):
                assert h[key] == pytest.approx(float(text), rel=1e-12), (r["epoch"], key)
    assert len(history) == len(rows), "a history row that is not an epoch"

    # Summary: the last value of each key equals metrics.json (test and test_pp figures included).
    summary: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(_items(r.summary.update))
    assert "exit" in kinds  # the run was finished cleanly
    numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    assert {"test/f20", "test/doae_cd", "test/rde_cd", "test/dist_err_cd", "test_pp/f20"} <= numeric.keys()
    for key, value in numeric.items():
        got = summary[key]
        assert (math.isnan(value) and math.isnan(got)) or got == pytest.approx(value, rel=1e-12), key
    assert summary["test_pp/classwise/_type"] == "table-file"  # the per-class table
    assert summary["test_pp/classwise/nrows"] == len(metrics["classwise"]["test_pp"])

    # The canary key is in no file under the run folder.
    hits = [p for p in run.rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]
    assert not hits, hits


def test_finished_offline_run_is_complete_on_disk_at_return(tmp_path, monkeypatch):
    """`finish_wandb_run` returns only once the offline `.wandb` log holds every record: read right
    after it, each run has its history row (the logged table) and its exit record. A plain
    `run.finish()` returns before wandb-core closes the file (the sweep report's missing table)."""
    import pandas as pd
    import wandb

    from seld.wandb_log import finish_wandb_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    for i in range(8):
        folder = tmp_path / f"r{i}"
        folder.mkdir()
        run = wandb.init(project="seld", group="finish-test", dir=str(folder), mode="offline",
                         reinit="create_new")
        run.log({"trials": wandb.Table(dataframe=pd.DataFrame({"a": [1, 2], "b": [0.5, i]}))})
        finish_wandb_run(run)
        (log,) = folder.glob("wandb/offline-run-*/*.wandb")
        records = read_wandb_records(log)
        kinds = [r.WhichOneof("record_type") for r in records]
        history = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
        assert kinds[-1] == "exit" and history[0]["trials/_type"] == "table-file", (i, kinds)
