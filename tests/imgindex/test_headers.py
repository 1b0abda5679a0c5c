"""imgindex.headers.read_header against pydicom, the reference for what a file contains."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any, NoReturn

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from imgindex import headers
from imgindex.errors import DicomReadError
from imgindex.headers import PIXEL_DATA_TAGS, Header, read_header
from imgindex.schema import DEFAULT_ATTRIBUTES
from imgindex.testing import make_patient, make_series, write_dataset

if TYPE_CHECKING:
    from pathlib import Path

    from pydicom.dataelem import DataElement

TAGS = frozenset(a.tag for a in DEFAULT_ATTRIBUTES)
CHARSET = 0x00080005
#: What read_header keeps: the wanted tags and always SpecificCharacterSet.
KEPT = TAGS | {CHARSET}

#: Files pydicom reads without complaint although they are cut short; read_header checks that
#: every element (pixel data included) ends inside the file, so it rejects them as truncated.
TRUNCATED = {
    # Pixel Data (7FE0,0010) OW says 8192 bytes; the file holds 8130 of them.
    "MR_truncated.dcm",
    # Encapsulated JPEG 2000: the file ends inside the fragment, before (FFFE,E0DD).
    "emri_small_jpeg_2k_lossless_too_short.dcm",
    # Beam Sequence (300A,00B0) says 976 bytes; 711 follow. pydicom keeps what it could read.
    "rtplan_truncated.dcm",
}


def has_preamble(path: Path) -> bool:
    with path.open("rb") as fp:
        return fp.read(132)[128:] == b"DICM"


def pydicom_header(path: Path, *, force: bool = False) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about what it tolerates
        return pydicom.dcmread(path, stop_before_pixels=True, force=force)


def as_dataset(header: Header) -> Dataset:
    """The header's elements in a dataset of their own; pydicom converts them on access."""
    return Dataset({BaseTag(tag): elem for tag, elem in header.elements.items()})


def raw_view(elem: Any) -> tuple[Any, ...] | None:
    """Bytes, VR and encoding of a raw (unconverted) element; None once converted."""
    if isinstance(elem, RawDataElement):
        return (elem.value, elem.VR, elem.is_implicit_VR, elem.is_little_endian)
    return None


def differences(header: Header, ds: Dataset) -> list[str]:
    """How ``header`` differs from pydicom's dataset ``ds`` on the kept tags.

    pydicom converts the raw bytes read_header kept, in a dataset of their own, exactly as it
    converts the elements it read itself; the two must give the same VR and value. Where both
    sides are still raw, the bytes must be identical too.
    """
    problems: list[str] = []
    # keys(), not iteration: iterating a Dataset converts its raw elements.
    expected = {int(t) for t in ds.keys()} & KEPT  # noqa: SIM118
    if set(header.elements) != expected:
        extra = sorted(f"{t:08X}" for t in set(header.elements) - expected)
        missing = sorted(f"{t:08X}" for t in expected - set(header.elements))
        problems.append(f"tags differ: extra {extra}, missing {missing}")
    theirs_raw: dict[int, Any] = {t: ds.get_item(t) for t in expected}
    ours = as_dataset(header)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for tag in sorted(expected & set(header.elements)):
            mine, raw = header.elements[tag], theirs_raw[tag]
            mine_raw, their_raw = raw_view(mine), raw_view(raw)
            if mine_raw and their_raw and mine_raw != their_raw:
                problems.append(f"{tag:08X} raw: {mine!r} != {raw!r}")
            a: DataElement = ours[tag]
            b: DataElement = ds[tag]
            if (a.VR, a.value) != (b.VR, b.value):
                problems.append(f"{tag:08X} {b.keyword}: {a.VR} {a.value!r} != {b.VR} {b.value!r}")
    return problems


