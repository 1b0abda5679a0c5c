"""The EMR half of ``imgindex export --with-emr``: the selected persons' OMOP rows as Parquet.

:func:`persons_for` finds the persons of an export (by ``person_id``, or linked to the exported
PatientIDs through :meth:`imgindex.emr.tables.Emr.links`); :func:`export_emr` writes their rows
of ``person``, ``visit_occurrence``, ``condition_occurrence``, ``procedure_occurrence``,
``drug_exposure``, ``measurement`` and ``observation`` (those imported) to
``OUT/<table>.parquet``, with the same pseudonyms and per-patient date shifts as the images, so
that images and EMR rows join on the pseudonyms and keep their intervals.

A person without a PatientID link is not written: the date shift is keyed by the PatientID
(:meth:`imgindex.deid.keys.Deidentifier.shift_days`), and without one the person's dates
could not be shifted as the images are. :attr:`EmrExport.unlinked_person_ids` lists them.

Column rules with de-identification on (an allow-list: a column no rule names is dropped):

=====================================  ===========================================================
Column                                 Written as
=====================================  ===========================================================
``person_id``                          ``token("person_id", person_id)`` (string), as the
                                       export manifest writes it
``PatientID`` (person table, added)    ``token("PatientID", PatientID)``, the manifest's
                                       PatientID token: images join to the person on it
``visit_occurrence_id``,               ``token("visit_occurrence_id", value)``: a preceding
``preceding_visit_occurrence_id``      visit's token joins to that visit's row
``condition_occurrence_id``,           ``token(<column name>, value)``: one kind per column
``procedure_occurrence_id``,           name in every table, so ``visit_detail_id`` (and
``drug_exposure_id``,                  ``visit_occurrence_id``) join across tables
``measurement_id``, ``observation_id``,
``visit_detail_id``
``measurement_event_id``,              ``token(<column name>, value)``: the row they point at
``observation_event_id``               is in the table ``*_event_field_concept_id`` names, so
                                       these tokens do not join to that row's token
``provider_id``, ``care_site_id``,     dropped (PS3.15 removes institution and physician
``location_id``                        identity)
``*_date``, ``*_datetime``             moved by the person's ``shift_days(PatientID)`` days
(``verbatim_end_date`` too)            (datetimes keep their time of day): intervals between
                                       one person's events are kept exactly
``birth_datetime``                     moved by the person's shift
``year_of_birth``, ``month_of_birth``, from the shifted birth date: ``birth_datetime``'s date
``day_of_birth``                       when present, else year/month/day (a missing or
                                       invalid month or day taken as 1; a day past the month's
                                       end as its last day), moved by the person's shift
``*_source_value`` (also               dropped: free text and local codes
``person_source_value``),
``stop_reason``, ``sig``,
``lot_number``, ``value_as_string``
``measurement_time``                   kept when it is a time of day (``H:MM``, ``HH:MM`` or
                                       ``HH:MM:SS``), else null
``*_concept_id`` (also                 kept: OMOP vocabulary concepts identify no one
``*_source_concept_id``)
``value_as_number``, ``quantity``,     kept
``range_low``, ``range_high``,
``refills``, ``days_supply``
anything else                          dropped
=====================================  ===========================================================

Rows are written ordered by the (pseudonymized) ``person_id``, then the table's date, then the
row's id, so that the order of rows says nothing about the original dates across persons or
the original ids.

With de-identification off (``deid=None``, for testing the checker) the selected persons'
rows are written as they are stored, with the person table's PatientID column raw.

Every file is written to ``OUT/.<table>.parquet.partial`` and renamed into place, and carries
Parquet key-value metadata ``imgindex.deid`` (``"on"`` or ``"off"``) and
``imgindex.emr.table`` (the table's name).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import polars as pl

from imgindex.emr.omop import TABLE_SPECS

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from imgindex.deid.keys import Deidentifier
    from imgindex.emr.tables import Emr

__all__ = [
    "EMR_EXPORT_TABLES",
    "META_DEID",
    "META_TABLE",
    "EmrExport",
    "Rule",
    "column_rule",
    "export_emr",
    "persons_for",
]

#: The tables an export writes (those imported), in this order.
EMR_EXPORT_TABLES: Final = (
    "person",
    "visit_occurrence",
    "condition_occurrence",
    "procedure_occurrence",
    "drug_exposure",
    "measurement",
    "observation",
)
#: Parquet key-value metadata: whether the file is de-identified (``"on"``/``"off"``).
META_DEID: Final = "imgindex.deid"
#: Parquet key-value metadata: the CDM table the file holds.
META_TABLE: Final = "imgindex.emr.table"

#: What de-identification does to a column (see the module's table).
Rule = Literal["person", "token", "shift", "birth", "time", "keep", "drop"]

#: Row ids replaced by tokens, and the kind each is tokenized as (so references join).
_TOKEN_KINDS: Final[Mapping[str, str]] = {
    "visit_occurrence_id": "visit_occurrence_id",
    "preceding_visit_occurrence_id": "visit_occurrence_id",
    "condition_occurrence_id": "condition_occurrence_id",
    "procedure_occurrence_id": "procedure_occurrence_id",
    "drug_exposure_id": "drug_exposure_id",
    "measurement_id": "measurement_id",
    "observation_id": "observation_id",
    "visit_detail_id": "visit_detail_id",
    "measurement_event_id": "measurement_event_id",
    "observation_event_id": "observation_event_id",
}
_BIRTH_PARTS: Final = ("year_of_birth", "month_of_birth", "day_of_birth")
_NUMBERS: Final = frozenset(
    {"value_as_number", "quantity", "range_low", "range_high", "refills", "days_supply"}
)
_DROPPED: Final = frozenset(
    {
        "provider_id",
        "care_site_id",
        "location_id",
        "stop_reason",
        "sig",
        "lot_number",
        "value_as_string",
        "person_source_value",
    }
)
_TIME_OF_DAY: Final = r"^(?:[01]?\d|2[0-3]):[0-5]\d(?::[0-5]\d)?$"
_PATIENT_ID: Final = "PatientID"
# Helper columns joined to the rows (names no CDM column has).
_SHIFT: Final = "__imgindex_shift_days"
_PID: Final = "__imgindex_patient_id"


def column_rule(column: str) -> Rule:
    """What de-identification does to ``column`` of an exported CDM table."""
    if column == "person_id":
        return "person"
    if column in _TOKEN_KINDS:
        return "token"
    if column in _DROPPED or column.endswith("_source_value"):
        return "drop"
    if column.endswith(("_date", "_datetime")):
        return "shift"
    if column in _BIRTH_PARTS:
        return "birth"
    if column == "measurement_time":
        return "time"
    if column.endswith("_concept_id") or column in _NUMBERS:
        return "keep"
    return "drop"


@dataclass
class EmrExport:
    """What :func:`export_emr` wrote.

    Attributes
    ----------
    tables : dict of str to int
        Rows written per table (tables not imported are absent).
    persons : int
        Persons whose rows were written (those with a PatientID link).
    unlinked_person_ids : list of int
        Persons asked for without a PatientID link: their rows are not written (there is no
        PatientID to key their date shift by).
    """

    tables: dict[str, int] = field(default_factory=dict)
    persons: int = 0
    unlinked_person_ids: list[int] = field(default_factory=list)


def persons_for(
    emr: Emr, *, patient_ids: Iterable[str] = (), person_ids: Iterable[int] = ()
) -> dict[int, str]:
    """``person_id -> PatientID`` for the persons of an export.

    Those given by ``person_ids``, plus those linked to the given ``patient_ids`` (through
    :meth:`Emr.links`: the crosswalk, else ``person.person_source_value`` without surrounding
    blanks). A person with no PatientID link is left out (pass the same ``person_ids`` to
    :func:`export_emr` to have it reported).

    A person linked to several PatientIDs keeps one: the smallest of those given in
    ``patient_ids``, else the smallest of all. Its rows are shifted by that PatientID's offset
    (images of its other PatientIDs are shifted by theirs).

    Raises
    ------
    EmrError
        If neither a crosswalk nor the person table has been imported.
    """
    wanted_patients = sorted({str(p).strip() for p in patient_ids} - {""})
    wanted_persons = sorted({int(p) for p in person_ids})
    if not wanted_patients and not wanted_persons:
        return {}
    links = emr.links()
    rows = (
        links.filter(
            pl.col("PatientID").is_in(wanted_patients) | pl.col("person_id").is_in(wanted_persons)
        )
        .select(
            pl.col("person_id").cast(pl.Int64),
            pl.col("PatientID").str.strip_chars(),
        )
        .unique()
        .collect()
    )
    # A person reached by a given PatientID keeps that one; of several, the smallest.
    given = set(wanted_patients)
    chosen: dict[int, tuple[bool, str]] = {}
    for person_id, patient_id in rows.iter_rows():
        if person_id is None or not patient_id:
            continue
        rank = (patient_id not in given, patient_id)
        if person_id not in chosen or rank < chosen[person_id]:
            chosen[person_id] = rank
    return {person: chosen[person][1] for person in sorted(chosen)}


def export_emr(
    emr: Emr,
    persons: Mapping[int, str],
    out: str | os.PathLike[str],
    deid: Deidentifier | None,
    *,
    person_ids: Iterable[int] = (),
) -> EmrExport:
    """Write ``persons``' rows of every imported export table to ``out/<table>.parquet``.

    Parameters
    ----------
    emr : Emr
        The imported EMR.
    persons : mapping of int to str
        ``person_id -> PatientID`` (from :func:`persons_for`): whose rows to write, and the
        PatientID keying each person's date shift.
    out : str or path-like
        The folder (made if missing); each table's file is replaced whole.
    deid : Deidentifier or None
        The key: pseudonyms and date shifts as the module describes. None writes the rows as
        they are (de-identification off).
    person_ids : iterable of int
        The person_ids the export asked for; those not in ``persons`` are reported in
        :attr:`EmrExport.unlinked_person_ids` (and not written).

    Returns
    -------
    EmrExport
        Rows written per table, persons written, persons left out.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    linked = {int(p): str(pid).strip() for p, pid in persons.items()}
    summary = EmrExport(
        persons=len(linked),
        unlinked_person_ids=sorted({int(p) for p in person_ids} - linked.keys()),
    )
    ids = sorted(linked)
    people = pl.DataFrame(
        {
            "person_id": ids,
            _PID: [linked[p] for p in ids],
            _SHIFT: [deid.shift_days(linked[p]) if deid is not None else 0 for p in ids],
        },
        schema={"person_id": pl.Int64, _PID: pl.String, _SHIFT: pl.Int64},
    )
    for name in EMR_EXPORT_TABLES:
        if not emr.has(name):
            continue
        rows = (
            emr.scan(name)
            .filter(pl.col("person_id").is_in(ids))
            .join(people.lazy(), on="person_id", how="inner")
        )
        frame = _deidentified(name, rows, deid) if deid is not None else _raw(name, rows)
        _write(folder, name, frame, deid is not None)
        summary.tables[name] = frame.height
    return summary


