"""Run a cohort: polars lazy plans over the EMR and index tables, pruned by date.

The plan, in the order of docs/cohorts.md:

1. Entry events, from the entry domain's rows whose concept or source code is in the code
   set (small: a few thousand rows even for millions of persons).
2. Demographics, by joining ``person``.
3. Every inclusion, exclusion and label criterion is one lazy query of its domain's events
   for the entry persons inside the window's date bounds, counted per entry event; all of
   them are collected together (:func:`polars.collect_all`), then applied in order, which
   gives the attrition counts.
4. Imaging: the index ``series`` of the kept persons' PatientIDs, filtered on attributes
   and on ``imaging_date`` bounds, joined back to the entry events.

Every scan filters on literal date bounds derived from the entry events (earliest entry +
window start .. latest entry + window end), so that the Parquet readers skip the row groups
of other dates: the EMR import writes event tables sorted by date, and
``imgindex optimize`` lays the index out the same way.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable

from imgindex.cohort.model import DOMAINS, CodeSet, Cohort, Criterion
from imgindex.errors import CohortError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = ["Selection", "read_selection", "select"]

logger = logging.getLogger(__name__)

#: Columns of the index ``series`` table a selection carries.
SERIES_COLUMNS: Final = (
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "AccessionNumber",
    "Modality",
    "BodyPartExamined",
    "SeriesDescription",
    "instance_count",
    "imaging_date",
)
_META_COHORT: Final = b"imgindex.cohort"
_META_SHA: Final = b"imgindex.cohort_sha256"
_META_VERSIONS: Final = b"imgindex.versions"
_META_CREATED: Final = b"imgindex.created_at"
_ENTRY_KEY: Final = ["person_id", "entry_date"]


@dataclass
class Selection:
    """What :func:`select` found.

    Attributes
    ----------
    table : pyarrow.Table
        One row per selected series (columns in docs/cohorts.md).
    attrition : pyarrow.Table
        ``step``, ``persons``, ``entry_events``: what each step kept.
    cohort : Cohort
        The cohort run (resolved).
    sha256 : str
        The cohort's hash (``cohort_sha256`` column).
    versions : dict
        Version of every table read (``index.series``, ``emr.person``, ...).
    seconds : float
        Time taken.
    """

    table: pa.Table
    attrition: pa.Table
    cohort: Cohort
    sha256: str
    versions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def write(self, path: str | Path) -> Path:
        """Write the selection as Parquet, with the cohort and table versions as metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(self.table.schema.metadata or {})
        meta.update(
            {
                _META_COHORT: json.dumps(self.cohort.canonical(), sort_keys=True).encode(),
                _META_SHA: self.sha256.encode(),
                _META_VERSIONS: json.dumps(self.versions, sort_keys=True).encode(),
                _META_CREATED: dt.datetime.now(dt.UTC).isoformat(timespec="seconds").encode(),
            }
        )
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(self.table.replace_schema_metadata(meta), tmp)
        tmp.replace(path)
        return path


