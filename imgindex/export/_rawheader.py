"""The fast path of :func:`~imgindex.export.volume.decode_instance`: a walk over the
top-level elements of little endian files, and native grayscale frames from raw values."""

from __future__ import annotations

import math
import re
import struct
from typing import TYPE_CHECKING, Final

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from imgindex.export._frames import Frame, _Instance, _int

if TYPE_CHECKING:
    from pydicom.dataelem import DataElement


# -- the fast path: a walk over the top-level elements of little endian files ---------------
#
# dcmread builds every element of a header (120 or more in a CT slice), which costs more
# than decoding a native 512 x 512 slice. The walk below keeps only the attributes this
# module reads and hands the decoder a view of the Pixel Data value, with no copy. It takes
# the common case only: the preamble and "DICM", Implicit or Explicit VR Little Endian or
# an encapsulated syntax, and no functional groups (enhanced objects, whose sequences
# pydicom reads). Anything else, or anything unexpected, goes to dcmread (_parse), which
# also gives the errors; tests/imgindex/test_volume.py checks that the two agree.

_STRUCT_TAG: Final = struct.Struct("<HH")
_STRUCT_IMPLICIT: Final = struct.Struct("<HHL")
_STRUCT_SHORT: Final = struct.Struct("<H")
_STRUCT_LONG: Final = struct.Struct("<L")
#: PS3.5 7.1.2: explicit VRs with a 2-byte reserved field and a 4-byte length.
_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED: Final = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_TAGS: Final = {
    0x7FE00010: "PixelData",
    0x7FE00008: "FloatPixelData",
    0x7FE00009: "DoubleFloatPixelData",
}
#: Shared and Per-frame Functional Groups Sequences (5200,9229), (5200,9230).
_FUNCTIONAL_GROUPS: Final = frozenset({0x52009229, 0x52009230})
_TRANSFER_SYNTAX_TAG: Final = 0x00020010


def _tags(*keywords: str) -> frozenset[int]:
    tags = {tag_for_keyword(keyword) for keyword in keywords}
    assert None not in tags, keywords  # a typo here is a bug
    return frozenset(t for t in tags if t is not None)


#: What the fast path keeps: the Image Pixel module, the Extended Offset Table, and the
#: attributes of :class:`Frame`.
_WANTED: Final = _tags(
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "SliceThickness",
    "RescaleSlope",
    "RescaleIntercept",
    "GridFrameOffsetVector",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
)


class _Unhandled(Exception):
    """The fast path does not take this file; dcmread reads it."""


class _Truncated(Exception):
    """The data end inside an element; the message says which."""


def _parse_fast(data: bytes) -> _Instance | None:
    """Parse the common case without dcmread; None for anything else."""
    if data[128:132] != b"DICM":
        return None
    try:
        ts, pos = _walk_meta(data)
        if ts == ImplicitVRLittleEndian:
            implicit = True
        elif ts == ExplicitVRLittleEndian or (ts.is_transfer_syntax and ts.is_encapsulated):
            implicit = False
        else:
            return None  # big endian, deflated, private or unknown: dcmread knows
        elements, pixel = _walk(data, pos, implicit)
    except (_Unhandled, struct.error, UnicodeDecodeError):
        return None  # _Truncated goes up
    if pixel is None:
        return None  # no pixel data: dcmread gives the error
    tag, vr, start, length = pixel
    # A copy: the Dataset replaces raw elements by converted ones when they are read.
    header = Dataset(dict(elements))
    if vr is None:  # implicit VR: the dictionary says "OB or OW" for Pixel Data
        vr = {0x7FE00008: "OF", 0x7FE00009: "OD"}.get(tag, "OW")
        if tag == 0x7FE00010 and _int(header.get("BitsAllocated")) in (1, 8):
            vr = "OB"
    source: bytes | memoryview
    if length == _UNDEFINED:
        # Encapsulated (PS3.5 A.4): the items up to the sequence delimiter. pydicom's
        # fragment parsing wants bytes; compressed data are small, so the copy is cheap.
        try:
            source = data[start : _items_end(data, start)]
        except _Unhandled:
            return None
    else:
        if start + length > len(data):
            raise _Truncated(
                f"{_PIXEL_TAGS[tag]} ({tag >> 16:04X},{tag & 0xFFFF:04X}) needs {length} bytes "
                f"from byte {start}"
            )
        source = memoryview(data)[start : start + length]
    pixel_options = {"pixel_keyword": _PIXEL_TAGS[tag], "pixel_vr": vr}
    return _Instance(header, ts, source, pixel_options, elements)


