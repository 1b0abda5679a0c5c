"""What operations watch: the index's size, intake and throughput, backlog and failures.

:func:`collect_status` reads the catalog root only (the index tables, the transfer ledger,
the crawl state, the listener's write-ahead log folder), so it answers whether or not a
listener, crawl or export is running, and never takes a lock a writer needs.

- **index**: patients, studies, series, instances and bytes;
- **intake**: instances and bytes indexed in the last hour and day, by source (a listener's
  calling AE title, a crawled server, a folder);
- **throughput**: MB/s and instances/s of the listener, the crawls, folder indexing and the
  exports, per minute over the last 60 minutes and per hour over the last 24 hours
  (:class:`Throughput`), and averaged over the last 5 minutes, hour and day (``rates``);
- **backlog**: the listener's write-ahead log segments not yet checkpointed, and received
  files staged for the indexer (``objects/_incoming``);
- **crawls**: studies and series by status per server, and where a change feed stands;
- **exports**: per export, series by outcome, DICOM bytes in, MB/s over the series' own
  seconds, and failures by reason;
- **ledger**: the latest rows of the transfer ledger, one per exported series;
- **rejects**: files and values refused, by reason;
- **requests**: the web app's export requests by status (waiting for review, approved and
  waiting for the export runner, exporting, failed).

Throughput kinds (:data:`KINDS`). The ``source`` column says who sent an instance but not
how (a listener's calling AE title and a crawl's ``--source-name`` are free text), so an
instance's kind comes from its ``location``, which each path writes in its own shape:

- ``crawl``: a WADO-RS URL (``http://`` or ``https://``), from a DICOMweb or Orthanc crawl;
- ``listener``: a ``file://`` URI under ``ROOT/objects/``, where the listener stores what it
  receives (give ``ROOT`` as the listener was given it, or through the same real path);
- ``files``: any other location: files indexed where they lie (``imgindex index-files``,
  ``imgindex crawl FOLDER``);
- ``export``: the ``transfers`` ledger, each series' DICOM bytes read (``bytes_in``) and
  instances written counted when it finished, whatever its outcome.

An instance counts in the bucket of its ``indexed_at``. Buckets close on the right and the
last ends with ``now``: it covers the minute (or hour) up to and including ``now``, so the
5-minute average is the last five one-minute buckets, and a bucket's MB/s is its bytes over
its seconds.

``imgindex status --root ROOT`` prints it; the web app's operations page and ``/metrics``
show the same.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from imgindex.index import Index

if TYPE_CHECKING:
    import os
    from collections.abc import Callable

__all__ = ["KINDS", "Status", "Throughput", "collect_status"]

#: The windows intake is counted over, in hours.
WINDOWS_H = (1, 24)
#: What moves bytes, in the order pages and terminals list them (see the module docstring).
KINDS: Final = ("listener", "crawl", "files", "export")
#: The throughput series: window name -> (bucket seconds, buckets).
SERIES_WINDOWS: Final = {"60m": (60, 60), "24h": (3600, 24)}
#: The averages: window name -> (series window, trailing buckets of it).
AVERAGES: Final = {"5m": ("60m", 5), "1h": ("60m", 60), "24h": ("24h", 24)}
#: Rows of the transfer ledger :func:`collect_status` returns (the latest).
LEDGER_ROWS: Final = 50
#: Rows of the transfer ledger :meth:`Status.describe` prints.
LEDGER_LINES: Final = 10

_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: An instance's kind from its location (see the module docstring); ``?`` is the URI prefix
#: of ``ROOT/objects/``, given twice (as given and with symbolic links resolved).
_KIND_SQL: Final = (
    "CASE WHEN location LIKE 'http://%' OR location LIKE 'https://%' THEN 'crawl' "
    "WHEN starts_with(location, ?) OR starts_with(location, ?) THEN 'listener' "
    "ELSE 'files' END"
)


@dataclass
class Throughput:
    """Bytes and instances moved per bucket over one window, per kind (:data:`KINDS`).

    Bucket ``i`` covers ``(start + i * bucket_s, start + (i + 1) * bucket_s]``, oldest
    first; the last one ends with the status's ``at``.
    """

    window: str
    bucket_s: int
    #: ISO start of each bucket (UTC).
    starts: list[str]
    bytes: dict[str, list[int]]
    instances: dict[str, list[int]]
    mb_per_s: dict[str, list[float]]
    instances_per_s: dict[str, list[float]]

    @classmethod
    def from_counts(
        cls,
        window: str,
        start: dt.datetime,
        bucket_s: int,
        counts: list[dict[str, Any]],
    ) -> Throughput:
        """The series from rows of ``kind``, ``bucket``, ``bytes`` and ``instances``."""
        n = SERIES_WINDOWS[window][1]
        moved = {kind: [0] * n for kind in KINDS}
        done = {kind: [0] * n for kind in KINDS}
        for row in counts:
            moved[row["kind"]][row["bucket"]] += int(row["bytes"] or 0)
            done[row["kind"]][row["bucket"]] += int(row["instances"] or 0)
        return cls(
            window=window,
            bucket_s=bucket_s,
            starts=[
                (start + dt.timedelta(seconds=i * bucket_s)).isoformat(timespec="seconds")
                for i in range(n)
            ],
            bytes=moved,
            instances=done,
            mb_per_s={k: [b / 1e6 / bucket_s for b in v] for k, v in moved.items()},
            instances_per_s={k: [i / bucket_s for i in v] for k, v in done.items()},
        )

    def average(self, kind: str, buckets: int) -> tuple[float, float]:
        """MB/s and instances/s of ``kind`` over the last ``buckets`` buckets."""
        seconds = buckets * self.bucket_s
        moved = sum(self.bytes[kind][-buckets:])
        done = sum(self.instances[kind][-buckets:])
        return moved / 1e6 / seconds, done / seconds


@dataclass
class Status:
    """The figures :func:`collect_status` gathers (see the module docstring)."""

    root: str
    at: str
    index: dict[str, int]
    intake: list[dict[str, Any]] = field(default_factory=list)
    backlog: dict[str, int] = field(default_factory=dict)
    crawls: list[dict[str, Any]] = field(default_factory=list)
    exports: list[dict[str, Any]] = field(default_factory=list)
    export_failures: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    #: The web app's export requests by status (``imgindex serve``; empty without it).
    requests: dict[str, int] = field(default_factory=dict)
    #: Window name (:data:`SERIES_WINDOWS`) -> the series.
    throughput: dict[str, Throughput] = field(default_factory=dict)
    #: Per kind and average window (:data:`AVERAGES`): bytes, instances, MB/s, instances/s.
    rates: list[dict[str, Any]] = field(default_factory=list)
    #: The latest :data:`LEDGER_ROWS` rows of the transfer ledger, newest first.
    ledger: list[dict[str, Any]] = field(default_factory=list)
    #: Rows in the transfer ledger.
    ledger_total: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The figures as JSON-ready values."""
        return asdict(self)

    def describe(self) -> str:
        """The figures as people read them in a terminal."""
        i = self.index
        lines = [
            f"imgindex status of {self.root} at {self.at}",
            (
                f"index: {i['patients']:,} patients, {i['studies']:,} studies, "
                f"{i['series']:,} series, {i['instances']:,} instances, "
                f"{i['bytes'] / 1e9:,.2f} GB"
            ),
        ]
        b = self.backlog
        lines.append(
            f"backlog: {b['wal_segments']} write-ahead log segments not yet checkpointed "
            f"({b['wal_bytes'] / 1e6:,.1f} MB), {b['incoming_files']} received files "
            f"waiting for the indexer ({b['incoming_bytes'] / 1e6:,.1f} MB)"
        )
        if self.requests:
            lines.append(
                "export requests (imgindex serve): "
                + ", ".join(f"{n} {status}" for status, n in self.requests.items())
            )
        lines.append("intake (instances indexed, by source):")
        if not self.intake:
            lines.append("  nothing indexed in the last 24 hours")
        for row in self.intake:
            lines.append(
                f"  {row['source'] or '(unknown)'}: last hour {row['instances_1h']:,} "
                f"({row['bytes_1h'] / 1e6:,.1f} MB), last 24 h {row['instances_24h']:,} "
                f"({row['bytes_24h'] / 1e6:,.1f} MB)"
            )
        if self.rates:
            lines.append(
                "throughput (MB/s and instances/s, averaged over the last 5 min, hour, 24 h):"
            )
            for kind in KINDS:
                figures = " | ".join(
                    f"{r['window']:>3} {r['mb_per_s']:7,.3f} MB/s {r['instances_per_s']:7,.3f} "
                    "inst/s"
                    for r in self.rates
                    if r["kind"] == kind
                )
                lines.append(f"  {kind + ':':<9} {figures}")
        if self.crawls:
            lines.append("crawls (studies and series by status):")
            for row in self.crawls:
                feed = f", change feed at {row['last_seq']}" if row["last_seq"] is not None else ""
                lines.append(f"  {row['source']}: {row['states']}{feed}")
        if self.exports:
            lines.append("exports:")
            for row in self.exports:
                lines.append(
                    f"  {row['export']}: {row['complete']} complete, {row['failed']} failed, "
                    f"{row['skipped']} skipped; {row['bytes_in'] / 1e6:,.1f} MB in at "
                    f"{row['mb_per_s']:,.1f} MB/s; last {row['last']}"
                )
        if self.export_failures:
            lines.append("export failures by reason:")
            lines.extend(f"  {r['reason']}: {r['series']}" for r in self.export_failures)
        if self.ledger:
            lines.append(
                f"transfer ledger (latest {min(LEDGER_LINES, self.ledger_total)} "
                f"of {self.ledger_total:,}):"
            )
            for row in self.ledger[:LEDGER_LINES]:
                reason = f" ({row['reason']})" if row["reason"] else ""
                lines.append(
                    f"  {row['finished_at']} {row['export']} {row['SeriesInstanceUID']}: "
                    f"{row['outcome']}{reason}, {row['written_instances']}/"
                    f"{row['expected_instances']} instances, {row['bytes_in'] / 1e6:,.1f} MB "
                    f"in {row['seconds']:,.1f} s"
                )
        if self.rejects:
            lines.append("rejected (files and values), by reason:")
            lines.extend(
                f"  {r['reason']}: {r['total']:,} ({r['last_24h']:,} in the last 24 h)"
                for r in self.rejects
            )
        return "\n".join(lines)


