"""imgindex.export.volume: decoding against pydicom, and the rules of assembly.

pydicom is the reference for pixels: every frame :func:`decode_instance` returns must equal
what ``Dataset.pixel_array`` gives for the same file, for generated series in every transfer
syntax the factories write and for every file pydicom and pydicom-data ship.
"""

from __future__ import annotations

import importlib.util
import pickle
import random
import warnings
from copy import deepcopy
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import convert_color_space
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import (
    MPEG2MPML,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from imgindex.errors import ImgindexError
from imgindex.export._decode import _decode_instance, _parse, _planes
from imgindex.export._rawheader import _native_frames, _parse_fast
from imgindex.export.volume import (
    REASONS,
    Frame,
    Volume,
    VolumeError,
    assemble,
    decode_instance,
)
from imgindex.testing import (
    SUPPORTED_TRANSFER_SYNTAXES,
    dataset_to_bytes,
    make_multiframe,
    make_secondary_capture,
    make_series,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from numpy.typing import NDArray

#: Small series keep the file fast: JPEG 2000 needs 32 x 32 at least.
SIZE = 64
SLICES = 10


# -- helpers ----------------------------------------------------------------------------------


def floats(value: Any) -> NDArray[np.float64]:
    return np.array([float(v) for v in value], dtype=np.float64)


def normal_of(ds: Dataset) -> NDArray[np.float64]:
    cosines = floats(ds.ImageOrientationPatient)
    normal = np.cross(cosines[:3], cosines[3:])
    return normal / np.linalg.norm(normal)


def along(ds: Dataset) -> float:
    return float(floats(ds.ImagePositionPatient) @ normal_of(ds))


def encode_all(datasets: Sequence[Dataset]) -> list[bytes]:
    return [dataset_to_bytes(ds) for ds in datasets]


def decode_all(blobs: Sequence[bytes]) -> list[Frame]:
    return [frame for data in blobs for frame in decode_instance(data)]


def reference(data: bytes | Path, *, raw: bool = True, index: int | None = None) -> NDArray[Any]:
    """pydicom's own decoding, shaped (frames, rows, cols[, samples])."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about what it tolerates
        ds = dcmread(data if isinstance(data, Path) else BytesIO(data))
        ds.pixel_array_options(raw=raw, index=index)
        pixels = ds.pixel_array
        frames = int(ds.get("NumberOfFrames") or 1)
    return pixels[np.newaxis] if frames == 1 or index is not None else pixels


def modified(ds: Dataset, **attributes: Any) -> bytes:
    """`ds` as bytes with some attributes set and a new SOPInstanceUID."""
    copy = deepcopy(ds)
    copy.SOPInstanceUID = generate_uid()
    for keyword, value in attributes.items():
        setattr(copy, keyword, value)
    return dataset_to_bytes(copy)


def assemble_error(blobs: Sequence[bytes], reason: str, **kwargs: Any) -> VolumeError:
    with pytest.raises(VolumeError) as info:
        assemble(decode_all(blobs), **kwargs)
    assert info.value.reason == reason, info.value.message
    return info.value


def decode_error(data: bytes, reason: str) -> VolumeError:
    with pytest.raises(VolumeError) as info:
        decode_instance(data)
    assert info.value.reason == reason, info.value.message
    return info.value


def check_frames_equal(ours: Sequence[Frame], theirs: Sequence[Frame]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.pixels.dtype == b.pixels.dtype
        np.testing.assert_array_equal(a.pixels, b.pixels)
        for name in Frame.__dataclass_fields__:
            if name != "pixels":
                assert getattr(a, name) == getattr(b, name), name


# -- generated series in every transfer syntax ------------------------------------------------

#: (modality, series_number, seed): an axial CT with a gantry tilt (seed 1: 10.2 degrees,
#: positions stepped along the tilted normal), a sagittal and a coronal MR.
GEOMETRIES = [("CT", 1, 1), ("MR", 4, 2), ("MR", 5, 3)]


@pytest.mark.parametrize("transfer_syntax", SUPPORTED_TRANSFER_SYNTAXES, ids=lambda ts: ts.name)
@pytest.mark.parametrize(("modality", "series_number", "seed"), GEOMETRIES)
def test_generated_series_round_trip(
    transfer_syntax: str, modality: str, series_number: int, seed: int
) -> None:
    datasets = make_series(
        seed,
        modality,
        SLICES,
        SIZE,
        SIZE,
        series_number=series_number,
        transfer_syntax=transfer_syntax,
    )
    blobs = encode_all(datasets)
    assert all(_parse_fast(data) is not None for data in blobs), "the fast path is not taken"
    shuffled = list(zip(datasets, blobs, strict=True))
    random.Random(seed).shuffle(shuffled)
    [volume] = assemble(decode_all([data for _, data in shuffled]))

    ordered = sorted(shuffled, key=lambda pair: along(pair[0]))
    expected = np.stack([reference(data)[0] for _, data in ordered])
    assert volume.geometry == "volume"
    assert volume.pixels.dtype == expected.dtype
    assert volume.pixels.flags.c_contiguous
    np.testing.assert_array_equal(volume.pixels, expected)
    assert volume.sop_instance_uids == [ds.SOPInstanceUID for ds, _ in ordered]
    assert volume.frames == [0] * SLICES
    assert volume.instances == SLICES
    assert volume.photometric == "MONOCHROME2"

    first = ordered[0][0]
    assert volume.origin == tuple(floats(first.ImagePositionPatient))
    pixel_spacing = tuple(floats(first.PixelSpacing))
    assert volume.pixel_spacing == pixel_spacing
    assert volume.spacing is not None
    assert volume.spacing[0] == pytest.approx(float(first.SpacingBetweenSlices), rel=1e-6)
    assert volume.spacing[1:] == pixel_spacing
    cosines = floats(first.ImageOrientationPatient)
    assert volume.direction is not None
    np.testing.assert_allclose(volume.direction[0], cosines[:3] / np.linalg.norm(cosines[:3]))
    np.testing.assert_allclose(volume.direction[1], cosines[3:] / np.linalg.norm(cosines[3:]))
    np.testing.assert_allclose(volume.direction[2], normal_of(first))
    # The documented voxel-to-patient mapping puts every slice where its file says it is.
    z_axis = np.array(volume.direction[2])
    for k, (ds, _) in enumerate(ordered):
        position = np.array(volume.origin) + k * volume.spacing[0] * z_axis
        np.testing.assert_allclose(position, floats(ds.ImagePositionPatient), atol=1e-4)
    if modality == "CT":
        assert (volume.rescale_slope, volume.rescale_intercept) == (1.0, -1024.0)
    else:
        assert (volume.rescale_slope, volume.rescale_intercept) == (None, None)


@pytest.mark.parametrize("transfer_syntax", SUPPORTED_TRANSFER_SYNTAXES, ids=lambda ts: ts.name)
def test_multiframe_without_positions_is_a_stack(transfer_syntax: str) -> None:
    data = dataset_to_bytes(make_multiframe(5, 6, SIZE, SIZE, transfer_syntax=transfer_syntax))
    frames = decode_instance(data)
    assert [f.frame for f in frames] == list(range(6))
    assert all(f.position is None for f in frames)
    [volume] = assemble(list(reversed(frames)))
    assert volume.geometry == "stack"
    assert volume.frames == list(range(6))
    assert volume.instances == 1
    assert (volume.spacing, volume.origin, volume.direction) == (None, None, None)
    np.testing.assert_array_equal(volume.pixels, reference(data))


def test_secondary_capture_is_a_single_rgb_image() -> None:
    data = dataset_to_bytes(make_secondary_capture(4, SIZE, SIZE))
    [frame] = decode_instance(data)
    assert frame.photometric == "RGB"
    assert frame.pixels.shape == (SIZE, SIZE, 3)
    [volume] = assemble([frame])
    assert volume.geometry == "single"
    assert volume.pixels.shape == (1, SIZE, SIZE, 3)
    assert (volume.spacing, volume.origin, volume.direction, volume.pixel_spacing) == (
        None,
        None,
        None,
        None,
    )
    np.testing.assert_array_equal(volume.pixels, reference(data))


def test_stack_keeps_imager_pixel_spacing() -> None:
    # A projection radiograph: no plane, spacing at the detector only.
    images = [
        make_secondary_capture(4, SIZE, SIZE, instance_number=n, ImagerPixelSpacing=[0.2, 0.3])
        for n in (2, 1, 3)
    ]
    [volume] = assemble(decode_all(encode_all(images)))
    assert volume.geometry == "stack"
    assert volume.sop_instance_uids == [images[i].SOPInstanceUID for i in (1, 0, 2)]
    assert volume.pixel_spacing == (0.2, 0.3)
    assert volume.spacing is None


def test_rescale_per_slice_when_it_varies() -> None:
    datasets = make_series(6, "CT", 4, 32, 32)
    datasets[2].RescaleSlope = "2"
    [volume] = assemble(decode_all(encode_all(datasets)))
    changed = datasets[2].SOPInstanceUID
    assert volume.rescale_slope == [
        2.0 if uid == changed else 1.0 for uid in volume.sop_instance_uids
    ]
    assert volume.rescale_intercept == -1024.0


def test_results_pickle() -> None:
    # Workers send volumes and errors to another process.
    [volume] = assemble(decode_all(encode_all(make_series(7, "CT", 3, 32, 32))))
    copy = pickle.loads(pickle.dumps(volume))
    assert isinstance(copy, Volume)
    np.testing.assert_array_equal(copy.pixels, volume.pixels)
    assert copy.spacing == volume.spacing
    error = pickle.loads(pickle.dumps(VolumeError("missing_slices", "2 slices missing")))
    assert (error.reason, error.message, str(error)) == (
        "missing_slices",
        "2 slices missing",
        "2 slices missing",
    )
    assert isinstance(error, ImgindexError)
    assert isinstance(error, ValueError)


def test_unknown_reason_is_a_bug() -> None:
    with pytest.raises(ValueError, match="reason must be one of"):
        VolumeError("bad", "message")
    assert len(set(REASONS)) == len(REASONS) == 10


# -- pydicom's own files ------------------------------------------------------------------------


def _listing() -> list[tuple[str, str]]:
    """(corpus, path inside it) of every file; the fixtures give the folders at run time."""
    spec = importlib.util.find_spec("data_store")
    assert spec is not None
    assert spec.origin is not None
    folders = {
        "test_files": Path(pydicom.__file__).parent / "data" / "test_files",
        "pydicom-data": Path(spec.origin).parent / "data",
    }
    return [
        (corpus, path.relative_to(folder).as_posix())
        for corpus, folder in folders.items()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]


CORPUS = _listing()

#: Files whose pixels pydicom itself cannot decode here, and what decode_instance says.
EXPECTED_ERRORS = {
    # NEMA's NM1_JPLY: pylibjpeg-libjpeg rejects its scan header ("scan start must be zero");
    # its README says GDCM complains too. JPGExtended.dcm is the fixed copy, covered.
    "JPEG-lossy.dcm": "undecodable",
    # JPEG2000.dcm with 4 codestream bytes overwritten by a Sequence Delimiter (#1140).
    "JPEG2000-embedded-sequence-delimiter.dcm": "undecodable",
    # NumberOfFrames is "1A".
    "badVR.dcm": "undecodable",
    # Pixel Data without Bits Allocated or the rest of the Image Pixel module.
    "nested_priv_SQ.dcm": "undecodable",
    # Cut short: Pixel Data says 8192 bytes, 8130 follow.
    "MR_truncated.dcm": "undecodable",
    # Cut short: the encapsulated Pixel Data lacks its Sequence Delimiter (pydicom then drops
    # the element, so it sees no pixels at all).
    "emri_small_jpeg_2k_lossless_too_short.dcm": "undecodable",
    # Cut short inside the Beam Sequence (an RT Plan: no pixels either way).
    "rtplan_truncated.dcm": "undecodable",
    # The file meta has no Transfer Syntax UID.
    "meta_missing_tsyntax.dcm": "not_dicom",
}


@pytest.fixture(scope="module")
def corpus_folders(pydicom_test_files: Path, pydicom_data_files: Path) -> dict[str, Path]:
    return {"test_files": pydicom_test_files, "pydicom-data": pydicom_data_files}


def test_listing_matches_the_fixtures(corpus_folders: dict[str, Path]) -> None:
    listed = {
        (corpus, path.relative_to(folder).as_posix())
        for corpus, folder in corpus_folders.items()
        for path in folder.rglob("*")
        if path.is_file()
    }
    assert listed == set(CORPUS)
    names = {Path(name).name for _, name in CORPUS}
    assert set(EXPECTED_ERRORS) <= names


def _pydicom_view(path: Path) -> Dataset | None:
    """The file as pydicom reads it, or None if pydicom says it is not DICOM."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dcmread(path)
    except InvalidDicomError:
        return None


@pytest.mark.parametrize(("corpus", "name"), CORPUS, ids=[f"{c}/{n}" for c, n in CORPUS])
def test_decodes_like_pydicom(corpus_folders: dict[str, Path], corpus: str, name: str) -> None:
    path = corpus_folders[corpus] / name
    data = path.read_bytes()
    expected_error = EXPECTED_ERRORS.get(path.name)
    ds = _pydicom_view(path)
    if expected_error is None:
        if ds is None:
            expected_error = "not_dicom"
        elif not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            expected_error = "no_pixel_data"
    if expected_error is not None:
        error = decode_error(data, expected_error)
        assert error.message
        return

    frames = decode_instance(data)
    expected = reference(path)
    assert len(frames) == len(expected)
    for index, (frame, pixels) in enumerate(zip(frames, expected, strict=True)):
        assert frame.frame == index
        assert frame.pixels.dtype == pixels.dtype
        np.testing.assert_array_equal(frame.pixels, pixels)
    check_fast_path_agrees(data, len(frames))
    assert ds is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # values pydicom tolerates, e.g. a hash as a UID
        uid, photometric = str(ds.get("SOPInstanceUID", "")), str(ds.PhotometricInterpretation)
    assert frames[0].sop_instance_uid == uid
    if photometric.startswith("YBR_FULL"):
        # Stored YCbCr stays YCbCr; converted, it is what pixel_array gives by default.
        assert frames[0].photometric == "YBR_FULL"
        first = reference(path, raw=False, index=0)[0]
        np.testing.assert_array_equal(
            convert_color_space(frames[0].pixels, "YBR_FULL", "RGB"), first
        )
        if len(frames) == 1:  # as_rgb decodes every frame again: the small files only
            [rgb] = decode_instance(data, as_rgb=True)
            assert rgb.photometric == "RGB"
            np.testing.assert_array_equal(rgb.pixels, first)


def check_fast_path_agrees(data: bytes, n_frames: int) -> None:
    """The fast walk finds what dcmread finds: attributes, and the same pixel data bytes."""
    fast = _parse_fast(data)
    if fast is None:
        return  # not taken: dcmread's path is the one tested
    slow = _parse(data)
    assert fast.transfer_syntax == slow.transfer_syntax
    keyword = fast.pixel_options["pixel_keyword"]
    assert bytes(fast.source) == slow.header[keyword].value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert as_pixel_options(fast.header) == as_pixel_options(slow.header)
        assert _planes(fast.header, n_frames) == _planes(slow.header, n_frames)
        for attribute in ("SOPInstanceUID", "InstanceNumber", "SOPClassUID"):
            assert fast.header.get(attribute) == slow.header.get(attribute)
    native = _native_frames(fast)
    if native is not None:  # the raw-value path gives what pydicom's gives
        check_frames_equal(native, _decode_instance(data, as_rgb=False, fast=False))


def test_the_fast_path_takes_most_files(corpus_folders: dict[str, Path]) -> None:
    fast = [
        name
        for corpus, name in CORPUS
        if name.endswith(".dcm") and _fast(corpus_folders[corpus] / name)
    ]
    assert len(fast) > 100


def _fast(path: Path) -> bool:
    try:
        return _parse_fast(path.read_bytes()) is not None
    except Exception:  # noqa: BLE001 - a truncated file: not taken
        return False


# -- real files that make volumes ---------------------------------------------------------------


def _decode_files(paths: Sequence[Path]) -> list[Frame]:
    return decode_all([p.read_bytes() for p in paths])


def test_real_ct_series_is_a_volume(pydicom_test_files: Path) -> None:
    # Five 2.5 mm slices of one CT series; InstanceNumber runs against the table direction.
    folder = pydicom_test_files / "dicomdirtests" / "98892001" / "CT5N"
    paths = sorted(folder.iterdir())
    [volume] = assemble(_decode_files(paths))
    datasets = sorted((dcmread(p) for p in paths), key=along)
    assert [int(ds.InstanceNumber) for ds in datasets] == [10, 9, 8, 7, 6]
    assert volume.geometry == "volume"
    assert volume.sop_instance_uids == [ds.SOPInstanceUID for ds in datasets]
    np.testing.assert_array_equal(volume.pixels, np.stack([ds.pixel_array for ds in datasets]))
    assert volume.spacing == pytest.approx((2.5, 0.488281, 0.488281))
    assert volume.origin == tuple(floats(datasets[0].ImagePositionPatient))
    assert volume.direction == ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def test_real_ct_series_with_a_gap(pydicom_test_files: Path) -> None:
    # InstanceNumber 18, 180, 181, 182 of a 1.25 mm series: 161 slices are not there.
    folder = pydicom_test_files / "dicomdirtests" / "77654033" / "CT2"
    with pytest.raises(VolumeError) as info:
        assemble(_decode_files(sorted(folder.iterdir())))
    assert info.value.reason == "missing_slices"
    assert "161 slice(s) missing" in info.value.message
    assert "InstanceNumber 18," in info.value.message
    assert "InstanceNumber 180," in info.value.message


def test_real_localizer_series_splits(pydicom_test_files: Path) -> None:
    # Three localizer images of one MR series, in three orientations.
    folder = pydicom_test_files / "dicomdirtests" / "98892003" / "MR2"
    paths = [p for p in folder.iterdir() if dcmread(p).SeriesInstanceUID.endswith(".136")]
    assert len(paths) == 3
    frames = _decode_files(paths)
    with pytest.raises(VolumeError) as info:
        assemble(frames)
    assert info.value.reason == "mixed_orientation"
    assert "split=True" in info.value.message
    volumes = assemble(frames, split=True)
    assert [v.geometry for v in volumes] == ["single"] * 3
    numbers = [int(dcmread(p).InstanceNumber) for p in paths]
    by_uid = {str(dcmread(p).SOPInstanceUID): n for p, n in zip(paths, numbers, strict=True)}
    assert [by_uid[v.sop_instance_uids[0]] for v in volumes] == [1, 2, 3]
    for volume in volumes:
        # One slice: z is its SliceThickness.
        assert volume.pixel_spacing is not None
        assert volume.spacing == pytest.approx((10.0, *volume.pixel_spacing))


@pytest.mark.parametrize(
    ("name", "order", "step"),
    [
        # ImageOrientationPatient [-1, 0, 0, 0, 1, 0]: the normal is -z, so the frame at
        # z = -149 comes before the one at z = -159.
        ("eCT_Supplemental.dcm", [1, 0], 10.0),
        ("liver.dcm", [0, 1, 2], 1.0),
        ("liver_expb.dcm", [0, 1, 2], 1.0),
    ],
)
def test_enhanced_multiframe_is_a_volume(
    pydicom_data_files: Path, name: str, order: list[int], step: float
) -> None:
    path = pydicom_data_files / name
    [volume] = assemble(decode_instance(path.read_bytes()))
    assert volume.geometry == "volume"
    assert volume.frames == order
    assert volume.instances == 1
    assert volume.spacing is not None
    assert volume.spacing[0] == pytest.approx(step)
    assert volume.pixels.dtype.isnative
    np.testing.assert_array_equal(volume.pixels, reference(path)[order])
    ds = dcmread(path)
    first = ds.PerFrameFunctionalGroupsSequence[order[0]].PlanePositionSequence[0]
    assert volume.origin == tuple(floats(first.ImagePositionPatient))
    if name == "eCT_Supplemental.dcm":
        # Pixel Value Transformation in the shared functional groups.
        assert (volume.rescale_slope, volume.rescale_intercept) == (1.0, -1024.0)
        assert volume.direction == ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0))


