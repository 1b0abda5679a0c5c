"""Tests of imgindex.testing: factories, the hospital writer, malformed files, the CLI."""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
from collections import Counter
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import generate_frames, parse_basic_offsets
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)

import imgindex.testing
from imgindex.testing import (
    MALFORMED_KINDS,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    HospitalSummary,
    dataset_to_bytes,
    make_multiframe,
    make_patient,
    make_patient_studies,
    make_secondary_capture,
    make_series,
    make_study,
    write_and_read_dataset,
    write_ct_series,
    write_dataset,
    write_hospital,
    write_malformed_files,
)
from imgindex.testing.malformed import (
    BAD_STUDY_DATE,
    ODD_LENGTH_VALUE,
    ORPHAN_PRIVATE_TAG,
    OTHER_PRIVATE_CREATOR,
    UNKNOWN_PUBLIC_TAGS,
)

if TYPE_CHECKING:
    from types import ModuleType

    from pydicom.dataset import Dataset

REPO = Path(__file__).resolve().parents[2]


def assert_same_elements(
    original: Dataset, read: Dataset, *, private_as_bytes: bool = False
) -> None:
    """Assert that `read` holds every element of `original` with the same value.

    With `private_as_bytes` (Implicit VR read without a private dictionary),
    private elements must come back as UN bytes that start with the encoded value.
    """
    assert set(read.keys()) == set(original.keys())
    for elem in original:
        got = read[elem.tag]
        if elem.tag.is_private and private_as_bytes and not elem.tag.is_private_creator:
            assert got.VR == "UN"
            raw = elem.value if isinstance(elem.value, bytes) else str(elem.value).encode()
            assert got.value[: len(raw)] == raw, elem.tag
            continue
        if elem.VR == "SQ":
            assert isinstance(got.value, DicomSequence)
            assert len(got.value) == len(elem.value)
            for item, read_item in zip(elem.value, got.value, strict=True):
                assert_same_elements(item, read_item)
            continue
        value = list(elem.value) if isinstance(elem.value, MultiValue) else elem.value
        got_value = list(got.value) if isinstance(got.value, MultiValue) else got.value
        assert got_value == value, f"{elem.tag} {elem.keyword}: {got_value!r} != {value!r}"


def reference_pixels(seed: int, **kwargs: Any) -> np.ndarray[Any, Any]:
    """Pixels of the uncompressed series of `seed`: the array any encoding must give."""
    return np.stack([ds.pixel_array for ds in make_series(seed, **kwargs)])


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- public surface -------------------------------------------------------------------


def test_exported_members() -> None:
    assert imgindex.testing.__all__ == [
        "COMPRESSED_TRANSFER_SYNTAXES",
        "MALFORMED_KINDS",
        "MI_CAD_CT",
        "PRIVATE_CREATOR",
        "PRIVATE_GROUP",
        "SUPPORTED_TRANSFER_SYNTAXES",
        "CohortQuestion",
        "HospitalSummary",
        "Patient",
        "SeriesPlan",
        "Study",
        "StudyPlan",
        "World",
        "dataset_to_bytes",
        "generate_world",
        "iter_planned_series",
        "iter_series",
        "make_multiframe",
        "make_patient",
        "make_patient_studies",
        "make_secondary_capture",
        "make_series",
        "make_study",
        "make_study_info",
        "plan_patient_studies",
        "plan_study",
        "reference_duckdb",
        "reference_polars",
        "write_and_read_dataset",
        "write_ct_series",
        "write_dataset",
        "write_hospital",
        "write_malformed_files",
        "write_omop_csv",
        "write_omop_tables",
        "write_series_index",
        "write_world",
    ]
    for name in imgindex.testing.__all__:
        assert hasattr(imgindex.testing, name), name


# -- transfer syntaxes ------------------------------------------------------------------


def test_explicit_vr_round_trip() -> None:
    series = make_series(1, "CT", n_instances=2, rows=16, cols=20)
    for ds in series:
        data = dataset_to_bytes(ds)
        assert data[128:132] == b"DICM"
        read = dcmread(BytesIO(data))
        assert read.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert read.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert read.file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert read.original_encoding == (False, True)
        assert_same_elements(ds, read)
        np.testing.assert_array_equal(read.pixel_array, ds.pixel_array)
        assert read.pixel_array.shape == (16, 20)
        # A realistic header: over 100 elements, 2-4 KB before Pixel Data.
        assert len(ds) > 100
        assert 2_000 < len(data) - 16 * 20 * 2 < 4_500


