"""The sweep on the smoke preset: Optuna (seeded TPE, journal file) + ASHA over Tune trials,
trials.csv / best config / plots, and --resume that does not retrain finished trials."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from seld.config import apply_overrides, parse_set_args, preset_config
from seld.errors import UserError
from seld.study import Options, Param, Sweep, run_sweep

SPACE = {"loss.alpha": Param("loguniform", 0.5, 2.0), "model.n_conformer_layers": Param("int", 0, 1)}
SWEEP = Sweep("sweep", "smoke", SPACE, n_trials=2, seed=0, grace_period=1)


def test_param_grid_and_checks():
    assert Param("int", 0, 4).grid(3) == [0, 2, 4]
    assert Param("loguniform", 1.0, 4.0).grid(3) == pytest.approx([1.0, 2.0, 4.0])
    assert Param("choice", choices=(32, 64)).grid() == [32, 64]
    with pytest.raises(ValueError, match="low < high"):
        Param("uniform", 1.0, 1.0)


def _starts(out: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (out / "runs").glob("*/attempts.jsonl"))


@pytest.mark.ray
@pytest.mark.slow
def test_smoke_sweep_outputs_and_resume(tmp_path, smoke_data, ray_session):
    from seld.synth import dataset_hash

    out = tmp_path / "sweep"
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"synth-{dataset_hash(preset_config('smoke').synth)}").symlink_to(smoke_data, target_is_directory=True)
    run_sweep(SWEEP, Options(out=out, preset="smoke", cache_dir=cache, trials=1, max_retries=0))
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 1 and _starts(out) == 1
    assert {"param/loss.alpha", "param/model.n_conformer_layers", "value", "epochs", "status"} <= set(trials.columns)
    assert trials["value"].notna().all() and (trials["epochs"] >= 1).all()
    finished = trials[trials["status"] == "finished"]
    assert len(finished) >= 1 and finished["val_pp/f20"].notna().all()  # thresholds fitted per trial
    best = json.loads((out / "best_config.json").read_text())
    assert best["value"] == pytest.approx(trials["value"].max())
    # The best overrides are ready for --set / a study variant.
    sets = parse_set_args([a.removeprefix("--set ") for a in best["set_args"]])
    cfg = apply_overrides(preset_config("smoke"), sets)
    assert cfg.model.n_conformer_layers == best["overrides"]["model.n_conformer_layers"]
    assert (out / "optimization_history.png").exists() and (out / "optuna.journal").exists()

    with pytest.raises(UserError, match="--resume"):
        run_sweep(SWEEP, Options(out=out, preset="smoke", cache_dir=cache, trials=2))
    # Resume to 2 trials: one new training start, the finished trial is not rerun.
    run_sweep(SWEEP, Options(out=out, preset="smoke", cache_dir=cache, trials=2, resume=True, max_retries=0))
    assert _starts(out) == 2
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2 and trials["trial_id"].nunique() == 2
    assert json.loads((out / "best_config.json").read_text())["value"] == pytest.approx(trials["value"].max())
