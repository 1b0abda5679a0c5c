"""storage.transfer: every item comes out once, failures stay with their item, transient
errors are retried, the byte budget and the queues bound what is in flight, callbacks run in
the caller's thread, and nothing (threads, processes) outlives a run."""

from __future__ import annotations

import functools
import multiprocessing
import operator
import os
import pickle
import random
import signal
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client import CollectorRegistry

from storage import (
    Outcome,
    Pipeline,
    Progress,
    Retry,
    Stage,
    TransferMetrics,
    Work,
    run_on_dask,
)
from storage.transfer import _backoff_s

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import distributed

#: Back-off short enough for tests.
FAST = Retry(attempts=3, first_delay_s=0.001, max_delay_s=0.002)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every run joins its threads and processes before returning (or raising)."""
    if "cluster" in request.fixturenames:  # the cluster's own threads live for the module
        yield
        return
    # Compare identities, not counts: threads that were already running (other libraries'
    # daemons) may end during the test, which a count would mistake for a leak.
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before]
    assert leaked == []
    assert multiprocessing.active_children() == []


def _works(n: int, nbytes: int = 10) -> list[Work]:
    return [Work(f"k{i}", nbytes, i) for i in range(n)]


class Held:
    """Declared bytes from the first stage's start until delivery, and their peak."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.items = 0

    def enter(self, nbytes: int) -> int:
        with self.lock:
            self.now += nbytes
            self.items += 1
            self.peak = max(self.peak, self.now)
            return self.now

    def leave(self, nbytes: int) -> None:
        with self.lock:
            self.now -= nbytes
            self.items -= 1


def _into(outcomes: dict[str, Outcome]) -> Callable[[Outcome], None]:
    """An on_outcome that files each outcome under its key, checking it comes once."""

    def on_outcome(outcome: Outcome) -> None:
        assert outcome.key not in outcomes, f"{outcome.key} delivered twice"
        outcomes[outcome.key] = outcome

    return on_outcome


# Process stages call standard-library callables (operator.call on a zero-argument payload):
# they pickle by name, and the worker processes start without importing this module and,
# through it, pyarrow (about a second of CPU each on a small machine).


def _in_process(key: str, call: Callable[[], Any]) -> Work:
    return Work(key, 10, call)


def _sleep_a_little(x: int) -> int:
    time.sleep(0.05)
    return x


# --- ordering, failures, retries ---


def test_every_item_comes_out_once_whatever_the_order() -> None:
    caller = threading.get_ident()
    callers: set[int] = set()
    outcomes: list[Outcome] = []

    def jitter(x: int) -> int:
        time.sleep(random.uniform(0, 0.005))
        return x * 10

    def on_outcome(outcome: Outcome) -> None:
        callers.add(threading.get_ident())
        outcomes.append(outcome)

    pipeline = Pipeline(
        [Stage("times10", jitter, workers=3), Stage("plus1", lambda x: x + 1, workers=2)],
        max_inflight_bytes=1_000,
    )
    summary = pipeline.run(_works(60), on_outcome=on_outcome)

    assert sorted(o.key for o in outcomes) == sorted(f"k{i}" for i in range(60))
    assert all(o.ok and o.error is None and o.stage is None for o in outcomes)
    assert {o.key: o.value for o in outcomes} == {f"k{i}": i * 10 + 1 for i in range(60)}
    assert all(o.attempts == {"times10": 1, "plus1": 1} for o in outcomes)
    assert all(set(o.seconds) == {"times10", "plus1"} for o in outcomes)
    assert callers == {caller}, "on_outcome must run in the caller's thread"
    assert (summary.done, summary.failed, summary.bytes_done) == (60, 0, 600)
    assert not summary.cancelled


