"""The batch format: round trip, determinism, validation of every corruption, legacy import."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import pytest

from pricing_cli.errors import BatchError, ConfigError, MissingInputError
from pricing_cli.stages.batch_checks import run_validate_batches, validate_batch
from pricing_cli.stages.batches import (
    NpyStreamWriter,
    SampleBlock,
    load_batch,
    member_sha256,
    read_manifest,
    write_batch,
    write_manifest,
)
from tests.support.feature_files import quiet_monitor, tiny_settings, write_feature_files

BATCHES = Path("data/intermediate")
HEADS = {"price_level": 11, "price_move": 3}


def small_block(n: int = 6, n_features: int = 4, product: int = 0, seed: int = 0) -> SampleBlock:
    """A valid block: labels feasible in their masks, dates in 2023-01."""
    rng = np.random.default_rng(seed)
    level = rng.integers(0, 11, n)
    level_mask = (rng.random((n, 11)) < 0.5).astype(np.int8)
    level_mask[np.arange(n), level] = 1
    return SampleBlock(
        features=rng.normal(size=(n, n_features)).astype(np.float32),
        labels={"price_level": level.astype(np.int16),
                "price_move": np.array([-1] + [1] * (n - 1), np.int16)},
        masks={"price_level": level_mask, "price_move": np.ones((n, 3), np.int8)},
        meta={"product_index": np.full(n, product, np.int32),
              "product_id": np.array([f"P{product}" * (product + 1)] * n),
              "date": np.datetime64("2023-01-01") + np.arange(n),
              "split": np.array(["train"] * (n - 2) + ["val", "test"]),
              "price": rng.uniform(5, 10, n), "units": rng.uniform(0, 4, n),
              "unit_cost": np.full(n, 3.0), "min_price": np.full(n, 4.0),
              "max_price": np.full(n, 12.0), "ref_price": rng.uniform(5, 10, n),
              "category": np.array([f"cat{product % 2}"] * n)},
    )


def assert_blocks_equal(a: SampleBlock, b: SampleBlock) -> None:
    assert np.array_equal(a.features, b.features) and a.features.dtype == b.features.dtype
    for head in a.labels:
        assert np.array_equal(a.labels[head], b.labels[head])
        assert np.array_equal(a.masks[head], b.masks[head])
    for column in a.meta:
        assert np.array_equal(a.meta[column], b.meta[column]), column


# ----------------------------------------------------------------------------------------------
# Writer and reader


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(4, 3),
    np.array(["a", "bcd", ""]),
    np.datetime64("2023-01-01") + np.arange(3),
    np.array(7, np.int32),
    np.zeros((0, 5), np.int8),
])
def test_stream_writer_writes_what_np_save_writes(array: np.ndarray) -> None:
    expected = io.BytesIO()
    np.save(expected, array)
    written = io.BytesIO()
    writer = NpyStreamWriter(written, array.dtype, array.shape, "x")
    if array.ndim:
        writer.append(array[:1])
        writer.append(array[1:])
    else:
        writer.append(array)
    writer.close()
    assert written.getvalue() == expected.getvalue()


def test_stream_writer_hashes_only_when_asked() -> None:
    # merge writes 2 GB at full scale and records no digest: hashing it was 24% of its CPU
    array = np.arange(12, dtype=np.float32).reshape(4, 3)
    expected = io.BytesIO()
    np.save(expected, array)
    for digest, returned in ((True, hashlib.sha256(expected.getvalue()).hexdigest()),
                             (False, None)):
        written = io.BytesIO()
        writer = NpyStreamWriter(written, "float32", (4, 3), "X_train.npy", digest=digest)
        writer.append(array[:3])
        writer.append(array[3:])
        assert writer.close() == returned
        assert written.getvalue() == expected.getvalue()


def test_stream_writer_refuses_missing_rows() -> None:
    writer = NpyStreamWriter(io.BytesIO(), "float32", (3, 2), "X_train.npy")
    writer.append(np.zeros((2, 2), np.float32))
    with pytest.raises(BatchError, match="X_train.npy: 2 rows written, 3 announced"):
        writer.close()


def test_round_trip_is_exact_and_deterministic(tmp_path: Path) -> None:
    blocks = [small_block(5, product=0, seed=1), small_block(3, product=1, seed=2)]
    names = ["a", "b", "c", "d"]
    record = write_batch(tmp_path / "batch_0000.npz", blocks, names, HEADS)
    loaded, loaded_names = load_batch(tmp_path / "batch_0000.npz")
    assert loaded_names == names
    assert_blocks_equal(loaded, SampleBlock.concat(blocks))
    assert loaded.meta["product_id"].dtype == np.dtype("<U4")  # widest id of the batch
    assert record.n_samples == 8
    assert record.samples == {"train": 4, "val": 2, "test": 2}
    assert {k: v["sha256"] for k, v in record.members.items()} == member_sha256(
        tmp_path / "batch_0000.npz")
    with np.load(tmp_path / "batch_0000.npz", allow_pickle=False) as npz:
        assert int(npz["format_version"]) == 1
        assert npz["masks_price_level"].dtype == np.int8
    write_batch(tmp_path / "again.npz", blocks, names, HEADS)
    assert (tmp_path / "again.npz").read_bytes() == (tmp_path / "batch_0000.npz").read_bytes()
    empty = write_batch(tmp_path / "empty.npz", [], names, HEADS)
    assert empty.n_samples == 0
    assert load_batch(tmp_path / "empty.npz")[0].features.shape == (0, 4)


def test_normal_loader_refuses_a_pickled_batch(tmp_path: Path) -> None:
    path = tmp_path / "batch_0000.npz"
    write_batch(path, [small_block()], list("abcd"), HEADS)
    replace_members(path, {"meta_product_id": npy_bytes(np.array(["P0"] * 6, dtype=object))})
    with pytest.raises(BatchError, match="member\\(s\\) meta_product_id hold pickled Python "
                                         "objects; batches are loaded with allow_pickle=False"):
        load_batch(path)


# ----------------------------------------------------------------------------------------------
# validate-batches


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def replace_members(path: Path, changes: dict[str, bytes | None]) -> None:
    """Rewrite a zip with members replaced (bytes) or removed (None): hand-made corruption."""
    with zipfile.ZipFile(path) as archive:
        members = {i.filename: archive.read(i) for i in archive.infolist()}
    for name, data in changes.items():
        if data is None:
            del members[f"{name}.npy"]
        else:
            members[f"{name}.npy"] = data
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


@pytest.fixture
def batch_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Six products of 20 days preprocessed in two batches."""
    from pricing_cli.stages.preprocess import run_preprocess

    monkeypatch.chdir(tmp_path)
    write_feature_files(tmp_path / "data" / "features", n_products=6, n_days=20)
    run_preprocess(tiny_settings(**{"preprocess.batch_size": 3}), quiet_monitor()[0])
    return BATCHES


