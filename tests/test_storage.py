"""Object-store storage (seld/storage.py) against a local S3 server (moto on 127.0.0.1): URIs, the
staging folder, a mirror's pull and push, one-line errors for a bad URI or an unreachable store."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seld.config import config_hash
from seld.errors import UserError
from seld.runfolder import CHECKPOINTED
from seld.storage import Mirror, is_uri, join, staging_dir
from seld.study.cluster import check_shared_paths, plan_cluster, storage_path

ROOT = Path(__file__).resolve().parent.parent


def test_uris_are_checked_and_kept_as_uris(tmp_path, monkeypatch):
    assert is_uri("s3://b/p") and is_uri("gs://b") and not is_uri("/mnt/efs") and not is_uri(None)
    assert storage_path("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert storage_path("gs://bucket") == "gs://bucket"
    for bad, why in (("http://host/x", "unsupported storage URI scheme"), ("s3://", "expected s3://bucket/prefix"),
                     ("s3://b/p?endpoint_override=x", "expected s3://bucket/prefix")):
        with pytest.raises(UserError, match=why) as e:
            storage_path(bad)
        assert str(e.value).startswith(f"--storage {bad}:") and "\n" not in str(e.value)
    assert join("s3://b/p/", "results", "abl") == "s3://b/p/results/abl"
    monkeypatch.setenv("SELD_STAGING_DIR", str(tmp_path))
    assert staging_dir("s3://b/p/results/abl") == tmp_path / "s3" / "b" / "p" / "results" / "abl"


def test_results_of_an_object_store_study_are_staged_locally(tmp_path, monkeypatch):
    from seld.config import preset_config
    from seld.study.options import results_dir, study_mirror

    monkeypatch.setenv("SELD_STAGING_DIR", str(tmp_path))
    out = results_dir(None, "ablation", storage="s3://b/p")
    assert out == tmp_path / "s3/b/p/results/ablation"
    assert results_dir(tmp_path / "mine", "ablation", storage="s3://b/p") == tmp_path / "mine"
    plan = plan_cluster(None, preset_config("smoke"), "s3://b/p")
    assert plan.storage == "s3://b/p"
    assert study_mirror(out, "ablation", plan).uri == "s3://b/p/results/ablation"
    assert study_mirror(out, "ablation", plan_cluster(None, preset_config("smoke"))) is None


def test_multi_node_with_an_object_store_needs_no_shared_filesystem(tmp_path):
    """With an object store the feature store goes to the bucket: no --cache-dir is needed (one
    given is the user's shared filesystem); a filesystem storage still refuses node-local folders."""
    from seld.config import preset_config

    plan = plan_cluster(ROOT / "cluster/loopback.yaml", preset_config("smoke"), "s3://b/p")
    assert plan.multi_node
    check_shared_paths(plan, {"--out": None, "--cache-dir": None})
    check_shared_paths(plan, {"--out": None, "--cache-dir": tmp_path})
    shared = plan_cluster(ROOT / "cluster/loopback.yaml", preset_config("smoke"), str(tmp_path / "shared"))
    with pytest.raises(UserError, match="--cache-dir /tmp/node-local: not on the shared storage"):
        check_shared_paths(shared, {"--out": None, "--cache-dir": Path("/tmp/node-local")})


def test_features_straight_to_a_bucket_read_back_as_the_local_store(smoke_data, smoke_store, s3_env, caplog):
    """`seld features DATA --out s3://...` writes the store to the bucket; opened from there (manifest,
    index, row groups, rows read by the training workers' reader) it is the local store; a rerun
    keeps finished shards; converting it works in the bucket too."""
    import numpy as np
    import pyarrow.fs as pafs

    from seld import data
    from seld.cli import main
    from seld.store import open_store

    uri = f"s3://{s3_env('store')}/seld/store"
    assert main(["features", str(smoke_data), "--out", uri]) == 0
    local, remote = open_store(smoke_store), open_store(uri)
    assert remote.path == f"{uri}/{smoke_store.name}" and remote.manifest == local.manifest
    assert [s.rsplit("/", 1)[1] for s in remote.shards] == [p.name for p in local.shards]
    fs, paths = remote.arrow_paths()
    assert isinstance(fs, pafs.S3FileSystem) and paths[0] == remote.shards[0].removeprefix("s3://")
    assert pickle.loads(pickle.dumps(remote)).filesystem.get_file_info(paths[0]).size == local.manifest["shards"][0]["bytes"]

    layout_l, layout_r = data.store_layout(smoke_store), data.store_layout(uri)
    index_l, index_r = data.read_index(smoke_store, layout=layout_l), data.read_index(uri, layout=layout_r)
    assert index_r.equals(index_l) and len(index_r) == sum(local.n_rows.values())
    assert all(np.array_equal(a, b) for a, b in zip(layout_r.group_starts, layout_l.group_starts, strict=True))
    pick = index_l["clip"].to_numpy()[np.random.default_rng(0).permutation(len(index_l))[:40]]
    feats_l, ev_l = data.StoreReader(layout_l).read(data.row_set(index_l, pick))
    # The row-group reader through the bucket's filesystem, in a process that got the layout pickled.
    feats_r, ev_r = pickle.loads(pickle.dumps(data.StoreReader(layout_r))).read(data.row_set(index_r, pick))
    np.testing.assert_array_equal(feats_r, feats_l)
    np.testing.assert_array_equal(ev_r.offsets, ev_l.offsets)
    np.testing.assert_array_equal(ev_r.azimuth, ev_l.azimuth)

    # Resumable: a run cut off (one shard and the manifest gone) recomputes only that shard.
    fs.delete_file(paths[1])
    fs.delete_file(paths[0].rsplit("/", 1)[0] + "/manifest.json")
    n = len(paths)
    with caplog.at_level("INFO", logger="seld.store"):
        assert main(["features", str(smoke_data), "--out", uri]) == 0
    assert f"{n - 1} of {n} shards already done" in caplog.text
    assert open_store(uri).manifest == local.manifest


def test_a_damaged_or_missing_bucket_store_is_one_line(smoke_store, s3_env, monkeypatch, tmp_path, capsys):
    import pyarrow.fs as pafs

    from seld import data
    from seld.errors import DataError
    from seld.storage import filesystem
    from seld.store import open_store

    bucket = s3_env("store")
    uri = f"s3://{bucket}/store"
    fs = filesystem(uri)[0]
    pafs.copy_files(str(smoke_store), f"{bucket}/store/{smoke_store.name}", destination_filesystem=fs)
    assert open_store(uri).manifest == open_store(smoke_store).manifest  # a copied store reads

    def one_line(fn, pattern):
        with pytest.raises(DataError, match=pattern) as e:
            fn()
        assert "\n" not in str(e.value)
        return str(e.value)

    one_line(lambda: open_store("s3://no-such-bucket-x/store"),
             r"^s3://no-such-bucket-x/store: bucket 'no-such-bucket-x' not found")
    from seld.cli import main

    assert main(["train", "s3://no-such-bucket-x/store", "--preset", "smoke", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == ("seld train: error: s3://no-such-bucket-x/store: bucket "
                                               "'no-such-bucket-x' not found (check the URI, or AWS_ENDPOINT_URL)")
    assert not (tmp_path / "run").exists()
    one_line(lambda: open_store(f"s3://{bucket}/nothing"), r"no feature store folder")
    shards = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(f"{bucket}/store/{smoke_store.name}"))
                    if i.base_name.startswith("shard-"))
    with fs.open_output_stream(shards[0]) as f:
        f.write(b"PAR1 not a shard")
    one_line(lambda: data.store_layout(uri), rf"^s3://{shards[0]}: unreadable shard")
    fs.delete_file(shards[1])
    one_line(lambda: open_store(uri), rf"shards listed in the manifest are missing: s3://{shards[1]}$")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    one_line(lambda: open_store(uri), rf"^{uri}: cannot read the feature store")


def test_mirror_pushes_new_and_changed_files_and_pulls_them_back(tmp_path, s3_env):
    bucket = s3_env()
    local = tmp_path / "a"
    (local / "checkpoints").mkdir(parents=True)
    (local / "metrics.csv").write_text("epoch\n0\n")
    (local / "checkpoints/stage1_best.pt").write_bytes(b"\0" * 3_000_000)  # a multipart-sized object
    (local / ".metrics.csv.tmp-1-2").write_text("half")  # an atomic writer's temporary: never pushed
    (local / "ray").mkdir()
    (local / "ray/state").write_text("x")
    mirror = Mirror(local, f"s3://{bucket}/prefix/run")
    mirror.check()
    assert mirror.push(skip=("ray/*",)) == ["checkpoints/stage1_best.pt", "metrics.csv"]
    assert mirror.push() == ["ray/state"]  # only what is new
    time.sleep(0.01)
    (local / "metrics.csv").write_text("epoch\n0\n1\n")
    assert mirror.push() == ["metrics.csv"]  # only what changed
    assert sorted(mirror.remote_files()) == ["checkpoints/stage1_best.pt", "metrics.csv", "ray/state"]

    # Another node (an empty staging folder) pulls it; the mirror travels pickled (its filesystem
    # with it: a Ray trial or Train worker gets it this way).
    other = pickle.loads(pickle.dumps(Mirror(tmp_path / "b", f"s3://{bucket}/prefix")))
    got = other.child("run").pull(skip=("ray/*",))
    assert got == ["checkpoints/stage1_best.pt", "metrics.csv"]
    assert (tmp_path / "b/run/metrics.csv").read_text() == "epoch\n0\n1\n"
    assert (tmp_path / "b/run/checkpoints/stage1_best.pt").stat().st_size == 3_000_000
    assert other.child("run").pull(skip=("ray/*",)) == []  # nothing newer


def _two_nodes(tmp_path, s3_env) -> tuple[Mirror, Mirror]:
    """Two staging folders (two nodes) mirroring one folder of a fresh bucket."""
    uri = f"s3://{s3_env()}/results/run"
    return Mirror(tmp_path / "node-a", uri), Mirror(tmp_path / "node-b", uri)


def test_mirror_equality_is_content_not_clocks(tmp_path, s3_env):
    """Same-size rewrites are never lost: not when the writer's clock restores the old mtime, not
    when the reader's file looks newer (a clock ahead), not within S3's one-second timestamps."""
    import os

    a, b = _two_nodes(tmp_path, s3_env)
    f = a.local / "metrics.csv"
    f.parent.mkdir(parents=True)
    f.write_text("epoch\n0\n")
    assert a.push() == ["metrics.csv"]
    assert b.pull() == ["metrics.csv"]

    # A rewrites it, same size, and sets its mtime back to the old one (a clock behind, or a copy
    # that keeps times): the push still sees the new content.
    st = f.stat()
    f.write_text("epoch\n1\n")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert a.push() == ["metrics.csv"]
    # B's copy looks newer than the object (B's clock a day ahead), same size: still pulled.
    g = b.local / "metrics.csv"
    os.utime(g, (time.time() + 86400, time.time() + 86400))
    assert b.pull() == ["metrics.csv"] and g.read_text() == "epoch\n1\n"
    # Two same-size writes within one second of the store's clock: the second still arrives.
    for text in ("epoch\n2\n", "epoch\n3\n"):
        f.write_text(text)
        assert a.push() == ["metrics.csv"]
        assert b.pull() == ["metrics.csv"] and g.read_text() == text
    assert a.push() == [] and b.pull() == []  # nothing changed: nothing copied

    # A fresh staging folder holding the same content (no record yet) downloads but reports nothing new.
    c = Mirror(tmp_path / "node-c", a.uri)
    (c.local).mkdir()
    (c.local / "metrics.csv").write_text("epoch\n3\n")
    assert c.pull() == [] and c.push() == []


def test_a_pull_keeps_local_edits_the_store_has_not_seen(tmp_path, s3_env):
    """The store changed since the last sync: the pull takes it (over a local edit). Only the local
    file changed: a pending push, which the pull leaves alone and the push sends."""
    a, b = _two_nodes(tmp_path, s3_env)
    (a.local).mkdir()
    (a.local / "study.log").write_text("line 1\n")
    a.push()
    b.pull()
    (b.local / "study.log").write_text("line 1\nline 2 (b)\n")
    assert b.pull() == [] and (b.local / "study.log").read_text() == "line 1\nline 2 (b)\n"
    assert b.push() == ["study.log"]
    assert a.pull() == ["study.log"] and (a.local / "study.log").read_text() == "line 1\nline 2 (b)\n"


def test_mirror_propagates_deletions_it_can_vouch_for(tmp_path, s3_env):
    """A file deleted on one side since it was synced is deleted on the other; never an object of
    Ray's (`ray/`), another writer's object this node never synced, or one changed since."""
    a, b = _two_nodes(tmp_path, s3_env)
    for rel in ("predictions/x.csv", "predictions/y.csv", "ray/train/state.json", "notes.txt"):
        (a.local / rel).parent.mkdir(parents=True, exist_ok=True)
        (a.local / rel).write_text(rel)
    a.push()
    assert b.pull() == ["notes.txt", "predictions/x.csv", "predictions/y.csv", "ray/train/state.json"]
    other = Mirror(tmp_path / "node-c", a.uri)  # a third writer's file, never seen by A
    (other.local).mkdir()
    (other.local / "attempts.jsonl").write_text("{}\n")
    other.push()

    (a.local / "predictions/y.csv").unlink()
    (a.local / "ray/train/state.json").unlink()
    assert a.push() == ["predictions/y.csv"]
    assert sorted(a.remote_files()) == ["attempts.jsonl", "notes.txt", "predictions/x.csv", "ray/train/state.json"]
    assert b.pull() == ["attempts.jsonl", "predictions/y.csv"]  # the new object, the deletion
    assert not (b.local / "predictions/y.csv").exists() and (b.local / "attempts.jsonl").exists()

    # B deletes notes.txt while A rewrites it: B's push leaves A's newer object alone.
    (a.local / "notes.txt").write_text("rewritten by A")
    a.push()
    (b.local / "notes.txt").unlink()
    assert b.push() == []
    assert "notes.txt" in b.remote_files()
    assert b.pull() == ["notes.txt"] and (b.local / "notes.txt").read_text() == "rewritten by A"
    # A deletion under skip patterns is not propagated either.
    (b.local / "predictions/x.csv").unlink()
    assert b.push(skip=("predictions/*",)) == [] and "predictions/x.csv" in b.remote_files()


def test_a_mirror_without_a_folder_under_the_bucket_is_refused(tmp_path, s3_env):
    bucket = s3_env()
    with pytest.raises(UserError, match=rf"^Mirror s3://{bucket}: no folder under the bucket") as e:
        Mirror(tmp_path, f"s3://{bucket}")
    assert "\n" not in str(e.value)
    fs = Mirror(tmp_path, f"s3://{bucket}/p").fs
    with pytest.raises(UserError, match="no folder under the bucket"):
        Mirror(tmp_path, f"s3://{bucket}/p", fs)  # a filesystem without its root
    assert Mirror(tmp_path, f"s3://{bucket}/p").child("run").root == f"{bucket}/p/run"


def test_a_missing_bucket_or_an_unreachable_store_is_one_line(tmp_path, s3_env, monkeypatch):
    with pytest.raises(UserError, match=r"^s3://no-such-bucket/x: bucket 'no-such-bucket' not found"):
        Mirror(tmp_path, "s3://no-such-bucket/x").check()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"^s3://b/x: cannot write to the storage \(endpoint unreachable") as e:
        Mirror(tmp_path, "s3://b/x").check()
    assert "\n" not in str(e.value) and time.monotonic() - t0 < 30


