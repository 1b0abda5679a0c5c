"""imgindex.deid.emr: the selected persons' OMOP rows, pseudonymized and date-shifted as images."""

from __future__ import annotations

import datetime as dt
import itertools
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow.parquet as pq
import pytest

from imgindex.deid import Deidentifier
from imgindex.deid.emr import (
    EMR_EXPORT_TABLES,
    META_DEID,
    META_TABLE,
    column_rule,
    export_emr,
    persons_for,
)
from imgindex.emr.importer import import_emr
from imgindex.emr.omop import TABLE_SPECS
from imgindex.emr.tables import Emr

if TYPE_CHECKING:
    from pathlib import Path

KEY = b"k" * 32
OTHER_KEY = b"x" * 32

#: person_id -> person_source_value as stored (P-3 padded with blanks; 734005 unlinked).
SOURCE_VALUES: dict[int, str | None] = {
    734001: "PLANT-77310",
    734002: "P-2",
    734003: "  P-3 ",
    734004: "P-4",
    734005: None,
}
#: The export's PatientIDs and the persons they select.
SELECTED = {734001: "PLANT-77310", 734002: "P-2", 734003: "P-3"}
#: Free text and local codes planted in the source: none may reach a de-identified file.
PLANTED_TEXT = (
    "PLANT-77310",
    "Sankt Wendelinus Klinikum",
    "Kovačević",
    "LOT-99817",
    "Hauptstraße 12",
    "I21.4-local",
    "ER-WENDEL",
    "patient refused",
    "call Anđela",
)
#: The row ids of each table (person_id, row ids): distinctive, so a leak is found.
ID_COLUMNS = {
    "visit_occurrence": "visit_occurrence_id",
    "condition_occurrence": "condition_occurrence_id",
    "procedure_occurrence": "procedure_occurrence_id",
    "drug_exposure": "drug_exposure_id",
    "measurement": "measurement_id",
    "observation": "observation_id",
}
ROW_ID_KINDS = (
    "person_id",
    "visit_occurrence_id",
    "preceding_visit_occurrence_id",
    "condition_occurrence_id",
    "procedure_occurrence_id",
    "drug_exposure_id",
    "measurement_id",
    "observation_id",
    "visit_detail_id",
    "measurement_event_id",
    "observation_event_id",
)


