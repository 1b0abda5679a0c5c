"""Benchmark the DICOMweb crawler against the bare HTTP requests a crawl needs, on Orthanc.

Usage::

    python scripts/bench_crawl.py [--series 2000] [--instances-per-series 3] [--size 16]
        [--concurrency 8[,4]] [--repeats 3] [--page-size 1000] [--data DIR] [--keep]
        [--profile]

A private Orthanc 1.10 with its DICOMweb plugin (``tests/peers/orthanc.py``; loopback only,
never ``orthanc-gdcm``) serves ``--series`` CT series of ``--instances-per-series`` slices of
``--size`` x ``--size`` pixels, :data:`SERIES_PER_STUDY` series per study, the studies spread
over the days of :data:`FIRST_STUDY_DATE`'s year (:func:`imgindex.testing.make_series`). Both
contenders run with the same concurrency (``--concurrency``: requests in flight, threads and
keep-alive connections) against the same Orthanc, in the same run:

* ``bare requests`` (the reference): a plain :class:`httpx.Client` (keep-alive,
  ``limits=N``) and a :class:`~concurrent.futures.ThreadPoolExecutor` of ``N`` threads
  fetching the URLs a crawl needs, with the crawler's query parameters and ``Accept``
  header: ``GET studies`` (``limit=--page-size``, paged with ``offset`` until a short page),
  then per study ``GET studies/{study}/series``, then per series ``GET
  studies/{study}/series/{series}/metadata`` (each study is one task: its series list, then
  its series' metadata). Every body is read and decoded with :func:`json.loads`, as any
  client must; nothing else is done with it;
* ``imgindex crawl``: ``DicomWebCrawl(DicomWebClient(url, concurrency=N), root,
  page_size=--page-size).run()`` into a fresh index root: a full crawl (studies listed by
  StudyDate window, series listed, series metadata fetched, rows extracted and committed to
  the Delta tables with ``crawl_state``).

Each contender runs ``--repeats`` times, interleaved (the order alternates between rounds),
after a warm-up (Orthanc's storage and index files read once into the page cache, and one
study search); the median counts. The ratio is imgindex instances/s divided by the
reference's. Then an incremental crawl runs once on the last full crawl's root, with nothing
changed on the server: its time is the cost of a crawl that finds nothing new. Around every
run the CPU time of Orthanc (``/proc/PID/stat`` utime + stime, all its threads) and of this
process (:func:`resource.getrusage`, all threads) is measured: on a 2-core machine the server
and the client compete for the same CPUs. Every run is checked: the instances and series seen
must be the ones loaded, and the crawl must report no failure, reject or shortfall.

With ``--profile``, one more full imgindex crawl per concurrency runs afterwards under
cProfile in every thread it starts, and the top functions (all threads by cumulative and by
own time, and the main thread alone) go to ``profile-cN-pP.txt`` in the data folder.

The data is cached under ``--data DIR`` (default :data:`DEFAULT_DATA`), in a folder named
after the parameters: the generated files, and Orthanc's storage and index, so a later run
starts Orthanc on the stored instances instead of loading them again. The table goes to
stdout as Markdown, with the exact command; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import io
import itertools
import json
import os
import platform
import pstats
import resource
import shlex
import shutil
import statistics
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx
from _bench import available_cpus, git_revision

from dicomweb.client import DicomWebClient
from imgindex.crawl.web import DicomWebCrawl

ROOT: Final = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from peers.orthanc import Orthanc, OrthancError, start_orthanc

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from dicomweb.client import RequestEvent
    from imgindex.crawl.web import CrawlSummary

#: Default cache of generated files and Orthanc storage.
DEFAULT_DATA: Final = Path("/tmp/bench-crawl-data")
#: Series per study (so ``--series`` should be even).
SERIES_PER_STUDY: Final = 2
#: Study dates run from this day, one day per study, wrapping after :data:`DATE_SPAN_DAYS`.
FIRST_STUDY_DATE: Final = dt.date(2023, 1, 1)
DATE_SPAN_DAYS: Final = 365
#: Study ``s`` is generated with seed ``SEED + s`` (patient and study); its series ``k`` with
#: seed ``(SEED + s) * 10 + k``.
SEED: Final = 700_000
#: Studies per generation job, and processes generating.
STUDIES_PER_JOB: Final = 50
GENERATE_WORKERS: Final = 2
#: Threads posting files to Orthanc while loading it.
UPLOAD_THREADS: Final = 4
#: ``limit`` of every QIDO-RS request by default: the crawler's default ``page_size``.
PAGE_SIZE: Final = 1000
#: The crawler's includefield values (imgindex.crawl.web): StudyDate,
#: NumberOfStudyRelatedSeries, NumberOfStudyRelatedInstances; then
#: NumberOfSeriesRelatedInstances and Modality.
STUDY_FIELDS: Final = ("00080020", "00201206", "00201208")
SERIES_FIELDS: Final = ("00201209", "00080060")
#: Media type of QIDO-RS answers and WADO-RS metadata (PS3.18 8.7.3.5.2).
DICOM_JSON: Final = "application/dicom+json"
#: Seconds to connect and between reads, for the reference (the crawler's own default).
TIMEOUT: Final = httpx.Timeout(60.0, connect=10.0)
#: Written when the generated files are complete, and when Orthanc holds them all.
FILES_MANIFEST: Final = "files.json"
LOADED_MANIFEST: Final = "orthanc-loaded.json"
#: Lines of each sort order in the profile file.
PROFILE_LINES: Final = 25
_STUDY_UID: Final = "0020000D"
_SERIES_UID: Final = "0020000E"
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A setup step or a check failed (the figures would mean nothing)."""


