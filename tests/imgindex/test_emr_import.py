"""``imgindex emr import``: OMOP CDM tables from CSV, Parquet, DuckDB and a real PostgreSQL.

One generated CDM (v5.3 visit columns, some optional columns and tables left out) is written
four ways; each import must give the same canonical tables. Then the checks: strict types,
clear errors, the sorted layout with row-group statistics, crosswalks and the link report.
"""

from __future__ import annotations

import datetime as dt
import gzip
import itertools
import random
from typing import TYPE_CHECKING, Any, Final

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from peers.postgres import start_postgres
from polars.testing import assert_frame_equal

from imgindex.cli import main
from imgindex.emr import (
    CDM_TABLES,
    EMR_TABLES,
    EVENT_DATE_COLUMNS,
    TABLE_SPECS,
    Emr,
    import_emr,
    link_report,
)
from imgindex.emr.conform import RawTable, conform_table
from imgindex.emr.omop import V53_RENAMED
from imgindex.emr.tables import ROW_GROUP_ROWS
from imgindex.errors import EmrError
from imgindex.index import IndexWriter

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from peers.postgres import Postgres

PERSONS: Final = 40
#: The tables the generated CDM has; drug_exposure and observation are left out.
PRESENT: Final = (
    "person",
    "visit_occurrence",
    "condition_occurrence",
    "procedure_occurrence",
    "measurement",
    "concept",
    "concept_ancestor",
)
ABSENT: Final = ("drug_exposure", "observation")
MI: Final = 4329847
CAD: Final = 317576
PCI: Final = 4216130
TROPONIN: Final = 3033745
NOW: Final = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
#: Column-name spelling per table in the CSV folder: OHDSI exports come in every case.
HEADER_CASE: Final = {
    "person": str.upper,
    "visit_occurrence": str.title,
    "condition_occurrence": str.upper,
    "procedure_occurrence": str.lower,
    "measurement": str.title,
    "concept": str.upper,
    "concept_ancestor": str.lower,
}
CANONICAL_DTYPES: Final[dict[str, pl.DataType]] = {
    "int": pl.Int64(),
    "float": pl.Float64(),
    "date": pl.Date(),
    "datetime": pl.Datetime("us"),
    "string": pl.String(),
}
PG_TYPES: Final = {
    "int": "integer",
    "float": "numeric",
    "date": "date",
    "datetime": "timestamp",
    "string": "varchar(255)",
}


