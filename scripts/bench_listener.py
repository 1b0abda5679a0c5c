"""Benchmark receiving over DICOM C-STORE: DCMTK's storescp against ``imgindex listen``.

Usage::

    python scripts/bench_listener.py [--ct-series 20] [--ct-slices 120] [--small 6000]
        [--associations 1,4] [--receivers storescp,full,none] [--repeat 1]
        [--data DIR] [--work DIR] [--keep] [--timeout 600]

DCMTK's ``storescu`` sends the same generated data to each receiver, over 1 association and
over several concurrent ones (one ``storescu`` process per association, each sending whole
series: a contiguous share of about ``1/N`` of the files; with fewer series than
associations, a contiguous share of the files instead):

* ``ct``: ``--ct-series`` uncompressed CT series of ``--ct-slices`` slices of 512x512
  (:func:`imgindex.testing.write_ct_series`, series ``i`` with seed ``i``; 528 KB a file);
* ``small``: ``--small`` small instances, CT slices of 32x32 (about 5 KB a file) in series of
  :data:`SMALL_SERIES_SIZE`.

Receivers, each into a fresh empty folder under ``--work`` and stopped (SIGTERM) after each
case:

* ``storescp``: DCMTK's ``storescp -od OUT +xa PORT`` (the reference; ``--fork`` added for more
  than one association, as it serves one association at a time otherwise). It does not fsync;
* ``full``: ``imgindex listen --root ROOT --bind 127.0.0.1 --port 0 --sync full``
  (acknowledges after fsync);
* ``none``: the same with ``--sync none``.

imgindex runs with its default settings (``IMGINDEX_*`` variables are removed from its
environment); rows become visible once per ``--flush-interval`` (default 1 s).

The time counted is the wall time from starting the ``storescu`` processes until all of them
have exited with status 0 (every C-STORE acknowledged). For imgindex, the script then polls the
index every 0.1 s and reports how many more seconds pass until every instance is a row of
``instances``. Every case is checked: storescp must have written one file per instance sent,
imgindex must hold one row per instance sent. Every DCMTK process runs with ``TCP_NODELAY=1``
(DCMTK 3.6.7 leaves Nagle's algorithm on otherwise, and each C-STORE then waits 40-90 ms).

Every file is read once before timing (so ``storescu`` reads from the page cache); after each
case the receiver's output is deleted (unless ``--keep``) and ``sync`` runs, so the next case
starts with no dirty pages. Each case runs ``--repeat`` times, interleaved, and its best time
counts; a case that takes longer than ``--timeout`` seconds is stopped and reported as failed.
The table goes to stdout as Markdown, with the exact commands used and anything odd seen on
the way (failed cases, missing instances, exit statuses, stderr output); progress goes to
stderr. The generated data is cached under ``--data DIR`` (one folder per workload and
parameters, with a manifest), so reruns skip generating it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

import polars as pl

from imgindex.index import Index
from storage.errors import TableNotFoundError

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

#: Receivers, by their ``--receivers`` name.
RECEIVERS: Final = ("storescp", "full", "none")
#: Rows and columns of the ``small`` workload's slices.
SMALL_SIZE: Final = 32
#: Instances per series of the ``small`` workload.
SMALL_SERIES_SIZE: Final = 100
#: Rows and columns of the ``ct`` workload's slices.
CT_SIZE: Final = 512
#: Seed of the first ``ct`` series; series ``i`` uses ``CT_SEED + i``.
CT_SEED: Final = 0
#: Seed of the first ``small`` series (far from the CT seeds: no shared UIDs).
SMALL_SEED: Final = 100_000
#: Processes generating the data.
GENERATE_WORKERS: Final = 2
#: Written last into each generated workload folder; describes what the folder holds.
MANIFEST_NAME: Final = "bench_listener.json"
#: The AE title ``imgindex listen`` answers to by default.
DEFAULT_AET: Final = "IMGINDEX"
#: Host everything binds to and talks to.
HOST: Final = "127.0.0.1"
#: Seconds a receiver may take to start listening.
READY_TIMEOUT_S: Final = 60.0
#: Seconds a receiver may take to exit after SIGTERM before it is killed.
STOP_TIMEOUT_S: Final = 60.0
#: Seconds the processes a receiver started may outlive it before they are killed.
LEFTOVER_TIMEOUT_S: Final = 5.0
#: Seconds between two looks at the index (and at a starting storescp).
POLL_S: Final = 0.1
#: The line ``imgindex listen`` writes to stderr once it accepts associations.
LISTENING_RE: Final = re.compile(r"listening on [\d.]+:(\d+)")
#: Lines of imgindex's stderr that are routine whatever else they say.
ROUTINE_RE: Final = re.compile(
    r"listening on [\d.]+:\d+|imgindex listen: (SIGTERM, stopping|stopped; everything "
    r"acknowledged is flushed)"
)
#: A log record at level INFO (routine unless it reports failures).
INFO_RE: Final = re.compile(r"^\S+ \S+ INFO ")
#: A non-zero count of failed instances in a log line.
FAILED_RE: Final = re.compile(r"\b[1-9]\d* failed")
#: Environment added for every DCMTK process.
DCMTK_ENV: Final = {"TCP_NODELAY": "1"}
#: Lines of a log quoted in a note.
QUOTE_LINES: Final = 5
_READ_CHUNK: Final = 1 << 20


class BenchError(RuntimeError):
    """A setup step failed (the benchmark cannot go on)."""


class CaseError(RuntimeError):
    """One case failed (the benchmark goes on with the next one)."""


@dataclass(frozen=True)
class Series:
    """One generated series folder."""

    name: str
    files: int
    bytes: int


@dataclass(frozen=True)
class Workload:
    """Generated data that ``storescu`` sends."""

    name: str
    description: str
    directory: Path
    series: tuple[Series, ...]

    @property
    def files(self) -> int:
        """Instances (one per file)."""
        return sum(s.files for s in self.series)

    @property
    def bytes(self) -> int:
        """Bytes of all the files."""
        return sum(s.bytes for s in self.series)

    def split(self, associations: int) -> list[list[str]]:
        """What each association sends: paths relative to :attr:`directory`.

        Contiguous groups of whole series folders, as even as whole series allow; with fewer
        series than associations, contiguous groups of files instead.
        """
        n = len(self.series)
        if associations <= n:
            names = [s.name for s in self.series]
        else:
            names = [
                f"{s.name}/{p.name}"
                for s in self.series
                for p in sorted((self.directory / s.name).iterdir())
            ]
            n = len(names)
        return [
            names[i * n // associations : (i + 1) * n // associations] for i in range(associations)
        ]


@dataclass
class Run:
    """One run of one case."""

    seconds: float | None = None
    visible_after_s: float | None = None
    error: str | None = None


@dataclass
class Case:
    """Workload x associations x receiver, with its runs."""

    workload: Workload
    associations: int
    receiver: str
    runs: list[Run] = field(default_factory=list)

    @property
    def best(self) -> Run | None:
        """The fastest successful run, if any."""
        done = [r for r in self.runs if r.error is None and r.seconds is not None]
        return min(done, key=lambda r: r.seconds or 0.0) if done else None

    @property
    def label(self) -> str:
        """``workload/Nassoc/receiver``, for progress and notes."""
        return f"{self.workload.name} x{self.associations} {receiver_label(self.receiver)}"


@dataclass
class Tools:
    """Executables the benchmark runs."""

    storescu: str
    storescp: str
    echoscu: str
    imgindex: str


@dataclass
class Report:
    """Commands and notes gathered while running, printed after the table."""

    receiver_commands: dict[str, str] = field(default_factory=dict)
    sender_commands: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        """Record something odd (and show it now on stderr)."""
        self.notes.append(text)
        print(f"    note: {text}", file=sys.stderr)


def receiver_label(receiver: str) -> str:
    """Name of a receiver in the table."""
    return "storescp" if receiver == "storescp" else f"imgindex --sync {receiver}"


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, not {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [_positive_int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of positive integers: {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return list(dict.fromkeys(values))


def _receiver_list(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [v for v in values if v not in RECEIVERS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(
            f"receivers are a comma-separated subset of {','.join(RECEIVERS)}, not {text!r}"
        )
    return list(dict.fromkeys(values))


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser (a function of its own so tests can call it)."""
    parser = argparse.ArgumentParser(
        prog="bench_listener.py",
        description="Time C-STORE receiving: DCMTK storescu into storescp vs imgindex listen.",
    )
    parser.add_argument(
        "--ct-series",
        type=_non_negative_int,
        default=20,
        help="CT series of 512x512 slices to send; 0 skips the workload (default 20)",
    )
    parser.add_argument(
        "--ct-slices", type=_positive_int, default=120, help="slices per CT series (default 120)"
    )
    parser.add_argument(
        "--small",
        type=_non_negative_int,
        default=6000,
        help=f"small instances ({SMALL_SIZE}x{SMALL_SIZE} CT slices, series of "
        f"{SMALL_SERIES_SIZE}) to send; 0 skips the workload (default 6000)",
    )
    parser.add_argument(
        "--associations",
        type=_int_list,
        default=[1, 4],
        metavar="N,N",
        help="concurrent associations (storescu processes) per case (default 1,4)",
    )
    parser.add_argument(
        "--receivers",
        type=_receiver_list,
        default=list(RECEIVERS),
        metavar="R,R",
        help="receivers: storescp (DCMTK), full and none (imgindex listen --sync full/none) "
        "(default storescp,full,none)",
    )
    parser.add_argument(
        "--repeat",
        type=_positive_int,
        default=1,
        help="runs per case, interleaved; the best counts (default 1)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="cache the generated data in DIR and reuse it on later runs "
        "(default: a temporary folder, deleted at the end)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        metavar="DIR",
        help="folder for the receivers' output folders (default: a temporary folder)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep every receiver's output folder (default: delete each after its case)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=600.0,
        help="seconds a case may take (sending plus waiting for the index) before it is "
        "stopped and reported as failed (default 600)",
    )
    parser.add_argument(
        "--aet",
        default=DEFAULT_AET,
        help=f"called AE title for imgindex listen (default {DEFAULT_AET})",
    )
    parser.add_argument(
        "--dcmtk-dir",
        type=Path,
        metavar="DIR",
        help="folder of DCMTK's storescu, storescp and echoscu (default: the first folder on "
        "PATH holding DCMTK's, not pynetdicom's)",
    )
    parser.add_argument(
        "--imgindex",
        help="imgindex executable (default: the one beside this Python, else on PATH)",
    )
    return parser


