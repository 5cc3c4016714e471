"""The Ray Data engine (`data.engine=ray_data`, seld/data.py): `seld train` through it, determinism
of each rank's clip order (two runs, and a worker killed and restored) for both engines, what the
engines share (rows per rank and epoch, normalisation), and a smoke study whose trials each run Ray
Data on the session's Ray.

The runs share one config (2 Train workers, 3 + 1 epochs, the clip order recorded:
RUN/data/clip-order-rank<r>.txt, one line per trained epoch) and the session's store and Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from seld.config import preset_config
from seld.runfolder import CHECKPOINTED

ROOT = Path(__file__).resolve().parent.parent
SETS = {"train.num_workers": 2, "train.stage1.epochs": 3, "train.stage2.epochs": 1, "train.max_failures": 1,
        "train.time_budget_s": 3600.0, "train.torch_threads": 1, "data.record_order": True}
TIMING_COLUMNS = {"train/time_s", "train/data_wait_frac", "val/time_s", "elapsed_s"}
SCORES = ("test/f20", "test/doae_cd", "test/rde_cd", "test_pp/f20", "val/f20")



def _cfg(engine: str):
    return preset_config("smoke", {**SETS, "data.engine": engine})


def _orders(run: Path) -> dict[tuple[int, str, int], list[list[str]]]:
    """{(rank, stage, epoch): [clip order of each time the epoch was trained]} of a run."""
    out: dict = {}
    for path in sorted((run / "data").glob("clip-order-rank*.txt")):
        rank = int(path.stem.removeprefix("clip-order-rank"))
        for line in path.read_text().splitlines():
            stage, epoch, *clips = line.split(" ")
            out.setdefault((rank, stage, int(epoch)), []).append(clips)
    return out


def _table(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS}
            for r in pd.read_csv(run / "metrics.csv").to_dict("records")]


@pytest.fixture(scope="module")
def ray_data_runs(smoke_store, ray_session, tmp_path_factory) -> dict[str, Path]:
    """Two Ray Data runs; the first through the CLI, as a user starts it."""
    from seld.cli import main
    from seld.train import run_training

    tmp = tmp_path_factory.mktemp("ray_data")
    out = {"ray_data": tmp / "first", "ray_data_again": tmp / "again"}
    sets = [x for k, v in {**SETS, "data.engine": "ray_data"}.items() for x in ("--set", f"{k}={v}")]
    assert main(["train", str(smoke_store), "--preset", "smoke", "--out", str(out["ray_data"]), *sets]) == 0
    run_training(_cfg("ray_data"), smoke_store, out["ray_data_again"])
    return out


@pytest.fixture(scope="module")
def runs(ray_data_runs, smoke_store, tmp_path_factory) -> dict[str, Path]:
    """Two runs with each engine."""
    from seld.train import run_training

    tmp = tmp_path_factory.mktemp("rowgroups")
    out = {**ray_data_runs, "rowgroups": tmp / "first", "rowgroups_again": tmp / "again"}
    for name in ("rowgroups", "rowgroups_again"):
        run_training(_cfg("rowgroups"), smoke_store, out[name])
    return out


def test_engine_is_checked_and_subsampled_batches_are_refilled():
    """A bad engine is one line naming the field; the Ray Data engine's stage-1 subsample drops rows
    as Ray's batches arrive and refills whole batches, keeping the arrival order."""
    import torch

    from seld.config import ConfigError
    from seld.data import _rebatched

    with pytest.raises(ConfigError, match="data.engine.*'spark'"):
        preset_config("smoke", {"data.engine": "spark"})
    rows = np.arange(23)
    arrived = [{"features": torch.from_numpy(np.repeat(rows[a:a + 5, None], 3, 1)),
                "targets": torch.from_numpy(rows[a:a + 5, None] * 2.0), "row": torch.from_numpy(rows[a:a + 5])}
               for a in range(0, 23, 5)]
    keep = rows % 3 != 0
    out = list(_rebatched(arrived, keep, 4))
    assert [len(b[2]) for b in out] == [4, 4, 4, 3]
    assert np.array_equal(np.concatenate([b[2] for b in out]), rows[keep])
    assert all(np.array_equal(f[:, 0], r) and np.array_equal(t[:, 0], 2.0 * r) for f, t, r in out)
    assert [len(b[2]) for b in _rebatched(arrived, None, 4)] == [5, 5, 5, 5, 3]  # Ray's own batches, as they come