def test_enhanced_frames_are_ordered_by_position(pydicom_data_files: Path) -> None:
    ds = dcmread(pydicom_data_files / "liver.dcm")
    groups = ds.PerFrameFunctionalGroupsSequence
    positions = [g.PlanePositionSequence[0].ImagePositionPatient for g in groups]
    for group, position in zip(groups, reversed(positions), strict=True):
        group.PlanePositionSequence[0].ImagePositionPatient = position
    data = dataset_to_bytes(ds)
    [volume] = assemble(decode_instance(data))
    assert volume.frames == [2, 1, 0]
    np.testing.assert_array_equal(volume.pixels, reference(data)[::-1])


def test_rt_dose_grid_frame_offsets(pydicom_data_files: Path, pydicom_test_files: Path) -> None:
    path = pydicom_test_files / "rtdose.dcm"
    ds = dcmread(path)
    [volume] = assemble(decode_instance(path.read_bytes()))
    offsets = [float(v) for v in ds.GridFrameOffsetVector]
    assert volume.geometry == "volume"
    assert volume.frames == list(range(len(offsets)))
    assert volume.spacing is not None
    assert volume.spacing[0] == pytest.approx(offsets[1] - offsets[0])
    np.testing.assert_array_equal(volume.pixels, reference(path))