def collect_status(root: str | os.PathLike[str], *, now: dt.datetime | None = None) -> Status:
    """Gather the figures of the catalog at ``root``."""
    root = Path(root)
    now = now or dt.datetime.now(dt.UTC)
    index = Index(root)
    con = index.connect()
    try:

        def rows(query: str, *params: Any) -> list[dict[str, Any]]:
            result = con.execute(query, list(params))
            names = [d[0] for d in result.description]
            return [dict(zip(names, row, strict=True)) for row in result.fetchall()]

        (counts,) = rows(
            "SELECT count(DISTINCT PatientID) AS patients, "
            "count(DISTINCT StudyInstanceUID) AS studies, "
            "count(DISTINCT SeriesInstanceUID) AS series, count(*) AS instances, "
            "coalesce(sum(size_bytes), 0)::BIGINT AS bytes FROM instances"
        )
        hour, day = (now - dt.timedelta(hours=h) for h in WINDOWS_H)
        intake = rows(
            "SELECT source, "
            "count(*) FILTER (WHERE indexed_at >= ?) AS instances_1h, "
            "coalesce(sum(size_bytes) FILTER (WHERE indexed_at >= ?), 0)::BIGINT AS bytes_1h, "
            "count(*) AS instances_24h, coalesce(sum(size_bytes), 0)::BIGINT AS bytes_24h "
            "FROM instances WHERE indexed_at >= ? GROUP BY source ORDER BY instances_24h DESC",
            hour,
            hour,
            day,
        )
        crawls = rows(
            "SELECT source, string_agg(kind || ' ' || status || ': ' || n, ', ' "
            "ORDER BY kind, status) AS states, max(last_seq) AS last_seq FROM ("
            "  SELECT source, kind, coalesce(status, 'seen') AS status, count(*) AS n, "
            "  max(last_seq) AS last_seq FROM crawl_state GROUP BY ALL"
            ") GROUP BY source ORDER BY source"
        )
        exports = rows(
            "SELECT export, count(*) FILTER (WHERE outcome = 'complete') AS complete, "
            "count(*) FILTER (WHERE outcome = 'failed') AS failed, "
            "count(*) FILTER (WHERE outcome = 'skipped') AS skipped, "
            "coalesce(sum(bytes_in), 0)::BIGINT AS bytes_in, "
            "coalesce(sum(bytes_in) / 1e6 / nullif(sum(seconds), 0), 0) AS mb_per_s, "
            "max(finished_at)::VARCHAR AS last FROM transfers GROUP BY export ORDER BY last DESC"
        )
        export_failures = rows(
            "SELECT coalesce(reason, '(none)') AS reason, count(*) AS series FROM transfers "
            "WHERE outcome = 'failed' GROUP BY ALL ORDER BY series DESC"
        )
        rejects = rows(
            "SELECT reason, count(*) AS total, count(*) FILTER (WHERE indexed_at >= ?) "
            "AS last_24h FROM rejects GROUP BY reason ORDER BY total DESC",
            day,
        )
        throughput = {window: _throughput(rows, root, window, now) for window in SERIES_WINDOWS}
        ledger = rows(
            "SELECT export, SeriesInstanceUID, outcome, reason, "
            "coalesce(expected_instances, 0) AS expected_instances, "
            "coalesce(written_instances, 0) AS written_instances, "
            "coalesce(bytes_in, 0) AS bytes_in, coalesce(seconds, 0) AS seconds, finished_at "
            "FROM transfers ORDER BY finished_at DESC NULLS LAST, export, SeriesInstanceUID "
            "LIMIT ?",
            LEDGER_ROWS,
        )
        ((ledger_total,),) = con.execute("SELECT count(*) FROM transfers").fetchall()
    finally:
        con.close()
    for row in ledger:
        finished = row["finished_at"]
        row["finished_at"] = (
            finished.astimezone(dt.UTC).isoformat(timespec="seconds") if finished else None
        )
    return Status(
        root=str(root),
        at=now.isoformat(timespec="seconds"),
        index={k: int(v or 0) for k, v in counts.items()},
        intake=intake,
        backlog=_backlog(root),
        requests=_requests(root),
        crawls=crawls,
        exports=exports,
        export_failures=export_failures,
        rejects=rejects,
        throughput=throughput,
        rates=_rates(throughput),
        ledger=ledger,
        ledger_total=int(ledger_total),
    )