def test_the_study_script_refuses_a_missing_bucket_before_anything_runs(tmp_path, s3_env):
    """`ablation.py --storage s3://missing/...`: exit 2 and one line naming the URI; nothing is staged."""
    cmd = [sys.executable, str(ROOT / "studies/ablation.py"), "--preset", "smoke", "--storage", "s3://missing-bkt/p",
           "--out", str(tmp_path / "staging")]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == ("ablation.py: error: s3://missing-bkt/p/results/ablation: bucket 'missing-bkt' "
                                   "not found (create it first, or check AWS_ENDPOINT_URL / the project)")
    assert not (tmp_path / "staging").exists()


def _read_object(mirror: Mirror, rel: str) -> bytes:
    with mirror.fs.open_input_stream(f"{mirror.root}/{rel}") as f:
        return f.read()


def _registered_epoch(mirror: Mirror, rel: str) -> int | None:
    """The epoch in a run's checkpointed.json object (the last checkpoint Ray Train registered), or
    None if the object went between the listing and the read."""
    try:
        return json.loads(_read_object(mirror, rel))["epoch"]
    except (OSError, ValueError):
        return None


def _run_folder(objects, variant: str) -> str:
    return next(k.split("/")[1] for k in objects if k.startswith(f"runs/{variant}-s0-"))