def read_selection(path: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    """A selection file's rows and what made it (``cohort``, ``sha256``, ``versions``)."""
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    if _META_VERSIONS not in meta:
        raise CohortError(f"{path}: not a selection written by imgindex select (no versions)")
    info = {
        "cohort": json.loads(meta[_META_COHORT]),
        "sha256": meta[_META_SHA].decode(),
        "versions": json.loads(meta[_META_VERSIONS]),
        "created_at": meta.get(_META_CREATED, b"").decode(),
    }
    return table, info


class _Sources:
    """Index and EMR tables at fixed versions (the current ones, or pinned ``as_of``)."""

    def __init__(self, root: Path, pinned: Mapping[str, int] | None) -> None:
        self.root = root
        self.pinned = dict(pinned or {})
        self.used: dict[str, int] = {}
        self._concepts: dict[tuple[tuple[int, ...], bool], list[int]] = {}

    def _path(self, key: str) -> Path:
        kind, name = key.split(".", 1)
        return self.root / ("tables" if kind == "index" else "emr") / name

    def has(self, key: str) -> bool:
        return DeltaTable.is_deltatable(str(self._path(key)))

    def scan(self, key: str, why: str) -> pl.LazyFrame:
        path = self._path(key)
        if not DeltaTable.is_deltatable(str(path)):
            hint = (
                "import the OMOP tables with `imgindex emr import`"
                if key.startswith("emr.")
                else "index some DICOM first"
            )
            raise CohortError(f"{why} needs the table {path}, which does not exist: {hint}")
        version = self.used.get(key, self.pinned.get(key))
        if version is None:
            version = DeltaTable(str(path)).version()
        self.used[key] = version
        return pl.scan_delta(str(path), version=version)

    def concept_ids(self, ids: Sequence[int], descendants: bool) -> list[int]:
        key = (tuple(sorted(set(ids))), descendants)
        if key not in self._concepts:
            found = set(key[0])
            if descendants and key[0]:
                below = (
                    self.scan("emr.concept_ancestor", "a code set with `descendants: true`")
                    .filter(pl.col("ancestor_concept_id").is_in(key[0]))
                    .select(pl.col("descendant_concept_id").cast(pl.Int64))
                    .collect()
                )
                found.update(below.to_series().to_list())
            self._concepts[key] = sorted(found)
        return self._concepts[key]


def _codeset_filter(src: _Sources, codeset: CodeSet, domain: str) -> pl.Expr:
    spec = DOMAINS[domain]
    parts: list[pl.Expr] = []
    if codeset.concepts:
        ids = set(src.concept_ids(codeset.concepts, codeset.descendants))
        if codeset.exclude:
            ids -= set(src.concept_ids(codeset.exclude, codeset.descendants))
        parts.append(pl.col(spec.concept).is_in(sorted(ids)))
    if codeset.source_codes:
        code = pl.col(spec.source).str.replace_all(".", "", literal=True).str.to_uppercase()
        exact = [c.replace(".", "").upper() for c in codeset.source_codes if not c.endswith("*")]
        prefixes = [
            c[:-1].replace(".", "").upper() for c in codeset.source_codes if c.endswith("*")
        ]
        if exact:
            parts.append(code.is_in(exact))
        parts.extend(code.str.starts_with(p) for p in prefixes)
    expr = parts[0]
    for part in parts[1:]:
        expr = expr | part
    return expr.fill_null(False)


def _events(
    src: _Sources,
    cohort: Cohort,
    domain: str,
    codeset: str | CodeSet,
    *,
    lo: dt.date | None = None,
    hi: dt.date | None = None,
    persons: pl.Series | None = None,
    value: Any = None,
    why: str,
) -> pl.LazyFrame:
    """``person_id``, ``event_date`` of the domain's rows in the code set, within dates."""
    spec = DOMAINS[domain]
    filters: list[pl.Expr] = []
    # Date bounds first: plain comparisons on a column the Parquet statistics cover.
    if lo is not None:
        filters.append(pl.col(spec.date) >= lo)
    if hi is not None:
        filters.append(pl.col(spec.date) <= hi)
    filters.append(_codeset_filter(src, cohort.codeset(codeset), domain))
    if persons is not None:
        filters.append(pl.col("person_id").is_in(persons.implode()))
    if value is not None:
        if value.min is not None:
            filters.append(pl.col("value_as_number") >= value.min)
        if value.max is not None:
            filters.append(pl.col("value_as_number") <= value.max)
    return (
        src.scan(f"emr.{spec.table}", why)
        .filter(*filters)
        .select(
            pl.col("person_id").cast(pl.Int64),
            pl.col(spec.date).cast(pl.Date).alias("event_date"),
        )
        .filter(pl.col("event_date").is_not_null())
    )


def _entries(src: _Sources, cohort: Cohort) -> pl.DataFrame:
    entry = cohort.entry
    assert entry.domain is not None
    assert entry.codeset is not None
    lo = entry.dates.from_ if entry.dates else None
    hi = entry.dates.to if entry.dates else None
    why = "the entry event"
    in_range = pl.lit(True)
    if lo is not None:
        in_range &= pl.col("entry_date") >= lo
    if hi is not None:
        in_range &= pl.col("entry_date") <= hi
    if entry.occurrence == "first" and lo is not None:
        # The first event ever, inside the range: an event in the range (a date-pruned scan)
        # and none before it. The second scan reads only the candidates' rows before the
        # code set's string matching runs, which on the whole table costs most of the query.
        events = _events(src, cohort, entry.domain, entry.codeset, lo=lo, hi=hi, why=why)
        candidates = (
            events.group_by("person_id")
            .agg(pl.col("event_date").min().alias("entry_date"))
            .collect()
        )
        spec = DOMAINS[entry.domain]
        earlier = (
            src.scan(f"emr.{spec.table}", why)
            .filter(
                pl.col(spec.date) < lo,
                pl.col("person_id").is_in(candidates["person_id"].implode()),
            )
            .select("person_id", spec.concept, spec.source)
            .collect()
            .filter(_codeset_filter(src, cohort.codeset(entry.codeset), entry.domain))
        )
        plan = candidates.lazy().join(
            earlier.lazy().select(pl.col("person_id").cast(pl.Int64)), on="person_id", how="anti"
        )
    elif entry.occurrence == "first":
        events = _events(src, cohort, entry.domain, entry.codeset, hi=hi, why=why)
        plan = (
            events.group_by("person_id")
            .agg(pl.col("event_date").min().alias("entry_date"))
            .filter(in_range)
        )
    else:
        events = _events(src, cohort, entry.domain, entry.codeset, lo=lo, hi=hi, why=why)
        plan = events.rename({"event_date": "entry_date"})
        if entry.occurrence == "first_in_range":
            plan = plan.group_by("person_id").agg(pl.col("entry_date").min())
        else:
            plan = plan.unique()
    return plan.collect().sort(_ENTRY_KEY)


def _shift(day: dt.date | None, days: int | None) -> dt.date | None:
    if day is None or days is None:
        return None
    return day + dt.timedelta(days=days)


def _window_filter(day: pl.Expr, window: tuple[int | None, int | None] | None) -> pl.Expr:
    if window is None:
        return pl.lit(True)
    first, last = window
    expr = day.is_not_null()
    if first is not None:
        expr &= day >= first
    if last is not None:
        expr &= day <= last
    return expr


def _bounds(
    entries: pl.DataFrame, window: tuple[int | None, int | None] | None
) -> tuple[dt.date | None, dt.date | None]:
    """The calendar dates any event in ``window`` of any entry event can fall on."""
    if window is None or entries.is_empty():
        return None, None
    earliest = entries["entry_date"].min()
    latest = entries["entry_date"].max()
    assert isinstance(earliest, dt.date)
    assert isinstance(latest, dt.date)
    return _shift(earliest, window[0]), _shift(latest, window[1])


def _criterion_counts(
    src: _Sources, cohort: Cohort, crit: Criterion, entries: pl.DataFrame
) -> pl.LazyFrame:
    """Per entry event: ``count`` of the criterion's events in its window and ``first`` day."""
    window = crit.window
    lo, hi = _bounds(entries, window)
    events = _events(
        src,
        cohort,
        crit.domain,
        crit.codeset,
        lo=lo,
        hi=hi,
        persons=entries["person_id"].unique(),
        value=crit.value,
        why=f"criterion {crit.name!r}",
    )
    day = (pl.col("event_date") - pl.col("entry_date")).dt.total_days()
    return (
        entries.lazy()
        .join(events, on="person_id")
        .with_columns(day.alias("day"))
        .filter(_window_filter(pl.col("day"), window))
        .group_by(_ENTRY_KEY)
        .agg(
            pl.len().cast(pl.Int64).alias(f"{crit.name}_count"),
            pl.col("day").min().cast(pl.Int64).alias(f"{crit.name}_days"),
        )
    )


def _holds(crit: Criterion) -> pl.Expr:
    count = pl.col(f"{crit.name}_count")
    expr = count >= crit.fewest
    if crit.at_most is not None:
        expr &= count <= crit.at_most
    return expr


def _links(src: _Sources) -> pl.LazyFrame:
    """``PatientID`` → ``person_id``: the crosswalk if imported, else person_source_value."""
    if src.has("emr.crosswalk"):
        frame = src.scan("emr.crosswalk", "linking persons to PatientIDs")
    else:
        frame = src.scan("emr.person", "linking persons to PatientIDs").select(
            pl.col("person_source_value").alias("PatientID"), "person_id"
        )
    return frame.select(
        pl.col("PatientID").cast(pl.String), pl.col("person_id").cast(pl.Int64)
    ).filter(pl.col("PatientID").is_not_null())


def _glob_regex(pattern: str) -> str:
    out = ["(?is)^"]
    for ch in pattern:
        out.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch))
    out.append("$")
    return "".join(out)


