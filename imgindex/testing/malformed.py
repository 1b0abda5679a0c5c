"""Write deliberately bad inputs, one file per kind, for readers and listeners to survive.

:func:`write_malformed_files` writes every kind below into one directory. What a
reader sees is stated for pydicom 3.0.2 with its default settings; the kinds are:

=========================  ==========================================================
``truncated_header``       cut inside the header, in the value of (0020,0032)
``truncated_pixels``       cut inside native (uncompressed) Pixel Data
``truncated_encapsulated`` cut inside a fragment of RLE-compressed Pixel Data
``no_preamble``            a bare implicit VR data set: no preamble, ``DICM``, meta
``not_dicom``              a text file
``not_dicom_png``          a small, valid PNG image
``empty``                  0 bytes
``missing_sop_uid``        valid file lacking SOP Instance UID (0008,0018)
``missing_study_uid``      valid file lacking Study Instance UID (0020,000D)
``bad_date``               StudyDate ``"20231301"`` (month 13), otherwise good
``odd_length``             an element with an odd value length (PS3.5 7.1.1)
``unknown_tags``           good file plus private and unknown public tags
=========================  ==========================================================

Apart from ``not_dicom`` and ``not_dicom_png`` (and ``empty``), each file is a
small CT slice from :func:`imgindex.testing.factory.make_series`, so the good
parts are as realistic as the factory's.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pydicom import config, dcmwrite
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from imgindex.testing.factory import dataset_to_bytes, make_series, write_dataset

if TYPE_CHECKING:
    from collections.abc import Callable

logger = logging.getLogger(__name__)

#: The StudyDate of ``bad_date``: month 13 does not exist.
BAD_STUDY_DATE: Final = "20231301"
#: The StudyDescription of ``odd_length``, written with its odd length (9 bytes).
ODD_LENGTH_VALUE: Final = "ODD VALUE"
#: Private Creator of the extra private block in ``unknown_tags``.
OTHER_PRIVATE_CREATOR: Final = "ACME_VENDOR 2.3"
#: Tags of ``unknown_tags`` that no DICOM dictionary defines, with VR and value.
UNKNOWN_PUBLIC_TAGS: Final[dict[int, tuple[str, str | bytes]]] = {
    0x0008EEEE: ("LO", "UNKNOWN PUBLIC"),
    0x0018EEEE: ("DS", "1.5"),
    0x0040EEEE: ("UN", b"\x00\x01\x02\x03"),
}
#: A private data element of ``unknown_tags`` whose block has no Private Creator.
ORPHAN_PRIVATE_TAG: Final = 0x00131010

_SIZE: Final = 32  # rows and columns of the slices: small files, real structure
# Seeds of the malformed files start here, so that their UIDs and PatientIDs
# (PAT9000000000...) differ from those of factory calls with small seeds.
_SEED_BASE: Final = 9_000_000_000


def _good_slice(
    seed: int, transfer_syntax: str = ExplicitVRLittleEndian, **overrides: Any
) -> Dataset:
    return make_series(seed, "CT", 1, _SIZE, _SIZE, transfer_syntax=transfer_syntax, **overrides)[0]


def _element_offset(data: bytes, tag: int, vr: str) -> int:
    """Return where the explicit VR little endian element `tag` starts in `data`."""
    group, element = tag >> 16, tag & 0xFFFF
    marker = struct.pack("<HH", group, element) + vr.encode("ascii")
    offset = data.rfind(marker)
    if offset < 0:
        raise ValueError(f"({group:04X},{element:04X}) {vr} not found in the encoded dataset")
    return offset


def _write_truncated_header(path: Path, seed: int) -> None:
    """A CT slice cut in the middle of the value of Image Position (Patient) (0020,0032).

    What a reader sees: ``dcmread`` raises nothing. It returns the file meta and
    the elements before the cut (all the UIDs, patient and study attributes), a
    shortened (0020,0032) value, and nothing after it: no (0020,0037), no Rows
    or Columns, no Pixel Data. ``stop_before_pixels=True`` gives the same. A
    reader detects the truncation only by Type 1 attributes being absent.
    """
    data = dataset_to_bytes(_good_slice(seed))
    start = _element_offset(data, 0x00200032, "DS")
    length = struct.unpack_from("<H", data, start + 6)[0]
    path.write_bytes(data[: start + 8 + length // 2])


def _write_truncated_pixels(path: Path, seed: int) -> None:
    """A CT slice (Explicit VR Little Endian) cut halfway through its Pixel Data.

    What a reader sees: ``dcmread`` raises nothing and returns every element;
    Pixel Data is shorter than Rows x Columns x 2 bytes, so ``ds.pixel_array``
    raises ``ValueError`` ("The number of bytes of pixel data is less than
    expected"). With ``stop_before_pixels=True`` the header is complete and good.
    """
    data = dataset_to_bytes(_good_slice(seed))
    start = _element_offset(data, 0x7FE00010, "OW")
    # OW has a 12-byte header: tag, VR, 2 reserved bytes, 4-byte length.
    length = struct.unpack_from("<I", data, start + 8)[0]
    path.write_bytes(data[: start + 12 + length // 2])


def _write_truncated_encapsulated(path: Path, seed: int) -> None:
    """An RLE Lossless CT slice cut in the middle of its compressed fragment.

    What a reader sees: ``dcmread`` warns ``UserWarning`` "End of file reached
    before delimiter (FFFE,E0DD) found" and returns a data set with *no
    elements at all* (pydicom 3.0.2 drops everything it had read; only
    ``ds.file_meta`` survives), or raises ``EOFError`` when
    ``config.settings.reading_validation_mode`` is ``RAISE``. With
    ``stop_before_pixels=True`` the header reads silently and is complete, which
    is why indexers should read metadata that way.
    """
    data = dataset_to_bytes(_good_slice(seed, RLELossless))
    start = _element_offset(data, 0x7FE00010, "OB")
    # Encapsulated Pixel Data (PS3.5 A.4): the Basic Offset Table item, then one
    # item per fragment; each item is (FFFE,E000), a 4-byte length and the value.
    offset_table = start + 12
    table_length = struct.unpack_from("<I", data, offset_table + 4)[0]
    fragment = offset_table + 8 + table_length
    fragment_length = struct.unpack_from("<I", data, fragment + 4)[0]
    path.write_bytes(data[: fragment + 8 + fragment_length // 2])


def _write_no_preamble(path: Path, seed: int) -> None:
    """A good CT data set written bare: no preamble, no ``DICM``, no file meta.

    Implicit VR Little Endian, as old systems wrote (PS3.10 7.1 requires the
    meta). What a reader sees: ``dcmread`` raises ``InvalidDicomError`` ("File is
    missing DICOM File Meta Information header..."); ``dcmread(force=True)``
    reads every element with the right values, but ``ds.file_meta`` has no
    TransferSyntaxUID, so ``ds.pixel_array`` raises until the reader sets it.
    """
    source = _good_slice(seed)
    bare = Dataset()
    bare.update(source)
    dcmwrite(path, bare, implicit_vr=True, little_endian=True, enforce_file_format=False)


def _write_not_dicom(path: Path, seed: int) -> None:
    """A short text file, as found beside images in exports (a README or log).

    What a reader sees: ``dcmread`` raises ``InvalidDicomError``;
    ``dcmread(force=True)`` returns a dataset of garbage elements without
    SOPInstanceUID, which an indexer must reject.
    """
    path.write_text(
        f"Export log {seed}\nThis is not a DICOM file; it only sits beside them.\n",
        encoding="utf-8",
    )


def _write_not_dicom_png(path: Path, seed: int) -> None:
    """A valid 4 x 4 grayscale PNG image, another non-DICOM binary.

    What a reader sees: ``dcmread`` raises ``InvalidDicomError``.
    """
    width = height = 4
    raw = b"".join(
        b"\x00" + bytes((seed + 17 * (x + y)) % 256 for x in range(width)) for y in range(height)
    )

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def _write_empty(path: Path, seed: int) -> None:
    """A file of 0 bytes, as left by an interrupted copy.

    What a reader sees: ``dcmread`` raises ``InvalidDicomError``;
    ``dcmread(force=True)`` returns an empty dataset.
    """
    path.write_bytes(b"")


def _write_missing_sop_uid(path: Path, seed: int) -> None:
    """A good CT slice whose data set lacks SOP Instance UID (0008,0018), Type 1.

    What a reader sees: ``dcmread`` reads it without complaint and the pixels
    decode; ``"SOPInstanceUID" not in ds``. The file meta still has Media
    Storage SOP Instance UID (0002,0003), which pydicom needs to write a file;
    an indexer keyed on (0008,0018) must reject the file, or fall back to
    (0002,0003) on purpose.
    """
    write_dataset(_good_slice(seed, SOPInstanceUID=None), path)


def _write_missing_study_uid(path: Path, seed: int) -> None:
    """A good CT slice lacking Study Instance UID (0020,000D), Type 1.

    What a reader sees: ``dcmread`` reads it without complaint;
    ``"StudyInstanceUID" not in ds``. The instance cannot be placed in a study.
    """
    write_dataset(_good_slice(seed, StudyInstanceUID=None), path)


def _write_bad_date(path: Path, seed: int) -> None:
    """A good CT slice whose StudyDate is ``"20231301"`` (a 13th month).

    What a reader sees: ``dcmread`` (with or without ``force``) reads it
    silently and ``ds.StudyDate == "20231301"``; parsing it as a date fails
    (``datetime.strptime`` raises ``ValueError``; pydicom raises too if
    ``config.datetime_conversion`` is on). Every other date is valid.
    """
    ds = _good_slice(seed)
    # Validation would refuse the value: bypass it for this one element.
    ds[0x00080020] = DataElement(0x00080020, "DA", BAD_STUDY_DATE, validation_mode=config.IGNORE)
    write_dataset(ds, path)


def _write_odd_length(path: Path, seed: int) -> None:
    """A CT slice whose StudyDescription (0008,1030) has the odd length 9.

    PS3.5 7.1.1 requires even value lengths; the bytes are patched by hand, since
    pydicom always pads. What a reader sees: pydicom reads it silently with
    ``ds.StudyDescription == "ODD VALUE"`` and all later elements (and the
    pixels) intact; a strict parser may reject it.
    """
    data = dataset_to_bytes(_good_slice(seed, StudyDescription=ODD_LENGTH_VALUE))
    start = _element_offset(data, 0x00081030, "LO")
    length = struct.unpack_from("<H", data, start + 6)[0]
    value = ODD_LENGTH_VALUE.encode("ascii")
    if length != len(value) + 1:
        raise AssertionError(f"expected pydicom to pad to {len(value) + 1} bytes, not {length}")
    patched = data[: start + 6] + struct.pack("<H", len(value)) + value + data[start + 8 + length :]
    path.write_bytes(patched)


def _write_unknown_tags(path: Path, seed: int) -> None:
    """A good CT slice with extra private and unknown public tags; still indexable.

    Besides the factory's ``IMGINDEX_TEST 1.0`` block in group 0029 it has a
    second vendor's block (:data:`OTHER_PRIVATE_CREATOR`, group 0011) with LO, US,
    UN and a private sequence holding a nested private element; a private
    element whose block has no Private Creator (:data:`ORPHAN_PRIVATE_TAG`); and
    public-group tags no dictionary defines (:data:`UNKNOWN_PUBLIC_TAGS`).

    What a reader sees: ``dcmread`` reads it silently, with every standard
    attribute and the pixels as in a good file. pydicom names the unknown
    elements "Private tag data" or leaves them unnamed; none of it is fatal.
    """
    ds = _good_slice(seed)
    block = ds.private_block(0x0011, OTHER_PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", "ACME RECON V2")
    block.add_new(0x02, "US", 42)
    block.add_new(0x03, "UN", b"\x01\x02\x03\x04")
    item = Dataset()
    item.add_new(0x00110010, "LO", OTHER_PRIVATE_CREATOR)
    item.add_new(0x00111010, "LO", "NESTED")
    block.add_new(0x04, "SQ", DicomSequence([item]))
    ds.add_new(ORPHAN_PRIVATE_TAG, "LO", "NO CREATOR")
    for tag, (vr, value) in UNKNOWN_PUBLIC_TAGS.items():
        ds.add_new(tag, vr, value)
    write_dataset(ds, path)


_WRITERS: Final[dict[str, Callable[[Path, int], None]]] = {
    "truncated_header": _write_truncated_header,
    "truncated_pixels": _write_truncated_pixels,
    "truncated_encapsulated": _write_truncated_encapsulated,
    "no_preamble": _write_no_preamble,
    "not_dicom": _write_not_dicom,
    "not_dicom_png": _write_not_dicom_png,
    "empty": _write_empty,
    "missing_sop_uid": _write_missing_sop_uid,
    "missing_study_uid": _write_missing_study_uid,
    "bad_date": _write_bad_date,
    "odd_length": _write_odd_length,
    "unknown_tags": _write_unknown_tags,
}

#: The kinds :func:`write_malformed_files` writes, in order.
MALFORMED_KINDS: Final[tuple[str, ...]] = tuple(_WRITERS)


def write_malformed_files(out_dir: str | Path, *, seed: int = 0) -> dict[str, Path]:
    """Write one file of each malformed kind into `out_dir`.

    Parameters
    ----------
    out_dir : str or pathlib.Path
        Directory of the files, created if missing; each file is named after its
        kind, without extension (as PACS exports name files).
    seed : int
        Seeds the datasets; each kind gets its own seed, so no two files share a
        SOPInstanceUID, and none shares one with factory calls of small seeds.

    Returns
    -------
    dict of str to pathlib.Path
        Kind (see the module docstring and :data:`MALFORMED_KINDS`) to file.
    """
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for number, (kind, writer) in enumerate(_WRITERS.items()):
        path = directory / kind
        writer(path, _SEED_BASE + seed * len(_WRITERS) + number)
        paths[kind] = path
    return paths
