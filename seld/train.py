"""Two-stage training with Ray Train (paper §2.5): store -> run folder.

Reads the Parquet feature store (seld/data.py: the driver plans each worker's share, the worker reads
only that) and writes the run folder:
`config.json`, `metrics.csv` (one line per epoch, exactly once even after a restore),
`checkpoints/` (`stage1_best.pt`, `stage2_best.pt`, `selected.pt`; Ray's per-epoch resume states
under `ray/`), `norm.npz`, `thresholds.json`, `metrics.json` (scored by seld/evaluate.py) and
`predictions/` (test CSVs).
Stage 1 trains on synthetic + real train rows, stage 2 on real rows from stage 1's selected
checkpoint; selection and early stopping use validation F20 at threshold 0.5 (whole rooms held out
of the real train folders), never the test split. The step, the epoch and validation are plain torch
(`train_step`, `train_epoch`, `validate`: no Ray); the worker's progress is one `LoopState`, saved
after every epoch and restored as one piece.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seld import data as seld_data
from seld.config import ExperimentConfig, StageConfig, from_dict, run_config_dict, to_dict
from seld.errors import UserError
from seld.evaluate import (
    decode_as_written,
    evaluate_run,
    flat_scores,
    infer_by_split,
    pooled_counters,
    write_predictions,
)
from seld.metrics import score_counters
from seld.paired import save_counters
from seld.predict import (
    bf16_autocast,
    load_weights,
    machine_record,
    precision_decision,
    prepare_batch,
)
from seld.runfolder import (
    BEST_F20,
    CHECKPOINT_DIR,
    CONFIG_JSON,
    METRICS_CSV,
    METRICS_JSON,
    MIRROR_SKIP,
    NORM,
    PREDICTIONS_VAL,
    RAY_SUBDIR,
    RUN_FINISHED,
    SELECTED,
    SHARES_DIR,
    TEST_COUNTERS,
    THRESHOLDS,
    atomic_write,
    read_model_file,
    save_json,
    save_model_file,
    save_thresholds,
    stage_checkpoint,
    write_json_atomic,
    write_text_atomic,
)
from seld.storage import Mirror
from seld.wandb_log import WandbLogger

log = logging.getLogger(__name__)

RAY_RUN_NAME = "train"
STATE_FILE = "state.pt"
CSV_COLUMNS = ("epoch", "stage", "stage_epoch", "lr", "train/loss", "train/clips", "train/time_s",
               "train/data_wait_frac", "val/f20", "val/doae_cd", "val/rde_cd", BEST_F20,
               "selected", "val/time_s", "elapsed_s")


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


def _sync_buffers(model: torch.nn.Module) -> None:
    """Every rank takes rank 0's buffers (BatchNorm running statistics): DDP broadcasts them at the
    start of each training forward, and each rank's forward then updates its own with its own batch,
    so after an epoch they differ across ranks. Validation must score the model rank 0 saves: with
    two workers, unsynchronised buffers made the selected epoch's metrics.csv F20 differ from the
    same checkpoint's metrics.json F20 (measured: 4.136 against 4.134 on the smoke preset)."""
    if not _dist():
        return
    import torch.distributed as dist

    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