# --- data --------------------------------------------------------------------------------------


def _write_series(out_dir: Path, seed: int, n_slices: int, size: int) -> int:
    # Imported here: the generator is no part of what the benchmark times.
    from imgindex.testing import write_ct_series

    return len(write_ct_series(out_dir, seed=seed, n_slices=n_slices, size=size))


@dataclass(frozen=True)
class _Plan:
    name: str
    description: str
    directory: Path
    counts: list[int]
    size: int
    seed: int

    @property
    def manifest(self) -> dict[str, object]:
        return {
            "generator": "imgindex.testing.write_ct_series",
            "series": self.counts,
            "size": self.size,
            "seed": self.seed,
        }


def _series_name(number: int) -> str:
    return f"s{number:03d}"


def _load_workload(plan: _Plan) -> Workload:
    series = []
    for number, count in enumerate(plan.counts):
        folder = plan.directory / _series_name(number)
        files = sorted(p for p in folder.iterdir() if p.is_file())
        if len(files) != count:
            raise BenchError(f"{folder} holds {len(files)} files, expected {count}")
        series.append(Series(folder.name, count, sum(p.stat().st_size for p in files)))
    return Workload(plan.name, plan.description, plan.directory, tuple(series))


def prepare_data(data_dir: Path, args: argparse.Namespace) -> list[Workload]:
    """Generate the workloads into ``data_dir`` (or reuse them) and return them.

    Each workload has a folder named after its parameters, with a manifest written last; a
    folder without a manifest is what an interrupted run left, and is generated again.

    Raises
    ------
    BenchError
        If a workload folder holds data that does not match its manifest.
    """
    plans: list[_Plan] = []
    if args.ct_series:
        plans.append(
            _Plan(
                "ct",
                f"{args.ct_series} CT series x {args.ct_slices} slices of {CT_SIZE}x{CT_SIZE}",
                data_dir / f"ct-{args.ct_series}x{args.ct_slices}-{CT_SIZE}",
                [args.ct_slices] * args.ct_series,
                CT_SIZE,
                CT_SEED,
            )
        )
    if args.small:
        counts = [
            min(SMALL_SERIES_SIZE, args.small - start)
            for start in range(0, args.small, SMALL_SERIES_SIZE)
        ]
        plans.append(
            _Plan(
                "small",
                f"{args.small} CT slices of {SMALL_SIZE}x{SMALL_SIZE} in {len(counts)} series",
                data_dir / f"small-{args.small}-{SMALL_SIZE}",
                counts,
                SMALL_SIZE,
                SMALL_SEED,
            )
        )
    missing: list[_Plan] = []
    for plan in plans:
        manifest_path = plan.directory / MANIFEST_NAME
        if manifest_path.exists():
            if json.loads(manifest_path.read_text()) != plan.manifest:
                raise BenchError(
                    f"{plan.directory} was generated with other parameters ({manifest_path}); "
                    "delete it"
                )
            print(f"reusing {plan.name}: {plan.description} in {plan.directory}", file=sys.stderr)
            continue
        if plan.directory.exists():
            print(f"{plan.directory} is incomplete (no manifest); regenerating", file=sys.stderr)
            shutil.rmtree(plan.directory)
        missing.append(plan)
    if missing:
        started = time.perf_counter()
        for plan in missing:
            print(
                f"generating {plan.name}: {plan.description} in {plan.directory}...",
                file=sys.stderr,
            )
        with ProcessPoolExecutor(GENERATE_WORKERS) as pool:
            jobs = [
                (
                    plan,
                    pool.submit(
                        _write_series,
                        plan.directory / _series_name(number),
                        plan.seed + number,
                        count,
                        plan.size,
                    ),
                )
                for plan in missing
                for number, count in enumerate(plan.counts)
            ]
            for _, job in jobs:
                job.result()
        for plan in missing:
            (plan.directory / MANIFEST_NAME).write_text(json.dumps(plan.manifest))
        print(f"  generated in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return [_load_workload(plan) for plan in plans]


def warm_page_cache(workloads: Sequence[Workload]) -> float:
    """Read every file whole once so that storescu reads from the page cache; return seconds."""
    started = time.perf_counter()
    for workload in workloads:
        for series in workload.series:
            for path in (workload.directory / series.name).iterdir():
                with path.open("rb", buffering=0) as f:
                    while f.read(_READ_CHUNK):
                        pass
    return time.perf_counter() - started


def _mem_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# --- tools -------------------------------------------------------------------------------------


def _version_line(executable: str) -> str:
    try:
        out = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, check=False, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.splitlines()[0].strip("$ ") if out else ""


def _is_dcmtk(executable: Path) -> bool:
    return os.access(executable, os.X_OK) and "dcmtk" in _version_line(str(executable))


def find_tools(args: argparse.Namespace) -> Tools:
    """Locate DCMTK's tools (not pynetdicom's scripts of the same names) and imgindex.

    Raises
    ------
    BenchError
        If one is missing.
    """
    if args.dcmtk_dir is not None:
        dirs = [args.dcmtk_dir]
    else:
        dirs = [Path(p) for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    found: dict[str, str] = {}
    for name in ("storescu", "storescp", "echoscu"):
        for folder in dirs:
            if _is_dcmtk(folder / name):
                found[name] = str(folder / name)
                break
        else:
            raise BenchError(
                f"DCMTK's {name} not found in {', '.join(map(str, dirs))}; install DCMTK "
                "(apt-get install dcmtk) or pass --dcmtk-dir"
            )
    imgindex = args.imgindex
    if imgindex is None:
        beside = Path(sys.executable).parent / "imgindex"
        imgindex = str(beside) if beside.exists() else shutil.which("imgindex")
    if imgindex is None:
        raise BenchError("imgindex not found; pass --imgindex")
    return Tools(found["storescu"], found["storescp"], found["echoscu"], imgindex)


def _dcmtk_env() -> dict[str, str]:
    return {**os.environ, **DCMTK_ENV}


def _imgindex_env() -> dict[str, str]:
    """This environment less ``IMGINDEX_*`` settings: imgindex runs with its defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith("IMGINDEX_")}


def _env_prefix() -> str:
    return " ".join(f"{k}={v}" for k, v in DCMTK_ENV.items())


# --- receivers ---------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on ``port`` (IPv4), from /proc/net/tcp."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
            inodes.add(inode)
    return inodes


def process_listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the socket listening on ``port`` (Linux; else True).

    Guards against a port taken by someone else between :func:`free_port` and the bind.
    """
    try:
        inodes = _listening_inodes(port)
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return True  # no /proc: trust the caller's other checks
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


@dataclass
class Receiver:
    """A running receiver process."""

    name: str
    process: subprocess.Popen[str]
    port: int
    command: list[str]
    log_path: Path
    stderr_lines: list[str] = field(default_factory=list)
    drain: threading.Thread | None = None

    def log_tail(self) -> str:
        """Last lines the receiver wrote (stdout file and, for imgindex, stderr)."""
        lines: list[str] = []
        if self.log_path.exists():
            lines += self.log_path.read_text(errors="replace").splitlines()
        lines += self.stderr_lines
        return _quote(lines)


def _quote(lines: Sequence[str]) -> str:
    lines = [line.rstrip() for line in lines if line.strip()]
    if not lines:
        return "(no output)"
    shown = lines[-QUOTE_LINES:]
    more = f" [{len(lines) - len(shown)} earlier lines]" if len(lines) > len(shown) else ""
    return " | ".join(shown) + more


def _drain_stderr(stream: IO[str], lines: list[str], ports: queue.Queue[int]) -> None:
    for line in stream:
        lines.append(line.rstrip("\n"))
        match = LISTENING_RE.search(line)
        if match:
            ports.put(int(match.group(1)))


def start_storescp(tools: Tools, out: Path, associations: int, log_path: Path) -> Receiver:
    """Start ``storescp`` on a free port; return once ``echoscu`` gets an answer from it.

    Raises
    ------
    CaseError
        If it does not answer within :data:`READY_TIMEOUT_S`.
    """
    for _attempt in range(3):
        port = free_port()
        fork = ["--fork"] if associations > 1 else []
        command = [tools.storescp, *fork, "-od", str(out), "+xa", str(port)]
        with log_path.open("w") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_dcmtk_env(),
                text=True,
                start_new_session=True,
            )
        receiver = Receiver("storescp", process, port, command, log_path)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            try:
                echo = subprocess.run(
                    [tools.echoscu, "-to", "5", HOST, str(port)],
                    capture_output=True,
                    env=_dcmtk_env(),
                    check=False,
                    timeout=10,
                )
            except subprocess.TimeoutExpired:
                continue
            if echo.returncode == 0 and process.poll() is None:
                if process_listens_on(process.pid, port):
                    return receiver
                break  # someone else answered on that port: try another one
            time.sleep(POLL_S)
        if process.poll() is None:
            stop_receiver(receiver)
        if time.monotonic() >= deadline:
            break
    raise CaseError(f"storescp did not start listening: {receiver.log_tail()}")


def start_imgindex(tools: Tools, root: Path, sync: str, log_path: Path) -> Receiver:
    """Start ``imgindex listen --port 0``; return once it says which port it listens on.

    Raises
    ------
    CaseError
        If it exits or says nothing within :data:`READY_TIMEOUT_S`.
    """
    command = [
        tools.imgindex,
        "listen",
        "--root",
        str(root),
        "--bind",
        HOST,
        "--port",
        "0",
        "--sync",
        sync,
    ]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.PIPE,
            env=_imgindex_env(),
            text=True,
            start_new_session=True,
        )
    assert process.stderr is not None
    ports: queue.Queue[int] = queue.Queue()
    receiver = Receiver(f"imgindex --sync {sync}", process, 0, command, log_path)
    receiver.drain = threading.Thread(
        target=_drain_stderr, args=(process.stderr, receiver.stderr_lines, ports), daemon=True
    )
    receiver.drain.start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            receiver.port = ports.get(timeout=POLL_S)
        except queue.Empty:
            if process.poll() is not None:
                receiver.drain.join(timeout=5)
                raise CaseError(
                    f"imgindex listen exited with status {process.returncode} before listening: "
                    f"{receiver.log_tail()}"
                ) from None
            continue
        return receiver
    stop_receiver(receiver)
    raise CaseError(
        f"imgindex listen did not say 'listening on' within {READY_TIMEOUT_S:.0f} s: "
        f"{receiver.log_tail()}"
    )


