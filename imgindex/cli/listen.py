"""``imgindex listen --root ROOT``: receive DICOM over the network, store and index it."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgindex.cli._common import add_root, settings_from
from imgindex.config import SETTINGS_HELP
from imgindex.errors import ConfigError

if TYPE_CHECKING:
    import argparse

_SYNC_HELP = (
    "'full' (default): answer success only after the instance is fsynced to the write-ahead "
    "log, so nothing acknowledged is lost, even in a power cut. 'none': answer once the bytes "
    "are in the log file, without fsync: faster, survives a killed listener but NOT a power "
    "cut or OS crash, which can lose the last seconds of acknowledged instances"
)


def add_parser(sub: Any) -> None:
    """Register the subcommand."""
    parser = sub.add_parser(
        "listen",
        help="receive DICOM (C-STORE), store it under ROOT/objects and index it",
        description="A DICOM Storage SCP. Accepts C-ECHO and C-STORE of every storage SOP "
        "class in every transfer syntax offered, stores each instance as received (no "
        "re-encoding) under ROOT/objects/STUDY/SERIES/SOP.dcm, and indexes its header; rows "
        "are visible to `imgindex sql` within about --flush-interval seconds. Instances that "
        "do not decode or lack a required UID are answered 0xC210, kept under "
        "ROOT/quarantine and recorded in the rejects table. Stop with SIGTERM or Ctrl-C: "
        "in-flight instances finish and everything is flushed.",
    )
    add_root(parser)
    parser.add_argument("--port", type=int, default=11112, help="TCP port (default 11112)")
    parser.add_argument(
        "--bind",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for all interfaces)",
    )
    parser.add_argument("--aet", default="IMGINDEX", help="our AE title (default IMGINDEX)")
    parser.add_argument(
        "--allow-aet",
        default=None,
        metavar="AET,...",
        help="accept associations only from these calling AE titles (default: any)",
    )
    parser.add_argument(
        "--sync", choices=("full", "none"), default="full", help=_SYNC_HELP + " (default full)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="receiving processes sharing the port (default 1); the indexer runs in the "
        "main process. 2 or more helps when many associations send at once",
    )
    parser.add_argument(
        "--flush-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between index commits (default 1.0)",
    )
    parser.add_argument(
        "--max-pdu",
        type=int,
        default=4 << 20,
        metavar="BYTES",
        help="largest PDU we accept; senders split data into PDUs of at most this "
        "(default 4194304)",
    )
    parser.add_argument(
        "--max-associations",
        type=int,
        default=64,
        help="associations open at once; more are rejected as transient (default 64)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="abort an association that sends nothing for this long (default 60)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on http://BIND:PORT/metrics (default: off)",
    )
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate: use TLS")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key for TLS")
    parser.add_argument(
        "--tls-ca",
        type=Path,
        default=None,
        help="PEM CA bundle: require client certificates signed by it",
    )
    parser.add_argument(
        "--attributes", default=None, metavar="KEYWORD,...", help=SETTINGS_HELP["extra_attributes"]
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT, then flush and return 0."""
    settings = settings_from(args, {"extra_attributes": args.attributes})
    if "prometheus_client" not in sys.modules:
        _multiprocess_metrics(settings.root)
    from imgindex.listener import ListenerConfig
    from imgindex.listener.metrics import ListenerMetrics
    from imgindex.listener.supervisor import serve

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    allow = (
        frozenset(a.strip() for a in args.allow_aet.split(",") if a.strip())
        if args.allow_aet
        else None
    )
    config = ListenerConfig(
        root=settings.root,
        port=args.port,
        bind=args.bind,
        ae_title=args.aet,
        allow_aets=allow,
        sync=args.sync == "full",
        flush_interval=args.flush_interval,
        max_pdu=args.max_pdu,
        max_associations=args.max_associations,
        idle_timeout=args.idle_timeout,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        metrics_port=args.metrics_port,
        attributes=settings.attributes,
    )
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {args.workers}")
    # A server reports what it does: associations and their throughput at INFO.
    log = logging.getLogger("imgindex.listener")
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        print(f"imgindex listen: {signal.Signals(signum).name}, stopping", file=sys.stderr)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    metrics = ListenerMetrics()
    metrics_port: int | None = None

    def on_ready(port: int) -> None:
        nonlocal metrics_port
        if config.metrics_port is not None:
            metrics_port = metrics.serve(config.metrics_port, config.bind)
        shown = f", metrics on :{metrics_port}" if metrics_port else ""
        tls = " over TLS" if config.tls_cert else ""
        print(
            f"imgindex listen: listening on {config.bind}:{port} as {config.ae_title}{tls} "
            f"(sync={args.sync}, workers={args.workers}, root={settings.root}{shown})",
            file=sys.stderr,
            flush=True,
        )

    try:
        serve(config, args.workers, stop, on_ready, metrics)
    finally:
        metrics.close()
    print("imgindex listen: stopped; everything acknowledged is indexed", file=sys.stderr)
    return 0


def _multiprocess_metrics(root: Path) -> None:
    """Counters of all processes in one place: prometheus_client's multiprocess mode, which
    must be chosen before prometheus_client is first imported."""
    folder = root.absolute() / "run" / f"metrics-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
