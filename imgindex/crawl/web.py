"""Crawl a DICOMweb server (PS3.18 QIDO-RS and WADO-RS metadata) into the index.

No pixels are copied: each instance's row comes from its series' WADO-RS metadata and its
``location`` is the instance's WADO-RS URL, from which export fetches the pixels later.

The crawl, in the order requests are made:

1. **Studies**, by StudyDate window. Servers cap QIDO results, often silently, so a window
   whose result reaches the cap (``page_size``, or the server's known ``max_results``) is
   paged with ``offset`` or, where the server caps silently or ignores ``offset``, split in
   two at the median date of what it returned (open-ended ranges, so no date is out of
   reach) until every window is under the cap; a single day still capped and not pageable
   is recorded as ``capped``.
2. **Series** of each study that is new or whose series/instance counts changed since the
   last crawl (``crawl_state``), with NumberOfSeriesRelatedInstances.
3. **Metadata** of each series that is new, changed, incomplete or failed last time; its
   objects become rows (:meth:`imgindex.extract.Extractor.extract_json`), and the instances
   indexed are checked against the count the server reported.

Up to ``concurrency`` requests run at once. Rows are committed in batches on a background
thread, and each batch's ``crawl_state`` rows are written after its instances, so a crawl
stopped at any moment (Ctrl-C, ``kill -9``) resumes where it stopped; upserts by
SOPInstanceUID mean nothing is ever indexed twice.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa

from dicomweb.errors import DicomWebError
from imgindex.extract import Extractor, reject_row
from imgindex.index import Index, IndexWriter
from imgindex.schema import CRAWL_STATE_SCHEMA, DEFAULT_ATTRIBUTES

if TYPE_CHECKING:
    import os
    from collections.abc import Generator, Iterator, Mapping, Sequence

    from dicomweb.client import DicomWebClient
    from imgindex.crawl.metrics import CrawlMetrics
    from imgindex.schema import Attribute

__all__ = ["CrawlSummary", "DicomWebCrawl", "Shortfall"]

logger = logging.getLogger(__name__)

_STUDY_UID = "0020000D"
_SERIES_UID = "0020000E"
_STUDY_DATE = "00080020"
_SERIES_COUNT = "00201206"  # NumberOfStudyRelatedSeries
_STUDY_INSTANCES = "00201208"  # NumberOfStudyRelatedInstances
_SERIES_INSTANCES = "00201209"  # NumberOfSeriesRelatedInstances
_MODALITY = "00080060"

#: Seconds between commits while a crawl runs, so a stopped crawl loses little work.
_COMMIT_SECONDS = 10.0


@dataclass(frozen=True)
class Shortfall:
    """A series whose metadata held fewer instances than the server's count for it."""

    study_uid: str
    series_uid: str
    expected: int
    indexed: int

    @property
    def missing(self) -> int:
        """Instances the server counts but did not describe."""
        return self.expected - self.indexed


@dataclass
class CrawlSummary:
    """What one crawl did."""

    source: str
    studies: int = 0
    studies_skipped: int = 0
    series: int = 0
    series_fetched: int = 0
    series_skipped: int = 0
    series_failed: int = 0
    instances: int = 0
    rejects: int = 0
    shortfalls: list[Shortfall] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    capped_windows: list[str] = field(default_factory=list)
    stopped: bool = False
    seconds: float = 0.0

    @property
    def instances_per_s(self) -> float:
        """Instances indexed per second."""
        return self.instances / self.seconds if self.seconds else 0.0

    @property
    def series_per_s(self) -> float:
        """Series fetched per second."""
        return self.series_fetched / self.seconds if self.seconds else 0.0


@dataclass
class _SeriesResult:
    study_uid: str
    series_uid: str
    expected: int | None
    rows: list[dict[str, Any]]
    rejects: list[dict[str, Any]]
    error: DicomWebError | None = None


@dataclass
class _Study:
    uid: str
    expected_series: int | None
    expected_instances: int | None
    open_series: int = 0
    listed: bool = False
    status: str = "done"
    indexed: int = 0


@dataclass
class _Batch:
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    state: list[dict[str, Any]] = field(default_factory=list)


