"""seld/train.py: run-folder rules, Ray sizing, and restore after a Ray Train worker is killed."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from seld.config import config_hash, preset_config, run_hash
from seld.errors import UserError
from seld.runfolder import CHECKPOINTED
from seld.study.session import default_num_cpus
from seld.train import prepare_run_dir, run_training

TIMING_COLUMNS = {"train/time_s", "train/data_wait_frac", "val/time_s", "elapsed_s"}  # metrics.csv columns that vary


def test_ray_gets_more_cpus_than_train_reserves():
    for n in (1, 2, 4):
        assert default_num_cpus(n) >= n + 2


def test_run_folder_rules(tmp_path):
    cfg = preset_config("smoke")
    with pytest.raises(UserError, match="nothing to resume"):
        prepare_run_dir(cfg, tmp_path / "a", resume=True)
    prepare_run_dir(cfg, tmp_path / "a", resume=False)
    with pytest.raises(UserError, match="--resume"):
        prepare_run_dir(cfg, tmp_path / "a", resume=False)
    prepare_run_dir(cfg, tmp_path / "a", resume=True)
    with pytest.raises(UserError, match="another config.*model"):
        prepare_run_dir(preset_config("smoke", {"model.d_model": 64}), tmp_path / "a", resume=True)
    # A bound is not the run's identity: --resume may change the time budget (config.json then
    # records the new one), and the run hash, which names study run folders, stays the same.
    longer = preset_config("smoke", {"train.time_budget_s": 7200})
    prepare_run_dir(longer, tmp_path / "a", resume=True)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["train"]["time_budget_s"] == 7200
    assert run_hash(longer) == run_hash(cfg) and config_hash(longer) != config_hash(cfg)
    assert run_hash(preset_config("smoke", {"train.stage1.lr": 1e-4})) != run_hash(cfg)


@pytest.mark.ray
@pytest.mark.slow
def test_worker_killed_after_an_epoch_restores_from_its_checkpoint(smoke_store, ray_session, tmp_path):
    from ray.util.state import list_actors

    cfg = preset_config("smoke", {"train.stage1.epochs": 3, "train.stage2.epochs": 1,
                                  "train.max_failures": 1, "train.time_budget_s": 3600.0})
    run = tmp_path / "run"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_training(cfg, smoke_store, run)))
    thread.start()
    killed = None
    deadline = time.time() + 240
    while time.time() < deadline and killed is None and thread.is_alive():
        time.sleep(0.5)
        rows = list(csv.DictReader((run / "metrics.csv").open())) if (run / "metrics.csv").exists() else []
        if rows:  # epoch 0 is checkpointed: kill this run's (only) Ray Train worker
            actors = list_actors(address=ray_session.get_runtime_context().gcs_address,
                                 filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if actors:
                killed = actors[0].pid
                os.kill(killed, signal.SIGKILL)
    thread.join(timeout=300)
    assert killed is not None, "the run finished before a worker could be killed"
    assert result, "training did not finish after the restore"
    epochs = [int(r["epoch"]) for r in csv.DictReader((run / "metrics.csv").open())]
    assert epochs == list(range(4))  # every epoch exactly once
    assert result["cost/epochs"] == 4
    # The restored run is the run without the kill (CPU, one worker): same epochs, same scores.
    straight = run_training(cfg, smoke_store, tmp_path / "straight")

    def table(path):
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS}
                for r in csv.DictReader((path / "metrics.csv").open())]

    assert table(run) == table(tmp_path / "straight")
    scores = [k for k in straight if k.split("/")[0] in ("val", "val_pp", "test", "test_pp", "stage1_test")]
    assert scores and {k: result[k] for k in scores} == {k: straight[k] for k in scores}
    assert (run / "thresholds.json").read_text() == (tmp_path / "straight" / "thresholds.json").read_text()


def _registered_epoch(run: Path) -> int | None:
    """The epoch of the last checkpoint Ray Train has registered for a run (RUN/checkpointed.json,
    written by the run's CheckpointMarker), or None before the first."""
    marker = run / CHECKPOINTED
    return json.loads(marker.read_text())["epoch"] if marker.exists() else None


def _signal_at_next_checkpoint(cmd: list[str], env: dict, run: Path, signum: int) -> tuple[int, str]:
    """Start `cmd`, send `signum` to its driver once Ray has registered a checkpoint newer than the
    run folder's, return (exit status, console)."""
    import subprocess

    before = _registered_epoch(run)
    # SIGINT at its default in the command, as in a terminal (a suite started in the background by a
    # non-interactive shell has it ignored, and so would the command).
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline, sent = time.time() + 300, False
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            epoch = _registered_epoch(run)
            if epoch is not None and (before is None or epoch > before):
                proc.send_signal(signum)
                sent = True
                break
        console = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    assert sent, console[-3000:]
    assert not (run / "metrics.json").exists(), "the run finished before the signal"
    return proc.returncode, console


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_on_seld_train_exits_130_sigterm_exits_1_and_resume_finishes_the_run(smoke_store, ray_session,
                                                                                     tmp_path):
    """`seld train`'s driver stopped twice once Ray has registered a checkpoint: SIGTERM (`ray job
    stop`, SLURM, timeout) exits 1 with no interrupt line; Ctrl-C (SIGINT) exits 130 with a line
    naming the run folder and --resume (Train V2's own SIGINT handler aborts the run, and the driver
    once exited 1 with no word); --resume then finishes the run, each epoch once."""
    import subprocess
    import sys

    run = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "seld", "train", str(smoke_store), "--preset", "smoke", "--out", str(run),
           "--set", "train.stage1.epochs=10"]  # epochs left after the signal: the job's actors outlive the driver a while
    rc, console = _signal_at_next_checkpoint(cmd, env, run, signal.SIGTERM)
    assert rc == 1 and "interrupted" not in console, console[-3000:]
    rc, console = _signal_at_next_checkpoint([*cmd[:-2], "--resume"], env, run, signal.SIGINT)
    assert rc == 130, console[-3000:]
    assert f"seld train: interrupted; run folder {run.resolve()} keeps its last finished epoch; the same command " \
           "with --resume continues it" in console, console[-3000:]
    done = subprocess.run([*cmd[:-2], "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    epochs = [int(r["epoch"]) for r in csv.DictReader((run / "metrics.csv").open())]
    assert epochs == list(range(len(epochs))) and len(epochs) == 10 + preset_config("smoke").train.stage2.epochs, epochs
    assert json.loads((run / "metrics.json").read_text())["status"] == "ok"


@pytest.mark.ray
@pytest.mark.slow
def test_resume_after_the_driver_is_killed(smoke_store, tmp_path):
    """`seld train` killed (SIGKILL of its process group, driver and embedded Ray) once Ray has
    registered a checkpoint (RUN/checkpointed.json) resumes with --resume from that checkpoint:
    every epoch is in metrics.csv once, and the epochs up to the registered one are the same rows
    (same timings), not trained again."""
    import subprocess
    import sys

    run = tmp_path / "run"
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="seldr-")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "seld", "train", str(smoke_store), "--preset", "smoke", "--out", str(run),
           "--set", "train.stage1.epochs=3", "--set", "train.time_budget_s=3600"]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=log)
    deadline, kill_epoch = time.time() + 300, None
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            epoch = _registered_epoch(run)
            if epoch is None or not (run / "metrics.csv").exists():
                continue
            rows = list(csv.DictReader((run / "metrics.csv").open()))
            if epoch in [int(r["epoch"]) for r in rows]:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole command: driver and its embedded Ray
                kill_epoch = epoch
                break
    finally:
        if proc.poll() is None and kill_epoch is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert kill_epoch is not None, (tmp_path / "first.log").read_text()[-3000:]
    before = list(csv.DictReader((run / "metrics.csv").open()))
    assert not (run / "metrics.json").exists(), "the run finished before the kill"
    registered = _registered_epoch(run)  # it may have moved on between the read and the kill
    assert registered is not None and registered >= kill_epoch
    out = subprocess.run([*cmd[:-4], "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    after = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in after] == list(range(4))
    # The registered epochs were not trained again (same rows, same timings); later rows that
    # metrics.csv listed before the kill may be redone.
    kept = [r for r in before if int(r["epoch"]) <= registered]
    assert kept and after[:len(kept)] == kept
    shutil.rmtree(ray_tmp, ignore_errors=True)
