"""One memory sampler and one live panel, shared by every stage.

:class:`MemorySampler` reads memory on a background thread: this process's RSS, its worker
processes' PSS (USS, then RSS where PSS is unreadable), system available memory and swap,
keeps the peak of each, appends every sample to ``memory.jsonl`` and enforces ``--max-memory``.

:class:`RunMonitor` owns the display. On a TTY it is a Rich Live panel (header: stage and
elapsed time; a body the stage fills: worker lines, progress bars, rates; a memory line),
redrawn at most 4 times a second. Otherwise it prints a timestamped plain line every few
seconds, with no escape codes. Workers never print: they put :data:`Event` tuples on a queue
that the stage drains into :meth:`RunMonitor.handle_event`.

Progress goes to stderr so that ``--json`` leaves stdout machine-readable.
"""

from __future__ import annotations

import _thread
import json
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal

import psutil

from pricing_cli.errors import MemoryBudgetExceeded

DisplayMode = Literal["live", "plain", "quiet"]
# ("worker", worker_id, text) | ("log", text) | ("advance", bar_key, n) | ("metric", name, text)
Event = tuple[Any, ...]

# Stop when the tree reaches this fraction of the budget, so the stop happens *before* it.
BUDGET_SAFETY = 0.92


def format_bytes(n: float) -> str:
    """Human-readable binary size: 1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def format_elapsed(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class MemorySample:
    """One reading. ``tree`` = this process's PSS + its workers' PSS (shared pages once).

    PSS is read at most once per ``pss_interval_s`` (it walks every mapping: the costly
    part); between reads each process's PSS is carried forward by its RSS change since.
    """

    t: float
    rss: int
    workers: int
    tree: int
    n_workers: int
    available: int
    swap_used: int
    swap_total: int
    # Python's own helper processes (multiprocessing's resource tracker, forkserver): in the
    # tree, but not counted or summed as workers, so the worker count is the stage's.
    helpers: int = 0
    n_helpers: int = 0


@dataclass
class MemoryPeaks:
    rss: int = 0
    workers: int = 0
    tree: int = 0
    n_workers: int = 0
    swap_used: int = 0
    min_available: int = 0

    def update(self, s: MemorySample) -> None:
        self.rss = max(self.rss, s.rss)
        self.workers = max(self.workers, s.workers)
        self.tree = max(self.tree, s.tree)
        self.n_workers = max(self.n_workers, s.n_workers)
        self.swap_used = max(self.swap_used, s.swap_used)
        self.min_available = s.available if not self.min_available else min(
            self.min_available, s.available)


def _proportional_memory(proc: psutil.Process) -> int:
    """PSS where readable (never counts shared pages twice), else USS, else RSS."""
    try:
        info = proc.memory_full_info()
        pss = getattr(info, "pss", None)
        if pss:
            return int(pss)
        uss = getattr(info, "uss", None)
        if uss:
            return int(uss)
        return int(info.rss)
    except (psutil.AccessDenied, psutil.ZombieProcess):
        try:
            return int(proc.memory_info().rss)
        except psutil.Error:
            return 0
    except psutil.NoSuchProcess:
        return 0


def _status_hwm(pid: int | str) -> int | None:
    """The kernel's peak RSS of one process (VmHWM in /proc/PID/status), None off Linux."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _maxrss(who: int) -> int:
    """getrusage's ru_maxrss in bytes (KiB on Linux, bytes on macOS); 0 where unavailable."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    value = int(resource.getrusage(who).ru_maxrss)
    return value if sys.platform == "darwin" else value * 1024


def _rusage_children() -> int:
    try:
        import resource
    except ImportError:
        return 0
    return _maxrss(resource.RUSAGE_CHILDREN)


def _rusage_self() -> int:
    try:
        import resource
    except ImportError:
        return 0
    return _maxrss(resource.RUSAGE_SELF)


def cgroup_peak_file() -> Path | None:
    """This process's cgroup peak-usage file: v2 ``memory.peak`` or v1
    ``memory.max_usage_in_bytes``; None where neither is readable."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates: list[Path] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":
            candidates.append(Path("/sys/fs/cgroup") / rel / "memory.peak")
            candidates.append(Path("/sys/fs/cgroup/unified") / rel / "memory.peak")
        elif "memory" in controllers.split(","):
            candidates.append(Path("/sys/fs/cgroup/memory") / rel / "memory.max_usage_in_bytes")
    for candidate in candidates:
        try:
            int(candidate.read_text().split()[0])
            return candidate
        except (OSError, ValueError, IndexError):
            continue
    return None


