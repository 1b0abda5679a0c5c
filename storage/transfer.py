"""A parallel transfer engine: work items through stages, under a memory budget.

A :class:`Pipeline` moves :class:`Work` items through a sequence of :class:`Stage` functions,
each with its own worker threads (or a process pool for CPU-bound stages), joined by bounded
queues. It knows nothing of what the items are: :mod:`imgindex.export` supplies stages that
fetch, decode and write DICOM series; here an item is a payload and a size.

::

    work ──admit──► [queue] ─► stage 1 ─► [queue] ─► stage 2 ─► ... ─► stage n ─┐
      ▲   (budget)  threads    (threads)              (processes)               │
      └────────── bytes released when the item's Outcome is delivered ◄─────────┘
                  (in the thread that called run(); failures leave from any stage)

Memory budget
    The work iterable is read lazily, in the caller's thread. An item is admitted only when
    the declared bytes of the items in flight plus its own :attr:`Work.nbytes` fit in
    ``max_inflight_bytes``; its bytes are released once its :class:`Outcome` has been
    delivered. An item larger than the whole budget is admitted alone, when nothing else is
    in flight, so one huge series slows the run down instead of stopping it.
Back-pressure
    Every queue holds at most ``queue_items`` items (default: twice the workers of the stage
    it feeds). A worker whose next queue is full waits, so a slow stage holds back the ones
    before it and, through the first queue, the reading of the work iterable.
Retries
    A stage with a :class:`Retry` tries an item again after a transient error, after a capped
    exponential back-off with full jitter; other errors fail the item at once. A failed item
    never stops the others.
Callbacks
    ``on_outcome`` and ``on_progress`` run in the thread that called :meth:`Pipeline.run`,
    so a caller may write its ledger there without locks. If one raises, the run is
    aborted: queued items are dropped, running stage calls finish, the threads and process
    pools are shut down, and the exception leaves :meth:`~Pipeline.run`. So does
    ``KeyboardInterrupt``.

:func:`run_on_dask` runs the same stages on a Dask ``distributed`` cluster: one task per item
runs every stage in order, with the same retry rules and the same byte budget on the tasks
submitted at a time.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import multiprocessing
import pickle
import queue
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence, Sized
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from storage.metrics import TransferMetrics

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping
    from concurrent.futures import Future

    from distributed import Client

__all__ = [
    "Outcome",
    "Pipeline",
    "Progress",
    "Retry",
    "RunSummary",
    "Stage",
    "TransferMetrics",
    "Work",
    "run_on_dask",
]

logger = logging.getLogger(__name__)

#: Seconds over which :attr:`Progress.rate_now` is measured.
RATE_WINDOW_S = 10.0

#: OSErrors that another try will not cure.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError)


def _is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may go away on another try: I/O, timeouts and broken connections, but
    not a missing file, a refused permission or a folder where a file was expected."""
    if isinstance(exc, _PERMANENT_OS_ERRORS):
        return False
    return isinstance(exc, (OSError, TimeoutError, ConnectionError))


@dataclass(frozen=True)
class Retry:
    """How often and how patiently a stage tries one item again.

    Parameters
    ----------
    attempts : int
        Total tries of one stage for one item, the first included (at least 1).
    first_delay_s : float
        Upper bound of the wait before the first retry; it doubles with each retry
        (the actual wait is drawn uniformly below it: "full jitter").
    max_delay_s : float
        Cap on that upper bound.
    transient : callable
        Whether an exception is worth another try. The default says yes to ``OSError``
        (timeouts and connection errors included) except ``FileNotFoundError``,
        ``PermissionError`` and ``IsADirectoryError``. A process stage whose worker died
        fails with ``concurrent.futures.process.BrokenProcessPool``, which is not transient
        unless you say so. Must pickle for :func:`run_on_dask` (a module-level function).
    """

    attempts: int = 3
    first_delay_s: float = 0.5
    max_delay_s: float = 10.0
    transient: Callable[[BaseException], bool] = field(default=_is_transient)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"Retry.attempts must be at least 1, got {self.attempts}")
        if self.first_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError(
                f"Retry delays must not be negative, got first_delay_s={self.first_delay_s}, "
                f"max_delay_s={self.max_delay_s}"
            )