def test_volume_from_real_files_in_several_syntaxes(pydicom_test_files: Path) -> None:
    # MR_small in six encodings, moved apart along the normal: one volume, voxel-exact,
    # native byte order although two slices are big endian.
    names = [
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
    ]
    expected = dcmread(pydicom_test_files / "MR_small.dcm").pixel_array
    blobs, uids = [], []
    for k, name in enumerate(names):
        ds = dcmread(pydicom_test_files / name)
        origin = floats(ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin + 2.0 * k * normal_of(ds)]
        ds.SOPInstanceUID = generate_uid()
        uids.append(ds.SOPInstanceUID)
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        blobs.append(buffer.getvalue())
    random.Random(0).shuffle(blobs)
    [volume] = assemble(decode_all(blobs))
    assert volume.geometry == "volume"
    assert volume.sop_instance_uids == uids
    assert volume.pixels.dtype == np.dtype("int16")
    np.testing.assert_array_equal(volume.pixels, np.stack([expected] * len(names)))
    assert volume.spacing == pytest.approx((2.0, 0.3125, 0.3125))


# -- series that are not one volume ------------------------------------------------------------


@pytest.fixture(scope="module")
def ct() -> list[Dataset]:
    """An axial CT series, InstanceNumber 1-12 in position order (step 5 mm)."""
    datasets = make_series(11, "CT", 12, 32, 32, series_number=1)
    steps = np.diff([along(ds) for ds in datasets])
    assert np.allclose(np.abs(steps), 5.0)
    return datasets