def test_a_failing_item_fails_alone_at_its_stage() -> None:
    reached: list[int] = []

    def check(x: int) -> int:
        if x == 4:
            raise ValueError("item 4 is malformed")
        return x

    pipeline = Pipeline(
        [
            Stage("fetch", lambda x: x),
            Stage("check", check, workers=2),
            Stage("write", reached.append),
        ],
        max_inflight_bytes=100,
    )
    outcomes: dict[str, Outcome] = {}
    summary = pipeline.run(_works(10), on_outcome=_into(outcomes))

    bad = outcomes.pop("k4")
    assert not bad.ok
    assert bad.stage == "check"
    assert isinstance(bad.error, ValueError)
    assert str(bad.error) == "item 4 is malformed"
    assert bad.value is None
    assert (bad.payload, bad.nbytes) == (4, 10), "the caller must learn what failed"
    assert bad.attempts == {"fetch": 1, "check": 1}, "later stages are not reached"
    assert all(o.ok for o in outcomes.values())
    assert sorted(reached) == [i for i in range(10) if i != 4]
    assert (summary.done, summary.failed, summary.bytes_done) == (9, 1, 100)


def test_transient_errors_are_retried_until_success() -> None:
    calls: dict[int, int] = {}
    lock = threading.Lock()

    def flaky(x: int) -> int:
        with lock:
            calls[x] = calls.get(x, 0) + 1
            n = calls[x]
        if x == 1 and n < 3:
            raise ConnectionResetError("peer restarted")
        if x == 2 and n < 2:
            raise TimeoutError("read timed out")
        return x

    metrics = TransferMetrics("t", CollectorRegistry())
    pipeline = Pipeline(
        [Stage("fetch", flaky, workers=2, retry=FAST)], max_inflight_bytes=100, metrics=metrics
    )
    outcomes: dict[str, Outcome] = {}
    pipeline.run(_works(4), on_outcome=_into(outcomes))

    assert all(o.ok for o in outcomes.values())
    assert {k: o.attempts["fetch"] for k, o in outcomes.items()} == {
        "k0": 1,
        "k1": 3,
        "k2": 2,
        "k3": 1,
    }
    sample = metrics.registry.get_sample_value
    assert sample("t_retries_total", {"stage": "fetch"}) == 3
    assert sample("t_stage_items_total", {"stage": "fetch", "outcome": "retried"}) == 3
    assert sample("t_stage_items_total", {"stage": "fetch", "outcome": "ok"}) == 4


def test_permanent_errors_fail_at_once_and_transient_ones_after_the_last_attempt() -> None:
    def fail(x: int) -> int:
        if x == 0:
            raise FileNotFoundError("/data/missing.dcm")
        if x == 1:
            raise ValueError("not DICOM")
        raise ConnectionRefusedError("server down")

    pipeline = Pipeline([Stage("fetch", fail, retry=FAST)], max_inflight_bytes=100)
    outcomes: dict[str, Outcome] = {}
    summary = pipeline.run(_works(3), on_outcome=_into(outcomes))

    assert summary.failed == 3
    assert isinstance(outcomes["k0"].error, FileNotFoundError)
    assert outcomes["k0"].attempts == {"fetch": 1}
    assert isinstance(outcomes["k1"].error, ValueError)
    assert outcomes["k1"].attempts == {"fetch": 1}
    assert isinstance(outcomes["k2"].error, ConnectionRefusedError)
    assert outcomes["k2"].attempts == {"fetch": 3}, "transient: every attempt is used"


def test_no_retry_means_one_attempt() -> None:
    pipeline = Pipeline([Stage("fetch", _raise_oserror)], max_inflight_bytes=10)
    outcomes: list[Outcome] = []
    pipeline.run(_works(1), on_outcome=outcomes.append)
    assert [o.attempts for o in outcomes] == [{"fetch": 1}]


def _raise_oserror(x: int) -> int:
    raise OSError("disk hiccup")