def _group_gone(pgid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for every process of group ``pgid`` to exit."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def stop_receiver(receiver: Receiver) -> tuple[int | None, bool]:
    """SIGTERM the receiver (as ``kill PID`` would) and wait for it.

    Returns the exit status (None if it was still running :data:`STOP_TIMEOUT_S` after SIGTERM
    and had to be killed) and whether processes it started (storescp's ``--fork`` children,
    imgindex's workers) were still running :data:`LEFTOVER_TIMEOUT_S` after it exited; those
    are killed.
    """
    process = receiver.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        status: int | None = process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_S)
        status = None
    # The receiver leads its own process group (start_new_session): what is left of the
    # group are processes it started.
    leftovers = not _group_gone(process.pid, LEFTOVER_TIMEOUT_S)
    if leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    if receiver.drain is not None:
        receiver.drain.join(timeout=10)
    return status, leftovers


# --- cases -------------------------------------------------------------------------------------


def storescu_commands(
    tools: Tools, workload: Workload, associations: int, port: int, aet: str
) -> list[list[str]]:
    """One ``storescu`` command per association; run in the workload folder (short paths).

    ``+sd`` scans the series folders given; files given as such are sent as they are.
    """
    return [
        [tools.storescu, "-aec", aet, "+sd", HOST, str(port), *group]
        for group in workload.split(associations)
    ]


