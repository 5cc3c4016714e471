"""seld/predict.py: windows and stitching of long recordings, bad wavs, checkpoint checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from seld import labels
from seld.cli import main
from seld.config import preset_config, to_dict
from seld.errors import DataError
from seld.model import build_model
from seld.predict import load_model, predict_dir, stitch, window_audio
from seld.runfolder import CHECKPOINT_DIR, SELECTED, save_model_file, save_thresholds


def test_windows_and_stitching_follow_the_alignment_rule():
    audio = np.arange(2 * 290_000, dtype=np.float32).reshape(2, -1)
    windows, n_frames = window_audio(audio, 120_000)
    assert windows.shape == (3, 2, 120_000)
    assert n_frames == 121  # ceil(290000 / 2400)
    np.testing.assert_array_equal(windows[1, :, 0], audio[:, 120_000])
    assert windows[2, 0, 50_000:].max() == 0  # zero padding after the end
    outputs = np.arange(3 * 50).reshape(3, 50)[..., None]
    assert stitch(outputs, n_frames)[:, 0].tolist() == list(range(121))


@pytest.fixture()
def tiny_run(tmp_path):
    cfg = preset_config("smoke")
    torch.manual_seed(0)
    model = build_model(cfg.model, n_mels=cfg.features.n_mels)
    run = tmp_path / "run"
    mean = np.zeros((2, 1, 64), np.float32)
    std = np.full((2, 1, 64), 20.0, np.float32)
    save_model_file(run / CHECKPOINT_DIR / SELECTED, model.state_dict(), json.dumps(to_dict(cfg)), mean, std,
                    {"epoch": 0})
    save_thresholds(run / "thresholds.json", np.full(13, 0.01))
    return run


def test_predict_long_recording_and_bad_files(tiny_run, tmp_path, capsys):
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    rng = np.random.default_rng(0)
    sf.write(wavs / "long.wav", (0.1 * rng.standard_normal((12 * 24_000, 2))).astype(np.float32), 24_000,
             subtype="PCM_16")
    sf.write(wavs / "mono.wav", np.zeros(24_000 * 5, np.float32), 24_000, subtype="PCM_16")
    (wavs / "broken.wav").write_bytes(b"RIFF\x00\x00")
    report = predict_dir(tiny_run, wavs, tmp_path / "pred")
    assert [p.name for p in report.written] == ["long.csv"]
    assert sorted(p.name for p, _ in report.errors) == ["broken.wav", "mono.wav"]
    assert any("stereo" in msg for _, msg in report.errors)
    ev = labels.read_prediction_csv(tmp_path / "pred" / "long.csv")
    assert len(ev) > 0 and ev["frame"].max() <= 119 and ev["frame"].max() >= 100  # 12 s = 120 frames
    # The CLI still writes the good file and exits non-zero, naming the bad ones.
    assert main(["predict", str(tiny_run), str(wavs), "--out", str(tmp_path / "pred2"), "--threshold", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "mono.wav" in err and "broken.wav" in err
    assert (tmp_path / "pred2" / "long.csv").is_file()


def test_checkpoint_of_another_model_config_is_named(tiny_run, tmp_path):
    path = tiny_run / CHECKPOINT_DIR / SELECTED
    blob = torch.load(path, weights_only=True)
    cfg = to_dict(preset_config("smoke", {"model.d_model": 64}))
    blob["config"] = json.dumps(cfg)
    torch.save(blob, tmp_path / "other.pt")
    with pytest.raises(DataError, match="other.pt: checkpoint does not fit"):
        load_model(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="junk.pt: not a readable checkpoint"):
        load_model(tmp_path / "junk.pt")
    assert main(["predict", str(tmp_path / "nothing"), str(tmp_path), "--out", str(tmp_path / "p")]) == 2