def test_default_transient_predicate_and_pickling() -> None:
    transient = Retry().transient
    assert transient(OSError("EIO"))
    assert transient(TimeoutError())
    assert transient(ConnectionResetError())
    assert not transient(FileNotFoundError())
    assert not transient(PermissionError())
    assert not transient(IsADirectoryError())
    assert not transient(ValueError())
    assert not transient(BrokenProcessPool())
    # run_on_dask ships retries to workers.
    assert pickle.loads(pickle.dumps(Retry(attempts=5))) == Retry(attempts=5)


def test_backoff_doubles_up_to_the_cap_with_full_jitter() -> None:
    retry = Retry(attempts=10, first_delay_s=0.5, max_delay_s=3.0)
    for n, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (9, 3.0)]:
        delays = [_backoff_s(retry, n) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2, "jitter spreads over the whole interval"


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="attempts"):
        Retry(attempts=0)
    with pytest.raises(ValueError, match="workers"):
        Stage("s", str, workers=0)
    with pytest.raises(ValueError, match="nbytes"):
        Work("k", -1, None)
    with pytest.raises(ValueError, match="at least one stage"):
        Pipeline([], max_inflight_bytes=1)
    with pytest.raises(ValueError, match="unique"):
        Pipeline([Stage("s", str), Stage("s", str)], max_inflight_bytes=1)
    with pytest.raises(ValueError, match="max_inflight_bytes"):
        Pipeline([Stage("s", str)], max_inflight_bytes=0)
    pipeline = Pipeline([Stage("s", str)], max_inflight_bytes=10)
    with pytest.raises(TypeError, match="Work items"):
        pipeline.run([Work("k", 1, 1), "not work"])  # type: ignore[list-item]


# --- budget and back-pressure ---


def test_declared_bytes_in_flight_never_exceed_the_budget() -> None:
    budget = 100
    held = Held()
    rng = random.Random(7)
    works = [Work(f"k{i}", rng.randint(5, 45), i) for i in range(80)]
    sizes = {w.key: w.nbytes for w in works}
    snapshots: list[Progress] = []

    def first(w: tuple[str, int]) -> tuple[str, int]:
        held.enter(sizes[w[0]])
        time.sleep(rng.uniform(0, 0.003))
        return w

    def second(w: tuple[str, int]) -> tuple[str, int]:
        time.sleep(0.002)
        return w

    def on_outcome(outcome: Outcome) -> None:
        held.leave(outcome.nbytes)

    pipeline = Pipeline(
        [Stage("fetch", first, workers=6), Stage("write", second, workers=6)],
        max_inflight_bytes=budget,
    )
    keyed = [Work(w.key, w.nbytes, (w.key, w.payload)) for w in works]
    summary = pipeline.run(
        keyed, on_outcome=on_outcome, on_progress=snapshots.append, progress_interval_s=0.01
    )

    assert summary.done == 80
    assert held.peak <= budget
    assert held.peak > budget // 2, "the budget, not the workers, should be what limits"
    assert snapshots, "progress is reported during the run"
    assert all(s.inflight_bytes <= budget for s in snapshots)


def test_an_item_larger_than_the_budget_runs_alone() -> None:
    held = Held()
    seen_with_big: list[tuple[int, int]] = []
    works = [Work("a", 30, 30), Work("b", 30, 30), Work("huge", 250, 250), Work("c", 30, 30)]

    def fetch(nbytes: int) -> int:
        now = held.enter(nbytes)
        if nbytes == 250:
            seen_with_big.append((now, held.items))
        time.sleep(0.01)
        return nbytes

    pipeline = Pipeline([Stage("fetch", fetch, workers=4)], max_inflight_bytes=100)
    outcomes: list[Outcome] = []

    def on_outcome(outcome: Outcome) -> None:
        held.leave(outcome.nbytes)
        outcomes.append(outcome)

    summary = pipeline.run(works, on_outcome=on_outcome)

    assert summary.done == 4, "an over-budget item must not deadlock the run"
    assert seen_with_big == [(250, 1)], "nothing else may be in flight beside it"
    assert held.peak == 250