def count_rows(root: Path) -> int:
    """Rows of the index's ``instances`` table (0 before its first commit)."""
    try:
        return int(Index(root).instances.select(pl.len()).collect().item())
    except TableNotFoundError:
        return 0


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _poll_rows(case: Case, root: Path, deadline: float, report: Report) -> int:
    """Rows of ``instances`` once they reach the instances sent, or at ``deadline``.

    Reads race with the listener's commits: an error while reading is noted and the read tried
    again at the next poll.
    """
    errors: set[str] = set()
    received = 0
    while True:
        try:
            received = count_rows(root)
        except Exception as exc:  # noqa: BLE001 - noted; the next poll tries again
            if _describe(exc) not in errors:
                errors.add(_describe(exc))
                report.note(f"{case.label}: reading the index failed (retried): {_describe(exc)}")
        if received >= case.workload.files or time.monotonic() >= deadline:
            return received
        time.sleep(POLL_S)


def count_files(folder: Path) -> int:
    """Files under ``folder``, recursively."""
    return sum(1 for p in folder.rglob("*") if p.is_file())


def _send(
    commands: Sequence[Sequence[str]], cwd: Path, logs: Path, deadline: float
) -> tuple[float, list[str], list[str]]:
    """Run the storescu commands at once.

    Returns the wall seconds until all exited, failures (non-zero exit statuses) and other
    output they printed.
    """
    processes: list[subprocess.Popen[bytes]] = []
    log_paths = [logs / f"storescu{n}.log" for n in range(len(commands))]
    started = time.perf_counter()
    try:
        for command, log_path in zip(commands, log_paths, strict=True):
            with log_path.open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        command,
                        cwd=cwd,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=_dcmtk_env(),
                    )
                )
        for process in processes:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        seconds = time.perf_counter() - started
    except subprocess.TimeoutExpired:
        raise CaseError("storescu did not finish within the case timeout") from None
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)
    failures, outputs = [], []
    for number, (process, log_path) in enumerate(zip(processes, log_paths, strict=True)):
        output = log_path.read_text(errors="replace").splitlines()
        if process.returncode != 0:
            failures.append(
                f"storescu #{number + 1} exited with status {process.returncode}: {_quote(output)}"
            )
        elif any(line.strip() for line in output):
            outputs.append(f"storescu #{number + 1} printed: {_quote(output)}")
    return seconds, failures, outputs


