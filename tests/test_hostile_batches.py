"""Hostile and corrupt batch folders and processed arrays (issue 9, docs/security.md).

Each test builds a small hostile input by hand (a manifest naming files outside its folder, a
forged .npy header, a zip bomb, a truncated processed array, a forged agent.json) and checks
the exact error, its exit code through the real entry point, and that nothing outside the
folder was read or deleted.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pricing_cli import cli
from pricing_cli.errors import BatchError
from pricing_cli.stages.batches import load_batch, read_manifest, write_manifest
from tests.support.feature_files import quiet_monitor, tiny_settings, write_feature_files

BATCHES = Path("data/intermediate")
FIX = ("  hint: Batch names in manifest.json are plain file names of files in the same folder "
       "(batch_0000.npz, ...): restore the manifest, or delete it and re-run `pricectl "
       "preprocess --no-resume`.\n")
FORGED = ("  hint: Do not use this file: delete it and re-run `pricectl preprocess` (only this "
          "batch is rebuilt).\n")


def pricectl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["--preset", "tiny", "-q", *args])
    return code, capsys.readouterr().err


@pytest.fixture
def batch_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Six products of 20 days preprocessed in two batches (57 and 56 samples)."""
    from pricing_cli.stages.preprocess import run_preprocess

    monkeypatch.chdir(tmp_path)
    write_feature_files(tmp_path / "data" / "features", n_products=6, n_days=20)
    run_preprocess(tiny_settings(**{"preprocess.batch_size": 3}), quiet_monitor()[0])
    return BATCHES


def rename_entry(folder: Path, index: int, name: str) -> None:
    manifest = read_manifest(folder)
    assert manifest is not None
    manifest["batches"][index]["name"] = name
    write_manifest(folder, manifest)


# ----------------------------------------------------------------------------------------------
# 1. Manifest names are confined to the batch folder


