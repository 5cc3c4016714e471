"""Shared, session-scoped fixtures: one smoke dataset, one feature store, one Ray per session.

Building these once per session keeps the suite under its time budget; tests that modify data
copy what they need into their own tmp_path first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep Ray (and everything it starts) on loopback and inside the test session's folders.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller takes the workers' reports, and sees a run end, only when it polls them:
# every 2 s by default, which each report (the queue holds one) and each run's end may wait out.
# The smoke epochs last about a second where real ones last minutes: poll every 0.5 s in tests (the
# drivers, Ray's workers and the commands the tests start all inherit it). Results do not depend
# on it; only how soon they are seen (the cluster tests set the same).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def smoke_config():
    from seld.config import preset_config

    return preset_config("smoke")


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> Path:
    """The smoke generated dataset (all splits present), in the DCASE2025 layout, made as a user
    makes it: `seld synth --preset smoke --out DATA`."""
    from seld.cli import main

    data = tmp_path_factory.mktemp("smoke") / "data"
    assert main(["synth", "--preset", "smoke", "--out", str(data), "--no-progress"]) == 0
    return data


@pytest.fixture(scope="session")
def smoke_store(tmp_path_factory, smoke_data, smoke_config) -> Path:
    """The feature store of the smoke dataset, made by `seld features DATA --out STORE`; returns the
    store's folder for the default feature config (STORE/features-<hash>, which `seld train` also takes)."""
    from seld.cli import main
    from seld.store import store_folder

    store = tmp_path_factory.mktemp("smoke") / "store"
    assert main(["features", str(smoke_data), "--out", str(store)]) == 0
    return store_folder(store, smoke_config.features)


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for the whole session (4 logical CPUs on 2 cores so Ray Data never starves)."""
    import ray

    from seld.study.session import init_ray

    tmp = tmp_path_factory.mktemp("ray")
    os.environ.setdefault("RAY_TMPDIR", str(tmp))
    init_ray(num_cpus=4, log_to_driver=False)
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Tests that start Ray clusters of their own (several nodes, or `seld train` with its own Ray)
    run last, after every test that uses the session's Ray."""
    own = ("test_multinode.py", "test_scale.py")
    items.sort(key=lambda item: item.path.name in own or item.get_closest_marker("own_cluster") is not None)


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 server (moto) on 127.0.0.1 for the session; yields its endpoint URL, stopped at the end."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The standard AWS variables pointing at the session's S3 server (a canary secret key, which
    must appear in no file or log); yields a function that creates a bucket and returns its name."""
    import uuid

    import pyarrow.fs as pafs

    env = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing-key",
           "AWS_SECRET_ACCESS_KEY": "canary-secret-4f1c9e", "AWS_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    def make_bucket(prefix: str = "seld") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        host = s3_server.split("://", 1)[1]
        fs = pafs.S3FileSystem(endpoint_override=host, scheme="http", region="us-east-1", access_key="testing-key",
                               secret_key=env["AWS_SECRET_ACCESS_KEY"], allow_bucket_creation=True)
        fs.create_dir(name)
        return name

    make_bucket.env = env
    return make_bucket
