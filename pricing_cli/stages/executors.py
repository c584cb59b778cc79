"""Where `pricectl preprocess` runs its per-file work: a local process pool, or Ray.

Both executors (:class:`LocalPool` and :class:`RayPool`) are context managers with
``workers`` and ``map(files)``, which yields one ``FileOutcome`` per file **in the order
given**. The work done per file is passed in (``preprocess.process_file``), so this module
does not import preprocess, and the worker processes' state lives here. The parent calls
``map`` once per batch, holds that batch's outcomes, writes the batch with
``batches.write_batch`` and frees it, so the executor never changes what is written: the
batches and manifest are byte-identical whichever runs the work (tests/test_ray.py).

The Ray executor (``--executor ray``):

* starts a local Ray instance with ``workers`` CPUs, or joins the cluster at ``ray_address``
  (``auto`` or ``ray://host:port``); a Ray already initialized in this process (a notebook, the
  tests) is reused and left running;
* runs at most ``workers`` tasks at a time (*slots*), each on a chunk of consecutive files of
  the current batch (up to 16, sized like the local pool's chunks), and at most
  ``2 * workers`` chunks between the oldest not yet handed to the parent and the newest
  submitted. The parent holds one batch: with a local instance its arrays are zero-copy views
  of Ray's shared-memory object store, freed there when the batch is written and dropped;
  a ``ray://`` client copies them into the driver;
* sends absolute input paths (a worker's working directory is not the driver's; on a cluster
  every node must see the inputs at the same path) and maps them back to the paths as given,
  so manifests and quarantine reasons read the same as with the local pool;
* shows slot k's chunk (its first file, "+N more") on the panel's worker line k from
  submission until its result arrives ("idle" between tasks). A slot is the driver's view:
  Ray may still be queueing the task or running it on any node (docs/scaling.md).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_module
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pricing_cli.errors import ConfigError

if TYPE_CHECKING:
    from pricing_cli.config import PreprocessSettings
    from pricing_cli.monitor import RunMonitor
    from pricing_cli.stages.preprocess import FileOutcome, SampleParams

    # (path, params) -> the file's outcome; a module-level function, so workers can import it
    Work = Callable[[str, SampleParams], FileOutcome]

INSTALL_HINT = "Install it with: pip install 'pricing-cli[ray]'"

# Environment of every Ray worker process: one polars thread per task, because Ray already
# runs one task per CPU (the same reason the local pool sets it).
WORKER_ENV = {"POLARS_MAX_THREADS": "1"}


def check_executor_settings(cfg: PreprocessSettings) -> None:
    """Fail early on an executor choice that cannot run.

    Raises:
        ConfigError: ``ray_address`` without ``executor: ray``, or ``executor: ray`` when the
            ``ray`` package is not installed (the message gives the install command).
    """
    if cfg.ray_address and cfg.executor != "ray":
        raise ConfigError(
            f"preprocess.ray_address is {cfg.ray_address!r} but preprocess.executor is "
            f"{cfg.executor!r}",
            "Add --executor ray to run on that Ray cluster, or drop --ray-address.")
    if cfg.executor == "ray":
        import_ray()


def import_ray() -> Any:
    """The ``ray`` module.

    Raises:
        ConfigError: Ray is not installed (an optional dependency).
    """
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            f"preprocess.executor is 'ray' but Ray cannot be imported ({exc})",
            f"{INSTALL_HINT}, or use --executor local.") from None
    return ray


def init_ray(workers: int, address: str | None) -> bool:
    """Start a quiet local Ray instance with ``workers`` CPUs, or join the cluster at ``address``.

    Returns:
        True if this call initialized Ray (the caller shuts it down), False if Ray was already
        initialized in this process (it is reused as it is).

    Raises:
        ConfigError: Ray is not installed, or the cluster at ``address`` cannot be reached.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    # No usage reports from a command-line tool, unless the user asked for them.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    options: dict[str, Any] = {
        "log_to_driver": False,        # worker output would tear the live panel
        "logging_level": logging.ERROR,
        "runtime_env": {"env_vars": dict(WORKER_ENV)},
    }
    if address is None:
        options.update(num_cpus=workers, include_dashboard=False)
    else:
        options["address"] = address
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        where = "start a local Ray instance" if address is None else \
            f"connect to the Ray cluster at {address!r}"
        raise ConfigError(
            f"cannot {where}: {exc}",
            "Check --ray-address (`ray status` on the head node shows the cluster), or leave "
            "it out to start a local Ray instance; see docs/scaling.md.") from None
    return True


