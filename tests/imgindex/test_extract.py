"""imgindex.extract: typed rows from DICOM files, and the rejects of what does not parse."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import pwd
import shutil
import stat
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pydicom
import pytest
from pydicom.multival import MultiValue

from imgindex.extract import REJECT_REASONS, Extractor
from imgindex.schema import DEFAULT_ATTRIBUTES, REJECT_SCHEMA, attributes_for, instance_schema
from imgindex.testing import make_patient, make_series, write_dataset
from imgindex.testing.malformed import BAD_STUDY_DATE, ODD_LENGTH_VALUE

if TYPE_CHECKING:
    from collections.abc import Iterator
    from multiprocessing.queues import Queue

    from imgindex.extract import Extraction
    from imgindex.schema import Attribute

NOW = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def extract(path: Path, **kwargs: Any) -> Extraction:
    return Extractor(source="test", **kwargs).extract_file(path, indexed_at=NOW)


def written(tmp_path: Path, seed: int = 1, name: str = "file.dcm", **kwargs: Any) -> Path:
    path = tmp_path / name
    write_dataset(make_series(seed, n_instances=1, **kwargs)[0], path)
    return path


def read(path: Path, *, force: bool = False) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=True, force=force)


# -- typed values -----------------------------------------------------------------------------


def test_values_are_typed(tmp_path: Path) -> None:
    path = written(tmp_path, ContentTime="101010.5")
    ds = read(path)
    result = extract(path)
    assert result.rejects == []
    row = result.row
    assert row is not None
    assert row["StudyDate"] == dt.datetime.strptime(ds.StudyDate, "%Y%m%d").date()
    hh, mm, ss = ds.StudyTime[:2], ds.StudyTime[2:4], ds.StudyTime[4:6]
    assert row["StudyTime"] == f"{hh}:{mm}:{ss}"
    assert row["ContentTime"] == "10:10:10.500000"
    assert row["PixelSpacing"] == [float(v) for v in ds.PixelSpacing]
    assert row["ImagePositionPatient"] == [float(v) for v in ds.ImagePositionPatient]
    assert len(row["ImageOrientationPatient"]) == 6
    assert row["SliceThickness"] == float(ds.SliceThickness)
    assert row["WindowCenter"] == [float(ds.WindowCenter)]
    assert row["RescaleIntercept"] == -1024.0
    assert row["InstanceNumber"] == 1
    assert row["SeriesNumber"] == int(ds.SeriesNumber)
    assert (row["Rows"], row["Columns"], row["BitsAllocated"]) == (16, 16, 16)
    assert row["ImageType"] == list(ds.ImageType)
    assert row["PatientAge"] == ds.PatientAge
    assert row["Modality"] == "CT"
    assert row["SOPInstanceUID"] == ds.SOPInstanceUID
    assert "NumberOfFrames" not in row  # absent from the file: null in the table
    assert row["TransferSyntaxUID"] == ds.file_meta.TransferSyntaxUID
    assert row["source"] == "test"
    assert row["location"] == path.absolute().as_uri()
    assert row["size_bytes"] == path.stat().st_size
    assert row["indexed_at"] == NOW
    # The row fits the table's schema as it is.
    schema = instance_schema()
    table = pa.Table.from_pylist([row], schema)
    assert table.schema.field("StudyDate").type == pa.date32()
    assert table.schema.field("PixelSpacing").type == pa.list_(pa.float64())
    assert table.schema.field("InstanceNumber").type == pa.int64()
    assert table.to_pylist() == [{name: row.get(name) for name in schema.names}]


def test_date_times_drop_their_offset(tmp_path: Path) -> None:
    path = written(tmp_path, AcquisitionDateTime="20200102030405.123456+0100")
    row = extract(path, attributes=attributes_for(("AcquisitionDateTime",))).row
    assert row is not None
    assert row["AcquisitionDateTime"] == dt.datetime(2020, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)


def first_patient(charset: str) -> int:
    return next(
        seed
        for seed in range(1000)
        if make_patient(seed).SpecificCharacterSet == charset
        and not make_patient(seed).PatientName.isascii()
    )


@pytest.mark.parametrize("charset", ["ISO_IR 192", "ISO_IR 100"])
def test_person_names_decode(tmp_path: Path, charset: str) -> None:
    patient = make_patient(first_patient(charset))
    path = written(tmp_path, patient=patient)
    # The bytes on disk are in the declared character set.
    codec = {"ISO_IR 192": "utf-8", "ISO_IR 100": "latin-1"}[charset]
    assert patient.PatientName.encode(codec) in path.read_bytes()
    row = extract(path).row
    assert row is not None
    assert row["PatientName"] == patient.PatientName
    assert row["SpecificCharacterSet"] == [charset]  # VM 1-n: a list column


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("chrH31.dcm", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        ("chrH32.dcm", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),
        ("chrI2.dcm", "Hong^Gildong=洪^吉洞=홍^길동"),
        ("chrKoreanMulti.dcm", "김희중"),
        # The file ends the name with an empty third group: 'Wang^XiaoDong=王^小東='.
        ("chrX1.dcm", "Wang^XiaoDong=王^小東"),
    ],
)
def test_person_names_with_code_extensions(
    pydicom_charset_files: Path, name: str, expected: str
) -> None:
    # ISO 2022 escapes switch character sets inside a value (PS3.5 6.1.2.5).
    row = extract(pydicom_charset_files / name).row
    assert row is not None
    assert row["PatientName"] == expected == str(read(pydicom_charset_files / name).PatientName)


def reference_value(attr: Attribute, value: Any) -> Any:
    """What a column must hold for pydicom's ``value``, computed independently."""
    values = list(value) if isinstance(value, MultiValue | list) else [value]
    out: list[Any] = []
    for v in values:
        if v is None or v == "":
            continue
        if attr.vr == "DA":
            out.append(dt.datetime.strptime(str(v).replace(".", ""), "%Y%m%d").date())
        elif attr.vr in ("IS", "US", "SS", "UL", "SL"):
            out.append(int(v))
        elif attr.vr in ("DS", "FL", "FD"):
            out.append(float(v))
        elif attr.vr == "TM":
            whole, _, fraction = str(v).replace(":", "").strip().partition(".")
            whole = whole.ljust(6, "0")
            micro = int((fraction + "000000")[:6]) if fraction else 0
            seconds = min(int(whole[4:6]), 59)
            out.append(dt.time(int(whole[:2]), int(whole[2:4]), seconds, micro).isoformat())
        else:
            out.append(str(v).strip(" \x00"))
    if attr.multi:
        return out or None
    return out[0] if out else None


