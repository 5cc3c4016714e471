"""Row planning (validation rooms, split table), row decoding and normalisation of seld/data.py."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pandas as pd
import pytest

from seld import data, labels
from seld.config import preset_config
from seld.errors import DataError


def _index() -> pd.DataFrame:
    rows = []
    for site, rooms, domain, role, split in (
        ("tau", (1, 2, 3), "real", "train", "dev-train-tau"),
        ("sony", (21, 22), "real", "train", "dev-train-sony"),
        ("tau", (4,), "real", "test", "dev-test-tau"),
        ("sony", (23,), "real", "test", "dev-test-sony"),
        ("synth", (100, 101), "synthetic", "train", "dev-train-synth"),
        ("synth", (102,), "synthetic", "test", "dev-test-synth"),
    ):
        for room in rooms:
            for k in range(3):
                rows.append({"clip": f"fold3_room{room}_mix{k:03d}", "split": split, "domain": domain,
                             "role": role, "site": site, "room": room})
    return pd.DataFrame(rows)


def test_default_validation_is_last_room_of_each_real_site():
    assert data.validation_rooms(_index(), preset_config("smoke").data) == {"sony": (22,), "tau": (3,)}


def test_plan_rows_follows_the_split_table():
    idx = _index()
    rows = data.plan_rows(idx, preset_config("smoke"))
    room = {c: r for c, r in zip(idx["clip"], idx["room"], strict=True)}
    assert sorted({room[c] for c in rows["val"]}) == [3, 22]
    assert sorted({room[c] for c in rows["stage2"]}) == [1, 2, 21]
    assert sorted({room[c] for c in rows["stage1"]}) == [1, 2, 21, 100, 101]
    assert sorted({room[c] for c in rows["test"]}) == [4, 23]
    assert sorted({room[c] for c in rows["synth_test"]}) == [102]
    # Validation never overlaps training or test, and lists are sorted (order-independent of Ray).
    assert not set(rows["val"]) & (set(rows["stage1"]) | set(rows["test"]))
    assert rows["stage1"] == sorted(rows["stage1"])


def test_plan_rows_options():
    idx = _index()
    cfg = preset_config("smoke", {"data.val_rooms": "2", "data.stage1_domains": "synthetic"})
    rows = data.plan_rows(idx, cfg)
    room = dict(zip(idx["clip"], idx["room"], strict=True))
    assert sorted({room[c] for c in rows["val"]}) == [2]
    assert sorted({room[c] for c in rows["stage1"]}) == [100, 101]
    paper = data.plan_rows(idx, preset_config("smoke", {"data.protocol": "paper"}))
    assert paper["val"] == paper["test"]
    assert sorted({room[c] for c in paper["stage2"]}) == [1, 2, 3, 21, 22]
    with pytest.raises(DataError, match="val_rooms"):
        data.plan_rows(idx, preset_config("smoke", {"data.val_rooms": "7"}))
    no_synth = idx[idx["domain"] == "real"]
    with pytest.raises(DataError, match="stage1"):
        data.plan_rows(no_synth, preset_config("smoke", {"data.stage1_domains": "synthetic"}))


def _event_corpus(seed: int = 0, n: int = 3000) -> list[np.ndarray]:
    """Clips with 0-39 events: frames and classes partly outside the label grid, dense same-class
    overlaps (4 classes), distance ties; the corpus the golden hashes below were made from."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(0, 40))
        ev = np.zeros(k, dtype=labels.EVENT_DTYPE)
        ev["frame"] = rng.integers(-2, 53, k)
        ev["class"] = rng.integers(-1, 14, k) if i % 7 == 0 else rng.integers(0, 4, k)
        ev["source"] = rng.integers(0, 5, k)
        ev["azimuth"] = rng.uniform(-180, 180, k).round(0)
        ev["distance"] = rng.choice([50.0, 100.0, 150.0, 200.0, 320.0], k)
        out.append(ev)
    return out


# sha256 of the per-clip targets of _event_corpus() concatenated, and the summed overlap/drop counts,
# as the per-clip encoders wrote them before batched encoding existed (commit c23b5bf).
GOLDEN_TARGETS = {
    "accdoa": ("68aad61e02b1533f6e8ee1e68fa712eec85dc4cc58e21ac6b86c19e451d9f834", 2432),
    "multi_accdoa": ("fca2ec2f5f74faa1e1f56d52b073f65d9117c92211d16227eafeaa5f1db3e22f", 6),
}