def problems_of(path: Path) -> list[str]:
    return [p.what for p in validate_batch(path, read_manifest(path.parent))]


def rewrite_recorded(path: Path, change: Any) -> None:
    """Rewrite a batch through the writer after ``change(block)`` and record it in the
    manifest, so only the value checks can notice."""
    block, names = load_batch(path)
    change(block)
    record = write_batch(path, [block], names, HEADS)
    manifest = read_manifest(path.parent)
    assert manifest is not None
    for entry in manifest["batches"]:
        if entry["name"] == path.name:
            entry.update(members=record.members, bytes=record.bytes)
    write_manifest(path.parent, manifest)


def test_sound_batches_pass_every_check(batch_dir: Path) -> None:
    result = run_validate_batches(tiny_settings(), quiet_monitor("validate-batches")[0],
                                  paths=[], deep=True)
    assert result.failures == []
    assert result.summary["batches_checked"] == 2 and result.summary["batches_ok"] == 2
    assert result.summary["samples_in_ok_batches"] == sum(20 - i % 4 for i in range(6))


def test_truncated_file_is_caught(batch_dir: Path) -> None:
    path = batch_dir / "batch_0000.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert problems_of(path) == ["not a readable .npz (zip) file: File is not a zip file"]


def test_flipped_bit_is_caught(batch_dir: Path) -> None:
    path = batch_dir / "batch_0001.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the features member (the bulk of the file)
    path.write_bytes(bytes(data))
    assert problems_of(path) == ["a member fails its zip checksum (Bad CRC-32 for file "
                                 "'features.npy')"]


def test_wrong_dtype_is_caught(batch_dir: Path) -> None:
    path = batch_dir / "batch_0000.npz"
    block, _ = load_batch(path)
    replace_members(path, {"features": npy_bytes(block.features.astype(np.float64))})
    found = problems_of(path)
    assert "member 'features' has dtype float64, expected float32" in found
    assert any(p.startswith("member 'features' is <f8") and "the manifest records <f4" in p
               for p in found)


def test_missing_member_is_caught(batch_dir: Path) -> None:
    path = batch_dir / "batch_0000.npz"
    replace_members(path, {"masks_price_move": None})
    assert problems_of(path) == ["member 'masks_price_move' is missing"]
    with pytest.raises(BatchError, match="missing member\\(s\\) masks_price_move"):
        load_batch(path)


def test_pickled_object_array_is_caught(batch_dir: Path) -> None:
    path = batch_dir / "batch_0000.npz"
    block, _ = load_batch(path)
    replace_members(path, {"meta_product_id": npy_bytes(block.meta["product_id"].astype(object))})
    assert problems_of(path) == [
        "member 'meta_product_id' is an object array (pickled Python objects)"]