def _raw(name: str, rows: pl.LazyFrame) -> pl.DataFrame:
    """The rows as stored (the person table with its PatientID), in a stable order."""
    spec = TABLE_SPECS[name]
    columns = [pl.col(c) for c in spec.names]
    if name == "person":
        columns.insert(1, pl.col(_PID).alias(_PATIENT_ID))
    order = list(dict.fromkeys(["person_id", *spec.sort_by, *spec.key]))
    return rows.sort(order, nulls_last=True).select(columns).collect()


def _deidentified(name: str, rows: pl.LazyFrame, deid: Deidentifier) -> pl.DataFrame:
    """The rows de-identified column by column (module docstring), in a stable order."""
    spec = TABLE_SPECS[name]
    shift = pl.duration(days=pl.col(_SHIFT))
    columns: list[pl.Expr] = []
    tokenized = ["person_id"]
    for column in spec.names:
        rule = column_rule(column)
        if rule in ("person", "token"):
            columns.append(pl.col(column))
            if rule == "token":
                tokenized.append(column)
            if name == "person" and rule == "person":
                columns.append(pl.col(_PID).alias(_PATIENT_ID))
                tokenized.append(_PATIENT_ID)
        elif rule == "shift":
            columns.append(pl.col(column) + shift)
        elif rule == "birth":
            columns.append(_birth_part(column, shift))
        elif rule == "time":
            text = pl.col(column).str.strip_chars()
            columns.append(pl.when(text.str.contains(_TIME_OF_DAY)).then(text).alias(column))
        elif rule == "keep":
            columns.append(pl.col(column))
    frame = rows.select(columns).collect()
    frame = frame.with_columns(_tokens(frame.get_column(c), deid, _kind(c)) for c in tokenized)
    order = list(dict.fromkeys(["person_id", *spec.sort_by, *spec.key]))
    return frame.sort(order, nulls_last=True)