def _csv_epochs(blob: bytes) -> list[int]:
    return [int(line.split(",")[0]) for line in blob.decode().splitlines()[1:]]


@pytest.mark.ray
@pytest.mark.slow
def test_smoke_ablation_on_s3_survives_a_kill_and_reports_from_the_bucket_alone(
        tmp_path, tmp_path_factory, ray_session, smoke_data, smoke_store, s3_env):
    """The smoke ablation with --storage s3://bucket/prefix on a local S3 server: checkpoints, run
    folders and summary.csv land in the bucket; a study killed (SIGKILL of the script's process
    group) after its second run's first epoch is in the bucket resumes with --resume from the bucket
    alone (an empty staging folder): the finished run is not retrained, the killed one continues
    from its epoch, every epoch once; --report-only from the bucket alone redoes the tables byte for
    byte; the secret key is in no object, staged file or Ray log."""
    import os
    import shutil
    import signal

    import pandas as pd

    from seld.config import preset_config
    from seld.study import Options, run_study
    from seld.synth import dataset_hash

    bucket = s3_env("study")
    uri = f"s3://{bucket}/prefix"
    results = Mirror(tmp_path / "probe", f"{uri}/results/ablation")
    cache = tmp_path / "cache"  # the session's dataset and a copy of its store: nothing extracted again
    h = dataset_hash(preset_config("smoke").synth)
    cache.mkdir()
    (cache / f"synth-{h}").symlink_to(smoke_data, target_is_directory=True)
    shutil.copytree(smoke_store.parent, cache / f"store-{h}", symlinks=True)
    staging = tmp_path / "staging" / "ablation"
    cmd = [sys.executable, str(ROOT / "studies/ablation.py"), "--preset", "smoke", "--storage", uri,
           "--out", str(staging), "--cache-dir", str(cache), "--max-retries", "0", "--concurrency", "1",
           "--set", "train.stage1.epochs=2"]  # Stereo-RCnet: 3 epochs, time to kill it after its first
    # --concurrency 1: the kill point is "Baseline-A finished, Stereo-RCnet started" (the machine's
    # plan would run both at once).
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "OMP_NUM_THREADS": "1"}

    # 1. Killed mid-study: Baseline-A finished, Stereo-RCnet's first epoch in the bucket.
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline, killed_at, kill_epoch, seen = time.monotonic() + 420, None, None, None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            objects = results.remote_files()
            stereo = [k for k in objects if k.startswith("runs/stereo_rcnet-s0-") and k.endswith("/metrics.csv")]
            # Ray Train's controller registers a reported checkpoint when it next polls its
            # workers (every 2 s by default, 0.5 s in tests: conftest.py), so under load
            # metrics.csv can list an epoch or two more: those are retrained after the kill
            # (still recorded once, timings new). So kill once the run's checkpointed.json
            # (written after the registration) names an epoch metrics.csv lists.
            marker = [k for k in objects if k.startswith("runs/stereo_rcnet-s0-")
                      and k.endswith(f"/{CHECKPOINTED}")]
            blob = _read_object(results, stereo[0]) if stereo else b""
            epochs = _csv_epochs(blob) if blob else []
            seen = (epochs, _registered_epoch(results, marker[0]) if marker else None)
            if seen[1] is not None and seen[1] in epochs:
                killed_at, kill_epoch = blob, seen[1]
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.25)
    finally:
        if proc.poll() is None and killed_at is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert killed_at is not None, (f"no kill point: last (metrics.csv epochs, checkpointed epoch) seen {seen}\n"
                                   + proc.stdout.read().decode()[-3000:])
    objects = results.remote_files()
    base_run, stereo_run = _run_folder(objects, "baseline"), _run_folder(objects, "stereo_rcnet")
    assert f"runs/{base_run}/metrics.json" in objects and f"runs/{base_run}/checkpoints/selected.pt" in objects
    assert f"runs/{stereo_run}/metrics.json" not in objects, "the run finished before the kill"
    assert any(k.startswith(f"runs/{stereo_run}/ray/train/checkpoint_") for k in objects)  # Ray's resume state
    assert "summary.csv" not in objects

    # 2. --resume from the bucket alone.
    shutil.rmtree(staging.parent)
    time.sleep(2)  # the killed job's Ray workers are being torn down
    done = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"results in {uri}/results/ablation (staged in {staging})" in done.stdout
    objects = results.remote_files()
    for name in ("summary.csv", "curves.csv", "table1.md", "table1.csv", "table1.tex", "table1.png", "study.log"):
        assert name in objects, name
    for run in (base_run, stereo_run):
        for rel in ("config.json", "metrics.json", "metrics.csv", "attempts.jsonl", "thresholds.json",
                    "checkpoints/stage1_best.pt", "checkpoints/selected.pt", "data/worker-0.json"):
            assert f"runs/{run}/{rel}" in objects, (run, rel)
    assert f"runs/{stereo_run}/checkpoints/stage2_best.pt" in objects
    rows = pd.read_csv(staging / "summary.csv").set_index("variant")
    assert rows["status"].to_dict() == {"baseline": "ok", "stereo_rcnet": "ok"}
    assert rows["attempts"].to_dict() == {"baseline": 1, "stereo_rcnet": 2}  # the finished run not retrained
    resumed = json.loads(_read_object(results, f"runs/{stereo_run}/attempts.jsonl").decode().splitlines()[-1])
    assert resumed["resume"] is True
    stereo_csv = _read_object(results, f"runs/{stereo_run}/metrics.csv")
    assert _csv_epochs(stereo_csv) == [0, 1, 2]  # every epoch once
    assert _csv_epochs(_read_object(results, f"runs/{base_run}/metrics.csv")) == [0, 1]
    # Continued, not retrained: the epochs Ray had registered before the kill are the same rows,
    # byte for byte (header included).
    kept = [line for i, line in enumerate(killed_at.decode().splitlines(keepends=True))
            if i == 0 or int(line.split(",")[0]) <= kill_epoch]
    assert stereo_csv.decode().startswith("".join(kept)), \
        f"before the kill (registered epoch {kill_epoch}):\n{killed_at.decode()}\nafter:\n{stereo_csv.decode()}"

    # 3. --report-only from the bucket alone: the tables (deleted from the bucket too) come back the same.
    tables = {name: _read_object(results, name) for name in objects
              if "/" not in name and name.split(".")[-1] in ("md", "csv", "tex", "png")
              and name not in ("summary.csv", "curves.csv")}
    assert {"table1.md", "table1.csv", "table1.tex", "table1.png", "curves.png"} <= set(tables)
    for name in tables:
        results.fs.delete_file(f"{results.root}/{name}")
    shutil.rmtree(staging.parent)
    smoke = _load_study()
    run_study(smoke, Options(out=staging, preset="smoke", storage=uri, report_only=True))
    for name, blob in tables.items():
        assert (staging / name).read_bytes() == blob, name
        assert _read_object(results, name) == blob, name
    assert not (staging / "runs").exists() or not list(staging.glob("runs/*/checkpoints/*"))

    # 4. The secret key is in no object, no staged or cached file and no log of Ray's session.
    secret = s3_env.env["AWS_SECRET_ACCESS_KEY"].encode()
    everything = Mirror(tmp_path / "probe", uri)
    assert not [k for k in everything.remote_files() if secret in _read_object(everything, k)]
    context = ray_session.get_runtime_context()  # the session's logs: <temp dir>/<session name>/logs
    session_logs = Path(context.get_temp_dir()) / context.get_session_name() / "logs"
    assert session_logs.is_dir()
    for root in (tmp_path, session_logs):
        leaked = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()
                  and p.stat().st_size < 50_000_000 and secret in p.read_bytes()]
        assert not leaked, leaked


