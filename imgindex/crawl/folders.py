"""Index folders of DICOM files: walk, parse headers in parallel, write in batches.

Files are visited in a fixed order (names sorted at each folder level) and handed to worker
processes in chunks; results come back in the same order. When several files hold the same
SOPInstanceUID, the first in that order wins within a run and later copies are counted as
``duplicates`` in the summary (an index row points at one copy). Running again over the same
tree rewrites the same rows and adds none.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from imgindex.extract import ExtractedBatch, Extractor, extract_files
from imgindex.index import IndexWriter
from imgindex.schema import Attribute, instance_schema

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

__all__ = ["IndexSummary", "index_files", "iter_files"]

logger = logging.getLogger(__name__)

#: Files per task sent to a worker process.
CHUNK_FILES = 128


@dataclass
class IndexSummary:
    """What :func:`index_files` did."""

    files: int = 0
    instances: int = 0
    duplicates: int = 0
    rejected_files: int = 0
    bad_values: int = 0
    bytes_scanned: int = 0
    seconds: float = 0.0
    series: int = 0
    studies: int = 0
    rejects_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        """Megabytes (10^6) of DICOM scanned per second."""
        return self.bytes_scanned / 1e6 / self.seconds if self.seconds else 0.0

    @property
    def files_per_s(self) -> float:
        """Files scanned per second."""
        return self.files / self.seconds if self.seconds else 0.0


def iter_files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Yield every file under ``paths`` (files given directly are yielded as they are).

    Folders are walked with names sorted at each level; symbolic links to files are followed,
    links to folders are not (no loops). Broken links are yielded so they get a reject row.
    """
    for path in paths:
        p = Path(path)
        if p.is_dir():
            yield from _walk(p)
        else:
            yield p


def _walk(folder: Path) -> Iterator[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        logger.warning("cannot list %s: %s", folder, exc)
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path))
        elif entry.is_file() or (entry.is_symlink() and not entry.is_dir()):
            # Links to files, and broken links (for their reject); not links to folders.
            yield Path(entry.path)


def index_files(
    paths: Sequence[str | os.PathLike[str]],
    root: str | os.PathLike[str],
    *,
    attributes: Sequence[Attribute],
    workers: int = 1,
    batch_rows: int = 20_000,
    force: bool = False,
    source: str | None = None,
    progress: bool = False,
) -> IndexSummary:
    """Index every file under ``paths`` into the index at ``root``.

    Parameters
    ----------
    paths : sequence of path-like
        Folders (walked recursively) and files.
    root : path-like
        Catalog root; tables go to ``ROOT/tables``.
    attributes : sequence of Attribute
        Columns to fill.
    workers : int
        Processes parsing headers (1 parses in this process).
    batch_rows : int
        Instances per commit.
    force : bool
        Also index files without the PS3.10 preamble.
    source : str, optional
        Value of the ``source`` column (default ``folder:`` plus the first path).
    progress : bool
        Show a progress bar on stderr.

    Returns
    -------
    IndexSummary
    """
    attrs = tuple(attributes)
    source = source or "folder:" + str(Path(paths[0]).absolute())
    writer = IndexWriter(root, attrs)
    extractor = Extractor(attrs, source=source, force=force)
    summary = IndexSummary()
    started = time.perf_counter()
    seen: set[str] = set()
    series: set[str] = set()
    studies: set[str] = set()
    pending: list[pa.Table] = []
    pending_rejects: list[dict[str, Any]] = []
    pending_rows = 0

    from tqdm import tqdm

    bar = tqdm(total=None, unit=" files", disable=not progress, desc="indexing", dynamic_ncols=True)

    # Commits run on one background thread so workers keep parsing meanwhile; at most one
    # batch waits behind the one being written (bounded memory), and a failed commit stops
    # the run at the next hand-off.
    commits = ThreadPoolExecutor(1, thread_name_prefix="imgindex-commit")
    last_commit: Future[None] | None = None

    def flush() -> None:
        nonlocal pending, pending_rejects, pending_rows, last_commit
        if pending or pending_rejects:
            table = pa.concat_tables(pending) if pending else instance_schema(attrs).empty_table()
            if last_commit is not None:
                last_commit.result()
            last_commit = commits.submit(writer.write, table, pending_rejects)
        pending, pending_rejects, pending_rows = [], [], 0

    def take(result: ExtractedBatch, n_files: int) -> None:
        nonlocal pending_rows
        table, rejects, scanned = result.table, result.rejects, result.bytes_scanned
        summary.files += n_files
        summary.bytes_scanned += scanned
        uids = table.column("SOPInstanceUID").to_pylist()
        keep = []
        for i, uid in enumerate(uids):
            if uid not in seen:
                seen.add(uid)
                keep.append(i)
        summary.duplicates += len(uids) - len(keep)
        if len(keep) < len(uids):
            table = table.take(pa.array(keep, pa.int64()))
        summary.instances += table.num_rows
        series.update(table.column("SeriesInstanceUID").to_pylist())
        studies.update(table.column("StudyInstanceUID").to_pylist())
        for r in rejects:
            if r["level"] == "file":
                summary.rejected_files += 1
            else:
                summary.bad_values += 1
            summary.rejects_by_reason[r["reason"]] = (
                summary.rejects_by_reason.get(r["reason"], 0) + 1
            )
        pending.append(table)
        pending_rejects.extend(rejects)
        pending_rows += table.num_rows
        bar.update(n_files)
        bar.set_postfix_str(
            f"{summary.bytes_scanned / 1e6 / max(time.perf_counter() - started, 1e-9):.0f} MB/s"
        )
        if pending_rows >= batch_rows:
            flush()

    chunks = _chunks(iter_files(paths), CHUNK_FILES)
    try:
        if workers <= 1:
            for chunk in chunks:
                take(extract_files(extractor, chunk), len(chunk))
        else:
            # forkserver, not fork: this process may hold threads (polars, delta-rs) that a
            # fork would copy mid-lock. Preloading the light extract module makes each worker
            # start in milliseconds instead of importing it anew.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["imgindex.extract"])
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                # Bounded: at most 2 tasks per worker in flight, consumed in submission order.
                inflight: deque[tuple[Future[ExtractedBatch], int]] = deque()
                for chunk in chunks:
                    inflight.append((pool.submit(extract_files, extractor, chunk), len(chunk)))
                    if len(inflight) >= 2 * workers:
                        future, n = inflight.popleft()
                        take(future.result(), n)
                while inflight:
                    future, n = inflight.popleft()
                    take(future.result(), n)
        flush()
        if last_commit is not None:
            last_commit.result()
    finally:
        commits.shutdown(wait=True)
        bar.close()
    summary.seconds = time.perf_counter() - started
    summary.series, summary.studies = len(series), len(studies)
    return summary


def _chunks(files: Iterator[Path], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for f in files:
        chunk.append(str(f))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