def test_implicit_vr_round_trip() -> None:
    ds = make_series(2, "MR", n_instances=1, transfer_syntax=ImplicitVRLittleEndian)[0]
    read = write_and_read_dataset(ds)
    assert read.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert read.original_encoding == (True, True)
    assert read.SOPClassUID == MRImageStorage
    assert_same_elements(ds, read, private_as_bytes=True)
    np.testing.assert_array_equal(
        read.pixel_array, reference_pixels(2, modality="MR", n_instances=1)[0]
    )


def test_rle_lossless_round_trip() -> None:
    series = make_series(3, "CT", n_instances=3, rows=32, cols=32, transfer_syntax=RLELossless)
    expected = reference_pixels(3, modality="CT", n_instances=3, rows=32, cols=32)
    for ds, pixels in zip(series, expected, strict=True):
        read = write_and_read_dataset(ds)
        assert read.file_meta.TransferSyntaxUID == RLELossless
        # RLE header (PS3.5 G.5): little endian segment count, 2 for 16-bit samples.
        frame = next(generate_frames(read.PixelData, number_of_frames=1))
        assert int.from_bytes(frame[:4], "little") == 2
        np.testing.assert_array_equal(read.pixel_array, pixels)
        assert_same_elements(ds, read)


def test_jpeg2000_lossless_round_trip() -> None:
    series = make_series(4, "CT", n_instances=2, rows=32, cols=32, transfer_syntax=JPEG2000Lossless)
    expected = reference_pixels(4, modality="CT", n_instances=2, rows=32, cols=32)
    for ds, pixels in zip(series, expected, strict=True):
        read = write_and_read_dataset(ds)
        assert read.file_meta.TransferSyntaxUID == JPEG2000Lossless
        frame = next(generate_frames(read.PixelData, number_of_frames=1))
        assert frame[:4] == b"\xff\x4f\xff\x51"  # J2K codestream: SOC then SIZ
        np.testing.assert_array_equal(read.pixel_array, pixels)


def test_unsupported_transfer_syntax_is_refused() -> None:
    # JPEG-LS needs pyjpegls, which is not a dependency.
    with pytest.raises(ValueError, match="transfer_syntax must be one of"):
        make_series(5, transfer_syntax=JPEGLSLossless)
    # openjpeg cannot encode below 32 x 32; the factory says so before trying.
    with pytest.raises(ValueError, match="JPEG 2000 needs rows and cols of at least 32"):
        make_series(5, rows=16, cols=64, transfer_syntax=JPEG2000Lossless)


# -- other object types ------------------------------------------------------------------


def test_multiframe_native_and_compressed() -> None:
    native = make_multiframe(6, n_frames=5, rows=16, cols=24)
    compressed = make_multiframe(6, n_frames=5, rows=16, cols=24, transfer_syntax=RLELossless)
    read_native = write_and_read_dataset(native)
    read_compressed = write_and_read_dataset(compressed)
    for read in (read_native, read_compressed):
        assert read.SOPClassUID == MultiFrameGrayscaleWordSecondaryCaptureImageStorage
        assert read.NumberOfFrames == 5
        assert read.FrameIncrementPointer == 0x00182005
        assert len(read.SliceLocationVector) == 5
        assert read.pixel_array.shape == (5, 16, 24)
    assert_same_elements(native, read_native)
    np.testing.assert_array_equal(read_compressed.pixel_array, read_native.pixel_array)
    assert len(parse_basic_offsets(read_compressed.PixelData)) == 5  # one offset per frame
    assert len(list(generate_frames(read_compressed.PixelData, number_of_frames=5))) == 5
    frames = read_native.pixel_array
    assert not np.array_equal(frames[0], frames[1])