def has_pixel_data(path: Path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = pydicom.dcmread(path, defer_size=1024)
    return any(tag in full for tag in PIXEL_DATA_TAGS)


def test_agrees_with_pydicom_on_its_test_files(corpus: list[Path]) -> None:
    compared = 0
    problems: list[str] = []
    rejected: dict[str, str] = {}
    for path in corpus:
        if not has_preamble(path):
            continue
        try:
            ds = pydicom_header(path)
        except Exception:  # noqa: BLE001, S112 - not DICOM to pydicom: test_folders covers it
            continue
        try:
            header = read_header(path, TAGS)
        except DicomReadError as exc:
            rejected[path.name] = exc.reason
            continue
        compared += 1
        problems += [f"{path.name}: {p}" for p in differences(header, ds)]
        ts = ds.file_meta.get("TransferSyntaxUID")
        if header.transfer_syntax != (str(ts) if ts else None):
            problems.append(f"{path.name}: transfer syntax {header.transfer_syntax} != {ts}")
        media = ds.file_meta.get("MediaStorageSOPClassUID")
        if header.media_sop_class != (str(media) if media else None):
            problems.append(f"{path.name}: media SOP class {header.media_sop_class} != {media}")
        if header.has_pixel_data != has_pixel_data(path):
            problems.append(f"{path.name}: has_pixel_data is {header.has_pixel_data}")
    assert not problems, "\n".join(problems)
    assert rejected == dict.fromkeys(TRUNCATED, "truncated")
    assert compared > 200


# -- malformed files ------------------------------------------------------------------------


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
def test_malformed_files_give_their_reason(
    malformed: dict[str, Path], kind: str, reason: str
) -> None:
    with pytest.raises(DicomReadError) as info:
        read_header(malformed[kind], TAGS)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("truncated_header", "truncated"),
        ("truncated_pixels", "truncated"),
        ("truncated_encapsulated", "truncated"),
        ("not_dicom", "not_dicom"),
        ("not_dicom_png", "not_dicom"),
        ("empty", "empty"),
    ],
)
def test_force_still_rejects_what_is_not_dicom(
    malformed: dict[str, Path], kind: str, reason: str
) -> None:
    with pytest.raises(DicomReadError) as info:
        read_header(malformed[kind], TAGS, force=True)
    assert info.value.reason == reason


def test_no_preamble_reads_with_force(malformed: dict[str, Path]) -> None:
    path = malformed["no_preamble"]
    header = read_header(path, TAGS, force=True)
    assert header.transfer_syntax is None
    assert header.has_pixel_data
    assert 0x00080018 in header.elements
    assert differences(header, pydicom_header(path, force=True)) == []


@pytest.mark.parametrize(
    "kind", ["missing_sop_uid", "missing_study_uid", "bad_date", "odd_length", "unknown_tags"]
)
def test_readable_malformed_files_agree_with_pydicom(malformed: dict[str, Path], kind: str) -> None:
    header = read_header(malformed[kind], TAGS)
    assert header.has_pixel_data
    assert differences(header, pydicom_header(malformed[kind])) == []


def test_missing_uid_is_absent_not_empty(malformed: dict[str, Path]) -> None:
    assert 0x00080018 not in read_header(malformed["missing_sop_uid"], TAGS).elements
    assert 0x0020000D not in read_header(malformed["missing_study_uid"], TAGS).elements


# -- structure the fast path walks ---------------------------------------------------------


def _undefined(item: Dataset) -> Dataset:
    item.is_undefined_length_sequence_item = True
    return item