def test_a_slow_last_stage_holds_back_reading_the_work() -> None:
    pulled = 0
    delivered = 0
    ahead: list[int] = []
    depths: list[dict[str, int]] = []

    def work() -> Iterator[Work]:
        nonlocal pulled
        for w in _works(40, nbytes=1):
            pulled += 1
            ahead.append(pulled - delivered)
            yield w

    def on_outcome(outcome: Outcome) -> None:
        nonlocal delivered
        delivered += 1

    pipeline = Pipeline(
        [
            Stage("read", lambda x: x, workers=2),
            Stage("write", lambda x: _record_depths(pipeline, depths, x), workers=1),
        ],
        max_inflight_bytes=10**9,  # no budget pressure: only the queues hold it back
    )
    summary = pipeline.run(work(), on_outcome=on_outcome)

    assert summary.done == 40
    # queue before read (4) + read workers (2) + queue before write (2) + writer (1),
    # + one outcome on its way back + the item just read.
    assert max(ahead) <= 4 + 2 + 2 + 1 + 1 + 1
    assert max(d["write"] for d in depths) == 2, "the queue before the slow stage fills up"
    assert all(d["read"] <= 4 for d in depths)


def _record_depths(pipeline: Pipeline, depths: list[dict[str, int]], x: int) -> int:
    time.sleep(0.01)
    depths.append(dict(pipeline.progress().queue_depths))
    return x


# --- processes ---


def test_a_process_stage_runs_elsewhere_and_reports_its_errors() -> None:
    works = [_in_process(f"k{i}", os.getpid) for i in range(5)]
    works.append(_in_process("bad", functools.partial(int, "not a number")))
    pipeline = Pipeline(
        [Stage("decode", operator.call, workers=2, processes=True), Stage("keep", lambda v: v)],
        max_inflight_bytes=100,
    )
    outcomes: dict[str, Outcome] = {}
    summary = pipeline.run(works, on_outcome=_into(outcomes))

    assert (summary.done, summary.failed) == (5, 1)
    pids = {outcomes[f"k{i}"].value for i in range(5)}
    assert all(isinstance(pid, int) for pid in pids)
    assert os.getpid() not in pids
    assert 1 <= len(pids) <= 2
    bad = outcomes["bad"]
    assert bad.stage == "decode"
    assert isinstance(bad.error, ValueError), "the exception comes back from the process"
    assert "not a number" in str(bad.error)
    assert bad.attempts == {"decode": 1}


def test_a_dying_worker_process_fails_only_its_item() -> None:
    works = [_in_process(f"k{i}", functools.partial(abs, -i)) for i in range(5)]
    # The worker process dies, as when the OOM killer takes it.
    works[2] = _in_process("k2", functools.partial(os._exit, 3))
    pipeline = Pipeline(
        [Stage("decode", operator.call, workers=1, processes=True)], max_inflight_bytes=100
    )
    outcomes: dict[str, Outcome] = {}
    summary = pipeline.run(works, on_outcome=_into(outcomes))

    assert (summary.done, summary.failed) == (4, 1)
    assert isinstance(outcomes["k2"].error, BrokenProcessPool)
    assert [outcomes[k].value for k in ("k0", "k1", "k3", "k4")] == [0, 1, 3, 4], (
        "a new pool takes over"
    )


# --- cancelling and aborting ---


