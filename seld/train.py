"""Two-stage training with Ray Train (paper §2.5): store -> run folder.

Reads the Parquet feature store through Ray Data (seld/data.py) and writes the run folder:
`config.json`, `metrics.csv` (one line per epoch, exactly once even after a restore),
`checkpoints/` (`stage1_best.pt`, `stage2_best.pt`, `selected.pt`; Ray's per-epoch resume states
under `ray/`), `norm.npz`, `thresholds.json`, `metrics.json` (scored by seld/evaluate.py) and
`predictions/` (test CSVs).
Stage 1 trains on synthetic + real train rows, stage 2 on real rows from stage 1's selected
checkpoint; selection and early stopping use validation F20 at threshold 0.5 (whole rooms held out
of the real train folders), never the test split.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seld import data as seld_data
from seld.config import ExperimentConfig, StageConfig, from_dict, to_dict
from seld.errors import DataError, UserError
from seld.evaluate import evaluate_run, flat_scores, pooled_counters, write_predictions
from seld.metrics import score_counters
from seld.predict import bf16_autocast, decode, infer, load_weights, prepare_batch
from seld.runfolder import (
    CHECKPOINT_DIR,
    NORM,
    RAY_SUBDIR,
    SELECTED,
    THRESHOLDS,
    atomic_write,
    read_model_file,
    save_json,
    save_model_file,
    save_thresholds,
    write_json_atomic,
    write_text_atomic,
)

log = logging.getLogger(__name__)

RAY_RUN_NAME = "train"
STATE_FILE = "state.pt"
CSV_COLUMNS = ("epoch", "stage", "stage_epoch", "lr", "train/loss", "train/clips", "train/time_s",
               "train/data_wait_frac", "val/f20", "val/doae_cd", "val/rde_cd", "val/best_f20",
               "selected", "elapsed_s")


# --- Ray ------------------------------------------------------------------------------------------------
def default_num_cpus(num_workers: int) -> int:
    """Logical CPUs for an embedded Ray: more than Train reserves, so Ray Data is never starved."""
    return max(4, 2 * num_workers + 2)


def init_ray(address: str | None = None, num_cpus: int | None = None, *, num_gpus: int | None = None,
             num_workers: int = 1, include_dashboard: bool = True, log_to_driver: bool = True) -> float:
    """Start an embedded local Ray on loopback, or connect to `address` / $RAY_ADDRESS: the one
    place the project starts Ray (`seld train`, the studies' :func:`seld.study.cluster.start_ray`).

    A no-op when Ray is already initialised (a test session, a Tune trial). The local Ray advertises
    and binds 127.0.0.1 only, writes no auth token, and gets `num_cpus` logical CPUs (default
    :func:`default_num_cpus`) and `num_gpus` GPUs (default: Ray's detection). Returns the seconds it
    took (0.0 when Ray was already up).
    """
    # Before Ray is imported: bind and advertise loopback only, write no auth token.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    import ray

    if ray.is_initialized():
        return 0.0
    t0 = time.perf_counter()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=log_to_driver)
        return time.perf_counter() - t0
    n = num_cpus or default_num_cpus(num_workers)
    ray.init(num_cpus=n, num_gpus=num_gpus, include_dashboard=include_dashboard, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", log_to_driver=log_to_driver)
    log.info("started a local Ray (%d logical CPUs) in %.1f s", n, time.perf_counter() - t0)
    return time.perf_counter() - t0


# --- Distributed helpers (no-ops with one worker) -------------------------------------------------------
def _dist() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(x: np.ndarray, op: str = "sum") -> np.ndarray:
    """All-reduce a float64 array over the workers (on CPU; gloo and nccl both take CPU tensors
    for gloo, so the tensor goes to the process group's device)."""
    if not _dist():
        return x
    import torch.distributed as dist

    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.as_tensor(np.asarray(x, dtype=np.float64), device=dev)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                           "max": dist.ReduceOp.MAX}[op])
    return t.cpu().numpy()


# --- The per-worker loop -------------------------------------------------------------------------------------
def _seed_everything(*parts: int) -> None:
    seed = int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def _worker_threads(cfg: ExperimentConfig, local_world: int) -> int:
    if cfg.train.torch_threads > 0:
        return cfg.train.torch_threads
    return max(1, (os.cpu_count() or 1) // max(1, local_world))


class _TrainSet:
    """One worker's training rows of a stage: materialised once, or streamed every epoch."""

    def __init__(self, name: str, cfg: ExperimentConfig, rank: int, rows=None, shard=None):
        self.name, self.cfg, self.shard, self.rank = name, cfg, shard, rank
        self.rows: seld_data.ClipBatch | None = rows
        self.targets: np.ndarray | None = None
        if rows is not None:
            self.targets = seld_data.encode_targets(rows.events, cfg.model.output_format)

    def sums(self) -> np.ndarray:
        """Per channel-mel sums of this worker's rows (for the normalisation)."""
        if self.rows is not None:
            return seld_data.feature_sums(self.rows.features)
        total = None
        for b in seld_data.stream(self.shard, 256):
            s = seld_data.feature_sums(b.features)
            total = s if total is None else total + s
        return total

    def n_batches(self, epoch: int) -> int:
        return math.ceil(len(self._epoch_index(epoch)) / self.cfg.train.batch_size)

    def _epoch_index(self, epoch: int) -> np.ndarray:
        """Row order of one epoch (seeded by seed, rank, epoch); stage 1 may subsample synthetic."""
        assert self.rows is not None
        rng = np.random.default_rng([self.cfg.seed, self.rank, epoch, 17])
        idx = np.arange(len(self.rows))
        ratio = self.cfg.data.stage1_synth_per_real
        if self.name == "stage1" and ratio is not None:
            synth = idx[self.rows.domains == "synthetic"]
            real = idx[self.rows.domains != "synthetic"]
            n_synth = min(len(synth), int(round(ratio * len(real))))
            idx = np.concatenate([real, rng.choice(synth, n_synth, replace=False)])
        return rng.permutation(idx)

    def batches(self, epoch: int, n_batches: int):
        """Yield (features store-dtype (B, 2, T, M), targets float32) for one epoch."""
        bs = self.cfg.train.batch_size
        if self.rows is not None:
            idx = self._epoch_index(epoch)
            for i in range(n_batches):
                sel = np.sort(idx[i * bs:(i + 1) * bs])
                yield self.rows.features[sel], self.targets[sel]
            return
        it = self.shard.iter_batches(batch_size=bs, batch_format="numpy", prefetch_batches=2,
                                     local_shuffle_buffer_size=4 * bs,
                                     local_shuffle_seed=self.cfg.seed * 1000 + epoch)
        for raw in it:
            b = seld_data.to_clip_batch(raw)
            yield b.features, seld_data.encode_targets(b.events, self.cfg.model.output_format)


def _state_checkpoint(state: dict):
    """Ray Checkpoint of the resume state (written by rank 0 only)."""
    import ray.train

    tmp = tempfile.mkdtemp(prefix="seld-ckpt-")
    torch.save(state, Path(tmp) / STATE_FILE)
    return ray.train.Checkpoint.from_directory(tmp), tmp


def _load_state() -> dict | None:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)


def _write_csv(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: row.get(k, "") for k in CSV_COLUMNS})
    write_text_atomic(path, buf.getvalue())