def test_missing_slice(ct: list[Dataset]) -> None:
    blobs = encode_all(ct[:5] + ct[6:])
    error = assemble_error(blobs, "missing_slices")
    assert "1 slice(s) missing from a stack of 11 with a 5 mm step" in error.message
    assert "InstanceNumber 5," in error.message
    assert "InstanceNumber 7," in error.message


def test_missing_slices_in_two_places(ct: list[Dataset]) -> None:
    blobs = encode_all(ct[:2] + ct[4:8] + ct[9:])
    error = assemble_error(blobs, "missing_slices")
    assert "3 slice(s) missing" in error.message
    assert "2 between" in error.message
    assert "1 between" in error.message


def test_non_uniform_spacing(ct: list[Dataset]) -> None:
    moved = floats(ct[4].ImagePositionPatient) + 1.5 * normal_of(ct[4])
    blobs = encode_all(ct[:4] + ct[5:])
    blobs.append(modified(ct[4], ImagePositionPatient=[f"{v:.6f}" for v in moved]))
    error = assemble_error(blobs, "non_uniform_spacing")
    assert "gaps between consecutive slices range from 3.5 to 6.5 mm" in error.message


def test_stray_slice_is_not_many_missing(ct: list[Dataset]) -> None:
    # A slice 0.5 mm from another: the smallest gap divides the others, but reading it as
    # the step would mean 40 slices missing from 13.
    moved = floats(ct[4].ImagePositionPatient) + 0.5 * normal_of(ct[4])
    blobs = [*encode_all(ct), modified(ct[4], ImagePositionPatient=[f"{v:.6f}" for v in moved])]
    assemble_error(blobs, "non_uniform_spacing")