@pytest.mark.parametrize("fmt", ["accdoa", "multi_accdoa"])
def test_batched_target_encoding_equals_the_per_clip_encoding_to_the_bit(fmt):
    corpus = _event_corpus()
    per_clip = labels.encode_accdoa if fmt == "accdoa" else labels.encode_multi_accdoa
    batch_fn = labels.encode_accdoa_batch if fmt == "accdoa" else labels.encode_multi_accdoa_batch
    h, counts = hashlib.sha256(), 0
    for ev in corpus:
        t, n = per_clip(ev, 50)
        h.update(t.tobytes())
        counts += n
    assert (h.hexdigest(), counts) == GOLDEN_TARGETS[fmt]
    # All clips at once, through the worker's path (an EventTable, as read from Parquet).
    flat = np.concatenate(corpus)
    clip = np.repeat(np.arange(len(corpus)), [len(e) for e in corpus])
    batched, n_per_clip = batch_fn(flat, clip, len(corpus), 50)
    assert hashlib.sha256(batched.tobytes()).hexdigest() == GOLDEN_TARGETS[fmt][0]
    assert int(n_per_clip.sum()) == GOLDEN_TARGETS[fmt][1]
    offsets = np.r_[0, np.cumsum([len(e) for e in corpus])]
    table = data.EventTable(offsets, flat["frame"], flat["class"], flat["source"], flat["azimuth"], flat["distance"])
    sel = np.array([5, 2999, 0, 5, 17])
    np.testing.assert_array_equal(data.encode_targets(table.take(sel), fmt), batched[sel])
    np.testing.assert_array_equal(data.encode_targets([corpus[i] for i in sel], fmt), batched[sel])


def test_targets_of_known_events():
    ev = np.zeros(2, dtype=labels.EVENT_DTYPE)
    ev["frame"], ev["class"], ev["azimuth"], ev["distance"] = [0, 1], [3, 3], [30.0, -90.0], [150.0, 200.0]
    t = data.encode_targets([labels.empty_events(), ev], "accdoa")
    assert t.shape == (2, 50, 13, 4) and not t[0].any()
    np.testing.assert_allclose(t[1, 0, 3], [1, np.cos(np.pi / 6), np.sin(np.pi / 6), 1.5], atol=1e-6)
    np.testing.assert_allclose(t[1, 1, 3], [1, 0, -1, 2.0], atol=1e-6)
    assert data.encode_targets([ev], "multi_accdoa").shape == (1, 50, 6, 13, 4)


