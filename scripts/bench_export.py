"""Benchmark ``imgindex export`` (DICOM -> Zarr) against dcm2niix, a plain loop and the disk.

Usage::

    python scripts/bench_export.py [--gb 2] [--j2k-mb 300] [--repeat 3]
        [--data /tmp/bench-export-data] [--work DIR] [--dd-mb 2048]
        [--cache auto|drop|fadvise|warm] [--contenders imgindex,imgindex-none,dcm2niix,plain]
        [--sets ct,j2k] [--timeout 3600] [--json PATH]

Two sets of generated CT series (:mod:`imgindex.testing`: the generator's phantom, not zeros;
series of 512x512 slices, 120 to 300 slices a series, varying), cached under ``--data``:

* ``ct``: uncompressed (Explicit VR Little Endian, :func:`imgindex.testing.write_ct_series`),
  at least ``--gb`` GB (10^9 bytes) in all;
* ``j2k``: JPEG 2000 Lossless (:func:`imgindex.testing.iter_series` with
  ``transfer_syntax=JPEG2000Lossless``), at least ``--j2k-mb`` MB (slow to encode: a progress
  line per series).

Each set is indexed into a fresh catalog root under ``--work`` with ``imgindex index-files``,
and its selection (a text file, one SeriesInstanceUID per line, every series of the set) is read
back from the index. Then, in one run on the same files, the contenders:

* ``imgindex``: ``imgindex export SELECTION --root ROOT --out OUT.zarr`` (default compressor);
* ``imgindex-none``: the same with ``--compressor none``;
* ``dcm2niix``: ``dcm2niix -z n -o OUT SETDIR`` (one call over the set's folder; uncompressed
  NIfTI, the fair match for an uncompressed or fast-compressed store; ``-z y`` would gzip);
* ``plain``: a single-process Python loop (a subprocess of this script): per series,
  ``pydicom.dcmread`` every file, sort along the slice normal, ``numpy.stack``, and one
  ``zarr`` array per series with zarr's default codecs;
* ``dd``: the disk's sequential write rate, ``dd if=/dev/zero of=FILE bs=1M count=N
  conv=fdatasync`` on the filesystem of the outputs (once per run).

Every contender is a process started from scratch, and its wall time is the whole process
(start, imports, work, exit); its CPU time is that of the process tree (``wait4``). Each runs
``--repeat`` times, interleaved, into a fresh output folder; the median counts. After each run,
``sync`` is timed (the output's dirty pages going to disk: neither the export, dcm2niix nor the
loop fsyncs; dd does) and shown apart; then the output is checked (one array, or one NIfTI
sidecar, per series), measured and deleted.

MB/s is 10^6 bytes of DICOM input (the sum of the .dcm file sizes) per second; TB/day is
MB/s * 86400 / 10^6. Before every run the page cache is dropped (``--cache drop``: ``sync; echo 3
> /proc/sys/vm/drop_caches``, needs root), or the set's files are evicted one by one
(``--cache fadvise``: ``posix_fadvise(DONTNEED)``), or read once so that every contender reads
from memory (``--cache warm``); ``auto`` drops if permitted and warms otherwise. The table goes
to stdout as Markdown with the commands, the regime and anything odd; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from _bench import available_cpus, git_revision

if TYPE_CHECKING:
    from collections.abc import Sequence

#: The repository (for ``git`` and the worker's ``PYTHONPATH``).
ROOT: Final = Path(__file__).resolve().parent.parent
#: Sets, by their ``--sets`` name.
SETS: Final = ("ct", "j2k")
#: Contenders, by their ``--contenders`` name (``dd`` runs once per benchmark run).
CONTENDERS: Final = ("imgindex", "imgindex-none", "dcm2niix", "plain", "dd")
#: Cache regimes, by their ``--cache`` name.
REGIMES: Final = ("auto", "drop", "fadvise", "warm")
#: Rows and columns of every slice.
SIZE: Final = 512
#: Slices of series ``i``: ``MIN_SLICES + (i * SLICE_STEP) % SLICE_SPAN`` (120 to 300).
MIN_SLICES: Final = 120
SLICE_STEP: Final = 67
SLICE_SPAN: Final = 181
#: Seed of the first series of each set (far apart: no shared UIDs).
SEEDS: Final = {"ct": 0, "j2k": 500_000}
#: Bytes of a file, guessed before any is written (a 512x512 int16 slice and its header).
SLICE_BYTES_GUESS: Final = {"ct": SIZE * SIZE * 2 + 3_300, "j2k": 210_000}
#: Bytes of decoded pixels per byte of file, at most (for the disk check).
RAW_RATIO: Final = {"ct": 1.0, "j2k": 3.0}
#: Bumped when the generated files change; a cache of another version is generated again.
GENERATOR_VERSION: Final = 1
#: Written last into each set's folder; describes what it holds.
MARKER: Final = "bench_export.json"
#: Processes generating the data.
GENERATE_WORKERS: Final = 2
#: A large hospital platform's daily volume, for scale.
PLATFORM_TB_PER_DAY: Final = 3.5
#: Goals on the uncompressed set: imgindex / disk write rate and imgindex / dcm2niix.
GOAL_DISK: Final = 0.8
GOAL_DCM2NIIX: Final = 1.0
#: How many times the data size must be free on disk.
DISK_FACTOR: Final = 3
#: Cores busy (all processes) below which the machine counts as idle before a run.
IDLE_CORES: Final = 0.25
#: Others' average load during a run (cores) above which the report warns.
BUSY_WARNING_CORES: Final = 0.25
#: Seconds a command's leftover descendants may take to exit after it before they are killed.
LEFTOVER_TIMEOUT_S: Final = 5.0
#: ``prctl`` option making a process the reaper of its orphaned descendants (Linux).
PR_SET_CHILD_SUBREAPER: Final = 36
#: Lines of a failed command's output quoted in the report.
QUOTE_LINES: Final = 200
DROP_CACHES: Final = Path("/proc/sys/vm/drop_caches")
DD_RE: Final = re.compile(r"^(\d+) bytes .* copied, ([\d.,]+) s", re.MULTILINE)
ALREADY_RE: Final = re.compile(r"(\d+) already complete")
BYTES_IN_RE: Final = re.compile(r"([\d,.]+) MB of DICOM in")
_READ_CHUNK: Final = 1 << 20


class BenchError(RuntimeError):
    """A setup step failed (the benchmark cannot go on)."""


class RunError(RuntimeError):
    """One run of a contender failed (the benchmark goes on)."""


# --- arguments ---------------------------------------------------------------------------------


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


def _subset(allowed: Sequence[str], what: str) -> Any:
    def parse(text: str) -> list[str]:
        values = [part.strip() for part in text.split(",") if part.strip()]
        if not values or any(v not in allowed for v in values):
            raise argparse.ArgumentTypeError(
                f"{what} are a comma-separated subset of {','.join(allowed)}, not {text!r}"
            )
        return [v for v in allowed if v in values]

    return parse


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser."""
    parser = argparse.ArgumentParser(
        prog="bench_export.py",
        description="Time imgindex export (DICOM -> Zarr) against dcm2niix, a plain pydicom+zarr "
        "loop and the disk's sequential write rate, on the same generated CT series.",
    )
    parser.add_argument(
        "--gb",
        type=_positive_float,
        default=2.0,
        help="GB (10^9 bytes) of uncompressed CT to generate, at least (default 2)",
    )
    parser.add_argument(
        "--j2k-mb",
        type=_positive_float,
        default=300.0,
        help="MB (10^6 bytes) of JPEG 2000 Lossless CT to generate, at least (default 300)",
    )
    parser.add_argument(
        "--repeat",
        type=_positive_int,
        default=3,
        help="runs of each contender on each set, interleaved; the median counts (default 3)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("/tmp/bench-export-data"),
        metavar="DIR",
        help="cache of the generated sets, reused when complete (default /tmp/bench-export-data)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        metavar="DIR",
        help="folder for the catalog roots, selections, outputs and dd's file; made fresh inside "
        "DIR and deleted at the end (default: a temporary folder under /tmp)",
    )
    parser.add_argument(
        "--dd-mb",
        type=_positive_int,
        default=2048,
        help="MiB dd writes (default 2048)",
    )
    parser.add_argument(
        "--cache",
        choices=REGIMES,
        default="auto",
        help="page cache before each run: drop (echo 3 > drop_caches, needs root), fadvise "
        "(evict the set's files with posix_fadvise DONTNEED), warm (read every file once "
        "first), auto (drop if permitted, else warm) (default auto)",
    )
    parser.add_argument(
        "--contenders",
        type=_subset(CONTENDERS, "contenders"),
        default=list(CONTENDERS),
        metavar="C,C",
        help=f"contenders to run (default {','.join(CONTENDERS)})",
    )
    parser.add_argument(
        "--sets",
        type=_subset(SETS, "sets"),
        default=list(SETS),
        metavar="S,S",
        help="sets to run on: ct (uncompressed), j2k (JPEG 2000 Lossless) (default ct,j2k)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=3600.0,
        help="seconds one run may take before it is killed and reported as failed (default 3600)",
    )
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=60.0,
        metavar="S",
        help="before each run, wait up to S seconds for a second in which other processes use "
        f"less than {IDLE_CORES} cores (the machine may be shared; default 60, 0 to not wait)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    parser.add_argument(
        "--imgindex",
        help="imgindex executable (default: the one beside this Python, else on PATH)",
    )
    parser.add_argument(
        "--dcm2niix",
        default="dcm2niix",
        help="dcm2niix executable (default: dcm2niix on PATH)",
    )
    parser.add_argument("--worker", choices=("plain",), help=argparse.SUPPRESS)
    parser.add_argument("--series-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser


# --- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesDir:
    """One generated series folder."""

    name: str
    seed: int
    files: int
    bytes: int


@dataclass(frozen=True)
class DataSet:
    """One generated set of series."""

    name: str
    description: str
    directory: Path
    series: tuple[SeriesDir, ...]

    @property
    def files(self) -> int:
        """Instances (one per file)."""
        return sum(s.files for s in self.series)

    @property
    def bytes(self) -> int:
        """Bytes of all the files: the MB of MB/s."""
        return sum(s.bytes for s in self.series)

    @property
    def raw_bytes(self) -> int:
        """Bytes of the decoded int16 volumes."""
        return self.files * SIZE * SIZE * 2

    def paths(self) -> list[Path]:
        """Every file of the set."""
        return [p for s in self.series for p in sorted((self.directory / s.name).iterdir())]


def slices_of(number: int) -> int:
    """Slices of series ``number`` of a set (120 to 300, varying)."""
    return MIN_SLICES + (number * SLICE_STEP) % SLICE_SPAN


def _set_name(kind: str, target: int) -> str:
    return f"ct-{target / 1e9:g}GB" if kind == "ct" else f"j2k-{target / 1e6:g}MB"


def _describe(kind: str, target: int) -> str:
    syntax = "uncompressed (Explicit VR Little Endian)" if kind == "ct" else "JPEG 2000 Lossless"
    return f"{syntax} CT, {SIZE}x{SIZE}, at least {target / 1e6:,.0f} MB"


def _marker(kind: str, target: int) -> dict[str, Any]:
    return {
        "set": kind,
        "target_bytes": target,
        "size": SIZE,
        "generator": "imgindex.testing.write_ct_series"
        if kind == "ct"
        else "imgindex.testing.iter_series(transfer_syntax=JPEG2000Lossless)",
        "version": GENERATOR_VERSION,
    }


def _write_series(kind: str, directory: Path, seed: int, slices: int) -> tuple[int, int]:
    """Write one series (in a worker process); return (files, bytes)."""
    # Imported here: the generator is no part of what the benchmark times.
    from pydicom.uid import JPEG2000Lossless

    from imgindex.testing import iter_series, write_ct_series, write_dataset

    if kind == "ct":
        paths = write_ct_series(directory, seed=seed, n_slices=slices, size=SIZE)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        series = iter_series(seed, "CT", slices, SIZE, SIZE, transfer_syntax=JPEG2000Lossless)
        for number, ds in enumerate(series, start=1):
            path = directory / f"IM{number:05d}"
            write_dataset(ds, path)
            paths.append(path)
    return len(paths), sum(p.stat().st_size for p in paths)


def _load(kind: str, target: int, directory: Path, marker: dict[str, Any]) -> DataSet:
    series = []
    for entry in marker["series"]:
        folder = directory / entry["name"]
        files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
        size = sum(p.stat().st_size for p in files)
        if len(files) != entry["files"] or size != entry["bytes"]:
            raise BenchError(
                f"{folder} holds {len(files)} files of {size:,} bytes, its marker says "
                f"{entry['files']} of {entry['bytes']:,}: delete {directory}"
            )
        series.append(SeriesDir(entry["name"], entry["seed"], entry["files"], entry["bytes"]))
    return DataSet(kind, _describe(kind, target), directory, tuple(series))


def cached(kind: str, target: int, data: Path) -> dict[str, Any] | None:
    """The marker of a complete cached set, if there is one."""
    path = data / _set_name(kind, target) / MARKER
    if not path.exists():
        return None
    marker: dict[str, Any] = json.loads(path.read_text())
    if {k: marker.get(k) for k in _marker(kind, target)} != _marker(kind, target):
        return None
    return marker


def generate(kind: str, target: int, data: Path) -> DataSet:
    """Generate the set (or reuse its cache) and return it.

    Series are written, :data:`GENERATE_WORKERS` at a time, until their files hold ``target``
    bytes; the marker is written last, so a folder without one is regenerated.

    Raises
    ------
    BenchError
        If a cached folder does not hold what its marker says.
    """
    directory = data / _set_name(kind, target)
    marker = cached(kind, target, data)
    if marker is not None:
        found = _load(kind, target, directory, marker)
        print(
            f"reusing {kind}: {len(found.series)} series, {found.files:,} files, "
            f"{found.bytes / 1e6:,.0f} MB in {directory}",
            file=sys.stderr,
        )
        return found
    if directory.exists():
        print(f"{directory} is incomplete or stale; generating it again", file=sys.stderr)
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    print(
        f"generating {kind}: {_describe(kind, target)} in {directory} "
        f"({GENERATE_WORKERS} processes)...",
        file=sys.stderr,
    )
    started = time.perf_counter()
    done: dict[int, tuple[int, int]] = {}
    pending: dict[Future[tuple[int, int]], int] = {}
    done_bytes = done_files = 0
    number = 0
    with ProcessPoolExecutor(GENERATE_WORKERS) as pool:
        while True:
            per_file = done_bytes / done_files if done_files else SLICE_BYTES_GUESS[kind]
            expected = done_bytes + per_file * sum(slices_of(n) for n in pending.values())
            while len(pending) < 2 * GENERATE_WORKERS and expected < target:
                job = pool.submit(
                    _write_series,
                    kind,
                    directory / f"s{number:03d}",
                    SEEDS[kind] + number,
                    slices_of(number),
                )
                pending[job] = number
                expected += per_file * slices_of(number)
                number += 1
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for job in finished:
                files, size = job.result()
                done[pending.pop(job)] = (files, size)
                done_files += files
                done_bytes += size
            print(
                f"  {kind}: {len(done)} series, {done_files:,} files, "
                f"{done_bytes / 1e6:,.0f} of {target / 1e6:,.0f} MB, "
                f"{time.perf_counter() - started:.0f} s",
                file=sys.stderr,
            )
    marker = {
        **_marker(kind, target),
        "generate_seconds": round(time.perf_counter() - started, 1),
        "series": [
            {"name": f"s{n:03d}", "seed": SEEDS[kind] + n, "files": f, "bytes": b}
            for n, (f, b) in sorted(done.items())
        ],
    }
    (directory / MARKER).write_text(json.dumps(marker, indent=1))
    return _load(kind, target, directory, marker)


def check_disk(targets: dict[str, int], data: Path, work: Path, dd_bytes: int) -> None:
    """Refuse to start unless the disk has room for the data, one output and dd's file.

    Counts the cached sets as room already taken by the data. Needs at least
    :data:`DISK_FACTOR` times the data size.

    Raises
    ------
    BenchError
        If there is not enough free space.
    """
    data_bytes = sum(targets.values())
    present = 0
    for kind, target in targets.items():
        marker = cached(kind, target, data)
        if marker is not None:
            present += sum(e["bytes"] for e in marker["series"])
    largest_output = max(int(t * RAW_RATIO[k] * 1.1) for k, t in targets.items())
    need = max(DISK_FACTOR * data_bytes, data_bytes + largest_output + dd_bytes)
    data_dev = _existing(data).stat().st_dev
    work_dev = _existing(work).stat().st_dev
    if data_dev == work_dev:
        free = shutil.disk_usage(_existing(data)).free + present
        if free < need:
            raise BenchError(
                f"not enough free disk: {free / 1e9:,.1f} GB free (with {present / 1e9:.1f} GB "
                f"of cached data) under {data} and {work}, need {need / 1e9:,.1f} GB "
                f"({DISK_FACTOR}x the {data_bytes / 1e9:.1f} GB of data, or data + the largest "
                "output + dd's file); lower --gb, --j2k-mb or --dd-mb"
            )
        return
    free_data = shutil.disk_usage(_existing(data)).free + present
    free_work = shutil.disk_usage(_existing(work)).free
    if free_data < data_bytes or free_work < need - data_bytes:
        raise BenchError(
            f"not enough free disk: {free_data / 1e9:,.1f} GB for the data under {data} (need "
            f"{data_bytes / 1e9:,.1f}), {free_work / 1e9:,.1f} GB for the outputs under {work} "
            f"(need {(need - data_bytes) / 1e9:,.1f}); lower --gb, --j2k-mb or --dd-mb"
        )


def _existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


# --- indexing ----------------------------------------------------------------------------------


@dataclass
class Indexed:
    """A set indexed into its own catalog root, with its selection."""

    root: Path
    selection: Path
    series_file: Path
    seconds: float
    command: list[str]


def index_set(data_set: DataSet, imgindex: str, work: Path) -> Indexed:
    """Index the set into a fresh root; write its selection and its list of series folders.

    Raises
    ------
    BenchError
        If indexing fails or the index does not hold every series and instance.
    """
    from imgindex.index import Index

    root = work / "roots" / data_set.name
    command = [imgindex, "index-files", str(data_set.directory), "--root", str(root)]
    command.append("--no-progress")
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=_imgindex_env(), check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(
            f"{shlex.join(command)} exited with {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    series = Index(root).series.select("SeriesInstanceUID", "instance_count").collect()
    instances = int(series["instance_count"].sum())
    if series.height != len(data_set.series) or instances != data_set.files:
        raise BenchError(
            f"the index of {data_set.name} holds {series.height} series and {instances} "
            f"instances, expected {len(data_set.series)} and {data_set.files}:\n{done.stdout}"
        )
    selection = work / f"{data_set.name}-selection.txt"
    selection.write_text("".join(f"{uid}\n" for uid in sorted(series["SeriesInstanceUID"])))
    series_file = work / f"{data_set.name}-series.txt"
    series_file.write_text("".join(f"{data_set.directory / s.name}\n" for s in data_set.series))
    print(
        f"indexed {data_set.name}: {series.height} series, {instances:,} instances in "
        f"{seconds:.1f} s",
        file=sys.stderr,
    )
    return Indexed(root, selection, series_file, seconds, command)


# --- the page cache ----------------------------------------------------------------------------


def _drop_caches() -> None:
    os.sync()
    DROP_CACHES.write_text("3\n")


def choose_regime(requested: str) -> tuple[str, str]:
    """The regime to use and why.

    Raises
    ------
    BenchError
        If ``drop`` was asked for and is not permitted.
    """
    if requested in ("auto", "drop"):
        try:
            _drop_caches()
        except OSError as exc:
            if requested == "drop":
                raise BenchError(f"cannot drop the page cache ({DROP_CACHES}): {exc}") from exc
            return "warm", (
                f"warm: dropping the page cache is not permitted here ({DROP_CACHES}: "
                f"{exc.strerror or exc}), so every file of the set is read once before each "
                "run and every contender reads its input from memory"
            )
        return "drop", (
            "drop: `sync; echo 3 > /proc/sys/vm/drop_caches` before each run (cold in this "
            "kernel; a hypervisor's cache below it, if any, may still hold the files)"
        )
    if requested == "fadvise":
        return "fadvise", (
            "fadvise: `sync`, then each input file evicted from the page cache with "
            "posix_fadvise(POSIX_FADV_DONTNEED) before each run (cold in this kernel; a "
            "hypervisor's cache below it may still hold them)"
        )
    return "warm", "warm: every file of the set read once before each run (inputs in memory)"


def prepare_cache(regime: str, paths: Sequence[Path]) -> None:
    """Put the page cache in the regime's state for the next run."""
    if regime == "drop":
        _drop_caches()
    elif regime == "fadvise":
        os.sync()
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    else:
        for path in paths:
            with path.open("rb", buffering=0) as f:
                while f.read(_READ_CHUNK):
                    pass


# --- running -----------------------------------------------------------------------------------


@dataclass
class Run:
    """One run of one contender on one set."""

    seconds: float | None = None
    cpu_seconds: float | None = None
    sync_seconds: float | None = None
    output_bytes: int | None = None
    others_cores: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Case:
    """One contender on one set, with its runs."""

    contender: str
    set_name: str
    input_bytes: int
    command: str = ""
    runs: list[Run] = field(default_factory=list)

    @property
    def ok(self) -> list[Run]:
        """The successful runs."""
        return [r for r in self.runs if r.error is None and r.seconds is not None]

    @property
    def failed(self) -> bool:
        """Whether a run failed (or none ran)."""
        return not self.runs or len(self.ok) != len(self.runs)

    def median(self, attribute: str = "seconds") -> float | None:
        """Median of a figure over the successful runs."""
        values = [getattr(r, attribute) for r in self.ok if getattr(r, attribute) is not None]
        return float(statistics.median(values)) if values else None

    @property
    def mb_per_s(self) -> float | None:
        """MB (10^6 bytes) of DICOM input per second, from the median run."""
        seconds = self.median()
        return self.input_bytes / 1e6 / seconds if seconds else None

    @property
    def mb_per_s_with_sync(self) -> float | None:
        """The same, counting the median ``sync`` after the run (output durable)."""
        seconds, sync = self.median(), self.median("sync_seconds")
        return self.input_bytes / 1e6 / (seconds + sync) if seconds and sync is not None else None


@dataclass
class Finished:
    """What a process did."""

    returncode: int
    seconds: float
    cpu_seconds: float
    stdout: str
    stderr: str
    timed_out: bool
    others_cores: float | None
    tree_complete: bool
    leftovers_killed: int


def run_process(
    command: Sequence[str], logs: Path, timeout: float, env: dict[str, str] | None = None
) -> Finished:
    """Run ``command``; return its wall time and the CPU time of its whole process tree.

    The CPU time comes from ``wait4``: the process and every descendant it waited for, plus
    every descendant orphaned on the way (a ``forkserver`` and its workers, say), which come to
    this process because it is a child subreaper during the run and which it reaps after the
    command exits (waiting up to :data:`LEFTOVER_TIMEOUT_S` for them, then killing them). The
    wall time ends when the command exits. Output goes to files beside ``logs`` (``.out``,
    ``.err``). A command still running after ``timeout`` seconds is killed with its process
    group.
    """
    logs.parent.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs.with_suffix(".out"), logs.with_suffix(".err")
    subreaper = _set_child_subreaper(True)
    try:
        with out_path.open("w") as out, err_path.open("w") as err:
            busy_before = busy_cpu_seconds()
            started = time.perf_counter()
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
            )
            expired = threading.Event()

            def _kill() -> None:
                expired.set()
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)

            timer = threading.Timer(timeout, _kill)
            timer.start()
            try:
                _, status, usage = os.wait4(process.pid, 0)
            finally:
                timer.cancel()
            seconds = time.perf_counter() - started
            busy_after = busy_cpu_seconds()
        process.returncode = os.waitstatus_to_exitcode(status)
        leftover_cpu, leftovers_killed = _reap_leftovers(process.pid)
    finally:
        if subreaper:
            _set_child_subreaper(False)
    cpu_seconds = usage.ru_utime + usage.ru_stime + leftover_cpu
    others = None
    if busy_before is not None and busy_after is not None and seconds > 0:
        others = max(0.0, busy_after - busy_before - cpu_seconds) / seconds
    return Finished(
        returncode=process.returncode,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        timed_out=expired.is_set(),
        others_cores=others,
        tree_complete=subreaper,
        leftovers_killed=leftovers_killed,
    )