def test_secondary_capture_rgb() -> None:
    ds = make_secondary_capture(7, burned_in_annotation=True)
    read = write_and_read_dataset(ds)
    assert read.SOPClassUID == SecondaryCaptureImageStorage
    assert read.PhotometricInterpretation == "RGB"
    assert (read.SamplesPerPixel, read.PlanarConfiguration, read.BitsAllocated) == (3, 0, 8)
    assert read.ConversionType == "WSD"
    assert read.BurnedInAnnotation == "YES"
    assert read.pixel_array.shape == (64, 64, 3)
    assert read.pixel_array.dtype == np.uint8
    assert_same_elements(ds, read)
    burned = Counter(make_secondary_capture(seed).BurnedInAnnotation for seed in range(30))
    assert burned["YES"] > 0
    assert burned["NO"] > 0
    compressed = write_and_read_dataset(
        make_secondary_capture(7, burned_in_annotation=True, transfer_syntax=RLELossless)
    )
    np.testing.assert_array_equal(compressed.pixel_array, read.pixel_array)


def test_private_block() -> None:
    ds = make_series(8, n_instances=1)[0]
    read = write_and_read_dataset(ds)
    block = read.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    assert read[PRIVATE_GROUP, 0x0010].value == PRIVATE_CREATOR
    assert block[0x01].VR == "LO"
    assert block[0x01].value == "IMGINDEX SYNTHETIC"
    assert block[0x02].VR == "DS"
    assert block[0x04].VR == "OB"
    assert len(block[0x04].value) >= 300
    assert block[0x04].value == ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[0x04].value


def test_unknown_and_private_tags_are_indexable(tmp_path: Path) -> None:
    path = write_malformed_files(tmp_path)["unknown_tags"]
    ds = dcmread(path)
    assert ds.SOPInstanceUID
    assert ds.StudyInstanceUID
    assert ds.pixel_array.shape == (32, 32)
    block = ds.private_block(0x0011, OTHER_PRIVATE_CREATOR)
    assert block[0x01].value == "ACME RECON V2"
    assert block[0x02].value == 42
    assert block[0x04].value[0][0x00111010].value == "NESTED"
    assert ds[ORPHAN_PRIVATE_TAG].value == "NO CREATOR"
    for tag, (vr, value) in UNKNOWN_PUBLIC_TAGS.items():
        elem = ds[tag]
        assert not elem.tag.is_private
        assert (elem.VR, elem.value) == (vr, value)
    # What an indexer does: metadata only, by keyword.
    header = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "Modality"])
    assert header.Modality == "CT"


# -- patients, names and overrides ---------------------------------------------------------


def test_non_ascii_patient_names_round_trip() -> None:
    patients = [make_patient(seed) for seed in range(200)]
    non_ascii = [p for p in patients if not p.PatientName.isascii()]
    assert 0.15 < len(non_ascii) / len(patients) < 0.35
    charsets = {p.SpecificCharacterSet for p in non_ascii}
    assert charsets == {"ISO_IR 192", "ISO_IR 100"}
    codec = {"ISO_IR 192": "utf-8", "ISO_IR 100": "latin-1"}
    checked = set()
    for patient in non_ascii:
        assert patient.SpecificCharacterSet is not None
        if patient.PatientName in checked:
            continue
        checked.add(patient.PatientName)
        ds = make_series(1, n_instances=1, patient=patient)[0]
        data = dataset_to_bytes(ds)
        assert patient.PatientName.encode(codec[patient.SpecificCharacterSet]) in data
        read = dcmread(BytesIO(data))
        assert read.SpecificCharacterSet == patient.SpecificCharacterSet
        assert str(read.PatientName) == patient.PatientName
    assert "홍^길동" in checked


def test_missing_type1_attribute_via_overrides() -> None:
    series = make_series(9, n_instances=2, SOPInstanceUID=None, SeriesDescription="OVERRIDDEN")
    for ds in series:
        assert "SOPInstanceUID" not in ds
        read = write_and_read_dataset(ds)
        assert "SOPInstanceUID" not in read
        assert read.SeriesDescription == "OVERRIDDEN"
    with pytest.raises(ValueError, match="not a DICOM keyword"):
        make_series(9, NotAKeyword=1)