def _load_study():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ablation_study", ROOT / "studies/ablation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.STUDIES["smoke"]


def test_a_sweep_pushes_its_optuna_journal_at_every_trial_event(tmp_path, s3_env):
    """With an object store, the sweep's resume state (its Optuna journal, study.log) reaches the
    bucket when a trial starts, completes or fails, not only when the driver ends: a driver killed
    mid-sweep resumes from the bucket with the trials finished so far."""
    from seld.study.sweep import SWEEP_STATE, journal_push_callback

    bucket = s3_env()
    staging = tmp_path / "staging"
    staging.mkdir()
    mirror = Mirror(staging, f"s3://{bucket}/results/sweep")
    mirror.check()
    callback = journal_push_callback(mirror)
    (staging / "optuna.journal").write_text('{"op_code": 0}\n')
    (staging / "study.log").write_text("trial 1 started\n")
    (staging / "trials.csv").write_text("number\n")  # not sweep state: written at the end only
    callback.on_trial_start(iteration=1, trials=[], trial=None)
    assert sorted(mirror.remote_files()) == sorted(SWEEP_STATE)
    for event, line in (("on_trial_complete", '{"op_code": 6}\n'), ("on_trial_error", '{"op_code": 7}\n')):
        time.sleep(0.01)
        with open(staging / "optuna.journal", "a") as f:
            f.write(line)
        getattr(callback, event)(iteration=2, trials=[], trial=None)
        other = Mirror(tmp_path / f"other-{event}", f"s3://{bucket}/results/sweep")
        other.pull()
        assert (other.local / "optuna.journal").read_text() == (staging / "optuna.journal").read_text()