def _located(idx: pd.DataFrame, rows_per_shard: int = 4) -> pd.DataFrame:
    """The test index with store locations: each split's rows in shards of `rows_per_shard`."""
    out = idx.copy()
    shard, row, n = [], [], 0
    for _split, part in out.groupby("split", sort=False):
        for k in range(len(part)):
            shard.append(n + k // rows_per_shard)
            row.append(k % rows_per_shard)
        n += -(-len(part) // rows_per_shard)
    out["shard"], out["row"] = np.array(shard, np.int32), np.array(row, np.int64)
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shares_are_disjoint_complete_and_balanced_per_domain(world):
    idx = _located(_index())
    rows = data.plan_rows(idx, preset_config("smoke"))
    shares = data.plan_shares(idx, rows, world)
    assert len(shares) == world
    domain = dict(zip(idx["clip"], idx["domain"], strict=True))
    for name in ("stage1", "stage2"):
        got = [list(s[name].clips) for s in shares]
        assert sorted(c for g in got for c in g) == rows[name]  # complete, no clip twice
        assert all(g == sorted(g) for g in got)
        for d in ("real", "synthetic"):
            n = [sum(domain[c] == d for c in g) for g in got]
            assert max(n) - min(n) <= 1, (name, d, n)
    if world == 1:
        assert list(shares[0]["stage1"].clips) == rows["stage1"]
    # A worker's rows of a stage are a contiguous run of each domain in store order.
    order = {c: i for i, c in enumerate(idx.sort_values(["shard", "row"])["clip"])}
    for s in shares:
        for d in ("real", "synthetic"):
            pos = sorted(order[c] for c in s["stage1"].clips if domain[c] == d)
            planned = sorted(order[c] for c in rows["stage1"] if domain[c] == d)
            if pos:
                assert planned[planned.index(pos[0]):planned.index(pos[0]) + len(pos)] == pos


def test_too_many_workers_for_a_set_is_one_clear_error():
    idx = _located(_index())
    rows = data.plan_rows(idx, preset_config("smoke"))
    with pytest.raises(DataError, match="too few for 50 training workers"):
        data.plan_shares(idx, rows, 50)


def test_choose_path_auto_forced_and_too_large():
    cfg = preset_config("smoke").data
    gib = 2 ** 30
    assert data.choose_path(1 * gib, 8 * gib, cfg)[0] is True  # 1 GiB <= 0.25 x 8 GiB
    held, why = data.choose_path(3 * gib, 8 * gib, cfg)
    assert held is False and "streaming" in why and "3.00 GiB" in why
    assert data.choose_path(1 * gib, None, cfg)[0] is False  # no worker node up yet: stream
    forced = dataclasses.replace(cfg, materialize=True)
    assert data.choose_path(3 * gib, 8 * gib, forced)[0] is True
    with pytest.raises(DataError, match=r"data.materialize=true: a worker would hold 9.00 GiB .* 8.00 GiB"):
        data.choose_path(9 * gib, 8 * gib, forced)
    assert data.choose_path(1, 8 * gib, dataclasses.replace(cfg, materialize=False))[0] is False


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_ordered_map_keeps_order_raises_and_stops_early(threads):
    import threading
    import time

    def slow_square(i):
        time.sleep(0.001 * ((7 * i) % 5))  # items finish out of order in the threads
        return i * i

    assert list(data.ordered_map(slow_square, list(range(40)), threads, 4)) == [i * i for i in range(40)]

    def broken(i):
        if i == 3:
            raise ValueError("bad row group")
        return i

    it = data.ordered_map(broken, list(range(10)), threads, 2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad row group"):
        next(it)
    started = []
    lock = threading.Lock()

    def record(i):
        with lock:
            started.append(i)
        return i

    it = data.ordered_map(record, list(range(10**5)), threads, 2)
    assert next(it) == 0
    it.close()  # the consumer stops: items not started are cancelled
    time.sleep(0.2)
    assert len(started) <= 2 + max(threads, 2)


# --- On a real store (the session's smoke store, and a replicated one with many row groups) -------
@pytest.fixture(scope="module")
def big_store(smoke_store, tmp_path_factory):
    """The smoke store replicated to 700 rows (shards of 512 rows in row groups of 64)."""
    from seld.store import replicate_store

    return replicate_store(smoke_store, tmp_path_factory.mktemp("rep") / "store", 700)


def test_reader_returns_the_stored_rows_in_the_asked_order(big_store):
    import pyarrow as pa
    import pyarrow.parquet as pq

    idx = data.read_index(big_store)
    reader = data.StoreReader(data.store_layout(big_store))
    table = pa.concat_tables([pq.read_table(p) for p in reader.layout.shards])
    assert list(table["clip"].to_pylist()) == list(idx["clip"])  # index rows = store rows, in order
    rng = np.random.default_rng(0)
    pick = rng.choice(len(idx), 150, replace=False)
    rows = data.row_set(idx, idx["clip"].to_numpy()[pick])
    at = {c: i for i, c in enumerate(idx["clip"])}
    feats, events = reader.read(rows)
    want = table.take(pa.array([at[c] for c in rows.clips]))
    flat = np.stack(want["features"].to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(feats.reshape(len(rows), -1), flat)
    for i, ev in enumerate(events.per_clip()):
        np.testing.assert_array_equal(ev["frame"], want["ev_frame"][i].as_py())
        np.testing.assert_array_equal(ev["azimuth"], want["ev_azimuth"][i].as_py())
        np.testing.assert_array_equal(ev["distance"], want["ev_distance"][i].as_py())


@pytest.mark.parametrize("world,threads", [(1, 1), (2, 3)])
def test_held_and_streamed_epochs_draw_the_same_rows_deterministically(big_store, world, threads):
    cfg = preset_config("smoke", {"data.stage1_synth_per_real": 2.0, "data.shuffle_groups": 3,
                                  "data.read_threads": threads})
    plan = data.plan_run(cfg, big_store)
    for rank in range(world):
        plan_w = dataclasses.replace(plan, shares=data.plan_shares(data.read_index(big_store), plan.rows, world))
        held = data.worker_sets(cfg, dataclasses.replace(plan_w, materialize=True), rank, world).train_sets[1]
        streamed = data.worker_sets(cfg, dataclasses.replace(plan_w, materialize=False), rank, world).train_sets[1]
        assert held.held is not None and streamed.held is None
        for epoch in (0, 1):
            n = held.n_batches(epoch)
            assert streamed.n_batches(epoch) == n
            a = list(held.batches(epoch, n))
            b = list(streamed.batches(epoch, n))
            again = list(streamed.batches(epoch, n))
            assert len(a) == len(b) == n
            for x, y in zip(b, again, strict=True):  # deterministic given seed, rank, epoch
                np.testing.assert_array_equal(x[0], y[0])
                np.testing.assert_array_equal(x[1], y[1])

            def multiset(batches):
                return sorted(hashlib.sha256(f.tobytes() + t.tobytes()).hexdigest()
                              for fs, ts in batches for f, t in zip(fs, ts, strict=True))

            # Same rows (features with their own targets), in another order.
            assert multiset(a) == multiset(b)
        np.testing.assert_array_equal(held.sums(), streamed.sums())
        # The reading threads change nothing but the speed.
        one = data.worker_sets(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, read_threads=1)),
                               dataclasses.replace(plan_w, materialize=False), rank, world).train_sets[1]
        n0 = one.n_batches(0)
        for x, y in zip(one.batches(0, n0), streamed.batches(0, n0), strict=True):
            np.testing.assert_array_equal(x[0], y[0])
            np.testing.assert_array_equal(x[1], y[1])


def test_store_that_disagrees_with_its_manifest_is_one_line(big_store, tmp_path):
    import json
    import shutil

    bad = tmp_path / big_store.name
    shutil.copytree(big_store, bad)
    mf = json.loads((bad / "manifest.json").read_text())
    mf["shards"][0]["rows"] += 1
    (bad / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(DataError) as e:
        data.read_index(bad)
    msg = str(e.value)
    assert "\n" not in msg and mf["shards"][0]["name"] in msg and "the manifest says" in msg