def _imaging_filters(cohort: Cohort, columns: set[str]) -> list[pl.Expr]:
    imaging = cohort.imaging
    filters: list[pl.Expr] = []
    if imaging.modality is not None:
        filters.append(pl.col("Modality").is_in(list(imaging.modality)))
    if imaging.body_part is not None:
        wanted = [b.upper() for b in imaging.body_part]
        filters.append(pl.col("BodyPartExamined").str.to_uppercase().is_in(wanted))
    if imaging.series_description is not None:
        desc = pl.col("SeriesDescription")
        positive = [p for p in imaging.series_description if not p.startswith("!")]
        negative = [p[1:] for p in imaging.series_description if p.startswith("!")]
        expr = pl.lit(False)
        for p in positive:
            expr |= desc.str.contains(_glob_regex(p))
        for p in negative:
            expr &= ~desc.str.contains(_glob_regex(p))
        filters.append(expr.fill_null(False))
    if imaging.min_instances is not None:
        filters.append(pl.col("instance_count") >= imaging.min_instances)
    return filters


def _imaging_date(columns: set[str]) -> pl.Expr:
    if "imaging_date" in columns:
        return pl.col("imaging_date").cast(pl.Date)
    # An index written before `imaging_date` existed: its series-level fallbacks.
    parts = [pl.col(c).cast(pl.Date) for c in ("StudyDate", "SeriesDate") if c in columns]
    return pl.coalesce(parts) if parts else pl.lit(None, dtype=pl.Date)


