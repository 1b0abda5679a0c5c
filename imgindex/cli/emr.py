"""``imgindex emr import SOURCE --root ROOT`` and ``imgindex emr status``: the OMOP CDM EMR."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from imgindex.cli._common import add_root, is_terminal, settings_from

if TYPE_CHECKING:
    from imgindex.emr import EmrImportSummary
    from imgindex.emr.tables import Emr


def add_parser(sub: Any) -> None:
    """Register the subcommand."""
    parser = sub.add_parser(
        "emr",
        help="import OMOP CDM EMR tables and link them to the index's patients",
        description="Import OMOP CDM v5.4 (or v5.3) tables (person, visit_occurrence, "
        "condition_occurrence, procedure_occurrence, drug_exposure, measurement, observation, "
        "concept, concept_ancestor) into ROOT/emr, and see how the index's patients link to "
        "EMR persons. See docs/emr.md.",
    )
    actions = parser.add_subparsers(
        dest="action", required=True, metavar="ACTION", help="import or status"
    )
    importing = actions.add_parser(
        "import",
        help="import the CDM tables of a folder, DuckDB file or PostgreSQL database",
        description="Read the CDM tables of SOURCE, check them (required columns present, "
        "every value of its column's type) and replace the tables under ROOT/emr with them. "
        "Nothing is written if a table fails the checks. Prints rows per table, the CDM "
        "version and how the index's patients link to EMR persons.",
    )
    importing.add_argument(
        "source",
        metavar="SOURCE",
        help="a folder of CSV/Parquet files named as OHDSI names the tables (PERSON.csv, "
        "condition_occurrence.parquet, ...), a DuckDB database file, or a "
        "postgresql://USER@HOST:PORT/DB URL",
    )
    add_root(importing)
    importing.add_argument(
        "--schema",
        default=None,
        help="for databases: the schema of the CDM tables (default main for DuckDB, public "
        "for PostgreSQL)",
    )
    importing.add_argument(
        "--crosswalk",
        metavar="FILE",
        default=None,
        help="CSV or Parquet file with columns PatientID and person_id: link DICOM patients "
        "to persons through it instead of person.person_source_value",
    )
    importing.add_argument(
        "--tables",
        metavar="TABLE,...",
        default=None,
        help="import only these tables (default all nine); the others stay as they are",
    )
    importing.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print a line per table to stderr (default: when stderr is a terminal)",
    )
    importing.set_defaults(run=run_import)
    status = actions.add_parser(
        "status",
        help="list the imported EMR tables, their rows and versions",
        description="List the tables under ROOT/emr with their row counts, versions and "
        "where they were imported from.",
    )
    add_root(status)
    status.set_defaults(run=run_status)


def run_import(args: argparse.Namespace) -> int:
    """Import the tables, then print the summary and the link report."""
    from imgindex.emr import Emr, import_emr

    settings = settings_from(args)
    progress = is_terminal() if args.progress is None else args.progress
    tables = args.tables.split(",") if args.tables is not None else None
    summary = import_emr(
        args.source,
        settings.root,
        schema=args.schema,
        crosswalk=args.crosswalk,
        tables=tables,
        progress=progress,
    )
    print(format_summary(summary))
    print(format_links(Emr(settings.root), settings))
    return 0


def run_status(args: argparse.Namespace) -> int:
    """Print the tables under ROOT/emr."""
    from imgindex.emr import Emr

    settings = settings_from(args)
    print(format_status(Emr(settings.root)))
    return 0


def format_summary(summary: EmrImportSummary) -> str:
    """The summary people read after an import."""
    lines = [
        f"source       {summary.source}",
        f"CDM version  {summary.cdm_version}",
        f"{'table':<22} {'rows':>12}  version",
    ]
    for name, rows in summary.rows.items():
        lines.append(f"{name:<22} {rows:>12,}  {summary.versions[name]:>7}")
    if summary.skipped:
        lines.append("not in the source, skipped: " + ", ".join(summary.skipped))
    lines.extend(f"warning: {w}" for w in summary.warnings)
    lines.append(f"imported in {summary.seconds:.1f} s into {summary.root / 'emr'}")
    return "\n".join(lines)


def format_links(emr: Emr, settings: Any) -> str:
    """The link report, or why there is none."""
    from imgindex.emr import link_report
    from imgindex.index import Index

    if not (emr.has("person") or emr.has("crosswalk")):
        return "links: no person table imported yet, so no patient links"
    return link_report(Index(settings.root, settings.attributes), emr).describe()


def format_status(emr: Emr) -> str:
    """The tables under ROOT/emr with rows, versions and sources."""
    import polars as pl

    from imgindex.emr import EMR_TABLES
    from imgindex.emr.importer import META_IMPORTED_AT, META_SOURCE

    lines = [f"{'table':<22} {'rows':>12}  {'version':>7}  imported from"]
    found = 0
    for name in EMR_TABLES:
        table = emr.table(name)
        if not table.exists:
            lines.append(f"{name:<22} {'-':>12}  {'-':>7}  not imported")
            continue
        found += 1
        rows = emr.scan(name).select(pl.len()).collect().item()
        meta = table.commit_metadata()
        origin = str(meta.get(META_SOURCE, "?"))
        if META_IMPORTED_AT in meta:
            origin += f" at {meta[META_IMPORTED_AT]}"
        lines.append(f"{name:<22} {rows:>12,}  {table.version():>7}  {origin}")
    if not found:
        lines.append(f"no EMR under {emr.path}: import one with imgindex emr import")
    return "\n".join(lines)
