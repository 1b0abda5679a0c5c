"""``imgindex crawl SOURCE --root ROOT``: index a DICOMweb server, Orthanc's change feed or a
folder, without copying pixels from servers."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from typing import TYPE_CHECKING, Any

from imgindex.cli._common import add_root, is_terminal, settings_from, stop_on_signals
from imgindex.config import SETTINGS_HELP
from imgindex.errors import ConfigError

if TYPE_CHECKING:
    from dicomweb.client import DicomWebClient
    from imgindex.crawl.orthanc import FeedSummary
    from imgindex.crawl.web import CrawlSummary

#: Shortfalls listed one per line in the summary; the rest are in crawl_state.
_SHOWN = 10


def add_parser(sub: Any) -> None:
    """Register the subcommand."""
    parser = sub.add_parser(
        "crawl",
        help="index a DICOMweb server (QIDO-RS/WADO-RS), Orthanc's change feed, or a folder",
        description="Index every instance a DICOMweb server holds from its metadata (no "
        "pixels are copied; `location` is each instance's WADO-RS URL). Resumable: progress "
        "is kept in the crawl_state table, so a stopped crawl goes on where it stopped, and a "
        "later crawl fetches only studies and series whose counts changed. With --orthanc "
        "URL, follow Orthanc's change feed instead (the first run crawls everything through "
        "its DICOMweb plugin). A folder as SOURCE is indexed as `imgindex index-files` does.",
    )
    parser.add_argument(
        "source",
        nargs="?",
        metavar="SOURCE",
        help="DICOMweb base URL (e.g. http://127.0.0.1:8042/dicom-web) or a folder",
    )
    add_root(parser)
    parser.add_argument(
        "--orthanc",
        metavar="URL",
        default=None,
        help="Orthanc's REST root (e.g. http://127.0.0.1:8042): follow its change feed",
    )
    parser.add_argument(
        "--dicomweb-root",
        default="/dicom-web",
        metavar="PATH",
        help="with --orthanc: where its DICOMweb plugin answers (default /dicom-web)",
    )
    parser.add_argument(
        "--follow",
        action="store_true",
        help="with --orthanc: keep polling the feed until stopped (SIGTERM, Ctrl-C)",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="with --follow: seconds between polls of a feed read to its end (default 1)",
    )
    parser.add_argument("--since", type=_date, default=None, help="first StudyDate, YYYY-MM-DD")
    parser.add_argument("--until", type=_date, default=None, help="last StudyDate, YYYY-MM-DD")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="requests in flight at once (default 8); raise it for a remote, slow server",
    )
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument(
        "--auth",
        default=None,
        metavar="basic:USER:PASS|bearer:TOKEN",
        help="credentials (visible to other users in the process list: prefer --auth-file "
        "or IMGINDEX_AUTH)",
    )
    auth.add_argument(
        "--auth-file",
        default=None,
        metavar="FILE",
        help="read the credentials, in --auth syntax, from the first line of FILE",
    )
    parser.add_argument(
        "--page-size",
        type=int,
        default=1000,
        help="results per QIDO request (its `limit`, default 1000); a date window with this "
        "many studies is split in two",
    )
    parser.add_argument(
        "--max-results",
        type=int,
        default=None,
        metavar="N",
        help="the server caps results at N without saying so (Orthanc's LimitFindResults, "
        "some cloud stores at 100): windows reaching N are split too",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="fetch every series again, ignoring what earlier crawls recorded",
    )
    parser.add_argument(
        "--batch-rows",
        type=int,
        default=5000,
        help="instances per index commit (default 5000; commits also happen every 10 s)",
    )
    parser.add_argument(
        "--source-name",
        default=None,
        metavar="NAME",
        help="value of the `source` column (default: the server's URL without credentials)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="seconds to wait for each response (default 60)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=5,
        help="attempts per request on transient faults (connect errors, timeouts, 408, "
        "429, 500, 502, 503, 504), with capped, jittered back-off (default 5)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on http://127.0.0.1:PORT/metrics (default: off)",
    )
    parser.add_argument(
        "--attributes", default=None, metavar="KEYWORD,...", help=SETTINGS_HELP["extra_attributes"]
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )
    parser.set_defaults(run=run)


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None


def run(args: argparse.Namespace) -> int:
    """Crawl the source and print the summary."""
    settings = settings_from(args, {"extra_attributes": args.attributes})
    progress = is_terminal() if args.progress is None else args.progress
    if (args.source is None) == (args.orthanc is None):
        raise ConfigError("give one SOURCE (a DICOMweb URL or a folder) or --orthanc URL")
    if args.follow and args.orthanc is None:
        raise ConfigError("--follow needs --orthanc URL (it follows Orthanc's change feed)")
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, not {args.concurrency}")
    if args.source is not None and not _is_url(args.source):
        return _crawl_folder(args, settings, progress)

    from dicomweb.client import DicomWebClient, RetryPolicy, parse_auth, read_auth_file
    from imgindex.crawl.metrics import CrawlMetrics

    try:
        if args.auth_file:
            auth = read_auth_file(args.auth_file)
        elif args.auth or os.environ.get("IMGINDEX_AUTH"):
            auth = parse_auth(args.auth or os.environ["IMGINDEX_AUTH"])
        else:
            auth = None
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc)) from None
    metrics = CrawlMetrics()
    if args.metrics_port is not None:
        port = metrics.serve(args.metrics_port)
        print(f"imgindex crawl: metrics on http://127.0.0.1:{port}/metrics", file=sys.stderr)
    stop = stop_on_signals("crawl", "stopping after the requests in flight")

    def client(url: str) -> DicomWebClient:
        return DicomWebClient(
            url,
            auth=auth,
            concurrency=args.concurrency,
            timeout=args.timeout,
            retry=RetryPolicy(attempts=max(1, args.retries)),
            on_event=metrics.on_request,
        )

    try:
        if args.orthanc is not None:
            from imgindex.crawl.orthanc import OrthancFeed

            base = args.orthanc.rstrip("/")
            with client(base) as rest, client(base + "/" + args.dicomweb_root.strip("/")) as web:
                feed = OrthancFeed(
                    rest,
                    web,
                    settings.root,
                    source=args.source_name,
                    attributes=settings.attributes,
                    poll_interval=args.poll_interval,
                    metrics=metrics,
                    stop=stop,
                    progress=progress,
                )
                print(
                    f"imgindex crawl: following {rest.url}/changes"
                    + (" (until stopped)" if args.follow else ""),
                    file=sys.stderr,
                    flush=True,
                )
                print(format_feed(feed.run(follow=args.follow), str(settings.root)))
            return 0

        from imgindex.crawl.web import DicomWebCrawl

        with client(args.source) as web:
            crawl = DicomWebCrawl(
                web,
                settings.root,
                source=args.source_name,
                attributes=settings.attributes,
                since=args.since,
                until=args.until,
                page_size=args.page_size,
                max_results=args.max_results,
                full=args.full,
                batch_rows=args.batch_rows,
                progress=progress,
                metrics=metrics,
                stop=stop,
            )
            summary = crawl.run()
        print(format_summary(summary, str(settings.root)))
        return 3 if summary.series_failed else 0
    finally:
        metrics.close()


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def _crawl_folder(args: argparse.Namespace, settings: Any, progress: bool) -> int:
    from imgindex.cli.index_files import format_summary as format_files
    from imgindex.crawl import index_files

    if not os.path.lexists(args.source):
        raise ConfigError(
            f"no such folder: {args.source} (a server URL starts with http:// or https://)"
        )
    summary = index_files(
        [args.source],
        settings.root,
        attributes=settings.attributes,
        workers=settings.workers,
        batch_rows=settings.batch_rows,
        force=settings.force,
        progress=progress,
    )
    print(format_files(summary, str(settings.root)))
    return 0


def format_summary(summary: CrawlSummary, root: str) -> str:
    """The summary people read after a crawl."""
    lines = [
        f"source           {summary.source}",
        (
            f"studies          {summary.studies:>10,}  ({summary.studies_skipped:,} unchanged "
            "since the last crawl)"
        ),
        (
            f"series           {summary.series:>10,}  ({summary.series_fetched:,} fetched, "
            f"{summary.series_skipped:,} unchanged, {summary.series_failed:,} failed)"
        ),
        (
            f"instances        {summary.instances:>10,}  ({summary.seconds:.1f} s: "
            f"{summary.instances_per_s:,.0f} instances/s, {summary.series_per_s:,.1f} series/s)"
        ),
        f"rejects          {summary.rejects:>10,}",
    ]
    if summary.shortfalls:
        missing = sum(s.missing for s in summary.shortfalls)
        lines.append(
            f"INCOMPLETE: {len(summary.shortfalls):,} series hold {missing:,} fewer instances "
            "than the server counts:"
        )
        for s in summary.shortfalls[:_SHOWN]:
            lines.append(f"  series {s.series_uid}: {s.indexed} of {s.expected} indexed")
        if len(summary.shortfalls) > _SHOWN:
            lines.append(f"  ... and {len(summary.shortfalls) - _SHOWN:,} more")
    if summary.failures:
        lines.append(f"FAILED: {len(summary.failures):,} requests; first: {summary.failures[0]}")
    if summary.capped_windows:
        lines.append(
            "CAPPED: the server returned only part of the studies of "
            + ", ".join(summary.capped_windows[:_SHOWN])
        )
    if summary.shortfalls or summary.failures or summary.capped_windows:
        lines.append(
            f'see them with: imgindex sql --root {root} "SELECT kind, key, status, missing, '
            "error FROM crawl_state WHERE status <> 'done'\""
        )
        lines.append("a second crawl retries failed and incomplete series")
    if summary.stopped:
        lines.append("stopped early: run the same command again to go on")
    lines.append(f"index: {root}")
    return "\n".join(lines)


def format_feed(summary: FeedSummary, root: str) -> str:
    """The summary printed when following the change feed ends."""
    lines: list[str] = []
    if summary.baseline is not None:
        lines.append("first run: crawled everything through DICOMweb")
        lines.append(format_summary(summary.baseline, root))
    lines += [
        f"changes read     {summary.changes:>10,}  (last sequence number {summary.last_seq})",
        f"series fetched   {summary.series_fetched:>10,}",
        f"instances        {summary.instances:>10,}",
    ]
    if summary.failures:
        lines.append(f"FAILED: {len(summary.failures):,} series; first: {summary.failures[0]}")
    lines.append(f"index: {root}")
    return "\n".join(lines)