@pytest.mark.ray
def test_a_ray_data_share_short_of_rows_stops_the_epoch_by_name(smoke_store, ray_session):
    """A rank whose dataset delivers fewer rows than planned (the store changed under a streamed
    run) raises a DataError naming the dataset instead of yielding a short epoch."""
    from seld import data as seld_data
    from seld.errors import DataError

    cfg = preset_config("smoke", {"train.stages": "stage1", "train.num_workers": 1, "data.engine": "ray_data"})
    plan = seld_data.plan_run(cfg, smoke_store)
    with seld_data.ray_data_context(cfg):
        datasets = seld_data.ray_datasets(cfg, plan)
    name = seld_data.train_dataset_name(1, 0)
    rows = plan.shares[0]["stage1"]
    bs = cfg.train.batch_size
    short = seld_data.RayTrainSet("stage1", cfg, 0, rows, plan.layout, name,
                                  shards=lambda n: datasets[n].limit(len(rows) - 2 * bs).iterator())
    n = short.n_batches(0)
    assert n >= 3
    with pytest.raises(DataError, match=rf"dataset '{name}' delivered {n - 2} batches of epoch 0 where the plan has {n}"):
        for _ in short.batches(0, n):
            pass


@pytest.mark.ray
def test_a_ray_data_share_reads_its_files_in_a_seeded_order_that_mixes_the_splits(smoke_store, ray_session,
                                                                                  tmp_path):
    """A training share's blocks arrive file by file in an order seeded by (seed, rank, stage), not
    in the store's (which is split by split: an epoch would read every real clip, then every
    synthetic one, mixed only within the 1 024-row shuffle buffer): both domains in the first half
    of the blocks, the same order again for the same seed, another for another seed."""
    from seld import data as seld_data
    from seld.store import replicate_store

    store = replicate_store(smoke_store, tmp_path / "store", n_rows=640, shard_rows=16)

    def arrival(seed: int) -> list[str]:
        cfg = preset_config("smoke", {"train.stages": "stage1", "train.num_workers": 1, "data.engine": "ray_data",
                                      "seed": seed})
        plan = seld_data.plan_run(cfg, store)
        rows = plan.shares[0]["stage1"]
        with seld_data.ray_data_context(cfg):
            ds = seld_data.ray_datasets(cfg, plan)[seld_data.train_dataset_name(1, 0)]
        files = []
        for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
            shard = plan.layout.shards[int(rows.shard[block["row"][0]])]
            assert all(plan.layout.shards[int(i)] == shard for i in rows.shard[block["row"]])  # a block: one file
            files.append(Path(str(shard)).name)
        assert sorted(files) == sorted({Path(str(plan.layout.shards[int(i)])).name for i in rows.shard})
        return files

    first = arrival(0)
    assert len(first) >= 12 and first != sorted(first)
    half = first[:len(first) // 2]
    assert any("synth" in f for f in half) and any("synth" not in f for f in half), first
    assert arrival(0) == first
    assert arrival(1) != first


@pytest.mark.ray
@pytest.mark.slow
def test_seld_train_with_ray_data_feeds_the_planned_shares_and_opens_no_store_file(runs):
    run = runs["ray_data"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["data/engine"] == "ray_data"
    orders = _orders(run)
    assert sorted({k[1:] for k in orders}) == [("stage1", 0), ("stage1", 1), ("stage1", 2), ("stage2", 3)]
    for rank in (0, 1):
        worker = json.loads((run / "data" / f"worker-{rank}.json").read_text())
        # The Train worker constructed no store reader: Ray Data tasks did all the reading.
        assert worker["engine"] == "ray_data" and worker["store_files_opened"] == 0
        for (r, stage, _), [clips] in orders.items():
            if r == rank:  # every epoch trains each of the rank's planned clips exactly once
                assert sorted(clips) == sorted(worker[stage]), (rank, stage)
    rowgroups = json.loads((runs["rowgroups"] / "data" / "worker-0.json").read_text())
    assert rowgroups["engine"] == "rowgroups" and rowgroups["store_files_opened"] > 0


@pytest.mark.ray
@pytest.mark.slow
def test_each_engine_draws_the_same_clip_order_in_two_runs(runs):
    for engine in ("ray_data", "rowgroups"):
        first, again = _orders(runs[engine]), _orders(runs[f"{engine}_again"])
        assert first and first == again, engine
        assert _table(runs[engine]) == _table(runs[f"{engine}_again"]), engine
        a, b = (json.loads((runs[n] / "metrics.json").read_text()) for n in (engine, f"{engine}_again"))
        assert {k: a[k] for k in SCORES} == {k: b[k] for k in SCORES}, engine


@pytest.mark.ray
@pytest.mark.slow
def test_the_engines_train_the_same_rows_per_rank_and_epoch_and_normalise_alike(runs):
    """Same rows per rank and epoch (the order differs: file order through a seeded buffer against a
    seeded order of row groups), and the same normalisation to float rounding."""
    ray, rows = _orders(runs["ray_data"]), _orders(runs["rowgroups"])
    assert ray.keys() == rows.keys()
    for key in ray:
        assert sorted(ray[key][0]) == sorted(rows[key][0]), key
    assert any(ray[k][0] != rows[k][0] for k in ray)  # not the same order (as documented)
    a, b = (np.load(runs[n] / "norm.npz") for n in ("ray_data", "rowgroups"))
    np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-6)
    np.testing.assert_allclose(a["std"], b["std"], rtol=1e-6)


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_ray_data_worker_restores_and_draws_the_same_clip_order(ray_data_runs, smoke_store, ray_session,
                                                                         tmp_path):
    """A Train worker SIGKILLed after Ray registered an epoch's checkpoint: Train restarts the worker
    group, which takes its datasets again; every epoch, first or redone, draws the order of the run
    without the kill, and the run ends with its scores."""
    from ray.util.state import list_actors

    from seld.train import run_training

    run = tmp_path / "run"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_training(_cfg("ray_data"), smoke_store, run)))
    thread.start()
    killed, deadline = None, time.time() + 300
    while time.time() < deadline and killed is None and thread.is_alive():
        time.sleep(0.3)
        marker = run / CHECKPOINTED  # the last checkpoint Ray Train registered (CheckpointMarker)
        epoch = json.loads(marker.read_text())["epoch"] if marker.exists() else None
        if epoch is not None and epoch < 3:
            actors = list_actors(address=ray_session.get_runtime_context().gcs_address,
                                 filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if actors:
                killed = actors[-1].pid
                os.kill(killed, signal.SIGKILL)
    thread.join(timeout=400)
    assert killed is not None, "the run finished before a worker could be killed"
    assert result.get("status") == "ok", "training did not finish after the restore"
    restored, straight = _orders(run), _orders(ray_data_runs["ray_data"])
    assert restored.keys() == straight.keys()
    # Epochs after the kill ran in a new worker process with new iterators (an epoch recorded before
    # the kill but after the registered checkpoint is trained, and recorded, twice).
    for key, orders in restored.items():
        assert all(o == straight[key][0] for o in orders), key
    assert _table(run) == _table(ray_data_runs["ray_data"])


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.own_cluster
def test_on_a_mixed_cluster_data_tasks_run_on_data_nodes_and_train_on_the_trainer(smoke_store, tmp_path):
    """A loopback cluster as the design's cloud cluster: a head for drivers (no CPUs), a trainer node
    (label seld-node=trainer, 1 CPU) and a CPU-only data node (seld-node=data). `seld train` with Ray Data,
    as a driver process of its own: Ray's state API shows every task (Ray Data's listing, reading
    and encoding) on the data nodes and the Train worker on the trainer node, and the worker records
    that it opened no store file."""
    from ray.util.state import list_actors, list_tasks
    from test_multinode import NODE_SCRIPT, LoopbackCluster

    cluster = LoopbackCluster(tmp_path)

    def add(name: str, cpus: int, label: str) -> None:
        args = {"gcs_address": cluster.address, "node_ip_address": "127.0.0.1", "num_cpus": cpus, "num_gpus": 0,
                "labels": {"seld-node": label}, "object_store_memory": 150 << 20}
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (the node's lifetime)
        cluster.nodes[name] = subprocess.Popen([sys.executable, "-c", NODE_SCRIPT, json.dumps(args)],
                                               env=cluster.env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True)

    try:
        cluster.start_head()
        cluster.wait_nodes(1)
        add("trainer", 1, "trainer")  # one at a time: a loaded 2-core machine times out several at once
        cluster.wait_nodes(2)
        add("data", 2, "data")
        nodes = cluster.wait_nodes(3)
        by_label = {n.node_id: (n.labels or {}).get("seld-node", "head") for n in nodes}
        run = tmp_path / "run"
        env = {**cluster.env, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "seld", "train", str(smoke_store), "--preset", "smoke", "--out", str(run),
               "--set", "data.engine=ray_data", "--set", "train.torch_threads=1"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        tasks = list_tasks(address=cluster.address, detail=True, limit=10000, raise_on_missing_output=False,
                           filters=[("type", "=", "NORMAL_TASK")])
        reads = [t for t in tasks if "ReadParquet" in t.name or "ReadFiles" in t.name]
        assert reads, sorted({t.name for t in tasks})
        placed = {(t.name, by_label.get(t.node_id)) for t in tasks if t.node_id}
        assert {label for _, label in placed} == {"data"}, placed
        actors = list_actors(address=cluster.address, detail=True, limit=10000, raise_on_missing_output=False)
        workers = [a for a in actors if a.class_name == "RayTrainWorker"]
        assert workers and {by_label[a.node_id] for a in workers} == {"trainer"}
        # Ray Data's own actors (none expected with the V1 reader; V2's footer readers would be
        # placed anywhere) are on the data nodes too.
        data_actors = {(a.class_name, by_label.get(a.node_id)) for a in actors
                       if any(k in a.class_name for k in ("Footer", "Read", "Map"))}
        assert {label for _, label in data_actors} <= {"data"}, data_actors
        worker = json.loads((run / "data" / "worker-0.json").read_text())
        assert worker["engine"] == "ray_data" and worker["store_files_opened"] == 0
        assert json.loads((run / "metrics.json").read_text())["status"] == "ok"
    finally:
        cluster.shutdown()