class DicomWebCrawl:
    """One crawl of a DICOMweb server into the index at ``root``.

    Parameters
    ----------
    client : DicomWebClient
        The server (its ``concurrency`` bounds requests in flight).
    root : path-like
        Catalog root.
    source : str, optional
        The ``source`` column and the ``crawl_state`` key (default: the server's URL,
        without credentials).
    attributes : sequence of Attribute
        Columns to fill.
    since, until : date, optional
        Only studies with a StudyDate in this range (inclusive).
    page_size : int
        ``limit`` of each QIDO request; a window with this many results is split.
    max_results : int, optional
        The server's own cap on results when it is lower than ``page_size`` and applied
        silently (Orthanc's ``LimitFindResults``); windows reaching it are split too.
    full : bool
        Fetch every series again, ignoring what earlier crawls recorded.
    batch_rows : int
        Instances per commit (commits also happen every 10 s).
    progress : bool
        Show a progress bar on stderr.
    metrics : CrawlMetrics, optional
        Prometheus metrics to update.
    stop : threading.Event, optional
        Set it to stop early: requests in flight finish, their rows are committed.
    """

    def __init__(
        self,
        client: DicomWebClient,
        root: str | os.PathLike[str],
        *,
        source: str | None = None,
        attributes: Sequence[Attribute] = DEFAULT_ATTRIBUTES,
        since: dt.date | None = None,
        until: dt.date | None = None,
        page_size: int = 1000,
        max_results: int | None = None,
        full: bool = False,
        batch_rows: int = 5000,
        progress: bool = False,
        metrics: CrawlMetrics | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        if since and until and since > until:
            raise ValueError(f"--since {since} is after --until {until}")
        self.client = client
        self.root = root
        self.source = source or client.url
        self.attributes = tuple(attributes)
        self.since = since
        self.until = until
        self.page_size = page_size
        self.max_results = max_results
        self.cap = min(page_size, max_results) if max_results else page_size
        self.full = full
        self.batch_rows = batch_rows
        self.progress = progress
        self.metrics = metrics
        self.stop = stop or threading.Event()
        self.extractor = Extractor(self.attributes, source=self.source)
        self.writer = IndexWriter(root, self.attributes)
        self._state_table = Index(Path(root), self.attributes).table("crawl_state")
        self._capped_days: list[str] = []
        self._use_offset = max_results is None

    # -- state -----------------------------------------------------------------------------

    def _load_state(self) -> dict[tuple[str, str], dict[str, Any]]:
        if self.full or not self._state_table.exists:
            return {}
        frame = (
            self._state_table.scan()
            .filter(pl.col("source") == self.source)
            .select("kind", "key", "status", "expected_series", "expected_instances")
            .collect()
        )
        return {(r["kind"], r["key"]): r for r in frame.to_dicts()}

    def _state_row(self, kind: str, key: str, **values: Any) -> dict[str, Any]:
        row: dict[str, Any] = dict.fromkeys(CRAWL_STATE_SCHEMA.names)
        row.update(source=self.source, kind=kind, key=key, updated_at=dt.datetime.now(dt.UTC))
        row.update(values)
        return row

    # -- studies ---------------------------------------------------------------------------

    def _capped(self, results: list[dict[str, Any]]) -> bool:
        return len(results) >= self.cap

    def _query_studies(self, lo: dt.date | None, hi: dt.date | None, offset: int = 0) -> list[Any]:
        params: dict[str, str] = {}
        if lo or hi:
            params["StudyDate"] = f"{_qido_date(lo)}-{_qido_date(hi)}"
        return self.client.search(
            "studies",
            params=params,
            includefield=[_STUDY_DATE, _SERIES_COUNT, _STUDY_INSTANCES],
            limit=self.page_size,
            offset=offset,
        )

    def _window(self, lo: dt.date | None, hi: dt.date | None) -> Iterator[dict[str, Any]]:
        """The studies of one StudyDate window (bounds inclusive, None for open).

        A capped result is first paged with ``offset`` (the cheapest listing, which most
        servers honour), unless the server is known to cap silently (``max_results``) or
        was seen to ignore ``offset``. Otherwise the window is split at the median of the
        capped page's dates: the page is a sample of the window, so each half holds about
        half the studies, and N studies take about log2(N / cap) rounds of queries,
        wherever their dates lie.
        """
        results = self._query_studies(lo, hi)
        if not self._capped(results):
            yield from results
            return
        if self._use_offset:
            finished = yield from self._page(lo, hi, results, record=False)
            if finished:
                return
            logger.info("%s ignores offset: splitting study queries by StudyDate", self.source)
            self._use_offset = False
        if lo is not None and lo == hi:
            yield from self._page(lo, hi, results, record=True)
            return
        dates = sorted(
            d
            for d in (_date(obj) for obj in results)
            if d is not None and (lo is None or d >= lo) and (hi is None or d <= hi)
        )
        if not dates:  # nothing to split on: list what paging can
            yield from self._page(lo, hi, results, record=True)
            return
        logger.debug("capped at %d results: splitting %s..%s", len(results), lo, hi)
        for window in _split(lo, hi, dates):
            yield from self._window(*window)

    def _page(
        self,
        lo: dt.date | None,
        hi: dt.date | None,
        first: list[dict[str, Any]],
        *,
        record: bool,
    ) -> Generator[dict[str, Any], None, bool]:
        """Page a capped window with ``offset``; return whether paging finished it (False
        if the server ignores ``offset``, and then, with ``record``, note the window)."""
        seen: set[str] = set()
        page, offset = first, 0
        while True:
            new = [obj for obj in page if _uid(obj, _STUDY_UID) not in seen]
            seen.update(uid for obj in new if (uid := _uid(obj, _STUDY_UID)))
            yield from new
            if not self._capped(page):
                return True
            if not new:  # the server ignores offset
                if record:
                    key = f"{lo}" if lo == hi else f"{lo or ''}..{hi or ''}"
                    logger.warning(
                        "%s: more studies on %s than the server returns in one query, and "
                        "it ignores offset; some may be missing (see crawl_state, kind "
                        "'window')",
                        self.source,
                        key,
                    )
                    self._capped_days.append(key)
                return False
            offset += len(page)
            page = self._query_studies(lo, hi, offset)

    def _studies(self) -> Iterator[dict[str, Any]]:
        seen: set[str] = set()
        for obj in self._window(self.since, self.until):
            uid = _uid(obj, _STUDY_UID)
            if uid and uid not in seen:
                seen.add(uid)
                yield obj

    # -- series ----------------------------------------------------------------------------

    def _list_series(self, study_uid: str) -> list[dict[str, Any]]:
        return list(
            self.client.iter_search(
                f"studies/{study_uid}/series",
                includefield=[_SERIES_INSTANCES, _MODALITY],
                page_size=self.page_size,
            )
        )

    # -- the crawl -------------------------------------------------------------------------

    def run(self) -> CrawlSummary:
        """Crawl; returns what was done. Raises :class:`~dicomweb.errors.DicomWebError` only
        when the study list itself cannot be read (per-series faults are recorded)."""
        started = time.perf_counter()
        summary = CrawlSummary(self.source)
        self._capped_days = []
        self._use_offset = self.max_results is None
        state = self._load_state()
        studies: dict[str, _Study] = {}
        batch = _Batch()
        inflight: set[Future[Any]] = set()
        kinds: dict[Future[Any], tuple[str, str]] = {}
        last_commit_at = time.monotonic()

        from tqdm import tqdm

        bar = tqdm(
            total=None, unit=" series", desc="crawling", disable=not self.progress, leave=True
        )
        commits = ThreadPoolExecutor(1, thread_name_prefix="imgindex-crawl-commit")
        last_commit: Future[None] | None = None
        pool = ThreadPoolExecutor(self.client.concurrency, thread_name_prefix="imgindex-crawl")
        limit = 2 * self.client.concurrency

        def commit(b: _Batch) -> None:
            # Instances first: state that says "done" never precedes the rows it vouches for.
            if b.rows or b.rejects:
                self.writer.write(b.rows, b.rejects)
            if b.state:
                self._state_table.upsert(pa.Table.from_pylist(b.state, CRAWL_STATE_SCHEMA))

        def flush() -> None:
            nonlocal batch, last_commit, last_commit_at
            last_commit_at = time.monotonic()
            if not (batch.rows or batch.rejects or batch.state):
                return
            if last_commit is not None:
                last_commit.result()
            last_commit = commits.submit(commit, batch)
            batch = _Batch()

        def finish_study(study: _Study) -> None:
            batch.state.append(
                self._state_row(
                    "study",
                    study.uid,
                    StudyInstanceUID=study.uid,
                    status=study.status,
                    expected_series=study.expected_series,
                    expected_instances=study.expected_instances,
                    indexed_instances=study.indexed,
                )
            )

        def take_series_list(study: _Study, listed: list[dict[str, Any]]) -> None:
            study.listed = True
            for obj in listed:
                series_uid = _uid(obj, _SERIES_UID)
                if not series_uid:
                    continue
                summary.series += 1
                expected = _int(obj, _SERIES_INSTANCES)
                previous = state.get(("series", series_uid))
                if (
                    previous is not None
                    and previous["status"] == "done"
                    and expected is not None
                    and previous["expected_instances"] == expected
                ):
                    summary.series_skipped += 1
                    if self.metrics is not None:
                        self.metrics.series.labels("skipped").inc()
                    continue
                study.open_series += 1
                future = pool.submit(
                    fetch_series, self.client, self.extractor, study.uid, series_uid, expected
                )
                inflight.add(future)
                kinds[future] = ("series", study.uid)
            if study.open_series == 0:
                finish_study(study)

        def take_series(result: _SeriesResult) -> None:
            study = studies[result.study_uid]
            study.open_series -= 1
            batch.rejects.extend(result.rejects)
            summary.rejects += len(result.rejects)
            if result.error is not None:
                summary.series_failed += 1
                summary.failures.append(str(result.error))
                study.status = "failed"
                status, missing = "failed", None
                logger.warning("series %s: %s", result.series_uid, result.error)
                if self.metrics is not None:
                    self.metrics.series.labels("failed").inc()
            else:
                summary.series_fetched += 1
                indexed = sum(1 for r in result.rows if r["SeriesInstanceUID"] == result.series_uid)
                missing = None
                status = "done"
                if result.expected is not None and indexed < result.expected:
                    missing = result.expected - indexed
                    status = "incomplete"
                    summary.shortfalls.append(
                        Shortfall(result.study_uid, result.series_uid, result.expected, indexed)
                    )
                    if study.status == "done":
                        study.status = "incomplete"
                study.indexed += len(result.rows)
                summary.instances += len(result.rows)
                batch.rows.extend(result.rows)
                if self.metrics is not None:
                    self.metrics.series.labels(status).inc()
                    self.metrics.instances.inc(len(result.rows))
            batch.state.append(
                self._state_row(
                    "series",
                    result.series_uid,
                    StudyInstanceUID=result.study_uid,
                    status=status,
                    expected_instances=result.expected,
                    indexed_instances=len(result.rows),
                    missing=missing,
                    error=None if result.error is None else str(result.error),
                )
            )
            if study.open_series == 0 and study.listed:
                finish_study(study)
            bar.update(1)
            seconds = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(
                f"{summary.studies:,} studies, {summary.instances:,} instances "
                f"({summary.instances / seconds:,.0f}/s)"
            )

        def take_study_failure(study_uid: str, exc: DicomWebError) -> None:
            study = studies[study_uid]
            study.status = "failed"
            study.listed = True
            summary.failures.append(str(exc))
            summary.rejects += 1
            batch.rejects.append(
                reject_row(
                    location=exc.url or f"{self.client.url}/studies/{study_uid}/series",
                    level="study",
                    reason=exc.reason,
                    message=str(exc),
                    source=self.source,
                    indexed_at=dt.datetime.now(dt.UTC),
                )
            )
            logger.warning("study %s: %s", study_uid, exc)
            finish_study(study)

        def drain(block: bool) -> None:
            if not inflight:
                return
            done, _ = wait(inflight, timeout=0.5 if block else 0, return_when=FIRST_COMPLETED)
            for future in done:
                inflight.discard(future)
                kind, study_uid = kinds.pop(future)
                if kind == "series":
                    take_series(future.result())
                    continue
                try:
                    take_series_list(studies[study_uid], future.result())
                except DicomWebError as exc:
                    take_study_failure(study_uid, exc)
            if len(batch.rows) >= self.batch_rows or (
                time.monotonic() - last_commit_at >= _COMMIT_SECONDS
            ):
                flush()

        try:
            for obj in self._studies():
                if self.stop.is_set():
                    summary.stopped = True
                    break
                uid = _uid(obj, _STUDY_UID)
                assert uid is not None
                summary.studies += 1
                study = _Study(uid, _int(obj, _SERIES_COUNT), _int(obj, _STUDY_INSTANCES))
                previous = state.get(("study", uid))
                if (
                    previous is not None
                    and previous["status"] == "done"
                    and study.expected_instances is not None
                    and previous["expected_series"] == study.expected_series
                    and previous["expected_instances"] == study.expected_instances
                ):
                    summary.studies_skipped += 1
                    continue
                studies[uid] = study
                future = pool.submit(self._list_series, uid)
                inflight.add(future)
                kinds[future] = ("list", uid)
                while len(inflight) >= limit:
                    drain(block=True)
                drain(block=False)
            while inflight:
                drain(block=True)
            for day in self._capped_days:
                batch.state.append(self._state_row("window", day, status="capped"))
            summary.capped_windows = list(self._capped_days)
            flush()
            if last_commit is not None:
                last_commit.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            commits.shutdown(wait=True)
            bar.close()
        summary.stopped = summary.stopped or self.stop.is_set()
        summary.seconds = time.perf_counter() - started
        return summary


def fetch_series(
    client: DicomWebClient,
    extractor: Extractor,
    study_uid: str,
    series_uid: str,
    expected: int | None = None,
) -> _SeriesResult:
    """One series' WADO-RS metadata as rows (location: each instance's WADO-RS URL) and
    rejects; a response that cannot be used is one ``level='series'`` reject and ``error``.
    """
    now = dt.datetime.now(dt.UTC)
    base = f"{client.url}/studies/{study_uid}/series/{series_uid}"
    try:
        objects = client.series_metadata(study_uid, series_uid)
    except DicomWebError as exc:
        reject = reject_row(
            location=exc.url or base + "/metadata",
            level="series",
            reason=exc.reason,
            message=str(exc),
            source=extractor.source,
            indexed_at=now,
        )
        return _SeriesResult(study_uid, series_uid, expected, [], [reject], exc)
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for i, obj in enumerate(objects):
        sop = _uid(obj, "00080018")
        location = f"{base}/instances/{sop}" if sop else f"{base}/metadata#{i}"
        extraction = extractor.extract_json(obj, location=location, indexed_at=now)
        if extraction.row is not None:
            rows.append(extraction.row)
        rejects.extend(extraction.rejects)
    return _SeriesResult(study_uid, series_uid, expected, rows, rejects)


def _split(
    lo: dt.date | None, hi: dt.date | None, dates: list[dt.date]
) -> list[tuple[dt.date | None, dt.date | None]]:
    """Windows covering ``lo..hi`` that split the sorted sample ``dates`` at its median."""
    one_day = dt.timedelta(days=1)
    first, last = dates[0], dates[-1]
    if first == last:  # one day holds the whole sample: that day alone, and both sides
        windows = [(lo, first - one_day), (first, first), (first + one_day, hi)]
    else:
        middle = dates[len(dates) // 2]
        if middle == first:
            middle += one_day
        windows = [(lo, middle - one_day), (middle, hi)]
    return [(a, b) for a, b in windows if a is None or b is None or a <= b]


def _date(obj: Mapping[str, Any]) -> dt.date | None:
    values = _values(obj, _STUDY_DATE)
    text = values[0] if values and isinstance(values[0], str) else ""
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def _qido_date(day: dt.date | None) -> str:
    return "" if day is None else day.strftime("%Y%m%d")


def _values(obj: Mapping[str, Any], tag: str) -> list[Any]:
    element = obj.get(tag)
    if not isinstance(element, dict):
        return []
    values = element.get("Value")
    return values if isinstance(values, list) else []


def _uid(obj: Mapping[str, Any], tag: str) -> str | None:
    values = _values(obj, tag)
    if values and isinstance(values[0], str) and values[0].strip():
        return values[0].strip()
    return None


def _int(obj: Mapping[str, Any], tag: str) -> int | None:
    values = _values(obj, tag)
    if not values:
        return None
    try:
        return int(values[0])
    except (TypeError, ValueError):
        return None
