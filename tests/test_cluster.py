"""Cluster files: Ray's own launcher validation, the SLURM script, and --cluster/--dry-run plans."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from seld.config import preset_config
from seld.errors import UserError
from seld.study import format_plan, load_launcher_file, plan_cluster

ROOT = Path(__file__).resolve().parent.parent
GPU, LOCAL, SLURM = ROOT / "cluster/gpu.yaml", ROOT / "cluster/local.yaml", ROOT / "cluster/slurm.sbatch"


@pytest.mark.parametrize("path", [GPU, LOCAL, ROOT / "cluster/loopback.yaml"])
def test_launcher_files_pass_rays_validation(path):
    cfg = load_launcher_file(path)  # Ray's own checks (seld.compat)
    assert cfg["head_node_type"] in cfg["available_node_types"]


def test_gpu_yaml_head_has_no_trial_resources_and_no_secrets():
    raw = yaml.safe_load(GPU.read_text())
    head = raw["available_node_types"][raw["head_node_type"]]
    # No CPU for trials on the head, but the trial-driver resource: drivers never run on spot nodes.
    assert head["resources"]["CPU"] == 0 and head["resources"]["seld_driver"] > 0
    assert "MarketType" not in str(head["node_config"])
    assert any("--resources='{\"seld_driver\"" in c for c in raw["head_start_ray_commands"])
    workers = [nt for name, nt in raw["available_node_types"].items() if name != raw["head_node_type"]]
    data = [nt for nt in workers if nt.get("labels", {}).get("seld-node") == "data"]
    gpus = [nt for nt in workers if nt not in data]
    assert gpus and all(nt["resources"].get("GPU", 0) >= 1 and nt["min_workers"] == 0 for nt in gpus)
    assert all(nt["labels"] == {"seld-node": "trainer"} for nt in gpus)
    # One CPU-only data node for Ray Data, always up (its label must be live when a trial starts).
    assert len(data) == 1 and "GPU" not in data[0]["resources"] and data[0]["min_workers"] == 1
    text = GPU.read_text().lower()
    assert "aws_secret" not in text and "api_key" not in text and "ray==2.60.0" not in text  # pins come from pyproject
    assert any("pip install" in c and "-e ~/seld" in c for c in raw["setup_commands"])


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(not_a_ray_key=1), "not_a_ray_key"),
    (lambda c: c["available_node_types"]["worker.gpu1"].update(min_workers=9, max_workers=2), "max_workers|min_workers"),
])
def test_invalid_launcher_files_are_rejected_with_the_file_named(tmp_path, edit, match):
    cfg = yaml.safe_load(GPU.read_text())
    edit(cfg)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match=f"bad.yaml.*({match})"):
        load_launcher_file(bad)


def test_slurm_script_is_valid_bash_and_runs_the_study():
    subprocess.run(["bash", "-n", str(SLURM)], check=True)
    text = SLURM.read_text()
    assert "ray start --head" in text and "studies/ablation.py" in text and "--cluster cluster/slurm.sbatch" in text


def test_plans_follow_the_cluster_files():
    cfg = preset_config("paper")
    gpu = plan_cluster(GPU, cfg)
    local = plan_cluster(LOCAL, cfg)
    slurm = plan_cluster(SLURM, cfg)
    # gpu.yaml: 2 x g5.12xlarge (4 GPUs) + 6 of 8 g5.2xlarge within max_workers=8 -> 14 trials at once.
    assert (gpu.gpus_per_worker, gpu.cpus_per_worker, gpu.concurrency) == (1.0, 4.0, 14)
    assert gpu.storage == "/mnt/efs/seld" and gpu.overrides()["train.use_gpu"] is True
    # local.yaml: 4 logical CPUs, CPU-only -> one trial at a time on 1 CPU.
    assert (local.gpus_per_worker, local.cpus_per_worker, local.concurrency) == (0.0, 1.0, 1)
    assert local.storage == "/tmp/seld-local" and local.overrides()["train.use_gpu"] is False
    # slurm: 2 nodes x 4 GPUs, 32 CPUs each.
    assert (slurm.concurrency, slurm.cpus_per_worker) == (8, 4.0)
    # Placement: trial drivers on the seld_driver nodes (gpu.yaml's on-demand head, SLURM's head),
    # Train restores after a lost node on clusters; an embedded Ray keeps the old 0.01 CPU driver.
    for plan in (gpu, slurm):
        assert plan.driver_resources() == {"cpu": 0.0, "seld_driver": 0.01} and plan.multi_node
        assert plan.overrides()["train.max_failures"] >= 3
    assert local.driver_resources() == {"cpu": 0.01} and not local.multi_node
    # DDP trials of 4 workers fit only the 4-GPU nodes.
    ddp = plan_cluster(GPU, preset_config("paper", {"train.num_workers": 4}))
    assert ddp.concurrency == 2 and [n.name for n in ddp.nodes] == ["worker.gpu4"]
    assert format_plan(gpu, 6, 1.0, "x") != format_plan(local, 6, 1.0, "x")
    assert "6.00 gpu-hours" in format_plan(gpu, 6, 1.0, "x")
    # --concurrency overrides the plan's trials at once (and the dry run's waves).
    two = plan_cluster(LOCAL, cfg, max_concurrent=2)
    assert two.concurrency == 2 and "3 wave(s)" in format_plan(two, 6, 1.0, "x")


@pytest.mark.parametrize(("workers", "concurrency"), [(1, None), (1, 3), (3, None), (2, 4), (1, 1)])
def test_an_embedded_ray_keeps_a_whole_cpu_beside_the_train_workers_and_drivers(workers, concurrency):
    """A Ray Data task needs a whole CPU, and Train workers waiting for their data hold theirs: on
    this machine's embedded Ray, whatever --concurrency and train.num_workers ask for, at least one
    CPU stays free beside every run's workers and driver (else a ray_data run hangs)."""
    cfg = preset_config("local", {"train.num_workers": workers})
    plan = plan_cluster(None, cfg, max_concurrent=concurrency)
    assert plan.source == "embedded" and len(plan.nodes) == 1
    held = plan.concurrency * (plan.workers_per_trial * plan.cpus_per_worker + plan.driver_resources()["cpu"])
    assert plan.nodes[0].cpus - held >= 1.0, (plan.nodes[0].cpus, held)
    assert plan.nodes[0].cpus >= 4  # never fewer than before (2 x this machine's cores, at least 4)
    assert plan.overrides()["data.ray_data_cpus"] >= 1.0