# --- arguments ---------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [_positive_int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of positive integers: {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return list(dict.fromkeys(values))


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser (a function of its own so tests can call it)."""
    parser = argparse.ArgumentParser(
        prog="bench_crawl.py",
        description="Time a DICOMweb crawl of Orthanc: imgindex's crawler vs the bare HTTP "
        "requests it needs.",
    )
    parser.add_argument(
        "--series",
        type=_positive_int,
        default=2000,
        help=f"CT series on the server, {SERIES_PER_STUDY} per study (default 2000)",
    )
    parser.add_argument(
        "--instances-per-series",
        type=_positive_int,
        default=3,
        help="instances per series (default 3)",
    )
    parser.add_argument(
        "--size",
        type=_positive_int,
        default=16,
        help="rows and columns of each slice (default 16)",
    )
    parser.add_argument(
        "--concurrency",
        type=_int_list,
        default=[8],
        metavar="N[,N]",
        help="requests in flight (threads and connections) for both contenders; a list "
        "runs each in turn (default 8)",
    )
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        default=3,
        help="timed runs per contender, interleaved; the median counts (default 3)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        metavar="DIR",
        help=f"cache of the generated files and Orthanc's storage (default {DEFAULT_DATA})",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the crawls' index roots and Orthanc's configuration and log (default: "
        "delete them at the end)",
    )
    parser.add_argument(
        "--page-size",
        type=_positive_int,
        default=PAGE_SIZE,
        help=f"QIDO-RS limit of both contenders (the crawler's page_size; default {PAGE_SIZE}, "
        "the crawler's default)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="afterwards, profile one more imgindex crawl per concurrency (cProfile, every "
        "thread) into DATA/crawl-.../profile-cN-pP.txt",
    )
    return parser


# --- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What the server holds, and where it is cached."""

    series: int
    instances_per_series: int
    size: int
    directory: Path

    @property
    def studies(self) -> int:
        """Studies (the last one may hold fewer series)."""
        return -(-self.series // SERIES_PER_STUDY)

    @property
    def instances(self) -> int:
        """Instances."""
        return self.series * self.instances_per_series

    @property
    def files_dir(self) -> Path:
        """The generated DICOM files."""
        return self.directory / "files"

    @property
    def storage_overrides(self) -> dict[str, str]:
        """Orthanc options that put its storage and index in the cache."""
        return {
            "StorageDirectory": str(self.directory / "orthanc" / "storage"),
            "IndexDirectory": str(self.directory / "orthanc" / "index"),
        }

    @property
    def manifest(self) -> dict[str, object]:
        """Parameters of the generated data."""
        return {
            "generator": "imgindex.testing.make_series",
            "series": self.series,
            "instances_per_series": self.instances_per_series,
            "size": self.size,
            "series_per_study": SERIES_PER_STUDY,
            "seed": SEED,
            "first_study_date": FIRST_STUDY_DATE.isoformat(),
            "date_span_days": DATE_SPAN_DAYS,
        }

    def description(self) -> str:
        """One line for the table's header."""
        return (
            f"{self.studies:,} studies, {self.series:,} CT series x {self.instances_per_series} "
            f"instances of {self.size}x{self.size} = {self.instances:,} instances"
        )


def _write_studies(out_dir: Path, first: int, last: int, n_series: int, n: int, size: int) -> int:
    """Write studies ``first..last-1`` (series ``k`` of study ``s`` is global series
    ``s * SERIES_PER_STUDY + k``, only those below ``n_series``); return files written."""
    # Imported here: generating is no part of what the benchmark times.
    from imgindex.testing import make_patient, make_series, make_study_info, write_dataset

    written = 0
    for s in range(first, last):
        seed = SEED + s
        patient = make_patient(seed)
        date = FIRST_STUDY_DATE + dt.timedelta(days=s % DATE_SPAN_DAYS)
        study = make_study_info(seed, patient, study_date=date.strftime("%Y%m%d"))
        for k in range(SERIES_PER_STUDY):
            if s * SERIES_PER_STUDY + k >= n_series:
                break
            series = make_series(
                seed * 10 + k,
                "CT",
                n,
                size,
                size,
                patient=patient,
                study=study,
                series_number=k + 1,
            )
            for i, ds in enumerate(series):
                write_dataset(ds, out_dir / f"st{s:05d}-se{k}-im{i:03d}.dcm")
                written += 1
    return written


def _data_files(data: Workload) -> list[Path]:
    return sorted(p for p in data.files_dir.rglob("*.dcm"))


def generate_files(data: Workload) -> list[Path]:
    """Write the DICOM files into the cache (or reuse them) and return them.

    Raises
    ------
    BenchError
        If the cache holds files that do not match its manifest.
    """
    manifest_path = data.directory / FILES_MANIFEST
    if manifest_path.exists():
        files = _data_files(data)
        if json.loads(manifest_path.read_text()) != data.manifest or len(files) != data.instances:
            raise BenchError(
                f"{data.files_dir} holds {len(files)} files that do not match {manifest_path}; "
                f"delete {data.directory}"
            )
        print(f"reusing {len(files):,} generated files in {data.files_dir}", file=sys.stderr)
        return files
    shutil.rmtree(data.files_dir, ignore_errors=True)
    print(f"generating {data.description()} in {data.files_dir}...", file=sys.stderr)
    started = time.perf_counter()
    with ProcessPoolExecutor(GENERATE_WORKERS) as pool:
        jobs = []
        for job, first in enumerate(range(0, data.studies, STUDIES_PER_JOB)):
            out = data.files_dir / f"job{job:04d}"
            out.mkdir(parents=True)
            last = min(first + STUDIES_PER_JOB, data.studies)
            jobs.append(
                pool.submit(
                    _write_studies,
                    out,
                    first,
                    last,
                    data.series,
                    data.instances_per_series,
                    data.size,
                )
            )
        written = sum(job.result() for job in jobs)
    if written != data.instances:
        raise BenchError(f"generated {written} files, expected {data.instances}")
    manifest_path.write_text(json.dumps(data.manifest))
    print(f"  {written:,} files in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return _data_files(data)


def upload(orthanc: Orthanc, files: Sequence[Path]) -> None:
    """Post ``files`` to Orthanc from :data:`UPLOAD_THREADS` threads (already stored: fine)."""
    print(
        f"uploading {len(files):,} files to Orthanc ({UPLOAD_THREADS} threads)...", file=sys.stderr
    )
    started = time.perf_counter()
    shares = [files[i::UPLOAD_THREADS] for i in range(UPLOAD_THREADS)]
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        posted = sum(pool.map(orthanc.upload, shares))
    seconds = time.perf_counter() - started
    print(f"  {posted:,} files in {seconds:.1f} s ({posted / seconds:,.0f}/s)", file=sys.stderr)


@contextlib.contextmanager
def running_orthanc(data: Workload, work: Path) -> Iterator[Orthanc]:
    """Start Orthanc on the cached storage, loading it first if it is not complete.

    Orthanc's configuration and log go in a new folder under ``work``.

    Raises
    ------
    BenchError
        If Orthanc does not end up holding exactly the expected instances.
    """
    loaded_path = data.directory / LOADED_MANIFEST
    loaded = loaded_path.exists() and json.loads(loaded_path.read_text()) == data.manifest
    # Generate before Orthanc starts: the generator forks, and nothing else runs yet.
    files = [] if loaded else generate_files(data)
    started = time.perf_counter()
    orthanc = start_orthanc(work, overrides=data.storage_overrides)
    try:
        count = orthanc.instance_count()
        print(
            f"Orthanc {orthanc.url} (pid {orthanc.pid}) started in "
            f"{time.perf_counter() - started:.1f} s, holding {count:,} instances",
            file=sys.stderr,
        )
        if count != data.instances:
            if count > data.instances:
                raise BenchError(
                    f"Orthanc's storage in {data.directory / 'orthanc'} holds {count} instances, "
                    f"more than the {data.instances} generated; delete that folder"
                )
            loaded_path.unlink(missing_ok=True)
            upload(orthanc, files or generate_files(data))
            count = orthanc.instance_count()
            if count != data.instances:
                raise BenchError(
                    f"Orthanc holds {count} instances after the upload, expected "
                    f"{data.instances}; log tail:\n{orthanc.log_tail()}"
                )
            loaded_path.write_text(json.dumps(data.manifest))
        yield orthanc
    finally:
        orthanc.stop()


# --- measuring ---------------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) process ``pid`` has used, from /proc."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time all processes of the machine have used since boot (``/proc/stat``: user, nice,
    system, irq, softirq and steal; summed over CPUs)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


def self_cpu_seconds() -> float:
    """CPU time (user + system, all threads) this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Run:
    """One timed run of one contender."""

    seconds: float
    instances: int
    series: int
    requests: int
    server_cpu_s: float
    client_cpu_s: float
    others_cpu_s: float

    @property
    def instances_per_s(self) -> float:
        """Instances per second."""
        return self.instances / self.seconds

    @property
    def series_per_s(self) -> float:
        """Series (metadata requests) per second."""
        return self.series / self.seconds


@dataclass
class Outcome:
    """What one run of a contender fetched."""

    instances: int
    series: int
    requests: int


def measured(orthanc: Orthanc, work: Callable[[], Outcome]) -> Run:
    """Run ``work``; return its wall time and the CPU time of Orthanc, of this process and of
    every other process of the machine (other people's work on a shared machine)."""
    server0, client0 = process_cpu_seconds(orthanc.pid), self_cpu_seconds()
    machine0 = machine_busy_seconds()
    started = time.perf_counter()
    outcome = work()
    seconds = time.perf_counter() - started
    server = process_cpu_seconds(orthanc.pid) - server0
    client = self_cpu_seconds() - client0
    others = max(0.0, machine_busy_seconds() - machine0 - server - client)
    return Run(seconds, outcome.instances, outcome.series, outcome.requests, server, client, others)


# --- contenders --------------------------------------------------------------------------------


def _uid(obj: dict[str, Any], tag: str) -> str:
    return str(obj[tag]["Value"][0])


def run_bare(dicomweb_url: str, concurrency: int, page_size: int = PAGE_SIZE) -> Outcome:
    """The reference: the crawl's requests with plain httpx, bodies read and json-decoded.

    Studies are paged on this thread; each study is then one task of the pool: its series
    list, then the metadata of each of its series, one request after the other.
    """
    base = dicomweb_url.rstrip("/")
    headers = {"Accept": DICOM_JSON}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    requests = itertools.count(1)  # next() on a count is atomic in CPython

    def get_json(client: httpx.Client, url: str, params: list[tuple[str, str]]) -> Any:
        next(requests)
        response = client.get(url, params=tuple(params), headers=headers)
        response.raise_for_status()
        body = response.content
        return json.loads(body) if body else []  # 204 No Content: no matches

    def crawl_study(client: httpx.Client, study_uid: str) -> tuple[int, int]:
        series_list = get_json(
            client,
            f"{base}/studies/{study_uid}/series",
            [
                *(("includefield", f) for f in SERIES_FIELDS),
                ("limit", str(page_size)),
                ("offset", "0"),
            ],
        )
        instances = 0
        for obj in series_list:
            series_uid = _uid(obj, _SERIES_UID)
            instances += len(
                get_json(client, f"{base}/studies/{study_uid}/series/{series_uid}/metadata", [])
            )
        return instances, len(series_list)

    with httpx.Client(timeout=TIMEOUT, limits=limits) as client:
        study_uids: list[str] = []
        offset = 0
        while True:
            page = get_json(
                client,
                f"{base}/studies",
                [
                    *(("includefield", f) for f in STUDY_FIELDS),
                    ("limit", str(page_size)),
                    ("offset", str(offset)),
                ],
            )
            study_uids += [_uid(obj, _STUDY_UID) for obj in page]
            if len(page) < page_size:
                break
            offset += len(page)
        with ThreadPoolExecutor(concurrency, thread_name_prefix="bare") as pool:
            done = list(pool.map(lambda uid: crawl_study(client, uid), study_uids))
    return Outcome(sum(i for i, _ in done), sum(s for _, s in done), next(requests) - 1)


def run_imgindex(
    dicomweb_url: str, concurrency: int, root: Path, page_size: int = PAGE_SIZE
) -> tuple[Outcome, CrawlSummary]:
    """imgindex: one crawl into ``root`` (full if it is new, incremental otherwise)."""
    requests = itertools.count(1)

    def count(_event: RequestEvent) -> None:
        next(requests)

    with DicomWebClient(dicomweb_url, concurrency=concurrency, on_event=count) as client:
        summary = DicomWebCrawl(client, root, page_size=page_size).run()
    return Outcome(summary.instances, summary.series_fetched, next(requests) - 1), summary


def check_full(summary: CrawlSummary, data: Workload) -> None:
    """A full crawl must have indexed everything, cleanly.

    Raises
    ------
    BenchError
        If it did not.
    """
    problems = []
    if summary.instances != data.instances or summary.series_fetched != data.series:
        problems.append(
            f"{summary.instances} instances in {summary.series_fetched} series, expected "
            f"{data.instances} in {data.series}"
        )
    if summary.studies != data.studies:
        problems.append(f"{summary.studies} studies, expected {data.studies}")
    if summary.series_failed or summary.rejects or summary.shortfalls or summary.failures:
        problems.append(
            f"{summary.series_failed} failed series, {summary.rejects} rejects, "
            f"{len(summary.shortfalls)} shortfalls, failures: {summary.failures[:3]}"
        )
    if summary.stopped or summary.capped_windows:
        problems.append(f"stopped={summary.stopped}, capped windows {summary.capped_windows}")
    if problems:
        raise BenchError("imgindex full crawl: " + "; ".join(problems))


def check_incremental(summary: CrawlSummary, data: Workload) -> None:
    """An incremental crawl with nothing changed must skip every study.

    Raises
    ------
    BenchError
        If it fetched anything.
    """
    if (
        summary.studies != data.studies
        or summary.studies_skipped != data.studies
        or summary.series_fetched
        or summary.instances
    ):
        raise BenchError(
            f"imgindex incremental crawl: {summary.studies} studies listed, "
            f"{summary.studies_skipped} skipped, {summary.series_fetched} series fetched, "
            f"{summary.instances} instances; expected all {data.studies} studies skipped"
        )


def check_bare(outcome: Outcome, data: Workload) -> None:
    """The reference must have seen every instance.

    Raises
    ------
    BenchError
        If it did not.
    """
    if outcome.instances != data.instances or outcome.series != data.series:
        raise BenchError(
            f"bare requests: {outcome.instances} instances in {outcome.series} series, "
            f"expected {data.instances} in {data.series}"
        )


# --- profile ---------------------------------------------------------------------------------


@contextlib.contextmanager
def profiling_all_threads() -> Iterator[list[cProfile.Profile]]:
    """Profile this thread and every thread started inside the block (wall-clock timer).

    cProfile sees one thread only; :func:`threading.setprofile` makes each new thread start
    a profiler of its own on its first call. The first profile is this thread's. Read the
    profiles after the threads started in the block have ended.
    """
    profiles: list[cProfile.Profile] = []

    def start(_frame: object, _event: str, _arg: object) -> None:
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()  # replaces this hook for the rest of the thread

    main = cProfile.Profile()
    profiles.append(main)
    threading.setprofile(start)
    main.enable()
    try:
        yield profiles
    finally:
        main.disable()
        threading.setprofile(None)


def _shorten_paths(text: str) -> str:
    prefixes = {p for p in sys.path if p.endswith("-packages")}
    prefixes |= {str(ROOT), sysconfig.get_paths()["stdlib"]}
    for prefix in sorted(prefixes, key=len, reverse=True):
        text = text.replace(prefix + "/", "")
    return text


def _top(stats: pstats.Stats, order: str) -> str:
    stream = io.StringIO()
    stats.stream = stream  # type: ignore[attr-defined]
    stats.sort_stats(order).print_stats(PROFILE_LINES)
    lines = stream.getvalue().splitlines()
    # Keep the table: from the column headings on (pstats starts with a summary paragraph).
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    return _shorten_paths("\n".join(line for line in lines[start:] if line.strip()))


def profile_crawl(
    dicomweb_url: str,
    concurrency: int,
    root: Path,
    data: Workload,
    out: Path,
    header: Sequence[str],
    page_size: int = PAGE_SIZE,
) -> tuple[float, list[str]]:
    """One full imgindex crawl under cProfile, in every thread; writes the report to ``out``.

    Returns the profiled crawl's wall time and the report's first lines (all threads, by
    cumulative time).
    """
    started = time.perf_counter()
    with profiling_all_threads() as profiles:
        _, summary = run_imgindex(dicomweb_url, concurrency, root, page_size)
    seconds = time.perf_counter() - started
    check_full(summary, data)
    everything = pstats.Stats(profiles[0])
    for profile in profiles[1:]:
        everything.add(profile)
    main_thread = pstats.Stats(profiles[0])
    sections = {
        "all threads, by cumulative time": _top(everything, "cumulative"),
        "all threads, by own time (tottime)": _top(everything, "tottime"),
        "main thread only (study listing, scheduling, waiting for results), by cumulative "
        "time": _top(main_thread, "cumulative"),
    }
    text = [
        f"# cProfile of one full imgindex crawl, concurrency {concurrency}, page size {page_size}",
        *(f"# {line}" for line in header),
        (
            f"# profiled crawl: {seconds:.2f} s wall ({summary.instances_per_s:,.0f} instances/s; "
            "the profiler slows Python code down)"
        ),
        (
            f"# {len(profiles)} threads profiled (this one, the crawl pool, the commit thread, "
            "polars' helper threads) and merged. The timer is the wall clock: a thread waiting "
            "for the server or for the GIL counts, and cumulative times add up over threads "
            "(8 threads waiting 1 s = 8 s)."
        ),
        "",
    ]
    for title, table in sections.items():
        text += [f"## {title}", table, ""]
    out.write_text("\n".join(text))
    return seconds, sections["all threads, by cumulative time"].splitlines()[:11]


# --- report ------------------------------------------------------------------------------------


@dataclass
class Results:
    """Every run of one concurrency."""

    concurrency: int
    bare: list[Run] = field(default_factory=list)
    imgindex: list[Run] = field(default_factory=list)
    incremental: Run | None = None
    crawl_seconds: list[float] = field(default_factory=list)  # CrawlSummary.seconds
    profile: Path | None = None
    profile_seconds: float | None = None


def _median(runs: Sequence[Run], attribute: str) -> float:
    return float(statistics.median(getattr(r, attribute) for r in runs))


def _row(name: str, runs: Sequence[Run], reference: float | None, concurrency: int) -> str:
    seconds = _median(runs, "seconds")
    ips = _median(runs, "instances_per_s")
    sps = _median(runs, "series_per_s")
    server = _median(runs, "server_cpu_s")
    client = _median(runs, "client_cpu_s")
    others = _median(runs, "others_cpu_s")
    requests = _median(runs, "requests")
    ratio = f"{ips / reference:.2f}x" if reference else "n/a"
    share = server / (server + client) if server + client else 0.0
    busy = (server + client) / (seconds * available_cpus())
    return (
        f"| {concurrency} | {name} | {seconds:.2f} | {ips:,.0f} | {sps:,.0f} | {ratio} "
        f"| {requests:,.0f} | {server:.2f} | {client:.2f} | {share:.0%} | {busy:.0%} "
        f"| {others:.2f} |"
    )


def format_table(results: Sequence[Results]) -> str:
    """The medians as a Markdown table."""
    lines = [
        (
            "| concurrency | contender | seconds | instances/s | series/s | vs bare requests "
            "| requests | Orthanc CPU s | client CPU s | Orthanc share of CPU | CPUs busy "
            "| other processes' CPU s |"
        ),
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        reference = _median(r.bare, "instances_per_s")
        lines.append(_row("bare requests (httpx + json.loads)", r.bare, None, r.concurrency))
        lines.append(_row("imgindex crawl (full)", r.imgindex, reference, r.concurrency))
        run = r.incremental
        if run is not None:
            lines.append(
                f"| {r.concurrency} | imgindex crawl (incremental, nothing changed; 1 run) "
                f"| {run.seconds:.2f} | n/a | n/a | n/a | {run.requests:,} "
                f"| {run.server_cpu_s:.2f} | {run.client_cpu_s:.2f} | | "
                f"| {run.others_cpu_s:.2f} |"
            )
    return "\n".join(lines)


def format_runs(results: Sequence[Results]) -> str:
    """Every run, for judging the noise."""
    lines = []
    for r in results:
        for name, runs in (("bare", r.bare), ("imgindex", r.imgindex)):
            figures = ", ".join(f"{run.instances_per_s:,.0f}" for run in runs)
            lines.append(f"- concurrency {r.concurrency}, {name}: instances/s {figures}")
        lines.append(
            f"- concurrency {r.concurrency}, CrawlSummary.seconds of the full crawls: "
            + ", ".join(f"{s:.2f}" for s in r.crawl_seconds)
        )
    return "\n".join(lines)


def _versions(orthanc: Orthanc) -> str:
    try:
        system = orthanc.get_json("/system")
        plugin = orthanc.get_json("/plugins/dicom-web")
        server = f"Orthanc {system.get('Version')}, DICOMweb plugin {plugin.get('Version')}"
    except httpx.HTTPError:
        server = "Orthanc (version unknown)"
    return f"{server}, Python {platform.python_version()}, httpx {httpx.__version__}"


def command_line() -> str:
    """This run's command, as typed from the repository root."""
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), *sys.argv])