def _backoff_s(retry: Retry, retry_number: int) -> float:
    """Seconds to wait before retry number ``retry_number`` (1 for the first retry)."""
    ceiling = min(retry.max_delay_s, retry.first_delay_s * 2.0 ** (retry_number - 1))
    return random.uniform(0.0, ceiling)


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline.

    Parameters
    ----------
    name : str
        Unique within a pipeline; names the stage in outcomes, progress and metrics.
    fn : callable
        One input to one output. Raising fails the item at this stage.
    workers : int
        Threads, or processes when ``processes`` is true.
    processes : bool
        Run ``fn`` in a pool of ``workers`` processes (``forkserver`` start method, because
        the caller has threads). ``fn``, its input and its output must pickle, and, as
        with any such pool, the main script must be safe to import (``if __name__ ==
        "__main__":``).
    retry : Retry, optional
        How to retry transient errors; None tries once.
    """

    name: str
    fn: Callable[[Any], Any]
    workers: int = 1
    processes: bool = False
    retry: Retry | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Stage.name must not be empty")
        if self.workers < 1:
            raise ValueError(f"Stage {self.name!r}: workers must be at least 1, got {self.workers}")
        if not callable(self.fn):
            raise TypeError(f"Stage {self.name!r}: fn must be callable, got {self.fn!r}")


@dataclass(frozen=True)
class Work:
    """One item of work (for an export: one series).

    Parameters
    ----------
    key : str
        Names the item; unique within a run (not checked).
    nbytes : int
        Bytes the item holds in memory while in flight: the caller's estimate, counted
        against the pipeline's budget.
    payload : object
        Input of the first stage.
    """

    key: str
    nbytes: int
    payload: Any

    def __post_init__(self) -> None:
        if self.nbytes < 0:
            raise ValueError(f"Work {self.key!r}: nbytes must not be negative, got {self.nbytes}")


@dataclass(frozen=True)
class Outcome:
    """What became of one :class:`Work` item.

    Attributes
    ----------
    key : str
        The work's key.
    ok : bool
        Whether every stage succeeded.
    value : object
        The last stage's output when ``ok``, else None.
    error : BaseException or None
        Why the item failed; from a process stage, the exception as re-raised by
        :mod:`concurrent.futures` (its remote traceback is the ``__cause__``).
    stage : str or None
        The stage that failed (None if ``ok``, or if a Dask task died outside any stage).
    attempts : mapping of str to int
        Tries per stage that was reached.
    seconds : mapping of str to float
        Wall seconds per stage that was reached, retries and back-off included.
    nbytes : int
        The work's declared bytes.
    payload : object
        The work's payload, so the caller can record what failed.
    """

    key: str
    ok: bool
    value: Any
    error: BaseException | None
    stage: str | None
    attempts: Mapping[str, int]
    seconds: Mapping[str, float]
    nbytes: int
    payload: Any


@dataclass(frozen=True)
class Progress:
    """A snapshot of a run.

    Attributes
    ----------
    done, failed : int
        Items delivered so far, by outcome.
    total : int or None
        Items in the run, if known (given, the length of a sized work collection, or
        counted once the work iterable is exhausted).
    bytes_done : int
        Declared bytes of the items delivered (ok or failed).
    bytes_total : int or None
        Declared bytes of the whole run, if known (as ``total``).
    rate_now : float
        Bytes per second over the last ~10 s.
    rate_avg : float
        Bytes per second since the run started.
    eta_s : float or None
        Seconds left, from the bytes (or failing that the items) still to do.
    elapsed_s : float
        Seconds since the run started.
    inflight_items, inflight_bytes : int
        Items admitted and not yet delivered, and their declared bytes.
    queue_depths : mapping of str to int
        Items waiting before each stage (empty for :func:`run_on_dask`, whose queue is the
        scheduler's).
    """

    done: int
    failed: int
    total: int | None
    bytes_done: int
    bytes_total: int | None
    rate_now: float
    rate_avg: float
    eta_s: float | None
    elapsed_s: float
    inflight_items: int
    inflight_bytes: int
    queue_depths: Mapping[str, int]


@dataclass(frozen=True)
class RunSummary:
    """How a run ended: items and bytes delivered, wall seconds, and whether it was
    cancelled (then items never admitted have no outcome)."""

    done: int
    failed: int
    bytes_done: int
    seconds: float
    cancelled: bool


# --- one stage, one item: shared by the threads of a Pipeline and the tasks of run_on_dask ---


@dataclass(frozen=True)
class _Tried:
    """One stage's result for one item."""

    ok: bool
    value: Any
    error: BaseException | None
    attempts: int
    seconds: float


def _try_stage(
    stage: Stage,
    value: Any,
    call: Callable[[Callable[[Any], Any], Any], Any],
    wait: Callable[[float], bool],
    on_retry: Callable[[str], None] | None = None,
) -> _Tried | None:
    """Run ``stage.fn`` on ``value`` through ``call``, retrying transient errors.

    ``wait(seconds)`` sleeps before a retry and returns True if the run was aborted meanwhile;
    then, or if ``call`` fails after an abort, the result is None (the item is dropped).
    """
    retry = stage.retry
    limit = retry.attempts if retry is not None else 1
    started = time.monotonic()
    tries = 0
    while True:
        tries += 1
        try:
            result = call(stage.fn, value)
        except Exception as exc:  # noqa: BLE001 - any stage error fails (or retries) the item
            if retry is not None and tries < limit and retry.transient(exc):
                delay = _backoff_s(retry, tries)
                logger.debug(
                    "stage %s: %s (try %d of %d); retrying in %.2f s",
                    stage.name,
                    exc,
                    tries,
                    limit,
                    delay,
                )
                if on_retry is not None:
                    on_retry(stage.name)
                if wait(delay):
                    return None
                continue
            return _Tried(False, None, exc, tries, time.monotonic() - started)
        return _Tried(True, result, None, tries, time.monotonic() - started)


def _call(fn: Callable[[Any], Any], value: Any) -> Any:
    return fn(value)


# --- bookkeeping of a run, shared by Pipeline and run_on_dask ---


class _Tracker:
    """Counters of one run; thread-safe snapshots for :class:`Progress`."""

    def __init__(self, total: int | None, total_bytes: int | None) -> None:
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.total = total
        self.bytes_total = total_bytes
        self.done = 0
        self.failed = 0
        self.bytes_done = 0
        self.admitted = 0
        self.admitted_bytes = 0
        self.inflight_items = 0
        self.inflight_bytes = 0
        self.finished_at: float | None = None
        # (time, bytes_done) at each delivery; the first entry is the baseline of rate_now.
        self._samples: deque[tuple[float, int]] = deque([(self.started, 0)])

    def fits(self, work: Work, budget: int) -> bool:
        """Whether ``work`` may be admitted now (alone, if it exceeds the whole budget)."""
        with self.lock:
            return self.inflight_items == 0 or self.inflight_bytes + work.nbytes <= budget

    def admit(self, work: Work) -> tuple[int, int]:
        with self.lock:
            self.admitted += 1
            self.admitted_bytes += work.nbytes
            self.inflight_items += 1
            self.inflight_bytes += work.nbytes
            return self.inflight_items, self.inflight_bytes

    def exhausted(self) -> None:
        """The work iterable ran out: what was admitted is the whole run."""
        with self.lock:
            if self.total is None:
                self.total = self.admitted
            if self.bytes_total is None:
                self.bytes_total = self.admitted_bytes

    def deliver(self, outcome: Outcome) -> tuple[int, int]:
        with self.lock:
            if outcome.ok:
                self.done += 1
            else:
                self.failed += 1
            self.bytes_done += outcome.nbytes
            self.inflight_items -= 1
            self.inflight_bytes -= outcome.nbytes
            self._samples.append((time.monotonic(), self.bytes_done))
            return self.inflight_items, self.inflight_bytes

    @property
    def idle(self) -> bool:
        with self.lock:
            return self.inflight_items == 0

    def finish(self) -> None:
        with self.lock:
            self.finished_at = time.monotonic()

    def snapshot(self, queue_depths: Mapping[str, int]) -> Progress:
        with self.lock:
            now = self.finished_at if self.finished_at is not None else time.monotonic()
            elapsed = now - self.started
            samples = self._samples
            while len(samples) >= 2 and samples[1][0] <= now - RATE_WINDOW_S:
                samples.popleft()
            base_t, base_bytes = samples[0]
            span = now - base_t
            rate_now = (self.bytes_done - base_bytes) / span if span > 0 else 0.0
            rate_avg = self.bytes_done / elapsed if elapsed > 0 else 0.0
            return Progress(
                done=self.done,
                failed=self.failed,
                total=self.total,
                bytes_done=self.bytes_done,
                bytes_total=self.bytes_total,
                rate_now=rate_now,
                rate_avg=rate_avg,
                eta_s=self._eta_s(elapsed, rate_now or rate_avg),
                elapsed_s=elapsed,
                inflight_items=self.inflight_items,
                inflight_bytes=self.inflight_bytes,
                queue_depths=dict(queue_depths),
            )

    def _eta_s(self, elapsed: float, rate: float) -> float | None:
        if self.bytes_total is not None and self.bytes_total > 0:
            left = max(0, self.bytes_total - self.bytes_done)
            if left == 0:
                return 0.0
            return left / rate if rate > 0 else None
        if self.total is not None:
            finished = self.done + self.failed
            left_items = max(0, self.total - finished)
            if left_items == 0:
                return 0.0
            return elapsed / finished * left_items if finished else None
        return None

    def summary(self, *, cancelled: bool) -> RunSummary:
        with self.lock:
            end = self.finished_at if self.finished_at is not None else time.monotonic()
            return RunSummary(
                done=self.done,
                failed=self.failed,
                bytes_done=self.bytes_done,
                seconds=end - self.started,
                cancelled=cancelled,
            )


def _known_totals(
    work: Iterable[Work], total: int | None, total_bytes: int | None
) -> tuple[int | None, int | None]:
    """Fill in the totals a sized work collection gives for free."""
    if total is None and isinstance(work, Sized):
        total = len(work)
    if total_bytes is None and isinstance(work, Sequence):
        total_bytes = sum(w.nbytes for w in work if isinstance(w, Work))
    return total, total_bytes


def _next_work(iterator: Iterator[Work]) -> Work | None:
    """The next item of the work iterable, None at its end."""
    try:
        work = next(iterator)
    except StopIteration:
        return None
    if not isinstance(work, Work):
        raise TypeError(f"the work iterable must yield Work items, got {type(work).__name__}")
    return work


# --- the threaded pipeline ---

_T = TypeVar("_T")


class _Channel(Generic[_T]):
    """A bounded FIFO between stages that can be closed (drain, then stop) or aborted (drop
    everything, stop now)."""

    def __init__(
        self,
        capacity: int,
        on_depth: Callable[[int], None],
        on_space: Callable[[], None] | None = None,
    ) -> None:
        self._capacity = capacity
        self._items: deque[_T] = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False
        self._aborted = False
        self._on_depth = on_depth
        self._on_space = on_space
        self._space_wanted = False

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def put(self, item: _T) -> bool:
        """Add ``item``, waiting while full; False if the channel was aborted."""
        with self._not_full:
            while len(self._items) >= self._capacity and not self._aborted:
                self._not_full.wait()
            if self._aborted:
                return False
            self._append(item)
            return True

    def try_put(self, item: _T) -> bool:
        """Add ``item`` if there is room; else remember to call ``on_space`` when there is."""
        with self._lock:
            if self._aborted or self._closed:
                return False
            if len(self._items) >= self._capacity:
                self._space_wanted = True
                return False
            self._append(item)
            return True

    def _append(self, item: _T) -> None:
        self._items.append(item)
        self._on_depth(len(self._items))
        self._not_empty.notify()

    def get(self) -> _T | None:
        """The next item, waiting while empty; None once closed and drained, or aborted."""
        with self._not_empty:
            while not self._items and not self._closed and not self._aborted:
                self._not_empty.wait()
            if self._aborted or not self._items:
                return None
            item = self._items.popleft()
            self._on_depth(len(self._items))
            self._not_full.notify()
            if self._space_wanted and self._on_space is not None:
                self._space_wanted = False
                self._on_space()
            return item

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            self._items.clear()
            self._on_depth(0)
            self._not_empty.notify_all()
            self._not_full.notify_all()


class _ProcessPool:
    """A process pool for one stage, replaced when one of its processes dies."""

    def __init__(self, stage: Stage) -> None:
        self._stage = stage
        methods = multiprocessing.get_all_start_methods()
        # The caller has threads, so fork is unsafe; forkserver forks from a clean process.
        self._context = multiprocessing.get_context(
            "forkserver" if "forkserver" in methods else "spawn"
        )
        self._lock = threading.Lock()
        self._closed = False
        self._futures: set[Future[Any]] = set()
        self._retired: list[ProcessPoolExecutor] = []
        self._pool = self._new()

    def _new(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self._stage.workers, mp_context=self._context)

    def call(self, fn: Callable[[Any], Any], value: Any) -> Any:
        """``fn(value)`` in a worker process; the caller's thread waits for it."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"stage {self._stage.name!r}: the process pool is shut down")
            pool = self._pool
        try:
            future = pool.submit(fn, value)
        except BrokenProcessPool:
            self._replace(pool)
            raise
        with self._lock:
            self._futures.add(future)
        try:
            return future.result()
        except BrokenProcessPool:
            # A worker process died (killed for memory, or os._exit in fn): this item fails;
            # later items get a fresh pool.
            self._replace(pool)
            raise
        finally:
            with self._lock:
                self._futures.discard(future)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._closed or self._pool is not broken:
                return
            logger.warning("stage %s: a worker process died; starting a new pool", self._stage.name)
            self._pool = self._new()
            self._retired.append(broken)

    def cancel(self) -> None:
        """Refuse new calls and cancel the calls not yet running (running ones finish)."""
        with self._lock:
            self._closed = True
            futures = list(self._futures)
        for future in futures:
            future.cancel()

    def shutdown(self) -> None:
        """Wait for the pools' processes to exit."""
        with self._lock:
            self._closed = True
            pools = [*self._retired, self._pool]
            self._retired = []
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)


