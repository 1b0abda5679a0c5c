"""``imgindex index-files PATH... --root ROOT``: index folders of DICOM files."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from imgindex.cli._common import add_root, is_terminal, settings_from
from imgindex.config import SETTINGS_HELP
from imgindex.crawl import IndexSummary, index_files


def add_parser(sub: Any) -> None:
    """Register the subcommand."""
    parser = sub.add_parser(
        "index-files",
        help="index every DICOM file under folders",
        description="Walk folders (any file names, no DICOMDIR needed), read each file's "
        "header and add it to the index. Unreadable and non-DICOM files are recorded in the "
        "rejects table with the reason. Running again over the same files adds nothing.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="folders or files to index")
    add_root(parser)
    parser.add_argument("--workers", type=int, default=None, help=SETTINGS_HELP["workers"])
    parser.add_argument("--batch-rows", type=int, default=None, help=SETTINGS_HELP["batch_rows"])
    parser.add_argument("--force", action="store_true", default=None, help=SETTINGS_HELP["force"])
    parser.add_argument(
        "--attributes",
        default=None,
        metavar="KEYWORD,...",
        help=SETTINGS_HELP["extra_attributes"],
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Index the paths and print the summary."""
    settings = settings_from(
        args,
        {
            "workers": args.workers,
            "batch_rows": args.batch_rows,
            "force": args.force,
            "extra_attributes": args.attributes,
        },
    )
    missing = [p for p in args.paths if not os.path.lexists(p)]
    if missing:
        print(
            f"imgindex index-files: error: no such file or folder: {', '.join(missing)}",
            file=sys.stderr,
        )
        return 2
    summary = index_files(
        args.paths,
        settings.root,
        attributes=settings.attributes,
        workers=settings.workers,
        batch_rows=settings.batch_rows,
        force=settings.force,
        progress=is_terminal() if args.progress is None else args.progress,
    )
    print(format_summary(summary, str(settings.root)))
    return 0


def format_summary(summary: IndexSummary, root: str) -> str:
    """The summary people read after a run."""
    lines = [
        (
            f"files scanned    {summary.files:>10,}  ({summary.bytes_scanned / 1e6:,.1f} MB in "
            f"{summary.seconds:.1f} s: {summary.files_per_s:,.0f} files/s, "
            f"{summary.mb_per_s:,.1f} MB/s)"
        ),
        f"instances        {summary.instances:>10,}",
        f"series           {summary.series:>10,}",
        f"studies          {summary.studies:>10,}",
        (
            f"duplicates       {summary.duplicates:>10,}  (same SOPInstanceUID as an earlier "
            "file; the first in path order is indexed)"
        ),
        f"rejected files   {summary.rejected_files:>10,}",
        f"bad values       {summary.bad_values:>10,}  (kept as null)",
    ]
    if summary.rejects_by_reason:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary.rejects_by_reason.items()))
        lines.append(f"rejects by reason: {reasons}")
        lines.append(
            f'see them with: imgindex sql --root {root} "SELECT reason, location, message '
            'FROM rejects"'
        )
    lines.append(f"index: {root}")
    return "\n".join(lines)
