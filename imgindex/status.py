"""What operations watch: the index's size, intake and throughput, backlog and failures.

:func:`collect_status` reads the catalog root only (the index tables, the transfer ledger,
the crawl state, the listener's write-ahead log folder), so it answers whether or not a
listener, crawl or export is running, and never takes a lock a writer needs.

- **index**: patients, studies, series, instances and bytes;
- **intake**: instances and bytes indexed in the last hour and day, by source (a listener's
  calling AE title, a crawled server, a folder);
- **backlog**: the listener's write-ahead log segments not yet checkpointed, and received
  files staged for the indexer (``objects/_incoming``);
- **crawls**: studies and series by status per server, and where a change feed stands;
- **exports**: per export, series by outcome, DICOM bytes in, MB/s over the series' own
  seconds, and failures by reason;
- **rejects**: files and values refused, by reason.

``imgindex status --root ROOT`` prints it; the web app's operations page will show the same.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgindex.index import Index

if TYPE_CHECKING:
    import os

__all__ = ["Status", "collect_status"]

#: The windows intake is counted over, in hours.
WINDOWS_H = (1, 24)


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
        lines.append("intake (instances indexed, by source):")
        if not self.intake:
            lines.append("  nothing indexed in the last 24 hours")
        for row in self.intake:
            lines.append(
                f"  {row['source'] or '(unknown)'}: last hour {row['instances_1h']:,} "
                f"({row['bytes_1h'] / 1e6:,.1f} MB), last 24 h {row['instances_24h']:,} "
                f"({row['bytes_24h'] / 1e6:,.1f} MB)"
            )
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
    finally:
        con.close()
    return Status(
        root=str(root),
        at=now.isoformat(timespec="seconds"),
        index={k: int(v or 0) for k, v in counts.items()},
        intake=intake,
        backlog=_backlog(root),
        crawls=crawls,
        exports=exports,
        export_failures=export_failures,
        rejects=rejects,
    )


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