def test_a_manifest_name_leading_outside_is_refused_and_the_victim_survives(
        batch_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (batch_dir / "batch_0001.npz").rename(victim / "x.npz")
    kept = (victim / "x.npz").read_bytes()
    rename_entry(batch_dir, 1, "../../victim/x.npz")
    code, err = pricectl(capsys, "merge")
    assert code == 5
    assert err == (
        "pricectl: batch error: data/intermediate/manifest.json: batch entry 1 names "
        "'../../victim/x.npz', which is not a plain file name inside data/intermediate; "
        "pricectl reads and then deletes listed batches, so it refuses names that could lead "
        "outside the batch folder\n" + FIX)
    assert (victim / "x.npz").read_bytes() == kept
    assert (batch_dir / "batch_0000.npz").is_file() and not Path("data/processed").exists()
    code, err = pricectl(capsys, "validate-batches")
    assert code == 6
    assert err.startswith("pricectl: partial failure: validate-batches: 1 input(s) failed\n")


def test_validate_batches_lists_the_escaping_name_as_a_problem(
        batch_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pricing_cli.stages.batch_checks import run_validate_batches

    rename_entry(batch_dir, 0, str(tmp_path / "elsewhere.npz"))
    result = run_validate_batches(tiny_settings(), quiet_monitor("validate-batches")[0],
                                  paths=[])
    assert result.failures[0] == (
        f"data/intermediate/manifest.json: data/intermediate/manifest.json: batch entry 0 "
        f"names '{tmp_path / 'elsewhere.npz'}', which is not a plain file name inside "
        "data/intermediate; pricectl reads and then deletes listed batches, so it refuses "
        "names that could lead outside the batch folder. Why it matters: no batch in this "
        "folder can be verified. Fix: " + FIX.removeprefix("  hint: ").rstrip("\n"))
    assert len(result.failures) == 1  # the batches are not also "without a manifest"
    assert result.summary["batches_checked"] == 2 and result.summary["batches_ok"] == 0
    code, _ = pricectl(capsys, "validate-batches")
    assert code == 6


def test_a_symlinked_batch_leading_outside_is_refused(
        batch_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    victim = tmp_path / "victim.npz"
    (batch_dir / "batch_0001.npz").rename(victim)
    kept = victim.read_bytes()
    (batch_dir / "batch_0001.npz").symlink_to(victim)
    code, err = pricectl(capsys, "merge")
    assert code == 5
    assert err == (
        "pricectl: batch error: data/intermediate/manifest.json: batch entry 1 names "
        f"'batch_0001.npz', a symlink that leads outside data/intermediate (to {victim}); "
        "pricectl reads and then deletes listed batches, so it refuses files outside the "
        "batch folder\n" + FIX)
    assert victim.read_bytes() == kept and (batch_dir / "batch_0001.npz").is_symlink()


@pytest.mark.parametrize("name", ["..", ".", "", "sub\\x.npz", "a/../batch_0000.npz"])
def test_other_names_that_are_not_plain_file_names_are_refused(batch_dir: Path,
                                                                name: str) -> None:
    rename_entry(batch_dir, 0, name)
    with pytest.raises(BatchError, match="manifest.json: batch entry 0 (names|has no file)"):
        read_manifest(batch_dir)


def test_a_repeated_name_is_refused(batch_dir: Path) -> None:
    rename_entry(batch_dir, 1, "batch_0000.npz")
    with pytest.raises(BatchError, match="^data/intermediate/manifest.json: batch entry 1 "
                                         "repeats the name 'batch_0000.npz'$"):
        read_manifest(batch_dir)


# ----------------------------------------------------------------------------------------------
# 2. Forged headers and zip bombs are refused before anything is loaded


def forge_rows(npy: bytes, rows: int) -> bytes:
    """The .npy bytes with the header's first dimension replaced, header length kept."""
    end = npy.index(b"\n") + 1
    header = npy[:end].decode("latin1")
    forged = re.sub(r"'shape': \((\d+)", f"'shape': ({rows}", header)[:-1].rstrip(" ")
    assert len(forged) < len(header)
    return (forged.ljust(len(header) - 1) + "\n").encode("latin1") + npy[end:]


def read_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {i.filename: archive.read(i) for i in archive.infolist()}


def write_members(path: Path, members: dict[str, bytes], compression: int) -> None:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def record_forged(folder: Path, name: str, rows: int) -> None:
    """Make the manifest agree with a batch forged to ``rows`` samples, all of them train."""
    manifest = read_manifest(folder)
    assert manifest is not None
    entry = next(e for e in manifest["batches"] if e["name"] == name)
    for member, info in entry["members"].items():
        if info["shape"] and member != "feature_names":
            info["shape"][0] = rows
    entry.update(n_samples=rows, samples={"train": rows, "val": 0, "test": 0},
                 bytes=(folder / name).stat().st_size)
    write_manifest(folder, manifest)


def no_np_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any array is loaded: the checks must come before np.load."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("np.load reached")
    monkeypatch.setattr(np, "load", refuse)


def test_a_forged_header_shape_is_refused_before_loading(
        batch_dir: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = batch_dir / "batch_0000.npz"
    members = read_members(path)
    rows = 10**12
    for name in list(members):
        if name not in ("format_version.npy", "feature_names.npy"):
            members[name] = forge_rows(members[name], rows)
    write_members(path, members, zipfile.ZIP_STORED)
    record_forged(batch_dir, path.name, rows)
    code, err = pricectl(capsys, "merge")
    assert code == 5
    assert err == (
        "pricectl: batch error: data/intermediate/batch_0000.npz: member 'features.npy' holds "
        "20,420 bytes but its .npy header (<f4 [1000000000000, 89]) implies "
        "356,000,000,000,128: the header or the zip directory is forged or corrupt\n" + FORGED)
    no_np_load(monkeypatch)
    with pytest.raises(BatchError, match="member 'features.npy' holds 20,420 bytes"):
        load_batch(path)


def test_a_zip_bomb_is_refused_before_it_is_inflated(
        batch_dir: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = batch_dir / "batch_0000.npz"
    rows = 40_000  # features alone inflate to 14 MB from a few kB: deflated zeros
    members = read_members(path)
    with zipfile.ZipFile(path) as archive, np.load(path, allow_pickle=False) as npz:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            if name in ("format_version", "feature_names"):
                continue
            array = npz[name]
            buffer = io.BytesIO()
            np.save(buffer, np.zeros((rows, *array.shape[1:]), array.dtype))
            members[info.filename] = buffer.getvalue()
    write_members(path, members, zipfile.ZIP_DEFLATED)
    record_forged(batch_dir, path.name, rows)
    compressed = {i.filename: (i.compress_size, i.file_size)
                  for i in zipfile.ZipFile(path).infolist()}
    packed, inflated = compressed["features.npy"]
    assert inflated == 128 + rows * 89 * 4 and inflated > 1000 * packed
    no_np_load(monkeypatch)
    code, err = pricectl(capsys, "merge")
    assert code == 5
    assert err == (
        f"pricectl: batch error: data/intermediate/batch_0000.npz: member 'features.npy' "
        f"inflates from {packed:,} to {inflated:,} bytes (over 100x): refused as a zip bomb "
        "before loading; the batch writer stores members uncompressed\n" + FORGED)


def test_a_member_longer_than_its_file_is_refused(batch_dir: Path) -> None:
    path = batch_dir / "batch_0000.npz"
    write_members(path, read_members(path), zipfile.ZIP_STORED)  # plain 32-bit zip sizes
    data = bytearray(path.read_bytes())
    # the central directory entry of features.npy: compressed size at +20, uncompressed at +24
    central = data.rindex(b"PK\x01\x02", 0, data.rindex(b"features.npy"))
    data[central + 20:central + 28] = (0x7FFF_FFFF).to_bytes(4, "little") * 2
    path.write_bytes(bytes(data))
    with pytest.raises(BatchError, match=re.escape(
            f"{path}: member 'features.npy' claims 2,147,483,647 bytes on disk, more than "
            f"the whole file ({len(data):,} bytes): the zip directory is forged or the file is "
            "truncated")):
        load_batch(path)


def test_merge_refuses_a_batch_whose_size_differs_from_the_manifest(
        batch_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with open(batch_dir / "batch_0001.npz", "ab") as handle:
        handle.write(b"junk")
    size = (batch_dir / "batch_0001.npz").stat().st_size
    code, err = pricectl(capsys, "merge")
    assert code == 5
    assert err.startswith(
        f"pricectl: batch error: data/intermediate/batch_0001.npz: the file has {size:,} bytes "
        f"but the manifest records {size - 4:,}\n")


# ----------------------------------------------------------------------------------------------
# 3. Processed arrays: a truncated or forged file is a BatchError naming it, not a crash

REBUILD = ("  hint: Re-run `pricectl merge` to rebuild the processed folder (re-run `pricectl "
           "preprocess` first if its batches were deleted).\n")
TINY_TRAIN = {"n_envs": 2, "net_arch": [8], "n_steps": 16, "batch_size": 16, "n_epochs": 1,
              "timesteps": 32, "eval_every": 1000, "checkpoint_every": 1000,
              "tensorboard": False, "torch_threads": 1, "embedding_dim": 4,
              "feature_hidden": 8}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A processed folder (6 products, K=11) and a tiny trained run: models/r1."""
    from pricing_cli.agent.train import run_train
    from pricing_cli.config import load_settings
    from pricing_cli.monitor import RunMonitor
    from tests.agent_fixtures import write_processed

    root = tmp_path_factory.mktemp("trained")
    write_processed(root / "data" / "processed", K=11)
    settings = load_settings(preset="tiny", environ={}, flags={
        "merge.output_dir": str(root / "data" / "processed"),
        "train.models_dir": str(root / "models"), "train.run_id": "r1",
        **{f"train.{k}": v for k, v in TINY_TRAIN.items()}})
    with RunMonitor("train", "quiet") as monitor:
        run_train(settings, monitor)
    return root


@pytest.fixture
def workspace(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the trained folder to corrupt, as the working directory."""
    import shutil

    shutil.copytree(trained, tmp_path / "w")
    monkeypatch.chdir(tmp_path / "w")
    return tmp_path / "w"


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_train_on_a_truncated_x_train_is_a_batch_error(
        workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = Path("data/processed/X_train.npy")
    size = x.stat().st_size
    truncate(x)
    code, err = pricectl(capsys, "train", "--multi-product", "--run-id", "r2")
    assert code == 5
    rows = 6 * 63  # 70 % of 90 days, 6 products
    assert err == (
        f"pricectl: batch error: data/processed/X_train.npy has {size // 2:,} bytes but its "
        f".npy header (<f4 [{rows}, 20]) implies {size:,}: the file is truncated or corrupt\n"
        + REBUILD)
    assert not Path("models/r2").exists()


def test_evaluate_on_a_truncated_x_test_is_a_batch_error(
        workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = Path("data/processed/X_test.npy")
    size = x.stat().st_size
    truncate(x, 0.9)
    code, err = pricectl(capsys, "evaluate", "--model", "models/r1")
    assert code == 5
    assert err == (
        f"pricectl: batch error: data/processed/X_test.npy has {int(size * 0.9):,} bytes but "
        f"its .npy header (<f4 [78, 20]) implies {size:,}: the file is truncated or corrupt\n"
        + REBUILD)


@pytest.mark.parametrize(("name", "message"), [
    ("masks_test.npz", "data/processed/masks_test.npz: not a readable .npz (zip) file: File is "
                       "not a zip file"),
    ("meta_test.parquet", "data/processed/meta_test.parquet: not a readable Parquet file"),
    ("preprocessing_stats.json", "data/processed/preprocessing_stats.json: not valid JSON"),
    ("labels_test.npz", None),  # evaluate does not read the labels
])
def test_evaluate_on_other_truncated_processed_files(
        workspace: Path, capsys: pytest.CaptureFixture[str], name: str,
        message: str | None) -> None:
    truncate(Path("data/processed") / name)
    code, err = pricectl(capsys, "evaluate", "--model", "models/r1", "--reports-dir", "out")
    if message is None:
        assert code == 0, err
        return
    assert code == 5, err
    assert err.startswith(f"pricectl: batch error: {message}") and err.endswith(REBUILD)


def test_a_forged_x_header_is_refused_before_mapping(workspace: Path) -> None:
    from pricing_cli.stages.merge import read_processed_array

    x = Path("data/processed/X_val.npy")
    x.write_bytes(forge_rows(x.read_bytes(), 10**12))
    with pytest.raises(BatchError, match=re.escape(
            "data/processed/X_val.npy has 6,848 bytes but its .npy header (<f4 "
            "[1000000000000, 20]) implies 80,000,000,000,128: the file is truncated or "
            "corrupt")):
        read_processed_array(x)


def test_bc_labels_are_checked_like_the_masks(workspace: Path) -> None:
    from pricing_cli.stages.merge import read_processed_member

    path = Path("data/processed/labels_train.npz")
    assert read_processed_member(path, "price_level").shape == (378,)
    with pytest.raises(BatchError, match=re.escape(
            "data/processed/labels_train.npz has no member 'price_hold' (it holds "
            "price_level, price_move)")):
        read_processed_member(path, "price_hold")
    members = read_members(path)
    members["price_level.npy"] = forge_rows(members["price_level.npy"], 10**12)
    write_members(path, members, zipfile.ZIP_STORED)
    with pytest.raises(BatchError, match=re.escape(
            "data/processed/labels_train.npz: member 'price_level.npy' holds 884 bytes but its "
            ".npy header (<i2 [1000000000000]) implies 2,000,000,000,128")):
        read_processed_member(path, "price_level")


# ----------------------------------------------------------------------------------------------
# 4. agent.json is checked before it sizes anything

RETRAIN = ("  hint: agent.json is written by `pricectl train`: restore the run folder, or train "
           "again; do not edit it by hand.\n")


def edit_agent(**changes: Any) -> None:
    import json

    path = Path("models/r1/agent.json")
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(("changes", "message"), [
    ({"n_products": 1e9}, "key 'n_products' is 1000000000.0: expected an integer"),
    ({"n_products": 10**9}, "key 'n_products' is 1000000000: expected 1 to 100,000,000"),
    ({"n_products": True}, "key 'n_products' is True: expected an integer"),
    ({"price_levels": 1}, "key 'price_levels' is 1: expected 2 to 32,767"),
    ({"embedding_dim": "16"}, "key 'embedding_dim' is '16': expected an integer"),
    ({"forecast_prior": float("nan")}, "key 'forecast_prior' is nan: expected a finite number"),
    ({"net_arch": [-1]}, "key 'net_arch' is [-1]: expected a list of at most 16 layer widths, "
                         "each 1 to 65,536"),
    ({"algo": "dqn"}, "key 'algo' is 'dqn': expected 'maskable-ppo' or 'ppo'"),
    ({"n_features": 999}, "key 'n_features' is 999: expected input_dim + price_levels + 3 = 34 "
                          "(or 2 more with the stock state of an inventory market)"),
])
def test_a_forged_agent_json_is_a_model_error_naming_the_key(
        workspace: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, Any],
        message: str) -> None:
    edit_agent(**changes)
    code, err = pricectl(capsys, "evaluate", "--model", "models/r1")
    assert (code, err) == (9, f"pricectl: model error: models/r1/agent.json: {message}\n"
                              + RETRAIN)


def test_an_architecture_the_weights_do_not_have_is_refused_without_allocating_it(
        workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import resource

    # in range, but 50 million products x 4 floats would be an 800 MB embedding (and 16
    # layers of 65,536 units 256 GB): refused by comparing shapes on torch's meta device
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    edit_agent(n_products=50_000_000)
    code, err = pricectl(capsys, "evaluate", "--model", "models/r1")
    assert code == 9
    assert err == (
        "pricectl: model error: models/r1/agent.json does not describe the weights in "
        "models/r1/model.zip: tensor 'features_extractor.embedding.weight' is [6, 4] in the "
        "weights but [50000001, 4] from agent.json (n_products 50000000, n_features 34, "
        "price_levels 11, embedding_dim 4, feature_hidden 8, net_arch [8])\n" + RETRAIN)
    edit_agent(n_products=6, net_arch=[65536] * 16)
    code, err = pricectl(capsys, "evaluate", "--model", "models/r1")
    assert code == 9 and "does not describe the weights" in err
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 300 * 1024


def test_an_agent_trained_on_other_data_is_refused_before_it_is_built(
        workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_agent(input_dim=21, n_features=35)
    code, err = pricectl(capsys, "evaluate", "--model", "models/r1")
    assert (code, err) == (
        9, "pricectl: model error: models/r1/agent.json: key 'input_dim' is 21, but the "
           "processed data's preprocessing_stats.json has input_dim 20\n"
           "  hint: Evaluate with the processed data the model was trained on, or retrain.\n")


def test_a_meta_file_without_a_needed_column_names_it(workspace: Path) -> None:
    import polars as pl

    from pricing_cli.agent.env import load_market
    from pricing_cli.agent.policy import load_demand_model

    path = Path("data/processed/meta_val.parquet")
    pl.read_parquet(path).drop("unit_cost").write_parquet(path)
    with pytest.raises(BatchError) as caught:
        load_market("data/processed", "val", load_demand_model("models/r1"))
    assert caught.value.message == (
        'data/processed/meta_val.parquet lacks a column pricectl reads (unable to find column '
        '"unit_cost"; valid columns: ["product_index", "product_id", "date", "split", "price", '
        '"units", "min_price", "max_price", "ref_price"])')
    assert caught.value.hint == REBUILD.removeprefix("  hint: ").rstrip("\n")
