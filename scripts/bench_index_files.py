"""Benchmark header indexing: imgindex against a plain pydicom loop and DCMTK's dcmdump.

Usage::

    python scripts/bench_index_files.py [--slices 3000] [--workers N] [--keep DIR] [--repeat 5]

Generates ``--slices`` uncompressed 512x512 CT slices (a few series of at most
:data:`SLICES_PER_SERIES` slices, :func:`imgindex.testing.write_ct_series`), reads every file
once so that all contenders read from the page cache, then times on the same files:

* ``pydicom loop``: ``pydicom.dcmread(f, stop_before_pixels=True)`` over every file, in this
  process (reference 1);
* ``dcmdump -M``: DCMTK's ``dcmdump -M`` (long values such as pixel data not loaded) in a few
  large invocations, output to ``/dev/null`` (reference 2);
* ``imgindex workers=N`` and ``imgindex workers=1``: :func:`imgindex.crawl.index_files` into a
  fresh index root, end to end (walk, parse, Delta commits).

Each contender runs ``--repeat`` times, interleaved, and its best time counts. The table goes
to stdout as Markdown; progress goes to stderr. MB/s counts whole files (pixel data included),
the same bytes for every contender, although header readers skip the pixel data.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pydicom
from _bench import available_cpus

from imgindex.crawl import index_files, iter_files
from imgindex.schema import DEFAULT_ATTRIBUTES

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

#: Largest series generated; 3000 slices make 6 series.
SLICES_PER_SERIES: Final = 500
#: Files per ``dcmdump`` invocation (keeps the command line well under ARG_MAX).
DCMDUMP_BATCH_FILES: Final = 1000
#: Records what a ``--keep`` folder holds, so a reused folder matches the options.
MANIFEST_NAME: Final = "bench_index_files.json"
#: Seed of the first series; series ``i`` uses ``SEED + i``.
SEED: Final = 20240
_READ_CHUNK: Final = 1 << 20


@dataclass
class Timing:
    """Best time of one contender over the repeats."""

    name: str
    seconds: float
    files: int
    bytes: int

    @property
    def files_per_s(self) -> float:
        """Files per second."""
        return self.files / self.seconds

    @property
    def mb_per_s(self) -> float:
        """Megabytes (10^6) of DICOM per second."""
        return self.bytes / 1e6 / self.seconds


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser (a function of its own so tests can call it)."""
    parser = argparse.ArgumentParser(
        prog="bench_index_files.py",
        description="Time header indexing: imgindex vs a pydicom loop vs dcmdump -M.",
    )
    parser.add_argument(
        "--slices",
        type=_positive_int,
        default=3000,
        help="CT slices to generate (default 3000)",
    )
    parser.add_argument(
        "--size", type=_positive_int, default=512, help="rows and columns per slice (default 512)"
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=available_cpus(),
        help=f"imgindex worker processes (default all CPUs: {available_cpus()})",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="generate the files into DIR and keep them; reuse them if DIR already holds them",
    )
    parser.add_argument(
        "--repeat",
        type=_positive_int,
        default=5,
        help="runs per contender, best counts (default 5)",
    )
    parser.add_argument(
        "--dcmdump", default="dcmdump", help="dcmdump executable (default: dcmdump on PATH)"
    )
    return parser


def _write_series(out_dir: Path, seed: int, n_slices: int, size: int) -> int:
    # Imported here: index_files' worker processes re-import this script (forkserver), and
    # the generator is no part of what they time.
    from imgindex.testing import write_ct_series

    return len(write_ct_series(out_dir, seed=seed, n_slices=n_slices, size=size))


