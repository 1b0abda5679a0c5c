"""A synthetic OMOP EMR for the patients of an index: what ``imgindex demo`` imports.

:func:`emr_for_index` reads who is in the index and when they were imaged, and writes an EMR
in which some of them have the story of ``cohorts/mi_cad_ct.yaml``: a myocardial infarction
diagnosed a few days before a CT, and a coronary procedure 7 to 14 days after the diagnosis
(or, for others, too late to count). One index patient is left without an EMR person and two
EMR persons have no imaging, so the demo's link report has something to say.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Final

import numpy as np
import polars as pl
import pyarrow as pa

from imgindex.testing.omop import (
    ACUTE_MI,
    CABG,
    CORONARY_STENT,
    ESSENTIAL_HYPERTENSION,
    GENDER_FEMALE,
    GENDER_MALE,
    NSTEMI,
    OMOP_SCHEMAS,
    PCI,
    STEMI,
    TYPE_2_DIABETES,
    VISIT_INPATIENT,
    VISIT_OUTPATIENT,
    concept_ancestor_table,
    concept_table,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["DemoEmr", "emr_for_index"]

_MI: Final = ((ACUTE_MI, "I21.9"), (STEMI, "I21.3"), (NSTEMI, "I21.4"))
_PROCEDURES: Final = ((PCI, "92941"), (CORONARY_STENT, "92928"), (CABG, "33533"))
_BACKGROUND: Final = ((ESSENTIAL_HYPERTENSION, "I10"), (TYPE_2_DIABETES, "E11.9"))


class DemoEmr:
    """The tables (``tables``) and what was planted, for the demo to tell."""

    def __init__(self, tables: dict[str, pa.Table], mi_persons: int, procedure_in_window: int):
        self.tables = tables
        self.mi_persons = mi_persons
        self.procedure_in_window = procedure_in_window


def _table(name: str, columns: Mapping[str, list[object]]) -> pa.Table:
    schema = OMOP_SCHEMAS[name]
    n = len(next(iter(columns.values())))
    return pa.table(
        {f.name: pa.array(columns.get(f.name, [None] * n), f.type) for f in schema}, schema=schema
    )


def emr_for_index(series: pl.DataFrame, *, seed: int = 7) -> DemoEmr:
    """An OMOP EMR for the patients of ``series`` (the index ``series`` table).

    Uses PatientID, PatientSex, PatientBirthDate, Modality and imaging_date. The first
    patient (in PatientID order) gets no EMR person; two persons without imaging are added.
    """
    rng = np.random.default_rng(seed)
    patients = (
        series.filter(pl.col("PatientID").is_not_null())
        .group_by("PatientID")
        .agg(
            pl.col("PatientSex").drop_nulls().first(),
            pl.col("PatientBirthDate").drop_nulls().first(),
            pl.col("imaging_date").filter(pl.col("Modality") == "CT").min().alias("first_ct"),
            pl.col("imaging_date").min().alias("first_seen"),
        )
        .sort("PatientID")
    )
    linked = patients.slice(1)  # the first index patient stays without an EMR person
    person: dict[str, list[object]] = {k: [] for k in OMOP_SCHEMAS["person"].names}
    conditions: dict[str, list[object]] = {
        k: []
        for k in (
            "person_id",
            "condition_concept_id",
            "condition_start_date",
            "condition_source_value",
            "condition_type_concept_id",
        )
    }
    procedures: dict[str, list[object]] = {
        k: []
        for k in (
            "person_id",
            "procedure_concept_id",
            "procedure_date",
            "procedure_source_value",
            "procedure_type_concept_id",
        )
    }
    visits: dict[str, list[object]] = {
        k: []
        for k in (
            "person_id",
            "visit_concept_id",
            "visit_start_date",
            "visit_end_date",
            "visit_type_concept_id",
        )
    }
    mi_persons = in_window = 0
    rows = [*linked.iter_rows(named=True), *_imageless()]
    for person_id, row in enumerate(rows, start=1):
        born = row["PatientBirthDate"] or dt.date(1950 + int(rng.integers(0, 40)), 6, 1)
        female = row["PatientSex"] == "F"
        for key, value in {
            "person_id": person_id,
            "gender_concept_id": GENDER_FEMALE if female else GENDER_MALE,
            "year_of_birth": born.year,
            "month_of_birth": born.month,
            "day_of_birth": born.day,
            "race_concept_id": 0,
            "ethnicity_concept_id": 0,
            "person_source_value": row["PatientID"],
            "gender_source_value": "F" if female else "M",
        }.items():
            person[key].append(value)
        for values in person.values():
            if len(values) < person_id:
                values.append(None)
        seen: dt.date = row["first_seen"] or dt.date(2020, 1, 1)
        concept, code = _BACKGROUND[int(rng.integers(0, len(_BACKGROUND)))]
        _add(
            conditions,
            person_id,
            concept,
            seen - dt.timedelta(days=int(rng.integers(30, 900))),
            code,
            "condition",
        )
        _add_visit(visits, person_id, VISIT_OUTPATIENT, seen, seen)
        first_ct = row["first_ct"]
        if first_ct is None or rng.random() > 0.7:
            continue
        # The MI/CAD story: diagnosis 0-3 days before the first CT, then a procedure.
        mi_persons += 1
        diagnosed = first_ct - dt.timedelta(days=int(rng.integers(0, 4)))
        concept, code = _MI[int(rng.integers(0, len(_MI)))]
        _add(conditions, person_id, concept, diagnosed, code, "condition")
        _add_visit(visits, person_id, VISIT_INPATIENT, diagnosed, diagnosed + dt.timedelta(days=16))
        timely = rng.random() < 0.75
        in_window += timely
        after = int(rng.integers(7, 15)) if timely else int(rng.integers(20, 40))
        concept, code = _PROCEDURES[int(rng.integers(0, len(_PROCEDURES)))]
        _add(
            procedures, person_id, concept, diagnosed + dt.timedelta(days=after), code, "procedure"
        )

    tables = {
        "person": _table("person", person),
        "condition_occurrence": _numbered("condition_occurrence", conditions),
        "procedure_occurrence": _numbered("procedure_occurrence", procedures),
        "visit_occurrence": _numbered("visit_occurrence", visits),
        "concept": concept_table(),
        "concept_ancestor": concept_ancestor_table(),
    }
    return DemoEmr(tables, mi_persons, in_window)


def _imageless() -> list[dict[str, object]]:
    return [
        {
            "PatientID": f"EMR-ONLY-{i}",
            "PatientSex": "F",
            "PatientBirthDate": None,
            "first_ct": None,
            "first_seen": dt.date(2021, 3, i),
        }
        for i in (1, 2)
    ]


_EHR: Final = 32817  # Type concept: EHR


def _add(
    rows: dict[str, list[object]],
    person_id: int,
    concept: int,
    day: dt.date,
    code: str,
    domain: str,
) -> None:
    rows["person_id"].append(person_id)
    rows[f"{domain}_concept_id"].append(concept)
    rows["condition_start_date" if domain == "condition" else "procedure_date"].append(day)
    rows[f"{domain}_source_value"].append(code)
    rows[f"{domain}_type_concept_id"].append(_EHR)


def _add_visit(
    rows: dict[str, list[object]], person_id: int, concept: int, start: dt.date, end: dt.date
) -> None:
    rows["person_id"].append(person_id)
    rows["visit_concept_id"].append(concept)
    rows["visit_start_date"].append(start)
    rows["visit_end_date"].append(end)
    rows["visit_type_concept_id"].append(_EHR)


def _numbered(name: str, rows: dict[str, list[object]]) -> pa.Table:
    n = len(rows["person_id"])
    key = f"{name}_id"
    return _table(name, {key: list(range(1, n + 1)), **rows})
