"""Import of the old system's batches (pickled list-of-dicts layout) into the batch format.

The single place pricectl unpickles is :func:`_load_legacy_unsafe` here, reached only
from ``pricectl validate-batches --convert-legacy --trust-pickle`` (docs/security.md). The
layout is described in docs/batch-format.md, "Legacy layout".
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from pricing_cli.errors import BatchError, ConfigError
from pricing_cli.stages.batches import (
    LEGACY_MEMBERS,
    META_DTYPES,
    SampleBlock,
    load_batch,
    write_batch,
)

# Meta columns the old system's batches may lack, and the value they get when converted.
LEGACY_DEFAULTS = {"category": "none"}

def is_legacy(path: str | Path) -> bool:
    """True if the file has the old layout (pickled members, no format_version)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = {i.filename.removesuffix(".npy") for i in archive.infolist()}
    except (zipfile.BadZipFile, OSError):
        return False
    return "format_version" not in names and bool(names & set(LEGACY_MEMBERS))


def _load_legacy_unsafe(path: Path) -> dict[str, Any]:
    # SECURITY: the ONLY allow_pickle=True in pricectl. Unpickling runs code stored in the
    # file, so this is reached only from `validate-batches --convert-legacy --trust-pickle`,
    # where the user has declared that they made the file.
    with np.load(path, allow_pickle=True) as npz:
        return {name: npz[name] for name in npz.files}


def convert_legacy_batch(path: str | Path, *, trust_pickle: bool) -> tuple[SampleBlock,
                                                                        list[str], dict[str, Any]]:
    """Rewrite a legacy batch in the current format, in place, and check the values match.

    The original is kept beside it as ``<name>.legacy`` and restored if the check fails.

    Legacy layout: ``strategic_features`` (n,) object array of {feature_name: value};
    ``labels`` and ``masks`` (n,) object arrays of {head: value} / {head: list of 0/1};
    ``df`` a pickled pandas DataFrame of the meta columns.

    Returns:
        (samples, feature names, manifest entry of the converted batch).

    Raises:
        ConfigError: trust_pickle is False.
        BatchError: the legacy file is inconsistent, or the rewritten values differ.
    """
    path = Path(path)
    if not trust_pickle:
        raise ConfigError(f"{path}: converting a legacy batch needs --trust-pickle",
                          "Legacy batches are pickled; add --trust-pickle only for files "
                          "you made yourself.")
    try:
        legacy = _load_legacy_unsafe(path)
    except Exception as exc:  # noqa: BLE001 - unpickling can fail in many ways
        raise BatchError(f"{path}: cannot unpickle the legacy batch: {exc}",
                         "Legacy meta is a pandas DataFrame: install pandas to convert.") from None
    missing = [m for m in LEGACY_MEMBERS if m not in legacy]
    if missing:
        raise BatchError(f"{path}: legacy batch lacks member(s) {missing}")
    rows = list(legacy["strategic_features"])
    label_rows, mask_rows = list(legacy["labels"]), list(legacy["masks"])
    frame = legacy["df"].item() if legacy["df"].dtype.hasobject and legacy["df"].ndim == 0 \
        else legacy["df"]
    if not (len(rows) == len(label_rows) == len(mask_rows) == len(frame)):
        raise BatchError(f"{path}: legacy members disagree on the number of samples")
    if not rows:
        raise BatchError(f"{path}: legacy batch is empty")
    feature_names = list(rows[0])
    heads = list(label_rows[0])
    for i, (row, lab, msk) in enumerate(zip(rows, label_rows, mask_rows, strict=True)):
        if list(row) != feature_names or sorted(lab) != sorted(heads) \
                or sorted(msk) != sorted(heads):
            raise BatchError(f"{path}: legacy sample {i} has different feature or head names "
                             "than sample 0")
    features64 = np.array([[row[k] for k in feature_names] for row in rows], dtype=np.float64)
    labels = {h: np.array([-1 if r[h] is None else r[h] for r in label_rows], dtype=np.int64)
              for h in heads}
    masks = {h: np.array([list(r[h]) for r in mask_rows], dtype=np.int64) for h in heads}
    meta: dict[str, np.ndarray] = {}
    for column, kind in META_DTYPES.items():
        if column not in frame.columns and column in LEGACY_DEFAULTS:
            meta[column] = np.full(len(frame), LEGACY_DEFAULTS[column])
            continue
        if column not in frame.columns:
            raise BatchError(f"{path}: legacy DataFrame lacks meta column {column!r}")
        values = frame[column].to_numpy()
        meta[column] = (values.astype(str) if kind == "U"
                        else values.astype("datetime64[D]") if kind.startswith("datetime")
                        else values.astype(kind))
    block = SampleBlock(
        features=features64.astype(np.float32),
        labels={h: a.astype(np.int16) for h, a in labels.items()},
        masks={h: a.astype(np.int8) for h, a in masks.items()},
        meta=meta,
    )
    head_k = {h: int(block.masks[h].shape[1]) for h in heads}
    backup = path.with_name(path.name + ".legacy")
    shutil.copy2(path, backup)
    record = write_batch(path, [block], feature_names, head_k)
    converted, names = load_batch(path)
    same = (names == feature_names
            and np.array_equal(converted.features, features64.astype(np.float32))
            and all(np.array_equal(converted.labels[h], labels[h]) for h in heads)
            and all(np.array_equal(converted.masks[h], masks[h]) for h in heads)
            and all(np.array_equal(converted.meta[c], meta[c]) for c in META_DTYPES))
    if not same:
        os.replace(backup, path)
        raise BatchError(f"{path}: the converted batch does not hold the legacy values; "
                         "the original was restored")
    entry = {"name": path.name, "source": "legacy", "files": [], "fingerprint": "legacy",
             "n_samples": record.n_samples, "samples": record.samples,
             "products": int(np.unique(meta["product_index"]).size),
             "members": record.members, "bytes": record.bytes, "quarantined": [], "stats": {}}
    return converted, feature_names, entry