# --- main --------------------------------------------------------------------------------------


def warm_page_cache(folder: Path) -> tuple[int, float]:
    """Read every file under ``folder`` once (Orthanc's storage and index); return the bytes
    and the seconds."""
    started = time.perf_counter()
    total = 0
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    total += len(chunk)
    return total, time.perf_counter() - started


@dataclass
class Bench:
    """The running server, the data it holds, and where crawls write their index roots."""

    orthanc: Orthanc
    data: Workload
    work: Path
    keep: bool
    page_size: int
    _roots: Iterator[int] = field(default_factory=itertools.count)

    @property
    def url(self) -> str:
        """Orthanc's DICOMweb root."""
        return self.orthanc.dicomweb_url

    def new_root(self) -> Path:
        """A fresh index root (not created yet)."""
        return self.work / f"index{next(self._roots):03d}"

    def drop(self, root: Path) -> None:
        """Delete an index root unless ``--keep``."""
        if not self.keep:
            shutil.rmtree(root, ignore_errors=True)

    def bare(self, concurrency: int) -> Run:
        """One checked, measured reference run."""

        def work() -> Outcome:
            outcome = run_bare(self.url, concurrency, self.page_size)
            check_bare(outcome, self.data)
            return outcome

        return measured(self.orthanc, work)

    def crawl(self, concurrency: int, root: Path) -> tuple[Run, CrawlSummary]:
        """One measured imgindex crawl into ``root``; the caller checks the summary."""
        summaries: list[CrawlSummary] = []

        def work() -> Outcome:
            outcome, summary = run_imgindex(self.url, concurrency, root, self.page_size)
            summaries.append(summary)
            return outcome

        run = measured(self.orthanc, work)
        return run, summaries[0]

    def warm_up(self) -> None:
        """Orthanc's files into the page cache, and one study search (its database cache)."""
        total, seconds = warm_page_cache(self.data.directory / "orthanc")
        started = time.perf_counter()
        with httpx.Client(timeout=TIMEOUT) as client:
            client.get(
                f"{self.url}/studies",
                params={"limit": str(self.page_size)},
                headers={"Accept": DICOM_JSON},
            ).raise_for_status()
        print(
            f"warm-up: read Orthanc's {total / 1e6:,.0f} MB of storage and index in "
            f"{seconds:.1f} s; one study search in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )

    def measure(self, concurrency: int, repeats: int) -> Results:
        """``repeats`` rounds of the reference and a full crawl (in alternating order), then
        an incremental crawl on the last full crawl's root."""
        result = Results(concurrency)
        root: Path | None = None
        for round_no in range(1, repeats + 1):
            label = f"  concurrency {concurrency} round {round_no}/{repeats}"
            if root is not None:
                self.drop(root)
            root = self.new_root()
            order = ("bare", "imgindex") if round_no % 2 else ("imgindex", "bare")
            for contender in order:
                if contender == "bare":
                    run = self.bare(concurrency)
                    result.bare.append(run)
                else:
                    run, summary = self.crawl(concurrency, root)
                    check_full(summary, self.data)
                    result.imgindex.append(run)
                    result.crawl_seconds.append(summary.seconds)
                print(
                    f"{label} {contender}: {run.seconds:.2f} s, {run.instances_per_s:,.0f} "
                    f"instances/s, {run.requests} requests, Orthanc CPU "
                    f"{run.server_cpu_s:.2f} s, client CPU {run.client_cpu_s:.2f} s, other "
                    f"processes {run.others_cpu_s:.2f} s",
                    file=sys.stderr,
                )
        assert root is not None
        run, summary = self.crawl(concurrency, root)  # the same root again: incremental
        check_incremental(summary, self.data)
        result.incremental = run
        print(
            f"  concurrency {concurrency} imgindex incremental: {run.seconds:.2f} s, "
            f"{run.requests} requests, Orthanc CPU {run.server_cpu_s:.2f} s",
            file=sys.stderr,
        )
        self.drop(root)
        return result


def _bench(args: argparse.Namespace, work: Path) -> int:
    name = f"crawl-{args.series}x{args.instances_per_series}-{args.size}"
    data = Workload(args.series, args.instances_per_series, args.size, args.data / name)
    data.directory.mkdir(parents=True, exist_ok=True)
    command = command_line()
    results: list[Results] = []
    with running_orthanc(data, work) as orthanc:
        header = [
            (
                f"{data.description()}; Orthanc's DICOMweb plugin on 127.0.0.1, QIDO limit "
                f"{args.page_size}"
            ),
            (
                f"{dt.date.today().isoformat()}, {platform.node()}, {available_cpus()} CPUs, "
                f"{_versions(orthanc)}, git {git_revision()}"
            ),
            f"command: {command}",
        ]
        bench = Bench(orthanc, data, work, args.keep, args.page_size)
        bench.warm_up()
        for concurrency in args.concurrency:
            result = bench.measure(concurrency, args.repeats)
            results.append(result)
            if args.profile:
                result.profile = data.directory / f"profile-c{concurrency}-p{args.page_size}.txt"
                print(f"  profiling one crawl into {result.profile}...", file=sys.stderr)
                root = bench.new_root()
                result.profile_seconds, top = profile_crawl(
                    bench.url, concurrency, root, data, result.profile, header, args.page_size
                )
                bench.drop(root)
                for line in top:
                    print(f"    {line}", file=sys.stderr)

    print(f"# {header[0]}")
    print(f"# {header[1]}")
    print(
        f"# median of {args.repeats} interleaved runs each (order alternating), after a warm-up; "
        "ratio = imgindex instances/s / bare requests instances/s (goal >= 0.9)"
    )
    print(
        "# CPU: Orthanc's (utime + stime of its process) and this process's during each run; "
        "share = Orthanc / (Orthanc + client); CPUs busy = both / (seconds x CPUs); other "
        "processes = the machine's busy time (/proc/stat) less both (the machine is shared); "
        "the incremental crawl ran once, after the full ones"
    )
    print(f"# {header[2]}")
    print()
    print(format_table(results))
    print()
    print(format_runs(results))
    for r in results:
        if r.profile is not None:
            print(
                f"- concurrency {r.concurrency}: profile in {r.profile} (profiled crawl "
                f"{r.profile_seconds:.1f} s)"
            )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    args = build_parser().parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-crawl-"))
    try:
        return _bench(args, work)
    except (BenchError, OrthancError, OSError, httpx.HTTPError) as exc:
        print(f"bench_crawl.py: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(
                f"index roots and Orthanc's configuration and log kept in {work}", file=sys.stderr
            )
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