def test_a_study_with_a_bucket_storage_puts_its_feature_store_in_the_bucket(smoke_data, smoke_store, s3_env,
                                                                            tmp_path):
    """prepare_data with an s3:// storage and no --cache-dir writes the store to
    <storage>/cache/store-<data hash>, which the driver's planner reads; --cache-dir keeps it local."""
    from seld import data
    from seld.config import preset_config
    from seld.study import Options, prepare_data
    from seld.synth import dataset_hash

    cfg = preset_config("smoke")
    h = dataset_hash(cfg.synth)
    work = tmp_path / "work"
    work.mkdir()
    (work / f"synth-{h}").symlink_to(smoke_data, target_is_directory=True)  # the session's dataset: not generated again
    storage = f"s3://{s3_env('study')}/prefix"
    plan = prepare_data(cfg, Options(out=tmp_path / "out", preset="smoke"), work, storage)
    assert plan.store == f"{storage}/cache/store-{h}/features-{config_hash(cfg.features)}"
    assert not (work / f"store-{h}").exists()
    rows = data.plan_run(cfg, plan.store).rows
    assert len(rows["stage1"]) > 0 and len(rows["test"]) > 0
    import shutil

    shutil.copytree(smoke_store.parent, work / f"store-{h}")  # the session's store: nothing extracted again
    local = prepare_data(cfg, Options(out=tmp_path / "out", preset="smoke", cache_dir=work), work, storage)
    assert local.store == (work / f"store-{h}" / f"features-{config_hash(cfg.features)}").resolve()