def _series(
    src: _Sources, cohort: Cohort, entries: pl.DataFrame, links: pl.DataFrame
) -> pl.DataFrame:
    """The series of ``entries``' persons that pass the imaging criteria, per entry event."""
    window = cohort.imaging.window
    scan = src.scan("index.series", "the imaging criteria")
    columns = set(scan.collect_schema().names())
    image_day = _imaging_date(columns)
    lo, hi = _bounds(entries, window)
    filters = []
    if lo is not None:
        filters.append(image_day >= lo)
    if hi is not None:
        filters.append(image_day <= hi)
    filters.append(pl.col("PatientID").is_in(links["PatientID"].unique().implode()))
    filters.extend(_imaging_filters(cohort, columns))
    series = _complete(
        src,
        scan.filter(*filters).select(*_wanted(columns), image_day.alias("imaging_date")).collect(),
    )
    day = (pl.col("imaging_date") - pl.col("entry_date")).dt.total_days()
    return (
        series.join(links, on="PatientID")
        .join(entries, on="person_id")
        .with_columns(day.cast(pl.Int64).alias("days_from_index"))
        .filter(_window_filter(pl.col("days_from_index"), window))
    )


def _once(candidates: pl.DataFrame) -> pl.DataFrame:
    """Each series once: for the earliest of its person's entry events that takes it."""
    return candidates.sort(
        ["SeriesInstanceUID", "entry_date", "person_id"], nulls_last=True
    ).unique("SeriesInstanceUID", keep="first", maintain_order=True)


