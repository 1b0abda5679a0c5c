"""``imgindex select COHORT.yaml --root ROOT --out SELECTION``: run a cohort.

and ``imgindex cohort check|from-list``: validate a cohort file, or write one from a list.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq
from pydantic import ValidationError

from imgindex.cli._common import add_root, settings_from
from imgindex.cli.sql import write_result
from imgindex.errors import CohortError

if TYPE_CHECKING:
    import argparse

    import pyarrow as pa

    from imgindex.cohort import Cohort, Selection


def add_parser(sub: Any) -> None:
    """Register ``select`` and ``cohort``."""
    parser = sub.add_parser(
        "select",
        help="run a cohort: select series by EMR criteria with day windows",
        description="Run the cohort in COHORT.yaml (docs/cohorts.md) over the index and the "
        "imported OMOP tables under ROOT. Prints how many persons each criterion keeps and "
        "writes the selection (one row per series, with the cohort's hash and the table "
        "versions read) to --out.",
    )
    parser.add_argument("cohort", type=Path, help="the cohort file (YAML)")
    add_root(parser)
    parser.add_argument(
        "--out", type=Path, help="write the selection here (Parquet); without it, a preview"
    )
    parser.add_argument(
        "--as",
        dest="also",
        choices=("image_occurrence",),
        action="append",
        default=[],
        help="also write OUT's rows as OMOP MI-CDM image_occurrence (OUT.image_occurrence.parquet)",
    )
    parser.add_argument(
        "--as-of",
        type=Path,
        metavar="SELECTION",
        help="read the table versions an earlier selection read (rebuild it exactly)",
    )
    parser.add_argument(
        "--entry-from",
        type=dt.date.fromisoformat,
        metavar="YYYY-MM-DD",
        help="replace the first day of the entry event's date range",
    )
    parser.add_argument(
        "--entry-to",
        type=dt.date.fromisoformat,
        metavar="YYYY-MM-DD",
        help="replace the last day of the entry event's date range",
    )
    parser.add_argument("--max-rows", type=int, default=10, help="series shown (default 10)")
    parser.set_defaults(run=run_select)

    cohort = sub.add_parser(
        "cohort",
        help="check a cohort file, or write one from a list of patients or studies",
        description="Cohort files: `check` validates one (and its code sets); `from-list` "
        "writes one whose entry is a list you already have (PatientID, AccessionNumber or "
        "StudyInstanceUID, with optional entry_date, from, to columns).",
    )
    actions = cohort.add_subparsers(
        dest="action", required=True, metavar="ACTION", help="check | from-list"
    )
    check = actions.add_parser("check", help="validate a cohort file")
    check.add_argument("cohort", type=Path)
    check.set_defaults(run=run_check)
    from_list = actions.add_parser(
        "from-list",
        help="write a cohort from a list file (CSV or Parquet)",
        description="Write a cohort YAML whose entry is FILE (referenced relative to the "
        "cohort, so keep them together); edit it to add imaging or EMR criteria, then run "
        "it with `imgindex select`.",
    )
    from_list.add_argument("file", type=Path, help="CSV or Parquet list")
    from_list.add_argument("--out", type=Path, required=True, help="cohort file to write")
    from_list.add_argument("--name", help="cohort name (default: the list's file name)")
    from_list.add_argument("--modality", action="append", help="keep only this Modality")
    from_list.add_argument(
        "--days",
        nargs=2,
        type=int,
        metavar=("FIRST", "LAST"),
        help="imaging window relative to each row's entry date",
    )
    from_list.set_defaults(run=run_from_list)


def run_select(args: argparse.Namespace) -> int:
    """Run the cohort, print the attrition, write the selection."""
    from imgindex.cohort import Cohort, read_selection, select
    from imgindex.cohort.mi_cdm import image_occurrence

    settings = settings_from(args)
    cohort = with_entry_dates(Cohort.from_yaml(args.cohort), args.entry_from, args.entry_to)
    versions = None
    if args.as_of is not None:
        _, info = read_selection(args.as_of)
        versions = info["versions"]
        if info["sha256"] != cohort.sha256():
            print(
                f"note: {args.cohort} is not the cohort {args.as_of} was made from "
                "(its hash differs); running it on the same table versions",
                file=sys.stderr,
            )
    selection = select(cohort, settings.root, versions=versions)
    print_attrition(selection)
    if args.out is None:
        preview = selection.table.select(
            ["PatientID", "Modality", "SeriesDescription", "entry_date", "days_from_index"]
        )
        write_result(preview, "table", args.max_rows)
        print("(no --out: nothing written)")
        return 0
    written = [selection.write(args.out)]
    if "image_occurrence" in args.also:
        target = args.out.with_name(args.out.stem + ".image_occurrence.parquet")
        pq.write_table(image_occurrence(selection, settings.root), target)
        written.append(target)
    for path in written:
        print(f"wrote {path}")
    return 0


def with_entry_dates(cohort: Cohort, first: dt.date | None, last: dt.date | None) -> Cohort:
    """``cohort`` with its entry date range's ends replaced where given (a new hash)."""
    from imgindex.cohort import DateRange

    if first is None and last is None:
        return cohort
    if cohort.entry.list is not None:
        raise CohortError("--entry-from/--entry-to apply to EMR entry events, not to a list")
    dates = cohort.entry.dates or DateRange()
    try:
        dates = DateRange.model_validate(
            {
                "from": first if first is not None else dates.from_,
                "to": last if last is not None else dates.to,
            }
        )
    except ValidationError as exc:
        message = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise CohortError(f"--entry-from/--entry-to: {message}") from None
    changed = cohort.model_copy(update={"entry": cohort.entry.model_copy(update={"dates": dates})})
    return changed.resolved()