# --- Training steps (plain torch, no Ray: the worker loop and bench/step_profile.py run these) ---------
def seed_everything(*parts: int) -> None:
    """Seed torch's and numpy's global generators (dropout, numpy draws) from the integers `parts`."""
    seed = int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def seed_epoch(seed: int, rank: int, epoch: int, device) -> torch.Generator:
    """Seed one worker's epoch: the global generators (dropout) and the augmentation's generator.

    The draws depend on (seed, rank, epoch) only, so an epoch after a restore repeats the one the
    run would have trained without the interruption. Returns a `torch.Generator` on `device`.
    """
    seed_everything(seed, rank, epoch, 1)
    aug_seed = int(np.random.SeedSequence([seed, rank, epoch, 2]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(aug_seed)


def init_model(cfg: ExperimentConfig) -> torch.nn.Module:
    """The run's initial model (on CPU), its weights drawn from `cfg.seed` alone: every worker, every
    restart and the bench start from the same weights."""
    from seld.model import build_model

    seed_everything(cfg.seed, 0)
    return build_model(cfg.model, n_mels=cfg.features.n_mels)


def stage_optimizer(model: torch.nn.Module, scfg: StageConfig) -> torch.optim.Optimizer:
    """A stage's optimiser (a new one each stage): Adam at the stage's lr and weight decay.

    foreach=True: one multi-tensor kernel per Adam operation instead of a loop over the parameters
    (PyTorch's CPU default). The same numbers bit for bit, and 2-10 % faster `local` training steps
    at 1 thread in bf16 (Baseline-A's many small tensors gain most; bench/model_options.py,
    BENCHMARKS.md "Model-level options"). fused=True measured faster still but rounds differently.
    """
    return torch.optim.Adam(model.parameters(), lr=scfg.lr, weight_decay=scfg.weight_decay, foreach=True)


def train_step(model: torch.nn.Module, loss_fn: torch.nn.Module, opt: torch.optim.Optimizer,
               x: torch.Tensor, y: torch.Tensor, *, amp: bool, grad_clip: float | None,
               on_phase: Callable[[str], None] | None = None) -> torch.Tensor:
    """One optimiser step on a batch that is already normalised and augmented.

    Args:
        model: in train mode (bare or DDP-wrapped); outputs (B, 50, 13, 3) ACCDOA or
            (B, 50, 3, 13, 3) multi-ACCDOA.
        x: float32 (B, 2, 251, n_mels) normalised log-mel, on the model's device.
        y: float32 targets (B, 50, 13, 4) or (B, 50, 6, 13, 4) (`seld.data.encode_targets`), same device.
        amp: forward under bf16 autocast (`seld.predict.bf16_autocast`); the loss is taken in float32.
        grad_clip: largest gradient norm, or None / 0 for no clipping.
        on_phase: called with "forward" (forward and loss), "backward", "clip", "step" as each ends
            (bench/step_profile.py times the phases with it).
    Returns:
        the batch's mean loss, a detached scalar tensor.
    """
    mark = on_phase or (lambda _phase: None)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    loss = loss_fn(out.float(), y)
    mark("forward")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    mark("backward")
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    mark("clip")
    opt.step()
    mark("step")
    return loss.detach()


def train_epoch(model: torch.nn.Module, loss_fn: torch.nn.Module, opt: torch.optim.Optimizer,
                batches: Iterable[tuple[np.ndarray, np.ndarray]], *, mean, std, device, augment,
                gen: torch.Generator, amp: bool, grad_clip: float | None) -> np.ndarray:
    """Train one epoch: each batch normalised, augmented and stepped (:func:`train_step`).

    Args:
        batches: (features (B, 2, 251, n_mels) in the store's dtype, targets float32) pairs, as
            `seld.data.TrainSet.batches` yields them.
        mean, std: the normalisation, float32 (2, 1, n_mels) each, or None.
        augment: an `seld.augment.Augmenter`; gen: its generator (:func:`seed_epoch`).
    Returns:
        float64 (4,): loss summed over clips, clips, seconds spent waiting for batches, seconds of
        the epoch; this worker's, to be summed over workers.
    """
    model.train()
    t_epoch, t_wait, loss_sum, n_clips = time.perf_counter(), 0.0, 0.0, 0
    t_fetch = time.perf_counter()
    for feats, targets in batches:
        x = prepare_batch(feats, mean, std, device)
        y = torch.from_numpy(targets).to(device)
        t_wait += time.perf_counter() - t_fetch
        x, y = augment(x, y, gen)
        loss = train_step(model, loss_fn, opt, x, y, amp=amp, grad_clip=grad_clip)
        loss_sum += float(loss) * len(x)
        n_clips += len(x)
        t_fetch = time.perf_counter()
    return np.array([loss_sum, n_clips, t_wait, time.perf_counter() - t_epoch])


def validate(model: torch.nn.Module, rows: seld_data.ClipBatch, mean, std, cfg: ExperimentConfig,
             device, amp: bool, reduce: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """Validation scores at `cfg.train.val_threshold` (the selection's and early stopping's F20).

    Scored as metrics.json's ``val/`` is and as the official scorer scores the written CSVs: outputs
    batched per split folder (:func:`seld.evaluate.infer_by_split`), events as written (integer
    azimuth and distance, :func:`seld.evaluate.decode_as_written`). With one worker (`rows` = the
    whole validation set) the selected epoch's scores equal metrics.json's exactly.

    Args:
        model: the bare model (not DDP); inference runs in eval mode and restores the mode after.
        rows: this worker's validation clips (features and reference events).
        mean, std: the normalisation, float32 (2, 1, n_mels) each, or None.
        reduce: sums the pooled metric counters (1, 13, K) over the workers (None: one worker).
    Returns:
        {"val/f20": %, "val/doae_cd": deg, "val/rde_cd": ratio, "val/dist_err_cd": cm}, None where
        undefined.
    """
    outputs = infer_by_split(model, rows, mean, std, cfg.train.batch_size, device, amp)
    counters = pooled_counters(rows.events, decode_as_written(outputs, cfg.model.output_format,
                                                              cfg.train.val_threshold))
    return flat_scores(score_counters(counters if reduce is None else reduce(counters)), "val")


@dataclass(eq=False)
class LoopState:
    """Where a run stands between epochs: saved after each epoch and restored as one piece.

    The selection (`best_f20`, `best_epoch`, `bad_epochs`) restarts with each stage; `best_model`
    carries over (stage 2 starts from stage 1's). `model` and `optimizer` are the state dicts of
    the last save, which the loop fills in before :meth:`to_checkpoint`.
    """

    stage: int  # the stage being trained (or last trained): 1 or 2
    epoch: int = 0  # epochs finished, over all stages (the next epoch's number)
    stage_epoch: int = 0  # epochs finished in `stage`
    stage_done: bool = False  # `stage` ran its epochs or stopped early
    best_f20: float = -1.0  # the stage's best validation F20 (%)
    best_epoch: int = -1  # and its epoch
    bad_epochs: int = 0  # epochs since it last improved
    best_model: dict[str, torch.Tensor] | None = None  # weights of the best epoch so far (CPU copies)
    model: dict | None = None  # model state dict
    optimizer: dict | None = None  # optimizer state dict (of `stage`)
    history: list[dict] = field(default_factory=list)  # the metrics.csv rows so far
    norm_mean: np.ndarray | None = None  # float32 (2, 1, n_mels), or None without normalisation
    norm_std: np.ndarray | None = None
    config: str = ""  # the run's config as JSON

    def to_checkpoint(self) -> dict:
        """The resume state as saved (`torch.save`) in Ray's checkpoint: plain dicts and tensors."""
        return {"model": self.model, "optimizer": self.optimizer, "best_model": self.best_model,
                "epoch": self.epoch, "stage": self.stage, "stage_epoch": self.stage_epoch,
                "stage_done": self.stage_done,
                "tracker": {"best_f20": self.best_f20, "best_epoch": self.best_epoch,
                            "bad_epochs": self.bad_epochs},
                "history": self.history, "norm_mean": self.norm_mean, "norm_std": self.norm_std,
                "config": self.config}

    @classmethod
    def from_checkpoint(cls, blob: dict) -> LoopState:
        """The state that :meth:`to_checkpoint` saved."""
        tracker = blob["tracker"]
        return cls(stage=blob["stage"], epoch=blob["epoch"], stage_epoch=blob["stage_epoch"],
                   stage_done=bool(blob["stage_done"]), best_f20=tracker["best_f20"],
                   best_epoch=tracker["best_epoch"], bad_epochs=tracker["bad_epochs"],
                   best_model=blob.get("best_model"), model=blob["model"], optimizer=blob["optimizer"],
                   history=list(blob["history"]), norm_mean=blob["norm_mean"], norm_std=blob["norm_std"],
                   config=blob["config"])

    def pending(self, stage: int) -> bool:
        """Whether `stage` still has epochs to train."""
        return stage > self.stage or (stage == self.stage and not self.stage_done)

    def resumes(self, stage: int) -> bool:
        """Whether `stage` continues from this state (its optimizer included) rather than starting."""
        return stage == self.stage and self.stage_epoch > 0 and self.optimizer is not None

    def begin_stage(self, stage: int) -> None:
        """Start `stage` afresh: no epoch yet, nothing selected."""
        self.stage, self.stage_epoch, self.stage_done = stage, 0, False
        self.best_f20, self.best_epoch, self.bad_epochs = -1.0, -1, 0

    def select(self, f20: float, model: torch.nn.Module) -> bool:
        """Keep `model`'s weights when this epoch's validation F20 (%) beats the stage's best;
        returns whether it did."""
        if f20 > self.best_f20:
            self.best_f20, self.best_epoch, self.bad_epochs = f20, self.epoch, 0
            self.best_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            return True
        self.bad_epochs += 1
        return False

    def end_epoch(self, row: dict, scfg: StageConfig) -> bool:
        """Count a finished epoch (its metrics.csv `row`) and decide whether the stage is done;
        returns whether early stopping ended it."""
        self.history.append(row)
        self.epoch += 1
        self.stage_epoch += 1
        early = scfg.patience is not None and self.bad_epochs >= scfg.patience
        self.stage_done = early or self.stage_epoch >= scfg.epochs
        return early


# --- The per-worker loop (Ray Train) --------------------------------------------------------------------
def _worker_threads(cfg: ExperimentConfig, local_world: int) -> int:
    """Torch threads of one Train worker: ``train.torch_threads``, else the machine's cores shared
    among the workers on it. Cluster plans set ``train.torch_threads`` to the CPUs a worker reserved
    (``seld.study.cluster.ClusterPlan.overrides``): on a shared node more threads than reserved CPUs
    oversubscribe it (BENCHMARKS.md: under contention 1 thread per training process ran 12x faster
    than 2); an embedded Ray reserves logical CPUs, not cores, so there the cores are the measure."""
    if cfg.train.torch_threads > 0:
        return cfg.train.torch_threads
    return max(1, (os.cpu_count() or 1) // max(1, local_world))


def _state_checkpoint(state: LoopState):
    """Ray Checkpoint of the resume state (written by rank 0 only)."""
    import ray.train

    tmp = tempfile.mkdtemp(prefix="seld-ckpt-")
    torch.save(state.to_checkpoint(), Path(tmp) / STATE_FILE)
    return ray.train.Checkpoint.from_directory(tmp), tmp


def _load_state() -> LoopState | None:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        blob = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    return LoopState.from_checkpoint(blob)


def _write_csv(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: row.get(k, "") for k in CSV_COLUMNS})
    write_text_atomic(path, buf.getvalue())


@dataclass(frozen=True)
class _WorkerData:
    """One worker's rows, from either engine (`data.engine`), and how they were planned and read."""

    sets: seld_data.WorkerSets  # the loop sees only these: training shares, validation, test reader
    plan: seld_data.RunPlan  # the driver's plan (build_trainer's "plan" entry of the loop config)
    ready_s: float  # seconds it took


@dataclass
class _Worker:
    """What a worker holds fixed for the whole run."""

    cfg: ExperimentConfig
    cfg_json: str
    run_dir: Path
    rank: int
    world: int
    device: torch.device
    amp: bool
    net: torch.nn.Module  # the bare model: validation, state dicts, checkpoints
    model: torch.nn.Module  # what trains: `net`, DDP-wrapped with several workers
    loss_fn: torch.nn.Module
    augment: Any
    val_mine: seld_data.ClipBatch  # the validation clips this worker scores
    mean: np.ndarray | None
    std: np.ndarray | None
    t_start: float  # unix time the worker started
    deadline: float  # unix time after which no new epoch starts
    mirror: Mirror | None = None  # the run folder's object store (rank 0 pushes to it), if any


def train_loop_per_worker(loop_cfg: dict) -> None:
    """Ray Train worker: both stages, per-epoch validation/checkpoint/report; rank 0 scores at the end.

    loop_cfg: {"config": to_dict(ExperimentConfig), "run_dir": str, "plan": the driver's data plan
    (`seld.data.RunPlan`, with the driver's `materialize` choice), "deadline": unix time after
    which no new epoch starts}.
    """
    import ray.train

    cfg = from_dict(ExperimentConfig, loop_cfg["config"])
    ctx = ray.train.get_context()
    torch.set_num_threads(_worker_threads(cfg, ctx.get_local_world_size()))
    t_start = time.time()
    mirror = loop_cfg.get("mirror")
    if mirror is not None and ctx.get_world_rank() == 0:
        # This node may not have the run folder (a restart on another node): the stage model
        # files written before are needed to score the run at the end.
        mirror.pull(skip=MIRROR_SKIP)
    data = _read_worker_data(cfg, loop_cfg["plan"], ctx.get_world_rank(), ctx.get_world_size(),
                             Path(loop_cfg["run_dir"]), mirror)
    restored = _load_state()
    w = _start_worker(cfg, loop_cfg, ctx, data, restored, t_start)
    state = restored or LoopState(stage=cfg.train.stage_numbers[0])
    state.norm_mean, state.norm_std, state.config = w.mean, w.std, w.cfg_json
    if w.rank == 0:
        _write_csv(w.run_dir / METRICS_CSV, state.history)
    for stage in cfg.train.stage_numbers:
        if state.pending(stage) and not _train_stage(w, state, stage, data.sets.train_sets[stage]):
            break  # the time budget ran out
    _finish_worker(w, data, state)


def _read_worker_data(cfg: ExperimentConfig, plan: seld_data.RunPlan, rank: int, world: int, run_dir: Path,
                      mirror: Mirror | None = None) -> _WorkerData:
    """This worker's training rows (per stage, its share: held once or streamed, as the driver
    chose, by its own reader or by Ray Data), its slice of the validation set (rank 0: all of it).
    Writes RUN/data/worker-<rank>.json: the engine, the clips of each of its stages, how they are
    held and how many bytes, the store files this process opened so far (0 with Ray Data; updated
    at the end); pushed to ``mirror``, the run folder's object store, if any."""
    t0 = time.perf_counter()
    (run_dir / SHARES_DIR).mkdir(exist_ok=True)
    order_log = run_dir / SHARES_DIR / f"clip-order-rank{rank}.txt" if cfg.data.record_order else None
    engine = seld_data.engine_of(cfg)
    sets = (seld_data.ray_worker_sets if engine == "ray_data" else seld_data.worker_sets)(
        cfg, plan, rank, world, order_log)
    ready_s = time.perf_counter() - t0
    data = _WorkerData(sets, plan, ready_s)
    _record_worker_data(data, run_dir, rank, world, mirror)
    log.info("rank %d: data ready in %.1f s (%s, %s; %s; val %d, mine %d)", rank, ready_s, engine,
             "materialised" if plan.materialize else "streamed", {k: len(v.rows) for k, v in sets.train_sets.items()},
             len(plan.sets["val"]), len(sets.val_mine))
    return data


def _record_worker_data(data: _WorkerData, run_dir: Path, rank: int, world: int, mirror: Mirror | None) -> None:
    """Write RUN/data/worker-<rank>.json (see :func:`_read_worker_data`)."""
    held = getattr(next(iter(data.sets.train_sets.values())), "held", None)
    record = {"rank": rank, "world": world, "engine": "ray_data" if data.sets.reader is None else "rowgroups",
              "path": "materialised" if data.plan.materialize else "streamed",
              "held_bytes": held.nbytes if held is not None else 0, "val_rows": len(data.sets.val_mine),
              "store_files_opened": data.sets.reader.files_opened if data.sets.reader is not None else 0,
              **{f"stage{s}": [str(c) for c in t.rows.clips] for s, t in data.sets.train_sets.items()}}
    write_json_atomic(run_dir / SHARES_DIR / f"worker-{rank}.json", record)
    if mirror is not None:
        mirror.push(only=[f"{SHARES_DIR}/worker-{rank}.json"])


def _start_worker(cfg: ExperimentConfig, loop_cfg: dict, ctx, data: _WorkerData,
                  restored: LoopState | None, t_start: float) -> _Worker:
    """The normalisation (restored, the init checkpoint's, or from the first stage's rows; rank 0
    writes norm.npz), the model (seeded, then the init checkpoint's or the restored weights), loss."""
    import ray.train.torch

    from seld.augment import Augmenter
    from seld.losses import build_loss

    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = Path(loop_cfg["run_dir"])
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    init_blob = read_model_file(cfg.train.init_checkpoint) if cfg.train.init_checkpoint else None
    if restored is not None:
        mean, std = restored.norm_mean, restored.norm_std
        log.info("rank %d: restored from checkpoint after epoch %d (stage %d, epoch %d of the stage)",
                 rank, restored.epoch, restored.stage, restored.stage_epoch)
    elif init_blob is not None and init_blob.get("norm_mean") is not None:
        mean, std = init_blob["norm_mean"].numpy(), init_blob["norm_std"].numpy()
    elif cfg.data.normalize:
        mean, std = seld_data.norm_from_sums(_all_reduce(data.sets.train_sets[cfg.train.stage_numbers[0]].sums()))
    else:
        mean = std = None
    if rank == 0 and mean is not None:
        with atomic_write(run_dir / NORM) as tmp, open(tmp, "wb") as f:  # np.savez(path) would add .npz
            np.savez(f, mean=mean, std=std)
    net = init_model(cfg)
    if init_blob is not None:
        load_weights(net, init_blob["model"], cfg.train.init_checkpoint)
    if restored is not None:
        net.load_state_dict(restored.model)
    net.to(device)
    return _Worker(cfg=cfg, cfg_json=json.dumps(loop_cfg["config"], sort_keys=True), run_dir=run_dir,
                   rank=rank, world=world, device=device, amp=bf16_autocast(device, cfg.train.amp_bf16),
                   net=net, model=ray.train.torch.prepare_model(net) if world > 1 else net,
                   loss_fn=build_loss(cfg.loss, cfg.model.output_format).to(device),
                   augment=Augmenter(cfg.augment), val_mine=data.sets.val_mine, mean=mean, std=std, t_start=t_start,
                   deadline=float(loop_cfg["deadline"]), mirror=loop_cfg.get("mirror"))


def _train_stage(w: _Worker, state: LoopState, stage: int, tset: seld_data.StageRows) -> bool:
    """Train a stage's epochs, or those left after a restore; False when the time budget ran out."""
    scfg = w.cfg.train.stage_config(stage)
    resumed = state.resumes(stage)
    if not resumed:
        if stage == 2 and 1 in w.cfg.train.stage_numbers:
            if state.best_model is None:
                raise RuntimeError("stage 1 selected no checkpoint (time budget too small?)")
            w.net.load_state_dict(state.best_model)  # stage 2 starts from stage 1's selected checkpoint
        state.begin_stage(stage)
    opt = stage_optimizer(w.model, scfg)
    if resumed:
        opt.load_state_dict(state.optimizer)
    done = scfg.epochs == 0
    while not done:
        # The run's first epoch always trains (without one there is no model to score or to mark);
        # after it the budget is checked before every epoch. A stopped run is recorded as such
        # (metrics.json `status` = "time_budget", `stages_done`), never as finished.
        over = state.epoch > 0 and time.time() > w.deadline
        if _all_reduce(np.array([float(over)]), "max")[0] > 0:
            log.warning("time budget of %.0f s reached in stage %d after %d epoch(s): the run is "
                        "recorded as status time_budget", w.cfg.train.time_budget_s, stage, state.epoch)
            return False
        row = _run_epoch(w, state, scfg, tset, opt)
        early = state.end_epoch(row, scfg)
        done = state.stage_done
        _save_epoch(w, state, opt, row)
        if early:
            log.info("stage %d: early stop after %d epochs without improvement", stage, state.bad_epochs)
    return True


def _run_epoch(w: _Worker, state: LoopState, scfg: StageConfig, tset: seld_data.StageRows, opt) -> dict:
    """Train one epoch, validate, update the selection (rank 0 writes the stage's best model file);
    returns the metrics.csv row."""
    cfg, epoch = w.cfg, state.epoch
    gen = seed_epoch(cfg.seed, w.rank, epoch, w.device)
    n_batches = int(_all_reduce(np.array([float(tset.n_batches(epoch))]), "min")[0])
    tot = _all_reduce(train_epoch(w.model, w.loss_fn, opt, tset.batches(epoch, n_batches), mean=w.mean,
                                  std=w.std, device=w.device, augment=w.augment, gen=gen, amp=w.amp,
                                  grad_clip=cfg.train.grad_clip))
    _sync_buffers(w.net)
    t_val = time.time()
    val_metrics = validate(w.net, w.val_mine, w.mean, w.std, cfg, w.device, w.amp,
                           reduce=_all_reduce)
    f20 = val_metrics["val/f20"]
    improved = state.select(f20, w.net)
    if improved and w.rank == 0:
        save_model_file(w.run_dir / CHECKPOINT_DIR / stage_checkpoint(state.stage), state.best_model,
                        w.cfg_json, w.mean, w.std, {"stage": state.stage, "epoch": epoch, "val/f20": f20})
    row = {"epoch": epoch, "stage": state.stage, "stage_epoch": state.stage_epoch, "lr": scfg.lr,
           "train/loss": tot[0] / max(tot[1], 1), "train/clips": int(tot[1]),
           "train/time_s": round(tot[3] / w.world, 3),
           "train/data_wait_frac": round(tot[2] / max(tot[3], 1e-9), 4), **val_metrics,
           BEST_F20: state.best_f20, "selected": int(improved),
           "val/time_s": round(time.time() - t_val, 3),  # validation and the selection's model file
           "elapsed_s": round(time.time() - w.t_start, 2)}
    log.info("epoch %d (stage %d): loss %.4f, val F20 %.2f%% (best %.2f%%), %.1f s", epoch, state.stage,
             row["train/loss"], f20, state.best_f20, tot[3] / w.world)
    return row


def _save_epoch(w: _Worker, state: LoopState, opt, row: dict) -> None:
    """Rank 0 writes metrics.csv and the resume state; every rank reports the epoch to Ray."""
    import ray.train

    state.model, state.optimizer = w.net.state_dict(), opt.state_dict()
    ckpt, tmp = None, None
    if w.rank == 0:
        _write_csv(w.run_dir / METRICS_CSV, state.history)
        ckpt, tmp = _state_checkpoint(state)
    ray.train.report({k: v for k, v in row.items() if isinstance(v, int | float)}, checkpoint=ckpt)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    if w.mirror is not None and w.rank == 0:
        # After the report: Ray has stored the epoch's resume state, so the store's metrics.csv
        # never lists an epoch that a restart would train again.
        w.mirror.push(skip=MIRROR_SKIP)


def _finish_worker(w: _Worker, data: _WorkerData, state: LoopState) -> None:
    """Rank 0 scores the selected model and writes metrics.json; every rank reports once more."""
    import ray.train

    final: dict[str, Any] = {}
    if w.rank == 0:
        t_fin = time.time()
        final = _finish(w, data, state)
        final["cost/finish_s"] = round(time.time() - t_fin, 2)
        final["cost/data_ready_s"] = round(data.ready_s, 2)
        final["data/path"] = "materialised" if data.plan.materialize else "streamed"
        final["data/engine"] = seld_data.engine_of(w.cfg)
        final["data/held_gib"] = round(data.plan.held_bytes / 2**30, 4) if data.plan.materialize else 0.0
        final["cost/train_loop_s"] = round(time.time() - w.t_start, 2)
        write_json_atomic(w.run_dir / METRICS_JSON, final)
        if w.mirror is not None:
            w.mirror.push(skip=MIRROR_SKIP)
    _record_worker_data(data, w.run_dir, w.rank, w.world, w.mirror)  # the files opened over the whole run
    # The final report carries the test figures and the run's best validation F20 (BEST_F20, as
    # every epoch's report). Its marker is not called "done": Tune reads a "done" key as "end this
    # trial now" and would kill it before the run's files are written.
    ray.train.report({RUN_FINISHED: 1, **{k: v for k, v in final.items() if isinstance(v, int | float)}})


def _finish(w: _Worker, data: _WorkerData, state: LoopState) -> dict:
    """Rank 0: copy the selected checkpoint, score it in memory (seld/evaluate.py), write thresholds.json,
    the validation predictions of the selection (``predictions_val/``) and the test predictions;
    returns metrics.json's content (scores + the run's cost).

    The selected checkpoint is the best epoch of the last stage trained. metrics.json's ``status``
    is "ok" when every configured stage ran all its epochs (or stopped early), else "time_budget"
    (the budget stopped training): its ``test*`` scores are then those of the last stage trained,
    which ``selected_stage`` names, and the study tables leave the run out. ``val/best_f20`` is that
    stage's best per-epoch validation F20 (metrics.csv), the value the run reported to Tune every
    epoch; metrics.json's ``val/f20``, scored again here, equals it (the same decoding and batching).
    """
    cfg, run_dir, history, stages = w.cfg, w.run_dir, state.history, w.cfg.train.stage_numbers
    ckpt_dir = run_dir / CHECKPOINT_DIR
    ran = [s for s in stages if (ckpt_dir / stage_checkpoint(s)).is_file()]
    if not ran:
        raise RuntimeError(f"{run_dir}: no epoch finished, nothing to evaluate")
    sel_stage = ran[-1]
    sel_path = ckpt_dir / stage_checkpoint(sel_stage)
    shutil.copyfile(sel_path, ckpt_dir / SELECTED)
    stage1 = read_model_file(ckpt_dir / stage_checkpoint(1)) if 1 in ran and sel_stage == 2 else None
    tests = data.sets.read_tests()
    scores = evaluate_run(w.net, read_model_file(sel_path), data.sets.val, tests, cfg, w.mean, w.std, w.device,
                          w.amp, stage1=stage1)
    save_thresholds(run_dir / THRESHOLDS, scores.thresholds)
    write_predictions(run_dir / PREDICTIONS_VAL, data.sets.val.clips, scores.val_predictions)
    for folder, preds in scores.predictions.items():
        write_predictions(run_dir / folder, tests["test"].clips, preds)
    # Per-test-file counters of every scored test set: the study's paired file-level intervals.
    save_counters(run_dir / TEST_COUNTERS, tests["test"].clips, scores.counters)
    done = tuple(s for s in stages if not state.pending(s))
    status = "ok" if set(done) >= set(stages) else "time_budget"
    best = max((r["val/f20"] for r in history if r["stage"] == sel_stage), default=scores.metrics["val/f20"])
    if best != scores.metrics["val/f20"]:
        # Several workers score their validation slices in other batches than rank 0 scores the
        # whole set here; on some devices (a GPU's batch-size-dependent kernels) outputs differ in
        # the last bits, and an event near a threshold can flip.
        log.warning("%s: the selected epoch's validation F20 %.6f (metrics.csv) differs from the same "
                    "checkpoint's %.6f scored at the end", run_dir, best, scores.metrics["val/f20"])
    metrics: dict[str, Any] = {"status": status, "stages_done": list(done), "selected_stage": sel_stage,
                               "selected_checkpoint": f"{CHECKPOINT_DIR}/{stage_checkpoint(sel_stage)}",
                               **scores.metrics, BEST_F20: best}
    clips = sum(r["train/clips"] for r in history)
    t_train = sum(r["train/time_s"] for r in history)
    metrics.update({
        "precision": "bf16" if w.amp else "float32",
        "precision_reason": precision_decision(w.device, cfg.train.amp_bf16)[1],
        **machine_record(w.device),  # rank 0's machine at the end (a restored run may have moved)
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
    """Create the run folder and its config.json; refuse to mix runs (resume needs the same config,
    bounds such as the time budget aside)."""
    cfg_path = run_dir / CONFIG_JSON
    if cfg_path.exists():
        if not resume:
            raise UserError(f"{run_dir}: already holds a run; pass --resume to continue it or choose "
                            "another --out")
        # Only a bound may differ (RUN_BOUNDS: a run stopped by its time budget continues under
        # another); config.json then records this attempt's bound.
        old, new = run_config_dict(json.loads(cfg_path.read_text())), run_config_dict(cfg)
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise UserError(f"{cfg_path}: --resume with another config (sections differ: {diff})")
    elif resume:
        raise UserError(f"{run_dir}: nothing to resume (no config.json)")
    (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    save_json(cfg, cfg_path)


def worker_memory_bytes(cfg: ExperimentConfig) -> float | None:
    """Memory one Train worker has: Ray's `memory` of the smallest alive node that can host a worker
    (its CPUs, and a GPU when train.use_gpu), divided by the workers that node can host. None when no
    such node is up (an autoscaling cluster before its GPU nodes start)."""
    import ray

    tcfg = cfg.train
    per_node = []
    for node in ray.nodes():
        res = node.get("Resources", {}) if node.get("Alive") else {}
        slots = int(res.get("CPU", 0) // tcfg.cpus_per_worker) if tcfg.cpus_per_worker > 0 else tcfg.num_workers
        if tcfg.use_gpu:
            slots = min(slots, int(res.get("GPU", 0)))
        if slots >= 1 and res.get("memory"):
            per_node.append(res["memory"] / min(slots, tcfg.num_workers))
    return min(per_node) if per_node else None


def choose_data_path(cfg: ExperimentConfig, plan: seld_data.RunPlan) -> seld_data.RunPlan:
    """The plan with `materialize` decided (seld.data.choose_path from the largest share's bytes and a
    worker's memory: data.worker_memory_gib, else :func:`worker_memory_bytes`; Ray must be up), and
    the reason logged. A plan that already has the decision is returned as it is."""
    if plan.materialize is not None:
        return plan
    memory = (cfg.data.worker_memory_gib * 2**30 if cfg.data.worker_memory_gib is not None
              else worker_memory_bytes(cfg))
    materialize, why = seld_data.choose_path(plan.held_bytes, memory, cfg.data)
    log.info("data: %s", why)
    return replace(plan, materialize=materialize)


class _DriverSignals:
    """Around Train V2's ``fit()``: tells a Ctrl-C from a SIGTERM, and removes Train's SIGINT handler after.

    On the driver's main thread (`seld train`), ``fit()`` installs a SIGINT handler that aborts the
    run, after which the driver's wait on the run raises ``SystemExit(1)``; it leaves that handler
    installed (a Ctrl-C after ``fit()`` would be ignored, a third one exit 0). Ray's driver SIGTERM
    handler also ends the wait with ``SystemExit(1)``. So a ``SystemExit`` out of ``fit()`` is a
    Ctrl-C (:attr:`ctrl_c`) only on the main thread and when no SIGTERM came; in a Tune trial (not
    the main thread) it never is. The SIGINT and SIGTERM handlers are restored on exit.
    """

    def __enter__(self) -> _DriverSignals:
        self.main = threading.current_thread() is threading.main_thread()
        self.terminated = False
        if self.main:
            self._sigint, self._sigterm = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
            if callable(self._sigterm) or self._sigterm == signal.SIG_DFL:
                signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum, frame) -> None:
        self.terminated = True
        if callable(self._sigterm):
            self._sigterm(signum, frame)
        else:  # the default action, as if this handler were not there
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def __exit__(self, *exc) -> None:
        if self.main:
            for signum, handler in ((signal.SIGINT, self._sigint), (signal.SIGTERM, self._sigterm)):
                if handler is not None:  # None: not set from Python, nothing to restore
                    signal.signal(signum, handler)

    @property
    def ctrl_c(self) -> bool:
        return self.main and not self.terminated


def build_trainer(cfg: ExperimentConfig, store: str | Path, run_dir: str | Path, *,
                  run_callbacks=(), storage_path: str | None = None, name: str | None = None,
                  plan: seld_data.RunPlan | None = None, mirror: Mirror | None = None):
    """A TorchTrainer for one run (does not start it; Ray must be initialised).

    Args:
        cfg: the experiment config (train.* gives workers, CPUs/GPU, failures, time budget).
        store: the feature store folder.
        run_dir: the run folder (must exist; rank 0 writes metrics, checkpoints, predictions here).
        run_callbacks: Ray Train callbacks (e.g. Tune's TuneReportCallback), after the run's own
            (:class:`seld.train_callbacks.CheckpointMarker`: RUN/checkpointed.json).
        storage_path, name: where Ray keeps the resume states (default RUN/ray/train); the same
            pair again resumes from the latest state.
        plan: the run's data plan (`seld.data.plan_run`), made here when not given. Each worker gets
            the plan and reads only its share from the store; whether it holds the share or
            streams it is decided here unless the plan has it (:func:`choose_data_path`).
        mirror: the run folder's object store (``--storage s3://...``): Ray keeps the resume states
            there (RUN_URI/ray/train, through the mirror's filesystem) and rank 0 pushes the run
            folder to it after every epoch and at the end.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from seld.train_callbacks import CheckpointMarker

    run_dir = Path(run_dir).resolve()
    plan = choose_data_path(cfg, plan or seld_data.plan_run(cfg, store))
    cpus = cfg.train.cpus_per_worker
    # Nodes labelled as trainer nodes (a mixed cluster) take the Train workers, and only they do.
    trainer_nodes = _nodes_labelled(seld_data.TRAINER_NODE_LABEL)
    scaling = ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                      resources_per_worker={"CPU": cpus, **({"GPU": 1} if cfg.train.use_gpu else {})},
                                      label_selector=dict(seld_data.TRAINER_NODE_LABEL) if trainer_nodes else None)
    run_config = ray.train.RunConfig(
        name=name or RAY_RUN_NAME,
        storage_path=(storage_path or mirror.path(RAY_SUBDIR)) if mirror is not None
        else str(storage_path or run_dir / RAY_SUBDIR),
        storage_filesystem=mirror.fs if mirror is not None else None,
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        callbacks=[CheckpointMarker(run_dir, mirror), *run_callbacks],
    )
    loop_cfg = {"config": to_dict(cfg), "run_dir": str(run_dir), "plan": plan,
                "deadline": time.time() + cfg.train.time_budget_s, **({"mirror": mirror} if mirror else {})}
    if seld_data.engine_of(cfg) != "ray_data":
        return TorchTrainer(train_loop_per_worker, train_loop_config=loop_cfg, scaling_config=scaling,
                            run_config=run_config)
    # Ray Data reads on the data nodes where the cluster has them (else wherever CPUs are free).
    data_nodes = _nodes_labelled(seld_data.DATA_NODE_LABEL)
    with seld_data.ray_data_context(cfg, seld_data.DATA_NODE_LABEL if data_nodes else None) as options:
        t0 = time.perf_counter()
        datasets = seld_data.ray_datasets(cfg, plan)
        log.info("data: Ray Data engine, %d datasets%s%s (%.1f s)", len(datasets),
                 ", materialised" if plan.materialize else "",
                 f", on {data_nodes} data node(s)" if data_nodes else "", time.perf_counter() - t0)
        # Nothing is split by Ray: each rank takes its own datasets whole (seld/data.py, "The Ray Data engine").
        return TorchTrainer(train_loop_per_worker, train_loop_config=loop_cfg, scaling_config=scaling,
                            run_config=run_config, datasets=datasets,
                            dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=options))


def _nodes_labelled(label: dict[str, str]) -> int:
    """Alive nodes of the Ray cluster that carry every key/value of `label` (Ray must be up)."""
    import ray

    return sum(1 for n in ray.nodes()
               if n.get("Alive") and all(n.get("Labels", {}).get(k) == v for k, v in label.items()))


def run_training(cfg: ExperimentConfig, store: str | Path, run_dir: str | Path, *, resume: bool = False,
                 wandb: dict | None = None, run_callbacks=(), mirror: Mirror | None = None,
                 store_filesystem=None) -> dict:
    """Train one run end to end and return the content of RUN/metrics.json.

    Args:
        wandb: None, or {"project": str, "group": str | None}: log config, per-epoch rows, final
            metrics and the per-class table to one W&B run in RUN/wandb (offline unless WANDB_MODE).
        mirror: the run folder's object store, ``run_dir`` being its staging folder (already
            pulled by the caller): pushed after config.json is written and at the end.
        store_filesystem: a bucket store's pyarrow filesystem (credentials in memory, as the
            mirror's); None: built from this process's environment (seld.storage).
    """
    import ray.train

    # Lazily: the Train workers import this module, and need neither the study package nor Ray's start.
    from seld.study.session import init_ray

    t0 = time.time()
    run_dir = Path(run_dir).resolve()
    # Plan once, from the store's index (feature config, the splits each set needs, each worker's
    # share): bad input fails here, before anything is created or started.
    plan = seld_data.plan_run(cfg, store, store_filesystem)
    t_ray = init_ray(num_workers=cfg.train.num_workers)
    plan = choose_data_path(cfg, plan)  # a forced materialise that cannot fit fails here, before any file
    run_dir.mkdir(parents=True, exist_ok=True)
    prepare_run_dir(cfg, run_dir, resume)
    if mirror is not None:
        mirror.push(skip=MIRROR_SKIP)
    logger = WandbLogger(cfg, run_dir, wandb) if wandb else None
    try:
        trainer = build_trainer(cfg, store, run_dir, run_callbacks=run_callbacks, plan=plan, mirror=mirror)
        try:
            with _DriverSignals() as signals:
                trainer.fit()
        except ray.train.TrainingFailedError as e:
            causes = [getattr(x, "cause", x) for x in getattr(e, "worker_failures", {}).values()]
            for cause in causes:  # a bad input met in a worker (e.g. a full disk): one line, as on the driver
                if isinstance(cause, UserError):
                    # Same class as the worker's error (DataError stays DataError), one line.
                    raise type(cause)(f"{str(cause).strip().splitlines()[-1]} (training run {run_dir} stopped)") from e
            raise RuntimeError(f"training failed ({run_dir}): {e}") from e
        except SystemExit as e:
            if not signals.ctrl_c:  # SIGTERM (`ray job stop`, SLURM, timeout), or a trial's quiet stop
                raise
            # An interrupt, for the CLI (exit 130; it was exit 1 with no word): the folder keeps its last epoch.
            raise KeyboardInterrupt(f"run folder {run_dir} keeps its last finished epoch; the same command "
                                    f"with --resume continues it") from e
        if mirror is not None and not (run_dir / METRICS_JSON).is_file():
            mirror.pull(skip=MIRROR_SKIP)  # rank 0 ran on another node
        metrics = json.loads((run_dir / METRICS_JSON).read_text())
        metrics["cost/wall_s"] = round(time.time() - t0, 2)
        # What small runs cost besides training: starting Ray here, then everything between the
        # driver and the worker's loop (trainer controller, worker group, dataset planning).
        metrics["cost/ray_start_s"] = round(t_ray, 2)
        metrics["cost/trainer_start_s"] = round(metrics["cost/wall_s"] - t_ray - metrics["cost/train_loop_s"], 2)
        write_json_atomic(run_dir / METRICS_JSON, metrics)
        if logger:
            logger.finish(metrics)
        return metrics
    finally:
        if logger:
            logger.close()
        if mirror is not None:
            mirror.push(skip=(f"{RAY_SUBDIR}/*",))  # metrics.json's costs, the W&B offline run