def make_cdm(persons: int = PERSONS, seed: int = 5) -> dict[str, pl.DataFrame]:
    """A small CDM: v5.3 visit columns, a few optional columns per table, canonical types."""
    rng = random.Random(seed)
    day0 = dt.date(2023, 9, 1)
    ids = list(range(1, persons + 1))
    person = pl.DataFrame(
        {
            "person_id": ids,
            "gender_concept_id": [rng.choice([8507, 8532]) for _ in ids],
            "year_of_birth": [rng.randint(1930, 2000) for _ in ids],
            "month_of_birth": [rng.choice([None, *range(1, 13)]) for _ in ids],
            "birth_datetime": [dt.datetime(1950, 1, 1, 8, 30) + dt.timedelta(days=i) for i in ids],
            "race_concept_id": [0] * persons,
            "ethnicity_concept_id": [0] * persons,
            # Every tenth person has no source value: no PatientID links to it by default.
            "person_source_value": [None if i % 10 == 0 else f"PAT{i:04d}" for i in ids],
            "gender_source_value": [rng.choice(["M", "F"]) for _ in ids],
        },
        schema_overrides={"month_of_birth": pl.Int64},
    )
    visits: dict[str, list[Any]] = {
        "visit_occurrence_id": [],
        "person_id": [],
        "visit_concept_id": [],
        "visit_start_date": [],
        "visit_end_date": [],
        "visit_type_concept_id": [],
        # CDM v5.3 names: v5.4 calls them admitted_from_concept_id, discharged_to_concept_id.
        "admitting_source_concept_id": [],
        "discharge_to_concept_id": [],
        "visit_source_value": [],
    }
    conditions: dict[str, list[Any]] = {
        "condition_occurrence_id": [],
        "person_id": [],
        "condition_concept_id": [],
        "condition_start_date": [],
        "condition_start_datetime": [],
        "condition_type_concept_id": [],
        "condition_source_value": [],
        "visit_occurrence_id": [],
    }
    procedures: dict[str, list[Any]] = {
        "procedure_occurrence_id": [],
        "person_id": [],
        "procedure_concept_id": [],
        "procedure_date": [],
        "procedure_type_concept_id": [],
        "quantity": [],
        "procedure_source_value": [],
    }
    measurements: dict[str, list[Any]] = {
        "measurement_id": [],
        "person_id": [],
        "measurement_concept_id": [],
        "measurement_date": [],
        "measurement_type_concept_id": [],
        "value_as_number": [],
        "range_low": [],
        "unit_source_value": [],
    }
    for pid in ids:
        for k in range(2):
            vid = pid * 10 + k
            start = day0 + dt.timedelta(days=rng.randint(0, 60))
            visits["visit_occurrence_id"].append(vid)
            visits["person_id"].append(pid)
            visits["visit_concept_id"].append(rng.choice([9201, 9202]))
            visits["visit_start_date"].append(start)
            visits["visit_end_date"].append(start + dt.timedelta(days=rng.randint(0, 5)))
            visits["visit_type_concept_id"].append(32817)
            visits["admitting_source_concept_id"].append(rng.choice([None, 8536, 8863]))
            visits["discharge_to_concept_id"].append(rng.choice([None, 8536]))
            visits["visit_source_value"].append(rng.choice(["IP", "OP"]))
            code = rng.choice([MI, CAD])
            conditions["condition_occurrence_id"].append(vid)
            conditions["person_id"].append(pid)
            conditions["condition_concept_id"].append(code)
            conditions["condition_start_date"].append(start)
            conditions["condition_start_datetime"].append(
                None
                if k
                else dt.datetime.combine(start, dt.time(rng.randint(0, 23), rng.randint(0, 59)))
            )
            conditions["condition_type_concept_id"].append(32817)
            conditions["condition_source_value"].append("I21.4" if code == MI else "I25.1")
            conditions["visit_occurrence_id"].append(vid if k == 0 else None)
            procedures["procedure_occurrence_id"].append(vid)
            procedures["person_id"].append(pid)
            procedures["procedure_concept_id"].append(PCI)
            procedures["procedure_date"].append(start + dt.timedelta(days=rng.randint(0, 14)))
            procedures["procedure_type_concept_id"].append(32817)
            procedures["quantity"].append(rng.choice([None, 1.0, 2.0]))
            procedures["procedure_source_value"].append("00.66")
            measurements["measurement_id"].append(vid)
            measurements["person_id"].append(pid)
            measurements["measurement_concept_id"].append(TROPONIN)
            measurements["measurement_date"].append(start)
            measurements["measurement_type_concept_id"].append(32817)
            # Quarters are exact in binary and in NUMERIC: every source gives the same float.
            measurements["value_as_number"].append(rng.randint(0, 400) / 4)
            measurements["range_low"].append(rng.choice([None, 0.5]))
            measurements["unit_source_value"].append("ng/mL")
    concept = pl.DataFrame(
        {
            "concept_id": [MI, CAD, PCI, TROPONIN, 8507, 8532],
            "concept_name": [
                "Acute myocardial infarction",
                "Coronary arteriosclerosis",
                'Percutaneous coronary intervention, 5" sheath',
                "Troponin I.cardiac [Mass/volume] in Serum or Plasma",
                "MALE",
                "FEMALE",
            ],
            "domain_id": ["Condition", "Condition", "Procedure", "Measurement", "Gender", "Gender"],
            "vocabulary_id": ["SNOMED", "SNOMED", "SNOMED", "LOINC", "Gender", "Gender"],
            "concept_class_id": [
                "Clinical Finding",
                "Clinical Finding",
                "Procedure",
                "Lab Test",
                "Gender",
                "Gender",
            ],
            "standard_concept": ["S", "S", "S", "S", "S", "S"],
            "concept_code": ["57054005", "53741008", "415070008", "10839-9", "M", "F"],
            "valid_start_date": [dt.date(1970, 1, 1)] * 6,
            "valid_end_date": [dt.date(2099, 12, 31)] * 6,
            "invalid_reason": [None] * 6,
        },
        schema_overrides={"invalid_reason": pl.String},
    )
    ancestor = pl.DataFrame(
        {
            "ancestor_concept_id": [MI, CAD, CAD, PCI],
            "descendant_concept_id": [MI, CAD, MI, PCI],
            "min_levels_of_separation": [0, 0, 2, 0],
            "max_levels_of_separation": [0, 0, 3, 0],
        }
    )
    dates = {"visit_start_date", "visit_end_date", "condition_start_date", "procedure_date"}
    dates.add("measurement_date")

    def frame(columns: dict[str, list[Any]]) -> pl.DataFrame:
        schema = {
            name: pl.Date
            if name in dates
            else pl.Datetime("us")
            if name.endswith("_datetime")
            else pl.Float64
            if name in ("quantity", "value_as_number", "range_low")
            else pl.String
            if name.endswith("_source_value")
            else pl.Int64
            for name in columns
        }
        return pl.DataFrame(columns, schema=schema)

    return {
        "person": person,
        "visit_occurrence": frame(visits),
        "condition_occurrence": frame(conditions),
        "procedure_occurrence": frame(procedures),
        "measurement": frame(measurements),
        "concept": concept,
        "concept_ancestor": ancestor,
    }