#: Values in pydicom's test files that do not parse for their VR: the column is null and a
#: ``bad_value`` reject names them.
BAD_VALUES = {("badVR.dcm", "NumberOfFrames", "1A")}


def test_rows_agree_with_pydicom_values(corpus: list[Path]) -> None:
    extractor = Extractor(source="test")
    problems: list[str] = []
    bad_values: set[tuple[str, str, str]] = set()
    rows = 0
    for path in corpus:
        result = extractor.extract_file(path, indexed_at=NOW)
        bad_values |= {
            (path.name, r["keyword"], r["value"])
            for r in result.rejects
            if r["reason"] == "bad_value"
        }
        if result.row is None:
            continue
        rows += 1
        ds = read(path, force=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for attr in DEFAULT_ATTRIBUTES:
                if (path.name, attr.keyword) in {(f, k) for f, k, _ in BAD_VALUES}:
                    assert result.row[attr.keyword] is None
                    continue
                expected = reference_value(attr, ds.get(attr.keyword))
                if result.row.get(attr.keyword) != expected:
                    problems.append(
                        f"{path.name} {attr.keyword}: {result.row.get(attr.keyword)!r} != "
                        f"{expected!r}"
                    )
    assert not problems, "\n".join(problems)
    assert bad_values == BAD_VALUES
    assert rows > 200


# -- rejects ---------------------------------------------------------------------------------


def test_bad_date_is_null_and_one_reject(malformed: dict[str, Path]) -> None:
    path = malformed["bad_date"]
    result = extract(path)
    assert result.row is not None
    assert result.row["StudyDate"] is None
    assert isinstance(result.row["SeriesDate"], dt.date)  # the other dates parse
    [reject] = result.rejects
    assert reject["level"] == "value"
    assert reject["reason"] == "bad_value"
    assert reject["keyword"] == "StudyDate"
    assert reject["tag"] == "(0008,0020)"
    assert reject["value"] == BAD_STUDY_DATE
    assert "StudyDate (0008,0020)" in reject["message"]
    assert reject["SOPInstanceUID"] == result.row["SOPInstanceUID"]
    assert reject["location"] == result.row["location"]
    assert pa.Table.from_pylist(result.rejects, REJECT_SCHEMA).num_rows == 1


def test_an_integer_beyond_int64_is_a_bad_value_not_a_failed_batch(tmp_path: Path) -> None:
    ds = make_series(3, "CT", 1, 8, 8)[0]
    ds.AcquisitionNumber = "9" * 12  # IS allows 12 characters; this one fits int64
    path = tmp_path / "big.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the length; that is the point
        ds.SeriesNumber = "99999999999999999999"  # over-long: beyond int64
        write_dataset(ds, path)
    result = extract(path)
    assert result.row is not None
    assert result.row["AcquisitionNumber"] == 999_999_999_999
    assert result.row["SeriesNumber"] is None
    assert [r["keyword"] for r in result.rejects] == ["SeriesNumber"]
    assert "int64" in result.rejects[0]["message"]
    assert pa.Table.from_pylist([result.row], instance_schema()).num_rows == 1


@pytest.mark.parametrize(
    ("kind", "missing"),
    [("missing_sop_uid", "SOPInstanceUID"), ("missing_study_uid", "StudyInstanceUID")],
)
def test_missing_uid_rejects_the_file(malformed: dict[str, Path], kind: str, missing: str) -> None:
    path = malformed[kind]
    result = extract(path)
    assert result.row is None
    [reject] = result.rejects
    assert (reject["level"], reason := reject["reason"]) == ("file", "missing_uid")
    assert reason in REJECT_REASONS
    assert reject["message"] == f"missing or empty: {missing}"
    assert reject["SOPInstanceUID"] == read(path).get("SOPInstanceUID")
    assert reject["size_bytes"] == path.stat().st_size


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("truncated_header", "truncated"),
        ("truncated_pixels", "truncated"),
        ("truncated_encapsulated", "truncated"),
        ("no_preamble", "no_preamble"),
        ("not_dicom", "no_preamble"),
        ("not_dicom_png", "no_preamble"),
        ("empty", "empty"),
    ],
)
def test_unreadable_files_become_one_reject(
    malformed: dict[str, Path], kind: str, reason: str
) -> None:
    path = malformed[kind]
    result = extract(path)
    assert result.row is None
    [reject] = result.rejects
    assert (reject["level"], reject["reason"]) == ("file", reason)
    assert reject["location"] == path.absolute().as_uri()
    assert reject["size_bytes"] == path.stat().st_size == result.size_bytes
    assert reject["indexed_at"] == NOW
    assert reject["source"] == "test"