def _throughput(
    rows: Callable[..., list[dict[str, Any]]], root: Path, window: str, now: dt.datetime
) -> Throughput:
    """One window's series (see the module docstring): bytes and instances by kind and
    bucket, from the instances table and the transfer ledger."""
    bucket_s, n = SERIES_WINDOWS[window]
    start = now - dt.timedelta(seconds=bucket_s * n)
    # Buckets close on the right: microseconds since ``start``, less one, over the bucket's.
    bucket = f"(epoch_us({{column}}) - ? - 1) // {bucket_s * 1_000_000}"
    start_us = (start - _EPOCH) // dt.timedelta(microseconds=1)
    objects = root / "objects"
    counts = rows(
        f"SELECT {_KIND_SQL} AS kind, {bucket.format(column='indexed_at')} AS bucket, "
        "coalesce(sum(size_bytes), 0)::BIGINT AS bytes, count(*) AS instances "
        "FROM instances WHERE indexed_at > ? AND indexed_at <= ? GROUP BY ALL "
        "UNION ALL "
        f"SELECT 'export' AS kind, {bucket.format(column='finished_at')} AS bucket, "
        "coalesce(sum(bytes_in), 0)::BIGINT AS bytes, "
        "coalesce(sum(written_instances), 0)::BIGINT AS instances "
        "FROM transfers WHERE finished_at > ? AND finished_at <= ? GROUP BY ALL",
        objects.absolute().as_uri() + "/",
        objects.resolve().as_uri() + "/",
        start_us,
        start,
        now,
        start_us,
        start,
        now,
    )
    return Throughput.from_counts(window, start, bucket_s, counts)


