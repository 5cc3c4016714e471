"""Object-store storage (seld/storage.py) against a local S3 server (moto on 127.0.0.1): URIs, the
staging folder, a mirror's pull and push, one-line errors for a bad URI or an unreachable store."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seld.errors import UserError
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
    from seld.study.cli import results_dir, study_mirror

    monkeypatch.setenv("SELD_STAGING_DIR", str(tmp_path))
    out = results_dir(None, "ablation", storage="s3://b/p")
    assert out == tmp_path / "s3/b/p/results/ablation"
    assert results_dir(tmp_path / "mine", "ablation", storage="s3://b/p") == tmp_path / "mine"
    plan = plan_cluster(None, preset_config("smoke"), "s3://b/p")
    assert plan.storage == "s3://b/p"
    assert study_mirror(out, "ablation", plan).uri == "s3://b/p/results/ablation"
    assert study_mirror(out, "ablation", plan_cluster(None, preset_config("smoke"))) is None


def test_multi_node_with_an_object_store_needs_a_shared_cache_dir(tmp_path):
    from seld.config import preset_config

    plan = plan_cluster(ROOT / "cluster/loopback.yaml", preset_config("smoke"), "s3://b/p")
    assert plan.multi_node
    with pytest.raises(UserError, match="--storage s3://b/p: on the multi-node cluster .* pass --cache-dir"):
        check_shared_paths(plan, {"--out": None, "--cache-dir": None})
    check_shared_paths(plan, {"--out": None, "--cache-dir": tmp_path})


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