def _read_int(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# Processes Python's multiprocessing starts for itself (found in their command line).
HELPER_PROCESSES = ("multiprocessing.resource_tracker", "multiprocessing.forkserver",
                    "multiprocessing.semaphore_tracker")


class _TreeReader:
    """Reads the memory of one process and its descendants, cheaply enough to run often.

    ``Process.children(recursive=True)`` reads every process's stat file on each call (2.9 ms
    of the 6.4 ms a sample cost, measured with two 200 MiB workers); here the parent of each
    pid is read once, when the pid first appears, and the Process objects are kept.
    """

    def __init__(self, root: psutil.Process) -> None:
        self.root = root
        self._parent: dict[int, int] = {}
        self._procs: dict[int, psutil.Process] = {}
        self._pss: dict[int, tuple[int, int]] = {}  # pid -> (PSS, RSS at that reading)
        self._helper: dict[int, bool] = {}  # pid -> is one of HELPER_PROCESSES
        self.worker_hwm: dict[int, int] = {}  # pid -> VmHWM, every worker since reset_hwm

    def reset_hwm(self) -> None:
        self.worker_hwm = {}

    def descendants(self) -> list[psutil.Process]:
        pids = set(psutil.pids())
        for gone in set(self._parent) - pids:
            del self._parent[gone]
            self._procs.pop(gone, None)
            self._pss.pop(gone, None)
            self._helper.pop(gone, None)
        for pid in pids - set(self._parent):
            try:
                self._parent[pid] = psutil.Process(pid).ppid()
            except psutil.Error:
                continue
        children_of: dict[int, list[int]] = {}
        for pid, parent in self._parent.items():
            children_of.setdefault(parent, []).append(pid)
        found: list[psutil.Process] = []
        stack = list(children_of.get(self.root.pid, []))
        while stack:
            pid = stack.pop()
            if pid == self.root.pid:
                continue
            proc = self._procs.get(pid)
            if proc is None:
                try:
                    proc = self._procs[pid] = psutil.Process(pid)
                except psutil.Error:
                    continue
            found.append(proc)
            stack.extend(children_of.get(pid, []))
        return found

    def is_helper(self, proc: psutil.Process) -> bool:
        """True for multiprocessing's resource tracker or forkserver (asked once per pid)."""
        known = self._helper.get(proc.pid)
        if known is None:
            try:
                command = " ".join(proc.cmdline())
            except psutil.Error:
                command = ""
            known = self._helper[proc.pid] = any(name in command for name in HELPER_PROCESSES)
        return known

    def memory(self, proc: psutil.Process, full: bool, worker: bool) -> tuple[int, int]:
        """(RSS, PSS estimate) of one process; PSS is read afresh when ``full`` or unseen."""
        try:
            rss = int(proc.memory_info().rss)
        except psutil.Error:
            return 0, 0
        known = self._pss.get(proc.pid)
        if full or known is None:
            pss = _proportional_memory(proc)
            self._pss[proc.pid] = (pss, rss)
            if worker:
                hwm = _status_hwm(proc.pid) or 0
                self.worker_hwm[proc.pid] = max(self.worker_hwm.get(proc.pid, 0), hwm)
            return rss, pss
        pss, rss_then = known
        return rss, max(0, pss + rss - rss_then)


def read_memory(proc: psutil.Process | None = None, *, reader: _TreeReader | None = None,
                full: bool = True) -> MemorySample:
    """Take one memory reading of ``proc`` (default: this process) and its descendants.

    ``reader`` keeps Process objects and PSS readings between calls; ``full=False`` carries
    each PSS forward by its RSS change instead of reading it again.
    """
    reader = reader or _TreeReader(proc or psutil.Process())
    children = reader.descendants()
    rss, own = reader.memory(reader.root, full, worker=False)
    helper = [reader.is_helper(child) for child in children]
    workers = sum(reader.memory(child, full, worker=True)[1]
                  for child, h in zip(children, helper, strict=True) if not h)
    helpers = sum(reader.memory(child, full, worker=False)[1]
                  for child, h in zip(children, helper, strict=True) if h)
    vm = psutil.virtual_memory()
    sw = psutil.swap_memory()
    return MemorySample(
        t=time.time(), rss=rss, workers=workers, tree=own + workers + helpers,
        n_workers=len(children) - sum(helper), available=int(vm.available),
        swap_used=int(sw.used), swap_total=int(sw.total), helpers=helpers,
        n_helpers=sum(helper),
    )


@dataclass
class KernelPeaks:
    """What the kernel recorded, which no sampling interval can miss.

    ``rss``: this process's peak RSS during the stage (VmHWM, reset when the stage starts;
    else ``ru_maxrss``, which is the whole process lifetime). ``workers``: the sum of every
    worker's own peak RSS (VmHWM, read with each PSS reading while it runs), as if all
    peaked at once. ``worker``: the largest single worker's peak (that, or ``ru_maxrss`` of
    the reaped children when larger: a worker that grew after its last reading, or lived
    between two). The tree bound is ``rss + workers + (ru_maxrss excess)``: it cannot be
    below the true peak of the tree's RSS, which counts shared pages in every process.
    ``cgroup``: the cgroup's own peak, which covers every process in it since it was created
    (or last reset), so it is an upper bound unless the stage ran alone in its cgroup.
    """

    rss: int
    rss_source: str
    workers: int
    worker: int
    tree_bound: int
    cgroup: int | None
    cgroup_file: str | None


# What else lowers a stage's memory, for the --max-memory hint (the options it really has).
_BUDGET_LEVERS = {
    "preprocess": "or fewer files per batch and workers (`preprocess --batch-size N "
                  "--workers N`, or preprocess.batch_max_mb)",
    "merge": "or the bounded-memory strategy (`merge --strategy sequential`)",
    "train": "or fewer parallel episodes and smaller updates (train.n_envs, train.n_steps, "
             "train.batch_size in the config)",
}


def budget_hint(stage: str) -> str:
    """The hint of a stage stopped by --max-memory: a larger budget, placed where the CLI
    takes it, or the stage's own ways to need less."""
    lever = _BUDGET_LEVERS.get(stage)
    return ("Work done so far is kept; re-run with a larger budget (a global option, before "
            f"the subcommand: `pricectl --max-memory SIZE {stage}`)"
            + (f", {lever}" if lever else "") + ".")


class MemorySampler:
    """Samples memory on a daemon thread; writes memory.jsonl; trips the memory budget.

    Args:
        interval_s: seconds between samples.
        pss_interval_s: seconds between PSS readings; RSS changes carry it forward between.
        jsonl_path: where to append one JSON object per sample (None: keep in memory only).
        budget_bytes: --max-memory in bytes; None for no budget.
    """

    def __init__(self, interval_s: float = 0.25, jsonl_path: Path | None = None,
                 budget_bytes: int | None = None, pss_interval_s: float = 1.0) -> None:
        # With a budget, sample at least 20 times a second: spawning workers grows the tree by
        # ~40 MiB per 0.25 s, enough to pass a budget between two slow samples (measured).
        self.interval_s = interval_s if budget_bytes is None else min(interval_s, 0.05)
        self.jsonl_path = jsonl_path
        self.budget_bytes = budget_bytes
        self.peaks = MemoryPeaks()
        self.last: MemorySample | None = None
        self.budget_tripped = False
        self.budget_message = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._jsonl: IO[str] | None = None
        self._proc = psutil.Process()
        # PSS walks every mapping of every process; RSS is one small read. Between PSS
        # readings the tree is estimated from RSS changes (see read_memory).
        self.pss_interval_s = max(pss_interval_s, self.interval_s)
        self._reader = _TreeReader(self._proc)
        self._last_full = -float("inf")
        self._kernel_reset()

    def _kernel_reset(self) -> None:
        """Start the kernel's peak counters afresh for a new stage, where the kernel allows."""
        try:
            # "5" resets this process's VmHWM to its current RSS (Linux >= 4.0).
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self._hwm_resettable = _status_hwm("self") is not None
        except OSError:
            self._hwm_resettable = False
        self._reader.reset_hwm()
        self._cgroup_file = cgroup_peak_file()

    def kernel_peaks(self) -> KernelPeaks:
        hwm = _status_hwm("self") if self._hwm_resettable else None
        rss, source = (hwm, "VmHWM") if hwm is not None else (_rusage_self(), "ru_maxrss")
        seen = self._reader.worker_hwm
        largest_seen = max(seen.values(), default=0)
        # ru_maxrss of children spans the process lifetime: only a stage with workers uses it
        reaped = _rusage_children() if self.peaks.n_workers else 0
        workers = sum(seen.values())
        return KernelPeaks(
            rss=rss, rss_source=source, workers=workers, worker=max(largest_seen, reaped),
            tree_bound=rss + workers + max(0, reaped - largest_seen),
            cgroup=_read_int(self._cgroup_file),
            cgroup_file=str(self._cgroup_file) if self._cgroup_file else None)

    def sample(self) -> MemorySample:
        now = time.monotonic()
        full = now - self._last_full >= self.pss_interval_s
        if full:
            self._last_full = now
        s = read_memory(self._proc, reader=self._reader, full=full)
        self.last = s
        self.peaks.update(s)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(asdict(s)) + "\n")
            self._jsonl.flush()
        if (self.budget_bytes is not None and not self.budget_tripped
                and s.tree >= self.budget_bytes * BUDGET_SAFETY):
            self.budget_tripped = True
            # No "memory budget:" prefix: the exit-code label already says it.
            self.budget_message = (
                f"the process tree reached {format_bytes(s.tree)} of the "
                f"{format_bytes(self.budget_bytes)} allowed by --max-memory; stopped cleanly")
            # Interrupt the main thread; RunMonitor.__exit__ turns it into MemoryBudgetExceeded.
            _thread.interrupt_main()
        return s

    def _loop(self) -> None:
        # start() has just sampled: the first loop sample comes one interval later (an
        # immediate second one raced the caller's first allocations and made the sampled
        # peak depend on thread scheduling).
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except psutil.Error:
                pass

    def switch_output(self, jsonl_path: Path | None) -> None:
        """Send further samples to another memory.jsonl and start the peaks afresh.

        Used when one monitor spans several stages (`pricectl pipeline`): each stage's run
        folder gets its own samples and its run.json its own peaks.
        """
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        self.jsonl_path = jsonl_path
        if jsonl_path is not None:
            jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(jsonl_path, "a", encoding="utf-8")  # noqa: SIM115
        self.peaks = MemoryPeaks()
        self._kernel_reset()
        if self.last is not None:
            self.peaks.update(self.last)

    def start(self) -> MemorySampler:
        if self.jsonl_path is not None:
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        try:
            self.sample()
        except psutil.Error:
            pass
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


