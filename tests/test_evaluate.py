"""seld/evaluate.py on the real smoke dataset and store (no Ray): the scores and breakdowns computed in
memory from store rows equal `seld evaluate --breakdowns` on the CSVs written from the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seld import data, evaluate
from seld.cli import main
from seld.model import build_model

GROUPS = ("site/tau", "site/sony", "distance/0-1.5m", "distance/1.5-3m", "distance/>=3m",
          "polyphony/1", "polyphony/2", "polyphony/3")


@pytest.fixture(scope="module")
def sets(smoke_store, smoke_config) -> tuple[data.ClipBatch, dict[str, data.ClipBatch]]:
    """(validation rows, {"test": real test rows, "synth_test": ...}) as a run plans and reads them."""
    plan = data.plan_run(smoke_config, smoke_store)
    reader = data.StoreReader(plan.layout)
    return (data.read_clips(reader, plan.sets["val"]),
            {n: data.read_clips(reader, plan.sets[n]) for n in ("test", "synth_test")})


def _outputs_near(events: list[np.ndarray], seed: int) -> np.ndarray:
    """ACCDOA outputs (n, 50, 13, 3) made from the references with noise: right and wrong directions,
    distances off by up to 1.6x, and spurious activity at 0.5-4 m."""
    rng = np.random.default_rng(seed)
    t = data.encode_targets(events, "accdoa")  # (n, 50, 13, 4): activity, x, y, distance m
    out = t[..., 1:].astype(np.float64)
    out[..., :2] += rng.normal(0.0, 0.2, out[..., :2].shape)
    active = t[..., 0] > 0
    out[..., 2] = np.where(active, t[..., 3] * rng.uniform(0.6, 1.6, active.shape),
                           rng.uniform(0.5, 4.0, active.shape))
    return out.astype(np.float32)


def _cli(capsys, ref_dir: Path, pred_dir: Path, *flags: str) -> dict:
    capsys.readouterr()
    assert main(["evaluate", str(ref_dir), str(pred_dir), "--json", "--breakdowns", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_in_memory_breakdowns_equal_seld_evaluate_on_the_written_csvs(sets, smoke_data, tmp_path, capsys):
    test = sets[1]["test"]
    assert set(test.splits) == {"dev-test-tau", "dev-test-sony"} and len(test) > 2
    score, preds = evaluate.score_outputs(_outputs_near(test.events, 0), test.events, "accdoa",
                                          np.linspace(0.35, 0.65, 13))
    names = [evaluate.prediction_csv_name(c) for c in test.clips]
    in_memory = evaluate.score_breakdowns(test.events, preds, test.splits, names, counters=score.counters)
    expected = {f"test_pp/{g}/{m}" for g in GROUPS for m in evaluate.BREAKDOWN_METRICS}
    expected |= {f"test_pp/{m}_ci_{e}" for m in evaluate.BREAKDOWN_METRICS for e in ("lo", "hi")}
    assert set(in_memory) == expected
    assert all(in_memory[f"test_pp/{g}/f20"] > 0 for g in GROUPS), in_memory  # every cell scores something
    # Reusing the run's counters is counting once: the same numbers as counting again, in any order.
    assert evaluate.score_breakdowns(test.events, preds, test.splits, names) == in_memory
    rev = slice(None, None, -1)
    assert evaluate.score_breakdowns(test.events[rev], preds[rev], test.splits[rev], names[rev],
                                     counters=score.counters[rev]) == in_memory

    pred_dir = tmp_path / "predictions"
    evaluate.write_predictions(pred_dir, test.clips, preds)
    cli = _cli(capsys, smoke_data / "metadata_dev", pred_dir)
    # Exact: the store's events are the reference CSVs' and the written events are what the CSVs hold.
    assert cli["breakdowns"] == in_memory
    assert {f"test_pp/{k}": cli[k] for k in evaluate.SCALAR_KEYS} == evaluate.flat_scores(score, "test_pp")
    assert _cli(capsys, smoke_data / "metadata_dev", pred_dir, "--prefix", "x")["breakdowns"] == {
        "x" + k.removeprefix("test_pp"): v for k, v in in_memory.items()}


def test_breakdowns_of_few_files_have_no_interval_and_undefined_scores_are_none(sets):
    test = sets[1]["test"]
    two = test.take([0, 1])
    out = evaluate.score_breakdowns(two.events, [e[:0] for e in two.events], two.splits, list(two.clips))
    assert not any("_ci_" in k for k in out)  # the jackknife needs more than 2 files
    assert all(out[k] is None for k in out if not k.endswith("/f20"))  # no match: no DOAE, no RDE
    assert evaluate.score_breakdowns([], [], [], []) == {}


@pytest.mark.slow
def test_evaluate_run_equals_seld_evaluate_on_its_prediction_folders(sets, smoke_config, smoke_data,
                                                                      tmp_path, capsys):
    """The end of a run without Ray: a smoke network's selected and stage-1 weights on the store rows."""
    val, tests = sets
    torch.manual_seed(0)
    net = build_model(smoke_config.model, n_mels=smoke_config.features.n_mels)
    selected = {"model": {k: v.clone() for k, v in net.state_dict().items()}, "meta": {"epoch": 3}}
    stage1 = {"model": {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                        for k, v in selected["model"].items()}, "meta": {"epoch": 1}}
    scores = evaluate.evaluate_run(net, selected, val, tests, smoke_config, None, None, stage1=stage1)
    m = scores.metrics
    assert (m["selected_epoch"], m["stage1_epoch"]) == (3, 1)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in selected["model"].items())
    assert m["thresholds"] == scores.thresholds.tolist() and len(m["thresholds"]) == 13
    for key in ("stage1_test", "val", "val_pp", "val_global", "test_global", "synth_test"):
        assert f"{key}/f20" in m, key
    for folder, prefix in (("predictions", "test_pp"), ("predictions_t05", "test")):
        evaluate.write_predictions(tmp_path / folder, tests["test"].clips, scores.predictions[folder])
        cli = _cli(capsys, smoke_data / "metadata_dev", tmp_path / folder, "--prefix", prefix)
        for k in evaluate.SCALAR_KEYS:
            assert cli[k] == m[f"{prefix}/{k}"], (prefix, k)
    # metrics.json's breakdown keys are those of the thresholds' predictions, exactly.
    assert cli["breakdowns"].keys().isdisjoint(m)
    cli = _cli(capsys, smoke_data / "metadata_dev", tmp_path / "predictions")
    assert cli["breakdowns"] == {k: m[k] for k in m if k.startswith(("test_pp/site/", "test_pp/distance/",
                                                                     "test_pp/polyphony/")) or "_ci_" in k}
