"""The one list of pricectl's stages, in pipeline order.

Each :class:`Stage` names its function (imported only when the stage runs), the config
section run.json fingerprints, the sections and upstream stage of the pipeline's stage key,
the folders it writes and reads (the locks a run holds) and the folder whose run.json records
it. The CLI (`pipeline`'s runner and the order of ``--help``), pipeline.py (order, stage key)
and runinfo.py (locks, run.json) all read this table; nothing else lists the stages.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pricing_cli.config import Settings
    from pricing_cli.runinfo import StageFn

Folders = Callable[["Settings"], list[Path]]


def _none(settings: Settings) -> list[Path]:
    return []


@dataclass(frozen=True)
class Stage:
    """One stage of pricectl.

    Args:
        name: the subcommand.
        module, function: where the stage function ``fn(settings, monitor) -> StageResult``
            lives.
        config_section: the section whose fingerprint run.json records.
        key_sections: the sections whose change makes the pipeline re-run the stage.
        upstream: the stage whose run.json is this stage's input in the stage key (None: the
            raw files for features, nothing for generate).
        writes, reads: the folders it writes and reads (locked for the run).
        output: the folder its run.json lands in beside its outputs (None: only runs/).
        in_pipeline: whether `pricectl pipeline` runs it.
        defaults: keyword arguments the pipeline passes (the subcommand's flag defaults).
    """

    name: str
    module: str
    function: str
    config_section: str
    key_sections: tuple[str, ...]
    upstream: str | None
    writes: Folders
    reads: Folders = _none
    output: Callable[[Settings], Path | None] = lambda settings: None
    in_pipeline: bool = True
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def load(self) -> StageFn:
        """The stage function, with the pipeline's keyword arguments bound."""
        fn = getattr(importlib.import_module(self.module), self.function)
        return functools.partial(fn, **self.defaults) if self.defaults else fn  # type: ignore[no-any-return]


def newest_model_dir(settings: Settings) -> Path | None:
    """models/<run_id> if train.run_id is set, else the newest run folder with a run.json."""
    root = Path(settings.train.models_dir)
    if settings.train.run_id:
        return root / settings.train.run_id
    runs = sorted((p for p in root.glob("*") if (p / "run.json").is_file()),
                  key=lambda p: (p / "run.json").stat().st_mtime)
    return runs[-1] if runs else None


def _raw_read(settings: Settings) -> list[Path]:
    """Your own raw data is only read; it is locked (shared) only where generate writes it."""
    raw = Path(settings.generate.output_dir)
    return [raw] if raw.resolve() in Path(settings.data.catalog).resolve().parents else []


def _folder(path: str) -> Callable[[Settings], Path]:
    """The folder at the dotted settings path ``section.key``."""
    section, key = path.split(".")
    return lambda settings: Path(getattr(getattr(settings, section), key))


def _folders(*paths: str) -> Folders:
    getters = [_folder(p) for p in paths]
    return lambda settings: [get(settings) for get in getters]


STAGES: tuple[Stage, ...] = (
    Stage("generate", "pricing_cli.data.generate", "run_generate", "generate", ("generate",),
          None, writes=_folders("generate.output_dir"), output=_folder("generate.output_dir")),
    Stage("features", "pricing_cli.stages.features", "run_features", "features",
          ("data", "features"), None, writes=_folders("features.output_dir"), reads=_raw_read,
          output=_folder("features.output_dir")),
    Stage("preprocess", "pricing_cli.stages.preprocess", "run_preprocess", "preprocess",
          ("preprocess",), "features", writes=_folders("preprocess.output_dir"),
          reads=_folders("features.output_dir"), output=_folder("preprocess.output_dir")),
    Stage("validate-batches", "pricing_cli.stages.batch_checks", "run_validate_batches",
          "preprocess", ("preprocess",), "preprocess", writes=_none,
          reads=_folders("preprocess.output_dir"),
          defaults={"paths": [], "deep": False, "convert_legacy": False,
                    "trust_pickle": False}),
    # merge writes its batch folder too (it deletes the batches it merged)
    Stage("merge", "pricing_cli.stages.merge", "run_merge", "merge", ("merge",), "preprocess",
          writes=_folders("merge.output_dir", "preprocess.output_dir"),
          output=_folder("merge.output_dir")),
    Stage("train", "pricing_cli.agent.train", "run_train", "train", ("train",), "merge",
          writes=_folders("train.models_dir"), reads=_folders("merge.output_dir"),
          output=newest_model_dir, defaults={"product": None, "resume": False}),
    Stage("evaluate", "pricing_cli.agent.evaluate", "run_evaluate", "evaluate",
          ("evaluate", "data"), "train", writes=_folders("evaluate.reports_dir"),
          reads=_folders("merge.output_dir", "train.models_dir"),
          output=_folder("evaluate.reports_dir")),
    Stage("recommend", "pricing_cli.agent.recommend", "run_recommend", "recommend",
          ("recommend",), "train", writes=_folders("recommend.output_dir"),
          reads=_folders("merge.output_dir", "train.models_dir"), in_pipeline=False,
          defaults={"products": None, "model": None}),
)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
PIPELINE: tuple[Stage, ...] = tuple(s for s in STAGES if s.in_pipeline)
PIPELINE_NAMES: tuple[str, ...] = tuple(s.name for s in PIPELINE)


def stage(name: str) -> Stage:
    """The stage called ``name`` (KeyError for an unknown name)."""
    return BY_NAME[name]


def stage_folders(name: str, settings: Settings) -> tuple[list[Path], list[Path]]:
    """(folders the stage writes, folders it reads) for the locks a run holds: one run at a
    time writes a folder, and nobody writes a folder a running stage reads. A name that is
    not a stage (``pipeline``) locks nothing."""
    found = BY_NAME.get(name)
    return ([], []) if found is None else (found.writes(settings), found.reads(settings))