def train_loop_per_worker(loop_cfg: dict) -> None:
    """Ray Train worker: both stages, per-epoch validation/checkpoint/report; rank 0 scores at the end.

    loop_cfg: {"config": to_dict(ExperimentConfig), "run_dir": str, "rows": {name: clip ids},
    "deadline": unix time after which no new epoch starts}.
    """
    import ray.train
    import ray.train.torch

    from seld.augment import Augmenter
    from seld.losses import build_loss
    from seld.model import build_model

    cfg = from_dict(ExperimentConfig, loop_cfg["config"])
    cfg_json = json.dumps(loop_cfg["config"], sort_keys=True)
    run_dir = Path(loop_cfg["run_dir"])
    deadline = float(loop_cfg["deadline"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(_worker_threads(cfg, ctx.get_local_world_size()))
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    amp = bf16_autocast(device, cfg.train.amp_bf16)
    fmt = cfg.model.output_format
    stages = {"both": (1, 2), "stage1": (1,), "stage2": (2,)}[cfg.train.stages]
    t_start = time.time()

    # Data: training rows (per stage, this worker's share), the whole validation set (each rank
    # scores its slice), the test sets (rank 0 scores them at the end).
    plan: dict[str, list[str]] = loop_cfg["rows"]
    names = {k for k, v in plan.items() if v}
    t0 = time.perf_counter()
    tests: dict[str, seld_data.ClipBatch] = {}
    if cfg.data.materialize:
        everything = seld_data.materialize(ray.train.get_dataset_shard("rows"))
        train_sets = {s: _TrainSet(f"stage{s}", cfg, rank, rows=seld_data.select(
            everything, sorted(plan[f"stage{s}"])[rank::world])) for s in stages}
        val = seld_data.select(everything, plan["val"])
        if rank == 0:
            tests = {n: seld_data.select(everything, plan[n]) for n in ("test", "synth_test") if n in names}
        del everything
    else:
        train_sets = {s: _TrainSet(f"stage{s}", cfg, rank, shard=ray.train.get_dataset_shard(f"stage{s}"))
                      for s in stages}
        val = seld_data.materialize(ray.train.get_dataset_shard("val"))
    val_mine = val.take(np.arange(rank, len(val), world))
    t_data = time.perf_counter() - t0
    log.info("rank %d: data ready in %.1f s (%s; val %d, mine %d)", rank, time.perf_counter() - t0,
             {k: (len(v.rows) if v.rows is not None else "streamed") for k, v in train_sets.items()},
             len(val), len(val_mine))

    state = _load_state()
    init_blob = read_model_file(cfg.train.init_checkpoint) if cfg.train.init_checkpoint else None
    if state is not None:
        mean, std = state["norm_mean"], state["norm_std"]
        log.info("rank %d: restored from checkpoint after epoch %d (stage %d, epoch %d of the stage)",
                 rank, state["epoch"], state["stage"], state["stage_epoch"])
    elif init_blob is not None and init_blob.get("norm_mean") is not None:
        mean, std = init_blob["norm_mean"].numpy(), init_blob["norm_std"].numpy()
    elif cfg.data.normalize:
        sums = _all_reduce(train_sets[stages[0]].sums())
        mean, std = seld_data.norm_from_sums(sums)
    else:
        mean = std = None
    if rank == 0 and mean is not None:
        with atomic_write(run_dir / NORM) as tmp, open(tmp, "wb") as f:  # np.savez(path) would add .npz
            np.savez(f, mean=mean, std=std)

    _seed_everything(cfg.seed, 0)
    net = build_model(cfg.model, n_mels=cfg.features.n_mels)
    if init_blob is not None:
        load_weights(net, init_blob["model"], cfg.train.init_checkpoint)
    if state is not None:
        net.load_state_dict(state["model"])
    net.to(device)
    model = ray.train.torch.prepare_model(net) if world > 1 else net
    loss_fn = build_loss(cfg.loss, fmt).to(device)
    augment = Augmenter(cfg.augment)

    history: list[dict] = list(state["history"]) if state else []
    if rank == 0:
        _write_csv(run_dir / "metrics.csv", history)
    epoch = state["epoch"] if state else 0
    start_stage = state["stage"] if state else stages[0]
    stage_epoch = state["stage_epoch"] if state else 0
    stage_done = bool(state["stage_done"]) if state else False
    tracker = dict(state["tracker"]) if state else {}
    best_model = state.get("best_model") if state else None
    stopped = False

    def validate() -> dict:
        outputs = infer(net, val_mine.features, mean, std, cfg.train.batch_size, device, amp)
        preds = decode(outputs, fmt, cfg.train.val_threshold)
        return flat_scores(score_counters(_all_reduce(pooled_counters(val_mine.events, preds))), "val")

    def run_epoch(stage: int, scfg: StageConfig, tset: _TrainSet, opt) -> dict:
        """Train one epoch, validate, update the selection; returns the metrics.csv row."""
        nonlocal best_model
        _seed_everything(cfg.seed, rank, epoch, 1)
        model.train()
        n_local = float(tset.n_batches(epoch)) if tset.rows is not None else 1e12
        n_batches = int(_all_reduce(np.array([n_local]), "min")[0])
        gen = torch.Generator(device=device).manual_seed(
            int(np.random.SeedSequence([cfg.seed, rank, epoch, 2]).generate_state(1)[0]))
        t_ep, t_wait, loss_sum, n_clips = time.perf_counter(), 0.0, 0.0, 0
        t_fetch = time.perf_counter()
        for feats, targets in tset.batches(epoch, n_batches):
            x = prepare_batch(feats, mean, std, device)
            y = torch.from_numpy(targets).to(device)
            t_wait += time.perf_counter() - t_fetch
            x, y = augment(x, y, gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(x)
            loss = loss_fn(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            loss_sum += float(loss.detach()) * len(x)
            n_clips += len(x)
            t_fetch = time.perf_counter()
        t_train = time.perf_counter() - t_ep
        tot = _all_reduce(np.array([loss_sum, n_clips, t_wait, t_train]))
        val_metrics = validate()
        f20 = val_metrics["val/f20"]
        improved = f20 > tracker["best_f20"]
        if improved:
            tracker.update(best_f20=f20, best_epoch=epoch, bad_epochs=0)
            best_model = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            if rank == 0:
                save_model_file(run_dir / CHECKPOINT_DIR / f"stage{stage}_best.pt", best_model,
                                cfg_json, mean, std, {"stage": stage, "epoch": epoch, "val/f20": f20})
        else:
            tracker["bad_epochs"] += 1
        row = {"epoch": epoch, "stage": stage, "stage_epoch": stage_epoch, "lr": scfg.lr,
               "train/loss": tot[0] / max(tot[1], 1), "train/clips": int(tot[1]),
               "train/time_s": round(tot[3] / world, 3),
               "train/data_wait_frac": round(tot[2] / max(tot[3], 1e-9), 4), **val_metrics,
               "val/best_f20": tracker["best_f20"], "selected": int(improved),
               "elapsed_s": round(time.time() - t_start, 2)}
        log.info("epoch %d (stage %d): loss %.4f, val F20 %.2f%% (best %.2f%%), %.1f s", epoch, stage,
                 row["train/loss"], f20, tracker["best_f20"], tot[3] / world)
        return row

    for stage in stages:
        if stopped or stage < start_stage or (stage == start_stage and stage_done):
            continue
        scfg: StageConfig = getattr(cfg.train, f"stage{stage}")
        tset = train_sets[stage]
        resumed = state is not None and state["stage"] == stage and stage_epoch > 0
        if not resumed:
            if stage == 2 and 1 in stages:
                if best_model is None:
                    raise RuntimeError("stage 1 selected no checkpoint (time budget too small?)")
                net.load_state_dict(best_model)  # stage 2 starts from stage 1's selected checkpoint
            stage_epoch, tracker = 0, {"best_f20": -1.0, "best_epoch": -1, "bad_epochs": 0}
        opt = torch.optim.Adam(model.parameters(), lr=scfg.lr, weight_decay=scfg.weight_decay)
        if resumed:
            opt.load_state_dict(state["optimizer"])
        done = scfg.epochs == 0
        while not done:
            if _all_reduce(np.array([float(time.time() > deadline)]), "max")[0] > 0:
                log.warning("time budget of %.0f s reached: no new epoch", cfg.train.time_budget_s)
                stopped = True
                break
            row = run_epoch(stage, scfg, tset, opt)
            history.append(row)
            epoch += 1
            stage_epoch += 1
            early = scfg.patience is not None and tracker["bad_epochs"] >= scfg.patience
            done = early or stage_epoch >= scfg.epochs
            new_state = {"model": net.state_dict(), "optimizer": opt.state_dict(),
                         "best_model": best_model, "epoch": epoch, "stage": stage,
                         "stage_epoch": stage_epoch, "stage_done": done, "tracker": tracker,
                         "history": history, "norm_mean": mean, "norm_std": std, "config": cfg_json}
            ckpt, tmp = None, None
            if rank == 0:
                _write_csv(run_dir / "metrics.csv", history)
                ckpt, tmp = _state_checkpoint(new_state)
            ray.train.report({k: v for k, v in row.items() if isinstance(v, int | float)},
                             checkpoint=ckpt)
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            if early:
                log.info("stage %d: early stop after %d epochs without improvement", stage,
                         tracker["bad_epochs"])
        state = None

    final: dict[str, Any] = {}
    if rank == 0:
        if not cfg.data.materialize:
            tests = {n: seld_data.materialize(ray.train.get_dataset_shard(n))
                     for n in ("test", "synth_test") if n in names}
        t_fin = time.time()
        final = _finish(cfg, run_dir, net, mean, std, device, amp, val, tests, history, stages)
        final["cost/finish_s"] = round(time.time() - t_fin, 2)
        final["cost/data_ready_s"] = round(t_data, 2)
        final["cost/train_loop_s"] = round(time.time() - t_start, 2)
        write_json_atomic(run_dir / "metrics.json", final)
    # The final report carries the test figures. Its marker is not called "done": Tune reads a
    # "done" key as "end this trial now" and would kill it before the run's files are written.
    ray.train.report({"run_finished": 1, **{k: v for k, v in final.items() if isinstance(v, int | float)}})


def _finish(cfg, run_dir, net, mean, std, device, amp, val, tests, history, stages) -> dict:
    """Rank 0: copy the selected checkpoint, score it in memory (seld/evaluate.py), write thresholds.json
    and the test predictions; returns metrics.json's content (scores + the run's cost)."""

    ckpt_dir = run_dir / CHECKPOINT_DIR
    ran = [s for s in stages if (ckpt_dir / f"stage{s}_best.pt").is_file()]
    if not ran:
        raise RuntimeError(f"{run_dir}: no epoch finished, nothing to evaluate")
    sel_stage = ran[-1]
    sel_path = ckpt_dir / f"stage{sel_stage}_best.pt"
    shutil.copyfile(sel_path, ckpt_dir / SELECTED)
    stage1 = read_model_file(ckpt_dir / "stage1_best.pt") if 1 in ran and sel_stage == 2 else None
    scores = evaluate_run(net, read_model_file(sel_path), val, tests, cfg, mean, std, device, amp, stage1=stage1)
    save_thresholds(run_dir / THRESHOLDS, scores.thresholds)
    for folder, preds in scores.predictions.items():
        write_predictions(run_dir / folder, tests["test"].clips, preds)
    metrics: dict[str, Any] = {"selected_checkpoint": f"{CHECKPOINT_DIR}/stage{sel_stage}_best.pt",
                               **scores.metrics}
    clips = sum(r["train/clips"] for r in history)
    t_train = sum(r["train/time_s"] for r in history)
    metrics.update({
        "precision": "bf16" if amp else "float32",
        "cost/epochs": len(history),
        "cost/stage1_epochs": sum(1 for r in history if r["stage"] == 1),
        "cost/stage2_epochs": sum(1 for r in history if r["stage"] == 2),
        "cost/train_clips_per_s": round(clips / max(t_train, 1e-9), 2),
        "cost/data_wait_frac": round(sum(r["train/data_wait_frac"] * r["train/time_s"] for r in history)
                                     / max(t_train, 1e-9), 4),
    })
    log.info("test F20 %.2f%% (PP %.2f%%), DOAE %s, RDE %s", metrics["test/f20"],
             metrics["test_pp/f20"], metrics["test/doae_cd"], metrics["test/rde_cd"])
    return metrics


# --- Driver side ------------------------------------------------------------------------------------
def prepare_run_dir(cfg: ExperimentConfig, run_dir: Path, resume: bool) -> None:
    """Create the run folder and its config.json; refuse to mix runs (resume needs the same config)."""
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        if not resume:
            raise UserError(f"{run_dir}: already holds a run; pass --resume to continue it or choose "
                            "another --out")
        old = json.loads(cfg_path.read_text())
        if old != to_dict(cfg):
            diff = sorted(k for k in set(old) | set(to_dict(cfg)) if old.get(k) != to_dict(cfg).get(k))
            raise UserError(f"{cfg_path}: --resume with another config (sections differ: {diff})")
    elif resume:
        raise UserError(f"{run_dir}: nothing to resume (no config.json)")
    (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    save_json(cfg, cfg_path)


def build_trainer(cfg: ExperimentConfig, store: str | Path, run_dir: str | Path, *,
                  run_callbacks=(), storage_path: str | None = None, name: str | None = None):
    """A TorchTrainer for one run (does not start it; Ray must be initialised).

    Args:
        cfg: the experiment config (train.* gives workers, CPUs/GPU, failures, time budget).
        store: the feature store folder.
        run_dir: the run folder (must exist; rank 0 writes metrics, checkpoints, predictions here).
        run_callbacks: Ray Train callbacks (e.g. Tune's TuneReportCallback).
        storage_path, name: where Ray keeps the resume states (default RUN/ray/train); the same
            pair again resumes from the latest state.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    run_dir = Path(run_dir).resolve()
    rows = seld_data.plan_rows(seld_data.read_index(store, cfg.features), cfg)
    stages = {"both": ("stage1", "stage2"), "stage1": ("stage1",), "stage2": ("stage2",)}[cfg.train.stages]
    rows = {k: v for k, v in rows.items() if k not in ("stage1", "stage2") or k in stages}
    datasets = seld_data.build_datasets(store, rows, cfg.data.materialize, cfg.features)
    to_split = [] if cfg.data.materialize else list(stages)
    cpus = cfg.train.cpus_per_worker
    scaling = ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                      resources_per_worker={"CPU": cpus, **({"GPU": 1} if cfg.train.use_gpu else {})})
    run_config = ray.train.RunConfig(
        name=name or RAY_RUN_NAME,
        storage_path=str(storage_path or run_dir / RAY_SUBDIR),
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        callbacks=list(run_callbacks) or None,
    )
    loop_cfg = {"config": to_dict(cfg), "run_dir": str(run_dir), "rows": rows,
                "deadline": time.time() + cfg.train.time_budget_s}
    return TorchTrainer(train_loop_per_worker, train_loop_config=loop_cfg, scaling_config=scaling,
                        run_config=run_config, datasets=datasets,
                        dataset_config=ray.train.DataConfig(datasets_to_split=to_split))


def run_training(cfg: ExperimentConfig, store: str | Path, run_dir: str | Path, *, resume: bool = False,
                 wandb: dict | None = None, run_callbacks=()) -> dict:
    """Train one run end to end and return the content of RUN/metrics.json.

    Args:
        wandb: None, or {"project": str, "group": str | None}: log config, per-epoch rows, final
            metrics and the per-class table to one W&B run in RUN/wandb (offline unless WANDB_MODE).
    """
    import ray.train

    t0 = time.time()
    run_dir = Path(run_dir).resolve()
    # Check the store (feature config, the splits each set needs) before anything is created or started.
    index = seld_data.read_index(store, cfg.features)
    try:
        seld_data.plan_rows(index, cfg)
    except DataError as e:
        raise DataError(f"{store}: {e}; the store holds the splits {sorted(index['split'].unique())}") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    prepare_run_dir(cfg, run_dir, resume)
    t_ray = init_ray(num_workers=cfg.train.num_workers)
    logger = _WandbLogger(cfg, run_dir, wandb) if wandb else None
    try:
        trainer = build_trainer(cfg, store, run_dir, run_callbacks=run_callbacks)
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as e:
            causes = [getattr(x, "cause", x) for x in getattr(e, "worker_failures", {}).values()]
            for cause in causes:  # a bad input met in a worker (e.g. a full disk): one line, as on the driver
                if isinstance(cause, UserError):
                    # Same class as the worker's error (DataError stays DataError), one line.
                    raise type(cause)(f"{str(cause).strip().splitlines()[-1]} (training run {run_dir} stopped)") from e
            raise RuntimeError(f"training failed ({run_dir}): {e}") from e
        metrics = json.loads((run_dir / "metrics.json").read_text())
        metrics["cost/wall_s"] = round(time.time() - t0, 2)
        # What small runs cost besides training: starting Ray here, then everything between the
        # driver and the worker's loop (trainer controller, worker group, dataset planning).
        metrics["cost/ray_start_s"] = round(t_ray, 2)
        metrics["cost/trainer_start_s"] = round(metrics["cost/wall_s"] - t_ray - metrics["cost/train_loop_s"], 2)
        write_json_atomic(run_dir / "metrics.json", metrics)
        if logger:
            logger.finish(metrics)
        return metrics
    finally:
        if logger:
            logger.close()


class _WandbLogger:
    """One W&B run per training run, fed from metrics.csv (each epoch once) by a driver thread."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, opts: dict):
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ["WANDB_DIR"] = str(run_dir)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=opts.get("project") or "seld", group=opts.get("group"),
                              name=run_dir.name, dir=str(run_dir), config=to_dict(cfg),
                              mode=os.environ["WANDB_MODE"], reinit="create_new")
        self.csv = run_dir / "metrics.csv"
        self.logged = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _rows(self) -> list[dict]:
        with contextlib.suppress(OSError):
            return list(csv.DictReader(io.StringIO(self.csv.read_text())))
        return []

    def _flush(self) -> None:
        for row in self._rows():
            ep = int(row["epoch"])
            if ep > self.logged:
                self.run.log({k: float(v) for k, v in row.items() if v not in ("", None)}, step=ep)
                self.logged = ep

    def _poll(self) -> None:
        while not self._stop.wait(2.0):
            self._flush()

    def finish(self, metrics: dict) -> None:
        import wandb

        self._stop.set()
        self._thread.join()
        self._flush()
        rows = metrics.get("classwise", {}).get("test_pp", [])
        table = {}
        if rows:
            cols = sorted(rows[0])
            table = {"test_pp/classwise": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])}
        # Commit the last epoch's row first: a row committed later would overwrite the summary's
        # final val/* figures (also per-epoch keys) with the last epoch's instead of metrics.json's.
        self.run.log(table, commit=True)
        for k, v in metrics.items():
            if isinstance(v, int | float):
                self.run.summary[k] = v

    def close(self) -> None:
        self._stop.set()
        finish_wandb_run(self.run)


def finish_wandb_run(run) -> None:
    """Finish a W&B run and return only once its offline transaction log is complete on disk.

    wandb 0.31's ``run.finish()`` returns when wandb-core has handled the exit record, but the core
    closes (flushes) the run's ``.wandb`` file later, on its own, after the fire-and-forget
    ``inform_finish``: a reader right after ``finish()`` could find the file empty or without its
    history (seen: a sweep's report run with no ``trials`` table). ``wandb.teardown()`` waits for
    the core process to exit, which closes every stream's file; the next ``wandb.init`` in this
    process starts a new core (~0.3 s).
    """
    import wandb

    run.finish()
    wandb.teardown()