def run_case(
    case: Case,
    *,
    tools: Tools,
    case_dir: Path,
    timeout: float,
    aet: str,
    report: Report,
) -> Run:
    """One run of ``case``: start the receiver, send, verify, stop the receiver."""
    workload, associations = case.workload, case.associations
    out = case_dir / "out"
    logs = case_dir / "logs"
    out.mkdir(parents=True)
    logs.mkdir()
    run = Run()
    receiver: Receiver | None = None
    try:
        if case.receiver == "storescp":
            receiver = start_storescp(tools, out, associations, logs / "storescp.log")
        else:
            receiver = start_imgindex(tools, out, case.receiver, logs / "imgindex.log")
        # storescp accepts any called AE title; imgindex answers to its own.
        commands = storescu_commands(tools, workload, associations, receiver.port, aet)
        report.receiver_commands.setdefault(
            f"{receiver_label(case.receiver)}, {associations} association(s)",
            (f"{_env_prefix()} " if case.receiver == "storescp" else "")
            + shlex.join(receiver.command),
        )
        report.sender_commands.setdefault(
            f"{workload.name}, {associations} association(s)",
            [
                f"(cd {shlex.quote(str(workload.directory))} && {_env_prefix()} {shlex.join(c)})"
                for c in commands
            ],
        )
        deadline = time.monotonic() + timeout
        run.seconds, failures, outputs = _send(commands, workload.directory, logs, deadline)
        for output in outputs:
            report.note(f"{case.label}: {output}")
        if failures:
            raise CaseError("; ".join(failures))
        if case.receiver == "storescp":
            received = count_files(out)
        else:
            sent_at = time.perf_counter()
            received = _poll_rows(case, out, deadline, report)
            if received >= workload.files:
                run.visible_after_s = time.perf_counter() - sent_at
        if received != workload.files:
            what = "files in OUT" if case.receiver == "storescp" else "index rows"
            raise CaseError(f"{received} {what} after sending {workload.files} instances")
    except CaseError as exc:
        run.error = str(exc)
    finally:
        if receiver is not None:
            status, leftovers = stop_receiver(receiver)
            _check_receiver_exit(case, receiver, status, leftovers, report)
            if run.error is None and case.receiver != "storescp":
                try:
                    after = count_rows(out)
                except Exception as exc:  # noqa: BLE001 - noted; the next case still runs
                    after = -1
                    report.note(f"{case.label}: reading the index failed: {_describe(exc)}")
                if after != workload.files:
                    run.error = f"{after} index rows after imgindex exited, sent {workload.files}"
    return run