def test_an_embedded_multi_gpu_machine_divides_its_cores_among_the_runs(monkeypatch):
    """8 GPUs and 16 cores without a cluster file: 8 one-GPU runs at once, each worker with 2 torch
    threads, not all 16 each (8x oversubscribed)."""
    import os

    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    plan = plan_cluster(None, preset_config("paper"))
    assert (plan.concurrency, plan.gpus_per_worker, plan.torch_threads) == (8, 1.0, 2)
    assert plan.overrides()["train.torch_threads"] == 2


def test_dry_run_cli_prints_different_plans_without_connecting(tmp_path):
    def dry(cluster: Path) -> str:
        r = subprocess.run([sys.executable, str(ROOT / "studies/ablation.py"), "--preset", "local",
                            "--cluster", str(cluster), "--dry-run", "--out", str(tmp_path / "o")],
                           capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "RAY_ADDRESS": "10.255.255.1:1"})
        assert r.returncode == 0, r.stderr
        return r.stdout

    gpu, local = dry(GPU), dry(LOCAL)
    assert "trials              : 6" in gpu and "trials              : 6" in local
    assert "1 GPU" in gpu and "concurrency         : 14" in gpu and "gpu-hours" in gpu
    assert "concurrency         : 1 " in local and "cpu-hours" in local
    assert not (tmp_path / "o").exists()  # nothing written, nothing connected (RAY_ADDRESS is unroutable)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
