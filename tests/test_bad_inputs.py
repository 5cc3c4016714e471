"""Bad inputs not already covered by the module tests (docs/bad-inputs.md lists them all): each gives
one line naming the file or field, a non-zero exit, and leaves what was already written intact."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from seld.cli import main
from seld.errors import DataError
from seld.predict import load_model
from seld.runfolder import CHECKPOINT_DIR, SELECTED, save_model_file


def _digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative path -> hex)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no message"
    last = err[-1]
    assert "Traceback" not in "\n".join(err)
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    return last


def _dataset_with(smoke_data: Path, root: Path, splits: list[str]) -> Path:
    """A dataset root holding only `splits` of the smoke data (split folders linked, not copied)."""
    for top in ("stereo_dev", "metadata_dev"):
        (root / top).mkdir(parents=True)
        for split in splits:
            (root / top / split).symlink_to(smoke_data / top / split)
    return root


# --- Config -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("setting", "fragments"), [
    ("model.n_conformr_layers=2", ("model.n_conformr_layers", "did you mean model.n_conformer_layers")),
    ("train.batch_size=big", ("train.batch_size", "expected an integer")),
    ("model.d_model", ("model.d_model", "expected key=value")),
])
def test_bad_set_fails_before_anything_is_written(smoke_store, tmp_path, capsys, setting, fragments):
    out = tmp_path / "run"
    assert main(["train", str(smoke_store), "--preset", "smoke", "--out", str(out), "--set", setting]) == 2
    _one_line_error(capsys, *fragments)
    assert not out.exists()


def test_resume_with_a_different_set_is_refused_not_ignored(smoke_store, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    from seld.config import preset_config
    from seld.runfolder import save_json

    save_json(preset_config("smoke"), run / "config.json")
    (run / "metrics.csv").write_text("epoch\n0\n")
    before = _digest(run)
    assert main(["train", str(smoke_store), "--preset", "smoke", "--out", str(run), "--resume",
                 "--set", "model.d_model=64"]) == 2
    _one_line_error(capsys, str(run / "config.json"), "model.d_model=64", "--resume")
    assert _digest(run) == before


def test_resume_of_a_run_with_a_corrupt_config_json(smoke_store, tmp_path, capsys):
    run = tmp_path / "run"
    (run / CHECKPOINT_DIR).mkdir(parents=True)
    (run / "config.json").write_text('{"preset": "smoke", "model": {')  # cut short
    (run / CHECKPOINT_DIR / "stage1_best.pt").write_bytes(b"weights")
    before = _digest(run)
    assert main(["train", str(smoke_store), "--out", str(run), "--resume"]) == 2
    _one_line_error(capsys, str(run / "config.json"), "cannot read config JSON")
    assert _digest(run) == before


# --- Feature store ------------------------------------------------------------------------------------
def test_store_of_another_feature_config(smoke_store, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(smoke_store), "--preset", "smoke", "--out", str(out), "--set",
                 "features.n_mels=32"]) == 2
    _one_line_error(capsys, str(smoke_store), "another feature config", "n_mels")
    assert not out.exists()  # checked before the run folder is made or Ray is started


@pytest.mark.ray
def test_forced_materialise_of_a_share_larger_than_the_memory_is_one_line(smoke_store, ray_session, tmp_path,
                                                                          capsys):
    out = tmp_path / "run"
    assert main(["train", str(smoke_store), "--preset", "smoke", "--out", str(out), "--set",
                 "data.materialize=true", "--set", "data.worker_memory_gib=0.0001"]) == 2
    _one_line_error(capsys, "data.materialize=true", "GiB of store rows", "data.materialize=false")
    assert not out.exists()  # refused before the run folder is made


def test_missing_split_folder(smoke_data, tmp_path, capsys):
    data = _dataset_with(smoke_data, tmp_path / "data", ["dev-train-tau"])
    # Asking for a split whose folder is missing is an error, not a silent drop.
    store = tmp_path / "store"
    assert main(["features", str(data), "--out", str(store), "--splits", "dev-train-tau", "dev-test-tau"]) == 2
    _one_line_error(capsys, str(data), "dev-test-tau")
    assert not store.exists()
    # A store built without the real test folders: training names the store, the missing set and
    # the splits the store holds, before it creates the run folder.
    assert main(["features", str(data), "--out", str(store), "--procs", "1"]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["train", str(store), "--preset", "smoke", "--out", str(out)]) == 2
    _one_line_error(capsys, str(store), "no rows for the 'test' set", "dev-train-tau")
    assert not out.exists()


def test_killed_extraction_resumes_to_the_uninterrupted_store(smoke_data, smoke_store, tmp_path):
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "seld", "features", str(smoke_data), "--out", str(out), "--procs", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    folder = out / smoke_store.name
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(folder.glob("shard-*.parquet")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.parquet")}
    assert kept and not (folder / "manifest.json").exists(), "the extraction finished before the kill"
    assert main(["features", str(smoke_data), "--out", str(out), "--procs", "1"]) == 0
    # Finished shards were kept as they were; the result equals the uninterrupted store.
    assert {n: (folder / n).stat().st_mtime_ns for n in kept} == kept
    want = sorted(p.name for p in smoke_store.glob("shard-*.parquet"))
    assert sorted(p.name for p in folder.glob("shard-*.parquet")) == want
    assert not list(folder.glob(".shard-*"))
    for name in want:
        assert pq.read_table(folder / name).equals(pq.read_table(smoke_store / name)), name


def test_killed_dataset_generation_resumes_to_the_uninterrupted_dataset(smoke_data, tmp_path):
    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in (".wav", ".csv", ".json")
                and p.name != "synth.json"}

    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "seld", "synth", "--preset", "smoke", "--out", str(out), "--workers", "1",
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(out.rglob("*.wav"))) < 6:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [p for p in out.rglob("*.wav") if not p.name.startswith(".")]
    record = json.loads((out / "synth.json").read_text()) if (out / "synth.json").exists() else {}
    assert done and not record.get("complete"), "the generation finished before the kill"
    kept = {p: p.stat().st_mtime_ns for p in done if "foa" in p.relative_to(out).parts[:1]}
    assert main(["synth", "--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
    # Rendered recordings finished before the kill were kept, not redone; the result is
    # byte-identical to an uninterrupted run.
    assert {p: p.stat().st_mtime_ns for p in kept if p.exists()} == kept
    assert digest(out) == digest(smoke_data)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


# --- Checkpoints ----------------------------------------------------------------------------------------
def test_full_disk_during_a_checkpoint_write_keeps_the_previous_file(tmp_path):
    from seld.config import preset_config, to_dict
    from seld.model import build_model

    cfg = preset_config("smoke")
    model = build_model(cfg.model, n_mels=cfg.features.n_mels)
    path = tmp_path / "run" / CHECKPOINT_DIR / SELECTED
    save_model_file(path, model.state_dict(), json.dumps(to_dict(cfg)), None, None, {"epoch": 0})
    before = path.read_bytes()
    # The atomic writer's temporary file lands on a full device: writes fail with ENOSPC.
    tmp = path.with_name(path.name + ".tmp")
    tmp.symlink_to("/dev/full")
    newer = {k: v + 1 for k, v in model.state_dict().items()}
    with pytest.raises(DataError) as err:
        save_model_file(path, newer, "{}", None, None, {"epoch": 1})
    msg = str(err.value)
    assert str(path) in msg and "cannot write the checkpoint" in msg and "previous file is kept" in msg
    assert "\n" not in msg
    assert path.read_bytes() == before and not os.path.lexists(tmp)
    assert load_model(path) is not None  # still a valid checkpoint
    # A first write that fails leaves nothing behind (no half file a later run could trust).
    fresh = tmp_path / "other" / "stage1_best.pt"
    fresh.parent.mkdir()
    fresh.with_name(fresh.name + ".tmp").symlink_to("/dev/full")
    with pytest.raises(DataError, match="nothing was written"):
        save_model_file(fresh, newer, "{}", None, None, {})
    assert list(fresh.parent.iterdir()) == []


@pytest.mark.ray
@pytest.mark.slow
def test_full_disk_during_training_is_one_line_naming_the_checkpoint(smoke_store, ray_session, tmp_path, capsys):
    run = tmp_path / "run"
    (run / CHECKPOINT_DIR).mkdir(parents=True)
    (run / CHECKPOINT_DIR / "stage1_best.pt.tmp").symlink_to("/dev/full")
    assert main(["train", str(smoke_store), "--preset", "smoke", "--out", str(run),
                 "--set", "train.max_failures=0", "--stages", "stage1"]) == 2
    _one_line_error(capsys, "training run", str(run / CHECKPOINT_DIR / "stage1_best.pt"),
                    "cannot write the checkpoint")
    # What was written before the failed write is there (config, normalisation) and no half file.
    assert (run / "config.json").is_file() and (run / "norm.npz").is_file()
    assert list((run / CHECKPOINT_DIR).iterdir()) == []


# --- One line per error, as docs/bad-inputs.md promises ------------------------------------------------------------
def _tiny_run(root: Path) -> Path:
    """A run folder with an untrained smoke model and thresholds (enough for `seld predict`)."""
    import numpy as np

    from seld.config import preset_config, to_dict
    from seld.model import build_model
    from seld.runfolder import save_thresholds

    cfg = preset_config("smoke")
    run = root / "run"
    model = build_model(cfg.model, n_mels=cfg.features.n_mels)
    save_model_file(run / CHECKPOINT_DIR / SELECTED, model.state_dict(), json.dumps(to_dict(cfg)),
                    np.zeros((2, 1, 64), np.float32), np.full((2, 1, 64), 20.0, np.float32), {"epoch": 0})
    save_thresholds(run / "thresholds.json", np.full(13, 0.5))
    return run


def _write_wav(path: Path, n_channels: int) -> None:
    import numpy as np
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    audio = 0.1 * np.random.default_rng(0).standard_normal((24_000 * 5, n_channels)).astype(np.float32)
    sf.write(path, audio.squeeze(), 24_000, subtype="PCM_16")


def _seld(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`seld ...` as a user runs it: its own process, so stdout and stderr are exactly what they see."""
    return subprocess.run([sys.executable, "-m", "seld", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_predict_on_a_folder_with_one_mono_wav_prints_one_line(tmp_path):
    run = _tiny_run(tmp_path)
    _write_wav(tmp_path / "wavs" / "mono.wav", 1)
    done = _seld("predict", str(run), "wavs", "--out", "pred", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    # The folders as the parser handed them on: absolute (issue 25).
    wavs, pred = tmp_path / "wavs", tmp_path / "pred"
    assert done.stderr.splitlines() == [
        f"seld predict: error: {wavs}/mono.wav: expected a stereo (2-channel) file, got 1 channel(s) (no CSV written)"]
    # With a good file beside it: the good CSV is written, the one line names the bad file, exit 1.
    _write_wav(tmp_path / "wavs" / "stereo.wav", 2)
    done = _seld("predict", str(run), "wavs", "--out", "pred", cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == "" and (tmp_path / "pred" / "stereo.csv").is_file()
    assert done.stderr.splitlines() == [
        f"seld predict: error: 1 of 2 wav files failed, the other 1 CSV(s) are written to {pred}: "
        f"{wavs}/mono.wav: expected a stereo (2-channel) file, got 1 channel(s)"]


def test_features_on_bad_input_prints_its_bar_then_one_line(tmp_path):
    from seld import labels

    for stem, n_channels in (("fold3_room4_mix001", 2), ("fold3_room4_mix002", 1)):
        _write_wav(tmp_path / "data/stereo_dev/dev-train-tau" / f"{stem}.wav", n_channels)
        labels.write_csv(tmp_path / "data/metadata_dev/dev-train-tau" / f"{stem}.csv", labels.empty_events())
    done = _seld("features", "data", "--out", "store", "--procs", "1", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    # The progress bar redraws itself with carriage returns; apart from it, one line.
    lines = [x for x in re.split(r"[\r\n]+", done.stderr) if x.strip() and not x.startswith("features:")]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"seld features: error: 1 input file(s) skipped, store {tmp_path}/store/features-")
    assert lines[0].endswith("data/stereo_dev/dev-train-tau/fold3_room4_mix002.wav: expected a stereo "
                             "(2-channel) file, got 1 channel(s)")


def test_did_you_mean_repeats_the_key_the_user_typed(tmp_path, capsys):
    want = "unknown config key 'features.n_mel'; did you mean features.n_mels?"
    assert main(["features", str(tmp_path), "--out", str(tmp_path / "store"), "--set", "features.n_mel=32"]) == 2
    assert _one_line_error(capsys, want) == f"seld features: error: {want}"
    assert main(["train", str(tmp_path), "--preset", "smoke", "--out", str(tmp_path / "run"),
                 "--set", "features.n_mel=32"]) == 2
    assert _one_line_error(capsys, want) == f"seld train: error: {want}"
    # A bare field name is read as features.<name>; a key of another section is refused, named.
    assert main(["features", str(tmp_path), "--out", str(tmp_path / "store"), "--set", "n_mel=32"]) == 2
    _one_line_error(capsys, want)
    assert main(["features", str(tmp_path), "--out", str(tmp_path / "store"), "--set", "model.d_model=8"]) == 2
    _one_line_error(capsys, "--set model.d_model: seld features only takes features.* keys")
    assert not (tmp_path / "store").exists() and not (tmp_path / "run").exists()
    # The study scripts: the same message, before anything is written.
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "studies/ablation.py"),
                           "--preset", "smoke", "--out", "abl", "--set", "features.n_mel=32"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.splitlines() == [f"ablation.py: error: {want}"]
    assert not (tmp_path / "abl").exists()


# --- Paths as typed (issue 25) ------------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "typed", "kind"), [
    (["train", "stor", "--preset", "smoke", "--out", "run"], "store stor", "folder"),
    (["train", ".", "--out", "run", "--init-checkpoint", "runs/a/stage1_best.pt"],
     "--init-checkpoint runs/a/stage1_best.pt", "file"),
    (["features", "dat", "--out", "store"], "dataset root dat", "folder"),
    (["predict", "rn", ".", "--out", "pred"], "run folder rn", "folder"),
    (["predict", ".", "wavs", "--out", "pred"], "wav folder wavs", "folder"),
    (["evaluate", "data/metadata_dev", "."], "reference folder data/metadata_dev", "folder"),
    (["convert-foa", "foa", "--out", "data", "--clips", "1"], "FOA root foa", "folder"),
])
def test_a_path_that_does_not_exist_is_one_line_naming_it_as_typed(tmp_path, monkeypatch, capsys, argv, typed, kind):
    """A relative path that is not there (a typo, the wrong folder, a path of another node): one line
    with the path as typed and the folder it was looked up from, exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    _one_line_error(capsys, f"seld {argv[0]}: error: {typed}: does not exist, expected an existing {kind} "
                            f"(looked up from {tmp_path})")
    assert not list(tmp_path.iterdir())


def test_an_absolute_path_that_does_not_exist_names_the_machine_and_a_file_is_not_a_store(tmp_path, capsys):
    import socket

    assert main(["train", str(tmp_path / "store"), "--out", str(tmp_path / "run")]) == 2
    _one_line_error(capsys, f"store {tmp_path / 'store'}: does not exist, expected an existing folder "
                            f"(on this machine, {socket.gethostname()})")
    (tmp_path / "store").write_text("not a store")
    assert main(["train", str(tmp_path / "store"), "--out", str(tmp_path / "run")]) == 2
    _one_line_error(capsys, f"store {tmp_path / 'store'}: is a file, expected an existing folder")
    assert not (tmp_path / "run").exists()


def test_study_input_paths_are_checked_before_anything_starts(tmp_path, monkeypatch, capsys):
    """The study scripts' --data-root, --synth-root, --cluster and --readme: one line, exit 2, before
    anything starts (parsing), nothing written."""
    import importlib.util

    from seld.study.cli import main as study_main

    spec = importlib.util.spec_from_file_location("ablation_script", Path(__file__).resolve().parents[1] / "studies/ablation.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # its __main__ block not run
    monkeypatch.chdir(tmp_path)
    for flags, typed in ((["--data-root", "DCASE2025"], "--data-root DCASE2025"),
                         (["--data-root", ".", "--synth-root", "SYNTH"], "--synth-root SYNTH"),
                         (["--cluster", "cluster/gpu.yaml"], "--cluster cluster/gpu.yaml"),
                         (["--report-only", "--readme", "README.md"], "--readme README.md")):
        kind = "file" if flags[-2] in ("--cluster", "--readme") else "folder"
        assert study_main(script.STUDIES, ["--preset", "smoke", *flags], description="", example="") == 2
        _one_line_error(capsys, f": error: {typed}: does not exist, expected an existing {kind} (looked up from {tmp_path})")
        assert not list(tmp_path.iterdir())


def test_typed_paths_become_absolute_where_they_enter(tmp_path, monkeypatch):
    """What the parsers hand on is absolute (Ray's workers run in other folders); URIs stay URIs;
    a --set of a path field too; nothing else is touched."""
    import argparse

    from seld.cli import build_parser
    from seld.cli.train import build_config
    from seld.study.cli import add_arguments, options_from_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "store").mkdir()
    args = build_parser().parse_args(["train", "store", "--preset", "smoke", "--out", "runs/../run",
                                      "--set", "train.init_checkpoint=a/b.pt", "--set", "train.batch_size=4"])
    assert (args.store, args.out) == (str(tmp_path / "store"), tmp_path / "run")
    assert build_parser().parse_args(["train", "s3://b/store", "--out", "run"]).store == "s3://b/store"
    assert build_parser().parse_args(["features", ".", "--out", "gs://b/s"]).out == "gs://b/s"
    cfg = build_config(args)
    assert (cfg.train.init_checkpoint, cfg.train.batch_size) == (str(tmp_path / "a/b.pt"), 4)
    parser = argparse.ArgumentParser()
    add_arguments(parser, ["smoke"], "smoke")
    opts = options_from_args(parser.parse_args(["--out", "abl", "--cache-dir", "cache", "--storage", "s3://b/p",
                                                "--set", "train.init_checkpoint=c.pt"]), "ablation")
    assert (opts.out, opts.cache_dir, opts.storage) == (tmp_path / "abl", tmp_path / "cache", "s3://b/p")
    assert opts.sets == {"train.init_checkpoint": str(tmp_path / "c.pt")}
    opts = options_from_args(parser.parse_args(["--storage", "shared"]), "ablation")
    assert (opts.storage, opts.out) == (str(tmp_path / "shared"), tmp_path / "shared" / "results" / "ablation")
    assert options_from_args(parser.parse_args([]), "ablation").out == tmp_path / "results" / "ablation"