def _check_receiver_exit(
    case: Case, receiver: Receiver, status: int | None, leftovers: bool, report: Report
) -> None:
    """Note a non-zero exit, stray processes and unexpected output of a stopped receiver."""
    if status is None:
        report.note(f"{case.label}: receiver did not exit within {STOP_TIMEOUT_S:.0f} s of SIGTERM")
    elif case.receiver != "storescp" and status != 0:
        report.note(f"{case.label}: imgindex listen exited with status {status} on SIGTERM")
    if leftovers:
        report.note(f"{case.label}: processes of the receiver were still running after it exited")
    if receiver.stderr_lines:  # kept with the output folder under --keep
        stderr_log = receiver.log_path.with_suffix(".stderr.log")
        stderr_log.write_text("\n".join(receiver.stderr_lines) + "\n")
    lines = receiver.log_path.read_text(errors="replace").splitlines() + receiver.stderr_lines
    odd = [line for line in lines if line.strip() and not _routine(line)]
    if odd:
        report.note(f"{case.label}: receiver output: {_quote(odd)}")


def _routine(line: str) -> bool:
    """Whether a line of imgindex's stderr is routine (not worth a note)."""
    if ROUTINE_RE.search(line):
        return True
    return bool(INFO_RE.search(line)) and not FAILED_RE.search(line)


