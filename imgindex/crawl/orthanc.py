"""Follow Orthanc's change feed (``GET /changes?since=&limit=``) into the index.

Orthanc numbers every change (a new instance, series, study, ...). The first run notes the
feed's last number, crawls everything through the DICOMweb plugin
(:class:`~imgindex.crawl.web.DicomWebCrawl`), and records the number; every later poll reads
the changes after it, finds the series that received instances, fetches their WADO-RS
metadata and indexes it, then records the new number in ``crawl_state`` (kind ``feed``).
Rows are committed before the number moves, so a feed stopped at any moment resumes without
losing a change; re-indexing a series is harmless (upserts by SOPInstanceUID).

Orthanc's REST API is plain JSON over HTTP; the same :class:`~dicomweb.client.DicomWebClient`
(retries, credentials, metrics) serves it.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa

from dicomweb.errors import DicomWebError
from imgindex.crawl.web import CrawlSummary, DicomWebCrawl, fetch_series
from imgindex.extract import Extractor
from imgindex.index import Index, IndexWriter
from imgindex.schema import CRAWL_STATE_SCHEMA, DEFAULT_ATTRIBUTES

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from dicomweb.client import DicomWebClient
    from imgindex.crawl.metrics import CrawlMetrics
    from imgindex.schema import Attribute

__all__ = ["FeedSummary", "OrthancFeed"]

logger = logging.getLogger(__name__)

_FEED_KEY = "changes"


@dataclass
class FeedSummary:
    """What following the change feed did."""

    source: str
    baseline: CrawlSummary | None = None
    changes: int = 0
    series_fetched: int = 0
    instances: int = 0
    failures: list[str] = field(default_factory=list)
    last_seq: int = 0
    seconds: float = 0.0


@dataclass
class _Series:
    study_uid: str
    series_uid: str
    instances: set[str]


class OrthancFeed:
    """Index what Orthanc receives, from its change feed.

    Parameters
    ----------
    rest : DicomWebClient
        A client on Orthanc's REST root (``http://host:8042``).
    web : DicomWebClient
        A client on its DICOMweb root (``http://host:8042/dicom-web``).
    root : path-like
        Catalog root.
    source : str, optional
        The ``source`` column and ``crawl_state`` key (default: the DICOMweb URL), the same
        as a DICOMweb crawl of that URL, so both keep one set of rows.
    attributes : sequence of Attribute
        Columns to fill.
    poll_interval : float
        Seconds between polls once the feed is read to its end (with ``follow``).
    page : int
        Changes per request.
    metrics : CrawlMetrics, optional
        Prometheus metrics to update.
    stop : threading.Event, optional
        Set it to stop after the current page.
    progress : bool
        Show a progress bar during the first full crawl.
    """

    def __init__(
        self,
        rest: DicomWebClient,
        web: DicomWebClient,
        root: str | os.PathLike[str],
        *,
        source: str | None = None,
        attributes: Sequence[Attribute] = DEFAULT_ATTRIBUTES,
        poll_interval: float = 1.0,
        page: int = 1000,
        metrics: CrawlMetrics | None = None,
        stop: threading.Event | None = None,
        progress: bool = False,
    ) -> None:
        self.rest = rest
        self.web = web
        self.root = root
        self.source = source or web.url
        self.attributes = tuple(attributes)
        self.poll_interval = poll_interval
        self.page = page
        self.metrics = metrics
        self.stop = stop or threading.Event()
        self.progress = progress
        self.extractor = Extractor(self.attributes, source=self.source)
        self.writer = IndexWriter(root, self.attributes)
        self._state = Index(Path(root), self.attributes).table("crawl_state")
        self._instance_series: dict[str, str] = {}
        self._series: dict[str, _Series] = {}
        self._study_uids: dict[str, str] = {}

    def last_seq(self) -> int | None:
        """The last change indexed by an earlier run, or None if the feed was never read."""
        if not self._state.exists:
            return None
        frame = (
            self._state.scan()
            .filter(
                (pl.col("source") == self.source)
                & (pl.col("kind") == "feed")
                & (pl.col("key") == _FEED_KEY)
            )
            .select("last_seq")
            .collect()
        )
        return None if frame.is_empty() else frame["last_seq"][0]

    def _save_seq(self, seq: int) -> None:
        row: dict[str, Any] = dict.fromkeys(CRAWL_STATE_SCHEMA.names)
        row.update(
            source=self.source,
            kind="feed",
            key=_FEED_KEY,
            status="following",
            last_seq=seq,
            updated_at=dt.datetime.now(dt.UTC),
        )
        self._state.upsert(pa.Table.from_pylist([row], CRAWL_STATE_SCHEMA))
        if self.metrics is not None:
            self.metrics.feed_seq.set(seq)

    def run(self, *, follow: bool = False) -> FeedSummary:
        """Catch up with the feed (after a full crawl on the first run); with ``follow``,
        keep polling until :attr:`stop` is set."""
        started = time.perf_counter()
        summary = FeedSummary(self.source)
        seq = self.last_seq()
        if seq is None:
            # Note the feed's end first: whatever arrives during the crawl is read after it.
            seq = int(self.rest.get_json("changes", params={"last": ""}).get("Last", 0))
            crawl = DicomWebCrawl(
                self.web,
                self.root,
                source=self.source,
                attributes=self.attributes,
                metrics=self.metrics,
                stop=self.stop,
                progress=self.progress,
            )
            summary.baseline = crawl.run()
            if summary.baseline.stopped:
                summary.seconds = time.perf_counter() - started
                return summary
            self._save_seq(seq)
        summary.last_seq = seq
        while not self.stop.is_set():
            answer = self.rest.get_json(
                "changes", params={"since": str(seq), "limit": str(self.page)}
            )
            changes = answer.get("Changes") or []
            if changes:
                self._index_changes(changes, summary)
                seq = max(int(c["Seq"]) for c in changes)
                self._save_seq(seq)
                summary.changes += len(changes)
                summary.last_seq = seq
            if answer.get("Done", True) or not changes:
                if not follow:
                    break
                self.stop.wait(self.poll_interval)
        summary.seconds = time.perf_counter() - started
        return summary

    # -- changes to series -----------------------------------------------------------------

    def _index_changes(self, changes: list[dict[str, Any]], summary: FeedSummary) -> None:
        touched: dict[str, _Series] = {}
        for change in changes:
            if change.get("ChangeType") != "NewInstance" or change.get("ResourceType") not in (
                None,
                "Instance",
            ):
                continue
            try:
                series = self._series_of(str(change["ID"]))
            except DicomWebError as exc:
                if exc.status == 404:  # deleted since: nothing to index
                    continue
                raise
            if series is not None:
                touched[series.series_uid] = series
        rows: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        for series in touched.values():
            result = fetch_series(self.web, self.extractor, series.study_uid, series.series_uid)
            rows.extend(result.rows)
            rejects.extend(result.rejects)
            if result.error is not None:
                summary.failures.append(str(result.error))
                logger.warning("series %s: %s", series.series_uid, result.error)
            else:
                summary.series_fetched += 1
        if rows or rejects:
            self.writer.write(rows, rejects)
        summary.instances += len(rows)
        if self.metrics is not None:
            self.metrics.instances.inc(len(rows))

    def _series_of(self, instance_id: str) -> _Series | None:
        series_id = self._instance_series.get(instance_id)
        if series_id is None:
            instance = self.rest.get_json(f"instances/{_orthanc_id(instance_id)}")
            series_id = str(instance["ParentSeries"])
        series = self._series.get(series_id)
        if series is None or instance_id not in series.instances:
            # New, or grown since we looked: one request learns all its instances.
            found = self.rest.get_json(f"series/{_orthanc_id(series_id)}")
            study_id = str(found["ParentStudy"])
            study_uid = self._study_uids.get(study_id)
            if study_uid is None:
                study = self.rest.get_json(f"studies/{_orthanc_id(study_id)}")
                study_uid = str(study["MainDicomTags"]["StudyInstanceUID"])
                self._study_uids[study_id] = study_uid
            series_uid = str(found["MainDicomTags"]["SeriesInstanceUID"])
            series = _Series(study_uid, series_uid, set(found.get("Instances", [])))
            self._series[series_id] = series
            for child in series.instances:
                self._instance_series[child] = series_id
        return series


def _orthanc_id(value: str) -> str:
    """Orthanc identifiers are SHA-1 groups: hex digits and dashes, never a path."""
    if not value or any(c not in "0123456789abcdef-" for c in value):
        raise ValueError(f"not an Orthanc identifier: {value[:80]!r}")
    return value
