"""De-identified exports end to end: a planted identity (tests/imgindex/_deid_helpers.py) and
its EMR rows go through ``imgindex export`` as Zarr, as DICOM and with ``--with-emr``; nothing
identifying comes out, pseudonyms follow the key, intervals survive the date shift, the DICOM
files stay valid, and instances that may show burned-in text are left out."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pydicom
import pytest
from _deid_helpers import PLANTED, STUDY_DATES, write_planted
from _export_helpers import index_folder, write_selection, write_series
from pydicom import config as dicom_config
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pydicom.valuerep import validate_value

from imgindex.deid import Deidentifier
from imgindex.emr.importer import import_emr
from imgindex.export import export, read_manifest
from imgindex.testing import make_series

if TYPE_CHECKING:
    from _deid_helpers import PlantedSet

pytestmark = [
    pytest.mark.filterwarnings("ignore:Object at manifest.parquet:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at emr:UserWarning"),
]

IMGINDEX = str(Path(sys.executable).with_name("imgindex"))
KEY_ONE = "11" * 32
KEY_TWO = "22" * 32
PERSON_ID = 880017
DICOM_ARGS = ("--format", "dicom", "--with-emr")
#: The planted patient's EMR events: myocardial infarction 2 days before the first study,
#: coronary surgery 7 days after it.
EVENTS = {
    "condition_start_date": dt.date(2023, 10, 1),
    "procedure_date": dt.date(2023, 10, 10),
    "visit_start_date": dt.date(2023, 10, 1),
}


def _emr_source(folder: Path) -> Path:
    folder.mkdir(parents=True)
    pl.DataFrame(
        {
            "person_id": [PERSON_ID],
            "gender_concept_id": [8532],
            "year_of_birth": [1961],
            "month_of_birth": [4],
            "day_of_birth": [17],
            "race_concept_id": [0],
            "ethnicity_concept_id": [0],
            "person_source_value": [PLANTED["PatientID"]],
        }
    ).write_parquet(folder / "person.parquet")
    pl.DataFrame(
        {
            "visit_occurrence_id": [7700001],
            "person_id": [PERSON_ID],
            "visit_concept_id": [9201],
            "visit_start_date": [EVENTS["visit_start_date"]],
            "visit_end_date": [dt.date(2023, 10, 14)],
            "visit_type_concept_id": [32817],
            "care_site_id": [4400001],
            "visit_source_value": [PLANTED["InstitutionName"]],
        }
    ).write_parquet(folder / "visit_occurrence.parquet")
    pl.DataFrame(
        {
            "condition_occurrence_id": [6600001],
            "person_id": [PERSON_ID],
            "condition_concept_id": [4329847],
            "condition_start_date": [EVENTS["condition_start_date"]],
            "condition_type_concept_id": [32817],
            "visit_occurrence_id": [7700001],
            "condition_source_value": [f"I21.4 seen by {PLANTED['referring_family']}"],
        }
    ).write_parquet(folder / "condition_occurrence.parquet")
    pl.DataFrame(
        {
            "procedure_occurrence_id": [5500001],
            "person_id": [PERSON_ID],
            "procedure_concept_id": [4336464],
            "procedure_date": [EVENTS["procedure_date"]],
            "procedure_type_concept_id": [32817],
            "visit_occurrence_id": [7700001],
        }
    ).write_parquet(folder / "procedure_occurrence.parquet")
    return folder


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> PlantedSet:
    base = tmp_path_factory.mktemp("deid-export")
    planted = write_planted(base / "in", base / "root")
    import_emr(_emr_source(base / "emr-source"), planted.root)
    return planted


@pytest.fixture(scope="module")
def keys(planted: PlantedSet) -> tuple[Path, Path]:
    one, two = planted.root.parent / "one.key", planted.root.parent / "two.key"
    one.write_text(KEY_ONE + "\n")
    two.write_text(KEY_TWO + "\n")
    return one, two


@pytest.fixture(scope="module")
def selection(planted: PlantedSet) -> Path:
    return write_selection(planted.root.parent / "sel.txt", [s.uid for s in planted.series])


def _export(planted: PlantedSet, selection: Path, name: str, *args: str) -> Path:
    """Run ``imgindex export`` as users do; returns the output."""
    out = planted.root.parent / name
    done = subprocess.run(
        [IMGINDEX, "export", str(selection), "--root", str(planted.root), "--out", str(out),
         "--workers", "1", "--no-progress", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.fixture(scope="module")
def outputs(planted: PlantedSet, selection: Path, keys: tuple[Path, Path]) -> dict[str, Path]:
    one, two = keys
    return {
        "zarr": _export(planted, selection, "a.zarr", "--with-emr", "--deid-key-file", str(one)),
        "dicom": _export(planted, selection, "dicom", *DICOM_ARGS, "--deid-key-file", str(one)),
        "zarr-again": _export(planted, selection, "b.zarr", "--deid-key-file", str(one)),
        "zarr-other-key": _export(planted, selection, "c.zarr", "--deid-key-file", str(two)),
    }


def _texts(out: Path) -> dict[str, str]:
    """Every file of an output as text to search: Parquet by its values (its pages are
    compressed), everything else by its bytes."""
    texts = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        if path.suffix == ".parquet":
            frame = pl.read_parquet(path)
            text = json.dumps(frame.rows(), default=str, ensure_ascii=False)
        else:
            text = path.read_bytes().decode("utf-8", errors="replace")
        texts[str(path.relative_to(out))] = text
    return texts


def _needles(planted: PlantedSet) -> set[str]:
    """Every planted value, the original UIDs and every original date, in the forms they
    could be written in."""
    needles = {v for k, v in PLANTED.items() if len(v) >= 4}
    for series in planted.series:
        needles.update(v for k, v in series.identifiers.items() if "UID" in k)
    dates = [dt.datetime.strptime(d, "%Y%m%d").date() for d in (*STUDY_DATES, "19610417")]
    dates += list(EVENTS.values())
    for day in dates:
        needles.update({day.strftime("%Y%m%d"), day.isoformat()})
    needles.update({str(PERSON_ID), "7700001", "6600001", "5500001", "4400001"})
    return needles


@pytest.mark.parametrize("kind", ["zarr", "dicom"])
def test_the_planted_identity_is_in_no_output(
    planted: PlantedSet, outputs: dict[str, Path], kind: str
) -> None:
    out = outputs[kind]
    texts = _texts(out)
    assert any(name.startswith("emr/") for name in texts)  # --with-emr wrote the rows
    assert "manifest.parquet" in texts
    if kind == "dicom":
        assert sum(name.endswith(".dcm") for name in texts) == 8
    needles = _needles(planted)
    leaks = {name: sorted(n for n in needles if n in text) for name, text in texts.items()}
    assert {name: found for name, found in leaks.items() if found} == {}
    # Case and accents do not hide a name either.
    folded = {"schroder", "lovas", "kovacevic", "wendelinus"}
    for name, text in texts.items():
        plain = text.casefold().replace("ö", "o").replace("ø", "o").replace("č", "c")
        assert not [w for w in folded if w in plain], name


def test_pseudonyms_follow_the_key(planted: PlantedSet, outputs: dict[str, Path]) -> None:
    columns = ["key", "PatientID", "StudyInstanceUID", "SeriesInstanceUID"]
    first = read_manifest(outputs["zarr"]).select(columns).sort("key")
    again = read_manifest(outputs["zarr-again"]).select(columns).sort("key")
    other = read_manifest(outputs["zarr-other-key"]).select(columns).sort("key")
    assert first.equals(again)  # the same key: the same pseudonyms, so exports line up
    for column in columns:
        assert not set(first[column]) & set(other[column]), column
    deid = Deidentifier.from_file(planted.root.parent / "one.key")
    assert set(first["PatientID"]) == {deid.token("PatientID", PLANTED["PatientID"])}
    assert set(first["SeriesInstanceUID"]) == {deid.uid(s.uid) for s in planted.series}
    # The DICOM export and the EMR rows carry the same pseudonyms as the arrays.
    dicom = read_manifest(outputs["dicom"])
    assert set(dicom["PatientID"]) == set(first["PatientID"])
    assert set(dicom["SeriesInstanceUID"]) == set(first["SeriesInstanceUID"])
    person = pl.read_parquet(outputs["zarr"] / "emr" / "person.parquet")
    assert person["PatientID"].to_list() == [deid.token("PatientID", PLANTED["PatientID"])]
    assert person["person_id"].to_list() == [deid.token("person_id", PERSON_ID)]


def test_intervals_survive_the_date_shift(planted: PlantedSet, outputs: dict[str, Path]) -> None:
    deid = Deidentifier.from_file(planted.root.parent / "one.key")
    shift = dt.timedelta(days=deid.shift_days(PLANTED["PatientID"]))
    assert shift.days < 0
    originals = sorted(dt.datetime.strptime(d, "%Y%m%d").date() for d in STUDY_DATES)
    # Arrays: StudyDate and SeriesDate of both series, shifted by the same offset.
    manifest = read_manifest(outputs["zarr"])
    for column in ("StudyDate", "SeriesDate"):
        days = sorted(dt.date.fromisoformat(v) for v in manifest[column])
        assert days == [d + shift for d in originals], column
    # DICOM: every date element of every file, shifted alike.
    dicom_days: set[dt.date] = set()
    for path in outputs["dicom"].rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            dicom_days.add(dt.datetime.strptime(ds[keyword].value, "%Y%m%d").date())
        assert "PatientBirthDate" not in ds or not ds.PatientBirthDate
        assert ds.PatientAge == "062Y"  # Retain Patient Characteristics
    assert dicom_days == {d + shift for d in originals}
    # EMR: the events keep their distance to the studies exactly.
    emr = outputs["zarr"] / "emr"
    condition = pl.read_parquet(emr / "condition_occurrence.parquet")["condition_start_date"][0]
    procedure = pl.read_parquet(emr / "procedure_occurrence.parquet")["procedure_date"][0]
    first_study = originals[0] + shift
    assert condition - first_study == EVENTS["condition_start_date"] - originals[0]
    assert procedure - first_study == EVENTS["procedure_date"] - originals[0]


def _dciodvfy_errors(path: Path) -> set[str]:
    done = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    return {line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")}


def test_dicom_output_is_valid_marked_and_keeps_its_pixels(
    planted: PlantedSet, outputs: dict[str, Path]
) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy is missing: scripts/install installs dicom3tools")
    deid = Deidentifier.from_file(planted.root.parent / "one.key")
    originals = {
        deid.uid(str(ds.SOPInstanceUID)): (path, ds)
        for series in planted.series
        for path in series.files
        for ds in [pydicom.dcmread(path)]
    }
    files = sorted(outputs["dicom"].rglob("*.dcm"))
    assert len(files) == len(originals)
    for path in files:
        ds = pydicom.dcmread(path)
        source_path, source = originals[ds.SOPInstanceUID]
        # Pixels and their encoding untouched.
        assert ds.PixelData == source.PixelData
        assert ds.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        # The de-identification is recorded (PS3.3 C.7.1.1, CID 7050).
        assert ds.PatientIdentityRemoved == "YES"
        codes = {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
        assert codes == {"113100", "113105", "113107", "113108"}
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        # References follow the UIDs they point at.
        assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
        assert ds.FrameOfReferenceUID == deid.uid(str(source.FrameOfReferenceUID))
        # No private element (the list of safe ones is empty) and no planted value.
        assert not [elem for elem in ds if elem.tag.is_private]
        assert ds.SeriesDescription == "CT Thorax Verlauf"  # cleaned, not removed
        # pydicom's own validation of every value the profile left or wrote.
        for elem in ds.iterall():
            if elem.VR in ("SQ", "OB", "OW") or elem.value in (None, ""):
                continue
            values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
            for value in values:
                text = str(value) if elem.VR in ("DS", "IS", "PN") else value
                validate_value(elem.VR, text, dicom_config.RAISE)
        # dciodvfy: nothing the original did not already have.
        assert _dciodvfy_errors(path) - _dciodvfy_errors(source_path) == set()


def test_burned_in_instances_are_left_out_and_listed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    burned = make_series(9301, "CT", 3, 16, 16, BurnedInAnnotation="YES")
    plain = make_series(9302, "CT", 3, 16, 16)
    capture = make_series(9303, "CT", 3, 16, 16)
    for ds in capture:  # a screenshot: Secondary Capture Image Storage
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    for datasets in (burned, plain, capture):
        write_series(tmp_path / "in", datasets)
    index_folder(tmp_path / "in", root)
    uids = [str(s[0].SeriesInstanceUID) for s in (burned, plain, capture)]
    selection = write_selection(tmp_path / "sel.txt", uids)
    summary = export(selection, root, tmp_path / "out.zarr", workers=1)
    assert summary.ok
    assert summary.complete == 1
    excluded = {e.series_uid: e for e in summary.excluded}
    assert set(excluded) == {uids[0], uids[2]}
    assert "BurnedInAnnotation" in excluded[uids[0]].reason
    assert "Secondary Capture" in excluded[uids[2]].reason
    text = summary.describe()
    assert "burned-in" in text
    assert uids[0] in text
    assert uids[2] in text
    assert len(read_manifest(tmp_path / "out.zarr")) == 1
    allowed = export(selection, root, tmp_path / "all.zarr", workers=1, allow_burned_in=True)
    assert allowed.complete == 3
    assert allowed.excluded == []


def _deid_check(path: Path, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [IMGINDEX, "deid-check", str(path), "--root", str(root), *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_deid_check_finds_every_planted_value_only_when_deid_is_off(
    planted: PlantedSet, selection: Path, outputs: dict[str, Path], keys: tuple[Path, Path]
) -> None:
    one = str(keys[0])
    leaky_zarr = _export(planted, selection, "leaky.zarr", "--no-deid", "--with-emr")
    leaky_dicom = _export(planted, selection, "leaky-dicom", "--no-deid", "--format", "dicom")
    found: dict[str, Any] = {}
    for leaky in (leaky_zarr, leaky_dicom):
        done = _deid_check(leaky, planted.root, "--json", "--deid-key-file", one)
        assert done.returncode == 1, done.stdout + done.stderr
        found[leaky.name] = json.loads(done.stdout)
    kinds = {f["kind"] for findings in found.values() for f in findings}
    assert kinds >= {"name", "id", "uid", "date"}
    dicom_locations = {f["location"] for f in found["leaky-dicom"]}
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                    "InstitutionName", "ReferringPhysicianName", "StudyInstanceUID"):  # fmt: skip
        assert any(keyword in location for location in dicom_locations), keyword
    assert any(re.search(r"0011,10", loc) for loc in dicom_locations)  # the private element
    assert any("SeriesDescription" in loc for loc in dicom_locations)  # the name inside text
    zarr_locations = {(f["path"].split("/")[0], f["location"]) for f in found["leaky.zarr"]}
    assert any(path == "emr" for path, _ in zarr_locations)  # the EMR rows
    for kind in ("zarr", "dicom"):
        done = _deid_check(outputs[kind], planted.root, "--deid-key-file", one)
        assert done.returncode == 0, done.stdout + done.stderr