def test_spacing_within_tolerance(ct: list[Dataset]) -> None:
    moved = floats(ct[4].ImagePositionPatient) + 0.02 * normal_of(ct[4])
    blobs = encode_all(ct[:4] + ct[5:])
    blobs.append(modified(ct[4], ImagePositionPatient=[f"{v:.6f}" for v in moved]))
    [volume] = assemble(decode_all(blobs))
    assert volume.spacing is not None
    assert volume.spacing[0] == pytest.approx(5.0)
    assemble_error(blobs, "non_uniform_spacing", spacing_tolerance=0.001)


def test_positions_off_the_normal(ct: list[Dataset]) -> None:
    # A shear, as a gantry tilt written with untilted cosines: each slice moves 2 mm along
    # the rows (22 mm, 2 pixels, at the last).
    row = floats(ct[0].ImageOrientationPatient)[:3]
    blobs = [
        modified(
            ds,
            ImagePositionPatient=[
                f"{v:.6f}" for v in floats(ds.ImagePositionPatient) + 2.0 * k * row
            ],
        )
        for k, ds in enumerate(ct)
    ]
    error = assemble_error(blobs, "non_uniform_spacing")
    assert "not along the slice normal" in error.message
    [volume] = assemble(decode_all(blobs), drift_tolerance=1000)
    assert volume.geometry == "volume"


def test_duplicate_positions(ct: list[Dataset]) -> None:
    blobs = [*encode_all(ct), modified(ct[3])]
    error = assemble_error(blobs, "duplicate_positions")
    assert "1 pair(s)" in error.message
    assert ct[3].SOPInstanceUID in error.message


def test_mixed_sizes(ct: list[Dataset]) -> None:
    other = make_series(11, "CT", 12, 48, 48, series_number=1)
    blobs = [*encode_all(ct[:6]), dataset_to_bytes(other[6])]
    error = assemble_error(blobs, "mixed_sizes")
    assert "32x32 (6 frames), 48x48 (1 frame)" in error.message
    volumes = assemble(decode_all(blobs), split=True)
    assert [(v.geometry, v.pixels.shape) for v in volumes] == [
        ("volume", (6, 32, 32)),
        ("single", (1, 48, 48)),
    ]