# -- geometry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_geometry_is_consistent(modality: str) -> None:
    tilted = 0
    for seed in range(12):
        series = [write_and_read_dataset(ds) for ds in make_series(seed, modality, n_instances=4)]
        orientation = np.array(series[0].ImageOrientationPatient, dtype=float)
        row, column = orientation[:3], orientation[3:]
        assert np.linalg.norm(row) == pytest.approx(1, abs=1e-9)
        assert np.linalg.norm(column) == pytest.approx(1, abs=1e-9)
        assert row @ column == pytest.approx(0, abs=1e-9)
        normal = np.cross(row, column)
        spacing = float(series[0].SpacingBetweenSlices)
        positions = np.array([ds.ImagePositionPatient for ds in series], dtype=float)
        steps = np.diff(positions, axis=0)
        for step in steps:
            # Each step is +/- spacing along the normal, with nothing across it.
            assert abs(step @ normal) == pytest.approx(spacing, abs=1e-4)
            assert np.linalg.norm(step - (step @ normal) * normal) == pytest.approx(0, abs=1e-4)
        assert len({np.sign(step @ normal) for step in steps}) == 1
        for ds, position in zip(series, positions, strict=True):
            assert float(ds.SliceLocation) == pytest.approx(position @ normal, abs=1e-4)
            assert ds.FrameOfReferenceUID == series[0].FrameOfReferenceUID
        assert [ds.InstanceNumber for ds in series] == [1, 2, 3, 4]
        assert len({ds.SOPInstanceUID for ds in series}) == 4
        pixels = [ds.pixel_array for ds in series]
        assert not np.array_equal(pixels[0], pixels[1])
        tilted += not np.allclose(np.abs(normal), np.round(np.abs(normal)))
    assert 0 < tilted < 12  # some oblique series, mostly not


# -- determinism ------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes() -> None:
    def encode_all(seed: int) -> list[bytes]:
        datasets = [
            *make_series(seed, "CT", n_instances=2),
            *make_series(seed, "MR", n_instances=2, transfer_syntax=RLELossless),
            make_multiframe(seed),
            make_secondary_capture(seed),
            *[ds for series in make_study(seed) for ds in series],
        ]
        return [dataset_to_bytes(ds) for ds in datasets]

    assert encode_all(11) == encode_all(11)
    first, other = make_series(11, n_instances=2), make_series(12, n_instances=2)
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert {ds[key].value for ds in first}.isdisjoint({ds[key].value for ds in other})
    assert first[0].PatientID != other[0].PatientID


def test_study_and_patient_studies() -> None:
    patient = make_patient(13)
    studies = make_patient_studies(13, patient, n_studies=3)
    assert len(studies) == 3
    dates = []
    series_uids: set[str] = set()
    study_level = (
        "StudyInstanceUID",
        "AccessionNumber",
        "StudyDate",
        "PatientAge",
        "PatientWeight",
    )
    for study in studies:
        assert len(study) >= 2
        for keyword in study_level:
            assert len({str(ds[keyword].value) for series in study for ds in series}) == 1
        images = [ds for series in study for ds in series if ds.Modality in ("CT", "MR")]
        assert len({(ds.FrameOfReferenceUID, ds.Manufacturer) for ds in images}) == 1
        for series in study:
            assert len({ds.SeriesInstanceUID for ds in series}) == 1
            series_uids.add(series[0].SeriesInstanceUID)
            assert {ds.PatientID for ds in series} == {patient.PatientID}
        dates.append(study[0][0].StudyDate)
    assert dates == sorted(dates)
    assert len(set(dates)) == 3
    assert len(series_uids) == sum(len(study) for study in studies)
    # Across seeds, studies hold CT, MR and the extra objects.
    classes = {ds.SOPClassUID for seed in range(12) for series in make_study(seed) for ds in series}
    assert {CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage} <= classes
    assert MultiFrameGrayscaleWordSecondaryCaptureImageStorage in classes


# -- hospital -----------------------------------------------------------------------------------


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> HospitalSummary:
    return write_hospital(
        tmp_path_factory.mktemp("hospital") / "export", seed=3, target_bytes=3_000_000, ct_size=64
    )


