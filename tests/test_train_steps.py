"""seld/train.py without Ray: the training step, epoch, validation and the loop's resume state.

The worker loop's pieces run here on a few rows of the smoke store (read with pyarrow) and the
smoke model; the last test drives `train_loop_per_worker` itself through a stand-in for
`ray.train`'s worker API (no Ray is started), interrupted and restored.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from seld import data as seld_data
from seld import train
from seld.augment import Augmenter
from seld.config import apply_overrides, preset_config, to_dict
from seld.losses import build_loss
from seld.predict import bf16_autocast

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"train/time_s", "train/data_wait_frac", "val/time_s", "elapsed_s"}  # wall-clock: differ run to run


def _worker_plan(store, cfg) -> seld_data.RunPlan:
    """The driver's plan of a 1-worker run with the share held in memory (no Ray)."""
    return replace(seld_data.plan_run(cfg, store), materialize=True)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as a `train.torch_threads=1` worker (several threads on a busy 2-core
    machine spin against each other: 4x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclass
class _Setup:
    cfg: object
    tset: seld_data.TrainSet
    val: seld_data.ClipBatch
    mean: np.ndarray
    std: np.ndarray


@pytest.fixture(scope="module")
def setup(smoke_store) -> _Setup:
    cfg = apply_overrides(preset_config("smoke"), {"train.stage1.epochs": 2})
    sets = seld_data.worker_sets(cfg, _worker_plan(smoke_store, cfg), 0, 1)
    train_sets, val = sets.train_sets, sets.val
    mean, std = seld_data.norm_from_sums(train_sets[1].sums())
    return _Setup(cfg, train_sets[1], val, mean, std)


def _fresh(s: _Setup):
    """Model, loss, optimiser and state as a worker starts stage 1."""
    net = train.init_model(s.cfg)
    state = train.LoopState(stage=1, norm_mean=s.mean, norm_std=s.std, config="{}")
    state.begin_stage(1)
    return net, build_loss(s.cfg.loss, s.cfg.model.output_format), train.stage_optimizer(net, s.cfg.train.stage1), state


def _run_epochs(s: _Setup, net, loss_fn, opt, state: train.LoopState, n: int) -> None:
    """`n` epochs as the worker runs them (one worker: no reduction)."""
    amp = bf16_autocast("cpu", s.cfg.train.amp_bf16)
    for _ in range(n):
        epoch = state.epoch
        gen = train.seed_epoch(s.cfg.seed, 0, epoch, "cpu")
        totals = train.train_epoch(net, loss_fn, opt, s.tset.batches(epoch, s.tset.n_batches(epoch)),
                                   mean=s.mean, std=s.std, device=torch.device("cpu"),
                                   augment=Augmenter(s.cfg.augment), gen=gen, amp=amp,
                                   grad_clip=s.cfg.train.grad_clip)
        scores = train.validate(net, s.val, s.mean, s.std, s.cfg, "cpu", amp)
        selected = state.select(scores["val/f20"], net)
        state.end_epoch({"epoch": epoch, "train/loss": totals[0] / totals[1], **scores,
                         "selected": int(selected)}, s.cfg.train.stage1)
        state.model, state.optimizer = net.state_dict(), opt.state_dict()


def _assert_same(a, b, where="state") -> None:
    """Equal to the bit: tensors, arrays, and the plain values and containers around them."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if k not in TIMING_KEYS:
                _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _saved_and_loaded(state: train.LoopState) -> train.LoopState:
    buf = io.BytesIO()
    torch.save(state.to_checkpoint(), buf)
    buf.seek(0)
    return train.LoopState.from_checkpoint(torch.load(buf, map_location="cpu", weights_only=False))


def test_loop_state_round_trips_through_torch_save(setup):
    net, loss_fn, opt, state = _fresh(setup)
    _run_epochs(setup, net, loss_fn, opt, state, 1)
    back = _saved_and_loaded(state)
    _assert_same(back.to_checkpoint(), state.to_checkpoint())
    assert back.epoch == 1 and back.stage_epoch == 1 and back.best_model is not None
    # The checkpoint keeps the keys of the resume states written before LoopState existed.
    assert set(state.to_checkpoint()) == {"model", "optimizer", "best_model", "epoch", "stage",
                                          "stage_epoch", "stage_done", "tracker", "history",
                                          "norm_mean", "norm_std", "config"}


def test_epochs_after_a_restore_repeat_the_straight_run(setup):
    """Restoring after epoch 0 and training epoch 1 gives the weights, optimiser state, selection
    and history of two epochs in one go, bit for bit (same seeds, same draws)."""
    net, loss_fn, opt, straight = _fresh(setup)
    _run_epochs(setup, net, loss_fn, opt, straight, 2)

    net1, loss_fn1, opt1, first = _fresh(setup)
    _run_epochs(setup, net1, loss_fn1, opt1, first, 1)
    state = _saved_and_loaded(first)
    assert state.resumes(1) and state.pending(1)
    net2 = train.init_model(setup.cfg)
    net2.load_state_dict(state.model)
    opt2 = train.stage_optimizer(net2, setup.cfg.train.stage1)
    opt2.load_state_dict(state.optimizer)
    _run_epochs(setup, net2, build_loss(setup.cfg.loss, setup.cfg.model.output_format), opt2, state, 1)

    _assert_same(net2.state_dict(), net.state_dict(), "model")
    _assert_same(state.to_checkpoint(), straight.to_checkpoint())
    assert state.stage_done and not state.pending(1) and state.pending(2)


def test_train_step_reports_its_phases_and_updates_the_weights(setup):
    net, loss_fn, opt, _ = _fresh(setup)
    feats, targets = next(setup.tset.batches(0, 1))
    x = torch.from_numpy(np.ascontiguousarray(feats)).float()
    before = [p.detach().clone() for p in net.parameters()]
    phases = []
    loss = train.train_step(net.train(), loss_fn, opt, x, torch.from_numpy(targets), amp=False,
                            grad_clip=1.0, on_phase=phases.append)
    assert phases == ["forward", "backward", "clip", "step"]
    assert loss.ndim == 0 and not loss.requires_grad and torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_stage_optimizer_is_foreach_adam_with_the_loop_adams_numbers(setup):
    """The stage optimiser runs Adam's multi-tensor (foreach) kernels, faster on CPU
    (bench/model_options.py), and its steps give the per-parameter loop's weights bit for bit."""
    feats, targets = next(setup.tset.batches(0, 1))
    x, y = torch.from_numpy(np.ascontiguousarray(feats)).float(), torch.from_numpy(targets)
    scfg = setup.cfg.train.stage1
    nets = []
    for foreach in (True, False):
        net, loss_fn, opt, _ = _fresh(setup)
        if foreach:
            assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["foreach"] is True
        else:
            opt = torch.optim.Adam(net.parameters(), lr=scfg.lr, weight_decay=scfg.weight_decay, foreach=False)
        for step in range(3):
            torch.manual_seed(step)  # the same dropout masks
            train.train_step(net.train(), loss_fn, opt, x, y, amp=False, grad_clip=1.0)
        nets.append(net)
    assert any(not torch.equal(a, b) for a, b in zip(train.init_model(setup.cfg).parameters(),
                                                     nets[0].parameters(), strict=True))
    _assert_same(nets[0].state_dict(), nets[1].state_dict(), "model")


def test_validate_sums_counters_through_reduce_and_keeps_the_mode(setup):
    net = train.init_model(setup.cfg).train()
    shapes = []

    def reduce(counters):
        shapes.append(counters.shape)
        return counters

    scores = train.validate(net, setup.val, setup.mean, setup.std, setup.cfg, "cpu", False, reduce=reduce)
    assert net.training
    assert shapes and shapes[0][:2] == (1, 13)
    assert set(scores) == {"val/f20", "val/doae_cd", "val/rde_cd", "val/dist_err_cd"}
    assert scores == train.validate(net, setup.val, setup.mean, setup.std, setup.cfg, "cpu", False)


def test_validation_scores_what_the_official_scorer_scores_on_the_written_csvs(setup, smoke_data, tmp_path, capsys):
    """The per-epoch validation F20 (selection, early stopping, every report) is the official
    scorer's (`seld evaluate`) on the validation predictions as written, to the last digit; the
    same events unrounded score differently (the rounding is part of the measure)."""
    from seld.cli import main
    from seld.evaluate import decode_as_written, infer_by_split, write_predictions
    from seld.metrics import score_events
    from seld.postprocess import decode_outputs

    net = train.init_model(setup.cfg)
    scores = train.validate(net, setup.val, setup.mean, setup.std, setup.cfg, "cpu", False)
    fmt, t05 = setup.cfg.model.output_format, setup.cfg.train.val_threshold
    outputs = infer_by_split(net, setup.val, setup.mean, setup.std, setup.cfg.train.batch_size)
    write_predictions(tmp_path / "pred", setup.val.clips, decode_as_written(outputs, fmt, t05))
    capsys.readouterr()
    assert main(["evaluate", str(smoke_data / "metadata_dev"), str(tmp_path / "pred"), "--json"]) == 0
    official = json.loads(capsys.readouterr().out)
    assert official["n_files"] == len(setup.val) and official["f20"] == scores["val/f20"]
    assert official["doae_cd"] == scores["val/doae_cd"] and official["rde_cd"] == scores["val/rde_cd"]
    unrounded = score_events(setup.val.events, decode_outputs(outputs, fmt, t05)).to_dict()
    assert unrounded["doae_cd"] != scores["val/doae_cd"]


def test_loop_state_selection_and_early_stop():
    scfg = preset_config("smoke").train.stage2  # 1 epoch, patience 1
    scfg = type(scfg)(epochs=5, lr=scfg.lr, patience=2)
    net = torch.nn.Linear(2, 1)
    state = train.LoopState(stage=1, stage_done=True, epoch=4, best_f20=30.0)
    assert not state.pending(1) and state.pending(2) and not state.resumes(2)
    state.begin_stage(2)
    assert (state.stage, state.stage_epoch, state.best_f20, state.bad_epochs) == (2, 0, -1.0, 0)
    early = []
    for f20 in (10.0, 12.0, 12.0, 11.0):
        selected = state.select(f20, net)
        early.append(state.end_epoch({"selected": int(selected)}, scfg))
    assert [r["selected"] for r in state.history] == [1, 1, 0, 0]
    assert early == [False, False, False, True] and state.stage_done
    assert (state.epoch, state.stage_epoch, state.best_f20, state.best_epoch) == (8, 4, 12.0, 5)


@pytest.mark.slow
def test_step_profile_imports_public_names_and_runs(smoke_store):
    source = (ROOT / "bench" / "step_profile.py").read_text()
    imported = [a.name for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.ImportFrom) and node.module == "seld.train" for a in node.names]
    assert "train_step" in imported and not [n for n in imported if n.startswith("_")]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, str(ROOT / "bench" / "step_profile.py")]
    assert subprocess.run([*cmd, "--help"], capture_output=True, env=env, check=False).returncode == 0
    out = subprocess.run([*cmd, str(smoke_store), "--preset", "smoke", "--batches", "2", "--threads", "1",
                          "--precision", "float32"], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["timed_steps"] == 2 and result["float32"]["ms_per_batch_median"] > 0


# --- The worker loop itself, through a stand-in for ray.train's worker API ----------------------------
class _Interrupted(Exception):
    """The stand-in's kill: raised by a report, after its checkpoint is kept (as a worker dies)."""


class _WorkerSession:
    """One worker's `ray.train` (context, checkpoints, report) in this process."""

    def __init__(self, ckpt_dir: Path, kill_after: int | None = None):
        self.ckpt_dir, self.kill_after, self.n_reports = ckpt_dir, kill_after, 0
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    def install(self, monkeypatch) -> None:
        import ray.train

        class Context:
            def get_world_rank(self):
                return 0

            def get_world_size(self):
                return 1

            def get_local_world_size(self):
                return 1

        monkeypatch.setattr(ray.train, "get_context", Context)
        monkeypatch.setattr(ray.train, "get_checkpoint", self.latest)
        monkeypatch.setattr(ray.train, "report", self.report)

    def latest(self):
        import ray.train

        kept = sorted(self.ckpt_dir.iterdir())
        return ray.train.Checkpoint.from_directory(str(kept[-1])) if kept else None

    def report(self, metrics, checkpoint=None):
        if checkpoint is not None:
            shutil.copytree(checkpoint.path, self.ckpt_dir / f"{len(list(self.ckpt_dir.iterdir())):04d}")
        self.n_reports += 1
        if self.kill_after is not None and self.n_reports >= self.kill_after:
            raise _Interrupted


def _worker_run(store, run_dir: Path, monkeypatch, kill_after: int | None = None) -> Path:
    cfg = apply_overrides(preset_config("smoke"), {"train.stage1.epochs": 2, "train.stage2.epochs": 2,
                                                   "train.stage2.patience": None, "train.torch_threads": 1})
    plan = _worker_plan(store, cfg)
    run_dir.mkdir(exist_ok=True)
    if not (run_dir / "config.json").exists():
        train.prepare_run_dir(cfg, run_dir, resume=False)
    session = _WorkerSession(run_dir / "ray", kill_after)
    with monkeypatch.context() as m:
        session.install(m)
        loop_cfg = {"config": to_dict(cfg), "run_dir": str(run_dir), "plan": plan, "deadline": time.time() + 3600}
        try:
            train.train_loop_per_worker(loop_cfg)
        except _Interrupted:
            pass
    return run_dir


def _csv_rows(run_dir: Path) -> list[dict]:
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.mark.slow
def test_worker_loop_restored_mid_stage_repeats_the_straight_run(smoke_store, tmp_path, monkeypatch):
    """Killed after epoch 0 (mid stage 1), restarted, killed after epoch 2 (mid stage 2), restarted:
    metrics.csv has each epoch once and equals the straight run's, and so do the model files and
    the test scores (same seeds, same draws, same optimiser states)."""
    straight = _worker_run(smoke_store, tmp_path / "straight", monkeypatch)
    resumed = tmp_path / "resumed"
    for kill_after in (1, 2):  # the first report of the first try; the second of the next
        _worker_run(smoke_store, resumed, monkeypatch, kill_after=kill_after)
        assert (resumed / "ray").exists() and not (resumed / "metrics.json").exists()
    _worker_run(smoke_store, resumed, monkeypatch)
    assert [r["epoch"] for r in _csv_rows(resumed)] == ["0", "1", "2", "3"]
    assert _csv_rows(resumed) == _csv_rows(straight)
    for name in ("stage1_best.pt", "stage2_best.pt", "selected.pt"):
        _assert_same(torch.load(resumed / "checkpoints" / name, weights_only=True),
                     torch.load(straight / "checkpoints" / name, weights_only=True), name)
    scores = [{k: v for k, v in json.loads((d / "metrics.json").read_text()).items() if not k.startswith("cost/")}
              for d in (straight, resumed)]
    assert scores[0] == scores[1]
