"""Parquet feature store: contents, config hashing, resume, corrupt inputs, the CLI, Ray Data reading."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from seld import labels
from seld.cli import main as cli_main
from seld.config import FeatureConfig, config_hash
from seld.errors import DataError
from seld.features import load_audio, log_mel
from seld.store import StoreIncomplete, build_store, convert_store, open_store

SR = 24_000
F16 = FeatureConfig()
F32 = FeatureConfig(store_dtype="float32")
TENSOR_F16 = "extension<arrow.fixed_shape_tensor[value_type=halffloat, shape=[2,251,64]]>"
# (split, clip stem) of the tiny dataset; the eval clip has no labels.
CLIPS = [
    ("dev-train-tau", "fold3_room4_mix001_deg010_start0000"),
    ("dev-train-tau", "fold3_room4_mix002_deg020_start0010"),
    ("dev-train-tau", "fold3_room6_mix001_deg030_start0020"),
    ("dev-train-tau", "fold3_room6_mix003_deg040_start0030"),
    ("dev-train-tau", "fold3_room7_mix001_deg050_start0040"),
    ("dev-test-sony", "fold4_room21_mix001_deg000_start0000"),
    ("dev-test-sony", "fold4_room22_mix005_deg359_start0007"),
    ("dev-train-synth", "fold1_room1_mix001_deg100_start0100"),
    ("dev-train-synth", "fold1_room2_mix004_deg200_start0005"),
    ("eval", "sample0"),
]


def _events(i: int) -> np.ndarray:
    rows = [(f, i % 13, 0, (-1) ** i * (10 * i % 90), 100 + 10 * i, 0) for f in range(i, i + 5)]
    rows += [(f, (i + 3) % 13, 2, -45, 250, 0) for f in range(20, 20 + 3 * i)]
    return labels.make_events(rows) if i % 4 else labels.empty_events()  # some clips have no events


def _write_dataset(root):
    rng = np.random.default_rng(0)
    for i, (split, stem) in enumerate(CLIPS):
        audio = (10 ** (-i / 4) * 0.3 * rng.standard_normal((SR * 5, 2))).astype(np.float32)
        folder = root / ("stereo_eval/eval" if split == "eval" else f"stereo_dev/{split}")
        folder.mkdir(parents=True, exist_ok=True)
        sf.write(folder / f"{stem}.wav", audio, SR, subtype="PCM_16")
        if split != "eval":
            labels.write_csv(root / "metadata_dev" / split / f"{stem}.csv", _events(i))
    return root


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="module")
def tiny_store(tiny_data, tmp_path_factory):
    return build_store(tiny_data, tmp_path_factory.mktemp("tiny") / "store", F16, n_procs=1, shard_rows=3)


def _rows(folder):
    table = pq.ParquetDataset(sorted(folder.glob("shard-*.parquet"))).read()
    return {r["clip"]: r for r in table.to_pylist()}


def test_rows_columns_and_manifest(tiny_data, tiny_store):
    info = open_store(tiny_store.parent)
    assert info.path == tiny_store and tiny_store.name == f"features-{config_hash(F16)}"
    assert info.n_rows == {"dev-test-sony": 2, "dev-train-synth": 2, "dev-train-tau": 5, "eval": 1}
    m = info.manifest
    assert m["feature_shape"] == [2, 251, 64] and m["feature_dtype"] == "float16"
    assert m["feature_config"]["n_mels"] == 64 and m["skipped"] == {}
    assert len(info.shards) == 5 and all(len(s["sources_sha256"]) == 64 for s in m["shards"])
    assert 64_000 < m["bytes_per_clip"] < 80_000  # 2*251*64 float16 = 64 256 bytes + events
    assert m["feature_encoding"] == "fixed_shape_tensor" and info.encoding == "fixed_shape_tensor"
    schema = pq.read_schema(info.shards[0])
    assert str(schema.field("features").type) == TENSOR_F16
    rows = _rows(tiny_store)
    assert set(rows) == {stem for _, stem in CLIPS}
    for i, (split, stem) in enumerate(CLIPS):
        r = rows[stem]
        assert r["split"] == split
        if split == "eval":
            assert (r["domain"], r["role"], r["site"], r["room"], r["fold"]) == ("real", "eval", "eval", -1, -1)
            assert r["ev_frame"] == []
            continue
        exp = {"dev-train-tau": ("real", "train", "tau"), "dev-test-sony": ("real", "test", "sony"),
               "dev-train-synth": ("synthetic", "train", "synth")}[split]
        assert (r["domain"], r["role"], r["site"]) == exp
        assert r["fold"] == int(stem[4]) and r["room"] == int(stem.split("_")[1][4:])
        ev = _events(i)
        ev = ev[np.lexsort((ev["class"], ev["frame"]))]
        assert r["ev_frame"] == ev["frame"].tolist() and r["ev_class"] == ev["class"].tolist()
        assert r["ev_source"] == ev["source"].tolist() and r["ev_azimuth"] == ev["azimuth"].tolist()
        assert r["ev_distance"] == ev["distance"].tolist()
        # float16 storage: within half a float16 step of the float32 features (|x| < 128 dB).
        wav = tiny_data / "stereo_dev" / split / f"{stem}.wav"
        ref = log_mel(load_audio(wav))
        got = np.asarray(r["features"], dtype=np.float32).reshape(2, 251, 64)
        assert np.abs(got - ref).max() <= 2 ** -5 and np.abs(got - ref).max() > 0


def test_float32_store_new_folder_exact_and_config_checks(tiny_data, tiny_store, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(tiny_store, out / tiny_store.name)
    f32 = build_store(tiny_data, out, F32, n_procs=1)
    assert f32 != tiny_store and f32.parent == out and f32.name == f"features-{config_hash(F32)}"
    rows = _rows(f32)
    wav = tiny_data / "stereo_dev" / "dev-train-tau" / f"{CLIPS[1][1]}.wav"
    # Bit-equal on every CPU: extraction computes each clip with the same GEMM shapes whatever clips
    # share its batch (log_mel's per-clip mel matmul), and a float32 store keeps the values as computed.
    np.testing.assert_array_equal(np.asarray(rows[CLIPS[1][1]]["features"], np.float32).reshape(2, 251, 64),
                                  log_mel(load_audio(wav)))
    with pytest.raises(DataError, match="several stores"):
        open_store(out)
    assert open_store(out, F32).path == f32 and open_store(out, F16).path == out / tiny_store.name
    with pytest.raises(DataError, match=r"another feature config.*store_dtype: store 'float32' vs wanted 'float16'"):
        open_store(f32, F16)
    with pytest.raises(DataError, match="no store for this feature config"):
        open_store(out, FeatureConfig(n_mels=32))


def test_resume_keeps_finished_shards(tiny_data, tmp_path):
    data = _write_dataset(tmp_path / "data")
    folder = build_store(data, tmp_path / "store", F16, n_procs=1, shard_rows=3)
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.parquet")}
    # An interrupted run: one shard missing, a half-written temporary file, no manifest.
    (folder / "shard-dev-train-tau-00001.parquet").unlink()
    (folder / ".shard-dev-train-tau-00001.parquet.tmp-999").write_bytes(b"PAR1 half")
    (folder / "manifest.json").unlink()
    with pytest.raises(DataError, match="incomplete store"):
        open_store(folder)
    build_store(data, tmp_path / "store", F16, n_procs=1, shard_rows=3)
    after = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.parquet")}
    assert set(after) == set(before) and not list(folder.glob(".shard-*"))
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"shard-dev-train-tau-00001.parquet"}
    # A changed input recomputes only its shard.
    wav = data / "stereo_dev" / "dev-test-sony" / f"{CLIPS[6][1]}.wav"
    sf.write(wav, np.zeros((SR * 5, 2), np.float32), SR, subtype="PCM_16")
    os.utime(wav, ns=(1, 1))
    build_store(data, tmp_path / "store", F16, n_procs=1, shard_rows=3)
    again = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.parquet")}
    assert {k for k in after if after[k] != again[k]} == {"shard-dev-test-sony-00000.parquet"}
    assert np.all(np.asarray(_rows(folder)[CLIPS[6][1]]["features"], np.float32) == -100.0)
    assert open_store(folder).manifest["n_rows_total"] == 10


def test_corrupt_inputs_reported_others_done(tmp_path, capsys):
    data = _write_dataset(tmp_path / "data")
    bad_wav = data / "stereo_dev" / "dev-train-tau" / f"{CLIPS[2][1]}.wav"
    bad_wav.write_bytes(bad_wav.read_bytes()[:5000])  # truncated
    no_csv = data / "metadata_dev" / "dev-train-synth" / f"{CLIPS[8][1]}.csv"
    no_csv.unlink()
    bad_csv = data / "metadata_dev" / "dev-test-sony" / f"{CLIPS[5][1]}.csv"
    bad_csv.write_text("frame,class,source,azimuth,distance,onscreen\n3,15,0,10,100,0\n")
    with pytest.raises(StoreIncomplete) as err:
        build_store(data, tmp_path / "store", F16, n_procs=1, shard_rows=3)
    assert set(err.value.skipped) == {str(bad_wav), str(data / "stereo_dev" / "dev-train-synth" / f"{CLIPS[8][1]}.wav"),
                                      str(data / "stereo_dev" / "dev-test-sony" / f"{CLIPS[5][1]}.wav")}
    msg = str(err.value)
    assert "truncated" in msg and "no label file" in msg and f"{CLIPS[5][1]}.csv:2" in msg
    info = open_store(err.value.path)
    assert info.manifest["n_rows_total"] == 7 and set(info.skipped) == set(err.value.skipped)
    # The CLI lists them and exits non-zero; the resumed run recomputes nothing.
    rc = cli_main(["features", str(data), "--out", str(tmp_path / "store")])
    assert rc != 0
    stderr = capsys.readouterr().err
    assert "3 input file(s) skipped" in stderr and bad_wav.name in stderr


def test_two_workers_same_result_and_cli(tiny_data, tiny_store, tmp_path, capsys):
    rc = cli_main(["features", str(tiny_data), "--out", str(tmp_path / "s"), "--procs", "2"])
    assert rc == 0 and "10 clips" in capsys.readouterr().out
    folder = open_store(tmp_path / "s", F16).path
    a, b = _rows(folder), _rows(tiny_store)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["n_rows"] == open_store(tiny_store).n_rows


@pytest.mark.ray
def test_feature_column_reads_flat_by_row_group(tiny_store):
    """The training workers read the store by Parquet row group (seld.data.StoreReader): the feature
    column arrives as one flat float16 array per group, in row order, equal to the stored rows."""
    from seld import data

    info = open_store(tiny_store)
    f = pq.ParquetFile(info.shards[0])
    assert str(f.schema_arrow.field("features").type) == TENSOR_F16
    reader = data.StoreReader(data.store_layout(tiny_store))
    feats, _ = reader.read_group(0, 0, np.arange(f.metadata.row_group(0).num_rows))
    assert feats.dtype == np.float16 and feats.shape[1:] == (2, 251, 64)
    ref = _rows(tiny_store)
    clips = f.read_row_group(0, columns=["clip"])["clip"].to_pylist()
    for clip, x in zip(clips, feats, strict=True):
        np.testing.assert_array_equal(x.reshape(-1), np.asarray(ref[clip]["features"], np.float16))


def test_smoke_store_covers_the_smoke_dataset(smoke_data, smoke_store):
    info = open_store(smoke_store, FeatureConfig())
    wavs = {p.parent.name: len(list(p.parent.glob("*.wav"))) for p in smoke_data.glob("stereo_dev/*/*.wav")}
    assert info.n_rows == wavs and info.skipped == {}
    index = pq.ParquetDataset(list(info.shards)).read(columns=["clip", "split", "domain", "role"]).to_pandas()
    assert set(index["domain"]) == {"real", "synthetic"} and set(index["role"]) == {"train", "test"}
    assert index["clip"].is_unique


# How stores were written before the tensor encoding (seld/store.py at aa49798).
OLD_WRITER = {"use_dictionary": ["clip", "split", "domain", "role", "site"],
              "compression": {c: "none" if c == "features" else "snappy"
                              for c in ("clip", "split", "domain", "role", "site", "room", "fold", "features",
                                        "ev_frame", "ev_class", "ev_source", "ev_azimuth", "ev_distance")}}


def _downgrade_shard(path) -> None:
    """A shard as shards were written before the tensor encoding: the features column a flat
    fixed-size list of the same values; the same row groups and metadata."""
    import pyarrow as pa

    f = pq.ParquetFile(path)
    groups = [f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)]
    table = f.read()
    col = table["features"]
    flat = pa.chunked_array([c.storage for c in col.chunks], col.type.storage_type)
    table = table.set_column(table.schema.get_field_index("features"), "features", flat)
    table = table.replace_schema_metadata(f.schema_arrow.metadata)
    del f
    with pq.ParquetWriter(path, table.schema, **OLD_WRITER) as w:
        start = 0
        for n in groups:
            w.write_table(table.slice(start, n), row_group_size=n)
            start += n


def downgrade_to_list_encoding(folder, only=None) -> None:
    """A store (or only the shard file `only` of it) as written before the tensor encoding: a
    manifest without `feature_encoding` (a list-encoded store) or saying the list (a conversion cut off)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["shards"]:
        path = folder / f"{entry['name']}.parquet"
        if only is None or path == only:
            _downgrade_shard(path)
        entry["bytes"] = path.stat().st_size
    manifest.pop("feature_encoding")
    if only is not None:
        manifest["feature_encoding"] = "fixed_size_list"
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _read_all(store):
    """(index, features, events, layout) of every row of a store, through the training workers' reader."""
    from seld import data

    layout = data.store_layout(store)
    index = data.read_index(store, layout=layout)
    feats, events = data.StoreReader(layout).read(data.row_set(index, index["clip"].to_numpy()))
    return index, feats, events, layout