def test_cancel_stops_admitting_and_delivers_what_is_in_flight() -> None:
    started: list[str] = []
    lock = threading.Lock()
    pulled = 0

    def work() -> Iterator[Work]:
        nonlocal pulled
        for w in _works(200):
            pulled += 1
            yield w

    def fetch(key: str) -> str:
        with lock:
            started.append(key)
        if key == "k5":
            pipeline.cancel()  # from a worker thread: cancel() is thread-safe
        time.sleep(0.005)
        return key

    pipeline = Pipeline([Stage("fetch", fetch, workers=2)], max_inflight_bytes=40)
    outcomes: list[Outcome] = []
    summary = pipeline.run(
        (Work(w.key, w.nbytes, w.key) for w in work()), on_outcome=outcomes.append
    )

    assert summary.cancelled
    assert pulled < 200, "the work iterable is not read to its end"
    delivered = [o.key for o in outcomes]
    assert sorted(delivered) == sorted(set(started)), "every admitted item is delivered once"
    assert len(delivered) == len(set(delivered))
    assert summary.done == len(delivered)
    assert all(o.ok for o in outcomes), "cancelling lets in-flight items finish"

    # The next run is not cancelled.
    again = pipeline.run(_works(3))
    assert (again.done, again.cancelled) == (3, False)


def test_cancel_before_run_cancels_that_run() -> None:
    pipeline = Pipeline([Stage("s", str)], max_inflight_bytes=10)
    pipeline.cancel()
    summary = pipeline.run(_works(5))
    assert (summary.done, summary.cancelled) == (0, True)


def test_an_error_in_on_outcome_stops_everything_and_is_raised() -> None:
    calls = 0
    lock = threading.Lock()

    def count(x: int) -> int:
        nonlocal calls
        with lock:
            calls += 1
        return x

    def on_outcome(outcome: Outcome) -> None:
        raise RuntimeError("ledger is full")

    pipeline = Pipeline(
        [Stage("count", count, workers=2), Stage("decode", operator.call, processes=True)],
        max_inflight_bytes=50,
    )
    nap = functools.partial(time.sleep, 0.05)
    with pytest.raises(RuntimeError, match="ledger is full"):
        pipeline.run([_in_process(f"k{i}", nap) for i in range(100)], on_outcome=on_outcome)
    assert calls < 100, "queued work is dropped, not finished"
    # no_leaks checks that the threads and the process pool are gone.


def test_keyboard_interrupt_shuts_down_and_propagates() -> None:
    assert threading.current_thread() is threading.main_thread(), "SIGINT goes to main"
    main = threading.main_thread().ident
    assert main is not None
    calls = 0

    def fetch(x: int) -> int:
        nonlocal calls
        calls += 1
        if x == 2:
            # run() is blocked waiting for this very item: Ctrl-C lands inside it.
            signal.pthread_kill(main, signal.SIGINT)
            time.sleep(0.05)
        return x

    pipeline = Pipeline([Stage("fetch", fetch)], max_inflight_bytes=10)
    # Python's own Ctrl-C handler, whatever an earlier test in this process installed (the
    # listener's supervisor ignores SIGINT, for one).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            pipeline.run(_works(1000))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert calls < 10


def test_the_caller_waits_without_spinning() -> None:
    # While a stage works, run() sleeps on its event queue: its thread uses next to no CPU.
    def slow(x: int) -> int:
        time.sleep(0.3)
        return x

    pipeline = Pipeline([Stage("slow", slow)], max_inflight_bytes=10)
    before = time.thread_time()
    pipeline.run(_works(1), on_progress=lambda p: None, progress_interval_s=0.05)
    assert time.thread_time() - before < 0.1


# --- metrics and progress ---