def _walk_meta(data: bytes) -> tuple[UID, int]:
    """Return the transfer syntax and the end of the file meta (explicit VR LE, PS3.10 7.1)."""
    pos, ts = 132, None
    while True:
        if pos + 12 > len(data):
            raise _Truncated(
                f"the file meta information is not followed by a data set (byte {pos})"
            )
        group, element = _STRUCT_TAG.unpack_from(data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            length, header = _STRUCT_LONG.unpack_from(data, pos + 8)[0], 12
        else:
            length, header = _STRUCT_SHORT.unpack_from(data, pos + 6)[0], 8
        if length == _UNDEFINED:
            raise _Unhandled("undefined length in the file meta")
        if pos + header + length > len(data):
            raise _Truncated(f"file meta element ({group:04X},{element:04X}) is cut short")
        if group << 16 | element == _TRANSFER_SYNTAX_TAG:
            ts = data[pos + header : pos + header + length].decode("ascii").strip("\x00 ")
        pos += header + length
    if not ts:
        raise _Unhandled("no transfer syntax")
    return UID(ts), pos


def _walk(
    data: bytes, pos: int, implicit: bool
) -> tuple[dict[BaseTag, DataElement | RawDataElement], tuple[int, str | None, int, int] | None]:
    """Walk the top-level elements from `pos` to the pixel data.

    Returns the wanted elements and the pixel data's (tag, VR, value offset, length), or
    None for it if the data set ends first.
    """
    found: dict[BaseTag, DataElement | RawDataElement] = {}
    end = len(data)
    # Hot loop (about 120 elements per CT slice): locals, and the VR decoded only when kept.
    unpack_implicit, unpack_tag = _STRUCT_IMPLICIT.unpack_from, _STRUCT_TAG.unpack_from
    unpack_short, unpack_long = _STRUCT_SHORT.unpack_from, _STRUCT_LONG.unpack_from
    long_vrs, pixel_tags, wanted = _LONG_VRS, _PIXEL_TAGS, _WANTED
    vr_bytes = b""
    while pos + 8 <= end:
        if implicit:
            group, element, length = unpack_implicit(data, pos)
            header = 8
        else:
            group, element = unpack_tag(data, pos)
            vr_bytes = data[pos + 4 : pos + 6]
            if vr_bytes in long_vrs:
                length, header = unpack_long(data, pos + 8)[0], 12
            elif vr_bytes.isalpha() and vr_bytes.isupper():
                length, header = unpack_short(data, pos + 6)[0], 8
            else:
                raise _Unhandled(f"bad VR {vr_bytes!r} at byte {pos}")
        tag = group << 16 | element
        start = pos + header
        if tag in pixel_tags:
            return found, (tag, None if implicit else vr_bytes.decode("ascii"), start, length)
        if length == _UNDEFINED:
            if tag in _FUNCTIONAL_GROUPS:
                raise _Unhandled("an enhanced object: pydicom reads its functional groups")
            # A sequence, or UN holding one, whose content is implicit VR (PS3.5 6.2.2).
            pos = _skip_sequence(data, start, implicit or vr_bytes == b"UN")
            continue
        if tag in _FUNCTIONAL_GROUPS:
            raise _Unhandled("an enhanced object: pydicom reads its functional groups")
        if start + length > end:
            raise _Truncated(
                f"element ({group:04X},{element:04X}) needs {length} bytes from byte {start}"
            )
        if tag in wanted:
            found[BaseTag(tag)] = RawDataElement(
                BaseTag(tag),
                None if implicit else vr_bytes.decode("ascii"),
                length,
                data[start : start + length],
                start,
                implicit,
                True,
            )
        pos = start + length
    if pos != end:
        raise _Truncated(f"{end - pos} byte(s) at the end are not a whole element header")
    return found, None


def _skip_sequence(data: bytes, pos: int, implicit: bool) -> int:
    """Skip the items of an undefined-length sequence from `pos`; return its end."""
    while True:
        if pos + 8 > len(data):
            raise _Truncated(f"a sequence is not closed before the end (byte {pos})")
        group, element, length = _STRUCT_IMPLICIT.unpack_from(data, pos)
        tag = group << 16 | element
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Unhandled(f"expected an item at byte {pos - 8}")
        if length == _UNDEFINED:
            pos = _skip_item(data, pos, implicit)
        else:
            pos += length


def _skip_item(data: bytes, pos: int, implicit: bool) -> int:
    """Skip the elements of an undefined-length item from `pos`; return its end."""
    while True:
        if pos + 12 > len(data):
            raise _Truncated(f"a sequence item is not closed before the end (byte {pos})")
        group, element, length = _STRUCT_IMPLICIT.unpack_from(data, pos)
        if group << 16 | element == _ITEM_END:
            return pos + 8
        vr = b""
        if implicit:
            header = 8
        else:
            vr = data[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                length, header = _STRUCT_LONG.unpack_from(data, pos + 8)[0], 12
            else:
                length, header = _STRUCT_SHORT.unpack_from(data, pos + 6)[0], 8
        pos += header
        if length == _UNDEFINED:
            pos = _skip_sequence(data, pos, implicit or vr == b"UN")
        else:
            pos += length
        if pos > len(data):
            raise _Truncated(f"an element in a sequence item ends beyond byte {len(data)}")


def _items_end(data: bytes, pos: int) -> int:
    """Return where the items of encapsulated pixel data starting at `pos` end."""
    while True:
        if pos + 8 > len(data):
            raise _Truncated(f"encapsulated Pixel Data is not closed before the end (byte {pos})")
        group, element, length = _STRUCT_IMPLICIT.unpack_from(data, pos)
        tag = group << 16 | element
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM or length == _UNDEFINED:
            raise _Unhandled(f"malformed encapsulated pixel data at byte {pos}")
        if pos + 8 + length > len(data):
            raise _Truncated(f"a Pixel Data fragment needs {length} bytes from byte {pos + 8}")
        pos += 8 + length


# -- the fast path for native grayscale single-frame images --------------------------------
#
# The walk above still leaves pydicom to convert the kept elements (DS, IS, US ... through
# Dataset access) and to decode the pixel data, which for a CT slice cost more than the walk
# itself. For the commonest case, one native MONOCHROME frame of 8, 16 or 32 bits, both are
# done here from the raw element values: the values are read only when they are in the
# plain form (a regular expression per VR); anything else (another VR, odd characters,
# several values where one is expected, a size that does not match the Pixel Data length)
# returns None and goes through pydicom as before. The pixels are a read-only view of the
# input; where Bits Stored < Bits Allocated, the unused bits are cleared (unsigned) or
# sign-extended (signed) into a new array in one vectorised pass, as pydicom's
# _correct_unused_bits does with its shift pair. The results are the same Frames, voxel
# for voxel and attribute for attribute (tests/imgindex/test_volume.py compares them).

_NATIVE_SYNTAXES: Final = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
_DS_VALUE: Final = re.compile(r" *[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)? *")
_IS_VALUE: Final = re.compile(r" *[+-]?[0-9]+ *")
_UI_VALUE: Final = re.compile(r"[0-9.]*")
_MONOCHROME: Final = {b"MONOCHROME1 ": "MONOCHROME1", b"MONOCHROME2 ": "MONOCHROME2"}
_T_SOP_INSTANCE_UID: Final = 0x00080018
_T_INSTANCE_NUMBER: Final = 0x00200013
_T_NUMBER_OF_FRAMES: Final = 0x00280008
_T_POSITION: Final = 0x00200032
_T_ORIENTATION: Final = 0x00200037
_T_PIXEL_SPACING: Final = 0x00280030
_T_IMAGER_PIXEL_SPACING: Final = 0x00181164
_T_SLICE_THICKNESS: Final = 0x00180050
_T_RESCALE_SLOPE: Final = 0x00281053
_T_RESCALE_INTERCEPT: Final = 0x00281052
_T_PHOTOMETRIC: Final = 0x00280004
_T_SAMPLES: Final = 0x00280002
_T_ROWS: Final = 0x00280010
_T_COLUMNS: Final = 0x00280011
_T_BITS_ALLOCATED: Final = 0x00280100
_T_BITS_STORED: Final = 0x00280101
_T_REPRESENTATION: Final = 0x00280103
#: The dictionary VR of each element read from raw bytes here.
_RAW_VRS: Final = {
    _T_SOP_INSTANCE_UID: "UI",
    _T_INSTANCE_NUMBER: "IS",
    _T_NUMBER_OF_FRAMES: "IS",
    _T_POSITION: "DS",
    _T_ORIENTATION: "DS",
    _T_PIXEL_SPACING: "DS",
    _T_IMAGER_PIXEL_SPACING: "DS",
    _T_SLICE_THICKNESS: "DS",
    _T_RESCALE_SLOPE: "DS",
    _T_RESCALE_INTERCEPT: "DS",
    _T_PHOTOMETRIC: "CS",
    _T_SAMPLES: "US",
    _T_ROWS: "US",
    _T_COLUMNS: "US",
    _T_BITS_ALLOCATED: "US",
    _T_BITS_STORED: "US",
    _T_REPRESENTATION: "US",
}
_T_EXTENDED_OFFSETS: Final = _tags("ExtendedOffsetTable", "ExtendedOffsetTableLengths")


def _raw_bytes(raw: dict[BaseTag, DataElement | RawDataElement], tag: int) -> bytes | None:
    """The value of `tag` as stored; None if absent or empty; _Unhandled if not plain."""
    element = raw.get(tag)  # type: ignore[call-overload]
    if element is None:
        return None
    if not isinstance(element, RawDataElement) or element.VR not in (None, _RAW_VRS[tag]):
        raise _Unhandled(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) is not a plain raw element")
    value = element.value
    if not isinstance(value, bytes):
        raise _Unhandled("not bytes")
    return value or None


def _raw_text(raw: dict[BaseTag, DataElement | RawDataElement], tag: int) -> str | None:
    value = _raw_bytes(raw, tag)
    if value is None:
        return None
    if not value.isascii():
        raise _Unhandled("not ASCII")
    return value.decode("ascii")


def _raw_ds(
    raw: dict[BaseTag, DataElement | RawDataElement], tag: int, n: int
) -> tuple[float, ...] | None:
    """What _floats(ds.get(tag), n) (or _float, n=0) gives for a plain DS value."""
    text = _raw_text(raw, tag)
    if text is None:
        return None
    parts = text.split("\\")
    if not all(_DS_VALUE.fullmatch(part) for part in parts):
        raise _Unhandled("not a plain DS value")
    if len(parts) != max(n, 1):
        if n == 0:
            raise _Unhandled("several values where one is expected")
        return None  # _floats: the wrong number of values
    numbers = tuple(float(part) for part in parts)
    # _float and _floats: None unless finite (a huge exponent overflows to infinity).
    return numbers if all(math.isfinite(v) for v in numbers) else None


def _raw_is(raw: dict[BaseTag, DataElement | RawDataElement], tag: int) -> int | None:
    text = _raw_text(raw, tag)
    if text is None:
        return None
    if not _IS_VALUE.fullmatch(text):
        raise _Unhandled("not a plain IS value")
    return int(text)


def _raw_us(raw: dict[BaseTag, DataElement | RawDataElement], tag: int) -> int:
    value = _raw_bytes(raw, tag)
    if value is None or len(value) != 2:
        raise _Unhandled("not one US value")
    number: int = _STRUCT_SHORT.unpack(value)[0]
    return number


def _raw_float(raw: dict[BaseTag, DataElement | RawDataElement], tag: int) -> float | None:
    numbers = _raw_ds(raw, tag, 0)
    return None if numbers is None else numbers[0]


def _native_frames(instance: _Instance) -> list[Frame] | None:
    """Decode one native MONOCHROME frame from raw values; None if not that plain case."""
    raw, source = instance.raw, instance.source
    if (
        raw is None
        or not isinstance(source, memoryview)
        or instance.transfer_syntax not in _NATIVE_SYNTAXES
        or instance.pixel_options.get("pixel_keyword") != "PixelData"
        or any(tag in raw for tag in _T_EXTENDED_OFFSETS)
    ):
        return None
    try:
        photometric = _MONOCHROME.get(_raw_bytes(raw, _T_PHOTOMETRIC) or b"")
        if photometric is None or _raw_us(raw, _T_SAMPLES) != 1:
            return None
        rows, cols = _raw_us(raw, _T_ROWS), _raw_us(raw, _T_COLUMNS)
        allocated, stored = _raw_us(raw, _T_BITS_ALLOCATED), _raw_us(raw, _T_BITS_STORED)
        representation = _raw_us(raw, _T_REPRESENTATION)
        if (
            rows == 0
            or cols == 0
            or allocated not in (8, 16, 32)
            or not 1 <= stored <= allocated
            or representation not in (0, 1)
            or _raw_is(raw, _T_NUMBER_OF_FRAMES) not in (None, 1)
        ):
            return None
        expected = rows * cols * (allocated // 8)
        if len(source) not in (expected, expected + expected % 2):
            return None  # short (an error) or with excess padding (a warning): pydicom's
        uid = (_raw_text(raw, _T_SOP_INSTANCE_UID) or "").rstrip("\0 ")
        if not _UI_VALUE.fullmatch(uid):
            return None
        position = _raw_ds(raw, _T_POSITION, 3)
        orientation = _raw_ds(raw, _T_ORIENTATION, 6)
        spacing = _raw_ds(raw, _T_PIXEL_SPACING, 2) or _raw_ds(raw, _T_IMAGER_PIXEL_SPACING, 2)
        thickness = _raw_float(raw, _T_SLICE_THICKNESS)
        slope = _raw_float(raw, _T_RESCALE_SLOPE)
        intercept = _raw_float(raw, _T_RESCALE_INTERCEPT)
        instance_number = _raw_is(raw, _T_INSTANCE_NUMBER)
    except (_Unhandled, UnicodeDecodeError, ValueError, struct.error):
        return None
    dtype = np.dtype(f"<{'ui'[representation]}{allocated // 8}")
    pixels = np.frombuffer(source, dtype=dtype, count=rows * cols).reshape(rows, cols)
    if stored < allocated:
        # What pydicom's _correct_unused_bits gives (a left then a right shift), in one
        # pass into a new array: the view stays untouched.
        out = np.empty_like(pixels)
        if representation:
            shift = dtype.type(allocated - stored)
            np.left_shift(pixels, shift, out=out)
            np.right_shift(out, shift, out=out)
        else:
            np.bitwise_and(pixels, dtype.type((1 << stored) - 1), out=out)
        pixels = out
    return [
        Frame(
            pixels=pixels,
            sop_instance_uid=uid,
            frame=0,
            position=None if position is None else (position[0], position[1], position[2]),
            orientation=orientation,
            pixel_spacing=None if spacing is None else (spacing[0], spacing[1]),
            slice_thickness=thickness,
            rescale_slope=slope,
            rescale_intercept=intercept,
            instance_number=instance_number,
            photometric=photometric,
            bits_stored=stored,
            pixel_representation=representation,
        )
    ]
