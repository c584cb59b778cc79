"""merge: batches to data/processed, byte-identical across strategies, batch sizes and workers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pricing_cli.errors import BatchError, PricingError
from pricing_cli.stages.batches import read_manifest, write_manifest
from pricing_cli.stages.merge import run_merge
from pricing_cli.stages.preprocess import SampleParams, build_samples, run_preprocess
from pricing_cli.storage import OWNER_MARKER
from tests.support.feature_files import quiet_monitor, tiny_settings, write_feature_files

PROCESSED = Path("data/processed")
BATCHES = Path("data/intermediate")


def processed_bytes(folder: Path = PROCESSED) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "run.json"}


def preprocess_and_merge(**flags: object) -> dict[str, bytes]:
    run_preprocess(tiny_settings(**flags), quiet_monitor()[0])
    run_merge(tiny_settings(**{**flags, "merge.keep_batches": True}), quiet_monitor("merge")[0])
    return processed_bytes()


@pytest.fixture
def features_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_feature_files(tmp_path / "data" / "features")
    return tmp_path / "data" / "features"


def test_outputs_follow_the_contract_and_match_a_per_file_reference(features_dir: Path) -> None:
    outputs = preprocess_and_merge()
    assert sorted(outputs) == sorted(
        [f"{kind}_{s}.{ext}" for s in ("train", "val", "test")
         for kind, ext in (("X", "npy"), ("labels", "npz"), ("masks", "npz"),
                           ("meta", "parquet"))]
        + ["feature_cols.json", "preprocessing_stats.json", OWNER_MARKER])
    settings = tiny_settings()
    params = SampleParams.from_settings(settings, [f"f_{j}" for j in range(5)])
    blocks = [build_samples(features_dir / f"{i:05d}.parquet", params) for i in range(13)]
    for split in ("train", "val", "test"):
        rows = [b.take(b.meta["split"] == split) for b in blocks]
        expected_x = np.concatenate([r.features for r in rows])
        buffer = io.BytesIO()
        np.save(buffer, expected_x)
        assert outputs[f"X_{split}.npy"] == buffer.getvalue()  # np.save bytes, exactly
        with np.load(PROCESSED / f"labels_{split}.npz", allow_pickle=False) as labels:
            assert labels.files == ["price_level", "price_move"]
            for head in labels.files:
                assert labels[head].dtype == np.int16
                assert np.array_equal(labels[head], np.concatenate([r.labels[head]
                                                                    for r in rows]))
        with np.load(PROCESSED / f"masks_{split}.npz", allow_pickle=False) as masks:
            assert masks["price_level"].shape == (len(expected_x), 11)
            assert masks["price_move"].shape == (len(expected_x), 3)
            assert masks["price_level"].dtype == np.int8
        meta = pl.read_parquet(PROCESSED / f"meta_{split}.parquet")
        assert dict(meta.schema) == {
            "product_index": pl.Int32, "product_id": pl.String, "date": pl.Date,
            "split": pl.String, "price": pl.Float64, "units": pl.Float64,
            "unit_cost": pl.Float64, "min_price": pl.Float64, "max_price": pl.Float64,
            "ref_price": pl.Float64, "category": pl.String}
        assert meta["split"].unique().to_list() == [split]
        assert meta.sort(["product_index", "date"]).equals(meta)  # contract order
        source = pl.concat([pl.read_parquet(features_dir / f"{i:05d}.parquet")
                            for i in range(13)]).filter(pl.col("split") == split)
        assert meta["price"].to_list() == source["price"].to_list()
        assert meta["product_id"].to_list() == source["product_id"].to_list()
        assert meta["category"].to_list() == source["category"].to_list()
    # The catalog category reaches the demand fit (it pools toward cat0, cat1, cat2).
    from pricing_cli.agent.demand import DemandModel

    fitted = DemandModel.fit(pl.read_parquet(PROCESSED / "meta_train.parquet"), settings)
    assert fitted.categories == ["cat0", "cat1", "cat2"] and fitted.info["categories"] == 3
    assert fitted.product_category.tolist() == [i % 3 for i in range(13)]
    names = json.loads(outputs["feature_cols.json"])
    assert len(names) == 5 + 8 * 7 + 2 * 11 + 6 and names[:2] == ["f_0", "f_1"]
    stats = json.loads(outputs["preprocessing_stats.json"])
    # 13 products, product i starts i % 4 days late on a 40-day calendar split 28/6/6
    assert stats["samples"] == {"train": 13 * 28 - (0 + 1 + 2 + 3) * 3 - 0,
                                "val": 13 * 6, "test": 13 * 6,
                                "total": sum(40 - i % 4 for i in range(13))}
    assert stats["input_dim"] == len(names)
    assert stats["heads"] == {"price_level": 11, "price_move": 3}
    assert stats["price_levels"] == 11 and stats["max_daily_change"] == 0.25
    assert stats["products"] == 13 and stats["mask_conflicts"] > 0
    assert stats["feature_groups"]["ladder_margin"] == [5 + 56 + 11, 5 + 56 + 22]


def test_sequential_equals_accumulative_byte_for_byte(features_dir: Path) -> None:
    sequential = preprocess_and_merge(**{"preprocess.batch_size": 3})
    run_merge(tiny_settings(**{"merge.strategy": "accumulative", "merge.keep_batches": True}),
              quiet_monitor("merge")[0])
    assert processed_bytes() == sequential


def test_outputs_do_not_depend_on_batch_size_or_worker_count(features_dir: Path) -> None:
    reference = preprocess_and_merge(**{"preprocess.batch_size": 5})
    assert preprocess_and_merge(**{"preprocess.batch_size": 1,
                                   "preprocess.resume": False}) == reference
    assert preprocess_and_merge(**{"preprocess.batch_size": 4, "preprocess.workers": 2,
                                   "preprocess.resume": False}) == reference


def test_batches_are_deleted_after_success_and_kept_on_failure(features_dir: Path) -> None:
    run_preprocess(tiny_settings(), quiet_monitor()[0])
    manifest = read_manifest(BATCHES)
    assert manifest is not None
    unfinished = dict(manifest, n_batches=4)  # as if preprocess had been stopped
    write_manifest(BATCHES, unfinished)
    with pytest.raises(BatchError, match="preprocess finished 3 of 4 batches"):
        run_merge(tiny_settings(), quiet_monitor("merge")[0])
    assert len(list(BATCHES.glob("batch_*.npz"))) == 3 and not PROCESSED.exists()
    write_manifest(BATCHES, manifest)
    result = run_merge(tiny_settings(), quiet_monitor("merge")[0])
    assert result.summary["batches_deleted"] == 3
    # the batch files go; the small manifest stays as the record of what was merged
    assert sorted(p.name for p in BATCHES.iterdir()) == [OWNER_MARKER, "manifest.json"]
    assert (PROCESSED / "X_train.npy").is_file()
    with pytest.raises(PricingError, match="batch_0000.npz: listed in the manifest but missing"):
        run_merge(tiny_settings(), quiet_monitor("merge")[0])


def test_rows_out_of_product_order_are_refused(features_dir: Path) -> None:
    # a file named after the wrong index sorts after product 12 while holding product 2
    (features_dir / "00002.parquet").rename(features_dir / "00099.parquet")
    run_preprocess(tiny_settings(), quiet_monitor()[0])
    with pytest.raises(BatchError, match=r"batch_0002.npz: row 77 is not after the previous "
                                         r"one in \(product_index, date\) order"):
        run_merge(tiny_settings(), quiet_monitor("merge")[0])
    assert len(list(BATCHES.glob("batch_*.npz"))) == 3  # kept for another try
