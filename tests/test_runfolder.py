"""seld/runfolder.py: the one atomic writer (old content kept, no temporary file left, full disk),
model files and thresholds files."""

from __future__ import annotations

import concurrent.futures as cf
import errno
import json
import os
import threading

import numpy as np
import pytest
import torch

from seld.config import N_CLASSES
from seld.errors import DataError
from seld.runfolder import (
    atomic_write,
    load_thresholds,
    read_model_file,
    save_model_file,
    save_thresholds,
    temp_glob,
    temp_path,
    write_json_atomic,
    write_text_atomic,
)


def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "metrics.csv"
    write_text_atomic(path, "epoch\n0\n")
    with pytest.raises(ValueError, match="boom"):
        with atomic_write(path) as tmp:
            tmp.write_text("epoch\n0\n1")  # half of the new content
            raise ValueError("boom")
    assert path.read_text() == "epoch\n0\n" and sorted(tmp_path.iterdir()) == [path]
    # A first write that fails leaves nothing, not an empty or half file.
    fresh = tmp_path / "sub" / "summary.csv"
    with pytest.raises(ValueError), atomic_write(fresh) as tmp:
        tmp.write_text("half")
        raise ValueError("boom")
    assert list(fresh.parent.iterdir()) == []


def test_temporary_file_is_hidden_from_globbing_readers_and_matched_by_temp_glob(tmp_path):
    path = tmp_path / "shard-dev-train-tau-00000.parquet"
    with atomic_write(path) as tmp:
        tmp.write_bytes(b"PAR1")
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp == temp_path(path)
        assert list(tmp_path.glob("shard-*.parquet")) == []
        assert list(tmp_path.glob(temp_glob("shard-*.parquet"))) == [tmp] == list(tmp_path.glob(temp_glob()))
    assert list(tmp_path.iterdir()) == [path]


def test_full_disk_raises_and_leaves_nothing_behind(tmp_path):
    # The temporary file lands on a full device: every write fails with ENOSPC.
    path = tmp_path / "manifest.json"
    write_json_atomic(path, {"n_rows": 1})
    before = path.read_bytes()
    temp_path(path).symlink_to("/dev/full")
    with pytest.raises(OSError) as err:
        write_json_atomic(path, {"n_rows": 2})
    assert err.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]


def test_full_disk_during_a_model_file_write_is_a_data_error_naming_the_file(tmp_path):
    path = tmp_path / "checkpoints" / "stage1_best.pt"
    path.parent.mkdir()
    path.with_name(path.name + ".tmp").symlink_to("/dev/full")
    with pytest.raises(DataError, match="stage1_best.pt: cannot write the checkpoint .*nothing was written"):
        save_model_file(path, {"w": torch.zeros(1000)}, "{}", None, None, {})
    assert list(path.parent.iterdir()) == []


def test_concurrent_writes_of_one_file_leave_one_complete_version(tmp_path):
    path = tmp_path / "metrics.json"
    versions = [{"writer": w, "values": [w] * 20_000} for w in range(4)]
    writing = threading.Event()

    def write(version: dict) -> None:
        for _ in range(10):
            write_json_atomic(path, version)

    def read() -> int:
        n_read = 0
        while writing.is_set() or n_read == 0:
            if path.exists():
                assert json.loads(path.read_text()) in versions  # never half a file, nor a mix
                n_read += 1
        return n_read

    writing.set()
    with cf.ThreadPoolExecutor(len(versions) + 1) as pool:
        reader = pool.submit(read)
        try:
            for f in [pool.submit(write, v) for v in versions]:
                f.result()  # a writer's error (e.g. two threads sharing a temporary file) fails the test
        finally:
            writing.clear()
        assert reader.result() > 0
    assert json.loads(path.read_text()) in versions
    assert sorted(tmp_path.iterdir()) == [path]


def test_model_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "selected.pt"
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}
    mean = np.zeros((2, 1, 64), np.float32)
    std = np.full((2, 1, 64), 20.0, np.float32)
    save_model_file(path, state, '{"preset": "smoke"}', mean, std, {"epoch": 3, "stage": 2})
    blob = read_model_file(str(path))
    assert blob["config"] == '{"preset": "smoke"}' and blob["meta"] == {"epoch": 3, "stage": 2}
    assert all(torch.equal(blob["model"][k], v) for k, v in state.items()) and blob["model"].keys() == state.keys()
    np.testing.assert_array_equal(blob["norm_mean"].numpy(), mean)
    np.testing.assert_array_equal(blob["norm_std"].numpy(), std)
    assert sorted(p.name for p in path.parent.iterdir()) == ["selected.pt"]
    save_model_file(path, state, "{}", None, None, {})  # overwrite
    assert read_model_file(path)["norm_mean"] is None
    with pytest.raises(DataError, match="missing.pt: no such checkpoint"):
        read_model_file(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"weights")
    with pytest.raises(DataError, match="junk.pt: not a readable checkpoint"):
        read_model_file(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="other.pt: not a seld checkpoint"):
        read_model_file(tmp_path / "other.pt")


def test_thresholds_file_bytes(tmp_path):
    path = tmp_path / "thresholds.json"
    save_thresholds(path, np.full(N_CLASSES, 0.5))
    text = path.read_text()
    assert text.startswith('{\n  "thresholds": [\n    0.5,') and text.endswith("]\n}\n")  # key order as written
    with pytest.raises(ValueError, match="need 13 thresholds"):
        save_thresholds(path, [0.5])
    assert path.read_text() == text and not os.path.lexists(temp_path(path))


def test_thresholds_json_round_trip_and_errors(tmp_path):
    thr = np.linspace(0.1, 0.9, N_CLASSES)
    path = tmp_path / "thresholds.json"
    save_thresholds(path, thr)
    np.testing.assert_allclose(load_thresholds(path), thr)
    assert json.loads(path.read_text())["classes"][0] == "Female speech"
    path.write_text('{"thresholds": [0.5, 0.5]}')
    with pytest.raises(DataError, match="thresholds.json"):
        load_thresholds(path)
    path.write_text("not json")
    with pytest.raises(DataError, match="thresholds.json"):
        load_thresholds(path)
    with pytest.raises(DataError, match="not found"):
        load_thresholds(tmp_path / "missing.json")