@pytest.mark.ray
def test_ray_data_reads_a_bucket_store_as_one_tensor_batch(smoke_store, s3_env, ray_session):
    """`ray.data.read_parquet` over a bucket store (StoreInfo.arrow_paths: the bucket's filesystem,
    pickled to Ray's read tasks with its credentials) yields the features of a batch as one
    (n, 2, 251, 64) float16 array, equal to the local store's rows."""
    import numpy as np
    import pyarrow.fs as pafs
    import ray.data

    from seld import data
    from seld.storage import filesystem
    from seld.store import open_store

    bucket = s3_env("store")
    uri = f"s3://{bucket}/store"
    pafs.copy_files(str(smoke_store), f"{bucket}/store/{smoke_store.name}", destination_filesystem=filesystem(uri)[0])
    info = open_store(uri)
    fs, paths = info.arrow_paths()
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(["clip", "features"])
    batch = ds.take_batch(16, batch_format="numpy")
    assert batch["features"].shape == (16, 2, 251, 64) and batch["features"].dtype == np.float16
    index = data.read_index(smoke_store)
    rows = data.row_set(index, batch["clip"])  # sorted by clip id
    order = np.argsort(batch["clip"])
    assert list(rows.clips) == list(batch["clip"][order])
    want, _ = data.StoreReader(data.store_layout(smoke_store)).read(rows)
    np.testing.assert_array_equal(batch["features"][order], want)