def test_mixed_orientation(ct: list[Dataset]) -> None:
    sagittal = ["0", "1", "0", "0", "0", "-1"]
    blobs = [*encode_all(ct[:11]), modified(ct[11], ImageOrientationPatient=sagittal)]
    error = assemble_error(blobs, "mixed_orientation")
    assert "[0, 1, 0, 0, 0, -1] (1 frame)" in error.message
    volumes = assemble(decode_all(blobs), split=True)
    assert [(v.geometry, len(v.frames)) for v in volumes] == [("volume", 11), ("single", 1)]


def test_frames_without_geometry_in_a_volume(ct: list[Dataset]) -> None:
    blobs = [*encode_all(ct[:11]), modified(ct[11], ImagePositionPatient=None)]
    error = assemble_error(blobs, "mixed_orientation")
    assert "no ImagePositionPatient/ImageOrientationPatient (1 frame)" in error.message


def test_mixed_pixel_format(ct: list[Dataset]) -> None:
    blobs = [*encode_all(ct[:11]), modified(ct[11], PhotometricInterpretation="MONOCHROME1")]
    error = assemble_error(blobs, "mixed_pixel_format")
    assert "MONOCHROME1" in error.message
    assert len(assemble(decode_all(blobs), split=True)) == 2


def test_mixed_pixel_spacing(ct: list[Dataset]) -> None:
    blobs = [*encode_all(ct[:11]), modified(ct[11], PixelSpacing=["0.5", "0.5"])]
    error = assemble_error(blobs, "non_uniform_spacing")
    assert "PixelSpacing (0028,0030) differs" in error.message


def test_nothing_to_assemble() -> None:
    with pytest.raises(ValueError, match="frames is empty"):
        assemble([])
    with pytest.raises(ValueError, match="spacing_tolerance"):
        assemble([one_frame()], spacing_tolerance=1)
    with pytest.raises(ValueError, match="drift_tolerance"):
        assemble([one_frame()], drift_tolerance=-1)


def one_frame() -> Frame:
    return Frame(
        pixels=np.zeros((2, 2), dtype=np.uint8),
        sop_instance_uid="1.2.3",
        frame=0,
        position=None,
        orientation=None,
        pixel_spacing=None,
        slice_thickness=None,
        rescale_slope=None,
        rescale_intercept=None,
        instance_number=None,
        photometric="MONOCHROME2",
        bits_stored=8,
        pixel_representation=0,
    )


# -- instances that do not decode ----------------------------------------------------------------


def test_no_pixel_data(ct: list[Dataset]) -> None:
    ds = deepcopy(ct[0])
    del ds.PixelData
    error = decode_error(dataset_to_bytes(ds), "no_pixel_data")
    assert ds.SOPInstanceUID in error.message
    assert "Rows (0028,0010)" in error.message


@pytest.mark.parametrize("cut", [132, 500, 3000, -300, -12, -8])
def test_truncated_file(cut: int) -> None:
    data = dataset_to_bytes(make_series(12, "CT", 1, 32, 32, transfer_syntax=RLELossless)[0])
    error = decode_error(data[:cut], "undecodable")
    assert "cut short" in error.message


def test_a_cut_sequence_delimiter_is_tolerated() -> None:
    # Every fragment is there; pydicom reads the file, and so do we.
    data = dataset_to_bytes(make_series(12, "CT", 1, 32, 32, transfer_syntax=RLELossless)[0])
    [frame] = decode_instance(data[:-2])
    np.testing.assert_array_equal(frame.pixels, reference(data)[0])


def test_truncated_native_pixel_data(ct: list[Dataset]) -> None:
    error = decode_error(dataset_to_bytes(ct[0])[:-100], "undecodable")
    assert "PixelData (7FE0,0010) needs 2048 bytes" in error.message


def _j2k() -> Dataset:
    return make_series(13, "CT", 1, 32, 32, transfer_syntax=JPEG2000Lossless)[0]


def _with_codestream(ds: Dataset, codestream: bytes) -> bytes:
    copy = deepcopy(ds)
    copy.PixelData = encapsulate([codestream])
    return dataset_to_bytes(copy)


def test_corrupt_jpeg_2000() -> None:
    ds = _j2k()
    [codestream] = generate_frames(ds.PixelData, number_of_frames=1)
    corrupt = codestream[:2] + b"\x00" * 40 + codestream[42:]  # the SIZ marker segment
    error = decode_error(_with_codestream(ds, corrupt), "undecodable")
    assert "JPEG 2000" in error.message
    assert ds.SOPInstanceUID in error.message


def test_cut_jpeg_2000_codestream() -> None:
    ds = _j2k()
    [codestream] = generate_frames(ds.PixelData, number_of_frames=1)
    decode_error(_with_codestream(ds, codestream[:120]), "undecodable")


def test_corrupt_rle() -> None:
    ds = make_series(14, "CT", 1, 32, 32, transfer_syntax=RLELossless)[0]
    [frame] = generate_frames(ds.PixelData, number_of_frames=1)
    ds.PixelData = encapsulate([b"\x07" + frame[1:64]])  # 7 segments, offsets garbage
    decode_error(dataset_to_bytes(ds), "undecodable")


def test_unsupported_transfer_syntax() -> None:
    ds = make_series(15, "CT", 1, 32, 32, transfer_syntax=RLELossless)[0]
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    error = decode_error(dataset_to_bytes(ds), "unsupported_transfer_syntax")
    assert "MPEG2 Main Profile / Main Level" in error.message


