"""Cohorts whose entry is a list the researcher already has (docs/cohorts.md).

A list file (CSV or Parquet) names patients (``PatientID``), or studies (``AccessionNumber``
or ``StudyInstanceUID``), with optional ``entry_date``, ``from`` and ``to`` columns. Each row
is an entry event for the series it names; EMR criteria apply to the rows whose patient links
to an EMR person.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import TYPE_CHECKING, Final

import polars as pl
import yaml

from imgindex.cohort.engine import (
    _ENTRY_KEY,
    _apply_criteria,
    _Attrition,
    _complete,
    _demographics,
    _finish,
    _imaging_date,
    _imaging_filters,
    _links,
    _once,
    _wanted,
    _window_filter,
)
from imgindex.errors import CohortError

if TYPE_CHECKING:
    from imgindex.cohort.engine import Selection, _Sources
    from imgindex.cohort.model import Cohort

__all__ = ["IDENTIFIERS", "read_list", "select_list", "write_list_cohort"]

#: Columns a list may identify its rows by, in order of preference.
IDENTIFIERS: Final = ("PatientID", "AccessionNumber", "StudyInstanceUID")
_DATES: Final = ("entry_date", "from", "to")


def read_list(path: str | Path) -> tuple[pl.DataFrame, str]:
    """The rows of a list file, with canonical column names, and its identifier column.

    Raises
    ------
    CohortError
        If the file cannot be read, names no identifier column, or holds a bad date.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".parquet":
            frame = pl.read_parquet(path)
        else:
            frame = pl.read_csv(path, infer_schema=False)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise CohortError(f"{path}: cannot read the list: {exc}") from exc
    canonical = {c.lower(): c for c in (*IDENTIFIERS, *_DATES)}
    frame = frame.rename({c: canonical.get(c.lower().strip(), c) for c in frame.columns})
    ids = [c for c in IDENTIFIERS if c in frame.columns]
    if len(ids) != 1:
        found = ", ".join(frame.columns) or "none"
        raise CohortError(
            f"{path}: a list needs exactly one of the columns {', '.join(IDENTIFIERS)} "
            f"(found: {found})"
        )
    ident = ids[0]
    for name in _DATES:
        if name not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=pl.Date).alias(name))
        elif frame.schema[name] != pl.Date:
            text = pl.col(name).cast(pl.String).str.strip_chars()
            parsed = frame.select(
                text.alias("raw"),
                pl.coalesce(
                    text.str.to_date("%Y-%m-%d", strict=False),
                    text.str.to_date("%Y%m%d", strict=False),
                ).alias("day"),
            ).with_row_index("row")
            bad = parsed.filter(pl.col("day").is_null() & (pl.col("raw").fill_null("") != ""))
            if not bad.is_empty():
                first = bad.row(0, named=True)
                raise CohortError(
                    f"{path}, row {first['row'] + 2}: column {name!r} holds "
                    f"{first['raw']!r}, not a date (YYYY-MM-DD or YYYYMMDD)"
                )
            frame = frame.with_columns(parsed["day"].alias(name))
    frame = frame.with_columns(pl.col(ident).cast(pl.String).str.strip_chars()).filter(
        pl.col(ident).is_not_null() & (pl.col(ident) != "")
    )
    return frame.select(ident, *_DATES).with_row_index("list_row"), ident


