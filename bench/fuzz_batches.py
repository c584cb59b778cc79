"""Mutation fuzzing of validate-batches: every corrupted copy of a real batch must be reported.

    .venv/bin/python -m bench.fuzz_batches [--mutations 1000] [--seed 0]

Builds a tiny batch set (``pricectl --preset tiny pipeline --to preprocess`` in a temporary
folder, a few seconds), then writes ``mutations`` corrupted copies of its batches, each with
one of: 1..8 flipped bits at random offsets, 1..3 flipped bits in the zip structure (the
local headers, central directory and end record, ~2% of the file, which member checksums
do not cover), a truncation at a random length, a random range
overwritten with random bytes, random bytes appended, prepended or inserted. Each copy is
checked with ``validate_batch``; a copy with no problem is *missed*, one that makes it raise is
*crashed*. Copies whose bytes equal the original (two flips of one bit) are redrawn.

Prints one JSON object on the last line: ``{"mutations", "caught", "missed", "crashed",
"by_kind", "seconds", "mutations_per_s", "batch_bytes", "seed"}``; the missed and crashed
mutations are listed before it. Exit code 1 if any was missed or crashed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import struct
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

KINDS = ("flip", "flip_zip", "truncate", "overwrite", "append", "prepend", "insert")


def zip_structure_offsets(data: bytes) -> list[int]:
    """Offsets of the bytes of a zip that are not member data (headers, directory, end)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
    in_data = bytearray(len(data))
    for info in infos:
        local = info.header_offset
        name_len, extra_len = struct.unpack("<HH", data[local + 26:local + 30])
        start = local + 30 + name_len + extra_len
        in_data[start:start + info.compress_size] = b"\x01" * info.compress_size
    return [i for i, flag in enumerate(in_data) if not flag]


def mutate(data: bytes, rng: random.Random, structure: list[int] | None = None
           ) -> tuple[str, bytes]:
    """One random mutation of ``data``: (its description, the mutated bytes).

    ``structure``: offsets for the ``flip_zip`` kind (see :func:`zip_structure_offsets`).
    """
    kind = rng.choice(KINDS if structure else [k for k in KINDS if k != "flip_zip"])
    out = bytearray(data)
    if kind in ("flip", "flip_zip"):
        offsets = ([(rng.randrange(len(out)), rng.randrange(8)) for _ in range(rng.randint(1, 8))]
                   if kind == "flip" else
                   [(rng.choice(structure), rng.randrange(8)) for _ in range(rng.randint(1, 3))])
        for offset, bit in offsets:
            out[offset] ^= 1 << bit
        return f"{kind} {offsets}", bytes(out)
    if kind == "truncate":
        size = rng.randrange(len(out))
        return f"truncate to {size}", bytes(out[:size])
    junk = rng.randbytes(rng.randint(1, 64))
    if kind == "overwrite":
        start = rng.randrange(len(out))
        out[start:start + len(junk)] = junk[:len(out) - start]
        return f"overwrite {len(junk)} bytes at {start}", bytes(out)
    if kind == "append":
        return f"append {len(junk)} bytes", bytes(out) + junk
    if kind == "prepend":
        return f"prepend {len(junk)} bytes", junk + bytes(out)
    start = rng.randrange(len(out) + 1)
    out[start:start] = junk
    return f"insert {len(junk)} bytes at {start}", bytes(out)


def build_batches(root: Path) -> Path:
    """A real tiny batch set under ``root``; returns its folder (batches + manifest.json)."""
    from pricing_cli import cli

    cwd = Path.cwd()
    os.chdir(root)
    try:
        code = cli.main(["--preset", "tiny", "--no-live", "--quiet", "pipeline", "--to",
                         "preprocess"])
    finally:
        os.chdir(cwd)
    if code != 0:
        raise SystemExit(f"building the tiny batch set failed with exit code {code}")
    return root / "data" / "intermediate"


def run(mutations: int, seed: int) -> dict[str, Any]:
    """Build a tiny batch set, check ``mutations`` corrupted copies; the counts as a dict.

    The dict also holds ``missed_examples`` and ``crashed_examples`` (up to 20 each:
    batch, mutation, and for a crash the exception).
    """
    from pricing_cli.stages.batch_checks import validate_batch
    from pricing_cli.stages.batches import read_manifest

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="fuzz_batches_") as tmp:
        folder = build_batches(Path(tmp))
        manifest = read_manifest(folder)
        originals = {p.name: p.read_bytes() for p in sorted(folder.glob("batch_*.npz"))}
        structures = {name: zip_structure_offsets(data) for name, data in originals.items()}
        for name in originals:  # the unmutated batches must pass, or every count is moot
            if problems := validate_batch(folder / name, manifest):
                raise SystemExit(f"the unmutated {name} fails validation: {problems[0]}")
        target = Path(tmp) / "mutated"
        target.mkdir()
        caught = 0
        by_kind: Counter[str] = Counter()
        missed: list[dict[str, str]] = []
        crashed: list[dict[str, str]] = []
        started = time.perf_counter()
        for _ in range(mutations):
            name = rng.choice(sorted(originals))
            original = originals[name]
            described, data = mutate(original, rng, structures[name])
            while data == original:
                described, data = mutate(original, rng, structures[name])
            by_kind[described.split()[0]] += 1
            path = target / name
            path.write_bytes(data)
            try:
                problems = validate_batch(path, manifest)
            except Exception as exc:  # noqa: BLE001 - a crash is what this bench counts
                crashed.append({"batch": name, "mutation": described,
                                "error": f"{type(exc).__name__}: {exc}"})
                continue
            if problems:
                caught += 1
            else:
                missed.append({"batch": name, "mutation": described})
        seconds = time.perf_counter() - started
    return {"mutations": mutations, "caught": caught, "missed": len(missed),
            "crashed": len(crashed), "by_kind": dict(sorted(by_kind.items())),
            "seconds": round(seconds, 3), "mutations_per_s": round(mutations / seconds, 1),
            "batch_bytes": {name: len(data) for name, data in originals.items()},
            "seed": seed, "missed_examples": missed[:20], "crashed_examples": crashed[:20]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutations", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON line
        result = run(args.mutations, args.seed)
    for kind in ("missed_examples", "crashed_examples"):
        for example in result.pop(kind):
            print(f"{kind.split('_')[0]}: {json.dumps(example)}")
    print(json.dumps(result))
    if result["missed"] or result["crashed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