def _same_events(a, b) -> None:
    for name in ("offsets", "frame", "cls", "source", "azimuth", "distance"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_an_old_list_encoded_store_reads_the_same_and_converts_in_one_command(tiny_store, tmp_path, capsys):
    """A store written before the tensor encoding (fixed-size list) reads with the same values and
    row groups; `seld store convert` rewrites it shard by shard (resumable), the same rows bit for bit."""
    index, feats, events, layout = _read_all(tiny_store)
    assert feats.dtype == np.float16 and feats.shape == (10, 2, 251, 64) and len(events) == 10
    old = tmp_path / tiny_store.name
    shutil.copytree(tiny_store, old)
    downgrade_to_list_encoding(old)
    assert str(pq.read_schema(old / "shard-eval-00000.parquet").field("features").type).startswith("fixed_size_list")
    assert open_store(old).encoding == "fixed_size_list"
    assert cli_main(["store", "info", str(old)]) == 0 and "as fixed_size_list" in capsys.readouterr().out
    i2, f2, e2, l2 = _read_all(old)
    assert i2.equals(index) and f2.dtype == np.float16
    np.testing.assert_array_equal(f2, feats)
    _same_events(e2, events)
    assert all(np.array_equal(a, b) for a, b in zip(l2.group_starts, layout.group_starts, strict=True))

    assert cli_main(["store", "convert", str(old)]) == 0
    out = capsys.readouterr().out
    assert "10 clips" in out and "as fixed_shape_tensor" in out
    info = open_store(old)
    assert info.encoding == "fixed_shape_tensor" and info.hash == config_hash(F16) and old.name == tiny_store.name
    for shard in info.shards:
        assert str(pq.read_schema(shard).field("features").type) == TENSOR_F16
    assert info.manifest["bytes_total"] == sum(os.path.getsize(s) for s in info.shards)
    i3, f3, e3, l3 = _read_all(old)
    np.testing.assert_array_equal(f3, feats)
    _same_events(e3, events)
    assert all(np.array_equal(a, b) for a, b in zip(l3.group_starts, layout.group_starts, strict=True))
    # Resumable: a conversion cut off (one shard still a list, the manifest not yet updated)
    # rewrites only what is left.
    only = old / "shard-dev-train-tau-00001.parquet"
    downgrade_to_list_encoding(old, only)
    stamps = {p.name: p.stat().st_mtime_ns for p in old.glob("shard-*.parquet")}
    info = convert_store(old)
    changed = {p.name for p in old.glob("shard-*.parquet") if p.stat().st_mtime_ns != stamps[p.name]}
    assert changed == {only.name} and info.encoding == "fixed_shape_tensor"
    np.testing.assert_array_equal(_read_all(old)[1], feats)


def test_features_on_an_old_store_convert_its_shards_without_recomputing(tiny_data, tmp_path, caplog):
    folder = build_store(tiny_data, tmp_path / "store", F16, n_procs=1, shard_rows=3)
    before = _read_all(folder)[1]
    sums = [s["sources_sha256"] for s in open_store(folder).manifest["shards"]]
    downgrade_to_list_encoding(folder)
    with caplog.at_level("INFO", logger="seld.store"):
        build_store(tiny_data, tmp_path / "store", F16, n_procs=1, shard_rows=3)
    assert "5 of 5 shards already done" in caplog.text and "0 computed" in caplog.text
    info = open_store(folder)
    assert info.encoding == "fixed_shape_tensor" and [s["sources_sha256"] for s in info.manifest["shards"]] == sums
    for shard in info.shards:
        assert str(pq.read_schema(shard).field("features").type) == TENSOR_F16
    np.testing.assert_array_equal(_read_all(folder)[1], before)


@pytest.mark.ray
@pytest.mark.slow
def test_training_on_a_converted_store_in_a_bucket_gives_the_same_results_bit_for_bit(smoke_store, ray_session,
                                                                                      s3_env, tmp_path):
    """The row-group engine trains the same run on a list-encoded store (a folder) and on it
    converted and put in a bucket (`seld train s3://...`: the Train worker reads its row groups
    through the bucket's filesystem, which the plan carries): the same metrics.csv (timings aside),
    scores and thresholds, bit for bit."""
    import csv

    import pyarrow.fs as pafs

    from seld.storage import filesystem

    old = tmp_path / smoke_store.name
    shutil.copytree(smoke_store, old)
    downgrade_to_list_encoding(old)
    args = ["--preset", "smoke", "--set", "train.torch_threads=1"]
    assert cli_main(["train", str(old), "--out", str(tmp_path / "list"), *args]) == 0
    assert convert_store(old).encoding == "fixed_shape_tensor"
    uri = f"s3://{s3_env('train')}/store"
    pafs.copy_files(str(old), f"{uri.removeprefix('s3://')}/{old.name}", destination_filesystem=filesystem(uri)[0])
    assert cli_main(["train", uri, "--out", str(tmp_path / "tensor"), *args]) == 0
    before, after = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("list", "tensor"))
    timing = {"train/time_s", "train/data_wait_frac", "val/time_s", "elapsed_s"}

    def table(run):
        return [{k: v for k, v in r.items() if k not in timing} for r in csv.DictReader((run / "metrics.csv").open())]

    assert len(table(tmp_path / "list")) == before["cost/epochs"] > 0
    assert table(tmp_path / "tensor") == table(tmp_path / "list")
    scores = [k for k in before if k.split("/")[0] in ("val", "val_pp", "test", "test_pp", "stage1_test")]
    assert scores and {k: after[k] for k in scores} == {k: before[k] for k in scores}
    assert (tmp_path / "list" / "thresholds.json").read_text() == (tmp_path / "tensor" / "thresholds.json").read_text()