def kind_of(table: str, column: str) -> str:
    """The canonical kind of a (possibly v5.3-named) column."""
    column = V53_RENAMED.get(table, {}).get(column, column)
    return TABLE_SPECS[table].column(column).kind


def write_csv_folder(cdm: dict[str, pl.DataFrame], folder: Path) -> Path:
    """OHDSI-style files: upper-case names, headers in any case, Athena vocabulary files
    tab-separated without quoting and with YYYYMMDD dates, one table gzip-compressed."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in cdm.items():
        case = HEADER_CASE[name]
        renamed = frame.rename({c: case(c) for c in frame.columns})
        if name in ("concept", "concept_ancestor"):
            renamed.write_csv(
                folder / f"{name.upper()}.csv",
                separator="\t",
                quote_style="never",
                date_format="%Y%m%d",
            )
        elif name == "measurement":
            text = renamed.write_csv()
            (folder / "MEASUREMENT.csv.gz").write_bytes(gzip.compress(text.encode()))
        else:
            renamed.write_csv(folder / f"{name.upper()}.csv", datetime_format="%Y-%m-%dT%H:%M:%S")
    return folder


def write_parquet_folder(cdm: dict[str, pl.DataFrame], folder: Path) -> Path:
    """Lower-case Parquet files with 32-bit ids (as many exports write them); measurement as
    a folder of two parts."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in cdm.items():
        narrowed = frame.with_columns(pl.col(pl.Int64).cast(pl.Int32))
        if name == "measurement":
            (folder / name).mkdir()
            half = narrowed.height // 2
            narrowed[:half].write_parquet(folder / name / "part-0.parquet")
            narrowed[half:].write_parquet(folder / name / "part-1.parquet")
        else:
            narrowed.write_parquet(folder / f"{name}.parquet")
    return folder


def write_duckdb(cdm: dict[str, pl.DataFrame], path: Path, schema: str = "cdm") -> Path:
    """Upper-case tables in ``schema``, integer ids and DECIMAL values."""
    con = duckdb.connect(str(path))
    try:
        # A file cdm.duckdb is catalog "cdm": qualify names so that schema "cdm" is not ambiguous.
        (catalog,) = con.execute("SELECT current_database()").fetchone() or ("",)
        schema = f'"{catalog}".{schema}'
        con.execute(f"CREATE SCHEMA {schema}")
        for name, frame in cdm.items():
            casts = ", ".join(
                f"CAST({c} AS {'DECIMAL(12,4)' if kind_of(name, c) == 'float' else 'INTEGER'})"
                f" AS {c}"
                for c in frame.columns
                if kind_of(name, c) in ("int", "float")
            )
            con.register("frame", frame.to_arrow())
            con.execute(
                f"CREATE TABLE {schema}.{name.upper()} AS SELECT * REPLACE ({casts}) FROM frame"
            )
            con.unregister("frame")
    finally:
        con.close()
    return path


def load_postgres(pg: Postgres, cdm: dict[str, pl.DataFrame], folder: Path) -> None:
    """The tables in schema ``cdm`` with the CDM DDL's types, loaded by ``\\copy``."""
    folder.mkdir(parents=True, exist_ok=True)
    script = ["CREATE SCHEMA cdm;"]
    for name, frame in cdm.items():
        columns = ", ".join(f"{c} {PG_TYPES[kind_of(name, c)]}" for c in frame.columns)
        script.append(f"CREATE TABLE cdm.{name} ({columns});")
        csv = folder / f"{name}.csv"
        frame.write_csv(csv, datetime_format="%Y-%m-%d %H:%M:%S")
        script.append(
            f"\\copy cdm.{name} ({', '.join(frame.columns)}) FROM '{csv}' "
            "WITH (FORMAT csv, HEADER true)"
        )
    pg.psql("\n".join(script))