def _rates(throughput: dict[str, Throughput]) -> list[dict[str, Any]]:
    """Per kind and :data:`AVERAGES` window: bytes, instances, MB/s and instances/s."""
    rates = []
    for kind in KINDS:
        for name, (window, buckets) in AVERAGES.items():
            series = throughput[window]
            mb_per_s, instances_per_s = series.average(kind, buckets)
            rates.append(
                {
                    "kind": kind,
                    "window": name,
                    "seconds": buckets * series.bucket_s,
                    "bytes": sum(series.bytes[kind][-buckets:]),
                    "instances": sum(series.instances[kind][-buckets:]),
                    "mb_per_s": mb_per_s,
                    "instances_per_s": instances_per_s,
                }
            )
    return rates


def _requests(root: Path) -> dict[str, int]:
    """The web app's export requests by status, from ``ROOT/web/app.sqlite`` opened read-only
    (nothing when the app never ran, or has no request yet)."""
    import sqlite3

    path = root / "web" / "app.sqlite"
    if not path.is_file():
        return {}
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            rows = con.execute("SELECT status, count(*) FROM requests GROUP BY status").fetchall()
        finally:
            con.close()
    except sqlite3.OperationalError:  # no requests table yet, or the file is being made
        return {}
    order = ("submitted", "approved", "exporting", "failed", "exported", "rejected", "withdrawn")
    counts = {str(status): int(n) for status, n in rows}
    return {k: counts[k] for k in (*order, *sorted(set(counts) - set(order))) if k in counts}


def _backlog(root: Path) -> dict[str, int]:
    """The listener's write-ahead log segments and staged files (see the module docstring)."""
    segments = [p for p in (root / "wal").glob("*/*") if p.is_file()]
    incoming = [p for p in (root / "objects" / "_incoming").rglob("*") if p.is_file()]
    return {
        "wal_segments": len(segments),
        "wal_bytes": sum(_size(p) for p in segments),
        "incoming_files": len(incoming),
        "incoming_bytes": sum(_size(p) for p in incoming),
    }


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # gone between the listing and now: checkpointed or indexed
        return 0