# ----------------------------------------------------------------------------------------------
# The local process pool

# A worker process's state, set by its initializer.
_worker_params: Any = None
_worker_events: Any = None
_worker_id: Any = None
_worker_work: Any = None


def _init_worker(params: SampleParams, events: Any, work: Work) -> None:
    """Pool initializer: keep the parameters, the work and the event queue; leave Ctrl+C to
    the parent."""
    global _worker_params, _worker_events, _worker_id, _worker_work
    # Each worker already has a core; polars' own thread pool would oversubscribe them.
    os.environ.setdefault("POLARS_MAX_THREADS", "1")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_params, _worker_events, _worker_work = params, events, work
    identity = mp.current_process()._identity
    _worker_id = identity[0] if identity else os.getpid()
    # Progress events are cosmetic: never let a worker's exit wait for the parent to read them.
    events.cancel_join_thread()


def _work_in_worker(path: str) -> FileOutcome:
    """One file in a pool worker: show it on the worker's panel line, then do the work."""
    _worker_events.put(("worker", _worker_id, Path(path).name))
    outcome: FileOutcome = _worker_work(path, _worker_params)
    return outcome


@dataclass
class LocalPool:
    """The worker pool for one run, or in-process work when there is one worker."""

    params: SampleParams
    workers: int
    monitor: RunMonitor
    work: Work
    pool: Any = None
    events: Any = None

    def __enter__(self) -> LocalPool:
        if self.workers > 1:
            context = mp.get_context("spawn")
            self.events = context.Queue()
            self.pool = context.Pool(self.workers, initializer=_init_worker,
                                     initargs=(self.params, self.events, self.work))
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.pool is not None:
            if exc_type is None:
                self.pool.close()
            else:  # Ctrl+C, --fail-fast, memory budget: stop the workers now
                self.pool.terminate()
            self.pool.join()
            self.drain()
            self.events.close()
            self.events.join_thread()

    def drain(self) -> None:
        while self.events is not None:
            try:
                self.monitor.handle_event(self.events.get_nowait())
            except (queue_module.Empty, OSError, ValueError):
                return

    def map(self, files: Sequence[str]) -> Iterator[FileOutcome]:
        """Outcomes of ``files``, in order."""
        if self.pool is None:
            for path in files:
                self.monitor.set_worker(1, Path(path).name)
                yield self.work(path, self.params)
            return
        chunk = max(1, min(16, len(files) // (self.workers * 4)))
        for outcome in self.pool.imap(_work_in_worker, files, chunksize=chunk):
            self.drain()
            yield outcome


# ----------------------------------------------------------------------------------------------
# Ray


def _ray_process_files(paths: Sequence[tuple[str, str]], params: SampleParams, work: Work
                       ) -> list[FileOutcome]:
    """One Ray task: ``work`` on each ``(absolute, given)`` pair, in order, each reported
    under the path as the user gave it, so outputs do not depend on the executor."""
    outcomes: list[FileOutcome] = []
    for path, given in paths:
        _, block, reason, stats = work(path, params)
        if reason is not None:
            reason = reason.replace(path, given)
        outcomes.append((given, block, reason, stats))
    return outcomes


class RayPool:
    """Runs each file as a Ray task, at most ``workers`` at a time; see the module docstring.

    Args:
        params: what to build from each file.
        work: ``work(path, params)`` builds one file's outcome (``preprocess.process_file``).
        workers: the window of tasks in flight (and the CPUs of a local instance). With a
            cluster address and ``requested_workers == 0`` it becomes the cluster's CPU count.
        monitor: gets one worker line per slot.
        address: None for a local instance, else ``auto`` or ``ray://host:port``.
        requested_workers: ``preprocess.workers`` as configured (0 = all cores).

    Ray is started on the first :meth:`map`, so a run that reuses every batch starts nothing.
    """

    def __init__(self, params: SampleParams, work: Work, workers: int, monitor: RunMonitor,
                 address: str | None = None, requested_workers: int | None = None) -> None:
        self.params = params
        self.work = work
        self.workers = workers
        self.monitor = monitor
        self.address = address
        self.requested_workers = workers if requested_workers is None else requested_workers
        self._ray: Any = None
        self._shutdown = False
        self._task: Any = None
        self._params_ref: Any = None
        self._pending: dict[Any, tuple[int, int]] = {}

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._ray is None:
            return
        # Ctrl+C, --fail-fast or the memory budget left tasks running: stop them now.
        for ref in self._pending:
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001, S110 - a task that just finished cannot be cancelled
                pass
        self._pending.clear()
        self._params_ref = None
        if self._shutdown:
            self._ray.shutdown()

    def _start(self) -> None:
        if self._ray is not None:
            return
        self._shutdown = init_ray(self.workers, self.address)
        self._ray = import_ray()
        if self.address is not None and self.requested_workers == 0:
            cpus = int(self._ray.cluster_resources().get("CPU", 0))
            self.workers = max(1, cpus)
        self._task = self._ray.remote(num_cpus=1, max_retries=1)(_ray_process_files)
        self._params_ref = self._ray.put(self.params)

    def map(self, files: Sequence[str]) -> Iterator[FileOutcome]:
        """Outcomes of ``files``, in order, computed by Ray tasks at most ``workers`` at once.

        Each task takes a chunk of consecutive files (as many as the local pool's chunks), so
        Ray's per-task overhead and the driver's round trip between tasks are paid per chunk.

        Raises:
            Whatever a task raised outside the contract checks (a bug, a lost node after its
            retry), as Ray's ``RayTaskError``.
        """
        self._start()
        ray = self._ray
        size = max(1, min(16, len(files) // (self.workers * 4)))
        chunks = [files[i:i + size] for i in range(0, len(files), size)]
        free_slots = list(range(self.workers, 0, -1))  # pop() hands out slot 1 first
        done: dict[int, list[FileOutcome]] = {}
        next_submit = next_yield = 0
        while next_yield < len(chunks):
            # a slow chunk holds back the ones after it: cap what is in flight or waiting
            while (free_slots and next_submit < len(chunks)
                   and next_submit - next_yield < 2 * self.workers):
                slot = free_slots.pop()
                chunk = chunks[next_submit]
                pairs = [(str(Path(given).resolve()), given) for given in chunk]
                ref = self._task.remote(pairs, self._params_ref, self.work)
                self._pending[ref] = (next_submit, slot)
                label = Path(chunk[0]).name
                self.monitor.set_worker(slot, label if len(chunk) == 1
                                        else f"{label} +{len(chunk) - 1} more")
                next_submit += 1
            # the timeout keeps Ctrl+C responsive while the cluster is busy
            ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=1.0)
            for ref in ready:
                index, slot = self._pending.pop(ref)
                done[index] = ray.get(ref)
                free_slots.append(slot)
                self.monitor.set_worker(slot, "idle")  # until the next submission
            while next_yield in done:
                yield from done.pop(next_yield)
                next_yield += 1


def open_executor(cfg: PreprocessSettings, params: SampleParams, workers: int,
                  monitor: RunMonitor, work: Work) -> LocalPool | RayPool:
    """The executor ``cfg.executor`` names, not yet entered (use it with ``with``), running
    ``work(path, params)`` on each file.

    Raises:
        ConfigError: see :func:`check_executor_settings`.
    """
    check_executor_settings(cfg)
    if cfg.executor == "ray":
        return RayPool(params, work, workers, monitor, cfg.ray_address, cfg.workers)
    return LocalPool(params, workers, monitor, work)