def snapshot(root: Path) -> dict[str, pl.DataFrame]:
    """Every imported CDM table, in key order."""
    emr = Emr(root)
    return {
        name: emr.scan(name).collect().sort(list(TABLE_SPECS[name].key))
        for name in CDM_TABLES
        if emr.has(name)
    }


def write_index(root: Path, patient_ids: list[str]) -> None:
    """A tiny index: one CT series of one instance per PatientID."""
    writer = IndexWriter(root)
    rows = [
        {
            "PatientID": patient,
            "StudyInstanceUID": f"1.2.826.0.1.3680043.10.1.{i}",
            "SeriesInstanceUID": f"1.2.826.0.1.3680043.10.1.{i}.1",
            "SOPInstanceUID": f"1.2.826.0.1.3680043.10.1.{i}.1.1",
            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
            "Modality": "CT",
            "StudyDate": dt.date(2023, 10, 1),
            "InstanceNumber": 1,
            "size_bytes": 1000,
            "indexed_at": NOW,
        }
        for i, patient in enumerate(patient_ids)
    ]
    writer.write(pa.Table.from_pylist(rows, writer.schema), [])


@pytest.fixture(scope="module")
def cdm() -> dict[str, pl.DataFrame]:
    return make_cdm()


@pytest.fixture(scope="module")
def csv_folder(cdm: dict[str, pl.DataFrame], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv_folder(cdm, tmp_path_factory.mktemp("csv") / "omop")


@pytest.fixture(scope="module")
def csv_root(csv_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CSV folder imported once (tests that only read share it)."""
    root = tmp_path_factory.mktemp("csv-root")
    import_emr(csv_folder, root)
    return root


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """One real PostgreSQL for the module (started only if a test asks for it)."""
    server = start_postgres(tmp_path_factory.mktemp("postgres"))
    try:
        yield server
    finally:
        server.stop()


def test_csv_folder_import(csv_folder: Path, cdm: dict[str, pl.DataFrame], tmp_path: Path) -> None:
    summary = import_emr(csv_folder, tmp_path)

    assert summary.kind == "folder"
    assert summary.source == str(csv_folder.resolve())
    assert summary.rows == {name: cdm[name].height for name in PRESENT}
    assert summary.versions == dict.fromkeys(PRESENT, 0)
    assert summary.skipped == ABSENT
    # The v5.3 visit columns tell the version, and are renamed.
    assert summary.cdm_version == "5.3"
    assert any(
        "admitting_source_concept_id -> admitted_from_concept_id" in w for w in summary.warnings
    )
    emr = Emr(tmp_path)
    assert emr.path == tmp_path / "emr"
    for name in PRESENT:
        table = emr.scan(name).collect()
        assert table.columns == list(TABLE_SPECS[name].names), name
        assert table.schema == pl.Schema(
            {c.name: CANONICAL_DTYPES[c.kind] for c in TABLE_SPECS[name].columns}
        ), name
    visits = emr.scan("visit_occurrence").collect().sort("visit_occurrence_id")
    source = cdm["visit_occurrence"].sort("visit_occurrence_id")
    assert (
        visits["admitted_from_concept_id"].to_list()
        == source["admitting_source_concept_id"].to_list()
    )
    assert (
        visits["discharged_to_concept_id"].to_list() == source["discharge_to_concept_id"].to_list()
    )
    # The values, as generated (datetimes written with a T, vocabulary dates as YYYYMMDD).
    for name in ("person", "condition_occurrence", "concept", "concept_ancestor", "measurement"):
        got = emr.scan(name).collect().sort(list(TABLE_SPECS[name].key))
        want = cdm[name].sort(list(TABLE_SPECS[name].key))
        assert_frame_equal(got.select(want.columns), want)
    names = emr.scan("concept").collect()["concept_name"].to_list()
    assert 'Percutaneous coronary intervention, 5" sheath' in names


def test_missing_optional_columns_are_typed_nulls(csv_root: Path) -> None:
    emr = Emr(csv_root)
    conditions = emr.scan("condition_occurrence").collect()
    for column, dtype in (
        ("condition_end_date", pl.Date),
        ("condition_end_datetime", pl.Datetime("us")),
        ("stop_reason", pl.String),
        ("visit_detail_id", pl.Int64),
    ):
        assert conditions.schema[column] == dtype
        assert conditions[column].null_count() == conditions.height
    procedures = emr.scan("procedure_occurrence").collect()
    # v5.4 added procedure_end_date; quantity is float64 in every table.
    assert procedures.schema["procedure_end_date"] == pl.Date
    assert procedures.schema["quantity"] == pl.Float64


def test_missing_optional_tables_are_skipped_and_reported(csv_root: Path) -> None:
    emr = Emr(csv_root)
    assert not emr.has("drug_exposure")
    assert emr.versions() == {
        **dict.fromkeys(EMR_TABLES, None),
        **dict.fromkeys(PRESENT, 0),
    }
    with pytest.raises(EmrError, match=r"no EMR table 'drug_exposure' under .*emr: import one"):
        emr.scan("drug_exposure")
    with pytest.raises(EmrError, match="no EMR table 'drugs'"):
        emr.scan("drugs")


def test_parquet_and_duckdb_give_the_same_tables(
    cdm: dict[str, pl.DataFrame], csv_root: Path, tmp_path: Path
) -> None:
    parquet = write_parquet_folder(cdm, tmp_path / "parquet")
    database = write_duckdb(cdm, tmp_path / "cdm.duckdb")
    from_csv = snapshot(csv_root)
    assert set(from_csv) == set(PRESENT)

    summary = import_emr(parquet, tmp_path / "root-parquet")
    assert summary.rows == {name: cdm[name].height for name in PRESENT}
    for name, frame in snapshot(tmp_path / "root-parquet").items():
        assert_frame_equal(frame, from_csv[name])

    summary = import_emr(database, tmp_path / "root-duckdb", schema="cdm")
    assert summary.kind == "duckdb"
    assert summary.cdm_version == "5.3"
    for name, frame in snapshot(tmp_path / "root-duckdb").items():
        assert_frame_equal(frame, from_csv[name])


@pytest.mark.peers
def test_postgresql_gives_the_same_tables(
    postgres: Postgres, cdm: dict[str, pl.DataFrame], csv_root: Path, tmp_path: Path
) -> None:
    load_postgres(postgres, cdm, tmp_path / "load")

    summary = import_emr(postgres.url, tmp_path / "root", schema="cdm")

    assert summary.kind == "postgresql"
    assert summary.source == f"{postgres.url} (PostgreSQL, schema cdm)"
    assert summary.rows == {name: cdm[name].height for name in PRESENT}
    assert summary.skipped == ABSENT
    from_csv = snapshot(csv_root)
    got = snapshot(tmp_path / "root")
    assert set(got) == set(from_csv)
    for name, frame in got.items():
        assert_frame_equal(frame, from_csv[name])


def test_missing_required_column(csv_folder: Path, tmp_path: Path) -> None:
    source = tmp_path / "omop"
    source.mkdir()
    for path in csv_folder.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    conditions = source / "CONDITION_OCCURRENCE.csv"
    frame = pl.read_csv(conditions, infer_schema=False).drop("CONDITION_START_DATE")
    frame.write_csv(conditions)

    with pytest.raises(EmrError) as caught:
        import_emr(source, tmp_path / "root")

    assert str(caught.value) == (
        f"condition_occurrence.condition_start_date: required column missing in "
        f"{conditions.resolve()}"
    )
    # Nothing was written: every table is checked before any is stored.
    assert Emr(tmp_path / "root").versions() == dict.fromkeys(EMR_TABLES, None)


def _person_and_conditions(folder: Path, conditions: str) -> Path:
    folder.mkdir()
    (folder / "person.csv").write_text(
        "person_id,gender_concept_id,year_of_birth,race_concept_id,ethnicity_concept_id\n"
        "1,8507,1950,0,0\n2,8532,1961,0,0\n"
    )
    (folder / "condition_occurrence.csv").write_text(
        "condition_occurrence_id,person_id,condition_concept_id,condition_start_date,"
        "condition_type_concept_id\n" + conditions
    )
    return folder


def test_bad_date(tmp_path: Path) -> None:
    source = _person_and_conditions(
        tmp_path / "omop",
        "1,1,4329847,2023-10-01,32817\n2,1,4329847,2023-13-45,32817\n3,2,4329847,2023-02-30,32817\n",
    )
    with pytest.raises(EmrError) as caught:
        import_emr(source, tmp_path / "root")
    message = str(caught.value)
    assert message.startswith("condition_occurrence.condition_start_date: '2023-13-45' in row 2")
    assert "(line 3)" in message
    assert "is not a date" in message
    assert "2 values of the column cannot be read" in message
    assert not Emr(tmp_path / "root").has("person")


def test_bad_integer_and_cli_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _person_and_conditions(tmp_path / "omop", "1,1,4329847,2023-10-01,32817\n")
    (source / "person.csv").write_text(
        "person_id,gender_concept_id,year_of_birth,race_concept_id,ethnicity_concept_id\n"
        "1,8507,1950,0,0\nabc,8532,1961,0,0\n"
    )
    with pytest.raises(EmrError, match=r"^person\.person_id: 'abc' in row 2 \(line 3\) of .*"):
        import_emr(source, tmp_path / "root")

    status = main(["emr", "import", str(source), "--root", str(tmp_path / "root")])

    assert status == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("imgindex emr: error: person.person_id: 'abc' in row 2")


def test_empty_key_and_fractional_id_fail(tmp_path: Path) -> None:
    source = _person_and_conditions(tmp_path / "a", "1,,4329847,2023-10-01,32817\n")
    with pytest.raises(EmrError, match=r"condition_occurrence\.person_id: empty in row 1"):
        import_emr(source, tmp_path / "root")
    source = _person_and_conditions(tmp_path / "b", "1.5,1,4329847,2023-10-01,32817\n")
    with pytest.raises(EmrError, match=r"condition_occurrence_id: '1.5' in row 1"):
        import_emr(source, tmp_path / "root")


def test_values_sources_write_in_other_ways() -> None:
    raw = RawTable(
        "condition_occurrence",
        "test",
        pl.DataFrame(
            {
                "Condition_Occurrence_ID": ["1", " 2 ", "3.0"],
                "PERSON_ID": ["7", "7", "8"],
                "condition_concept_id": ["4329847", "4329847", "0"],
                "condition_start_date": ["2023-10-01", "20231002", "2023-10-03 12:00:00"],
                "condition_start_datetime": [
                    "2023-10-01T10:11:12Z",
                    "2023-10-02 10:11:12.5+02:00",
                    "2023-10-03",
                ],
                "condition_type_concept_id": ["32817", "32817", "32817"],
                "provider_id": ["", None, " "],
                "site_code": ["x", "y", "z"],
            }
        ),
    )
    result = conform_table(raw, TABLE_SPECS["condition_occurrence"])
    frame = result.frame
    assert frame["condition_occurrence_id"].to_list() == [1, 2, 3]
    assert frame["condition_start_date"].to_list() == [
        dt.date(2023, 10, 1),
        dt.date(2023, 10, 2),
        dt.date(2023, 10, 3),
    ]
    # Offsets are converted to UTC; the CDM's datetimes have no zone.
    assert frame["condition_start_datetime"].to_list() == [
        dt.datetime(2023, 10, 1, 10, 11, 12),
        dt.datetime(2023, 10, 2, 8, 11, 12, 500000),
        dt.datetime(2023, 10, 3),
    ]
    assert frame["provider_id"].to_list() == [None, None, None]
    assert result.dropped == ("site_code",)
    assert "condition_end_date" in result.added


def test_event_tables_sorted_with_row_group_statistics(tmp_path: Path) -> None:
    rows = 3 * ROW_GROUP_ROWS + 1000
    rng = np.random.default_rng(3)
    source = tmp_path / "omop"
    source.mkdir()
    pl.DataFrame(
        {
            "person_id": np.arange(1, 1001),
            "gender_concept_id": 8507,
            "year_of_birth": 1950,
            "race_concept_id": 0,
            "ethnicity_concept_id": 0,
        }
    ).write_parquet(source / "person.parquet")
    start = np.datetime64("2020-01-01")
    pl.DataFrame(
        {
            "condition_occurrence_id": rng.permutation(rows) + 1,
            "person_id": rng.integers(1, 1001, rows),
            "condition_concept_id": MI,
            "condition_start_date": start + rng.integers(0, 4 * 365, rows).astype("timedelta64[D]"),
            "condition_type_concept_id": 32817,
        }
    ).write_parquet(source / "condition_occurrence.parquet")

    import_emr(source, tmp_path / "root")

    emr = Emr(tmp_path / "root")
    table = emr.scan("condition_occurrence").collect()
    assert table.height == rows
    assert_frame_equal(table, table.sort(["condition_start_date", "person_id"]))
    files = emr.table("condition_occurrence").files()
    assert len(files) == 1
    metadata = pq.ParquetFile(files[0].removeprefix("file://")).metadata
    assert metadata.num_row_groups == 4
    column = metadata.schema.names.index("condition_start_date")
    ranges = []
    for i in range(metadata.num_row_groups):
        group = metadata.row_group(i)
        assert group.num_rows <= ROW_GROUP_ROWS
        stats = group.column(column).statistics
        assert stats is not None
        assert stats.has_min_max
        ranges.append((stats.min, stats.max))
    # Sorted: row groups cover consecutive, non-overlapping date ranges (ties may touch).
    for (_, high), (low, _) in itertools.pairwise(ranges):
        assert high <= low
    # A one-month window overlaps at most two of the four row groups.
    window = (dt.date(2021, 3, 1), dt.date(2021, 3, 31))
    assert sum(1 for low, high in ranges if low <= window[1] and high >= window[0]) <= 2
    assert set(EVENT_DATE_COLUMNS) == {
        "visit_occurrence",
        "condition_occurrence",
        "procedure_occurrence",
        "drug_exposure",
        "measurement",
        "observation",
    }


def test_reimport_replaces_and_versions_increase(csv_folder: Path, tmp_path: Path) -> None:
    first = import_emr(csv_folder, tmp_path)
    second = import_emr(csv_folder, tmp_path)

    assert second.rows == first.rows
    assert all(second.versions[n] == first.versions[n] + 1 for n in PRESENT)
    emr = Emr(tmp_path)
    for name in PRESENT:
        frame = emr.scan(name).collect()
        assert frame.height == first.rows[name]
        assert frame.select(TABLE_SPECS[name].key).is_unique().all(), name

    only = import_emr(csv_folder, tmp_path, tables=["Condition_Occurrence"])
    assert set(only.rows) == {"condition_occurrence"}
    versions = emr.versions()
    assert versions["condition_occurrence"] == 2
    assert versions["person"] == 1

    with pytest.raises(EmrError, match="no CDM table 'drugs' to import"):
        import_emr(csv_folder, tmp_path, tables=["drugs"])


def test_person_table_is_required(tmp_path: Path) -> None:
    source = tmp_path / "omop"
    source.mkdir()
    (source / "concept_ancestor.csv").write_text(
        "ancestor_concept_id,descendant_concept_id,min_levels_of_separation,"
        "max_levels_of_separation\n1,1,0,0\n"
    )
    with pytest.raises(EmrError, match=r"^person: no person table in .*the person table is"):
        import_emr(source, tmp_path / "root")
    # Importing other tables alone is fine.
    summary = import_emr(source, tmp_path / "root", tables=["concept_ancestor"])
    assert summary.rows == {"concept_ancestor": 1}


def test_sources_that_are_not(tmp_path: Path, cdm: dict[str, pl.DataFrame]) -> None:
    with pytest.raises(EmrError, match="no such folder or file"):
        import_emr(tmp_path / "nowhere", tmp_path / "root")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(EmrError, match="not a DuckDB database"):
        import_emr(text, tmp_path / "root")
    database = write_duckdb({"person": cdm["person"]}, tmp_path / "cdm.duckdb")
    with pytest.raises(EmrError, match=r"no schema 'main' in .*its schemas: cdm"):
        import_emr(database, tmp_path / "root")
    folder = tmp_path / "two"
    folder.mkdir()
    cdm["person"].write_csv(folder / "PERSON.csv")
    cdm["person"].write_parquet(folder / "person.parquet")
    with pytest.raises(EmrError, match="person: two files"):
        import_emr(folder, tmp_path / "root")


def test_links_and_link_report(csv_root: Path, tmp_path: Path) -> None:
    emr = Emr(csv_root)
    links = emr.links().collect()
    assert links.schema == pl.Schema({"PatientID": pl.String, "person_id": pl.Int64})
    # Persons 10, 20, 30, 40 have no person_source_value.
    assert links.height == PERSONS - PERSONS // 10
    assert links.filter(pl.col("person_id") == 7)["PatientID"].to_list() == ["PAT0007"]

    index_root = tmp_path / "index"
    patients = ["PAT0001", "PAT0002", "PAT0003", "PAT0004", "PAT0005", "PAT0010", "ZZ2", "ZZ1"]
    write_index(index_root, patients)
    report = link_report(index_root, emr)

    assert report.index_patients == 8
    assert report.linked == 5
    assert report.unlinked == 3
    assert report.unlinked_examples == ("PAT0010", "ZZ1", "ZZ2")
    assert report.emr_persons == PERSONS
    assert report.persons_without_images == PERSONS - 5
    assert report.via == "person_source_value"
    assert report.describe().splitlines() == [
        (
            "5 of 8 index patients link to an EMR person (through person_source_value); "
            "3 do not, e.g. PAT0010, ZZ1, ZZ2"
        ),
        f"{PERSONS - 5} of {PERSONS} EMR persons have no series in the index",
    ]


def test_crosswalk(csv_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    crosswalk = tmp_path / "crosswalk.csv"
    crosswalk.write_text("PATIENTID,Person_Id\nZZ1,10\nPAT0001 ,1\nPAT0001,1\nORPHAN,999\n")
    root = tmp_path / "root"
    write_index(root, ["ZZ1", "PAT0001", "PAT0002"])

    status = main(
        ["emr", "import", str(csv_folder), "--root", str(root), "--crosswalk", str(crosswalk)]
    )

    assert status == 0
    out = capsys.readouterr().out
    assert "crosswalk" in out
    assert "2 of 3 index patients link to an EMR person (through crosswalk); 1 do not" in out
    assert "warning: crosswalk: 1 rows name a person_id not in the person table (e.g. 999)" in out
    emr = Emr(root)
    links = emr.links().collect().sort("PatientID")
    assert links.to_dicts() == [
        {"PatientID": "ORPHAN", "person_id": 999},
        {"PatientID": "PAT0001", "person_id": 1},
        {"PatientID": "ZZ1", "person_id": 10},
    ]
    report = link_report(root, root)
    assert (report.linked, report.unlinked, report.unlinked_examples) == (2, 1, ("PAT0002",))
    # The orphan links to no person of the EMR, so it counts nowhere.
    assert report.emr_persons == PERSONS
    assert report.persons_without_images == PERSONS - 2

    bad = tmp_path / "bad.csv"
    bad.write_text("PatientID,person\nA,1\n")
    with pytest.raises(EmrError, match=r"^crosswalk\.person_id: required column missing in"):
        import_emr(csv_folder, root, crosswalk=bad)


def test_cli_import_and_status(
    csv_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    write_index(root, ["PAT0001", "NOBODY"])

    assert main(["emr", "import", str(csv_folder), "--root", str(root), "--no-progress"]) == 0

    out = capsys.readouterr().out
    assert f"source       {csv_folder.resolve()}" in out
    assert "CDM version  5.3" in out
    assert f"condition_occurrence   {2 * PERSONS:>12,}        0" in out
    assert "not in the source, skipped: drug_exposure, observation" in out
    assert (
        "1 of 2 index patients link to an EMR person (through person_source_value); 1 do not, e.g. NOBODY"
        in out
    )

    assert main(["emr", "status", "--root", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    person = next(line for line in lines if line.startswith("person "))
    assert person.split()[:3] == ["person", str(PERSONS), "0"]
    assert str(csv_folder.resolve()) in person
    assert next(line for line in lines if line.startswith("drug_exposure")).endswith("not imported")


def test_tables_missing_from_a_later_source_are_kept(
    csv_folder: Path, cdm: dict[str, pl.DataFrame], tmp_path: Path
) -> None:
    import_emr(csv_folder, tmp_path)
    partial = tmp_path / "partial"
    partial.mkdir()
    cdm["person"].write_csv(partial / "person.csv")

    summary = import_emr(partial, tmp_path)

    assert summary.rows == {"person": PERSONS}
    assert "concept: not in the source; the table of an earlier import (version 0) is kept" in (
        summary.warnings
    )
    assert Emr(tmp_path).versions()["concept"] == 0
    assert Emr(tmp_path).versions()["person"] == 1