def test_write_hospital_summary_matches_disk(hospital: HospitalSummary) -> None:
    files = [path for path in hospital.out_dir.rglob("*") if path.is_file()]
    assert len(files) == hospital.files == hospital.instances
    total = sum(path.stat().st_size for path in files)
    assert total == hospital.bytes
    assert 3_000_000 <= total < 3_000_000 + 200_000
    headers = [(path, dcmread(path, stop_before_pixels=True)) for path in files]
    assert len({ds.PatientID for _, ds in headers}) == hospital.patients
    assert len({ds.StudyInstanceUID for _, ds in headers}) == hospital.studies
    assert len({ds.SeriesInstanceUID for _, ds in headers}) == hospital.series
    assert len({ds.SOPInstanceUID for _, ds in headers}) == hospital.instances
    assert Counter(ds.Modality for _, ds in headers) == hospital.instances_per_modality
    syntaxes = Counter(ds.file_meta.TransferSyntaxUID for _, ds in headers)
    assert syntaxes == hospital.instances_per_transfer_syntax
    assert hospital.patients > 1
    assert hospital.studies > hospital.patients
    assert {"CT", "MR"} <= set(hospital.instances_per_modality)
    assert set(syntaxes) >= {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
    for path, ds in headers:
        relative = path.relative_to(hospital.out_dir)
        assert relative.parts[:3] == (
            ds.PatientID,
            f"{ds.StudyDate}_{ds.AccessionNumber}",
            f"{ds.SeriesNumber}_{ds.Modality}",
        )
        assert relative.name in {f"IM{ds.InstanceNumber:05d}", f"IM{ds.InstanceNumber:05d}.dcm"}
        if ds.Modality != "OT":
            assert (ds.Rows, ds.Columns) == (64, 64)
    assert {path.suffix for path in files} == {"", ".dcm"}


def test_write_hospital_is_the_same_with_workers(hospital: HospitalSummary, tmp_path: Path) -> None:
    parallel = write_hospital(
        tmp_path / "export", seed=3, target_bytes=3_000_000, ct_size=64, workers=2
    )
    assert parallel.bytes == hospital.bytes
    assert parallel.instances_per_transfer_syntax == hospital.instances_per_transfer_syntax
    assert _tree_digest(parallel.out_dir) == _tree_digest(hospital.out_dir)


def test_write_hospital_refuses_a_non_empty_directory(hospital: HospitalSummary) -> None:
    with pytest.raises(FileExistsError, match="not empty"):
        write_hospital(hospital.out_dir, target_bytes=1_000, ct_size=16)


def test_write_ct_series(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "ct", seed=14, n_slices=3, size=48)
    assert [path.name for path in paths] == ["IM00001", "IM00002", "IM00003"]
    datasets = [dcmread(path) for path in paths]
    assert [ds.InstanceNumber for ds in datasets] == [1, 2, 3]
    assert all(ds.pixel_array.shape == (48, 48) for ds in datasets)
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1


def test_gen_dicom_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gen_dicom = load_script("gen_dicom")
    assert gen_dicom.parse_size("200MB") == 200_000_000
    assert gen_dicom.parse_size("1.5gib") == 1_610_612_736
    assert gen_dicom.parse_size("512") == 512
    out = tmp_path / "out"
    assert gen_dicom.main([str(out), "--size", "300KB", "--ct-size", "32", "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    files = [path for path in out.rglob("*") if path.is_file()]
    assert f"files: {len(files)}" in printed
    assert sum(path.stat().st_size for path in files) >= 300_000
    assert gen_dicom.main([str(out), "--size", "1MB"]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gen_dicom.main([str(tmp_path / "other"), "--size", "12 parsecs"])


# -- malformed files ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def malformed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_malformed_files(tmp_path_factory.mktemp("malformed"), seed=1)


def test_malformed_kinds_are_all_written(malformed: dict[str, Path]) -> None:
    assert tuple(malformed) == MALFORMED_KINDS
    assert all(path.is_file() and path.name == kind for kind, path in malformed.items())
    assert set(MALFORMED_KINDS) >= {
        "truncated_header", "truncated_pixels", "truncated_encapsulated", "no_preamble",
        "not_dicom", "empty", "missing_sop_uid", "missing_study_uid", "bad_date",
        "odd_length", "unknown_tags",
    }  # fmt: skip


def test_malformed_truncated_header(malformed: dict[str, Path]) -> None:
    ds = dcmread(malformed["truncated_header"])  # no error: pydicom stops at the cut
    assert ds.SOPInstanceUID
    assert ds.SeriesInstanceUID
    assert "ImagePositionPatient" in ds
    for keyword in ("ImageOrientationPatient", "Rows", "Columns", "PixelData"):
        assert keyword not in ds


def test_malformed_truncated_pixels(malformed: dict[str, Path]) -> None:
    ds = dcmread(malformed["truncated_pixels"])
    assert len(ds.PixelData) < ds.Rows * ds.Columns * 2
    with pytest.raises(ValueError, match="less than expected"):
        _ = ds.pixel_array
    header = dcmread(malformed["truncated_pixels"], stop_before_pixels=True)
    assert header.Rows == 32


def test_malformed_truncated_encapsulated(malformed: dict[str, Path]) -> None:
    with pytest.warns(UserWarning, match=r"End of file reached before delimiter \(FFFE,E0DD\)"):
        ds = dcmread(malformed["truncated_encapsulated"])
    assert len(ds) == 0  # pydicom 3.0.2 drops every element
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    header = dcmread(malformed["truncated_encapsulated"], stop_before_pixels=True)
    assert header.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID


def test_malformed_no_preamble(malformed: dict[str, Path]) -> None:
    data = malformed["no_preamble"].read_bytes()
    assert data[:2] == b"\x08\x00"  # group 0008 first: no preamble, no file meta
    assert b"DICM" not in data[:200]
    with pytest.raises(InvalidDicomError):
        dcmread(malformed["no_preamble"])
    ds = dcmread(malformed["no_preamble"], force=True)
    assert ds.SOPClassUID == CTImageStorage
    assert "TransferSyntaxUID" not in ds.file_meta
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert ds.pixel_array.shape == (32, 32)


@pytest.mark.parametrize("kind", ["not_dicom", "not_dicom_png", "empty"])
def test_malformed_not_dicom(malformed: dict[str, Path], kind: str) -> None:
    with pytest.raises(InvalidDicomError):
        dcmread(malformed[kind])
    assert "SOPInstanceUID" not in dcmread(malformed[kind], force=True)


def test_malformed_missing_uids(malformed: dict[str, Path]) -> None:
    no_sop = dcmread(malformed["missing_sop_uid"])
    assert "SOPInstanceUID" not in no_sop
    assert no_sop.file_meta.MediaStorageSOPInstanceUID
    assert no_sop.StudyInstanceUID
    no_study = dcmread(malformed["missing_study_uid"])
    assert "StudyInstanceUID" not in no_study
    assert no_study.SOPInstanceUID
    assert no_study.pixel_array.shape == (32, 32)


def test_malformed_bad_date(malformed: dict[str, Path]) -> None:
    for force in (False, True):
        ds = dcmread(malformed["bad_date"], force=force)
        assert ds.StudyDate == BAD_STUDY_DATE
        assert dt.datetime.strptime(ds.SeriesDate, "%Y%m%d").year >= 2012
        with pytest.raises(ValueError, match=r"month must be in 1\.\.12"):
            dt.date(int(ds.StudyDate[:4]), int(ds.StudyDate[4:6]), int(ds.StudyDate[6:]))


def test_malformed_odd_length(malformed: dict[str, Path]) -> None:
    data = malformed["odd_length"].read_bytes()
    offset = data.find(b"\x08\x00\x30\x10LO")
    assert int.from_bytes(data[offset + 6 : offset + 8], "little") == len(ODD_LENGTH_VALUE) == 9
    ds = dcmread(malformed["odd_length"])
    assert ds.StudyDescription == ODD_LENGTH_VALUE
    assert ds.SeriesDescription  # elements after the odd one are intact
    assert ds.pixel_array.shape == (32, 32)


def test_malformed_files_are_deterministic(malformed: dict[str, Path], tmp_path: Path) -> None:
    again = write_malformed_files(tmp_path, seed=1)
    for kind, path in malformed.items():
        assert again[kind].read_bytes() == path.read_bytes(), kind


def test_write_dataset_writes_a_dicom_file(tmp_path: Path) -> None:
    ds = make_series(15, n_instances=1)[0]
    write_dataset(ds, tmp_path / "IM00001")
    data = (tmp_path / "IM00001").read_bytes()
    assert data == dataset_to_bytes(ds)
    assert data[:128] == bytes(128)
    assert data[128:132] == b"DICM"