def prepare_files(data_dir: Path, *, slices: int, size: int, workers: int) -> list[Path]:
    """Write the series into ``data_dir`` (or reuse them) and return the files, sorted.

    Raises
    ------
    FileExistsError
        If ``data_dir`` holds something other than files from the same options.
    """
    counts = [
        min(SLICES_PER_SERIES, slices - start) for start in range(0, slices, SLICES_PER_SERIES)
    ]
    manifest = {"slices": slices, "size": size, "seed": SEED, "series": counts}
    manifest_path = data_dir / MANIFEST_NAME
    if manifest_path.exists():
        if json.loads(manifest_path.read_text()) == manifest:
            print(f"reusing {slices} files in {data_dir}", file=sys.stderr)
            return _data_files(data_dir)
        raise FileExistsError(
            f"{data_dir} holds files generated with other options ({manifest_path}); "
            "use another --keep folder or delete it"
        )
    if data_dir.exists() and any(data_dir.iterdir()):
        raise FileExistsError(f"{data_dir} is not empty and was not made by this script")
    data_dir.mkdir(parents=True, exist_ok=True)
    print(f"generating {slices} CT slices of {size}x{size} in {data_dir}...", file=sys.stderr)
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        jobs = [
            pool.submit(_write_series, data_dir / f"series{i:03d}", SEED + i, n, size)
            for i, n in enumerate(counts)
        ]
        written = sum(job.result() for job in jobs)
    manifest_path.write_text(json.dumps(manifest))
    print(f"  {written} files in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return _data_files(data_dir)


def series_dirs(data_dir: Path) -> list[Path]:
    """The series folders (the manifest beside them is not a DICOM file)."""
    return sorted(p for p in data_dir.iterdir() if p.is_dir())


def _data_files(data_dir: Path) -> list[Path]:
    return list(iter_files(series_dirs(data_dir)))


def warm_page_cache(files: Sequence[Path]) -> float:
    """Read every file whole once so later reads come from the page cache; return seconds."""
    started = time.perf_counter()
    for path in files:
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


def run_pydicom_loop(files: Sequence[Path]) -> None:
    """Reference 1: read every header with pydicom, one process."""
    for path in files:
        pydicom.dcmread(path, stop_before_pixels=True)


def run_dcmdump(files: Sequence[Path], executable: str) -> None:
    """Reference 2: ``dcmdump -M`` over the files in a few invocations, output discarded.

    Raises
    ------
    RuntimeError
        If dcmdump fails on any file.
    """
    names = [str(p) for p in files]
    for start in range(0, len(names), DCMDUMP_BATCH_FILES):
        done = subprocess.run(
            [executable, "-M", *names[start : start + DCMDUMP_BATCH_FILES]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{executable} exited with {done.returncode}: {done.stderr[-500:]!r}"
            )


def run_index_files(series: Sequence[Path], root: Path, n_files: int, workers: int) -> None:
    """imgindex end to end into ``root``, which must not exist yet.

    Raises
    ------
    RuntimeError
        If the index does not hold one row per file.
    """
    summary = index_files(series, root, attributes=DEFAULT_ATTRIBUTES, workers=workers)
    if summary.instances != n_files or summary.files != n_files:
        raise RuntimeError(
            f"index_files indexed {summary.instances} instances from {summary.files} files, "
            f"expected {n_files} (rejects: {summary.rejects_by_reason})"
        )


def measure(
    contenders: Sequence[tuple[str, Callable[[], None]]],
    *,
    repeat: int,
    files: int,
    total_bytes: int,
) -> list[Timing]:
    """Run each contender ``repeat`` times, interleaved; keep each one's best time."""
    best: dict[str, float] = {}
    for round_no in range(1, repeat + 1):
        for name, run in contenders:
            started = time.perf_counter()
            run()
            seconds = time.perf_counter() - started
            print(
                f"  round {round_no}/{repeat} {name}: {seconds:.2f} s "
                f"({files / seconds:,.0f} files/s)",
                file=sys.stderr,
            )
            best[name] = min(seconds, best.get(name, float("inf")))
    return [Timing(name, best[name], files, total_bytes) for name, _ in contenders]


def format_table(timings: Sequence[Timing], *, pydicom_name: str, dcmdump_name: str) -> str:
    """Return the results as a Markdown table."""
    by_name = {t.name: t for t in timings}
    ref_pydicom = by_name[pydicom_name].files_per_s
    ref_dcmdump = by_name[dcmdump_name].files_per_s
    lines = [
        "| contender | seconds | files/s | MB/s | vs pydicom loop | vs dcmdump -M |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {t.name} | {t.seconds:.2f} | {t.files_per_s:,.0f} | {t.mb_per_s:,.0f} "
        f"| {t.files_per_s / ref_pydicom:.2f}x | {t.files_per_s / ref_dcmdump:.2f}x |"
        for t in timings
    ]
    return "\n".join(lines)


def _dcmdump_version(executable: str) -> str:
    try:
        out = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, check=False, timeout=10
        ).stdout
    except OSError:
        return "unknown"
    return out.splitlines()[0].strip("$ ") if out else "unknown"


def _bench(args: argparse.Namespace, data_dir: Path, scratch: Path) -> int:
    files = prepare_files(data_dir, slices=args.slices, size=args.size, workers=args.workers)
    total_bytes = sum(p.stat().st_size for p in files)
    available = _mem_available_bytes()
    if available is not None and total_bytes > available // 2:
        print(
            f"warning: {total_bytes / 1e9:.1f} GB of files vs {available / 1e9:.1f} GB of free "
            "memory; the page cache may not hold them all and the figures mix in disk reads",
            file=sys.stderr,
        )
    warm_s = warm_page_cache(files)
    print(
        f"warm-up: read all {len(files)} files ({total_bytes / 1e6:,.0f} MB) in {warm_s:.1f} s; "
        "every contender reads from the page cache",
        file=sys.stderr,
    )

    series = series_dirs(data_dir)
    roots = (scratch / f"index{n:03d}" for n in itertools.count())

    def index_with(workers: int) -> Callable[[], None]:
        # A fresh index root per run; the roots are deleted with `scratch`, after the timings.
        return lambda: run_index_files(series, next(roots), len(files), workers)

    pydicom_name, dcmdump_name = "pydicom dcmread loop (1 process)", "dcmdump -M (1 process)"
    contenders: list[tuple[str, Callable[[], None]]] = [
        (pydicom_name, lambda: run_pydicom_loop(files)),
        (dcmdump_name, lambda: run_dcmdump(files, args.dcmdump)),
        (f"imgindex index_files workers={args.workers}", index_with(args.workers)),
    ]
    if args.workers != 1:
        contenders.append(("imgindex index_files workers=1", index_with(1)))
    timings = measure(contenders, repeat=args.repeat, files=len(files), total_bytes=total_bytes)

    print(
        f"# {len(files)} CT slices of {args.size}x{args.size} "
        f"({total_bytes / 1e6:,.0f} MB, explicit VR little endian), best of {args.repeat}"
    )
    print(
        f"# {dt.date.today().isoformat()}, {platform.node()}, {available_cpus()} CPUs, "
        f"Python {platform.python_version()}, pydicom {pydicom.__version__}, "
        f"{_dcmdump_version(args.dcmdump)}"
    )
    print(
        "# page cache warmed first: every contender reads from memory; "
        "MB/s counts whole files (pixel data included)"
    )
    print(format_table(timings, pydicom_name=pydicom_name, dcmdump_name=dcmdump_name))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    args = build_parser().parse_args(argv)
    if shutil.which(args.dcmdump) is None:
        print(
            f"bench_index_files.py: error: {args.dcmdump} not found; install DCMTK "
            "(apt-get install dcmtk) or pass --dcmdump",
            file=sys.stderr,
        )
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="bench-index-files-") as tmp:
            data_dir = args.keep if args.keep is not None else Path(tmp) / "data"
            return _bench(args, data_dir, Path(tmp))
    except (FileExistsError, RuntimeError) as exc:
        print(f"bench_index_files.py: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