def nested_sequences(transfer_syntax: str) -> Dataset:
    """A CT slice with undefined-length sequences, items and private sequences, nested."""
    ds = make_series(11, "CT", 1, transfer_syntax=transfer_syntax)[0]
    instance = _undefined(Dataset())
    instance.ReferencedSOPClassUID = ds.SOPClassUID
    instance.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    series = _undefined(Dataset())
    series.SeriesInstanceUID = ds.SeriesInstanceUID
    series.ReferencedInstanceSequence = DicomSequence([instance])
    series["ReferencedInstanceSequence"].is_undefined_length = True
    defined = Dataset()  # a defined-length item among undefined-length ones
    defined.StudyInstanceUID = ds.StudyInstanceUID
    ds.ReferencedSeriesSequence = DicomSequence([series, defined, _undefined(Dataset())])
    ds["ReferencedSeriesSequence"].is_undefined_length = True
    block = ds.private_block(0x0009, "NESTING TEST", create=True)
    inner = _undefined(Dataset())
    inner.add_new(0x00090010, "LO", "NESTING TEST")
    inner.add_new(0x00091002, "SQ", DicomSequence([_undefined(Dataset())]))
    inner[0x00091002].is_undefined_length = True
    block.add_new(0x01, "SQ", DicomSequence([inner]))
    ds[0x00091001].is_undefined_length = True
    return ds


@pytest.fixture
def fast_path_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if read_header hands the file to pydicom instead of walking it itself."""

    def fallback(*args: Any, **kwargs: Any) -> NoReturn:
        raise AssertionError("read_header fell back to pydicom")

    monkeypatch.setattr(headers, "_read_with_pydicom", fallback)


@pytest.mark.usefixtures("fast_path_only")
@pytest.mark.parametrize(
    "transfer_syntax",
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
    ids=["explicit", "implicit"],
)
def test_undefined_length_nested_sequences(tmp_path: Path, transfer_syntax: str) -> None:
    path = tmp_path / "nested.dcm"
    write_dataset(nested_sequences(transfer_syntax), path)
    data = path.read_bytes()
    # The file really uses undefined lengths: sequence and item tags followed by FFFFFFFF.
    assert data.count(b"\xfe\xff\x00\xe0\xff\xff\xff\xff") >= 4
    assert data.count(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00") >= 4  # sequence delimiters
    header = read_header(path, TAGS)
    assert header.transfer_syntax == transfer_syntax
    assert header.has_pixel_data
    # Attributes after the sequences (group 0010 onwards) are found.
    assert {0x00100010, 0x0020000E, 0x00280010} <= set(header.elements)
    implicit = transfer_syntax == ImplicitVRLittleEndian
    for elem in header.elements.values():
        assert isinstance(elem, RawDataElement)
        assert elem.is_implicit_VR == implicit
    assert differences(header, pydicom_header(path)) == []


@pytest.mark.usefixtures("fast_path_only")
def test_only_wanted_tags_and_the_character_set(tmp_path: Path) -> None:
    patient = next(p for p in map(make_patient, range(200)) if p.SpecificCharacterSet)
    path = tmp_path / "one"
    write_dataset(make_series(5, patient=patient, n_instances=1)[0], path)
    header = read_header(path, {0x00100010})
    assert set(header.elements) == {0x00100010, CHARSET}
    assert header.size_bytes == path.stat().st_size
    assert as_dataset(header).PatientName == patient.PatientName


def test_pixel_data_beyond_the_first_window(tmp_path: Path) -> None:
    # 256 x 256 x 2 bytes: the pixel data ends far past the 64 KiB first read.
    path = tmp_path / "big"
    write_dataset(make_series(6, n_instances=1, rows=256, cols=256)[0], path)
    assert path.stat().st_size > 2 * 64 * 1024
    assert read_header(path, TAGS).has_pixel_data
    with path.open("r+b") as fp:
        fp.truncate(path.stat().st_size - 1)
    with pytest.raises(DicomReadError) as info:
        read_header(path, TAGS)
    assert info.value.reason == "truncated"


def test_unreadable_paths(tmp_path: Path) -> None:
    broken = tmp_path / "broken-link"
    os.symlink(tmp_path / "nowhere", broken)
    for path in (broken, tmp_path):  # a link to nothing, and a folder
        with pytest.raises(DicomReadError) as info:
            read_header(path, TAGS)
        assert info.value.reason == "unreadable"