def make_cdm() -> dict[str, pl.DataFrame]:
    """Five persons, two visits each, events on a few dates of 2023."""
    births = {
        734001: (1961, 4, 17, dt.datetime(1961, 4, 17, 6, 45)),
        734002: (1975, None, None, None),
        734003: (1988, 11, 23, None),
        734004: (1990, 2, 30, None),  # an invalid day: built as the month's last day
        734005: (1950, 6, 1, None),
    }
    person = pl.DataFrame(
        [
            {
                "person_id": pid,
                "gender_concept_id": 8532,
                "year_of_birth": y,
                "month_of_birth": m,
                "day_of_birth": d,
                "birth_datetime": bdt,
                "race_concept_id": 0,
                "ethnicity_concept_id": 0,
                "location_id": 555001,
                "provider_id": 555002,
                "care_site_id": 555003,
                "person_source_value": SOURCE_VALUES[pid],
                "gender_source_value": "F",
            }
            for pid, (y, m, d, bdt) in births.items()
        ],
        schema_overrides={
            "month_of_birth": pl.Int64,
            "day_of_birth": pl.Int64,
            "birth_datetime": pl.Datetime("us"),
            "person_source_value": pl.String,
        },
    )
    tables: dict[str, list[dict[str, Any]]] = {name: [] for name in ID_COLUMNS}
    for n, pid in enumerate(births):
        start = dt.date(2023, 3, 1) + dt.timedelta(days=11 * n)
        later = start + dt.timedelta(days=9)
        visits = (810000 + 2 * n, 810001 + 2 * n)
        for i, (visit, day) in enumerate(zip(visits, (start, later), strict=True)):
            tables["visit_occurrence"].append(
                {
                    "visit_occurrence_id": visit,
                    "person_id": pid,
                    "visit_concept_id": 9201,
                    "visit_start_date": day,
                    "visit_start_datetime": dt.datetime.combine(day, dt.time(8, 15)),
                    "visit_end_date": day + dt.timedelta(days=2),
                    "visit_type_concept_id": 32817,
                    "provider_id": 555002,
                    "care_site_id": 555003,
                    "visit_source_value": "ER-WENDEL",
                    "preceding_visit_occurrence_id": visits[0] if i else None,
                }
            )
            tables["condition_occurrence"].append(
                {
                    "condition_occurrence_id": 820000 + 2 * n + i,
                    "person_id": pid,
                    "condition_concept_id": 4329847,
                    "condition_start_date": day,
                    "condition_start_datetime": dt.datetime.combine(day, dt.time(9, 30)),
                    "condition_end_date": day + dt.timedelta(days=30) if i else None,
                    "condition_type_concept_id": 32817,
                    "stop_reason": "patient refused",
                    "provider_id": 555002,
                    "visit_occurrence_id": visit,
                    "condition_source_value": "I21.4-local",
                }
            )
            tables["measurement"].append(
                {
                    "measurement_id": 850000 + 2 * n + i,
                    "person_id": pid,
                    "measurement_concept_id": 3020891,
                    "measurement_date": day + dt.timedelta(days=1),
                    "measurement_datetime": dt.datetime.combine(day, dt.time(23, 59, 59)),
                    "measurement_time": "call Anđela" if i else "08:30",
                    "measurement_type_concept_id": 32817,
                    "value_as_number": 37.5 + i,
                    "unit_concept_id": 586323,
                    "range_low": 36.0,
                    "range_high": 38.0,
                    "visit_occurrence_id": visit,
                    "measurement_source_value": "TEMP-local",
                    "value_source_value": "37,5",
                }
            )
        tables["procedure_occurrence"].append(
            {
                "procedure_occurrence_id": 830000 + n,
                "person_id": pid,
                "procedure_concept_id": 4336464,
                "procedure_date": later + dt.timedelta(days=1),
                "procedure_datetime": dt.datetime.combine(later, dt.time(14, 0)),
                "procedure_type_concept_id": 32817,
                "quantity": 1.0,
                "provider_id": 555002,
                "visit_occurrence_id": visits[1],
                "procedure_source_value": "I21.4-local",
            }
        )
        tables["drug_exposure"].append(
            {
                "drug_exposure_id": 840000 + n,
                "person_id": pid,
                "drug_concept_id": 1112807,
                "drug_exposure_start_date": start,
                "drug_exposure_end_date": later,
                "verbatim_end_date": later + dt.timedelta(days=3),
                "drug_type_concept_id": 32817,
                "stop_reason": "patient refused",
                "refills": 2,
                "quantity": 30.0,
                "days_supply": 30,
                "sig": "take with Dr. Kovačević",
                "lot_number": "LOT-99817",
                "visit_occurrence_id": visits[0],
                "visit_detail_id": 860000 + n,
                "drug_source_value": "ASA-local",
            }
        )
        tables["observation"].append(
            {
                "observation_id": 870000 + n,
                "person_id": pid,
                "observation_concept_id": 4058286,
                "observation_date": later,
                "observation_type_concept_id": 32817,
                "value_as_string": "lives at Hauptstraße 12",
                "visit_occurrence_id": visits[1],
                "observation_source_value": "Sankt Wendelinus Klinikum",
            }
        )
    return {"person": person} | {name: pl.DataFrame(rows) for name, rows in tables.items()}


@pytest.fixture(scope="module")
def cdm() -> dict[str, pl.DataFrame]:
    return make_cdm()


