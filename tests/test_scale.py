"""The data path at scale: each Train worker gets only its share, and memory does not follow the store.

Runs the real `seld train` (its own Ray, 2 Train workers, stage 1) on the smoke store replicated to
600 and to 2400 rows (`seld.store.replicate_store`), measuring the peak PSS of the whole process
tree (Ray's daemons and workers included) from /proc, as bench/cost.py does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from seld import data
from seld.config import preset_config
from seld.store import replicate_store

ROOT = Path(__file__).resolve().parents[1]
ROWS = (600, 2400)


def _cost_module():
    spec = importlib.util.spec_from_file_location("bench_cost", ROOT / "bench" / "cost.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def runs(smoke_store, tmp_path_factory):
    """{rows: (store, run folder, measured cost)} of a 2-worker stage-1 run on each replicated store."""
    cost = _cost_module()
    out = {}
    for n in ROWS:
        base = tmp_path_factory.mktemp(f"scale{n}")
        store = replicate_store(smoke_store, base / "store", n)
        run = base / "run"
        cmd = [str(Path(sys.executable).parent / "seld"), "train", str(store), "--preset", "smoke", "--out", str(run),
               "--workers", "2", "--set", "train.stages=stage1", "--set", "train.torch_threads=1"]
        # Its own Ray, apart from the session's: no address, its own temp folder (a shared RAY_TMPDIR
        # lets `ray.init()` find the session's Ray and connect to it), its own process group.
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="seldm-")  # short: socket paths must fit 107 bytes
        res = cost.run_measured(cmd, interval=0.25, env=env, start_new_session=True)
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
        assert res["rc"] == 0, res
        out[n] = (store, run, res)
    return out


@pytest.mark.slow
@pytest.mark.ray
def test_each_worker_trains_on_its_own_share_only(runs):
    for n, (store, run, _) in runs.items():
        cfg = preset_config("smoke", {"train.stages": "stage1", "train.num_workers": 2})
        planned = data.plan_rows(data.read_index(store), cfg)["stage1"]
        got = [json.loads((run / "data" / f"worker-{r}.json").read_text()) for r in (0, 1)]
        a, b = (set(g["stage1"]) for g in got)
        assert not a & b, "a clip went to both workers"
        assert sorted(a | b) == planned, "the shares together are not the stage-1 set"
        assert abs(len(a) - len(b)) <= 2, (len(a), len(b))  # one row per domain at most
        assert all(g["path"] == "materialised" for g in got)
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["data/path"] == "materialised"
        rows = list((run / "metrics.csv").read_text().splitlines())
        assert len(rows) == 2  # header + the one stage-1 epoch
        # Every planned row trained (the epoch is all of both shares, less a ragged last batch).
        trained = int(rows[1].split(",")[5])
        bs = cfg.train.batch_size
        assert len(planned) - 2 * bs < trained <= len(planned), (n, trained, len(planned))


@pytest.mark.slow
@pytest.mark.ray
def test_peak_memory_grows_by_at_most_one_copy_of_the_added_rows(runs):
    """4x the store adds at most about one held copy of the added training rows to the peak PSS.

    Bound: 2 x (added stage-1 rows x bytes per row) + 200 MiB. One copy is what materialised shares
    must hold (each worker its half, once); the factor 2 and the 200 MiB leave room for the
    transient batch buffers and for run-to-run noise in the PSS of ~10 fresh Ray processes (seen
    here: about +-60 MiB between identical runs). The old path (the whole store through the object
    store into every worker, copied per stage) grew by ~0.64 MiB per row, ~1.1 GiB for these 1800
    rows, about 4x this bound.
    """
    (s1, _, r1), (s2, _, r2) = (runs[n] for n in ROWS)
    cfg = preset_config("smoke", {"train.stages": "stage1"})
    n1 = len(data.plan_rows(data.read_index(s1), cfg)["stage1"])
    n2 = len(data.plan_rows(data.read_index(s2), cfg)["stage1"])
    per_row = data.store_layout(s1).bytes_per_row
    grew_mib = (r2["peak_pss_gib"] - r1["peak_pss_gib"]) * 1024
    bound_mib = 2 * (n2 - n1) * per_row / 2**20 + 200
    assert grew_mib < bound_mib, (r1, r2, n1, n2, round(grew_mib), round(bound_mib))