@dataclass
class _Bar:
    label: str
    total: int | None
    completed: int = 0
    started: float = field(default_factory=time.monotonic)


class RunMonitor:
    """The live panel (or plain lines) plus the memory sampler for one stage run.

    Use as a context manager. The stage fills the body with :meth:`add_bar`,
    :meth:`update_bar`, :meth:`set_worker`, :meth:`set_metric` and :meth:`log`, and calls
    :meth:`check_memory` at safe points (batch boundaries).

    Args:
        stage: stage name shown in the header.
        mode: 'live' (Rich Live), 'plain' (timestamped lines) or 'quiet'.
        refresh_per_second: live redraw rate (capped at 4).
        plain_interval_s: seconds between plain lines.
        sample_interval_s: seconds between memory samples.
        pss_interval_s: seconds between PSS readings (RSS is read every sample).
        memory_jsonl: where memory samples go.
        budget_bytes: --max-memory in bytes.
        stream: where progress is written (default stderr).
    """

    def __init__(self, stage: str, mode: DisplayMode = "plain", *, refresh_per_second: float = 4,
                 plain_interval_s: float = 5.0, sample_interval_s: float = 0.25,
                 memory_jsonl: Path | None = None, budget_bytes: int | None = None,
                 stream: IO[str] | None = None, pss_interval_s: float = 1.0) -> None:
        self.stage = stage
        self.mode: DisplayMode = mode
        self.refresh_per_second = min(refresh_per_second, 4.0)
        self.plain_interval_s = plain_interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.sampler = MemorySampler(sample_interval_s, memory_jsonl, budget_bytes,
                                     pss_interval_s)
        self.started = time.monotonic()
        self.started_wall = datetime.now().astimezone()
        self._bars: dict[str, _Bar] = {}
        self._workers: dict[Any, str] = {}
        self._file_names: dict[str, str] = {}  # file name -> what the panel shows instead
        self._metrics: dict[str, str] = {}
        self._logs: deque[str] = deque(maxlen=6)
        self._lock = threading.Lock()
        self._live: Any = None
        self._console: Any = None
        self._plain_stop = threading.Event()
        self._plain_thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> RunMonitor:
        self.sampler.start()
        if self.mode == "live":
            from rich.console import Console
            from rich.live import Live

            self._console = Console(file=self.stream)
            self._live = Live(get_renderable=self._render, console=self._console,
                              refresh_per_second=self.refresh_per_second, transient=False,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        elif self.mode == "plain":
            self._plain_thread = threading.Thread(target=self._plain_loop, daemon=True,
                                                  name="plain-progress")
            self._plain_thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close()
        # The sampler interrupts the main thread when the budget trips; say why, not "Ctrl+C".
        if (self.sampler.budget_tripped and exc_type is not None
                and issubclass(exc_type, KeyboardInterrupt)):
            raise MemoryBudgetExceeded(self.sampler.budget_message,
                                       budget_hint(self.stage)) from exc

    def begin_stage(self, stage: str, memory_jsonl: Path | None) -> None:
        """Reuse this monitor (and its live panel) for the next stage of a pipeline."""
        with self._lock:
            self.stage = stage
            self._bars.clear()
            self._workers.clear()
            self._file_names = {}
            self._metrics.clear()
            self.started = time.monotonic()
            self.started_wall = datetime.now().astimezone()
        self.sampler.switch_output(memory_jsonl)

    def print(self, renderable: Any) -> None:
        """Print a table or text to stdout, above the live panel when one is showing."""
        if self._live is not None and self._console is not None:
            self._live.console.print(renderable)
            return
        from rich.console import Console

        Console().print(renderable)

    def close(self) -> None:
        if self._plain_thread is not None:
            self._plain_stop.set()
            self._plain_thread.join(timeout=2)
            self._plain_thread = None
            self._emit_plain()
        if self._live is not None:
            self._live.stop()
            self._live = None
        self.sampler.stop()

    # -- what stages call --------------------------------------------------------------------
    def add_bar(self, key: str, label: str, total: int | None) -> None:
        with self._lock:
            self._bars[key] = _Bar(label, total)

    def update_bar(self, key: str, *, advance: int = 0, completed: int | None = None,
                   total: int | None = None) -> None:
        with self._lock:
            bar = self._bars[key]
            if completed is not None:
                bar.completed = completed
            bar.completed += advance
            if total is not None:
                bar.total = total

    def name_files(self, names: dict[str, str]) -> None:
        """Show ``names[file]`` (e.g. a product id) where a worker's text starts with a file
        name (``00010.parquet`` or ``00010.parquet +15 more``)."""
        with self._lock:
            self._file_names = dict(names)

    def set_worker(self, worker: Any, text: str) -> None:
        with self._lock:
            head, space, tail = text.partition(" ")
            if head in self._file_names:
                text = self._file_names[head] + space + tail
            self._workers[worker] = text

    def clear_workers(self) -> None:
        with self._lock:
            self._workers.clear()

    def set_metric(self, name: str, text: str) -> None:
        with self._lock:
            self._metrics[name] = text

    def log(self, message: str) -> None:
        """A message that stays on screen (above the live panel / as its own plain line)."""
        if self.mode == "quiet":
            return
        if self._live is not None and self._console is not None:
            self._console.print(message, markup=False, highlight=False)
        else:
            self._write_line(message)
        with self._lock:
            self._logs.append(message)

    def handle_event(self, event: Event) -> None:
        """Apply one event sent by a worker over a queue."""
        kind = event[0]
        if kind == "worker":
            self.set_worker(event[1], event[2])
        elif kind == "log":
            self.log(event[1])
        elif kind == "advance":
            self.update_bar(event[1], advance=int(event[2]))
        elif kind == "metric":
            self.set_metric(event[1], event[2])

    def reserve(self, nbytes: int, what: str) -> None:
        """Stop *before* a step known to need about ``nbytes`` more (e.g. importing torch:
        one call the sampler cannot interrupt) if it would pass the budget.

        Raises:
            MemoryBudgetExceeded: the tree now plus ``nbytes`` passes the budget's safe share.
        """
        budget = self.sampler.budget_bytes
        if budget is None:
            return
        self.check_memory()
        now = read_memory(self.sampler._proc, reader=self.sampler._reader).tree
        if now + nbytes >= budget * BUDGET_SAFETY:
            raise MemoryBudgetExceeded(
                f"{what} needs about {format_bytes(nbytes)} more; the process tree is at "
                f"{format_bytes(now)} of the {format_bytes(budget)} allowed by --max-memory, so "
                f"{self.stage} stopped before it",
                f"Give {self.stage} at least {format_bytes((now + nbytes) / BUDGET_SAFETY)} "
                f"with --max-memory (a global option: `pricectl --max-memory SIZE "
                f"{self.stage} ...`); completed work is kept.")

    def check_memory(self) -> None:
        """Raise MemoryBudgetExceeded at a safe point if the budget has been reached."""
        if self.sampler.budget_tripped:
            raise MemoryBudgetExceeded(self.sampler.budget_message, budget_hint(self.stage))

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def memory_summary(self) -> dict[str, Any]:
        """Sampled peaks (``peak_*``) and the kernel's (``kernel_*``, ``cgroup_*``).

        docs quote ``kernel_peak_tree_bound_bytes``: it cannot miss a spike between samples.
        """
        p = self.sampler.peaks
        k = self.sampler.kernel_peaks()
        return {"peak_rss_bytes": p.rss, "peak_workers_bytes": p.workers,
                "peak_tree_bytes": p.tree, "peak_workers": p.n_workers,
                "peak_swap_used_bytes": p.swap_used,
                "min_available_bytes": p.min_available,
                "kernel_peak_rss_bytes": k.rss, "kernel_peak_rss_source": k.rss_source,
                "kernel_peak_workers_bytes": k.workers,
                "kernel_peak_worker_bytes": k.worker,
                "kernel_peak_tree_bound_bytes": k.tree_bound,
                "cgroup_peak_bytes": k.cgroup, "cgroup_peak_file": k.cgroup_file,
                "sample_interval_s": self.sampler.interval_s,
                "pss_interval_s": self.sampler.pss_interval_s}

    # -- rendering ---------------------------------------------------------------------------
    def memory_line(self) -> str:
        s = self.sampler.last
        if s is None:
            return "memory: -"
        p = self.sampler.peaks
        budget = (f" · budget {format_bytes(self.sampler.budget_bytes)}"
                  if self.sampler.budget_bytes else "")
        helpers = (f" (+{s.n_helpers} helper{'s' if s.n_helpers > 1 else ''} "
                   f"{format_bytes(s.helpers)})" if s.n_helpers else "")
        return (f"memory: rss {format_bytes(s.rss)} · workers({s.n_workers}) "
                f"{format_bytes(s.workers)}{helpers} · tree {format_bytes(s.tree)} "
                f"(peak {format_bytes(p.tree)}) · available {format_bytes(s.available)} · "
                f"swap {format_bytes(s.swap_used)}/{format_bytes(s.swap_total)}{budget}")

    def _bar_text(self, bar: _Bar) -> str:
        rate = bar.completed / max(time.monotonic() - bar.started, 1e-9)
        total = "?" if bar.total is None else str(bar.total)
        eta = ""
        if bar.total is not None and 0 < bar.completed < bar.total and rate > 0:
            # at the rate so far: what is left of this bar
            eta = f", ETA {format_elapsed((bar.total - bar.completed) / rate)}"
        return f"{bar.label} {bar.completed}/{total} ({rate:.1f}/s{eta})"

    def _render(self) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        with self._lock:
            bars = list(self._bars.values())
            workers = dict(self._workers)
            metrics = dict(self._metrics)
        body = Table.grid(padding=(0, 1))
        body.add_column(no_wrap=True)
        body.add_column(ratio=1)
        for wid, text in sorted(workers.items(), key=lambda kv: str(kv[0])):
            # Text, not markup: a file name with brackets must print as it is.
            body.add_row(Text(f"worker {wid}", style="cyan"), Text(text))
        for bar in bars:
            total = bar.total or 0
            body.add_row(
                Text(self._bar_text(bar)),
                ProgressBar(total=max(total, 1), completed=min(bar.completed, max(total, 1)),
                            width=40),
            )
        if metrics:
            body.add_row("", Text(" · ".join(f"{k} {v}" for k, v in metrics.items())))
        title = Text(f"pricectl {self.stage} · {format_elapsed(self.elapsed)}")
        return Panel(Group(body, Text(self.memory_line())), title=title, title_align="left")

    def plain_line(self) -> str:
        with self._lock:
            parts = [self._bar_text(b) for b in self._bars.values()]
            parts += [f"{k} {v}" for k, v in self._metrics.items()]
            if self._workers:
                workers = sorted(self._workers.items(), key=lambda kv: str(kv[0]))
                parts.append("workers: " + ", ".join(f"{w}={t}" for w, t in workers))
        parts.append(self.memory_line())
        return f"{self.stage} {format_elapsed(self.elapsed)} | " + " | ".join(parts)

    def _write_line(self, text: str) -> None:
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        try:
            self.stream.write(f"[{stamp}] {text}\n")
            self.stream.flush()
        except (ValueError, OSError):
            pass

    def _emit_plain(self) -> None:
        self._write_line(self.plain_line())

    def _plain_loop(self) -> None:
        while not self._plain_stop.wait(self.plain_interval_s):
            self._emit_plain()