def print_attrition(selection: Selection) -> None:
    """The attrition table and the totals, for people."""
    att: pa.Table = selection.attrition
    rows = att.to_pylist()
    width = max([len(r["step"]) for r in rows] + [4])
    print(f"cohort {selection.cohort.name} ({selection.sha256[:12]})")
    print(f"  {'step':<{width}}  {'persons':>9}  {'entry events':>12}")
    for r in rows:
        print(f"  {r['step']:<{width}}  {r['persons']:>9,}  {r['entry_events']:>12,}")
    persons = len(set(selection.table.column("PatientID").to_pylist()))
    print(
        f"{selection.table.num_rows:,} series of {persons:,} patients selected "
        f"in {selection.seconds:.2f} s"
    )


def run_check(args: argparse.Namespace) -> int:
    """Validate a cohort file and print what it means in a line or two."""
    from imgindex.cohort import Cohort

    cohort = Cohort.from_yaml(args.cohort)
    entry = cohort.entry
    what = f"list {entry.list}" if entry.list else f"{entry.domain} events ({entry.occurrence})"
    print(
        f"{args.cohort}: valid. Entry: {what}; {len(cohort.inclusion)} inclusion, "
        f"{len(cohort.exclusion)} exclusion, {len(cohort.labels)} label criteria; "
        f"{len(cohort.codesets)} code sets; sha256 {cohort.sha256()[:12]}"
    )
    return 0


def run_from_list(args: argparse.Namespace) -> int:
    """Write the cohort file."""
    from imgindex.cohort.listing import read_list, write_list_cohort

    if not args.file.is_file():
        raise CohortError(f"{args.file}: no such list file")
    rows, ident = read_list(args.file)
    out = write_list_cohort(
        args.file,
        args.out,
        name=args.name,
        modality=tuple(args.modality) if args.modality else None,
        window=tuple(args.days) if args.days else None,
    )
    print(f"wrote {out}: {rows.height} rows by {ident}; run it with imgindex select {out}")
    return 0