def test_unknown_transfer_syntax() -> None:
    data = dataset_to_bytes(make_series(15, "CT", 1, 32, 32, transfer_syntax=RLELossless)[0])
    known = RLELossless.encode() + b"\x00"
    assert data.count(known) == 1
    private = b"1.2.840.99999.1.2.5\x00"  # same length: the file meta stays valid
    error = decode_error(data.replace(known, private), "unsupported_transfer_syntax")
    assert "an unknown transfer syntax" in error.message


@pytest.mark.parametrize(
    "data",
    [b"", b"not a DICOM file", b"\x00" * 128 + b"DIC", b"\x00" * 200],
    ids=["empty", "text", "short", "zeros"],
)
def test_not_dicom(data: bytes) -> None:
    decode_error(data, "not_dicom")


def test_implicit_vr_is_read_on_the_fast_path() -> None:
    data = dataset_to_bytes(
        make_series(16, "MR", 1, 32, 32, transfer_syntax=ImplicitVRLittleEndian)[0]
    )
    instance = _parse_fast(data)
    assert instance is not None
    assert instance.transfer_syntax == ImplicitVRLittleEndian
    assert isinstance(instance.source, memoryview)  # no copy of native pixel data
    check_frames_equal(decode_instance(data), _decode_instance(data, as_rgb=False, fast=False))


def test_explicit_vr_native_frames_are_views() -> None:
    data = dataset_to_bytes(
        make_secondary_capture(17, 32, 32, transfer_syntax=ExplicitVRLittleEndian)
    )
    [frame] = decode_instance(data)
    assert not frame.pixels.flags.owndata  # a view on `data`, 8 bits of 8: nothing to clear
    assert np.shares_memory(frame.pixels, np.frombuffer(data, dtype=np.uint8))


def test_float_pixel_data() -> None:
    # Float Pixel Data (7FE0,0008), as in parametric maps: no Bits Stored, no rescale.
    values = np.arange(20, dtype="<f4").reshape(4, 5) / 3
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated = 4, 5, 1, 32
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.FloatPixelData = values.tobytes()
    data = dataset_to_bytes(ds)
    assert _parse_fast(data) is not None
    [frame] = decode_instance(data)
    assert frame.pixels.dtype == np.float32
    np.testing.assert_array_equal(frame.pixels, values)
    assert (frame.bits_stored, frame.pixel_representation) == (0, 0)
    check_frames_equal([frame], _decode_instance(data, as_rgb=False, fast=False))


def _generated(transfer_syntax: str) -> bytes:
    ds = make_series(18, "CT", 1, 64, 64)[0]
    ds.compress(
        transfer_syntax, encoding_plugin="pyjpegls" if transfer_syntax == JPEGLSLossless else ""
    )
    return dataset_to_bytes(ds)