@pytest.mark.ray
@pytest.mark.slow
def test_smoke_study_with_its_store_in_the_bucket_needs_no_shared_filesystem(tmp_path, ray_session, smoke_data, s3_env):
    """--storage s3://bucket/prefix without --cache-dir and data.engine=ray_data, two trials at once:
    the study's feature store is written to the bucket (nothing of it on a local disk), every trial
    trains from it with the storage's credentials carried in memory (the session's Ray workers have
    no AWS variables), the Train workers open no store file, the results land in the bucket; and on
    the session's Ray (4 logical CPUs) two trials, each with Train workers and Ray Data at once,
    neither hangs (the plan gives each trial's Data its CPUs: data.ray_data_cpus)."""
    import io
    import os

    import pandas as pd

    from seld.config import preset_config
    from seld.synth import dataset_hash

    bucket = s3_env("nofs")
    uri = f"s3://{bucket}/prefix"
    staging = tmp_path / "staging"
    # The generated dataset is read by the driver only: its local work folder holds the session's.
    h = dataset_hash(preset_config("smoke").synth)
    (staging / "_work").mkdir(parents=True)
    (staging / "_work" / f"synth-{h}").symlink_to(smoke_data, target_is_directory=True)
    cmd = [sys.executable, str(ROOT / "studies/ablation.py"), "--preset", "smoke", "--storage", uri,
           "--out", "staging", "--max-retries", "0", "--concurrency", "2",
           "--set", "data.engine=ray_data", "--set", "train.torch_threads=1"]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert not [p for p in staging.rglob("*.parquet")], "a store file on the local disk"
    cache = Mirror(tmp_path / "probe-cache", f"{uri}/cache")
    stored = cache.remote_files()
    assert any(k.startswith(f"store-{h}/features-") and k.endswith("/manifest.json") for k in stored)
    assert sum(k.endswith(".parquet") for k in stored) >= 4
    results = Mirror(tmp_path / "probe", f"{uri}/results/ablation")
    objects = results.remote_files()
    summary = pd.read_csv(io.BytesIO(_read_object(results, "summary.csv")))
    assert list(summary["status"]) == ["ok", "ok"]
    workers = [k for k in objects if k.endswith("/data/worker-0.json")]
    assert len(workers) == 2
    for key in workers:
        record = json.loads(_read_object(results, key))
        assert record["engine"] == "ray_data" and record["store_files_opened"] == 0, record
    for key in (k for k in objects if k.endswith("/config.json") and k.startswith("runs/")):
        data_cfg = json.loads(_read_object(results, key))["data"]
        assert data_cfg["engine"] == "ray_data" and data_cfg["ray_data_cpus"] == 1.0, data_cfg