def run_all(
    cases: Sequence[Case],
    *,
    tools: Tools,
    work: Path,
    args: argparse.Namespace,
    report: Report,
) -> None:
    """Run every case ``args.repeat`` times, interleaved."""
    for round_no in range(1, args.repeat + 1):
        for case in cases:
            name = f"{case.workload.name}-a{case.associations}-{case.receiver}-r{round_no}"
            case_dir = work / name
            run = run_case(
                case,
                tools=tools,
                case_dir=case_dir,
                timeout=args.timeout,
                aet=args.aet,
                report=report,
            )
            case.runs.append(run)
            if run.error is not None:
                report.note(f"{case.label} round {round_no}: FAILED: {run.error}")
            else:
                assert run.seconds is not None
                visible = (
                    f", in the index {run.visible_after_s:+.2f} s later"
                    if run.visible_after_s is not None
                    else ""
                )
                print(
                    f"  round {round_no}/{args.repeat} {case.label}: {run.seconds:.2f} s "
                    f"({case.workload.files / run.seconds:,.0f} instances/s, "
                    f"{case.workload.bytes / 1e6 / run.seconds:,.0f} MB/s{visible})",
                    file=sys.stderr,
                )
            if not args.keep:
                shutil.rmtree(case_dir, ignore_errors=True)
            os.sync()


# --- output ------------------------------------------------------------------------------------


def format_table(cases: Sequence[Case]) -> str:
    """Return the results as a Markdown table."""
    lines = [
        (
            "| workload | associations | receiver | seconds | instances/s | MB/s | vs storescp "
            "| in the index after |"
        ),
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    reference: dict[tuple[str, int], float] = {}
    for case in cases:
        best = case.best
        if case.receiver == "storescp" and best is not None and best.seconds is not None:
            reference[case.workload.name, case.associations] = best.seconds
    for case in cases:
        head = f"| {case.workload.name} | {case.associations} | {receiver_label(case.receiver)} "
        best = case.best
        if best is None or best.seconds is None:
            lines.append(head + "| failed | | | | |")
            continue
        files, size = case.workload.files, case.workload.bytes
        ref = reference.get((case.workload.name, case.associations))
        ratio = f"{ref / best.seconds:.2f}x" if ref is not None else "n/a"
        visible = (
            f"+{best.visible_after_s:.2f} s"
            if best.visible_after_s is not None
            else ("n/a" if case.receiver == "storescp" else "never")
        )
        lines.append(
            head + f"| {best.seconds:.2f} | {files / best.seconds:,.0f} "
            f"| {size / 1e6 / best.seconds:,.0f} | {ratio} | {visible} |"
        )
    return "\n".join(lines)


def _git_revision() -> str:
    """The repository's commit, ``+changes`` if the work tree differs from it."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "(unknown revision)"
    return f"at {head}{' + uncommitted changes' if status else ''}"


def print_results(
    cases: Sequence[Case],
    workloads: Sequence[Workload],
    *,
    tools: Tools,
    args: argparse.Namespace,
    report: Report,
) -> None:
    """The Markdown report on stdout: header, table, commands, notes."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"# DCMTK storescu -> receiver on {HOST}, best of {args.repeat}; "
        f"{dt.date.today().isoformat()}, {platform.node()}, {cpus} CPUs, "
        f"Python {platform.python_version()}, {_version_line(tools.storescu)}, "
        f"{_version_line(tools.storescp)}"
    )
    print(
        f"# imgindex {_git_revision()}, `imgindex listen` with its default settings; storescp "
        "with its defaults (no fsync; max receive PDU 16 KB in DCMTK 3.6.7)"
    )
    for workload in workloads:
        print(
            f"# {workload.name}: {workload.description}: {workload.files:,} instances, "
            f"{workload.bytes / 1e6:,.0f} MB ({workload.bytes / workload.files / 1e3:,.1f} KB "
            "each), explicit VR little endian"
        )
    print(
        "# seconds: from starting the storescu processes until all exited with status 0; "
        "MB/s counts whole files; vs storescp: instances/s over storescp's in the same run; "
        "in the index after: further seconds until every instance is a row of `instances`"
    )
    print()
    print(format_table(cases))
    print()
    print(f"Commands (every DCMTK process runs with `{_env_prefix()}`):")
    print()
    print("```console")
    for label, command in report.receiver_commands.items():
        print(f"# receiver: {label}")
        print(f"$ {command}")
    for label, commands in report.sender_commands.items():
        print(f"# sender: {label}, started together")
        for command in commands:
            print(f"$ {command}")
    print("```")
    print()
    if report.notes:
        print("Notes:")
        print()
        for note in report.notes:
            print(f"- {note}")
    else:
        print(
            "Notes: none (every case received every instance; storescu printed nothing; "
            "imgindex, if run, exited 0 on SIGTERM and printed only routine INFO lines)."
        )


