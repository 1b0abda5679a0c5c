"""``imgindex deid-check``: a leaky export is caught, a de-identified one passes."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pydicom
import pytest
from _deid_helpers import PLANTED, SERIES_DESCRIPTION, PlantedSet, write_planted

from imgindex.deid import Deidentifier
from imgindex.deid.check import check_export, mask
from imgindex.emr.importer import import_emr

if TYPE_CHECKING:
    from imgindex.deid.check import CheckReport

IMGINDEX = str(Path(sys.executable).parent / "imgindex")

#: Elements that identify the planted patient, removed from the clean DICOM file.
_REMOVED = (
    "PatientName",
    "PatientBirthDate",
    "OtherPatientIDs",
    "PatientAddress",
    "AccessionNumber",
    "InstitutionName",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "StationName",
    "OperatorsName",
    "StudyID",
    "StudyDescription",
)
_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> PlantedSet:
    base = tmp_path_factory.mktemp("deid_check")
    return write_planted(base / "in", base / "root")


def _first_file(planted: PlantedSet) -> pydicom.Dataset:
    return pydicom.dcmread(planted.series[0].files[0])


def _write_array(folder: Path, attributes: dict[str, Any]) -> None:
    """A Zarr v3 group with one array (its metadata only, and a chunk file of bytes)."""
    folder.mkdir(parents=True)
    (folder / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}), encoding="utf-8"
    )
    array = folder / "a0"
    (array / "c" / "0" / "0").mkdir(parents=True)
    (array / "c" / "0" / "0" / "0").write_bytes(PLANTED["PatientID"].encode() * 4)
    meta = {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [4, 16, 16],
        "data_type": "uint16",
        "dimension_names": ["z", "y", "x"],
        "attributes": attributes,
    }
    (array / "zarr.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")


def _leaky(planted: PlantedSet, folder: Path) -> Path:
    ids = planted.series[0].identifiers
    _write_array(
        folder,
        {
            "PatientID": PLANTED["PatientID"],
            "PatientName": PLANTED["PatientName"],
            "StudyInstanceUID": ids["StudyInstanceUID"],
            "StudyDate": "2023-10-03",
            "SeriesDescription": SERIES_DESCRIPTION,
            "Modality": "CT",
            "spacing": [1.25, 31.25, 31.25],
        },
    )
    pl.DataFrame(
        {"key": ["a0"], "PatientID": [PLANTED["PatientID"]], "Modality": ["CT"]}
    ).write_parquet(folder / "manifest.parquet")
    (folder / "dicom").mkdir()
    shutil.copy(planted.series[0].files[0], folder / "dicom" / "IM00001.dcm")
    return folder


def _clean(planted: PlantedSet, folder: Path) -> Path:
    deid = Deidentifier.for_root(planted.root)
    pid = PLANTED["PatientID"]
    token = deid.token("PatientID", pid)
    ids = planted.series[0].identifiers
    shifted = deid.shift_date(dt.date(2023, 10, 3), pid)
    _write_array(
        folder,
        {
            "PatientID": token,
            "StudyInstanceUID": deid.uid(ids["StudyInstanceUID"]),
            "SeriesInstanceUID": deid.uid(ids["SeriesInstanceUID"]),
            "StudyDate": shifted.isoformat(),
            "SeriesDescription": "CT Thorax Verlauf",
            "Modality": "CT",
            "spacing": [1.25, 31.25, 31.25],
        },
    )
    pl.DataFrame(
        {"key": ["a0"], "PatientID": [token], "StudyDate": [shifted], "Modality": ["CT"]}
    ).write_parquet(folder / "manifest.parquet")

    ds = _first_file(planted)
    for keyword in _REMOVED:
        delattr(ds, keyword)
    ds.remove_private_tags()
    ds.PatientID = token
    ds.SeriesDescription = "CT Thorax Verlauf"
    for keyword in _UIDS:
        setattr(ds, keyword, deid.uid(str(ds[keyword].value)))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for item in ds.ReferencedImageSequence:
        item.ReferencedSOPInstanceUID = deid.uid(str(item.ReferencedSOPInstanceUID))
    for elem in ds:
        if elem.VR in ("DA", "DT") and elem.value:
            text = str(elem.value)
            day = dt.datetime.strptime(text[:8], "%Y%m%d").date()
            elem.value = deid.shift_date(day, pid).strftime("%Y%m%d") + text[8:]
    target = folder / token / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
    target.mkdir(parents=True)
    ds.save_as(target / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return folder


def _where(report: CheckReport, kind: str) -> set[tuple[str, str]]:
    return {(f.path, f.location) for f in report.findings if f.kind == kind}


def test_a_leaky_export_is_caught_everywhere(planted: PlantedSet, tmp_path: Path) -> None:
    export = _leaky(planted, tmp_path / "leaky")
    report = check_export(export, planted.root)

    assert not report.ok
    assert report.files == {"json": 2, "parquet": 1, "dicom": 1, "skipped": 1}
    assert report.records == {"json": 2, "parquet": 1, "dicom": 1}
    assert report.linked_patients == 1
    assert {f.kind for f in report.findings} == {"name", "id", "uid", "date", "text"}
    dcm = "dicom/IM00001.dcm"
    names = _where(report, "name")
    assert ("a0/zarr.json", "PatientName") in names
    assert {
        (dcm, "PatientName"),
        (dcm, "ReferringPhysicianName"),
        (dcm, "ReferringPhysicianIdentificationSequence[0].PersonName"),
        (dcm, "InstitutionName"),
        (dcm, "StationName"),
    } <= names
    ids = _where(report, "id")
    assert {
        ("a0/zarr.json", "PatientID"),
        ("manifest.parquet", "PatientID"),
        (dcm, "PatientID"),
        (dcm, "AccessionNumber"),
        (dcm, "StudyID"),
        (dcm, "(0011,1002)"),  # the private element holding the PatientID
    } <= ids
    uids = _where(report, "uid")
    assert ("a0/zarr.json", "StudyInstanceUID") in uids
    assert {
        (dcm, "StudyInstanceUID"),
        (dcm, "SeriesInstanceUID"),
        (dcm, "SOPInstanceUID"),
        (dcm, "FrameOfReferenceUID"),
        (dcm, "MediaStorageSOPInstanceUID"),
        (dcm, "ReferencedImageSequence[0].ReferencedSOPInstanceUID"),
    } <= uids
    dates = {(f.path, f.location): f for f in report.findings if f.kind == "date"}
    assert ("a0/zarr.json", "StudyDate") in dates
    assert {
        (dcm, k) for k in ("StudyDate", "SeriesDate", "ContentDate", "PatientBirthDate")
    } <= set(dates)
    assert "PatientBirthDate" in dates[dcm, "PatientBirthDate"].detail
    texts = {(f.path, f.location): f for f in report.findings if f.kind == "text"}
    assert {
        ("a0/zarr.json", "SeriesDescription"),
        (dcm, "SeriesDescription"),
        (dcm, "StudyDescription"),  # "Thorax Zoë"
        (dcm, "(0011,1001)"),  # the private element holding the whole name
    } <= set(texts)
    assert texts["a0/zarr.json", "SeriesDescription"].matched == PLANTED["family_name"]
    assert texts["a0/zarr.json", "SeriesDescription"].value == "S*******-L****"
    # the chunk file holds the PatientID's bytes but is pixel data: not read
    assert not any("/c/" in f.path for f in report.findings)


def test_accents_and_case_do_not_hide_a_name(planted: PlantedSet, tmp_path: Path) -> None:
    export = tmp_path / "upper"
    _write_array(export, {"SeriesDescription": "CT THORAX SCHRODER LOVAS", "Comment": "zoe"})
    report = check_export(export, planted.root)
    # nothing links the record to a patient: every patient's names are searched, and said so
    assert any("names of every index patient" in line for line in report.not_run)
    found = {(f.location, f.matched) for f in report.findings}
    assert found == {("SeriesDescription", "SCHRODER LOVAS"), ("Comment", "zoe")}


def test_a_deidentified_export_passes(planted: PlantedSet, tmp_path: Path) -> None:
    export = _clean(planted, tmp_path / "clean")
    report = check_export(export, planted.root)
    assert report.findings == []
    assert report.files["dicom"] == 1
    assert report.linked_patients == 1  # through the key: the dates were checked
    assert not any(line.startswith("dates") for line in report.not_run)

    other = check_export(export, planted.root, deid=Deidentifier(b"x" * 32))
    assert other.findings == []
    assert other.linked_patients == 0
    assert any(line.startswith("dates") for line in other.not_run)


def test_emr_rows_are_linked_by_raw_and_pseudonymized_person_id(tmp_path: Path) -> None:
    planted = write_planted(tmp_path / "in", tmp_path / "root")
    source = tmp_path / "omop"
    source.mkdir()
    person = 4242
    birth = dt.datetime.strptime(PLANTED["PatientBirthDate"], "%Y%m%d").date()
    pl.DataFrame(
        {
            "person_id": [person],
            "gender_concept_id": [8532],
            "year_of_birth": [birth.year],
            "month_of_birth": [birth.month],
            "day_of_birth": [birth.day],
            "race_concept_id": [0],
            "ethnicity_concept_id": [0],
            "person_source_value": [PLANTED["PatientID"]],
        }
    ).write_parquet(source / "person.parquet")
    visit = dt.date(2023, 9, 30)
    pl.DataFrame(
        {
            "visit_occurrence_id": [1],
            "person_id": [person],
            "visit_concept_id": [9201],
            "visit_start_date": [visit],
            "visit_end_date": [visit],
            "visit_type_concept_id": [32817],
        }
    ).write_parquet(source / "visit_occurrence.parquet")
    import_emr(source, planted.root)
    deid = Deidentifier.for_root(planted.root)
    shift = dt.timedelta(days=deid.shift_days(PLANTED["PatientID"]))

    export = tmp_path / "export" / "emr"
    export.mkdir(parents=True)
    token = deid.token("person_id", person)
    pl.DataFrame(
        {
            "person_id": [token, str(person)],
            "visit_start_date": [visit, visit + shift],  # the first was not shifted
            "visit_end_date": [visit + shift, visit + shift],
        }
    ).write_parquet(export / "visit_occurrence.parquet")
    pl.DataFrame(
        {
            "person_id": [token],
            "PatientID": [deid.token("PatientID", PLANTED["PatientID"])],
            "birth_datetime": [dt.datetime.combine(birth, dt.time(0, 0))],  # not shifted
        }
    ).write_parquet(export / "person.parquet")

    report = check_export(export.parent, planted.root)
    found = {(f.path, f.location, f.kind): f for f in report.findings}
    assert set(found) == {
        ("emr/visit_occurrence.parquet", "person_id", "id"),  # the raw person_id
        ("emr/visit_occurrence.parquet", "visit_start_date", "date"),
        ("emr/person.parquet", "birth_datetime", "date"),
    }
    assert found["emr/visit_occurrence.parquet", "person_id", "id"].matched == str(person)
    assert found["emr/visit_occurrence.parquet", "visit_start_date", "date"].matched == str(visit)
    assert (
        "visit_start_date"
        in found["emr/visit_occurrence.parquet", "visit_start_date", "date"].detail
    )
    assert report.records["parquet"] == 3


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [IMGINDEX, "deid-check", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_exit_codes_and_masking(planted: PlantedSet, tmp_path: Path) -> None:
    leaky = _leaky(planted, tmp_path / "leaky")
    clean = _clean(planted, tmp_path / "clean")
    family = PLANTED["family_name"]

    found = _cli(leaky, "--root", planted.root)
    assert found.returncode == 1, found.stderr
    assert "name" in found.stdout
    assert "uid" in found.stdout
    assert mask(family) in found.stdout
    assert family not in found.stdout
    assert PLANTED["PatientID"] not in found.stdout
    assert len(found.stdout.splitlines()) <= 60

    shown = _cli(leaky, "--root", planted.root, "--show-values")
    assert shown.returncode == 1
    assert family in shown.stdout

    as_json = _cli(leaky, "--root", planted.root, "--json")
    assert as_json.returncode == 1
    rows = json.loads(as_json.stdout)
    assert {row["kind"] for row in rows} == {"name", "id", "uid", "date", "text"}
    assert all(family not in row["value"] for row in rows)

    passed = _cli(clean, "--root", planted.root)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "no findings" in passed.stdout

    missing = _cli(tmp_path / "nowhere", "--root", planted.root)
    assert missing.returncode == 2
    assert len(missing.stderr.strip().splitlines()) == 1
    assert "nowhere" in missing.stderr

    no_index = _cli(clean, "--root", tmp_path / "empty-root")
    assert no_index.returncode == 2
    assert "no index" in no_index.stderr
