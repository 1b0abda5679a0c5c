"""``imgindex deid-check PATH --root ROOT``: scan an export for identifying values."""

from __future__ import annotations

import json
import sys
from itertools import groupby
from typing import TYPE_CHECKING, Any

from imgindex.cli._common import add_root, settings_from
from imgindex.errors import ConfigError

if TYPE_CHECKING:
    import argparse

    from imgindex.deid.check import CheckReport

#: Lines of findings printed (without --json).
_SHOWN = 50


def add_parser(sub: Any) -> None:
    """Register the subcommand."""
    parser = sub.add_parser(
        "deid-check",
        help="scan an export for names, IDs, UIDs and unshifted dates of the catalog's patients",
        description=(
            "Scan PATH (a Zarr export with manifest.parquet, EMR Parquet files, a DICOM tree, "
            "or one file) for identifying values of the patients in the catalog at --root: "
            "names, IDs, UIDs that are in the index, dates equal to a linked patient's "
            "original dates, and names or IDs inside free text. Records are linked to "
            "patients by raw IDs or, with the de-identification key, by their pseudonyms. "
            "Exit status 0 when nothing was found, 1 when something was, 2 for a usage error."
        ),
    )
    parser.add_argument("path", metavar="PATH", help="the export (folder or file)")
    add_root(parser)
    parser.add_argument(
        "--deid-key-file",
        default=None,
        metavar="FILE",
        help="the key the export was pseudonymized with (default ROOT/secrets/deid.key, "
        "if it exists)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the findings as a JSON list on stdout"
    )
    parser.add_argument(
        "--show-values",
        action="store_true",
        help="print the values found in full (default: masked, first letter of each word)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``imgindex deid-check``: 0 clean, 1 findings, 2 usage error."""
    from imgindex.deid.check import check_export
    from imgindex.deid.keys import Deidentifier

    try:
        settings = settings_from(args)
        deid = Deidentifier.from_file(args.deid_key_file) if args.deid_key_file else None
        report = check_export(args.path, settings.root, deid=deid)
    except ConfigError as exc:
        print(f"imgindex deid-check: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        rows = [f.to_dict(show_values=args.show_values) for f in report.findings]
        print(json.dumps(rows, ensure_ascii=False, indent=1))
    else:
        print(format_report(report, show_values=args.show_values))
    return 0 if report.ok else 1


def format_report(report: CheckReport, *, show_values: bool = False, limit: int = _SHOWN) -> str:
    """The summary, then the findings grouped by file, at most ``limit`` lines of them."""
    files = ", ".join(f"{n} {kind}" for kind, n in sorted(report.files.items())) or "nothing"
    records = ", ".join(f"{n} {kind}" for kind, n in sorted(report.records.items())) or "none"
    lines = [
        (
            f"scanned {report.path}: files {files}; records {records}; "
            f"{report.linked_patients} index patient(s) linked"
        ),
    ]
    lines += [f"  not checked: {line}" for line in report.not_run]
    lines += [f"  unreadable: {line}" for line in report.errors[:5]]
    if report.ok:
        lines.append("no findings")
        return "\n".join(lines)
    counts = ", ".join(f"{n} {kind}" for kind, n in report.counts().items() if n)
    lines.append(f"{len(report.findings)} findings: {counts}")
    shown: list[str] = []
    for path, group in groupby(report.findings, key=lambda f: f.path):
        shown.append(f"{path}:")
        for f in group:
            value = f.matched if show_values else f.value
            shown.append(f"  {f.kind:<4}  {f.location}: {value}  ({f.detail})")
    if len(shown) > limit:
        rest = len(shown) - limit
        shown = [*shown[:limit], f"... {rest} more lines: --json lists every finding"]
    return "\n".join(lines + shown)