class _Signal(enum.Enum):
    WAKE = "wake"  # cancel() was called
    SPACE = "space"  # the first queue has room again


@dataclass(frozen=True)
class _Crash:
    """A worker thread died of something other than a stage failure: the run must stop."""

    error: BaseException


@dataclass(eq=False)
class _Item:
    """An admitted work item on its way through the stages (owned by one thread at a time)."""

    work: Work
    value: Any
    attempts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    error: BaseException | None = None
    stage: str | None = None

    def outcome(self) -> Outcome:
        ok = self.error is None
        return Outcome(
            key=self.work.key,
            ok=ok,
            value=self.value if ok else None,
            error=self.error,
            stage=self.stage,
            attempts=dict(self.attempts),
            seconds=dict(self.seconds),
            nbytes=self.work.nbytes,
            payload=self.work.payload,
        )


_Event = _Item | _Signal | _Crash


class _Run:
    """The threads, queues and pools of one :meth:`Pipeline.run`."""

    def __init__(self, pipeline: Pipeline, tracker: _Tracker) -> None:
        self.pipeline = pipeline
        self.tracker = tracker
        self.events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self.aborted = threading.Event()
        metrics = pipeline.metrics
        stages = pipeline.stages
        self.channels: list[_Channel[_Item]] = []
        for i, stage in enumerate(stages):
            capacity = pipeline.queue_items or 2 * stage.workers
            gauge = metrics.queue_depth.labels(stage.name) if metrics is not None else None
            self.channels.append(
                _Channel(
                    capacity,
                    on_depth=gauge.set if gauge is not None else _ignore,
                    on_space=(lambda: self.events.put(_Signal.SPACE)) if i == 0 else None,
                )
            )
        self.pools: dict[int, _ProcessPool] = {}
        self.threads: list[threading.Thread] = []
        try:
            for i, stage in enumerate(stages):
                if stage.processes:
                    self.pools[i] = _ProcessPool(stage)
                for n in range(stage.workers):
                    thread = threading.Thread(
                        target=self._work,
                        args=(i,),
                        name=f"transfer-{stage.name}-{n}",
                        daemon=True,
                    )
                    thread.start()
                    self.threads.append(thread)
        except BaseException:
            self.shutdown(abort=True)
            raise

    def queue_depths(self) -> dict[str, int]:
        return {s.name: len(c) for s, c in zip(self.pipeline.stages, self.channels, strict=True)}

    def _work(self, index: int) -> None:
        try:
            self._work_loop(index)
        except BaseException as exc:  # noqa: BLE001 - a bug, or SystemExit in fn: stop the run
            self.events.put(_Crash(exc))

    def _work_loop(self, index: int) -> None:
        stage = self.pipeline.stages[index]
        metrics = self.pipeline.metrics
        inbox = self.channels[index]
        outbox = self.channels[index + 1] if index + 1 < len(self.channels) else None
        pool = self.pools.get(index)
        call = pool.call if pool is not None else _call
        on_retry = metrics._retried if metrics is not None else None
        while True:
            item = inbox.get()
            if item is None:
                return
            tried = _try_stage(stage, item.value, call, self.aborted.wait, on_retry)
            if tried is None or self.aborted.is_set():
                continue  # dropped: the run is being aborted
            item.attempts[stage.name] = tried.attempts
            item.seconds[stage.name] = tried.seconds
            if metrics is not None:
                metrics._stage_done(
                    stage.name, ok=tried.ok, seconds=tried.seconds, nbytes=item.work.nbytes
                )
            if tried.ok:
                item.value = tried.value
                if outbox is not None:
                    outbox.put(item)  # waits while the next stage is behind: back-pressure
                    continue
            else:
                item.error = tried.error
                item.stage = stage.name
            self.events.put(item)

    def shutdown(self, *, abort: bool) -> None:
        """Stop the threads and pools; with ``abort``, drop whatever is still queued."""
        if abort:
            self.aborted.set()
            for channel in self.channels:
                channel.abort()
            for pool in self.pools.values():
                pool.cancel()
        else:
            for channel in self.channels:
                channel.close()
        for thread in self.threads:
            thread.join()
        for pool in self.pools.values():
            pool.shutdown()


