"""``imgindex select`` and list cohorts: the file written, its provenance, rebuilding it.

The semantics of each criterion are checked against DuckDB in test_cohort_reference.py;
these tests are about what surrounds them.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgindex import Cohort
from imgindex.cli import main
from imgindex.cohort import read_selection, select
from imgindex.cohort.mi_cdm import IMAGE_OCCURRENCE_SCHEMA
from imgindex.errors import CohortError
from imgindex.index import Index
from storage import Table

D = dt.date
IMGINDEX = str(Path(sys.executable).parent / "imgindex")
COHORT = """\
name: tiny
codesets:
  mi: {concepts: [4329847], descendants: true}
entry: {domain: condition, codeset: mi, dates: {from: 2023-10-01, to: 2023-10-10}}
inclusion:
  - {name: pci, domain: procedure, codeset: {concepts: [4216130]}, after: [7, 14]}
imaging: {modality: CT, after: [0, 30]}
"""


def _emr(root: Path, name: str, key: list[str], **columns: pa.Array) -> None:
    Table(root / "emr" / name, key).overwrite(pa.table(columns))


def _series(root: Path, rows: list[dict[str, object]]) -> None:
    schema = Index(root).empty("series").schema
    table = pa.table(
        {f.name: pa.array([r.get(f.name) for r in rows], f.type) for f in schema}, schema=schema
    )
    Table(root / "tables" / "series", ["SeriesInstanceUID"]).upsert(table)
    studies = pa.table(
        {
            "StudyInstanceUID": [r["StudyInstanceUID"] for r in rows],
            "AccessionNumber": [r.get("AccessionNumber") for r in rows],
            "StudyDate": pa.array([r.get("StudyDate") for r in rows], pa.date32()),
        }
    )
    Table(root / "tables" / "studies", ["StudyInstanceUID"]).upsert(studies)


def _series_row(patient: str, uid: str, day: dt.date | None, **extra: object) -> dict[str, object]:
    row: dict[str, object] = {
        "PatientID": patient,
        "StudyInstanceUID": f"{uid}.0",
        "SeriesInstanceUID": uid,
        "Modality": "CT",
        "instance_count": 40,
        "StudyDate": day,
        "imaging_date": day,
        "AccessionNumber": f"A{uid}",
    }
    row.update(extra)
    return row


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    i64 = pa.int64()
    _emr(
        root,
        "person",
        ["person_id"],
        person_id=pa.array([1, 2, 3], i64),
        gender_concept_id=pa.array([8507, 8532, 8507], i64),
        year_of_birth=pa.array([1950, 1960, 1970], i64),
        person_source_value=pa.array(["P1", "P2", "P3"]),
    )
    _emr(
        root,
        "condition_occurrence",
        ["condition_occurrence_id"],
        condition_occurrence_id=pa.array([1, 2, 3], i64),
        person_id=pa.array([1, 2, 3], i64),
        condition_concept_id=pa.array([312327, 4329847, 4329847], i64),
        condition_start_date=pa.array([D(2023, 10, 2), D(2023, 10, 5), D(2023, 10, 9)]),
        condition_source_value=pa.array(["I21.4", "I21.9", "I21.0"]),
    )
    _emr(
        root,
        "procedure_occurrence",
        ["procedure_occurrence_id"],
        procedure_occurrence_id=pa.array([1, 2, 3], i64),
        person_id=pa.array([1, 2, 3], i64),
        procedure_concept_id=pa.array([4216130] * 3, i64),
        procedure_date=pa.array([D(2023, 10, 9), D(2023, 10, 19), D(2023, 10, 30)]),
        procedure_source_value=pa.array(["92928"] * 3),
    )
    _emr(
        root,
        "concept_ancestor",
        ["ancestor_concept_id", "descendant_concept_id"],
        ancestor_concept_id=pa.array([4329847, 4329847], i64),
        descendant_concept_id=pa.array([4329847, 312327], i64),
        min_levels_of_separation=pa.array([0, 1], i64),
        max_levels_of_separation=pa.array([0, 1], i64),
    )
    _emr(
        root,
        "concept",
        ["concept_id"],
        concept_id=pa.array([9001], i64),
        concept_name=pa.array(["Computed Tomography"]),
        vocabulary_id=pa.array(["DICOM"]),
        concept_code=pa.array(["CT"]),
    )
    _series(
        root,
        [
            _series_row("P1", "1.1", D(2023, 10, 2)),
            _series_row("P1", "1.2", D(2023, 11, 1)),  # day 30
            _series_row("P1", "1.3", D(2023, 11, 2)),  # day 31
            _series_row("P2", "2.1", D(2023, 10, 6), Modality="MR"),
            _series_row("P2", "2.2", D(2023, 10, 6)),
            _series_row("P3", "3.1", D(2023, 10, 10)),  # P3's procedure is 21 days on
        ],
    )
    return root


@pytest.fixture
def cohort_file(tmp_path: Path) -> Path:
    path = tmp_path / "cohorts" / "tiny.yaml"
    path.parent.mkdir()
    path.write_text(COHORT, encoding="utf-8")
    return path


def test_select_writes_the_series_with_their_provenance(
    root: Path, cohort_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sel.parquet"
    assert main(["select", str(cohort_file), "--root", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "inclusion: pci" in printed
    assert "3 series of 2 patients selected" in printed

    table, info = read_selection(out)
    rows = sorted(
        (r["PatientID"], r["SeriesInstanceUID"], r["days_from_index"], r["pci_days"])
        for r in table.to_pylist()
    )
    assert rows == [("P1", "1.1", 0, 7), ("P1", "1.2", 30, 7), ("P2", "2.2", 1, 14)]
    assert set(table.column("cohort_sha256").to_pylist()) == {info["sha256"]}
    assert info["sha256"] == Cohort.from_yaml(cohort_file).sha256()
    assert info["cohort"]["name"] == "tiny"
    assert info["versions"] == {
        "emr.concept_ancestor": 0,
        "emr.condition_occurrence": 0,
        "emr.person": 0,
        "emr.procedure_occurrence": 0,
        "index.series": 0,
        "index.studies": 0,
    }
    attrition = {line.split()[0] for line in printed.splitlines()[2:7]}
    assert {"entry", "inclusion:", "linked", "with"} <= attrition


def test_as_of_rebuilds_a_selection_after_the_index_grew(
    root: Path, cohort_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "first.parquet"
    assert main(["select", str(cohort_file), "--root", str(root), "--out", str(out)]) == 0
    _series(root, [_series_row("P2", "2.3", D(2023, 10, 20))])
    again = tmp_path / "again.parquet"
    now = tmp_path / "now.parquet"
    assert main(["select", str(cohort_file), "--root", str(root), "--out", str(now)]) == 0
    assert (
        main(
            [
                "select",
                str(cohort_file),
                "--root",
                str(root),
                "--out",
                str(again),
                "--as-of",
                str(out),
            ]
        )
        == 0
    )
    first, first_info = read_selection(out)
    rebuilt, rebuilt_info = read_selection(again)
    current, current_info = read_selection(now)
    assert rebuilt.to_pylist() == first.to_pylist()
    assert rebuilt_info["versions"] == first_info["versions"]
    assert current.num_rows == first.num_rows + 1
    assert current_info["versions"]["index.series"] == 1


def test_image_occurrence_rows(root: Path, cohort_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "sel.parquet"
    args = ["select", str(cohort_file), "--root", str(root), "--out", str(out)]
    assert main([*args, "--as", "image_occurrence"]) == 0
    rows = pq.read_table(tmp_path / "sel.image_occurrence.parquet")
    assert rows.schema == IMAGE_OCCURRENCE_SCHEMA
    assert sorted(rows.column("image_series_uid").to_pylist()) == ["1.1", "1.2", "2.2"]
    assert set(rows.column("modality_concept_id").to_pylist()) == {9001}
    ids = rows.column("image_occurrence_id").to_pylist()
    assert len(set(ids)) == 3
    assert all(i > 0 for i in ids)
    # The same series get the same ids in another export.
    assert main([*args, "--as", "image_occurrence"]) == 0
    assert (
        pq.read_table(tmp_path / "sel.image_occurrence.parquet")
        .column("image_occurrence_id")
        .to_pylist()
        == ids
    )


def test_a_missing_emr_table_is_a_clear_error(tmp_path: Path, cohort_file: Path) -> None:
    root = tmp_path / "empty"
    _series(root, [_series_row("P1", "1.1", D(2023, 10, 2))])
    with pytest.raises(
        CohortError, match=r"descendants: true` needs the table .*emr/concept_ancestor"
    ):
        select(Cohort.from_yaml(cohort_file), root)
    result = subprocess.run(
        [IMGINDEX, "select", str(cohort_file), "--root", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "imgindex select: error:" in result.stderr
    assert "imgindex emr import" in result.stderr


@pytest.mark.parametrize(
    ("csv", "expected"),
    [
        # PatientID with a window: P1's series from 2023-10-01 to 2023-10-31, day 0 = from.
        ("PatientID,from,to\nP1,2023-10-01,2023-10-31\n", [("1.1", D(2023, 10, 1), 1)]),
        # PatientID alone: all of the patient's series, each its own day 0.
        ("patientid\nP2\n", [("2.1", D(2023, 10, 6), 0), ("2.2", D(2023, 10, 6), 0)]),
        # An accession: that study's series, day 0 = the study's date.
        ("AccessionNumber\nA1.3\n", [("1.3", D(2023, 11, 2), 0)]),
        # A study with an entry date given.
        ("StudyInstanceUID,entry_date\n3.1.0,20231001\n", [("3.1", D(2023, 10, 1), 9)]),
        # Unknown identifiers select nothing, and are counted.
        ("PatientID\nNOBODY\n", []),
    ],
)
def test_list_cohorts(root: Path, tmp_path: Path, csv: str, expected: list[object]) -> None:
    listing = tmp_path / "list.csv"
    listing.write_text(csv, encoding="utf-8")
    cohort_path = tmp_path / "cohorts" / "mine.yaml"
    assert main(["cohort", "from-list", str(listing), "--out", str(cohort_path)]) == 0
    assert "list: ../list.csv" in cohort_path.read_text(encoding="utf-8")
    selection = select(Cohort.from_yaml(cohort_path), root)
    got = sorted(
        (r["SeriesInstanceUID"], r["entry_date"], r["days_from_index"])
        for r in selection.table.to_pylist()
    )
    assert got == expected
    steps = selection.attrition.column("step").to_pylist()
    assert steps == ["list rows", "found in the index", "with matching imaging"]
    assert selection.attrition.column("entry_events").to_pylist()[0] == 1


def test_list_cohorts_take_emr_criteria_for_linked_patients(root: Path, tmp_path: Path) -> None:
    listing = tmp_path / "list.csv"
    listing.write_text("PatientID,from,to\nP1,2023-10-02,\nP3,2023-10-09,\nP9,,\n")
    cohort_path = tmp_path / "c.yaml"
    cohort_path.write_text(
        "name: listed\nentry: {list: list.csv}\n"
        "inclusion:\n  - {name: pci, domain: procedure, codeset: {concepts: [4216130]},"
        " after: [0, 10]}\nimaging: {days: [0, 0]}\n"
    )
    selection = select(Cohort.from_yaml(cohort_path), root)
    assert [r["SeriesInstanceUID"] for r in selection.table.to_pylist()] == ["1.1"]
    counts = dict(
        zip(
            selection.attrition.column("step").to_pylist(),
            selection.attrition.column("persons").to_pylist(),
            strict=True,
        )
    )
    assert counts["list rows"] == 3
    assert counts["linked to an EMR person"] == 2
    assert counts["inclusion: pci"] == 1


@pytest.mark.parametrize(
    ("csv", "words"),
    [
        ("name\nx\n", "needs exactly one of the columns PatientID"),
        ("PatientID,AccessionNumber\nP1,A\n", "needs exactly one of the columns"),
        ("PatientID,from\nP1,2023-10-01\nP2,yesterday\n", "row 3: column 'from' holds 'yesterday'"),
    ],
)
def test_bad_lists_are_refused_with_the_row(tmp_path: Path, csv: str, words: str) -> None:
    listing = tmp_path / "list.csv"
    listing.write_text(csv, encoding="utf-8")
    with pytest.raises(CohortError) as caught:
        main(["--debug", "cohort", "from-list", str(listing), "--out", str(tmp_path / "c.yaml")])
    assert words in str(caught.value)


def test_selection_is_sorted_and_typed(root: Path, cohort_file: Path) -> None:
    selection = select(Cohort.from_yaml(cohort_file), root)
    frame = pl.from_arrow(selection.table)
    assert isinstance(frame, pl.DataFrame)
    assert frame.schema["entry_date"] == pl.Date
    assert frame.schema["days_from_index"] == pl.Int64
    assert frame["SeriesInstanceUID"].to_list() == ["1.1", "1.2", "2.2"]
    assert json.loads(json.dumps(selection.versions)) == selection.versions


def test_entry_dates_can_be_replaced_from_the_command_line(
    root: Path, cohort_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "late.parquet"
    args = ["select", str(cohort_file), "--root", str(root), "--out", str(out)]
    assert main([*args, "--entry-from", "2023-10-04"]) == 0
    table, info = read_selection(out)
    assert sorted(table.column("SeriesInstanceUID").to_pylist()) == ["2.2"]
    assert info["cohort"]["entry"]["dates"] == {"from": "2023-10-04", "to": "2023-10-10"}
    assert info["sha256"] != Cohort.from_yaml(cohort_file).sha256()
    with pytest.raises(CohortError, match=r"`from` \(2023-10-24\) is after `to`"):
        main(["--debug", *args, "--entry-from", "2023-10-24"])
