"""``imgindex listen`` as processes: N receivers on one port, the indexer in the parent.

Receivers (:class:`~imgindex.listener.server.Listener` with ``index_in_process=False``) only
parse, log and acknowledge; each binds the same port with ``SO_REUSEPORT``, so the kernel
spreads associations over them, and each has its own log folder ``ROOT/wal/listener-<i>``.
The parent first indexes whatever earlier runs left in the logs, then follows the live logs
with a :class:`~imgindex.listener.ingest.LogIndexer` (the only writer of the tables, so
derived series and studies never race) and serves the metrics of all processes.

A receiver dies with its parent (``PR_SET_PDEATHSIG``): a killed listener leaves no orphan
holding the port. What receivers acknowledged is in their logs, indexed on the next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import signal
import socket
import time
from typing import TYPE_CHECKING

from imgindex.listener.ingest import LogIndexer

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable
    from multiprocessing.synchronize import Event as MpEvent

    from imgindex.listener.metrics import ListenerMetrics
    from imgindex.listener.server import ListenerConfig

__all__ = ["serve"]

logger = logging.getLogger("imgindex.listener")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _receiver_main(
    config: ListenerConfig, ready: mp.Queue[tuple[str, int | str]], stop: MpEvent, level: int
) -> None:
    """A receiving process: serve until the parent says stop."""
    _die_with_parent()
    # Ctrl-C reaches the whole process group; the parent decides when receivers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("imgindex.listener").setLevel(level)
    from imgindex.listener.server import Listener

    try:
        listener = Listener(config)
        port = listener.start()
    except Exception as exc:
        ready.put((config.wal_name, f"{type(exc).__name__}: {exc}"))
        raise
    ready.put((config.wal_name, port))
    parent = os.getppid()
    while not stop.wait(0.5):
        if os.getppid() != parent:
            break
    listener.stop()


def serve(
    config: ListenerConfig,
    workers: int,
    stop: threading.Event,
    on_ready: Callable[[int], None],
    metrics: ListenerMetrics | None = None,
) -> None:
    """Recover, start ``workers`` receivers, index until ``stop`` is set, then drain.

    ``on_ready`` is called with the port once every receiver accepts associations.
    """
    indexer = LogIndexer(config.root, attributes=config.attributes, sync=config.sync)
    recovered = indexer.drain()
    if recovered:
        logger.warning("recovered %d logged instances into the index", recovered)

    # Reserve the port (port 0 picks one) so all receivers bind the same; SO_REUSEPORT lets
    # them, and the reservation never listens, so it takes no connections.
    reservation = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reservation.bind((config.bind, config.port))
    port = reservation.getsockname()[1]

    context = mp.get_context("spawn")
    ready: mp.Queue[tuple[str, int | str]] = context.Queue()
    child_stop = context.Event()
    names = [f"listener-{i}" for i in range(workers)]
    level = logging.getLogger("imgindex.listener").getEffectiveLevel()
    children = []
    for name in names:
        child_config = dataclasses.replace(
            config,
            port=port,
            reuse_port=True,
            wal_name=name,
            index_in_process=False,
            metrics_port=None,
        )
        child = context.Process(
            target=_receiver_main, args=(child_config, ready, child_stop, level), name=name
        )
        child.start()
        children.append(child)
    try:
        started = 0
        deadline = time.monotonic() + 120
        while started < workers:
            try:
                name, answer = ready.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError("receivers did not start within 120 s") from None
            if isinstance(answer, int):
                started += 1
                continue
            raise RuntimeError(f"receiver {name} failed to start: {answer}")
        reservation.close()
        indexer.live = set(names)
        indexer.metrics = metrics
        on_ready(port)
        indexer.run(stop, config.flush_interval)
    finally:
        reservation.close()
        child_stop.set()
        for child in children:
            child.join(timeout=60)
            if child.is_alive():
                logger.error("receiver %s did not stop; killing it", child.name)
                child.kill()
                child.join()
            if child.pid is not None:
                _mark_dead(child.pid)
        indexer.drain()


def _mark_dead(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