def _ignore(_: int) -> None:
    return None


class Pipeline:
    """Stages joined by bounded queues, under a budget of bytes in flight.

    Parameters
    ----------
    stages : sequence of Stage
        In order; names must be unique.
    max_inflight_bytes : int
        Budget of declared bytes (:attr:`Work.nbytes`) admitted and not yet delivered. An
        item larger than the budget is admitted alone, when nothing else is in flight.
    metrics : TransferMetrics, optional
        Where to count; None counts nothing.
    queue_items : int, optional
        Capacity of every queue; default twice the workers of the stage a queue feeds.

    Examples
    --------
    >>> pipeline = Pipeline(
    ...     [Stage("double", lambda x: 2 * x, workers=2), Stage("show", str)],
    ...     max_inflight_bytes=1_000,
    ... )
    >>> summary = pipeline.run([Work(f"w{i}", 100, i) for i in range(5)])
    >>> summary.done, summary.failed
    (5, 0)
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        *,
        max_inflight_bytes: int,
        metrics: TransferMetrics | None = None,
        queue_items: int | None = None,
    ) -> None:
        self.stages = tuple(_check_stages(stages))
        if max_inflight_bytes < 1:
            raise ValueError(f"max_inflight_bytes must be positive, got {max_inflight_bytes}")
        if queue_items is not None and queue_items < 1:
            raise ValueError(f"queue_items must be at least 1, got {queue_items}")
        self.max_inflight_bytes = max_inflight_bytes
        self.metrics = metrics
        self.queue_items = queue_items
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._run: _Run | None = None
        self._tracker: _Tracker | None = None
        if metrics is not None:
            metrics._declare(self.stages, max_inflight_bytes)

    def __repr__(self) -> str:
        names = ", ".join(s.name for s in self.stages)
        return f"Pipeline([{names}], max_inflight_bytes={self.max_inflight_bytes})"

    def cancel(self) -> None:
        """Stop admitting work (thread-safe). Items in flight finish and their outcomes are
        delivered; :meth:`run` then returns with ``cancelled=True``. Items never admitted get
        no outcome (a ledger-driven caller picks them up next time), and the work iterable
        is left where it stopped. Called while no run is going on, it cancels the next one."""
        self._cancelled.set()
        with self._lock:
            run = self._run
        if run is not None:
            run.events.put(_Signal.WAKE)

    def progress(self) -> Progress:
        """A snapshot of the current run, or of the last one (thread-safe)."""
        with self._lock:
            run, tracker = self._run, self._tracker
        if tracker is None:
            tracker = _Tracker(0, 0)
            tracker.finish()
        depths = (
            run.queue_depths()
            if run is not None
            else dict.fromkeys((s.name for s in self.stages), 0)
        )
        return tracker.snapshot(depths)

    def run(
        self,
        work: Iterable[Work],
        *,
        total: int | None = None,
        total_bytes: int | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        progress_interval_s: float = 0.5,
    ) -> RunSummary:
        """Put every item of ``work`` through the stages.

        Parameters
        ----------
        work : iterable of Work
            Read lazily, in this thread, as the budget allows.
        total, total_bytes : int, optional
            Items and declared bytes in ``work``, for progress; taken from ``work`` itself
            when it is a sequence.
        on_outcome : callable, optional
            Called once per admitted item, in this thread, in completion order.
        on_progress : callable, optional
            Called in this thread every ``progress_interval_s`` and once at the end.
        progress_interval_s : float
            Seconds between progress calls.

        Returns
        -------
        RunSummary

        Raises
        ------
        Exception
            Whatever ``on_outcome``, ``on_progress`` or the work iterable raised (and
            ``KeyboardInterrupt``), after the threads and processes were shut down. Stage
            errors never leave here: they are failed outcomes.
        RuntimeError
            If this pipeline is already running.
        """
        if progress_interval_s <= 0:
            raise ValueError(f"progress_interval_s must be positive, got {progress_interval_s}")
        total, total_bytes = _known_totals(work, total, total_bytes)
        tracker = _Tracker(total, total_bytes)
        with self._lock:
            if self._run is not None:
                raise RuntimeError(f"{self!r} is already running; start another Pipeline")
            self._tracker = tracker
            self._run = run = _Run(self, tracker)
        try:
            cancelled = self._drive(run, iter(work), on_outcome, on_progress, progress_interval_s)
        except BaseException:
            run.shutdown(abort=True)
            raise
        else:
            run.shutdown(abort=False)
        finally:
            tracker.finish()
            self._cancelled.clear()
            with self._lock:
                self._run = None
            if self.metrics is not None:
                self.metrics._inflight(0, 0)  # delivered, or dropped by an abort
        if on_progress is not None:
            on_progress(tracker.snapshot(run.queue_depths()))
        return tracker.summary(cancelled=cancelled)

    def _drive(
        self,
        run: _Run,
        iterator: Iterator[Work],
        on_outcome: Callable[[Outcome], None] | None,
        on_progress: Callable[[Progress], None] | None,
        interval_s: float,
    ) -> bool:
        """The caller's loop: admit work, deliver outcomes, report progress. Returns whether
        the run was cancelled."""
        tracker, metrics = run.tracker, self.metrics
        first = run.channels[0]
        pending: Work | None = None
        exhausted = False
        next_tick = time.monotonic() + interval_s if on_progress is not None else None
        while True:
            # Admit what the budget and the first queue allow.
            while not exhausted and not self._cancelled.is_set():
                if pending is None:
                    pending = _next_work(iterator)
                    if pending is None:
                        exhausted = True
                        tracker.exhausted()
                        break
                if not tracker.fits(pending, self.max_inflight_bytes):
                    break
                if not first.try_put(_Item(pending, pending.payload)):
                    break  # a SPACE signal will come
                items, nbytes = tracker.admit(pending)
                if metrics is not None:
                    metrics._inflight(items, nbytes)
                pending = None
            if (exhausted or self._cancelled.is_set()) and tracker.idle:
                return not exhausted
            timeout = None if next_tick is None else max(0.0, next_tick - time.monotonic())
            try:
                event: _Event | None = run.events.get(timeout=timeout)
            except queue.Empty:
                event = None
            while event is not None:
                if isinstance(event, _Crash):
                    raise event.error
                if isinstance(event, _Item):
                    outcome = event.outcome()
                    if on_outcome is not None:
                        on_outcome(outcome)
                    items, nbytes = tracker.deliver(outcome)
                    if metrics is not None:
                        metrics._delivered(outcome)
                        metrics._inflight(items, nbytes)
                try:
                    event = run.events.get_nowait()
                except queue.Empty:
                    event = None
            if next_tick is not None and on_progress is not None and time.monotonic() >= next_tick:
                on_progress(tracker.snapshot(run.queue_depths()))
                next_tick = time.monotonic() + interval_s


def _check_stages(stages: Sequence[Stage]) -> Sequence[Stage]:
    if not stages:
        raise ValueError("a pipeline needs at least one stage")
    names = [s.name for s in stages]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"stage names must be unique; repeated: {repeated}")
    return stages


# --- the same stages as Dask tasks ---


@dataclass(frozen=True)
class _Chained:
    """What one Dask task returns: the outcome of every stage reached, for one item."""

    ok: bool
    value: Any
    error: BaseException | None
    stage: str | None
    attempts: dict[str, int]
    seconds: dict[str, float]


def _run_chain(stages: Sequence[Stage], payload: Any) -> _Chained:
    """Run every stage on one payload, in order, with each stage's retries (a Dask task)."""
    attempts: dict[str, int] = {}
    seconds: dict[str, float] = {}
    value = payload
    for stage in stages:
        tried = _try_stage(stage, value, _call, _sleep)
        assert tried is not None  # _sleep never aborts
        attempts[stage.name] = tried.attempts
        seconds[stage.name] = tried.seconds
        if not tried.ok:
            return _Chained(False, None, _picklable(tried.error), stage.name, attempts, seconds)
        value = tried.value
    return _Chained(True, value, None, None, attempts, seconds)


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return False


