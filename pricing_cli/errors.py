"""The exception hierarchy and the one table that maps it to messages and exit codes.

Every user-facing failure raises a subclass of :class:`PricingError`. The CLI entry point
(:func:`pricing_cli.cli.main`) is the only place that turns them into exit codes, using
:data:`EXIT_CODES`. A traceback is printed only with ``--debug``.
"""

from __future__ import annotations

from dataclasses import dataclass


class PricingError(Exception):
    """Base class of every error pricectl reports to the user.

    Args:
        message: what went wrong, naming the file, row or key involved.
        hint: how to fix it; shown on a second line.
    """

    default_hint = "Run with --debug for the full traceback."

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint


class ConfigError(PricingError):
    """A config file, environment variable or flag is invalid."""

    default_hint = "Check the key against `pricectl config show` or configs/default.yaml."


class DataError(PricingError):
    """Raw input data breaks the contract in docs/data-format.md."""

    default_hint = "See docs/data-format.md for the expected columns and types."


class BatchError(PricingError):
    """A batch file, manifest or processed array is missing, corrupt or inconsistent."""

    default_hint = "Run `pricectl validate-batches` for details, or re-run `pricectl preprocess`."


class PartialFailure(PricingError):
    """A stage finished, but some inputs failed and were quarantined."""

    default_hint = "The failed files are listed above and in the manifest; fix them and re-run."


class MemoryBudgetExceeded(PricingError):
    """The process tree was about to exceed --max-memory; the stage stopped cleanly."""

    default_hint = (
        "Work done so far is kept; re-run with a larger --max-memory or a smaller "
        "--batch-size / fewer --workers to resume."
    )


class DiskFullError(PricingError):
    """A write failed for lack of space (ENOSPC)."""

    default_hint = "Free disk space and re-run: completed work is kept and will be reused."


class ModelError(PricingError):
    """A model run folder is missing or does not match the processed data."""

    default_hint = "Train a model first with `pricectl train --multi-product`, or pass --model."


class MissingInputError(PricingError):
    """A stage's input does not exist yet (an earlier stage has not run)."""

    default_hint = "Run the earlier pipeline stage first; see `pricectl --help` for the order."


class OutputError(PricingError):
    """An output folder cannot be written safely: it holds files pricectl did not write, it
    overlaps an input, or the system refuses the write (permissions, read-only disk)."""

    default_hint = "Choose another output folder (an empty or new one) on a writable disk."


class RunLocked(PricingError):
    """Another pricectl run holds the lock of an input or output folder of this stage."""

    default_hint = "Wait for the other run to finish, or stop it, then re-run."


class Terminated(KeyboardInterrupt):
    """SIGTERM: handled like Ctrl+C (completed work kept, partial outputs removed)."""


@dataclass(frozen=True)
class ExitCode:
    """One row of the exit-code table."""

    error: type[BaseException]
    code: int
    label: str


# The one table: most specific first. Documented in README.md ("Exit codes").
EXIT_CODES: tuple[ExitCode, ...] = (
    ExitCode(ConfigError, 3, "config error"),
    ExitCode(DataError, 4, "data error"),
    ExitCode(BatchError, 5, "batch error"),
    ExitCode(PartialFailure, 6, "partial failure"),
    ExitCode(MemoryBudgetExceeded, 7, "memory budget"),
    ExitCode(DiskFullError, 8, "disk full"),
    ExitCode(ModelError, 9, "model error"),
    ExitCode(MissingInputError, 10, "missing input"),
    ExitCode(OutputError, 11, "output refused"),
    ExitCode(RunLocked, 12, "locked"),
    ExitCode(PricingError, 1, "error"),
    ExitCode(Terminated, 143, "terminated"),
    ExitCode(KeyboardInterrupt, 130, "interrupted"),
)


def classify_os_error(exc: BaseException) -> BaseException:
    """The PricingError for an error the system raised outside the stages' own checks.

    A full disk and a folder pricectl may not write are not bugs: they get their class
    (and exit code) with the path, whichever library raised them (Polars' writers raise
    their own types, some without errno, with "os error 28" or "Permission denied" in the
    text). Anything else is returned unchanged (an internal error).
    """
    import errno as errno_codes

    if isinstance(exc, PricingError):
        return exc
    code = getattr(exc, "errno", None)
    text = str(exc)
    where = getattr(exc, "filename", None)
    path = f" ({where})" if where else ""
    if code == errno_codes.ENOSPC or "(os error 28)" in text or "No space left" in text:
        return DiskFullError(f"no space left on device{path}: {text[:300]}")
    if code in (errno_codes.EACCES, errno_codes.EPERM, errno_codes.EROFS) or (
            "Permission denied" in text or "(os error 13)" in text
            or "Read-only file system" in text or "(os error 30)" in text):
        return OutputError(f"cannot write{path}: {text[:300]}",
                           "Check the folder's permissions, or choose another output folder "
                           "on a writable disk; completed work is kept.")
    return exc


def exit_code_for(exc: BaseException) -> ExitCode:
    """Return the table row for ``exc`` (the first matching type wins)."""
    for row in EXIT_CODES:
        if isinstance(exc, row.error):
            return row
    return ExitCode(type(exc), 1, "internal error")