def _wanted(columns: set[str]) -> list[str]:
    return [c for c in SERIES_COLUMNS if c in columns and c != "imaging_date"]


def _complete(src: _Sources, series: pl.DataFrame) -> pl.DataFrame:
    """``series`` with every column of :data:`SERIES_COLUMNS`.

    ``AccessionNumber`` is a study attribute: it comes from the ``studies`` table when the
    ``series`` table does not carry it.
    """
    if "AccessionNumber" not in series.columns and src.has("index.studies"):
        studies = src.scan("index.studies", "the selection's AccessionNumber")
        if "AccessionNumber" in studies.collect_schema().names():
            accessions = (
                studies.filter(
                    pl.col("StudyInstanceUID").is_in(series["StudyInstanceUID"].unique().implode())
                )
                .select("StudyInstanceUID", pl.col("AccessionNumber").cast(pl.String))
                .collect()
            )
            series = series.join(accessions, on="StudyInstanceUID", how="left")
    for name in SERIES_COLUMNS:
        if name not in series.columns:
            dtype = pl.Int64 if name == "instance_count" else pl.String
            series = series.with_columns(pl.lit(None, dtype=dtype).alias(name))
    return series


class _Attrition:
    def __init__(self) -> None:
        self.rows: list[tuple[str, int, int]] = []

    def add(self, step: str, entries: pl.DataFrame, who: str = "person_id") -> None:
        """Record that ``step`` kept ``entries`` (persons counted by the ``who`` column)."""
        self.rows.append((step, entries[who].drop_nulls().n_unique(), entries.height))

    def table(self) -> pa.Table:
        return pa.table(
            {
                "step": pa.array([r[0] for r in self.rows], pa.string()),
                "persons": pa.array([r[1] for r in self.rows], pa.int64()),
                "entry_events": pa.array([r[2] for r in self.rows], pa.int64()),
            }
        )


def select(
    cohort: Cohort,
    root: str | Path,
    *,
    versions: Mapping[str, int] | None = None,
) -> Selection:
    """Run ``cohort`` over the index and EMR tables under ``root``.

    Parameters
    ----------
    cohort : Cohort
        What to select (see docs/cohorts.md).
    root : str or Path
        The catalog root (index tables under ``tables/``, EMR tables under ``emr/``).
    versions : mapping, optional
        Table versions to read (``{"index.series": 12, "emr.person": 3, ...}``), e.g. those of
        an earlier selection (:func:`read_selection`); tables not named are read at their
        current version.

    Returns
    -------
    Selection

    Raises
    ------
    CohortError
        If a table the cohort needs does not exist, or a code set is unresolvable.
    """
    started = time.perf_counter()
    cohort = cohort.resolved()
    src = _Sources(Path(root), versions)
    attrition = _Attrition()
    if cohort.entry.list is not None:
        from imgindex.cohort.listing import select_list

        return select_list(cohort, src, started)
    entries = _entries(src, cohort)
    attrition.add("entry event", entries)
    entries = _demographics(src, cohort, entries, attrition)

    entries = _apply_criteria(src, cohort, entries, attrition)

    links = (
        _links(src)
        .filter(pl.col("person_id").is_in(entries["person_id"].unique().implode()))
        .unique()
        .collect()
    )
    attrition.add("linked to a PatientID", entries.join(links, on="person_id", how="semi"))
    candidates = _series(src, cohort, entries, links)
    attrition.add(
        "with matching imaging",
        entries.join(candidates.select(_ENTRY_KEY), on=_ENTRY_KEY, how="semi"),
    )
    return _finish(cohort, src, _once(candidates), attrition, started)