# --- main --------------------------------------------------------------------------------------


def _bench(args: argparse.Namespace, data_dir: Path, work: Path) -> int:
    tools = find_tools(args)
    if any(receiver != "storescp" for receiver in args.receivers):
        help_run = subprocess.run(
            [tools.imgindex, "listen", "--help"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if help_run.returncode != 0:
            raise BenchError(
                f"`{tools.imgindex} listen --help` failed (status {help_run.returncode}): "
                f"{_quote(help_run.stderr.splitlines())}"
            )
    workloads = prepare_data(data_dir, args)
    if not workloads:
        raise BenchError("nothing to send: --ct-series and --small are both 0")
    for workload in workloads:
        if len(workload.series) < max(args.associations):
            print(
                f"note: {workload.name} has fewer series than associations: split per file",
                file=sys.stderr,
            )
    total = sum(w.bytes for w in workloads)
    available = _mem_available_bytes()
    if available is not None and total > available // 4:
        print(
            f"warning: {total / 1e9:.1f} GB of data vs {available / 1e9:.1f} GB of free memory; "
            "the page cache may not hold the data and the receivers' output at once",
            file=sys.stderr,
        )
    work.mkdir(parents=True, exist_ok=True)
    largest = max(w.bytes for w in workloads)
    free = shutil.disk_usage(work).free
    if free < 2 * largest:
        raise BenchError(f"{work} has {free / 1e9:.1f} GB free, {2 * largest / 1e9:.1f} needed")
    warm_s = warm_page_cache(workloads)
    print(
        f"warm-up: read {sum(w.files for w in workloads):,} files ({total / 1e6:,.0f} MB) in "
        f"{warm_s:.1f} s",
        file=sys.stderr,
    )
    cases = [
        Case(workload, associations, receiver)
        for workload in workloads
        for associations in args.associations
        for receiver in args.receivers
    ]
    report = Report()
    run_all(cases, tools=tools, work=work, args=args, report=report)
    print_results(cases, workloads, tools=tools, args=args, report=report)
    failed = any(r.error is not None for case in cases for r in case.runs)
    return 1 if failed else 0


@contextlib.contextmanager
def _folders(args: argparse.Namespace) -> Iterator[tuple[Path, Path]]:
    """The data and work folders; the temporary ones are deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-listener-") as tmp:
        data_dir = args.data if args.data is not None else Path(tmp) / "data"
        parent = args.work if args.work is not None else Path(tmp)
        work = parent / f"work-{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
        try:
            yield data_dir, work
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
            elif work.exists():
                if args.work is None:  # move it out of the temporary folder
                    kept = Path(tempfile.mkdtemp(prefix="bench-listener-kept-")) / work.name
                    work.rename(kept)
                    work = kept
                print(f"receivers' output kept in {work}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with _folders(args) as (data_dir, work):
            return _bench(args, data_dir, work)
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        print(f"bench_listener.py: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