def test_value_problems_are_caught_and_explained(batch_dir: Path) -> None:
    path = batch_dir / "batch_0000.npz"

    def spoil(block: SampleBlock) -> None:
        block.features[3, 2] = np.nan
        level = int(block.labels["price_level"][5])
        block.masks["price_level"][5, level] = 0  # the label becomes infeasible
        block.masks["price_move"][7] = 0  # an all-zero mask row
        block.labels["price_move"][8] = 3  # outside [-1, 3)
        block.meta["date"][0] = np.datetime64("2023-12-31")  # a train row in the future

    rewrite_recorded(path, spoil)
    found = validate_batch(path, read_manifest(batch_dir))
    assert [p.what for p in found] == [
        "1 sample(s) have NaN or inf features (rows 3)",
        "labels_price_level name a class that its mask forbids in rows 5",
        "labels_price_move outside [-1, 3) in rows 8",
        "masks_price_move has all-zero rows (7)",
        "labels_price_move name a class that its mask forbids in rows 7",
        "1 'train' sample(s) dated outside 2023-01-01..2023-01-14 (rows 0)",
    ]
    text = str(found[0])
    assert "Why it matters:" in text and "Fix:" in text and str(path) in text
    result = run_validate_batches(tiny_settings(), quiet_monitor("validate-batches")[0],
                                  paths=[batch_dir])
    assert len(result.failures) == 6 and result.summary["batches_ok"] == 1


def test_deep_check_compares_with_the_sources(batch_dir: Path) -> None:
    source = Path("data/features/00004.parquet")  # the middle file of batch 1
    rewrite_recorded(batch_dir / "batch_0001.npz",
                     lambda block: block.features.__setitem__((20, 0), 9.0))
    shallow = run_validate_batches(tiny_settings(), quiet_monitor("validate-batches")[0],
                                   paths=[batch_dir])
    assert shallow.failures == []  # consistent with its manifest: only --deep can tell
    deep = run_validate_batches(tiny_settings(), quiet_monitor("validate-batches")[0],
                                paths=[batch_dir], deep=True)
    assert [f.split(". Why")[0] for f in deep.failures] == [
        "data/intermediate/batch_0001.npz: rows of 00004.parquet differ from a rebuild from "
        "the source file"]
    pl.read_parquet(source).write_parquet(source)  # same content, new mtime
    deep = run_validate_batches(tiny_settings(), quiet_monitor("validate-batches")[0],
                                paths=[batch_dir / "batch_0001.npz"], deep=True)
    assert any("00004.parquet changed after the batch was built" in f for f in deep.failures)


def test_no_batches_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInputError, match="no batch_\\*.npz files in empty"):
        run_validate_batches(tiny_settings(), quiet_monitor()[0], paths=[Path("empty")])


# ----------------------------------------------------------------------------------------------
# Legacy batches


def write_legacy_batch(path: Path, block: SampleBlock, names: list[str]) -> None:
    """The old system's layout: lists of dicts as object arrays and a pickled DataFrame."""
    n = block.n
    features = np.empty(n, dtype=object)
    labels = np.empty(n, dtype=object)
    masks = np.empty(n, dtype=object)
    for i in range(n):
        features[i] = {name: float(block.features[i, j]) for j, name in enumerate(names)}
        labels[i] = {h: int(block.labels[h][i]) for h in block.labels}
        masks[i] = {h: block.masks[h][i].tolist() for h in block.masks}
    frame = np.empty((), dtype=object)
    # The old system had no category column.
    frame[()] = pd.DataFrame({c: block.meta[c] for c in block.meta if c != "category"})
    np.savez(path, strategic_features=features, labels=labels, masks=masks, df=frame)


def test_legacy_batch_is_refused_then_converted_with_trust(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "legacy"
    folder.mkdir()
    original = SampleBlock.concat([small_block(5, product=0, seed=3),
                                   small_block(4, product=1, seed=4)])
    path = folder / "batch_0000.npz"
    write_legacy_batch(path, original, ["a", "b", "c", "d"])
    legacy_bytes = path.read_bytes()

    with pytest.raises(BatchError, match="hold pickled Python objects") as refused:
        load_batch(path)
    assert "--convert-legacy --trust-pickle" in refused.value.hint
    plain = run_validate_batches(tiny_settings(), quiet_monitor()[0], paths=[folder])
    assert len(plain.failures) == 1
    assert "legacy layout (members strategic_features, labels, masks, df)" in plain.failures[0]
    with pytest.raises(ConfigError, match="--convert-legacy and --trust-pickle go together"):
        run_validate_batches(tiny_settings(), quiet_monitor()[0], paths=[folder],
                             convert_legacy=True)
    assert path.read_bytes() == legacy_bytes

    result = run_validate_batches(tiny_settings(), quiet_monitor()[0], paths=[folder],
                                  convert_legacy=True, trust_pickle=True)
    assert result.failures == [] and result.summary["legacy_converted"] == 1
    converted, names = load_batch(path)
    assert names == ["a", "b", "c", "d"]
    assert converted.meta["category"].tolist() == ["none"] * 9
    original.meta["category"] = converted.meta["category"]
    assert_blocks_equal(converted, original)
    assert (folder / "batch_0000.npz.legacy").read_bytes() == legacy_bytes
    again = run_validate_batches(tiny_settings(), quiet_monitor()[0], paths=[folder])
    assert again.failures == []