def test_force_indexes_files_without_preamble(malformed: dict[str, Path]) -> None:
    path = malformed["no_preamble"]
    row = extract(path, force=True).row
    assert row is not None
    ds = read(path, force=True)
    assert row["SOPInstanceUID"] == ds.SOPInstanceUID
    assert row["StudyDate"] == dt.datetime.strptime(ds.StudyDate, "%Y%m%d").date()
    assert row["TransferSyntaxUID"] is None


@pytest.mark.parametrize("kind", ["unknown_tags", "odd_length"])
def test_unusual_but_valid_files_are_indexed(malformed: dict[str, Path], kind: str) -> None:
    result = extract(malformed[kind])
    assert result.rejects == []
    assert result.row is not None
    ds = read(malformed[kind])
    assert result.row["SOPInstanceUID"] == ds.SOPInstanceUID
    assert result.row["Rows"] == ds.Rows
    if kind == "odd_length":
        assert result.row["StudyDescription"] == ODD_LENGTH_VALUE


def test_reject_ids_are_stable(malformed: dict[str, Path]) -> None:
    path = malformed["empty"]
    first = extract(path).rejects[0]["reject_id"]
    assert extract(path).rejects[0]["reject_id"] == first
    elsewhere = Extractor(source="test").extract_file(path, location="file:///elsewhere")
    assert elsewhere.rejects[0]["location"] == "file:///elsewhere"
    assert elsewhere.rejects[0]["reject_id"] != first


# -- files the operating system refuses ------------------------------------------------------


def test_broken_link_is_unreadable(tmp_path: Path) -> None:
    link = tmp_path / "link.dcm"
    os.symlink(tmp_path / "gone.dcm", link)
    result = extract(link)
    assert result.row is None
    [reject] = result.rejects
    assert reject["reason"] == "unreadable"
    assert reject["location"] == link.absolute().as_uri()
    assert reject["size_bytes"] is None


def _extract_as_nobody(paths: list[str], results: Queue[Any]) -> None:
    """Run in a child process: drop root for ``nobody``, then extract ``paths``."""
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
    extractor = Extractor(source="test")
    outcome: list[Any] = [os.geteuid()]
    for path in paths:
        result = extractor.extract_file(path)
        outcome.append("row" if result.row else result.rejects[0]["reason"])
    results.put(outcome)


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder others may enter (pytest's tmp_path is private to its owner)."""
    folder = Path(tempfile.mkdtemp(prefix="imgindex-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def test_file_without_read_permission_is_unreadable(shared_folder: Path) -> None:
    readable = written(shared_folder, name="readable.dcm")
    secret = written(shared_folder, name="secret.dcm")
    readable.chmod(0o644)
    secret.chmod(0)
    assert stat.S_IMODE(secret.stat().st_mode) == 0
    paths = [str(readable), str(secret)]
    if os.geteuid() == 0:
        # root reads whatever the mode says: extract as nobody in a child process.
        context = multiprocessing.get_context("spawn")
        results: Queue[Any] = context.Queue()
        child = context.Process(target=_extract_as_nobody, args=(paths, results))
        child.start()
        outcome = results.get(timeout=120)
        child.join(timeout=60)
        assert child.exitcode == 0
        assert outcome[0] == pwd.getpwnam("nobody").pw_uid
        assert outcome[1:] == ["row", "unreadable"]
    else:
        extractor = Extractor(source="test")
        assert extractor.extract_file(readable).row is not None
        [reject] = extractor.extract_file(secret).rejects
        assert reject["reason"] == "unreadable"
        assert reject["size_bytes"] == secret.stat().st_size