def _kind(column: str) -> str:
    return _TOKEN_KINDS.get(column, column)


def _tokens(values: pl.Series, deid: Deidentifier, kind: str) -> pl.Series:
    """``values`` as tokens of ``kind`` (nulls stay null): one HMAC per distinct value."""
    distinct = values.drop_nulls().unique().to_list()
    mapping = {value: deid.token(kind, value) for value in distinct}
    return values.replace_strict(mapping, return_dtype=pl.String).alias(values.name)


def _birth_part(column: str, shift: pl.Expr) -> pl.Expr:
    """``column`` (year/month/day of birth) of the person's shifted birth date."""
    year = pl.col("year_of_birth")
    month = pl.col("month_of_birth")
    month = pl.when(month.is_between(1, 12)).then(month).otherwise(1)
    day = pl.col("day_of_birth").clip(1, 31).fill_null(1)
    first = pl.date(year, month, 1)
    built = pl.min_horizontal(first + pl.duration(days=day - 1), first.dt.month_end())
    birth = pl.coalesce(pl.col("birth_datetime").dt.date(), built) + shift
    part = {
        "year_of_birth": birth.dt.year(),
        "month_of_birth": birth.dt.month(),
        "day_of_birth": birth.dt.day(),
    }[column]
    return part.cast(pl.Int64).alias(column)


def _write(folder: Path, name: str, frame: pl.DataFrame, deidentified: bool) -> None:
    """``frame`` to ``folder/<name>.parquet`` through a partial file renamed into place."""
    final = folder / f"{name}.parquet"
    partial = folder / f".{name}.parquet.partial"
    metadata = {META_DEID: "on" if deidentified else "off", META_TABLE: name}
    try:
        frame.write_parquet(partial, metadata=metadata)
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
