"""The checks of a batch file and the ``validate-batches`` stage.

:func:`validate_batch` runs the ``_check_*`` helpers in order (later checks need the earlier
ones to pass): the file opens, the members are the format's, shapes and dtypes agree, the bytes
match the manifest, then the values. :func:`deep_check` rebuilds a few source files with
preprocess and compares. Each problem is a :class:`Problem`: what is wrong, why it matters, how
to fix it. The format itself is ``stages/batches.py``; the legacy import ``stages/legacy.py``.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pricing_cli.errors import BatchError, ConfigError, MissingInputError
from pricing_cli.stages.batches import (
    BATCH_GLOB,
    CORRUPT_ZIP_ERRORS,
    FORMAT_VERSION,
    LEGACY_MEMBERS,
    MANIFEST_NAME,
    META_DTYPES,
    SPLITS,
    layout_difference,
    load_batch,
    member_names,
    read_manifest,
    read_member_headers,
    write_manifest,
)
from pricing_cli.stages.legacy import convert_legacy_batch, is_legacy
from pricing_cli.stages.preprocess import SampleParams, build_samples

if TYPE_CHECKING:
    from pricing_cli.config import Settings
    from pricing_cli.monitor import RunMonitor
    from pricing_cli.runinfo import StageResult

Headers = dict[str, tuple[tuple[int, ...], np.dtype[Any]]]


@dataclass
class Problem:
    """One problem found in a batch, explained: what is wrong, why it matters, how to fix."""

    batch: str
    what: str
    why: str
    fix: str

    def __str__(self) -> str:
        return f"{self.batch}: {self.what}. Why it matters: {self.why} Fix: {self.fix}"


_REBUILD = "Delete this batch and re-run `pricectl preprocess`; only it is rebuilt."


@dataclass
class _Findings:
    """The problems found so far in one batch."""

    path: Path
    problems: list[Problem] = field(default_factory=list)

    def add(self, what: str, why: str, fix: str = _REBUILD) -> None:
        self.problems.append(Problem(str(self.path), what, why, fix))


def _first_rows(mask: np.ndarray, limit: int = 5) -> str:
    rows = np.flatnonzero(mask)[:limit]
    return ", ".join(str(int(r)) for r in rows) + (" ..." if mask.sum() > limit else "")


def validate_batch(path: str | Path, manifest: Mapping[str, Any] | None) -> list[Problem]:
    """Check one batch file and explain each problem found.

    Checks, in order (later checks need the earlier ones): the file opens as a zip; every
    member is a .npy array, none pickled, none missing; format_version; shapes and dtypes agree
    across members and with the manifest; each member's SHA-256 matches the manifest; no
    NaN/inf in features; labels within [-1, K) and feasible in their mask; no all-zero mask
    row; split values known and dates inside their split's range.

    Args:
        path: the batch file.
        manifest: the manifest of its folder (None: the manifest checks are a problem).

    Returns:
        The problems found; empty when the batch is sound.
    """
    found = _Findings(Path(path))
    headers = _check_opens(found)
    if headers is None or _check_not_legacy(found, headers):
        return found.problems
    entry, heads = _check_members(found, headers, manifest)
    if _unreadable_members(headers, heads):
        return found.problems
    _check_shapes(found, headers, heads, manifest)
    if not _check_bytes(found, headers, entry) or found.problems:
        return found.problems
    _check_values(found, heads, manifest)
    return found.problems


def _check_opens(found: _Findings) -> Headers | None:
    """The member headers, or None (and a problem) if the file is not a readable batch zip."""
    try:
        return read_member_headers(found.path)
    except BatchError as exc:
        found.add(exc.message.removeprefix(f"{found.path}: "),
                  "merge and training cannot read any sample of this batch.")
        return None


def _check_not_legacy(found: _Findings, headers: Headers) -> bool:
    """True (and a problem naming the conversion command) for the old pickled layout."""
    legacy = [m for m in LEGACY_MEMBERS if m in headers]
    if not legacy or "format_version" in headers:
        return False
    found.add(f"legacy layout (members {', '.join(legacy)}) with pickled objects",
              "the current loader never unpickles (unpickling can run arbitrary code), so merge "
              "cannot read it.",
              "If you made this file, run `pricectl validate-batches --convert-legacy "
              f"--trust-pickle {found.path}` to rewrite it in the current format.")
    return True


def _check_members(found: _Findings, headers: Headers, manifest: Mapping[str, Any] | None
                   ) -> tuple[dict[str, Any] | None, list[str]]:
    """No pickled member, an entry in the manifest, exactly the format's members.

    Returns:
        (the batch's manifest entry or None, the label heads).
    """
    for member in [m for m, (_, dtype) in headers.items() if dtype.hasobject]:
        found.add(f"member {member!r} is an object array (pickled Python objects)",
                  "batches are loaded with allow_pickle=False, so this member cannot be read.")
    entry = None
    if manifest is None:
        found.add("no manifest.json beside the batch",
                  "without it the checksums, shapes and source files cannot be verified.",
                  "Re-run `pricectl preprocess` to rebuild the folder's manifest.")
    else:
        entry = next((b for b in manifest.get("batches", [])
                      if b.get("name") == found.path.name), None)
        if entry is None:
            found.add("not recorded in manifest.json",
                      "merge only reads the batches the manifest lists, so this file is ignored "
                      "or stale.", "Delete it, or re-run `pricectl preprocess`.")
    heads = [m[7:] for m in headers if m.startswith("labels_")]
    if manifest is not None and manifest.get("heads"):
        heads = list(manifest["heads"])
    expected_members = member_names(heads)
    for member in [m for m in expected_members if m not in headers]:
        found.add(f"member {member!r} is missing",
                  "every batch must hold the same members so merge can stack them.")
    for member in [m for m in headers if m not in expected_members]:
        found.add(f"unexpected member {member!r}",
                  f"it is not part of format version {FORMAT_VERSION}; the file was not written "
                  "by this pricectl.")
    return entry, heads


def _unreadable_members(headers: Headers, heads: list[str]) -> bool:
    """True when a member is missing or pickled: the later checks cannot read every member."""
    missing = any(m not in headers for m in member_names(heads))
    pickled = any(dtype.hasobject for _, dtype in headers.values())
    return missing or pickled


def _check_shapes(found: _Findings, headers: Headers, heads: list[str],
                  manifest: Mapping[str, Any] | None) -> None:
    """Dtypes and shapes agree across members and with the heads' class counts."""
    expected_dtypes = {"format_version": "int32", "features": "float32"}
    expected_dtypes.update({f"labels_{h}": "int16" for h in heads})
    expected_dtypes.update({f"masks_{h}": "int8" for h in heads})
    expected_dtypes.update({f"meta_{c}": k for c, k in META_DTYPES.items() if k != "U"})
    for member, wanted in expected_dtypes.items():
        dtype = headers[member][1]
        if dtype != np.dtype(wanted):
            found.add(f"member {member!r} has dtype {dtype}, expected {wanted}",
                      "merge writes fixed dtypes and training reads them; a different dtype "
                      "means the file was not written by the batch writer.")
    for member in ["feature_names", *(f"meta_{c}" for c, k in META_DTYPES.items() if k == "U")]:
        if headers[member][1].kind != "U":
            found.add(f"member {member!r} has dtype {headers[member][1]}, expected fixed-width "
                      "unicode (<U..)", "string members are stored as fixed-width unicode.")
    n_rows = headers["features"][0][0] if len(headers["features"][0]) == 2 else -1
    n_features = headers["feature_names"][0][0] if headers["feature_names"][0] else -1
    if headers["features"][0] != (n_rows, n_features):
        found.add(f"features has shape {headers['features'][0]}, expected (n, {n_features}) "
                  f"for {n_features} feature names",
                  "the state width must match the feature names.")
    if headers["format_version"][0] != ():
        found.add("format_version is not a scalar", "the reader checks it before anything else.")
    k_expected = dict(manifest["heads"]) if manifest is not None and manifest.get("heads") else {}
    for head in heads:
        label_shape = headers[f"labels_{head}"][0]
        mask_shape = headers[f"masks_{head}"][0]
        if label_shape != (n_rows,):
            found.add(f"labels_{head} has shape {label_shape}, expected ({n_rows},)",
                      "every member must hold one row per sample.")
        k = k_expected.get(head, mask_shape[-1] if mask_shape else -1)
        if mask_shape != (n_rows, k):
            found.add(f"masks_{head} has shape {mask_shape}, expected ({n_rows}, {k})",
                      "a mask needs one column per class of its head.")
    for column in META_DTYPES:
        if headers[f"meta_{column}"][0] != (n_rows,):
            found.add(f"meta_{column} has shape {headers[f'meta_{column}'][0]}, expected "
                      f"({n_rows},)", "every member must hold one row per sample.")


def _check_bytes(found: _Findings, headers: Headers, entry: Mapping[str, Any] | None) -> bool:
    """The manifest's shapes, dtypes, size and checksums; the zip layout around the members.

    Returns:
        False if the zip could not be read through (nothing later can be checked).
    """
    recorded = entry.get("members", {}) if entry is not None else {}
    for member, (shape, dtype) in headers.items():
        info = recorded.get(member)
        if info is None:
            continue
        if list(shape) != list(info["shape"]) or dtype.str != info["dtype"]:
            found.add(f"member {member!r} is {dtype.str} {list(shape)} but the manifest records "
                      f"{info['dtype']} {info['shape']}",
                      "the file changed after it was written.")
    try:
        digests, difference = layout_difference(found.path)
    except CORRUPT_ZIP_ERRORS as exc:
        what = ("fails its zip checksum" if isinstance(exc, zipfile.BadZipFile)
                else "cannot be read")
        found.add(f"a member {what} ({exc})",
                  "the bytes on disk differ from those written (flipped bits, partial copy).")
        return False
    if difference is not None:
        found.add(difference, "the bytes on disk differ from those written (flipped bits, "
                  "partial copy, junk appended, or a file edited by hand).")
    if entry is not None:
        size = found.path.stat().st_size
        if entry.get("bytes") is not None and entry["bytes"] != size:
            found.add(f"the file has {size:,} bytes but the manifest records {entry['bytes']:,}",
                      "the file changed after it was written (partial copy or junk appended).")
        for member, digest in digests.items():
            info = recorded.get(member)
            if info is not None and info["sha256"] != digest:
                found.add(f"member {member!r} does not match its SHA-256 in the manifest",
                          "the bytes on disk differ from those written (flipped bits, partial "
                          "copy, or a file edited by hand).")
    return True


def _check_values(found: _Findings, heads: list[str], manifest: Mapping[str, Any] | None
                  ) -> None:
    """Finite features; labels in range and feasible; no empty mask row; splits and dates."""
    try:
        block, _ = load_batch(found.path)
    except BatchError as exc:
        found.add(exc.message.removeprefix(f"{found.path}: "), "the batch cannot be loaded.")
        return
    bad = ~np.isfinite(block.features).all(axis=1)
    if bad.any():
        found.add(f"{int(bad.sum())} sample(s) have NaN or inf features (rows "
                  f"{_first_rows(bad)})",
                  "a single NaN turns every gradient of a training step into NaN.",
                  "Check the source feature files of these rows, then re-run "
                  "`pricectl preprocess`.")
    for head in heads:
        _check_head(found, head, block.labels[head].astype(np.int64), block.masks[head])
    split = block.meta["split"]
    unknown = ~np.isin(split, SPLITS)
    if unknown.any():
        found.add(f"meta_split holds values other than {SPLITS} (rows {_first_rows(unknown)})",
                  "merge writes one set of files per split.")
    ranges = (manifest or {}).get("splits") or {}
    dates = block.meta["date"]
    for split_name, bounds in ranges.items():
        if not bounds:
            continue
        lo, hi = np.datetime64(bounds[0], "D"), np.datetime64(bounds[1], "D")
        outside = (split == split_name) & ((dates < lo) | (dates > hi))
        if outside.any():
            found.add(f"{int(outside.sum())} '{split_name}' sample(s) dated outside "
                      f"{bounds[0]}..{bounds[1]} (rows {_first_rows(outside)})",
                      "samples in the wrong split leak future data into training or "
                      "evaluation.", "Re-run `pricectl features` and `pricectl preprocess`.")


def _check_head(found: _Findings, head: str, labels: np.ndarray, masks: np.ndarray) -> None:
    """One head's labels within [-1, K) and allowed by their mask; masks 0/1, none empty."""
    k = masks.shape[1]
    out = (labels < -1) | (labels >= k)
    if out.any():
        found.add(f"labels_{head} outside [-1, {k}) in rows {_first_rows(out)}",
                  "a label must name one of the head's classes (or -1 for 'does not apply').")
    if not np.isin(masks, (0, 1)).all():
        found.add(f"masks_{head} holds values other than 0 and 1",
                  "masks are read as booleans by the masked policy.")
    empty = np.asarray(~masks.any(axis=1))
    if empty.any():
        found.add(f"masks_{head} has all-zero rows ({_first_rows(empty)})",
                  "a masked policy must be able to choose at least one class; an all-zero row "
                  "makes its action distribution undefined (NaN).")
    rows = np.flatnonzero((labels >= 0) & ~out)
    infeasible = rows[masks[rows, labels[rows]] == 0]
    if infeasible.size:
        flags = np.zeros(len(labels), bool)
        flags[infeasible] = True
        found.add(f"labels_{head} name a class that its mask forbids in rows "
                  f"{_first_rows(flags)}",
                  "behaviour cloning would teach the agent an action it is never allowed to "
                  "take.")


def deep_check(path: Path, manifest: Mapping[str, Any], max_files: int = 3) -> list[Problem]:
    """Rebuild the samples of up to ``max_files`` source files of a batch and compare.

    Uses the parameters recorded in the manifest (not the current config), so it checks that
    the batch still matches its sources.
    """
    problems: list[Problem] = []
    entry = next((b for b in manifest.get("batches", []) if b.get("name") == path.name), None)
    if entry is None or not manifest.get("params") or not entry.get("files"):
        return problems
    params = SampleParams.from_json(manifest["params"])
    quarantined = {q["file"] for q in entry.get("quarantined", [])}
    files = [f for f in entry["files"] if f["path"] not in quarantined]
    if not files:
        return problems
    picks = sorted({0, len(files) // 2, len(files) - 1})[:max_files]
    block, _ = load_batch(path)
    for i in picks:
        source = Path(files[i]["path"])
        if not source.is_file():
            problems.append(Problem(str(path), f"source file {source} no longer exists",
                                    "--deep cannot rebuild its rows.",
                                    "Restore the file or re-run `pricectl preprocess`."))
            continue
        stat = source.stat()
        if (stat.st_size, stat.st_mtime_ns) != (files[i]["size"], files[i]["mtime_ns"]):
            problems.append(Problem(str(path), f"source file {source} changed after the batch "
                                    "was built", "the batch no longer reflects its input.",
                                    "Re-run `pricectl preprocess` (it rebuilds this batch)."))
            continue
        rebuilt = build_samples(source, params)
        if rebuilt.n == 0:
            continue
        rows = block.meta["product_index"] == rebuilt.meta["product_index"][0]
        stored = block.take(rows)
        same = (stored.n == rebuilt.n
                and np.array_equal(stored.features, rebuilt.features)
                and all(np.array_equal(stored.labels[h], rebuilt.labels[h]) for h in params.heads)
                and all(np.array_equal(stored.masks[h], rebuilt.masks[h]) for h in params.heads)
                and all(np.array_equal(stored.meta[c], rebuilt.meta[c]) for c in META_DTYPES))
        if not same:
            problems.append(Problem(str(path), f"rows of {source.name} differ from a rebuild "
                                    "from the source file",
                                    "the batch does not hold what preprocess computes from its "
                                    "inputs.", _REBUILD))
    return problems




# ----------------------------------------------------------------------------------------------
# The validate-batches stage


def _resolve_batch_paths(paths: Sequence[Path], default_dir: Path) -> list[Path]:
    found: list[Path] = []
    for given in (list(paths) or [default_dir]):
        given = Path(given)
        if given.is_dir():
            found.extend(sorted(given.glob(BATCH_GLOB)))
        elif given.is_file():
            found.append(given)
        else:
            raise MissingInputError(f"no such batch file or folder: {given}",
                                    "Pass batch files or folders, or run `pricectl preprocess`.")
    if not found:
        where = ", ".join(str(p) for p in (list(paths) or [default_dir]))
        raise MissingInputError(f"no {BATCH_GLOB} files in {where}",
                                "Run `pricectl preprocess` first.")
    return found


def run_validate_batches(settings: Settings, monitor: RunMonitor, *, paths: Sequence[Path],
                         deep: bool = False, convert_legacy: bool = False,
                         trust_pickle: bool = False) -> StageResult:
    """Check batch files and explain every problem (what, why, how to fix).

    Args:
        paths: batch files or folders; empty means ``preprocess.output_dir``.
        deep: also rebuild a few source files per batch and compare.
        convert_legacy: rewrite legacy batches in the current format first.
        trust_pickle: required with convert_legacy (legacy batches are pickled).

    Returns:
        StageResult whose ``failures`` hold one line per problem (non-empty: non-zero exit).

    Raises:
        ConfigError: --convert-legacy without --trust-pickle or the reverse.
        MissingInputError: no batch files found.
    """
    from pricing_cli.runinfo import StageResult

    if convert_legacy != trust_pickle:
        raise ConfigError("--convert-legacy and --trust-pickle go together",
                          "Legacy batches are pickled: pass both flags, and only for files "
                          "you made yourself.")
    batch_paths = _resolve_batch_paths(paths, Path(settings.preprocess.output_dir))
    monitor.add_bar("batches", "batches checked", len(batch_paths))
    manifests: dict[Path, dict[str, Any] | None] = {}
    refused: set[Path] = set()  # folders whose manifest is itself a problem (reported once)
    unverified = 0
    problems: list[Problem] = []
    converted = 0
    samples = 0
    for path in batch_paths:
        folder = path.parent
        monitor.set_worker("main", path.name)
        if folder not in manifests:
            try:
                manifests[folder] = read_manifest(folder)
            except BatchError as exc:
                problems.append(Problem(str(folder / MANIFEST_NAME), exc.message,
                                        "no batch in this folder can be verified.", exc.hint))
                manifests[folder] = None
                refused.add(folder)
        if folder in refused:
            unverified += 1
            monitor.update_bar("batches", advance=1)
            continue
        if convert_legacy and is_legacy(path):
            _, names, entry = convert_legacy_batch(path, trust_pickle=trust_pickle)
            updated = manifests[folder] or {"format_version": FORMAT_VERSION, "batches": [],
                                            "heads": {}, "n_features": len(names)}
            others = [b for b in updated["batches"] if b["name"] != path.name]
            updated["batches"] = sorted([*others, entry], key=lambda b: b["name"])
            updated["heads"] = updated.get("heads") or {
                m[6:]: info["shape"][1] for m, info in entry["members"].items()
                if m.startswith("masks_")}
            write_manifest(folder, updated)
            manifests[folder] = updated
            converted += 1
            monitor.log(f"converted legacy batch {path} (original kept as {path.name}.legacy)")
        manifest = manifests[folder]
        found = validate_batch(path, manifest)
        if deep and not found and manifest is not None:
            found = deep_check(path, manifest)
        if not found and manifest is not None:
            recorded = [b for b in manifest.get("batches", []) if b.get("name") == path.name]
            samples += sum(int(b["n_samples"]) for b in recorded)
        problems.extend(found)
        monitor.update_bar("batches", advance=1)
        monitor.check_memory()
    monitor.clear_workers()
    bad_batches = len({p.batch for p in problems if not p.batch.endswith(MANIFEST_NAME)})
    summary = {"batches_checked": len(batch_paths),
               "batches_ok": len(batch_paths) - bad_batches - unverified,
               "problems": len(problems), "samples_in_ok_batches": samples,
               "legacy_converted": converted, "deep": "yes" if deep else "no"}
    notes = [] if problems else [f"all {len(batch_paths)} batch(es) passed every check"]
    return StageResult("validate-batches", None, inputs=batch_paths, summary=summary,
                       failures=[str(p) for p in problems], notes=notes)
