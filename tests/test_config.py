"""Config: presets, dotted overrides (the one helper behind --set, variants and search spaces), JSON."""

from __future__ import annotations

import json
import re

import pytest

from seld.config import (
    BASELINE_OVERRIDES,
    PRESETS,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_hash,
    flatten,
    from_dict,
    parse_set_args,
    preset_config,
    to_dict,
)
from seld.runfolder import load_experiment, save_json


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_and_round_trips_through_json(name, tmp_path):
    cfg = preset_config(name)
    assert cfg.preset == name
    save_json(cfg, tmp_path / "config.json")
    assert load_experiment(tmp_path / "config.json") == cfg
    assert config_hash(load_experiment(tmp_path / "config.json")) == config_hash(cfg)


def test_paper_defaults_are_the_papers():
    cfg = preset_config("paper")
    assert (cfg.loss.alpha, cfg.loss.beta) == (1.0, 2.0)
    assert (cfg.train.stage1.epochs, cfg.train.stage1.lr) == (20, 1e-4)
    assert (cfg.train.stage2.lr, cfg.train.stage2.patience) == (2e-5, 20)
    assert cfg.model.fusion == "aff" and cfg.model.output_format == "accdoa"
    assert cfg.features.n_mels == 64 and cfg.features.hop_length == 480


def test_string_overrides_are_coerced_to_the_field_types():
    cfg = apply_overrides(
        ExperimentConfig(),
        parse_set_args(["model.n_conformer_layers=2", "data.val_rooms=3,7", "train.stage2.patience=none",
                        "model.channel_attention=false", "loss.beta=0.5"]),
    )
    assert cfg.model.n_conformer_layers == 2
    assert cfg.data.val_rooms == (3, 7)
    assert cfg.train.stage2.patience is None
    assert cfg.model.channel_attention is False
    assert cfg.loss.beta == 0.5


def test_overrides_of_related_fields_are_checked_together():
    cfg = apply_overrides(ExperimentConfig(), {"model.resnet_channels": (8, 16), "model.freq_pool": (8, 8)})
    assert cfg.model.resnet_channels == (8, 16)
    with pytest.raises(ConfigError, match="freq_pool"):
        apply_overrides(ExperimentConfig(), {"model.resnet_channels": (8, 16)})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.n_conformr_layers": 2}, "did you mean model.n_conformer_layers"),
        ({"model.fusion": "sum"}, r"'sum' is not one of \('aff', 'add', 'concat', 'early'\)"),
        ({"train.batch_size": "big"}, "train.batch_size: expected an integer"),
        ({"train.batch_size": 0}, "train.batch_size: must be > 0"),
        ({"augment.swap_p": 1.5}, "augment.swap_p: probability 1.5"),
        ({"model.d_model.width": 3}, "is a value, not a section"),
        ({"synth.distance_m_range": (-1, 2)}, "synth.distance_m_range"),
        ({"model.name": "baseline"}, "baseline uses multi_accdoa"),
        ({"seed": -1}, r"seed: must be >= 0"),
    ],
)
def test_bad_overrides_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(ExperimentConfig(), overrides)


def test_set_argument_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_set_args(["model.d_model"])


def test_baseline_overrides_make_a_valid_config():
    cfg = apply_overrides(preset_config("local"), BASELINE_OVERRIDES)
    assert cfg.model.name == "baseline" and cfg.model.output_format == "multi_accdoa"
    assert cfg.augment.augmix_p == 0.0


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="smoke"):
        preset_config("tiny")


def test_from_dict_rejects_unknown_keys_with_their_path():
    data = to_dict(ExperimentConfig())
    data["model"]["widht"] = 3
    with pytest.raises(ConfigError, match="model.widht"):
        from_dict(ExperimentConfig, data)


def test_hash_changes_with_any_field_and_flatten_lists_dotted_keys():
    base = ExperimentConfig()
    assert config_hash(base) != config_hash(apply_overrides(base, {"loss.beta": 1.0}))
    flat = flatten(base)
    assert flat["train.stage1.lr"] == 1e-4
    assert json.dumps(to_dict(base))  # JSON-serialisable


def test_max_epochs_counts_the_trained_stages():
    cfg = preset_config("local")  # 12 stage-1 epochs, at most 8 in stage 2
    assert cfg.train.max_epochs == 20
    assert apply_overrides(cfg, {"train.stages": "stage1"}).train.max_epochs == 12
    assert apply_overrides(cfg, {"train.stages": "stage2"}).train.max_epochs == 8


@pytest.mark.parametrize("key, value, says", [
    ("features.hop_length", "240", "features.hop_length: the label alignment needs 20-ms frames (480 samples at 24000 Hz, 251 per clip), got 240"),
    ("features.clip_s", "10", "features.clip_s: the models and targets are built for 5-s clips (50 label frames of 0.1 s), got 10"),
])
def test_fixed_frame_grid_fields_refuse_other_values(key, value, says):
    """The clip length and the STFT hop are fixed by the label grid: another value is refused with a
    message that says why, instead of being silently ignored downstream."""
    with pytest.raises(ConfigError, match=re.escape(says)):
        preset_config("smoke", {key: value})


def test_stage_numbers_and_stage_config():
    train = preset_config("local").train
    assert train.stage_numbers == (1, 2)
    assert [apply_overrides(ExperimentConfig(), {"train.stages": s}).train.stage_numbers
            for s in ("stage1", "stage2")] == [(1,), (2,)]
    assert train.stage_config(1) is train.stage1 and train.stage_config(2) is train.stage2