def _picklable(error: BaseException | None) -> BaseException | None:
    """``error``, or a RuntimeError naming it if it cannot travel back from a worker."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - whatever pickling raises, send a stand-in
        return RuntimeError(f"{type(error).__name__}: {error} (the original did not pickle)")
    return error


def run_on_dask(
    stages: Sequence[Stage],
    work: Iterable[Work],
    *,
    scheduler: str | Client,
    max_inflight_bytes: int,
    total: int | None = None,
    total_bytes: int | None = None,
    metrics: TransferMetrics | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    progress_interval_s: float = 0.5,
) -> RunSummary:
    """Run the stages on a Dask ``distributed`` cluster, one task per work item.

    Each task runs every stage's ``fn`` in order, with the stages' retry rules, on one
    worker (``Stage.workers`` and ``Stage.processes`` are ignored: the cluster decides).
    Tasks are submitted as earlier ones complete, while their declared bytes fit in
    ``max_inflight_bytes`` (the same rule as :class:`Pipeline`, across the whole cluster).
    Outcomes and progress are delivered in this thread.

    Parameters
    ----------
    stages : sequence of Stage
        Their ``fn`` and ``retry.transient`` must pickle, and so must payloads and values.
    work : iterable of Work
        Read lazily, in this thread.
    scheduler : str or distributed.Client
        A scheduler address to connect to (the client is closed at the end), or a client
        (left open).
    max_inflight_bytes : int
        Budget of declared bytes of the tasks submitted and not yet delivered.
    total, total_bytes, metrics, on_outcome, on_progress, progress_interval_s
        As for :meth:`Pipeline.run`.

    Returns
    -------
    RunSummary
        ``cancelled`` is always False.

    Raises
    ------
    Exception
        Whatever ``on_outcome``, ``on_progress`` or the work iterable raised (and
        ``KeyboardInterrupt``), after the submitted tasks were cancelled.
    """
    from distributed import Client, as_completed

    stages = tuple(_check_stages(stages))
    if max_inflight_bytes < 1:
        raise ValueError(f"max_inflight_bytes must be positive, got {max_inflight_bytes}")
    if progress_interval_s <= 0:
        raise ValueError(f"progress_interval_s must be positive, got {progress_interval_s}")
    if metrics is not None:
        metrics._declare(stages, max_inflight_bytes)
    total, total_bytes = _known_totals(work, total, total_bytes)
    owned = isinstance(scheduler, str)
    client: Any = (
        Client(scheduler, set_as_default=False)  # type: ignore[no-untyped-call]
        if owned
        else scheduler
    )
    tracker = _Tracker(total, total_bytes)
    futures: dict[Any, Work] = {}
    completed: Any = as_completed(loop=client.loop)  # type: ignore[no-untyped-call]
    try:
        iterator = iter(work)
        pending: Work | None = None
        exhausted = False
        next_tick = time.monotonic() + progress_interval_s if on_progress is not None else None
        while True:
            while not exhausted:
                if pending is None:
                    pending = _next_work(iterator)
                    if pending is None:
                        exhausted = True
                        tracker.exhausted()
                        break
                if not tracker.fits(pending, max_inflight_bytes):
                    break
                future = client.submit(
                    _run_chain,
                    stages,
                    pending.payload,
                    key=f"transfer-{uuid.uuid4().hex}",
                    pure=False,
                )
                futures[future] = pending
                completed.add(future)
                items, nbytes = tracker.admit(pending)
                if metrics is not None:
                    metrics._inflight(items, nbytes)
                pending = None
            if exhausted and tracker.idle:
                break
            timeout = None if next_tick is None else max(0.0, next_tick - time.monotonic())
            # as_completed's own iterator polls every 100 ms and has no timeout; its condition
            # is notified after each completion, so wait on it (checked under it: no lost
            # wake-up) and take what is ready.
            with completed.thread_condition:
                if not completed.has_ready():
                    completed.thread_condition.wait(timeout)
            for future in completed.next_batch(block=False):
                done = futures.pop(future)
                outcome = _dask_outcome(future, done)
                if metrics is not None:
                    _count_stages(metrics, stages, outcome)
                if on_outcome is not None:
                    on_outcome(outcome)
                items, nbytes = tracker.deliver(outcome)
                if metrics is not None:
                    metrics._delivered(outcome)
                    metrics._inflight(items, nbytes)
            if next_tick is not None and on_progress is not None and time.monotonic() >= next_tick:
                on_progress(tracker.snapshot({}))
                next_tick = time.monotonic() + progress_interval_s
    except BaseException:
        if futures:
            with contextlib.suppress(Exception):
                client.cancel(list(futures))
        raise
    finally:
        tracker.finish()
        futures.clear()
        if owned:
            client.close()
    if on_progress is not None:
        on_progress(tracker.snapshot({}))
    return tracker.summary(cancelled=False)


def _dask_outcome(future: Any, work: Work) -> Outcome:
    """The outcome of one finished Dask task."""
    if future.status == "finished":
        chained: _Chained = future.result()
        return Outcome(
            key=work.key,
            ok=chained.ok,
            value=chained.value,
            error=chained.error,
            stage=chained.stage,
            attempts=chained.attempts,
            seconds=chained.seconds,
            nbytes=work.nbytes,
            payload=work.payload,
        )
    # The task itself failed (a worker died, a result did not deserialize) or was cancelled.
    error: BaseException
    try:
        error = future.exception() or RuntimeError(f"task {future.key} ended {future.status}")
    except BaseException as exc:  # noqa: BLE001 - a cancelled future raises CancelledError
        error = exc
    return Outcome(
        key=work.key,
        ok=False,
        value=None,
        error=error,
        stage=None,
        attempts={},
        seconds={},
        nbytes=work.nbytes,
        payload=work.payload,
    )


def _count_stages(metrics: TransferMetrics, stages: Sequence[Stage], outcome: Outcome) -> None:
    """Per-stage metrics of a Dask task, counted when its result comes back."""
    for stage in stages:
        tries = outcome.attempts.get(stage.name)
        if tries is None:
            break
        if tries > 1:
            metrics._retried(stage.name, tries - 1)
        metrics._stage_done(
            stage.name,
            ok=outcome.stage != stage.name,
            seconds=outcome.seconds.get(stage.name, 0.0),
            nbytes=outcome.nbytes,
        )