@pytest.fixture(scope="module")
def source(cdm: dict[str, pl.DataFrame], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("omop")
    for name, frame in cdm.items():
        frame.write_parquet(folder / f"{name}.parquet")
    return folder


@pytest.fixture(scope="module")
def emr(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Emr:
    root = tmp_path_factory.mktemp("root")
    import_emr(source, root)
    return Emr(root)


@pytest.fixture(scope="module")
def stored(emr: Emr) -> dict[str, pl.DataFrame]:
    """Every table as imported (canonical columns and types)."""
    return {name: emr.scan(name).collect() for name in EMR_EXPORT_TABLES}


@pytest.fixture(scope="module")
def exported(emr: Emr, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three selected persons, de-identified with :data:`KEY`."""
    out = tmp_path_factory.mktemp("export") / "emr"
    persons = persons_for(emr, patient_ids=["PLANT-77310", "P-2", "P-3"])
    summary = export_emr(emr, persons, out, Deidentifier(KEY))
    assert summary.persons == 3
    assert summary.unlinked_person_ids == []
    return out


def read(out: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(out / f"{name}.parquet")


def test_only_the_selected_persons_rows_are_written(
    exported: Path, stored: dict[str, pl.DataFrame]
) -> None:
    deid = Deidentifier(KEY)
    tokens = {deid.token("person_id", pid) for pid in SELECTED}
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        f"{name}.parquet" for name in EMR_EXPORT_TABLES
    )
    for name in EMR_EXPORT_TABLES:
        written = read(exported, name)
        expected = stored[name].filter(pl.col("person_id").is_in(list(SELECTED)))
        assert written.height == expected.height > 0, name
        assert set(written.get_column("person_id")) == tokens, name
        metadata = pq.read_metadata(exported / f"{name}.parquet").metadata
        assert metadata[META_DEID.encode()] == b"on"
        assert metadata[META_TABLE.encode()] == name.encode()


def test_person_and_patient_tokens_match_the_manifests(exported: Path) -> None:
    deid = Deidentifier(KEY)
    person = read(exported, "person")
    pairs = set(person.select("person_id", "PatientID").iter_rows())
    assert pairs == {
        (deid.token("person_id", pid), deid.token("PatientID", patient))
        for pid, patient in SELECTED.items()
    }
    # What the export's attribute gate (and so the manifest) writes for the same person.
    manifest = deid.attributes({"person_id": 734001, "PatientID": "PLANT-77310"})
    assert (manifest["person_id"], manifest["PatientID"]) in pairs
    assert person.get_column("person_id").dtype == pl.String


def _shifted_pairs(
    exported: Path, stored: dict[str, pl.DataFrame], name: str
) -> tuple[pl.DataFrame, list[str]]:
    """The written rows of ``name`` joined to the stored ones (``<column>_orig``)."""
    deid = Deidentifier(KEY)
    key = TABLE_SPECS[name].key[0]
    original = stored[name].filter(pl.col("person_id").is_in(list(SELECTED)))
    original = original.with_columns(
        pl.col(key).map_elements(lambda v: deid.token(key, v), return_dtype=pl.String),
        pl.col("person_id").alias("raw_person_id"),
    )
    dated = [
        c
        for c in TABLE_SPECS[name].names
        if c.endswith(("_date", "_datetime")) and column_rule(c) == "shift"
    ]
    joined = read(exported, name).join(
        original.select(key, "raw_person_id", *dated), on=key, suffix="_orig", validate="1:1"
    )
    assert joined.height == original.height
    return joined, dated


def test_dates_move_by_the_patients_shift_and_intervals_are_kept(
    exported: Path, stored: dict[str, pl.DataFrame]
) -> None:
    deid = Deidentifier(KEY)
    shift = {pid: dt.timedelta(days=deid.shift_days(patient)) for pid, patient in SELECTED.items()}
    assert all(s.days < 0 for s in shift.values())
    events: dict[int, list[tuple[Any, Any]]] = {pid: [] for pid in SELECTED}
    for name in ID_COLUMNS:
        joined, dated = _shifted_pairs(exported, stored, name)
        assert dated, name
        for row in joined.iter_rows(named=True):
            pid = row["raw_person_id"]
            for column in dated:
                new, old = row[column], row[f"{column}_orig"]
                if old is None:
                    assert new is None, (name, column)
                    continue
                assert type(new) is type(old), (name, column)
                assert new - old == shift[pid], (name, column)
                events[pid].append((old, new))
    for pid, pairs in events.items():
        assert len(pairs) > 10
        for (old_a, new_a), (old_b, new_b) in itertools.combinations(pairs, 2):
            if type(old_a) is type(old_b):
                assert new_b - new_a == old_b - old_a, pid
    # Birth: the birth date (birth_datetime's, else year/month/day) moves by the same shift.
    person = read(exported, "person")
    births = {
        734001: dt.date(1961, 4, 17),
        734002: dt.date(1975, 1, 1),
        734003: dt.date(1988, 11, 23),
    }
    for pid, born in births.items():
        row = person.row(
            by_predicate=pl.col("person_id") == deid.token("person_id", pid), named=True
        )
        moved = born + shift[pid]
        assert (row["year_of_birth"], row["month_of_birth"], row["day_of_birth"]) == (
            moved.year,
            moved.month,
            moved.day,
        ), pid
        if pid == 734001:
            assert row["birth_datetime"] == dt.datetime(1961, 4, 17, 6, 45) + shift[pid]
        else:
            assert row["birth_datetime"] is None


def test_visit_tokens_join_across_tables(exported: Path, stored: dict[str, pl.DataFrame]) -> None:
    deid = Deidentifier(KEY)
    visits = read(exported, "visit_occurrence")
    visit_person = dict(visits.select("visit_occurrence_id", "person_id").iter_rows())
    for name in ID_COLUMNS:
        if name == "visit_occurrence":
            continue
        written = read(exported, name)
        refs = written.select("visit_occurrence_id", "person_id").drop_nulls()
        assert refs.height == written.height, name
        for visit, person in refs.iter_rows():
            assert visit_person[visit] == person, name  # joins, to the same person's visit
    # The stored references, tokenized, are the written ones.
    conditions = stored["condition_occurrence"].filter(pl.col("person_id").is_in(list(SELECTED)))
    expected = {
        (deid.token("condition_occurrence_id", c), deid.token("visit_occurrence_id", v))
        for c, v in conditions.select("condition_occurrence_id", "visit_occurrence_id").iter_rows()
    }
    written_pairs = read(exported, "condition_occurrence").select(
        "condition_occurrence_id", "visit_occurrence_id"
    )
    assert set(written_pairs.iter_rows()) == expected
    # A preceding visit joins to its visit's row.
    preceding = visits.get_column("preceding_visit_occurrence_id").drop_nulls()
    assert preceding.len() == 3
    assert set(preceding) <= set(visit_person)


def _values(frame: pl.DataFrame) -> set[Any]:
    return {v for column in frame.columns for v in frame.get_column(column).to_list()}


def test_nothing_identifying_is_written(exported: Path, stored: dict[str, pl.DataFrame]) -> None:
    free_text = {"stop_reason", "sig", "lot_number", "value_as_string", "person_source_value"}
    raw_ids = {
        v
        for name, frame in stored.items()
        for column in frame.columns
        if column in ROW_ID_KINDS
        for v in frame.get_column(column).drop_nulls().to_list()
    }
    assert {734001, 810000, 820000, 860000} <= raw_ids
    original_dates = {
        v.date() if isinstance(v, dt.datetime) else v
        for frame in stored.values()
        for column in frame.columns
        if column.endswith(("_date", "_datetime"))
        for v in frame.get_column(column).drop_nulls().to_list()
    } | {dt.date(1961, 4, 17), dt.date(1975, 1, 1), dt.date(1988, 11, 23)}
    for name in EMR_EXPORT_TABLES:
        written = read(exported, name)
        for column in written.columns:
            assert column not in {"provider_id", "care_site_id", "location_id"}, name
            assert not column.endswith("_source_value"), (name, column)
            assert column not in free_text, (name, column)
        values = _values(written)
        assert not values & raw_ids, name
        assert not {str(i) for i in raw_ids} & values, name
        for column in written.columns:
            for value in written.get_column(column).drop_nulls().to_list():
                if isinstance(value, dt.datetime):
                    value = value.date()
                if isinstance(value, dt.date):
                    assert value not in original_dates, (name, column, value)
                if isinstance(value, str):
                    assert not any(text in value for text in PLANTED_TEXT), (name, column)
        data = (exported / f"{name}.parquet").read_bytes()
        for text in (*PLANTED_TEXT, "P-2", "P-3"):
            assert text.encode() not in data, (name, text)
    # A time of day is kept; free text in measurement_time is not.
    times = read(exported, "measurement").get_column("measurement_time")
    assert sorted(times.drop_nulls()) == ["08:30"] * 3
    assert times.null_count() == 3


def test_same_key_same_values_other_key_disjoint_tokens(
    emr: Emr, exported: Path, tmp_path: Path
) -> None:
    again = export_emr(emr, SELECTED, tmp_path / "again", Deidentifier(KEY))
    other = export_emr(emr, SELECTED, tmp_path / "other", Deidentifier(OTHER_KEY))
    assert again.tables == other.tables
    first_tokens: set[str] = set()
    other_tokens: set[str] = set()
    for name in EMR_EXPORT_TABLES:
        assert read(tmp_path / "again", name).equals(read(exported, name)), name
        again_bytes = (tmp_path / "again" / f"{name}.parquet").read_bytes()
        assert again_bytes == (exported / f"{name}.parquet").read_bytes(), name
        for out, tokens in ((exported, first_tokens), (tmp_path / "other", other_tokens)):
            frame = read(out, name)
            for column in frame.columns:
                if column in ROW_ID_KINDS or column == "PatientID":
                    tokens.update(frame.get_column(column).drop_nulls().to_list())
    assert len(first_tokens) == 36  # 3 persons, 3 PatientIDs, 30 row ids
    assert not first_tokens & other_tokens
    assert not list(tmp_path.rglob("*.partial"))


def test_without_deid_the_rows_are_written_as_stored(
    emr: Emr, stored: dict[str, pl.DataFrame], tmp_path: Path
) -> None:
    summary = export_emr(emr, SELECTED, tmp_path, None)
    person = read(tmp_path, "person")
    assert dict(person.select("person_id", "PatientID").iter_rows()) == SELECTED
    assert person.get_column("person_source_value").to_list() == ["PLANT-77310", "P-2", "  P-3 "]
    for name in EMR_EXPORT_TABLES:
        written = read(tmp_path, name).drop("PatientID", strict=False)
        expected = stored[name].filter(pl.col("person_id").is_in(list(SELECTED)))
        key = TABLE_SPECS[name].key[0]
        assert written.sort(key).equals(expected.sort(key)), name
        assert summary.tables[name] == expected.height
        metadata = pq.read_metadata(tmp_path / f"{name}.parquet").metadata
        assert metadata[META_DEID.encode()] == b"off"


def test_persons_for_by_patient_and_person_and_the_unlinked(emr: Emr, tmp_path: Path) -> None:
    assert persons_for(emr) == {}
    assert persons_for(emr, patient_ids=["PLANT-77310", " P-3", "NOPE"]) == {
        734001: "PLANT-77310",
        734003: "P-3",
    }
    asked = [734002, 734005, 999999]
    persons = persons_for(emr, person_ids=asked)
    assert persons == {734002: "P-2"}
    both = persons_for(emr, patient_ids=["P-4"], person_ids=[734002])
    assert both == {734002: "P-2", 734004: "P-4"}
    summary = export_emr(emr, persons, tmp_path, Deidentifier(KEY), person_ids=asked)
    assert summary.persons == 1
    assert summary.unlinked_person_ids == [734005, 999999]
    deid = Deidentifier(KEY)
    for name in EMR_EXPORT_TABLES:
        people = set(read(tmp_path, name).get_column("person_id"))
        assert people == {deid.token("person_id", 734002)}, name


def test_padded_source_value_links_and_shifts_as_its_patient(emr: Emr, exported: Path) -> None:
    deid = Deidentifier(KEY)
    assert persons_for(emr, patient_ids=["P-3"]) == {734003: "P-3"}
    assert deid.shift_days("  P-3 ") == deid.shift_days("P-3")
    person = read(exported, "person")
    assert deid.token("PatientID", "P-3") in set(person.get_column("PatientID"))


def test_an_invalid_birth_day_is_the_months_last_day(emr: Emr, tmp_path: Path) -> None:
    deid = Deidentifier(KEY)
    export_emr(emr, {734004: "P-4"}, tmp_path, deid)
    row = read(tmp_path, "person").row(0, named=True)
    moved = dt.date(1990, 2, 28) + dt.timedelta(days=deid.shift_days("P-4"))
    assert (row["year_of_birth"], row["month_of_birth"], row["day_of_birth"]) == (
        moved.year,
        moved.month,
        moved.day,
    )


def test_absent_tables_are_skipped(source: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    import_emr(source, root, tables=["person", "condition_occurrence"])
    summary = export_emr(Emr(root), SELECTED, tmp_path / "out", Deidentifier(KEY))
    assert summary.tables == {"person": 3, "condition_occurrence": 6}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "condition_occurrence.parquet",
        "person.parquet",
    ]


def test_no_persons_writes_empty_tables(emr: Emr, tmp_path: Path) -> None:
    summary = export_emr(emr, {}, tmp_path, Deidentifier(KEY))
    assert summary.tables == dict.fromkeys(EMR_EXPORT_TABLES, 0)
    assert read(tmp_path, "person").columns[:2] == ["person_id", "PatientID"]
