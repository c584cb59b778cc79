"""preprocess: per-product feature files to batches; samples, labels, masks, resume, failures.

The feature files come from tests/support/feature_files.py.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pricing_cli.errors import DataError, MissingInputError
from pricing_cli.pricing import MOVE_DOWN, MOVE_HOLD, MOVE_UP, feasible_mask, price_grid
from pricing_cli.stages import batches as batches_module
from pricing_cli.stages.batches import load_batch, read_manifest
from pricing_cli.stages.preprocess import (
    SampleParams,
    build_samples,
    build_samples_with_stats,
    feature_layout,
    plan_batches,
    run_preprocess,
    sample_bytes,
)
from tests.support.feature_files import (
    OUT_OF_BOUNDS_PRODUCT,
    START,
    quiet_monitor,
    tiny_settings,
    write_feature_files,
)


@pytest.fixture
def features_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_feature_files(tmp_path / "data" / "features")
    return tmp_path / "data" / "features"


def batch_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("batch_*.npz"))}


# ----------------------------------------------------------------------------------------------
# Samples of one file, against a hand computation


def _hand_file(folder: Path) -> Path:
    """Seven days of one product with bounds [10, 20], K=11 (grid step 1), change limit 0.25."""
    folder.mkdir(parents=True)
    # hold (+0.27 %), +30 % (too far), -13 %, +24 % to above max, -4.8 %, +2.5 % at the top
    price = [15.0, 15.04, 19.6, 17.0, 21.0, 20.0, 20.5]
    n = len(price)
    frame = pl.DataFrame({
        "product_index": pl.Series([4] * n, dtype=pl.Int32), "product_id": ["P4"] * n,
        "date": [START + timedelta(days=d) for d in range(n)],
        "split": ["train"] * 4 + ["val", "val", "test"],
        "units": [3.0, 0.0, -1.0, 2.0, 5.0, 1.0, 1.0], "price": price,
        "revenue": [45.0, 0.0, -19.6, 34.0, 105.0, 20.0, 20.5],
        "n_transactions": pl.Series([2, 0, 1, 1, 3, 1, 1], dtype=pl.Int64),
        "ref_price": [15.0, 15.0, 15.02, 16.55, 16.66, 17.53, 18.53], "unit_cost": [8.0] * n,
        "min_price": [10.0] * n, "max_price": [20.0] * n, "category": ["c"] * n,
        "f_a": pl.Series([0.5, -0.5, 1.0, 0.0, 2.0, 0.1, 0.2], dtype=pl.Float32),
    })
    path = folder / "00004.parquet"
    frame.write_parquet(path)
    return path


def test_labels_masks_and_features_match_a_hand_computation(tmp_path: Path) -> None:
    path = _hand_file(tmp_path / "f")
    params = SampleParams(("f_a",), price_levels=11, max_daily_change=0.25, history_window=2,
                          move_tolerance=0.005, heads=("price_level", "price_move"))
    block, stats = build_samples_with_stats(path, params)
    # Grid 10, 11, ..., 20. Nearest levels: 15 -> 5, 15.04 -> 5, 19.6 -> 10, but yesterday
    # was 15.04 and 15.04 * 1.25 = 18.8, so feasible levels stop at 18: projected to 8.
    # 17 -> 7; 21 (above max) -> 10; 20 -> 10; 20.5 -> 10.
    assert block.labels["price_level"].tolist() == [5, 5, 8, 7, 10, 10, 10]
    # the last +2.5 % is an up move from the top of the grid: infeasible, projected to hold
    assert block.labels["price_move"].tolist() == [
        -1, MOVE_HOLD, MOVE_UP, MOVE_DOWN, MOVE_UP, MOVE_DOWN, MOVE_HOLD]
    assert stats.labels_projected == {"price_level": 1, "price_move": 1}
    assert stats.mask_conflicts == 0
    level_mask = block.masks["price_level"]
    assert level_mask[0].tolist() == [1] * 11  # first day: everything feasible
    # day 1, yesterday 15: feasible |p / 15 - 1| <= 0.25 -> 11.25..18.75 -> levels 12..18
    assert level_mask[1].tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    # day 3, yesterday 19.6: 14.7..24.5 -> 15..20
    assert level_mask[3].tolist() == [0] * 5 + [1] * 6
    # day 4, yesterday 17: 12.75..21.25 -> 13..20
    assert level_mask[4].tolist() == [0] * 3 + [1] * 8
    # day 5, yesterday 21 (above max): 15.75..26.25 -> 16..20
    assert level_mask[5].tolist() == [0] * 6 + [1] * 5
    move_mask = block.masks["price_move"]
    assert move_mask[0].tolist() == [1, 1, 1]
    # day 3: yesterday 19.6; 20 > 19.6 * 1.005 is feasible, so up is too
    assert move_mask[3].tolist() == [1, 1, 1]
    # days 5 and 6: yesterday 21 and 20, no feasible level above them
    assert move_mask[5].tolist() == [1, 1, 0]
    assert move_mask[6].tolist() == [1, 1, 0]
    for head in ("price_level", "price_move"):
        labels = block.labels[head]
        rows = np.flatnonzero(labels >= 0)
        assert block.masks[head][rows, labels[rows]].all()

    names, spans = feature_layout(params)
    assert block.features.shape == (7, len(names)) == (7, 1 + 8 * 2 + 2 * 11 + 6)
    assert block.features.dtype == np.float32
    row = dict(zip(names, block.features[2].tolist(), strict=True))
    assert row["f_a"] == 1.0
    assert row["hist_units_lag1"] == pytest.approx(np.arcsinh(0.0))
    assert row["hist_units_lag2"] == pytest.approx(np.arcsinh(3.0))
    assert row["hist_price_rel_ref_lag1"] == pytest.approx(15.04 / 15.0 - 1, abs=1e-7)
    assert row["hist_log_price_change_lag1"] == pytest.approx(np.log(15.04 / 15.0), abs=1e-7)
    assert row["hist_log_price_change_lag2"] == 0.0  # first day has no change
    assert row["hist_zero_sales_lag1"] == 1.0
    assert row["ladder_log_rel_000"] == pytest.approx(np.log(10 / 15.02), rel=1e-6)
    assert row["ladder_margin_010"] == pytest.approx((20 - 8) / 20)
    assert row["static_cost_to_min_price"] == pytest.approx(0.8)
    first = dict(zip(names, block.features[0].tolist(), strict=True))
    assert first["hist_units_lag1"] == first["hist_price_rel_ref_lag2"] == 0.0  # zero padding
    assert block.meta["date"][0] == np.datetime64("2023-01-01")
    assert block.meta["split"].tolist() == ["train"] * 4 + ["val", "val", "test"]
    assert block.meta["product_id"].dtype.kind == "U"
    assert spans["ladder_log_rel"] == [17, 28]


def test_masks_use_the_shared_feasibility_rule_and_count_conflicts(tmp_path: Path) -> None:
    paths = write_feature_files(tmp_path / "f", n_products=5)
    params = SampleParams(tuple(f"f_{j}" for j in range(5)), 11, 0.25, 3, 0.005,
                          ("price_level", "price_move"))
    block = build_samples(paths[OUT_OF_BOUNDS_PRODUCT], params)
    frame = pl.read_parquet(paths[OUT_OF_BOUNDS_PRODUCT])
    price = frame["price"].to_numpy()
    grid = price_grid(frame["min_price"].to_numpy(), frame["max_price"].to_numpy(), 11)
    expected, conflict = feasible_mask(grid[1:], price[:-1], 0.25)
    assert np.array_equal(block.masks["price_level"][1:], expected)
    assert conflict.sum() > 0  # this product's price jumps far above max_price
    assert block.masks["price_level"].any(axis=1).all()


def test_same_day_price_features_are_left_out_of_the_state(features_dir: Path) -> None:
    manifest_path = features_dir / "feature_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["current_price_columns"] = ["f_1", "f_3"]  # as `features` marks f_price etc.
    manifest_path.write_text(json.dumps(manifest))
    run_preprocess(tiny_settings(), quiet_monitor()[0])
    _, names = load_batch("data/intermediate/batch_0000.npz")
    assert names[:4] == ["f_0", "f_2", "f_4", "hist_units_lag1"]
    saved = read_manifest("data/intermediate")
    assert saved is not None and saved["excluded_feature_columns"] == ["f_1", "f_3"]


def test_bad_files_are_reported_with_file_row_and_reason(tmp_path: Path) -> None:
    paths = write_feature_files(tmp_path / "f", n_products=3)
    params = SampleParams(tuple(f"f_{j}" for j in range(5)), 11, 0.25, 3, 0.005,
                          ("price_level", "price_move"))
    frame = pl.read_parquet(paths[0])
    frame.with_columns(pl.when(pl.int_range(pl.len()) == 6).then(float("nan"))
                       .otherwise(pl.col("f_2")).cast(pl.Float32).alias("f_2")
                       ).write_parquet(paths[0])
    with pytest.raises(DataError, match=r"00000.parquet: row 6 \(date 2023-01-07\): feature "
                                        r"column f_2 is NaN or inf"):
        build_samples(paths[0], params)
    pl.read_parquet(paths[1]).drop("ref_price").write_parquet(paths[1])
    with pytest.raises(DataError, match="00001.parquet: missing column\\(s\\) ref_price"):
        build_samples(paths[1], params)
    paths[2].write_bytes(b"not parquet")
    with pytest.raises(DataError, match="00002.parquet: not a readable Parquet file"):
        build_samples(paths[2], params)

    paths[0].unlink()
    with pytest.raises(DataError, match="00000.parquet: not a readable Parquet file"):
        build_samples(paths[0], params)


def test_a_good_file_is_read_without_a_separate_schema_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # polars given a path opens it twice; the schema read before it made three opens
    paths = write_feature_files(tmp_path / "f", n_products=1, n_days=9)
    params = SampleParams(tuple(f"f_{j}" for j in range(5)), 11, 0.25, 3, 0.005,
                          ("price_level",))
    expected = pl.read_parquet(paths[0])

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("schema read on the happy path")

    monkeypatch.setattr(pl, "read_parquet_schema", refuse)
    block = build_samples(paths[0], params)
    assert block.n == 9
    np.testing.assert_array_equal(block.meta["price"], expected["price"].to_numpy())
    np.testing.assert_array_equal(block.features[:, :5],
                                  expected.select([f"f_{j}" for j in range(5)]).to_numpy())


# ----------------------------------------------------------------------------------------------
# Batching


@pytest.mark.parametrize(("n_files", "batch_size", "expected"), [
    (3, 5, [3]),            # fewer files than a batch
    (5, 5, [5]),            # exactly one batch
    (6, 5, [5, 1]),         # one batch + 1
    (3, 1, [1, 1, 1]),      # batch_size = 1
])
def test_files_are_cut_into_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    n_files: int, batch_size: int, expected: list[int]) -> None:
    monkeypatch.chdir(tmp_path)
    paths = write_feature_files(tmp_path / "data" / "features", n_products=n_files, n_days=12)
    monitor, _ = quiet_monitor()
    result = run_preprocess(tiny_settings(**{"preprocess.batch_size": batch_size}), monitor)
    manifest = read_manifest(tmp_path / "data" / "intermediate")
    assert manifest is not None
    assert [len(b["files"]) for b in manifest["batches"]] == expected
    assert [b["name"] for b in manifest["batches"]] == [
        f"batch_{i:04d}.npz" for i in range(len(expected))]
    assert [f["path"] for b in manifest["batches"] for f in b["files"]] == [
        str(p.relative_to(tmp_path)) for p in paths]
    assert result.summary["samples"] == sum(12 - i % 4 for i in range(n_files))
    assert result.failures == []


def test_plan_batches_cuts_by_files_and_by_bytes_as_documented() -> None:
    # docs/batch-format.md, "Batch plan": the examples given there
    assert plan_batches([40] * 7, 5, 140 * 100, 100) == [(0, 3), (3, 6), (6, 7)]
    assert plan_batches([1] * 7, 3, 10**9, 100) == [(0, 3), (3, 6), (6, 7)]
    assert plan_batches([10, 500, 10, 10], 10, 100 * 100, 100) == [(0, 1), (1, 2), (2, 4)]
    assert plan_batches([10, 10], 10, 20 * 100, 100) == [(0, 2)]  # exactly at the cap: fits
    assert plan_batches([], 5, 100, 1) == []
    # float32 state, int16 label + K int8 mask per head, 10 meta columns x 8 bytes
    assert sample_bytes(900, {"price_level": 101, "price_move": 3}) == 3600 + 103 + 5 + 80


def test_a_byte_capped_run_splits_files_and_journals_each_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_feature_files(tmp_path / "data" / "features", n_products=6, n_days=12)
    out = tmp_path / "data" / "intermediate"
    run_preprocess(tiny_settings(), quiet_monitor()[0])
    manifest = read_manifest(out)
    assert manifest is not None
    per_sample = sample_bytes(manifest["n_features"], manifest["heads"])
    # rows per file 12, 11, 10, 9, 12, 11; a cap of 25.5 samples takes 12+11 | 10+9 | 12+11
    cap_mb = 25.5 * per_sample / 2**20
    settings = tiny_settings(**{"preprocess.batch_max_mb": cap_mb, "preprocess.resume": False})
    real_write = batches_module.write_batch
    calls = {"n": 0}

    def crash_on_third(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("pricing_cli.stages.preprocess.write_batch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(settings, quiet_monitor()[0])
    # manifest.json was written once, before any batch; the two finished ones are journal lines
    assert json.loads((out / "manifest.json").read_text())["batches"] == []
    journal = (out / "manifest.journal").read_text().splitlines()
    assert [json.loads(line)["name"] for line in journal] == ["batch_0000.npz",
                                                              "batch_0001.npz"]
    (out / "manifest.journal").write_text("\n".join(journal) + "\n{\"name\": \"batch_00")  # torn
    interrupted = read_manifest(out)
    assert interrupted is not None
    assert [b["name"] for b in interrupted["batches"]] == ["batch_0000.npz", "batch_0001.npz"]

    monkeypatch.setattr("pricing_cli.stages.preprocess.write_batch", real_write)
    result = run_preprocess(tiny_settings(**{"preprocess.batch_max_mb": cap_mb}),
                            quiet_monitor()[0])
    assert result.summary["built"] == ["batch_0002.npz"]
    assert result.summary["samples"] == 65
    assert not (out / "manifest.journal").exists()
    final = read_manifest(out)
    assert final is not None and final["n_batches"] == 3
    assert [[f["path"][-13:] for f in b["files"]] for b in final["batches"]] == [
        ["00000.parquet", "00001.parquet"], ["00002.parquet", "00003.parquet"],
        ["00004.parquet", "00005.parquet"]]
    assert [b["n_samples"] for b in final["batches"]] == [23, 19, 23]


def test_no_input_files_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monitor, _ = quiet_monitor()
    with pytest.raises(MissingInputError, match=r"no files match preprocess.input_glob "
                                                r"'data/features/\*.parquet'"):
        run_preprocess(tiny_settings(), monitor)


def test_batch_holds_the_samples_of_its_files(features_dir: Path) -> None:
    monitor, _ = quiet_monitor()
    settings = tiny_settings()
    result = run_preprocess(settings, monitor)
    out = Path("data/intermediate")
    assert result.summary["batches"] == 3 and result.summary["batches_built"] == 3
    block, names = load_batch(out / "batch_0001.npz")
    params = SampleParams.from_settings(settings, [f"f_{j}" for j in range(5)])
    expected = [build_samples(features_dir / f"{i:05d}.parquet", params) for i in range(5, 10)]
    assert names == feature_layout(params)[0]
    assert np.array_equal(block.features, np.concatenate([b.features for b in expected]))
    for head in ("price_level", "price_move"):
        assert np.array_equal(block.labels[head],
                              np.concatenate([b.labels[head] for b in expected]))
        assert np.array_equal(block.masks[head],
                              np.concatenate([b.masks[head] for b in expected]))
    assert block.meta["product_index"].tolist() == [i for i in range(5, 10) for _ in range(
        40 - i % 4)]
    manifest = read_manifest(out)
    assert manifest is not None
    assert manifest["batches"][1]["n_samples"] == block.n
    assert sum(manifest["batches"][1]["samples"].values()) == block.n
    assert result.summary["mask_conflicts"] > 0
    assert result.summary["labels_projected"]["price_level"] > 0


# ----------------------------------------------------------------------------------------------
# Resume, invalidation, failures


def test_resume_after_a_crash_redoes_only_missing_batches(
        features_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = tiny_settings(**{"preprocess.batch_size": 3})  # 13 files -> 5 batches
    out = Path("data/intermediate")
    real_write = batches_module.write_batch
    calls = {"n": 0}

    def crash_on_third(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl+C while batch 2 was written
        return real_write(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("pricing_cli.stages.preprocess.write_batch", crash_on_third)
    monitor, _ = quiet_monitor()
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(settings, monitor)
    assert sorted(p.name for p in out.glob("batch_*.npz")) == ["batch_0000.npz", "batch_0001.npz"]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("batch_*.npz")}

    monkeypatch.setattr("pricing_cli.stages.preprocess.write_batch", real_write)
    monitor, stream = quiet_monitor()
    result = run_preprocess(settings, monitor)
    assert result.summary["built"] == ["batch_0002.npz", "batch_0003.npz", "batch_0004.npz"]
    assert "reusing 2 of 5 batches" in stream.getvalue()
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept
    resumed = batch_bytes(out)
    resumed_manifest = (out / "manifest.json").read_text()

    monkeypatch.chdir(tmp_path / "data")  # an uninterrupted run elsewhere, same inputs
    (tmp_path / "data" / "data").mkdir()
    (tmp_path / "data" / "data" / "features").symlink_to(features_dir)
    run_preprocess(settings, quiet_monitor()[0])
    assert batch_bytes(Path("data/intermediate")) == resumed
    assert Path("data/intermediate/manifest.json").read_text() == resumed_manifest


def test_changed_input_or_config_invalidates_what_it_affects(features_dir: Path) -> None:
    settings = tiny_settings()  # batch_size 5: files 0-4, 5-9, 10-12
    run_preprocess(settings, quiet_monitor()[0])
    frame = pl.read_parquet(features_dir / "00007.parquet")
    frame.with_columns(pl.col("units") + 1).write_parquet(features_dir / "00007.parquet")
    result = run_preprocess(settings, quiet_monitor()[0])
    assert result.summary["built"] == ["batch_0001.npz"]
    # other workers or keep_batches do not change a batch's content: nothing to redo
    result = run_preprocess(tiny_settings(**{"preprocess.workers": 3,
                                             "preprocess.keep_batches": True}),
                            quiet_monitor()[0])
    assert result.summary["built"] == []
    result = run_preprocess(tiny_settings(**{"preprocess.history_window": 3}),
                            quiet_monitor()[0])
    assert result.summary["built"] == ["batch_0000.npz", "batch_0001.npz", "batch_0002.npz"]
    result = run_preprocess(tiny_settings(**{"preprocess.history_window": 3,
                                             "preprocess.resume": False}), quiet_monitor()[0])
    assert result.summary["batches_built"] == 3


def test_failed_files_are_quarantined_and_others_carry_on(features_dir: Path) -> None:
    (features_dir / "00006.parquet").write_bytes(b"garbage")
    pl.read_parquet(features_dir / "00011.parquet").drop("f_1").write_parquet(
        features_dir / "00011.parquet")
    result = run_preprocess(tiny_settings(), quiet_monitor()[0])
    # the reader's own words follow in parentheses
    assert [f.split(" (")[0] for f in result.failures] == [
        "data/features/00006.parquet: not a readable Parquet file",
        "data/features/00011.parquet: missing column(s) f_1"]
    manifest = read_manifest("data/intermediate")
    assert manifest is not None
    assert [q["file"] for q in manifest["batches"][1]["quarantined"]] == [
        "data/features/00006.parquet"]
    assert manifest["batches"][1]["products"] == 4
    block, _ = load_batch("data/intermediate/batch_0001.npz")
    assert sorted(set(block.meta["product_index"].tolist())) == [5, 7, 8, 9]
    # a re-run keeps reporting them (the batch is reused, the failure is not forgotten)
    again = run_preprocess(tiny_settings(), quiet_monitor()[0])
    assert again.summary["built"] == [] and len(again.failures) == 2


def test_fail_fast_stops_at_the_first_failure(features_dir: Path) -> None:
    (features_dir / "00006.parquet").write_bytes(b"garbage")
    with pytest.raises(DataError, match="00006.parquet: not a readable Parquet file"):
        run_preprocess(tiny_settings(**{"preprocess.fail_fast": True}), quiet_monitor()[0])
    manifest = read_manifest("data/intermediate")
    assert manifest is not None
    assert [b["name"] for b in manifest["batches"]] == ["batch_0000.npz"]


def test_worker_pool_gives_the_same_batches_as_in_process(
        features_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_preprocess(tiny_settings(), quiet_monitor()[0])
    one_worker = batch_bytes(Path("data/intermediate"))
    monitor, _ = quiet_monitor()
    result = run_preprocess(tiny_settings(**{"preprocess.workers": 2,
                                             "preprocess.resume": False}), monitor)
    assert result.summary["workers"] == 2
    assert batch_bytes(Path("data/intermediate")) == one_worker
    assert "files/s" in monitor.plain_line() and "samples/s" in monitor.plain_line()
