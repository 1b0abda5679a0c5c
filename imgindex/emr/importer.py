"""``import_emr``: read OMOP CDM tables from a source and store them under ``ROOT/emr``.

Every table is read and checked before any is written, so a schema error leaves the stored
EMR as it was. Each table is then replaced whole, in one commit, by its canonical form
(:mod:`imgindex.emr.conform`), sorted for the queries cohorts make: event tables by their
date then ``person_id``, with row groups of :data:`imgindex.emr.tables.ROW_GROUP_ROWS` rows, so
that a date window reads only the row groups whose Parquet statistics overlap it.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import polars as pl

from imgindex.emr.conform import Conformed, conform_table
from imgindex.emr.omop import CDM_TABLES, CROSSWALK, TABLE_SPECS, V53_RENAMED, V54_ADDED
from imgindex.emr.sources import CDM_SOURCE, open_source, read_crosswalk_file
from imgindex.emr.tables import ROW_GROUP_ROWS, Emr
from imgindex.errors import EmrError

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable

    import pyarrow as pa

    from imgindex.emr.omop import TableSpec
    from imgindex.emr.sources import Source

__all__ = ["EmrImportSummary", "import_emr"]

logger = logging.getLogger(__name__)

#: Keys of the custom metadata each import commit carries.
META_SOURCE: Final = "imgindex.emr.source"
META_CDM_VERSION: Final = "imgindex.emr.cdm_version"
META_READ_FROM: Final = "imgindex.emr.read_from"
META_IMPORTED_AT: Final = "imgindex.emr.imported_at"


@dataclass(frozen=True)
class EmrImportSummary:
    """What an import did.

    Attributes
    ----------
    source : str
        The source, for people (a path, or a URL without its password, with the schema).
    kind : str
        ``"folder"``, ``"duckdb"`` or ``"postgresql"``.
    root : pathlib.Path
        The catalog root; the tables are under ``root / "emr"``.
    cdm_version : str
        The CDM version: from the source's ``cdm_source.cdm_version`` if it has one, else
        ``"5.4"`` or ``"5.3"`` from the columns, else ``"unknown"``.
    rows : dict of str to int
        Rows imported per table (the crosswalk included when one was given).
    versions : dict of str to int
        The version of each table written.
    skipped : tuple of str
        Tables asked for that the source does not have (none were written).
    warnings : tuple of str
        Things to look at: dropped columns, renamed v5.3 columns, empty required values,
        repeated keys, tables kept from an earlier import.
    seconds : float
        Time the import took.
    read_from : dict of str to str
        Where each table written was read (a file, ``schema.table in DB``).
    """

    source: str
    kind: str
    root: Path
    cdm_version: str
    rows: dict[str, int]
    versions: dict[str, int]
    skipped: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0
    read_from: dict[str, str] = field(default_factory=dict)


def import_emr(
    source: str | os.PathLike[str],
    root: str | os.PathLike[str],
    *,
    schema: str | None = None,
    crosswalk: str | os.PathLike[str] | None = None,
    tables: Iterable[str] | None = None,
    progress: bool = False,
) -> EmrImportSummary:
    """Import OMOP CDM v5.4 or v5.3 tables into ``ROOT/emr``.

    Parameters
    ----------
    source : str or path-like
        A folder of CSV/Parquet files named as OHDSI names the tables (any case), a DuckDB
        database file, or a ``postgresql://USER@HOST:PORT/DB`` URL.
    root : str or path-like
        The catalog root.
    schema : str, optional
        For databases: the schema of the CDM tables (default ``main`` for DuckDB, ``public``
        for PostgreSQL).
    crosswalk : str or path-like, optional
        A CSV or Parquet file with columns ``PatientID`` and ``person_id`` (any case): links
        DICOM patients to persons instead of ``person.person_source_value``.
    tables : iterable of str, optional
        The CDM tables to import (default all of :data:`imgindex.emr.omop.CDM_TABLES`); the
        others under ``ROOT/emr`` stay as they are.
    progress : bool
        Print a line per table to stderr.

    Returns
    -------
    EmrImportSummary
        Rows per table, the CDM version, what was skipped and what to look at.

    Raises
    ------
    EmrError
        If the source cannot be read, has no person table (when ``person`` is asked for), a
        required column is missing, or a value cannot be read as its column's type. Nothing
        is written then.
    """
    began = time.perf_counter()
    selected = _selected(tables)
    emr = Emr(root)
    warnings: list[str] = []
    conformed: dict[str, Conformed] = {}
    read_from: dict[str, str] = {}
    with open_source(source, schema) as src:
        available = src.tables()
        if "person" in selected and "person" not in available:
            found = ", ".join(sorted(available)) or "no CDM table"
            raise EmrError(
                f"person: no person table in {src.description} (found: {found}); the person "
                "table is required"
            )
        skipped = tuple(name for name in selected if name not in available)
        raw_columns: dict[str, list[str]] = {}
        for name in selected:
            if name not in available:
                continue
            started = time.perf_counter()
            raw = src.read(name)
            raw_columns[name] = [c.lower() for c in raw.frame.columns]
            result = conform_table(raw, TABLE_SPECS[name])
            conformed[name] = result
            read_from[name] = raw.where
            warnings.extend(result.notes)
            if result.renamed:
                pairs = ", ".join(f"{old} -> {new}" for old, new in result.renamed.items())
                warnings.append(f"{name}: CDM v5.3 columns renamed: {pairs}")
            if result.added:
                logger.info("%s: columns absent, added as nulls: %s", name, result.added)
            _say(
                progress,
                f"{name}: {result.frame.height:,} rows read from {raw.where} "
                f"({time.perf_counter() - started:.1f} s)",
            )
        version = _cdm_version(src, available, raw_columns, warnings)
        description, kind = src.description, src.kind
    crosswalk_table = None
    if crosswalk is not None:
        crosswalk_table = _read_crosswalk(crosswalk, conformed.get("person"), emr, warnings)
    for name in skipped:
        if emr.has(name):
            warnings.append(
                f"{name}: not in the source; the table of an earlier import (version "
                f"{emr.table(name).version()}) is kept"
            )
    imported_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    rows: dict[str, int] = {}
    versions: dict[str, int] = {}
    to_write = [(name, TABLE_SPECS[name], result.frame) for name, result in conformed.items()]
    if crosswalk_table is not None:
        to_write.append((CROSSWALK.name, CROSSWALK, crosswalk_table))
        read_from[CROSSWALK.name] = str(crosswalk)
    for name, spec, frame in to_write:
        started = time.perf_counter()
        metadata = {
            META_SOURCE: description,
            META_CDM_VERSION: version,
            META_READ_FROM: read_from[name],
            META_IMPORTED_AT: imported_at,
        }
        versions[name] = emr.table(name).overwrite(
            _arrow(frame, spec), metadata=metadata, row_group_rows=ROW_GROUP_ROWS
        )
        rows[name] = frame.height
        _say(
            progress,
            f"{name}: {frame.height:,} rows written, version {versions[name]} "
            f"({time.perf_counter() - started:.1f} s)",
        )
    return EmrImportSummary(
        source=description,
        kind=kind,
        root=Path(root),
        cdm_version=version,
        rows=rows,
        versions=versions,
        skipped=skipped,
        warnings=tuple(warnings),
        seconds=time.perf_counter() - began,
        read_from=read_from,
    )


def _selected(tables: Iterable[str] | None) -> tuple[str, ...]:
    if tables is None:
        return CDM_TABLES
    names = [t.strip().lower() for t in tables if t.strip()]
    unknown = [t for t in names if t not in TABLE_SPECS]
    if unknown:
        raise EmrError(
            f"no CDM table {', '.join(map(repr, unknown))} to import; the tables are "
            + ", ".join(CDM_TABLES)
        )
    if not names:
        raise EmrError("no table to import: name at least one of " + ", ".join(CDM_TABLES))
    return tuple(t for t in CDM_TABLES if t in names)


def _say(progress: bool, line: str) -> None:
    logger.info("%s", line)
    if progress:
        print(line, file=sys.stderr, flush=True)


def _arrow(frame: pl.DataFrame, spec: TableSpec) -> pa.Table:
    """The rows in the stored order, with the canonical Arrow schema."""
    # The key breaks ties, so that the same rows are always stored in the same order.
    by = list(dict.fromkeys([*spec.sort_by, *spec.key]))
    ordered = frame.sort(by, nulls_last=True)
    return ordered.to_arrow(compat_level=pl.CompatLevel.oldest()).cast(spec.arrow_schema)


def _cdm_version(
    src: Source, available: dict[str, str], columns: dict[str, list[str]], warnings: list[str]
) -> str:
    """The version ``cdm_source`` names, else the one the columns show, else "unknown"."""
    if CDM_SOURCE in available:
        try:
            frame = src.read(CDM_SOURCE).frame
        except EmrError as exc:
            warnings.append(f"{CDM_SOURCE}: not read ({exc}); the CDM version comes from columns")
        else:
            lowered = {c.lower(): c for c in frame.columns}
            if "cdm_version" in lowered:
                values = frame.get_column(lowered["cdm_version"]).cast(pl.String).drop_nulls()
                if len(values):
                    return str(values[0]).strip().lstrip("vV")
    old = [
        f"{table}.{name}"
        for table, renamed in V53_RENAMED.items()
        for name in renamed
        if name in columns.get(table, ())
    ]
    new = [
        f"{table}.{name}"
        for table, added in V54_ADDED.items()
        for name in (*added, *V53_RENAMED.get(table, {}).values())
        if name in columns.get(table, ())
    ] + [
        f"{table}.{name}"
        for table, renamed in V53_RENAMED.items()
        for name in renamed.values()
        if name in columns.get(table, ())
    ]
    if old and new:
        warnings.append(
            f"columns of CDM v5.3 ({', '.join(old)}) and v5.4 ({', '.join(sorted(set(new)))}) "
            "in one source"
        )
        return "5.4"
    if new:
        return "5.4"
    if old:
        return "5.3"
    return "unknown"


def _read_crosswalk(
    path: str | os.PathLike[str],
    person: Conformed | None,
    emr: Emr,
    warnings: list[str],
) -> pl.DataFrame:
    """The crosswalk, checked, without repeated rows and blanks around PatientIDs."""
    result = conform_table(read_crosswalk_file(path), CROSSWALK)
    warnings.extend(n for n in result.notes if "repeat" not in n)
    frame = result.frame.with_columns(pl.col("PatientID").str.strip_chars()).unique(
        maintain_order=True
    )
    if frame.height:
        first = frame.filter(pl.col("PatientID") == "")
        if first.height:
            raise EmrError(f"crosswalk.PatientID: empty in {first.height:,} rows of {path}")
    several = frame.group_by("PatientID").agg(pl.len()).filter(pl.col("len") > 1)
    if several.height:
        example = several.get_column("PatientID").sort()[0]
        warnings.append(
            f"crosswalk: {several.height:,} PatientIDs map to several persons (e.g. {example!r})"
        )
    if person is not None:
        persons = person.frame.select("person_id")
    elif emr.has("person"):
        persons = emr.scan("person").select("person_id").collect()
    else:
        return frame
    dangling = frame.join(persons, on="person_id", how="anti")
    if dangling.height:
        warnings.append(
            f"crosswalk: {dangling.height:,} rows name a person_id not in the person table "
            f"(e.g. {dangling.get_column('person_id')[0]})"
        )
    return frame
