"""The cluster path on a real three-node Ray cluster on loopback (cluster/loopback.yaml): a head
that offers no CPUs to trials but the trial-driver resource, and 2-CPU worker nodes standing in for
spot nodes. The smoke ablation runs through `--cluster` as a separate driver process; the node
holding a trial's Train worker is SIGKILLed (its raylet and every process under it) twice, and a
replacement node joins each time: the second loss strikes a run already restored once.

The nodes are `ray start --block` processes of their own (distinct ports, 127.0.0.1 only) and the
study is a subprocess: this test process never connects to the cluster, so a session Ray of the
test run (tests/conftest.py) may stay up beside it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from seld.config import preset_config
from seld.runfolder import CHECKPOINTED

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = ROOT / "cluster/loopback.yaml"
CANARY = "canary-wandb-key-0123456789abcdef"
KILLS = 2  # node losses: the second strikes a run already restored from the first
# Enough epochs for both kills, each after a registered checkpoint, with room to spare: a kill
# waits for row >= 2 (the next one for a row trained since the restore) and must leave >= 2 epochs,
# so rows 2..10 are open to them; seen here: the first kill at row 2 to 5 (a loaded machine
# registers the first epochs late), each next one 1 or 2 rows later.
STAGE1_EPOCHS = 12
TIMING_COLUMNS = {"train/time_s", "train/data_wait_frac", "val/time_s", "elapsed_s"}  # metrics.csv columns that vary
PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
              "runtime-env-agent-port", "node-manager-port", "object-manager-port")


# One worker node in its own process, as ray.cluster_utils.Cluster.add_node starts one (its raylet,
# agents and workers are this process's descendants); SIGTERM stops it cleanly. Private names, in a
# test only: no public call starts a node that joins on loopback (see add_worker).
NODE_SCRIPT = """
import json, signal, sys, time
import ray._private.node, ray._private.parameter
params = ray._private.parameter.RayParams(**json.loads(sys.argv[1]))
params.update_if_absent(min_worker_port=0, max_worker_port=0, node_manager_port=0, include_log_monitor=False)
params.dashboard_agent_listen_port = None
node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=False)
print("node", node.unique_id, flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(3600)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (children of children ..., from /proc: bench/proctree.py)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.append(str(ROOT / "bench"))
    import proctree

    return proctree.tree(pid)[1:]


class LoopbackCluster:
    """A head and worker nodes, each one `ray start --block` process on 127.0.0.1."""

    def __init__(self, tmp: Path):
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="rayml", dir="/tmp"))  # Unix sockets: short paths
        self.logs = tmp
        self.port, self.dash = _free_port(), _free_port()
        bin_dir = Path(sys.executable).parent
        self.ray = str(bin_dir / "ray")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RAY_ADDRESS"))}
        # Node processes never see the W&B key: a trial that has it got it through the runtime env.
        # Node death is noticed within seconds (defaults: 5 x 3 s after a 5 s delay).
        self.env = {**env, "RAY_TMPDIR": str(self.ray_tmp), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}:{env['PATH']}",
                    "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                    "RAY_health_check_failure_threshold": "3", "RAY_health_check_timeout_ms": "1000",
                    # A raylet takes long to register on a loaded 2-core machine (default 10 s).
                    "RAY_raylet_start_wait_time_s": "120",
                    # No 30-s drain when a node is stopped at the end (Ray's default for SIGTERM,
                    # for Serve's replicas): nothing here is left to drain.
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                    # Train's controller collects reported checkpoints at this interval (default 2 s):
                    # shorter here because the smoke epochs last ~2 s, where real ones last minutes.
                    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
        self.nodes: dict[str, subprocess.Popen] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        ports = [f"--{flag}={_free_port()}" for flag in PORT_FLAGS]
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 (the node's lifetime)
        proc = subprocess.Popen([self.ray, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                                 *args, *ports], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.nodes[name] = proc
        return proc

    def start_head(self) -> None:
        self._start("head", ["--head", f"--port={self.port}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={self.dash}", f"--ray-client-server-port={_free_port()}",
                             "--num-cpus=0", '--resources={"seld_driver": 100}', f"--temp-dir={self.ray_tmp}"])

    def add_worker(self) -> str:
        """A 2-CPU worker node (and a resource named after it), started as `ray.cluster_utils`
        starts one: `ray start --address` refuses to join with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
        which is what keeps every Ray process on 127.0.0.1 (notes/ray-2.60.md)."""
        name = f"worker{len(self.nodes)}"
        args = {"gcs_address": self.address, "node_ip_address": "127.0.0.1", "num_cpus": 2, "num_gpus": 0,
                "resources": {name: 1}, "object_store_memory": 150 << 20}
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 (the node's lifetime)
        self.nodes[name] = subprocess.Popen([sys.executable, "-c", NODE_SCRIPT, json.dumps(args)], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return name

    def alive_nodes(self) -> list:
        from ray.util.state import list_nodes

        return list_nodes(address=self.address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)

    def wait_nodes(self, n: int, timeout_s: float = 240) -> list:
        t0 = time.time()
        while True:
            try:
                nodes = self.alive_nodes()
                if len(nodes) >= n:
                    return nodes
            except Exception:  # the GCS / dashboard not up yet
                pass
            if time.time() - t0 > timeout_s:
                logs = "".join((self.logs / f"{k}.log").read_text()[-1500:] for k in self.nodes)
                raise AssertionError(f"{n} nodes did not come up in {timeout_s} s\n{logs}")
            time.sleep(1)

    def node_of_pid(self, pid: int) -> str | None:
        for name, proc in self.nodes.items():
            if proc.poll() is None and pid in _descendants(proc.pid):
                return name
        return None

    def kill(self, name: str) -> None:
        """SIGKILL a node: its `ray start`, raylet, agents and every worker process under them."""
        proc = self.nodes[name]
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    def shutdown(self) -> None:
        for name in reversed(list(self.nodes)):  # workers first, the head last
            proc = self.nodes[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.nodes.items():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill(name)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LoopbackCluster(tmp_path_factory.mktemp("loopback-logs"))
    try:
        c.start_head()
        c.wait_nodes(1)
        c.add_worker()
        c.wait_nodes(2)
        c.add_worker()
        c.wait_nodes(3)
        yield c
    finally:
        c.shutdown()


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        return list(csv.DictReader(path.open()))
    except OSError:
        return []


def _train_worker_pid(cluster: LoopbackCluster) -> int | None:
    from ray.util.state import list_actors

    try:
        actors = list_actors(address=cluster.address, raise_on_missing_output=False,
                             filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    except Exception:
        return None
    return actors[0].pid if actors else None


@pytest.mark.ray
@pytest.mark.slow
def test_study_on_a_three_node_cluster_survives_two_node_losses(cluster, tmp_path, smoke_data):
    from seld.synth import dataset_hash

    storage = tmp_path / "shared"
    cache = storage / "cache"
    cache.mkdir(parents=True)
    (cache / f"synth-{dataset_hash(preset_config('smoke').synth)}").symlink_to(smoke_data, target_is_directory=True)
    out = storage / "results" / "ablation"

    # A node-local --out on this multi-node cluster: refused in one line before anything runs.
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0", "WANDB_API_KEY": CANARY, "WANDB_MODE": "offline",
           "WANDB_DIR": str(storage / "wandb"),
           # The workers' own lines ("restored from checkpoint after epoch N") reach the study's
           # console only with -v or this (the default keeps them in Ray's logs).
           "RAY_LOG_TO_DRIVER": "1"}
    study = [sys.executable, str(ROOT / "studies/ablation.py"), "--preset", "smoke", "--cluster", str(LOOPBACK),
             "--storage", str(storage), "--cache-dir", str(cache), "--max-retries", "1",
             "--set", f"train.stage1.epochs={STAGE1_EPOCHS}", "--set", "train.stage2.epochs=1",
             # A fixed number of epochs (no early stopping): the kills are timed by epoch.
             "--set", "train.stage1.patience=none"]
    bad = subprocess.run([*study, "--out", str(tmp_path / "node-local")], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "node-local: not on the shared storage" in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "node-local").exists()

    head_id = next(n.node_id for n in cluster.alive_nodes() if n.is_head_node)
    log_path = tmp_path / "study.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*study, "--wandb"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    kills: list[dict] = []
    target: Path | None = None
    last_n, last_change = 0, time.time()
    deadline = time.time() + 420
    try:
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
            if target is None:
                started = sorted((out / "runs").glob("*/metrics.csv")) if (out / "runs").is_dir() else []
                target = next((p for p in started if _rows(p)), None)
                continue
            n = len(_rows(target))
            if n != last_n:
                last_n, last_change = n, time.time()
            for k in kills:  # the first epoch finished after each kill: training again
                if "again_s" not in k and n > k["rows"]:
                    k["again_s"] = round(time.time() - k["t"], 1)
            if len(kills) == KILLS:
                continue
            # Kill once this trial has trained a new epoch since the last restore, while epochs
            # remain, after Train registered a checkpoint since that epoch's row appeared
            # (RUN/checkpointed.json rewritten since): during the next epoch, as a spot reclaim
            # strikes epochs of minutes, not in the instant between a 0.5-s epoch's row and its
            # registration. (Train's controller registers reports when it polls, every 2 s, so
            # with 0.5-s epochs the marker's epoch may trail the last row; the kill must not wait
            # for them to be equal, which may never happen before the run ends.)
            marker = target.parent / CHECKPOINTED
            registered = marker.exists() and marker.stat().st_mtime >= last_change
            if n >= (kills[-1]["rows"] + 1 if kills else 2) and n <= STAGE1_EPOCHS - 2 and registered:
                pid = _train_worker_pid(cluster)
                node = cluster.node_of_pid(pid) if pid else None
                if node is None or node == "head":
                    continue
                node_id = next((x.node_id for x in cluster.alive_nodes() if f"{node}" in (x.resources_total or {})),
                               None)
                t = time.time()
                cluster.kill(node)
                n = len(_rows(target))  # an epoch may have ended since the check
                kills.append({"t": t, "rows": n, "node": node, "node_id": node_id})
                cluster.add_worker()  # the replacement node (a new spot instance)
        proc.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_path.read_text()
    assert proc.returncode == 0, text[-5000:]
    assert len(kills) == KILLS, (kills, text[-3000:])

    rows = pd.read_csv(out / "summary.csv")
    assert list(rows["status"]) == ["ok", "ok"] and rows["test/f20"].notna().all()
    run_dir = target.parent
    epochs = [int(r["epoch"]) for r in _rows(target)]
    n_epochs = STAGE1_EPOCHS + (0 if run_dir.name.startswith("baseline") else 1)
    assert epochs == list(range(n_epochs))  # every epoch exactly once
    # Restored by Train from the checkpoint each time, never by a whole-trial restart.
    attempts = [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == 1, attempts
    restored = [int(m) for m in re.findall(r"restored from checkpoint after epoch (\d+)", text)]
    assert len(restored) == KILLS, text[-5000:]
    lost = [k["rows"] - r for k, r in zip(kills, restored, strict=True)]
    assert all(0 <= x <= 1 for x in lost), (lost, kills, restored)
    # Every trial's driver ran on the head, never on a killed (or any worker) node; and it saw the
    # W&B key of the submitting environment, which the nodes' own processes never had.
    for d in sorted((out / "runs").iterdir()):
        for a in (json.loads(x) for x in (d / "attempts.jsonl").read_text().splitlines()):
            assert a["node_id"] == head_id and a["node_id"] not in {k["node_id"] for k in kills}
            assert "WANDB_API_KEY" in a["wandb_env"]
    # The key reached the trials but was written to no file under the storage (nor Ray's logs).
    for root in (storage, cluster.ray_tmp, tmp_path):
        for f in root.rglob("*"):
            if f.is_file() and not f.is_symlink() and f.stat().st_size < 200 << 20:
                assert CANARY.encode() not in f.read_bytes(), f

    # The killed study equals one without a kill (CPU, one worker each, the same seeds): the same
    # study run straight on the same cluster gives the same epochs and the same scores.
    straight_out = storage / "results" / "straight"
    done = subprocess.run([*study, "--out", str(straight_out)], env=env, capture_output=True, text=True,
                          timeout=420, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    def table(path: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in _rows(path)]

    assert table(target) == table(straight_out / "runs" / run_dir.name / "metrics.csv")
    score = [c for c in rows.columns if c.split("/")[0] in ("val", "val_pp", "test", "test_pp", "stage1_test")]
    straight_rows = pd.read_csv(straight_out / "summary.csv")
    assert score and rows[["variant", *score]].equals(straight_rows[["variant", *score]])

    report = {"kill_to_new_epoch_s": [k["again_s"] for k in kills], "epochs_lost": lost,
              "restored_after_epoch": restored, "rows_at_kill": [k["rows"] for k in kills]}
    print("node-loss figures:", json.dumps(report))
    (tmp_path / "node_loss.json").write_text(json.dumps(report))