def select_list(cohort: Cohort, src: _Sources, started: float) -> Selection:
    """Run a cohort whose entry is a list file."""
    assert cohort.entry.list is not None
    base = cohort.base_dir or Path()
    rows, ident = read_list(base / cohort.entry.list)
    attrition = _Attrition()
    attrition.add("list rows", rows, who=ident)

    scan = src.scan("index.series", "a list cohort")
    columns = set(scan.collect_schema().names())
    wanted_ids = rows[ident].unique().implode()
    if ident in columns:
        by = pl.col(ident).is_in(wanted_ids)
    else:  # AccessionNumber lives in the studies table
        studies = src.scan("index.studies", "a list of AccessionNumbers")
        uids = studies.filter(pl.col(ident).is_in(wanted_ids)).select("StudyInstanceUID")
        by = pl.col("StudyInstanceUID").is_in(uids.collect().to_series().implode())
    named = _complete(
        src,
        scan.filter(by)
        .select(*_wanted(columns), _imaging_date(columns).alias("imaging_date"))
        .collect(),
    )
    study_day = pl.col("imaging_date").min().over("StudyInstanceUID")
    named = named.with_columns(study_day.alias("_study_date"))
    matched = rows.join(named, on=ident)
    if ident == "PatientID":
        day = pl.col("imaging_date")
        in_range = pl.lit(True)
        in_range &= pl.col("from").is_null() | (day >= pl.col("from"))
        in_range &= pl.col("to").is_null() | (day <= pl.col("to"))
        matched = matched.filter(in_range.fill_null(False)).with_columns(
            pl.coalesce("entry_date", "from", "imaging_date").alias("entry_date")
        )
    else:
        matched = matched.with_columns(pl.coalesce("entry_date", "_study_date").alias("entry_date"))
    attrition.add("found in the index", matched.unique("list_row"), who="PatientID")

    links = (
        _links(src)
        .filter(pl.col("PatientID").is_in(matched["PatientID"].unique().implode()))
        .unique()
        .collect()
        if src.has("emr.person") or src.has("emr.crosswalk")
        else pl.DataFrame(schema={"PatientID": pl.String, "person_id": pl.Int64})
    )
    matched = matched.join(links, on="PatientID", how="left")
    needs_emr = bool(
        cohort.inclusion
        or cohort.exclusion
        or cohort.labels
        or (cohort.demographics and (cohort.demographics.age or cohort.demographics.gender))
    )
    if needs_emr:
        matched = matched.filter(pl.col("person_id").is_not_null())
        attrition.add("linked to an EMR person", matched.unique("list_row"), who="PatientID")
        entries = matched.select(_ENTRY_KEY).drop_nulls().unique().sort(_ENTRY_KEY)
        entries = _demographics(src, cohort, entries, attrition)
        entries = _apply_criteria(src, cohort, entries, attrition)
        matched = matched.join(entries, on=_ENTRY_KEY)

    for expr in _imaging_filters(cohort, columns):
        matched = matched.filter(expr)
    days = (pl.col("imaging_date") - pl.col("entry_date")).dt.total_days().cast(pl.Int64)
    series = matched.with_columns(days.alias("days_from_index")).filter(
        _window_filter(pl.col("days_from_index"), cohort.imaging.window)
    )
    attrition.add("with matching imaging", series.unique("list_row"), who="PatientID")
    return _finish(cohort, src, _once(series), attrition, started)


def write_list_cohort(
    list_path: str | Path,
    out: str | Path,
    *,
    name: str | None = None,
    modality: tuple[str, ...] | None = None,
    window: tuple[int | None, int | None] | None = None,
) -> Path:
    """Write a cohort YAML whose entry is ``list_path`` (checked first), for editing.

    The list is referenced relative to the cohort file, so the two travel together.
    """
    list_path = Path(list_path).resolve()
    rows, ident = read_list(list_path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ref = os.path.relpath(list_path, out.parent.resolve())
    imaging: dict[str, object] = {}
    if modality:
        imaging["modality"] = list(modality)
    if window is not None:
        imaging["days"] = list(window)
    data: dict[str, object] = {
        "name": name or list_path.stem,
        "description": (
            f"Series of the {rows.height} {ident} rows listed in {list_path.name} "
            f"(written by imgindex cohort from-list on {dt.date.today()})."
        ),
        "entry": {"list": ref},
    }
    if imaging:
        data["imaging"] = imaging
    out.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out