@pytest.mark.parametrize(
    "source",
    ["JPEG 2000", "JPEG-LS", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPGExtended.dcm"],
)
def test_a_zeroed_codestream_tail_is_undecodable(pydicom_test_files: Path, source: str) -> None:
    # The decoders return wrong pixels for these without an error (JPEG Lossless, Baseline
    # and Extended are pydicom's files: no encoder here); the missing end marker (FFD9)
    # gives them away.
    if source == "JPEG 2000":
        good = _generated(JPEG2000Lossless)
    elif source == "JPEG-LS":
        good = _generated(JPEGLSLossless)
    else:
        good = (pydicom_test_files / source).read_bytes()
    decode_instance(good)
    ds = dcmread(BytesIO(good))
    [codestream] = generate_frames(ds.PixelData, number_of_frames=1)
    ds.PixelData = encapsulate([codestream[:-120] + bytes(120)])
    error = decode_error(dataset_to_bytes(ds), "undecodable")
    assert "does not end with its end marker (FFD9)" in error.message


def test_a_panicking_decoder_is_undecodable() -> None:
    # pylibjpeg-rle panics (pyo3's PanicException, a BaseException) on this one.
    ds = make_series(4, "CT", 1, 64, 64, transfer_syntax=RLELossless)[0]
    [frame] = generate_frames(ds.PixelData, number_of_frames=1)
    middle = len(frame) // 2
    ds.PixelData = encapsulate([frame[:middle] + bytes(32) + frame[middle + 32 :]])
    error = decode_error(dataset_to_bytes(ds), "undecodable")
    assert "RLE Lossless" in error.message


def test_enhanced_frames_sharing_one_position_are_a_stack(pydicom_data_files: Path) -> None:
    # A shared Plane Position for every frame (a cine or a dynamic series at one place):
    # the frames have no positions of their own.
    ds = dcmread(pydicom_data_files / "eCT_Supplemental.dcm")
    shared = ds.SharedFunctionalGroupsSequence[0]
    shared.PlanePositionSequence = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence
    for group in ds.PerFrameFunctionalGroupsSequence:
        del group.PlanePositionSequence
    frames = decode_instance(dataset_to_bytes(ds))
    assert [f.position for f in frames] == [None, None]
    assert all(f.orientation == (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0) for f in frames)
    [volume] = assemble(frames)
    assert (volume.geometry, volume.frames) == ("stack", [0, 1])
    assert volume.pixel_spacing == (0.388672, 0.388672)


# -- the raw-value path for native grayscale frames -----------------------------------------


def _native_ct(transfer_syntax: str = ExplicitVRLittleEndian, **values: Any) -> Dataset:
    ds = make_series(19, "CT", 1, 16, 24, transfer_syntax=transfer_syntax)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the invalid values are the point
        for keyword, value in values.items():
            if value is None:
                del ds[keyword]
            else:
                setattr(ds, keyword, value)
    return ds


def check_native(data: bytes, *, taken: bool) -> list[Frame]:
    """decode_instance equals dcmread's path and pixel_array; `taken`: by _native_frames."""
    instance = _parse_fast(data)
    assert instance is not None
    assert (_native_frames(instance) is not None) == taken
    frames = decode_instance(data)
    check_frames_equal(frames, _decode_instance(data, as_rgb=False, fast=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = dcmread(BytesIO(data)).pixel_array
    assert frames[0].pixels.dtype == expected.dtype
    np.testing.assert_array_equal(frames[0].pixels, expected)
    return frames


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize(
    ("bits_allocated", "bits_stored", "representation"),
    [
        (16, 12, 0),
        (16, 12, 1),
        (16, 16, 1),
        (16, 1, 1),
        (8, 8, 0),
        (8, 5, 1),
        (32, 20, 1),
        (32, 31, 0),
    ],
)
def test_native_frames_clear_unused_bits_like_pydicom(
    transfer_syntax: str, bits_allocated: int, bits_stored: int, representation: int
) -> None:
    # Every bit pattern, the unused high bits included: masked or sign-extended as pydicom does.
    dtype = np.dtype(f"<{'ui'[representation]}{bits_allocated // 8}")
    rng = np.random.default_rng(bits_stored)
    values = rng.integers(0, 2**bits_allocated, size=(16, 24), dtype=np.uint64)
    ds = _native_ct(
        transfer_syntax,
        BitsAllocated=bits_allocated,
        BitsStored=bits_stored,
        HighBit=bits_stored - 1,
        PixelRepresentation=representation,
    )
    ds.PixelData = values.astype(dtype.str.replace("i", "u")).tobytes()
    data = dataset_to_bytes(ds)
    [frame] = check_native(data, taken=True)
    assert (frame.bits_stored, frame.pixel_representation) == (bits_stored, representation)
    if bits_stored == bits_allocated:
        assert np.shares_memory(frame.pixels, np.frombuffer(data, dtype=np.uint8))
    else:
        assert frame.pixels.flags.writeable  # a corrected copy; the input is untouched
        assert not np.shares_memory(frame.pixels, np.frombuffer(data, dtype=np.uint8))


@pytest.mark.parametrize(
    "values",
    [
        {"ImagePositionPatient": ["-1.5e2", "+.5", " 7 "], "SliceThickness": "2.50"},
        {"ImagePositionPatient": ["1", "2"], "PixelSpacing": ["0.5"]},  # wrong counts: None
        {"PixelSpacing": None, "ImagerPixelSpacing": ["0.25", "0.3"]},
        {"RescaleSlope": "1e999"},  # infinite: None
        {"InstanceNumber": " 0012", "RescaleIntercept": "-1024"},
        {"InstanceNumber": None, "SliceThickness": None, "ImageOrientationPatient": None},
        {"PhotometricInterpretation": "MONOCHROME1"},
        {"NumberOfFrames": 1},
    ],
    ids=str,
)
def test_native_frames_read_values_like_pydicom(values: dict[str, Any]) -> None:
    check_native(dataset_to_bytes(_native_ct(**values)), taken=True)


@pytest.mark.parametrize(
    "values",
    [
        {"RescaleSlope": "nan"},
        {"RescaleSlope": ["1", "2"]},  # several values for one
        {"InstanceNumber": "1.0"},
        {"NumberOfFrames": 2},
        {"PhotometricInterpretation": "PALETTE COLOR"},
        {"BitsAllocated": 1, "BitsStored": 1, "HighBit": 0},
    ],
    ids=str,
)
def test_native_frames_leave_the_unusual_to_pydicom(values: dict[str, Any]) -> None:
    data = _encode(_native_ct(**values))
    instance = _parse_fast(data)
    assert instance is not None
    assert _native_frames(instance) is None
    if not {"BitsAllocated", "PhotometricInterpretation", "NumberOfFrames"} & set(values):
        check_native(data, taken=False)


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("RescaleSlope", b"1,5 "),
        ("RescaleIntercept", b"-10e2\x00"),
        ("SOPInstanceUID", b"1.2.abc\x00"),
    ],
)
def test_native_frames_leave_odd_raw_values_to_pydicom(keyword: str, value: bytes) -> None:
    # Values pydicom will not even set: patched into the encoded bytes, same length.
    placeholder = {
        "RescaleSlope": b"7.25",
        "RescaleIntercept": b"-2000",
        "SOPInstanceUID": b"9.87654",
    }
    data = _encode(_native_ct(**{keyword: placeholder[keyword].decode()}))
    padded = placeholder[keyword] + b" " * (len(placeholder[keyword]) % 2)
    if keyword == "SOPInstanceUID":
        padded = placeholder[keyword] + b"\x00"
    assert padded in data  # the UID is in the file meta too: both change
    assert len(value) == len(padded)
    check_native(data.replace(padded, value), taken=False)


def _encode(ds: Dataset) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dataset_to_bytes(ds)


def test_native_frames_with_excess_pixel_data_go_to_pydicom() -> None:
    ds = _native_ct()
    ds.PixelData = ds.PixelData + b"\x00\x00"
    check_native(dataset_to_bytes(ds), taken=False)