def test_metrics_count_items_bytes_and_stages() -> None:
    registry = CollectorRegistry()
    metrics = TransferMetrics("export", registry)
    attempts: dict[int, int] = {}

    def fetch(x: int) -> int:
        attempts[x] = attempts.get(x, 0) + 1
        if x == 0 and attempts[x] == 1:
            raise OSError("EAGAIN")
        return x

    def write(x: int) -> int:
        if x == 1:
            raise ValueError("bad geometry")
        return x

    pipeline = Pipeline(
        [Stage("fetch", fetch, retry=FAST), Stage("write", write)],
        max_inflight_bytes=1_000,
        metrics=metrics,
    )
    pipeline.run(_works(5, nbytes=100))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(f"export_{name}", labels)

    assert value("items_total", outcome="ok") == 4
    assert value("items_total", outcome="failed") == 1
    assert value("bytes_total", outcome="ok") == 400
    assert value("bytes_total", outcome="failed") == 100
    assert value("stage_items_total", stage="fetch", outcome="ok") == 5
    assert value("stage_items_total", stage="fetch", outcome="retried") == 1
    assert value("stage_items_total", stage="write", outcome="ok") == 4
    assert value("stage_items_total", stage="write", outcome="failed") == 1
    assert value("stage_bytes_total", stage="fetch") == 500
    assert value("stage_bytes_total", stage="write") == 500
    assert value("stage_seconds_count", stage="write") == 5
    assert value("retries_total", stage="fetch") == 1
    assert value("retries_total", stage="write") == 0
    assert value("budget_bytes") == 1_000
    assert value("inflight_bytes") == 0
    assert value("inflight_items") == 0
    assert value("queue_depth", stage="write") == 0


def test_progress_snapshots_in_the_callers_thread() -> None:
    caller = threading.get_ident()
    snapshots: list[tuple[int, Progress]] = []
    from_workers: list[Progress] = []
    pipeline: Pipeline

    def fetch(x: int) -> int:
        time.sleep(0.01)
        if x == 3:
            from_workers.append(pipeline.progress())
        return x

    pipeline = Pipeline([Stage("fetch", fetch, workers=2)], max_inflight_bytes=40)
    summary = pipeline.run(
        (w for w in _works(30)),
        total=30,
        total_bytes=300,
        on_progress=lambda p: snapshots.append((threading.get_ident(), p)),
        progress_interval_s=0.02,
    )

    assert {ident for ident, _ in snapshots} == {caller}
    progress = [p for _, p in snapshots]
    final = progress[-1]
    assert (final.done, final.failed, final.total) == (30, 0, 30)
    assert (final.bytes_done, final.bytes_total) == (300, 300)
    assert final.rate_avg > 0
    assert final.rate_now > 0
    assert final.eta_s == 0.0
    assert (final.inflight_items, final.inflight_bytes) == (0, 0)
    assert final.elapsed_s == pytest.approx(summary.seconds)
    midway = [p for p in progress if 0 < p.done < 30]
    assert midway, "snapshots come during the run, not just at its end"
    assert all(p.eta_s is not None and p.eta_s > 0 for p in midway)
    assert [p.elapsed_s for p in progress] == sorted(p.elapsed_s for p in progress)
    assert from_workers[0].inflight_items >= 1, "progress() is safe from other threads"
    assert pipeline.progress() == final, "after the run, progress() keeps its last state"


def test_totals_are_learned_from_the_work() -> None:
    pipeline = Pipeline([Stage("s", str)], max_inflight_bytes=100)
    seen: list[Progress] = []
    pipeline.run(_works(4), on_progress=seen.append)  # a list: its length is known
    assert (seen[-1].total, seen[-1].bytes_total) == (4, 40)
    seen.clear()
    pipeline.run(iter(_works(3)), on_progress=seen.append)  # counted when exhausted
    assert (seen[-1].total, seen[-1].bytes_total) == (3, 30)


# --- Dask ---


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[distributed.LocalCluster]:
    import distributed

    with distributed.LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        scheduler_port=0,
        # The scheduler serves HTTP (health, metrics) even without its dashboard: on
        # loopback and a free port, not on every interface at 8787 (where two of these
        # clusters at once collide).
        dashboard_address="127.0.0.1:0",
        scheduler_kwargs={"dashboard": False},
        local_directory=str(tmp_path_factory.mktemp("dask")),
    ) as local:
        yield local


# Dask pickles tasks even for an in-process cluster: the workers' shared state is global.
_DASK_HELD = Held()
_DASK_TRIES: dict[str, int] = {}


def _dask_fetch(key: str) -> str:
    _DASK_TRIES[key] = _DASK_TRIES.get(key, 0) + 1
    if _DASK_TRIES[key] == 1:
        _DASK_HELD.enter(10)
        if key == "k2":
            raise ConnectionResetError("dropped")
    time.sleep(0.01)
    return key