def _finish(
    cohort: Cohort, src: _Sources, series: pl.DataFrame, attrition: _Attrition, started: float
) -> Selection:
    """The selection table from the selected series rows (one per series)."""
    sha = cohort.sha256(_list_bytes(cohort))
    labels = [
        f"{c.name}_{s}" for c in (*cohort.inclusion, *cohort.labels) for s in ("count", "days")
    ]
    table = (
        series.select(
            pl.col("person_id").cast(pl.Int64),
            *SERIES_COLUMNS,
            "entry_date",
            "days_from_index",
            *labels,
            pl.lit(cohort.name).alias("cohort"),
            pl.lit(sha).alias("cohort_sha256"),
        )
        .sort(
            ["person_id", "PatientID", "entry_date", "imaging_date", "SeriesInstanceUID"],
            nulls_last=True,
        )
        .to_arrow()
    )
    return Selection(
        table=table,
        attrition=attrition.table(),
        cohort=cohort,
        sha256=sha,
        versions=dict(sorted(src.used.items())),
        seconds=time.perf_counter() - started,
    )


def _apply_criteria(
    src: _Sources, cohort: Cohort, entries: pl.DataFrame, attrition: _Attrition
) -> pl.DataFrame:
    """Entry events that pass inclusion and exclusion, with the label count/days columns."""
    criteria = [*cohort.inclusion, *cohort.exclusion, *cohort.labels]
    counts = pl.collect_all([_criterion_counts(src, cohort, c, entries) for c in criteria])
    for crit, frame in zip(criteria, counts, strict=True):
        entries = entries.join(frame, on=_ENTRY_KEY, how="left").with_columns(
            pl.col(f"{crit.name}_count").fill_null(0)
        )
    for crit in cohort.inclusion:
        entries = entries.filter(_holds(crit))
        attrition.add(f"inclusion: {crit.name}", entries)
    for crit in cohort.exclusion:
        entries = entries.filter(~_holds(crit))
        attrition.add(f"exclusion: {crit.name}", entries)
    return entries.drop([f"{c.name}_{s}" for c in cohort.exclusion for s in ("count", "days")])


def _demographics(
    src: _Sources, cohort: Cohort, entries: pl.DataFrame, attrition: _Attrition
) -> pl.DataFrame:
    demo = cohort.demographics
    if demo is None or (demo.age is None and demo.gender is None):
        return entries
    person = (
        src.scan("emr.person", "the demographic criteria")
        .filter(pl.col("person_id").is_in(entries["person_id"].unique().implode()))
        .select(
            pl.col("person_id").cast(pl.Int64),
            pl.col("year_of_birth").cast(pl.Int64),
            pl.col("gender_concept_id").cast(pl.Int64),
        )
        .collect()
    )
    joined = entries.join(person, on="person_id", how="left")
    keep = pl.lit(True)
    if demo.age is not None:
        age = pl.col("entry_date").dt.year().cast(pl.Int64) - pl.col("year_of_birth")
        if demo.age.min is not None:
            keep &= age >= demo.age.min
        if demo.age.max is not None:
            keep &= age <= demo.age.max
    concepts = demo.gender_concepts
    if concepts is not None:
        keep &= pl.col("gender_concept_id").is_in(list(concepts))
    kept = joined.filter(keep.fill_null(False)).select(entries.columns)
    attrition.add("demographics", kept)
    return kept


def _list_bytes(cohort: Cohort) -> bytes:
    """The list file's bytes, for the hash of a list cohort (empty otherwise)."""
    if cohort.entry.list is None:
        return b""
    base = cohort.base_dir or Path()
    path = base / cohort.entry.list
    try:
        return path.read_bytes()
    except OSError:
        return b""