@pytest.mark.slow
def test_smoke_ablation_as_a_ray_job_on_a_loopback_cluster(tmp_path, smoke_data):
    """`ray start --head` on 127.0.0.1, `ray job submit` of the smoke study against
    cluster/local.yaml, results in the expected folder, `ray stop`."""
    import json
    import os
    import shutil
    import tempfile
    import time

    from seld.synth import dataset_hash

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"synth-{dataset_hash(preset_config('smoke').synth)}").symlink_to(smoke_data, target_is_directory=True)
    bin_dir = Path(sys.executable).parent
    port, dash = _free_port(), _free_port()
    # Every fixed default port moved to a free one: the test session's own Ray (or any other on the
    # machine) already holds the defaults, and a head whose dashboard agent cannot bind answers
    # "No available agent to submit job" forever.
    agent_ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    # A short temp dir: Ray puts Unix sockets there, and pytest's tmp paths exceed their 107-byte limit
    # (the head then dies silently and the dashboard never answers).
    ray_tmp = Path(tempfile.mkdtemp(prefix="rayjob", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # `--block` keeps the head in one process that we own: stopping it (SIGINT) stops exactly this
    # cluster; `ray stop` would stop every Ray on the machine.
    head_log = open(tmp_path / "head.log", "w")  # noqa: SIM115 (closed with the head below)
    head = subprocess.Popen([bin_dir / "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             "--num-cpus=4", f"--temp-dir={ray_tmp}", "--disable-usage-stats", *agent_ports],
                            env=env, stdout=head_log, stderr=subprocess.STDOUT)
    try:
        try:
            _wait_http(f"http://127.0.0.1:{dash}/api/version", 120)
        except OSError as e:
            raise AssertionError(f"the head did not come up: {e}\n{(tmp_path / 'head.log').read_text()[-3000:]}") from e
        out = tmp_path / "results"
        # The dashboard answers before its job agent is up (seconds later on a loaded machine): retry
        # only that refusal.
        for _ in range(12):
            job = subprocess.run(
                [bin_dir / "ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
                 "--runtime-env-json", json.dumps({"env_vars": {"SELD_STORAGE": str(tmp_path / "storage")}}),
                 "--", "python", "studies/ablation.py", "--preset", "smoke", "--cluster", "cluster/local.yaml",
                 "--out", str(out), "--cache-dir", str(cache)],
                env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stderr + job.stdout:
                break
            time.sleep(5)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        # The job's log (what `ray job submit` follows and `ray job logs` shows) holds the study's
        # event lines; Ray Train's own lines stay in Ray's logs (issue 25).
        assert "baseline seed 0 — run 1 of 2 started" in job.stdout, job.stdout[-3000:]
        assert "Checkpoint successfully created" not in job.stdout and "Reporting training result" not in job.stdout
        rows = pd.read_csv(out / "summary.csv")
        assert list(rows["status"]) == ["ok", "ok"]
        assert (out / "table1.md").exists()
        assert (tmp_path / "storage" / "ray").is_dir()  # Tune's storage on the cluster's shared storage
    finally:
        import signal

        head.send_signal(signal.SIGINT)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        head_log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _wait_http(url: str, timeout_s: float) -> None:
    import time
    import urllib.request

    t0 = time.time()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.time() - t0 > timeout_s:
                raise
            time.sleep(1)


def test_paper_time_budget_comes_from_the_plan_and_the_dry_run_states_it(tmp_path):
    """The paper preset's train.time_budget_s is BUDGET_MARGIN x the run's own estimate (not the
    config's fixed hour); a given budget stands; --dry-run prints the budget the runs get."""
    from seld.study.cluster import BUDGET_MARGIN, budget_overrides, estimate_run_hours

    cfg = preset_config("paper")
    plan = plan_cluster(GPU, cfg)
    n_real = 20_000  # the DCASE2025 development train split: stage 1 alone is hours on one A10G
    hours = estimate_run_hours(cfg, n_real, 0, plan)
    budget = budget_overrides("paper", {}, hours)["train.time_budget_s"]
    assert budget == pytest.approx(BUDGET_MARGIN * hours * 3600, abs=10) and budget > cfg.train.time_budget_s
    assert budget_overrides("paper", {"train.time_budget_s": 60.0}, hours) == {}
    assert budget_overrides("local", {}, hours) == {}
    r = subprocess.run([sys.executable, str(ROOT / "studies/ablation.py"), "--preset", "paper", "--cluster",
                        str(GPU), "--dry-run", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       timeout=120, env={"PATH": "/usr/bin:/bin", "RAY_ADDRESS": "10.255.255.1:1"})
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.strip().startswith("time budget per run"))
    est = float(next(x for x in r.stdout.splitlines() if "est. hours per trial" in x).split(":")[1].split()[0])
    budget_s = float(line.split(":")[1].split()[0])
    assert budget_s == pytest.approx(max(1800.0, BUDGET_MARGIN * est * 3600), rel=0.05), r.stdout


def test_storage_uris_and_node_local_paths_on_a_multi_node_cluster_are_refused(tmp_path):
    """`--storage s3://...` stays a URI (never made a local path; tests/test_storage.py covers it);
    `--storage http://...` is refused in one line; on a multi-node cluster an --out or --cache-dir
    outside the shared storage is refused before anything runs."""
    from seld.study.cluster import check_shared_paths

    cfg = preset_config("smoke")
    assert plan_cluster(GPU, cfg, "s3://bucket/prefix").storage == "s3://bucket/prefix"
    with pytest.raises(UserError, match=r"^--storage http://bucket/prefix: unsupported storage URI scheme"):
        plan_cluster(GPU, cfg, "http://bucket/prefix")
    plan = plan_cluster(GPU, cfg, str(tmp_path / "shared"))
    assert plan.storage == str(tmp_path / "shared")
    check_shared_paths(plan, {"--out": tmp_path / "shared/results/x", "--cache-dir": None})
    with pytest.raises(UserError, match=r"^--out /tmp/node-local: not on the shared storage .*shared of the multi-node"):
        check_shared_paths(plan, {"--out": Path("/tmp/node-local")})
    check_shared_paths(plan_cluster(LOCAL, cfg), {"--out": Path("/tmp/node-local")})  # one node: fine
    r = subprocess.run([sys.executable, str(ROOT / "studies/ablation.py"), "--preset", "smoke", "--cluster", str(GPU),
                        "--storage", str(tmp_path / "shared"), "--out", str(tmp_path / "local-out")],
                       capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "RAY_ADDRESS": "10.255.255.1:1"})
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]  # (Ray's validator logs INFO)
    assert r.returncode == 2 and len(errors) == 1, r.stderr
    assert errors[0].startswith("ablation.py: error: --out ") and "local-out: not on the shared storage" in errors[0]
    assert not (tmp_path / "local-out").exists()


def test_planning_and_starting_ray_import_no_torch():
    """The driver of a study starts Ray without torch: `seld.study.cluster`, and every module it
    imports anywhere (inside functions too, e.g. `start_ray`'s), load no torch. Only planning for
    this machine imports torch itself, on purpose, to count its GPUs."""
    import ast

    import seld.study.cluster as cluster

    tree = ast.parse(Path(cluster.__file__).read_text())
    modules = sorted({n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
                     | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
                     - {"torch"})
    assert "seld.study.session" in modules
    code = ("import sys, importlib, seld.study.cluster\n"
            "assert 'torch' not in sys.modules, 'seld.study.cluster imports torch'\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "    assert 'torch' not in sys.modules, m + ' imports torch'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