def _set_child_subreaper(on: bool) -> bool:
    """Make this process the reaper of its orphaned descendants (Linux); False if it cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _reap_leftovers(group: int) -> tuple[float, int]:
    """Reap every remaining child (orphans of the command); return their CPU seconds.

    Waits up to :data:`LEFTOVER_TIMEOUT_S` for them to exit by themselves, then kills the
    command's process group, and gives up on whatever is left after as long again. Also
    returns how many were killed.
    """
    cpu = 0.0
    killed = 0
    deadline = time.monotonic() + LEFTOVER_TIMEOUT_S
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            break  # no child left
        if pid:
            cpu += usage.ru_utime + usage.ru_stime
            killed += int(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL)
            continue
        now = time.monotonic()
        if now >= deadline + LEFTOVER_TIMEOUT_S:
            break
        if now >= deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        time.sleep(0.01)
    return cpu, killed


def busy_cpu_seconds() -> float | None:
    """CPU seconds every process of the machine has used since boot (``/proc/stat``)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    # user nice system idle iowait irq softirq steal (guest time is within user)
    ticks = [int(v) for v in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def wait_for_idle(limit_s: float) -> float | None:
    """Wait up to ``limit_s`` for one second in which the machine is nearly idle.

    Other processes (other people's tests) share the machine; this keeps them out of the
    figures when they pause. Returns the cores busy in the last second looked at.
    """
    deadline = time.monotonic() + limit_s
    while True:
        before = busy_cpu_seconds()
        time.sleep(1.0)
        after = busy_cpu_seconds()
        if before is None or after is None:
            return None
        load = after - before
        if load < IDLE_CORES or time.monotonic() >= deadline:
            return load


def _quote(text: str, lines: int = QUOTE_LINES) -> str:
    rows = text.rstrip().splitlines()
    if len(rows) > lines:
        rows = [f"[... {len(rows) - lines} earlier lines]", *rows[-lines:]]
    return "\n".join(rows) if rows else "(no output)"


def _failure(command: Sequence[str], finished: Finished, timeout: float) -> str:
    what = (
        f"killed after {timeout:.0f} s"
        if finished.timed_out
        else f"exited with {finished.returncode}"
    )
    return (
        f"`{shlex.join(command)}` {what}\n"
        f"--- stdout ---\n{_quote(finished.stdout)}\n--- stderr ---\n{_quote(finished.stderr)}"
    )


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _timed_sync() -> float:
    started = time.perf_counter()
    os.sync()
    return time.perf_counter() - started


@dataclass
class Tools:
    """Executables the benchmark runs."""

    imgindex: str
    dcm2niix: str
    export_available: bool
    export_help: str


def _imgindex_env() -> dict[str, str]:
    """This environment less ``IMGINDEX_*`` settings: imgindex runs with its defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith("IMGINDEX_")}


def _worker_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def find_tools(args: argparse.Namespace) -> Tools:
    """Locate imgindex and dcm2niix; see whether ``imgindex export`` exists yet.

    Raises
    ------
    BenchError
        If a needed executable is missing.
    """
    imgindex = args.imgindex
    if imgindex is None:
        beside = Path(sys.executable).parent / "imgindex"
        imgindex = str(beside) if beside.exists() else shutil.which("imgindex")
    if imgindex is None:
        raise BenchError("imgindex not found; pass --imgindex")
    dcm2niix = shutil.which(args.dcm2niix)
    if dcm2niix is None and "dcm2niix" in args.contenders:
        raise BenchError(
            f"{args.dcm2niix} not found; install it (apt-get install dcm2niix) or pass --dcm2niix"
        )
    done = subprocess.run(
        [imgindex, "export", "--help"],
        capture_output=True,
        text=True,
        env=_imgindex_env(),
        check=False,
        timeout=120,
    )
    return Tools(
        imgindex=imgindex,
        dcm2niix=dcm2niix or args.dcm2niix,
        export_available=done.returncode == 0,
        export_help=(done.stdout + done.stderr).strip(),
    )


def _command(
    contender: str, data_set: DataSet, indexed: Indexed, out: Path, tools: Tools
) -> list[str]:
    if contender in ("imgindex", "imgindex-none"):
        command = [tools.imgindex, "export", str(indexed.selection), "--root", str(indexed.root)]
        command += ["--out", str(out), "--no-progress"]
        if contender == "imgindex-none":
            command += ["--compressor", "none"]
        return command
    if contender == "dcm2niix":
        return [tools.dcm2niix, "-z", "n", "-o", str(out), str(data_set.directory)]
    script = str(Path(__file__).resolve())
    series_file = str(indexed.series_file)
    return [
        sys.executable,
        script,
        "--worker",
        "plain",
        "--series-file",
        series_file,
        "--out",
        str(out),
    ]


def _check_export(out: Path, data_set: DataSet, finished: Finished, run: Run) -> None:
    import pyarrow.parquet as pq

    manifest = out / "manifest.parquet"
    if not manifest.exists():
        raise RunError(f"exit status 0 but no {manifest}:\n{_quote(finished.stdout)}")
    table = pq.read_table(manifest)
    if table.num_rows != len(data_set.series):
        raise RunError(
            f"{manifest} lists {table.num_rows} arrays, expected one per series "
            f"({len(data_set.series)}):\n{_quote(finished.stdout)}"
        )
    if "shape" in table.column_names:
        slices = sum(int(shape[0]) for shape in table.column("shape").to_pylist())
        if slices != data_set.files:
            raise RunError(f"the manifest's arrays hold {slices} slices, expected {data_set.files}")
    already = ALREADY_RE.search(finished.stdout)
    if already and int(already.group(1)):
        raise RunError(
            f"the export skipped series as already complete (fresh store expected):\n"
            f"{_quote(finished.stdout)}"
        )
    summary = finished.stdout.strip()
    run.notes.append(summary)
    bytes_in = BYTES_IN_RE.search(summary)
    if bytes_in:
        reported = float(bytes_in.group(1).replace(",", "")) * 1e6
        if abs(reported - data_set.bytes) > 0.01 * data_set.bytes:
            run.notes.append(
                f"the export reports {reported / 1e6:,.1f} MB of DICOM in; the set's files hold "
                f"{data_set.bytes / 1e6:,.1f} MB"
            )


def _check_dcm2niix(out: Path, data_set: DataSet, run: Run) -> None:
    sidecars = list(out.glob("*.json"))
    volumes = list(out.glob("*.nii"))
    if len(sidecars) != len(data_set.series):
        raise RunError(
            f"dcm2niix wrote {len(sidecars)} sidecars (.json) and {len(volumes)} .nii files, "
            f"expected one series each for {len(data_set.series)} series"
        )
    extra = [p for p in volumes if re.search(r"_(Tilt|Eq)_\d+\.nii$", p.name)]
    if extra:
        run.notes.append(
            f"{len(volumes)} .nii files for {len(data_set.series)} series: {len(extra)} extra "
            "gantry-tilt-corrected (_Tilt_) or equidistant (_Eq_) copies, dcm2niix's default"
        )


def _check_plain(finished: Finished, data_set: DataSet) -> None:
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    if result["arrays"] != len(data_set.series) or result["slices"] != data_set.files:
        raise RunError(
            f"the loop wrote {result['arrays']} arrays of {result['slices']} slices, expected "
            f"{len(data_set.series)} of {data_set.files}"
        )


def run_once(
    case: Case,
    data_set: DataSet,
    indexed: Indexed,
    tools: Tools,
    work: Path,
    regime: str,
    number: int,
    timeout: float,
    idle_wait: float,
) -> Run:
    """One run of ``case``: cache, time, sync, check, measure, delete."""
    suffix = ".zarr" if case.contender in ("imgindex", "imgindex-none", "plain") else ""
    # A fresh name each run: the export's ledger remembers stores by path.
    out = work / "out" / f"{case.contender}-{data_set.name}-r{number}{suffix}"
    logs = work / "logs" / f"{case.contender}-{data_set.name}-r{number}"
    logs.parent.mkdir(parents=True, exist_ok=True)
    if case.contender == "dcm2niix":
        out.mkdir(parents=True)  # dcm2niix needs an existing folder
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
    command = _command(case.contender, data_set, indexed, out, tools)
    case.command = shlex.join(command)
    env = _worker_env() if case.contender == "plain" else _imgindex_env()
    load = wait_for_idle(idle_wait)
    if load is not None and load >= IDLE_CORES:
        print(f" (machine busy: {load:.1f} cores in use by others)", end="", file=sys.stderr)
    prepare_cache(regime, data_set.paths())
    run = Run()
    try:
        finished = run_process(command, logs, timeout, env)
        run.sync_seconds = _timed_sync()
        if finished.leftovers_killed:
            run.notes.append(
                f"{LABELS[case.contender]} on {data_set.name}: {finished.leftovers_killed} "
                f"processes it left behind were killed {LEFTOVER_TIMEOUT_S:.0f} s after it exited"
            )
        if not finished.tree_complete:
            run.notes.append(
                "could not become a child subreaper (prctl): CPU times miss descendants that "
                "were orphaned (a forkserver's workers, say)"
            )
        if finished.returncode != 0 or finished.timed_out:
            raise RunError(_failure(command, finished, timeout))
        if case.contender in ("imgindex", "imgindex-none"):
            _check_export(out, data_set, finished, run)
        elif case.contender == "dcm2niix":
            _check_dcm2niix(out, data_set, run)
        else:
            _check_plain(finished, data_set)
        run.seconds = finished.seconds
        run.cpu_seconds = finished.cpu_seconds
        run.others_cores = finished.others_cores
        run.output_bytes = _tree_bytes(out) if out.exists() else 0
    except RunError as exc:
        run.error = str(exc)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
    return run


@dataclass
class DiskRate:
    """dd's sequential write."""

    command: str
    bytes: int = 0
    seconds: float = 0.0
    wall_seconds: float = 0.0
    others_cores: float | None = None
    error: str | None = None

    @property
    def mb_per_s(self) -> float | None:
        """MB (10^6 bytes) per second, as dd timed it (fdatasync included)."""
        return self.bytes / 1e6 / self.seconds if self.seconds else None


def measure_disk(work: Path, dd_mb: int, timeout: float) -> DiskRate:
    """Time ``dd ... conv=fdatasync`` into ``work``."""
    target = work / "dd.bin"
    command = ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={dd_mb}", "conv=fdatasync"]
    rate = DiskRate(shlex.join(command))
    os.sync()
    try:
        finished = run_process(command, work / "logs" / "dd", timeout, dict(os.environ, LC_ALL="C"))
        if finished.returncode != 0 or finished.timed_out:
            rate.error = _failure(command, finished, timeout)
            return rate
        match = DD_RE.search(finished.stderr)
        rate.wall_seconds = finished.seconds
        rate.others_cores = finished.others_cores
        if match:
            rate.bytes = int(match.group(1))
            rate.seconds = float(match.group(2).replace(",", "."))
        else:
            rate.bytes, rate.seconds = dd_mb << 20, finished.seconds
    finally:
        target.unlink(missing_ok=True)
    print(
        f"  dd: {rate.bytes / 1e6:,.0f} MB in {rate.seconds:.2f} s = {rate.mb_per_s or 0:,.0f} "
        "MB/s",
        file=sys.stderr,
    )
    return rate


# --- the plain loop (worker) -------------------------------------------------------------------


def plain_loop(series_dirs: Sequence[Path], out: Path) -> dict[str, int]:
    """pydicom -> numpy -> zarr, one series at a time, in this process."""
    import numpy as np
    import pydicom
    import zarr

    group = zarr.open_group(out, mode="w")
    arrays = slices = 0
    for directory in series_dirs:
        datasets = [pydicom.dcmread(p) for p in sorted(directory.iterdir()) if p.is_file()]
        cosines = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
        normal = np.cross(cosines[:3], cosines[3:])
        datasets.sort(key=lambda ds: float(normal @ np.asarray(ds.ImagePositionPatient, float)))
        volume = np.stack([ds.pixel_array for ds in datasets])
        array = group.create_array(directory.name, shape=volume.shape, dtype=volume.dtype)
        array[...] = volume
        arrays += 1
        slices += volume.shape[0]
    return {"arrays": arrays, "slices": slices}


def worker(args: argparse.Namespace) -> int:
    """Run the plain loop over the folders listed in ``--series-file``; print a JSON line."""
    dirs = [Path(line) for line in args.series_file.read_text().splitlines() if line.strip()]
    print(json.dumps(plain_loop(dirs, args.out)))
    return 0


# --- the report --------------------------------------------------------------------------------


def _tb_per_day(mb_per_s: float) -> float:
    return mb_per_s * 86400 / 1e6


def _fmt(value: float | None, spec: str = ",.1f") -> str:
    return "n/a" if value is None else format(value, spec)


LABELS: Final = {
    "imgindex": "imgindex export",
    "imgindex-none": "imgindex export --compressor none",
    "dcm2niix": "dcm2niix -z n",
    "plain": "plain pydicom+zarr loop",
    "dd": "dd (disk write rate)",
}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(cases: Sequence[Case], disk: DiskRate | None) -> list[dict[str, Any]]:
    """imgindex's MB/s over each reference's, with the goals on the uncompressed set."""
    rows: list[dict[str, Any]] = []
    by_key = {(c.contender, c.set_name): c for c in cases}
    for case in cases:
        if not case.contender.startswith("imgindex"):
            continue
        mine, mine_durable = _mb(case), _mb(case, with_sync=True)
        dcm2niix, plain = (
            by_key.get(("dcm2niix", case.set_name)),
            by_key.get(("plain", case.set_name)),
        )
        dd = None if disk is None or disk.error is not None else disk.mb_per_s
        references: list[tuple[str, float | None, float | None, float | None]] = [
            # dd's rate already includes its fdatasync.
            ("disk write rate (dd)", dd, dd, GOAL_DISK),
            ("dcm2niix -z n", _mb(dcm2niix), _mb(dcm2niix, with_sync=True), GOAL_DCM2NIIX),
            ("plain loop", _mb(plain), _mb(plain, with_sync=True), None),
        ]
        for name, theirs, theirs_durable, goal in references:
            value = _ratio(mine, theirs)
            goal = goal if case.set_name == "ct" else None
            rows.append(
                {
                    "contender": case.contender,
                    "set": case.set_name,
                    "versus": name,
                    "ratio": value,
                    "ratio_with_sync": _ratio(mine_durable, theirs_durable),
                    "goal": goal,
                    "met": None if goal is None or value is None else value >= goal,
                }
            )
    return rows


def _mb(case: Case | None, *, with_sync: bool = False) -> float | None:
    if case is None or case.failed:
        return None
    return case.mb_per_s_with_sync if with_sync else case.mb_per_s


def format_report(
    sets: dict[str, DataSet],
    indexed: dict[str, Indexed],
    cases: Sequence[Case],
    disk: DiskRate | None,
    ratio_rows: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    notes: Sequence[str],
    repeat: int,
) -> str:
    """The Markdown report."""
    cores = meta["cpus"]
    lines = [
        "# imgindex export benchmark",
        (
            f"# {meta['date']}, {meta['host']}, {cores} CPUs, {meta['memory_gib']:.0f} GiB RAM, "
            f"outputs on {meta['work_fs']} ({meta['work']}); {meta['versions']}; git {meta['git']}"
        ),
        f"# command: {meta['command']}",
        f"# page cache: {meta['regime_reason']}",
    ]
    for data_set in sets.values():
        lines.append(
            f"# set {data_set.name}: {len(data_set.series)} series ("
            f"{min(s.files for s in data_set.series)}-{max(s.files for s in data_set.series)} "
            f"slices), {data_set.files:,} files, {data_set.bytes / 1e6:,.0f} MB of DICOM, "
            f"{data_set.raw_bytes / 1e6:,.0f} MB decoded; {data_set.description}; in "
            f"{data_set.directory}; indexed in {indexed[data_set.name].seconds:.1f} s"
        )
    lines += [
        (
            f"# each run a fresh process and a fresh output; wall = whole process; median of "
            f"{repeat}; MB = 10^6 bytes of DICOM input; TB/day = MB/s * 86400 / 10^6; cpu = "
            f"process tree (wait4); core use = cpu / (wall * {cores}); then sync = `sync` right "
            "after the run, flushing what the contender left in the page cache (near 0 when it "
            "made its output durable itself, as dd's fdatasync does); MB/s+sync counts it; "
            "others = cores other processes (and kernel threads) kept busy during the run (the "
            "most of any run; the machine may be shared)"
        ),
        "",
        (
            f"| contender | set | median s (of {repeat}) | runs (s) | MB/s | TB/day | cpu s "
            "| core use | then sync s | MB/s+sync | output MB | others |"
        ),
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if disk is not None:
        mbs = disk.mb_per_s
        lines.append(
            f"| {LABELS['dd']} | {disk.bytes / 2**20:,.0f} MiB | {_fmt(disk.seconds, '.2f')} "
            f"| {disk.wall_seconds:.2f} wall | {_fmt(mbs, ',.0f')} "
            f"| {_fmt(_tb_per_day(mbs) if mbs else None, '.1f')} | | | | | "
            f"| {_fmt(disk.others_cores, '.2f')} |"
            if disk.error is None
            else f"| {LABELS['dd']} | | failed | | | | | | | | | |"
        )
    for case in cases:
        if case.failed:
            failed = sum(1 for r in case.runs if r.error is not None)
            lines.append(
                f"| {LABELS[case.contender]} | {case.set_name} | failed ({failed} of "
                f"{len(case.runs)} runs) | | | | | | | | | |"
            )
            continue
        seconds = case.median()
        mbs = case.mb_per_s
        cpu = case.median("cpu_seconds")
        sync = case.median("sync_seconds")
        with_sync = case.input_bytes / 1e6 / (seconds + sync) if seconds and sync else None
        out = case.median("output_bytes")
        others = max((r.others_cores for r in case.ok if r.others_cores is not None), default=None)
        lines.append(
            f"| {LABELS[case.contender]} | {case.set_name} | {_fmt(seconds, '.2f')} "
            f"| {', '.join(f'{r.seconds:.2f}' for r in case.ok)} | {_fmt(mbs, ',.0f')} "
            f"| {_fmt(_tb_per_day(mbs) if mbs else None, '.1f')} | {_fmt(cpu, '.1f')} "
            f"| {_fmt(_ratio(cpu, (seconds or 0) * cores), '.0%')} | {_fmt(sync, '.2f')} "
            f"| {_fmt(with_sync, ',.0f')} | {_fmt(out / 1e6 if out is not None else None, ',.0f')} "
            f"| {_fmt(others, '.2f')} |"
        )
    lines += [
        "",
        (
            "| imgindex | set | versus | ratio of MB/s | goal | met | ratio of MB/s+sync "
            "(both durable) |"
        ),
        "|---|---|---|---:|---|---|---:|",
    ]
    for row in ratio_rows:
        goal = f">= {row['goal']:.1f}" if row["goal"] is not None else "-"
        met = {True: "yes", False: "NO", None: "-"}[row["met"]]
        lines.append(
            f"| {LABELS[row['contender']]} | {row['set']} | {row['versus']} "
            f"| {_fmt(row['ratio'], '.2f')} | {goal} | {met} "
            f"| {_fmt(row['ratio_with_sync'], '.2f')} |"
        )
    lines += ["", f"For scale: a large hospital platform moves {PLATFORM_TB_PER_DAY} TB/day."]
    for case in cases:
        if case.contender.startswith("imgindex") and not case.failed and case.mb_per_s:
            tb = _tb_per_day(case.mb_per_s)
            cpu, wall = case.median("cpu_seconds"), case.median()
            cores_busy = f"{cpu / wall:.2f}" if cpu is not None and wall else "n/a"
            lines.append(
                f"- {LABELS[case.contender]} on {case.set_name}: {tb:.1f} TB/day on this machine "
                f"({cores} CPUs) = {tb / PLATFORM_TB_PER_DAY:.1f}x that; it kept {cores_busy} of "
                f"the {cores} cores busy (median cpu / median wall)"
            )
    lines += ["", "Commands (one run each; the output path changes from run to run):"]
    for name, ix in indexed.items():
        lines.append(f"- index {name}: `{shlex.join(ix.command)}`")
    if disk is not None:
        lines.append(f"- dd: `{disk.command}`")
    for case in cases:
        if case.command:
            lines.append(f"- {LABELS[case.contender]} on {case.set_name}: `{case.command}`")
    seen_notes = list(notes)
    for case in cases:
        if case.contender.startswith("imgindex") and case.ok:
            first = case.ok[0]
            seen_notes.append(
                f"{LABELS[case.contender]} on {case.set_name} printed (run "
                f"{case.runs.index(first) + 1}):\n```\n{_quote(first.notes[0], 20)}\n```"
            )
        for number, run in enumerate(case.runs, start=1):
            shown = run.notes[1:] if case.contender.startswith("imgindex") else run.notes
            for note in shown:
                if note and note not in seen_notes:
                    seen_notes.append(note)
            if run.error is not None:
                seen_notes.append(
                    f"{LABELS[case.contender]} on {case.set_name}, run {number} FAILED:\n"
                    f"```\n{run.error}\n```"
                )
    if disk is not None and disk.error is not None:
        seen_notes.append(f"dd FAILED:\n```\n{disk.error}\n```")
    busy = [
        (LABELS[c.contender], c.set_name, n, r.others_cores)
        for c in cases
        for n, r in enumerate(c.runs, start=1)
        if r.others_cores is not None and r.others_cores > BUSY_WARNING_CORES
    ]
    if busy:
        worst = max(busy, key=lambda b: b[3] or 0.0)
        seen_notes.append(
            f"the machine was shared: in {len(busy)} of {sum(len(c.runs) for c in cases)} runs "
            f"other processes kept more than {BUSY_WARNING_CORES} cores busy (at most "
            f"{worst[3]:.2f} of {cores}, {worst[0]} on {worst[1]} run {worst[2]}); those runs "
            "are slower than on an idle machine"
        )
    if seen_notes:
        lines += ["", "Notes:"]
        lines += [f"- {note}" for note in seen_notes]
    return "\n".join(lines)


# --- machine -----------------------------------------------------------------------------------


def _memory_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def _filesystem(path: Path) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["df", "--output=source,fstype", str(path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return " ".join(done.stdout.splitlines()[-1].split())
    return "unknown"


def _versions(tools: Tools) -> str:
    import numpy
    import pydicom
    import zarr

    dcm2niix = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        text = subprocess.run(
            [tools.dcm2niix, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        dcm2niix = text.strip().splitlines()[-1] if text.strip() else "?"
    return (
        f"Python {platform.python_version()}, pydicom {pydicom.__version__}, zarr "
        f"{zarr.__version__}, numpy {numpy.__version__}, dcm2niix {dcm2niix}"
    )


def command_line() -> str:
    """This run's command, as typed from the current folder."""
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), *sys.argv])


# --- main --------------------------------------------------------------------------------------


def _bench(args: argparse.Namespace, work: Path) -> int:
    tools = find_tools(args)
    notes: list[str] = []
    contenders = [c for c in args.contenders if c != "dd"]
    if not tools.export_available:
        for name in ("imgindex", "imgindex-none"):
            if name in contenders:
                contenders.remove(name)
        notes.append(
            "imgindex export is not available yet (`imgindex export --help` failed): skipped\n"
            f"```\n{_quote(tools.export_help, 40)}\n```"
        )
        print("imgindex export not available: skipping it", file=sys.stderr)
    targets = {"ct": int(args.gb * 1e9), "j2k": int(args.j2k_mb * 1e6)}
    targets = {k: v for k, v in targets.items() if k in args.sets}
    check_disk(targets, args.data, work, args.dd_mb << 20)
    args.data.mkdir(parents=True, exist_ok=True)
    sets = {kind: generate(kind, target, args.data) for kind, target in targets.items()}
    indexed = {kind: index_set(data_set, tools.imgindex, work) for kind, data_set in sets.items()}
    regime, reason = choose_regime(args.cache)
    print(f"page cache: {reason}", file=sys.stderr)
    disk = measure_disk(work, args.dd_mb, args.timeout) if "dd" in args.contenders else None
    cases = [
        Case(contender, kind, data_set.bytes)
        for kind, data_set in sets.items()
        for contender in contenders
    ]
    for kind, data_set in sets.items():
        for number in range(1, args.repeat + 1):
            for case in (c for c in cases if c.set_name == kind):
                print(f"  {case.contender} on {kind}, run {number}...", end="", file=sys.stderr)
                run = run_once(
                    case,
                    data_set,
                    indexed[kind],
                    tools,
                    work,
                    regime,
                    number,
                    args.timeout,
                    args.idle_wait,
                )
                case.runs.append(run)
                if run.error is None:
                    print(
                        f" {run.seconds:.2f} s, {data_set.bytes / 1e6 / (run.seconds or 1):,.0f} "
                        f"MB/s, cpu {run.cpu_seconds:.1f} s, then sync {run.sync_seconds:.2f} s",
                        file=sys.stderr,
                    )
                else:
                    print(" FAILED:\n" + run.error, file=sys.stderr)
    ratio_rows = ratios(cases, disk)
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": available_cpus(),
        "memory_gib": _memory_gib(),
        "work": str(work),
        "work_fs": _filesystem(work),
        "versions": _versions(tools),
        "git": git_revision(),
        "command": command_line(),
        "regime": regime,
        "regime_reason": reason,
    }
    print(format_report(sets, indexed, cases, disk, ratio_rows, meta, notes, args.repeat))
    if args.json is not None:
        figures = {
            "meta": meta,
            "sets": {
                k: {
                    "directory": str(s.directory),
                    "description": s.description,
                    "series": len(s.series),
                    "files": s.files,
                    "bytes": s.bytes,
                    "decoded_bytes": s.raw_bytes,
                    "index_seconds": indexed[k].seconds,
                }
                for k, s in sets.items()
            },
            "disk": None if disk is None else {**asdict(disk), "mb_per_s": disk.mb_per_s},
            "cases": [
                {
                    "contender": c.contender,
                    "set": c.set_name,
                    "command": c.command,
                    "failed": c.failed,
                    "median_seconds": c.median(),
                    "mb_per_s": None if c.failed else c.mb_per_s,
                    "tb_per_day": None if c.failed or not c.mb_per_s else _tb_per_day(c.mb_per_s),
                    "median_cpu_seconds": c.median("cpu_seconds"),
                    "median_sync_seconds": c.median("sync_seconds"),
                    "runs": [asdict(r) for r in c.runs],
                }
                for c in cases
            ],
            "ratios": list(ratio_rows),
            "platform_tb_per_day": PLATFORM_TB_PER_DAY,
            "notes": notes,
        }
        args.json.write_text(json.dumps(figures, indent=2))
    failed = any(c.failed for c in cases) or (disk is not None and disk.error is not None)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    parent = args.work or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-export-", dir=parent))
    try:
        return _bench(args, work)
    except (BenchError, OSError) as exc:
        print(f"bench_export.py: error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