def _dask_write(key: str) -> str:
    if key == "k5":
        raise ValueError("k5 does not fit")
    return key.upper()


def test_run_on_dask_delivers_every_outcome_under_the_budget(
    cluster: distributed.LocalCluster,
) -> None:
    caller = threading.get_ident()
    callers: set[int] = set()
    outcomes: dict[str, Outcome] = {}
    snapshots: list[Progress] = []
    clients_before = _clients(cluster)

    def on_outcome(outcome: Outcome) -> None:
        callers.add(threading.get_ident())
        _DASK_HELD.leave(outcome.nbytes)
        outcomes[outcome.key] = outcome

    metrics = TransferMetrics("d", CollectorRegistry())
    stages = [Stage("fetch", _dask_fetch, retry=FAST), Stage("write", _dask_write)]
    work = [Work(f"k{i}", 10, f"k{i}") for i in range(12)]
    summary = run_on_dask(
        stages,
        work,
        scheduler=cluster.scheduler_address,  # connects, and closes its client at the end
        max_inflight_bytes=30,
        metrics=metrics,
        on_outcome=on_outcome,
        on_progress=snapshots.append,
        progress_interval_s=0.01,
    )

    assert (summary.done, summary.failed, summary.bytes_done) == (11, 1, 120)
    assert sorted(outcomes) == sorted(w.key for w in work)
    assert outcomes["k0"].value == "K0"
    assert outcomes["k2"].ok
    assert outcomes["k2"].attempts == {"fetch": 2, "write": 1}
    assert not outcomes["k5"].ok
    assert outcomes["k5"].stage == "write"
    assert isinstance(outcomes["k5"].error, ValueError)
    assert outcomes["k5"].payload == "k5"
    assert callers == {caller}
    assert _DASK_HELD.peak <= 30
    assert _DASK_HELD.peak > 10, "tasks ran side by side"
    final = snapshots[-1]
    assert (final.done, final.failed, final.total, final.eta_s) == (11, 1, 12, 0.0)
    sample = metrics.registry.get_sample_value
    assert sample("d_retries_total", {"stage": "fetch"}) == 1
    assert sample("d_stage_items_total", {"stage": "write", "outcome": "failed"}) == 1
    assert sample("d_items_total", {"outcome": "ok"}) == 11
    _wait_for(lambda: _clients(cluster) == clients_before, "client closed")


def test_run_on_dask_leaves_a_given_client_open(cluster: distributed.LocalCluster) -> None:
    import distributed

    with distributed.Client(cluster, set_as_default=False) as client:  # type: ignore[no-untyped-call]
        summary = run_on_dask(
            [Stage("double", lambda x: 2 * x)],
            _works(3),
            scheduler=client,
            max_inflight_bytes=10,
        )
        assert (summary.done, summary.failed) == (3, 0)
        assert client.status == "running"


def test_run_on_dask_cancels_its_tasks_when_on_outcome_raises(
    cluster: distributed.LocalCluster,
) -> None:
    def on_outcome(outcome: Outcome) -> None:
        raise RuntimeError("ledger is full")

    with pytest.raises(RuntimeError, match="ledger is full"):
        run_on_dask(
            [Stage("nap", _sleep_a_little)],
            _works(50),
            scheduler=cluster.scheduler_address,
            max_inflight_bytes=40,
            on_outcome=on_outcome,
        )
    assert cluster.scheduler is not None
    scheduler = cluster.scheduler
    _wait_for(lambda: not scheduler.tasks, "the scheduler forgets the cancelled tasks")


def _clients(cluster: distributed.LocalCluster) -> int:
    """Clients connected to the (in-process) scheduler."""
    assert cluster.scheduler is not None
    return len(cluster.scheduler.clients)


def _wait_for(condition: Any, what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.01)
