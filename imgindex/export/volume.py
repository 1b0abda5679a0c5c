"""Decode the instances of one series and assemble their frames into volumes.

This is the CPU-bound core of ``imgindex export``: a worker process gets the Part 10 bytes
of every instance of a series, calls :func:`decode_instance` on each, and :func:`assemble`
on all the frames. The result is one :class:`Volume` per array to write.

Decoding
--------
Pixels are decoded by pydicom (pylibjpeg-libjpeg, -openjpeg, -rle and pyjpegls behind it)
and kept as **stored values**: no Modality LUT (rescale slope and intercept are reported,
not applied), no VOI LUT or windowing, no palette lookup, no MONOCHROME1 inversion and no
colour-space conversion. The only changes are the ones decoding itself makes, all lossless:

* bits above Bits Stored are cleared (or sign-extended) as pydicom always does (PS3.5 8.1.1);
  JPEG 2000 and JPEG-LS values whose signedness differs from Pixel Representation are
  corrected; 1-bit data are unpacked to one ``uint8`` per pixel;
* colour images are returned colour-by-pixel, ``(rows, cols, samples)``;
* ``YBR_FULL_422`` chroma is upsampled to full resolution (by pydicom for native data, by
  the JPEG decoder for JPEG Baseline), so such frames report ``YBR_FULL``. JPEG Baseline
  YCbCr images therefore stay YCbCr; :func:`decode_instance` converts them to RGB only
  when asked (``as_rgb=True``, what ``Dataset.pixel_array`` does by default; the conversion
  rounds, so it is lossy);
* JPEG 2000's multi-component transform (``YBR_ICT``, ``YBR_RCT``) is part of the codestream
  and undone by OpenJPEG, so those frames report ``RGB``.

Frames keep the dtype pydicom gives them (big endian for Explicit VR Big Endian data);
volumes are in native byte order.

A file cut short (an interrupted transfer) is ``undecodable``, not ``no_pixel_data``, even
where pydicom reads the part that is there without complaint. So is a JPEG, JPEG-LS or
JPEG 2000 codestream that does not end with its end marker: their decoders turn a cut or
zero-filled tail into wrong pixels without an error. Damage inside a codestream cannot be
seen (DICOM carries no checksum of the pixel data); compare with a hash from the source for
that.

For speed, little endian files without functional groups are not read with ``dcmread``:
a walk over their top-level elements keeps only the attributes used here, and native pixel
data are decoded from a view of the input bytes. One native MONOCHROME frame of 8, 16 or
32 bits (the common CT and MR slice) is read further without pydicom: the few attribute
values used are converted from their raw bytes when they are in plain form, and the pixels
are a view of the input, or, when Bits Stored < Bits Allocated, a new array with the unused
bits cleared or sign-extended in one vectorised pass, exactly as pydicom does. Together this
is several times faster than ``dcmread`` on a CT slice; everything else, and every error,
goes through ``dcmread``, and the tests check that the paths find the same attributes and
the same pixel data.

Assembly rules
--------------
:func:`assemble` applies these rules, in this order:

1. **Groups.** Frames are grouped by size (Rows, Columns), pixel format (samples per pixel,
   dtype, photometric interpretation) and orientation: ImageOrientationPatient equal within
   :data:`ORIENTATION_TOLERANCE` per cosine. Frames without both a position and an
   orientation form groups of their own. More than one group is an error,
   ``mixed_sizes``, ``mixed_pixel_format`` or ``mixed_orientation`` (checked in that
   order), unless ``split=True``: then every group becomes its own volume, the volumes
   ordered by their first (InstanceNumber, SOPInstanceUID, frame).
2. **Geometry.** A group whose frames all have ImagePositionPatient and
   ImageOrientationPatient (or, in enhanced multi-frame objects, the per-frame or shared
   Plane Position and Plane Orientation functional groups) is sorted by the projection of
   its positions on the slice normal, the cross product of the row and column direction
   cosines (PS3.3 C.7.6.2.1.1), from the lowest to the highest. Then:

   * two frames within :data:`SAME_POSITION_MM` of each other along the normal are
     ``duplicate_positions``;
   * PixelSpacing must agree between slices within ``spacing_tolerance`` (relative), else
     ``non_uniform_spacing``;
   * positions that wander off the line through the first position along the normal by
     more than ``drift_tolerance`` pixels (gantry tilt written as a tilted plane stepped
     along the table, or a shear) are ``non_uniform_spacing``;
   * the gaps between consecutive slices must equal their median within
     ``spacing_tolerance``. If instead every gap is a whole multiple of the median gap
     (or of the smallest gap, provided fewer slices are then missing than are present),
     the error is ``missing_slices``, saying how many are missing and between which
     slices; otherwise it is ``non_uniform_spacing``.

   The result has ``geometry="volume"`` (``"single"`` for one frame).
3. **No geometry.** Frames without position or orientation (Secondary Capture, projection
   radiographs, cine and other multi-frame instances with no per-frame positions) make
   a ``"single"`` image, or a ``"stack"`` ordered by (InstanceNumber, SOPInstanceUID,
   frame); nothing about their spacing along the stack is known.

Spatial metadata of a :class:`Volume`:

* ``spacing`` is ``(z, y, x)`` in mm: the mean step along the normal, then PixelSpacing
  (row spacing, column spacing). It is set only when all three are known: for a
  ``"volume"``; for a ``"single"`` image with a position, orientation and PixelSpacing,
  z is its SliceThickness (None without one). A ``"stack"`` has no spacing.
* ``pixel_spacing`` is the in-plane ``(row, column)`` spacing in mm whenever the frames
  agree on it, with or without the rest of the geometry. It comes from PixelSpacing
  (0028,0030) (or the Pixel Measures functional group) and, when that is absent, from
  ImagerPixelSpacing (0018,1164), which is measured at the detector of a projection
  radiograph and not corrected for geometric magnification.
* ``origin`` is the ImagePositionPatient of slice 0: the LPS centre of voxel ``[0, 0, 0]``.
* ``direction`` holds three LPS unit vectors, one per **row** of the tuple: the x axis
  (the direction in which the column index increases: ImageOrientationPatient[0:3]), the
  y axis (row index increases: ImageOrientationPatient[3:6]) and the z axis (slice index
  increases: the normal). Voxel ``pixels[k, j, i]`` is centred at
  ``origin + i*sx*X + j*sy*Y + k*sz*Z`` with ``(sz, sy, sx) = spacing`` and
  ``(X, Y, Z) = direction``.

  SimpleITK / ITK: ``img = sitk.GetImageFromArray(pixels)``, ``img.SetSpacing(spacing[::-1])``,
  ``img.SetOrigin(origin)``, ``img.SetDirection(np.array(direction).T.ravel())`` (ITK's
  direction matrix has the axes as *columns*). nibabel (RAS+, ``(i, j, k)`` index order):
  ``data = pixels.transpose(2, 1, 0)`` and ``affine[:3, :3] = diag(-1, -1, 1) @
  np.array(direction).T @ diag(spacing[::-1])``, ``affine[:3, 3] = diag(-1, -1, 1) @
  origin``.
"""

from __future__ import annotations

import logging
import math
import re
import struct
import warnings
from dataclasses import dataclass, replace
from io import BytesIO
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from imgindex.errors import ImgindexError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from numpy.typing import NDArray
    from pydicom.dataelem import DataElement
    from pydicom.pixels.decoders.base import Decoder

__all__ = [
    "ORIENTATION_TOLERANCE",
    "REASONS",
    "SAME_POSITION_MM",
    "Frame",
    "Volume",
    "VolumeError",
    "assemble",
    "decode_instance",
]

logger = logging.getLogger(__name__)

#: Machine-readable reasons of :class:`VolumeError`.
REASONS: Final = (
    "no_pixel_data",
    "undecodable",
    "unsupported_transfer_syntax",
    "missing_slices",
    "mixed_sizes",
    "mixed_orientation",
    "duplicate_positions",
    "non_uniform_spacing",
    "mixed_pixel_format",
    "not_dicom",
)
#: Largest difference of one direction cosine for two frames to share an orientation.
ORIENTATION_TOLERANCE: Final = 1e-4
#: Frames closer than this along the slice normal (mm) are at the same position.
SAME_POSITION_MM: Final = 1e-3

#: Pixel Data (7FE0,0010), Float Pixel Data (7FE0,0008), Double Float Pixel Data (7FE0,0009).
_PIXEL_KEYWORDS: Final = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: Listed in messages before "...".
_SHOWN: Final = 5
#: Marks an attribute missing from a functional group (rather than present but empty).
_ABSENT: Final = object()


class VolumeError(ImgindexError, ValueError):
    """An instance cannot be decoded, or a series cannot be assembled into a volume.

    Parameters
    ----------
    reason : str
        One of :data:`REASONS`.
    message : str
        What is wrong and where, for people.

    Attributes
    ----------
    reason : str
    message : str
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {REASONS}, not {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[VolumeError], tuple[str, str]]:
        # Workers raise it in another process: pickle both arguments, not just the message.
        return (type(self), (self.reason, self.message))


@dataclass(eq=False, slots=True)
class Frame:
    """One decoded 2-D frame and the attributes that place it.

    Attributes
    ----------
    pixels : numpy.ndarray
        ``(rows, cols)`` or ``(rows, cols, samples)`` stored values, in the dtype pydicom
        decodes to. May be a read-only view on the instance's pixel data.
    sop_instance_uid : str
        SOPInstanceUID (0008,0018) of its instance.
    frame : int
        0-based frame number within its instance.
    position : tuple of 3 float or None
        ImagePositionPatient (0020,0032) in mm, LPS: per frame from the Plane Position
        functional group of enhanced objects, or from GridFrameOffsetVector (3004,000C) for
        RT Dose. None when unknown, also for the frames of multi-frame instances with one
        position for all (cine).
    orientation : tuple of 6 float or None
        ImageOrientationPatient (0020,0037): row then column direction cosines.
    pixel_spacing : tuple of 2 float or None
        (row spacing, column spacing) in mm: PixelSpacing (0028,0030) or the Pixel Measures
        functional group, else ImagerPixelSpacing (0018,1164).
    slice_thickness : float or None
        SliceThickness (0018,0050) in mm.
    rescale_slope, rescale_intercept : float or None
        RescaleSlope (0028,1053) and RescaleIntercept (0028,1052), per frame from the Pixel
        Value Transformation functional group of enhanced objects. Not applied.
    instance_number : int or None
        InstanceNumber (0020,0013) of its instance.
    photometric : str
        Photometric interpretation of ``pixels`` as decoded (see the module notes).
    bits_stored : int
        BitsStored (0028,0101).
    pixel_representation : int
        0 unsigned, 1 two's complement (0028,0103).
    """

    pixels: NDArray[Any]
    sop_instance_uid: str
    frame: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    rescale_slope: float | None
    rescale_intercept: float | None
    instance_number: int | None
    photometric: str
    bits_stored: int
    pixel_representation: int


@dataclass(eq=False)
class Volume:
    """Frames of one series assembled into one array; see the module notes for the rules.

    Attributes
    ----------
    pixels : numpy.ndarray
        ``(z, y, x)`` or ``(z, y, x, samples)``, C-contiguous, native byte order.
    spacing : tuple of 3 float or None
        ``(z, y, x)`` voxel spacing in mm.
    origin : tuple of 3 float or None
        LPS position (mm) of the centre of voxel ``[0, 0, 0]``.
    direction : tuple of 3 tuples of 3 float or None
        Rows are the LPS unit vectors of the x (column index), y (row index) and z (slice
        index) axes.
    rescale_slope, rescale_intercept : float, list of float or None
        One value when every slice has the same, else one per slice (z order); None when no
        frame has one. A slice without one counts as slope 1, intercept 0.
    sop_instance_uids : list of str
        SOPInstanceUID of each slice, in z order.
    frames : list of int
        Frame number (0-based, within its instance) of each slice, in z order.
    instances : int
        Number of distinct instances in the volume.
    geometry : str
        ``"volume"`` (ordered along the normal), ``"single"`` (one 2-D image) or ``"stack"``
        (no geometry: ordered by InstanceNumber, then frame).
    pixel_spacing : tuple of 2 float or None
        In-plane (row, column) spacing in mm, when known and the same for every slice.
    photometric : str
        Photometric interpretation of ``pixels``.
    """

    pixels: NDArray[Any]
    spacing: tuple[float, float, float] | None
    origin: tuple[float, float, float] | None
    direction: tuple[tuple[float, float, float], ...] | None
    rescale_slope: float | list[float] | None
    rescale_intercept: float | list[float] | None
    sop_instance_uids: list[str]
    frames: list[int]
    instances: int
    geometry: str
    pixel_spacing: tuple[float, float] | None
    photometric: str


# -- decoding -----------------------------------------------------------------------------


def decode_instance(data: bytes, *, as_rgb: bool = False) -> list[Frame]:
    """Decode every frame of one DICOM instance.

    Parameters
    ----------
    data : bytes
        The instance as a DICOM File (PS3.10: preamble, ``DICM``, file meta).
    as_rgb : bool
        Convert ``YBR_FULL`` and ``YBR_FULL_422`` frames to RGB, as ``Dataset.pixel_array``
        does by default. Off by default: the conversion rounds.

    Returns
    -------
    list of Frame
        In frame order.

    Raises
    ------
    VolumeError
        With reason ``not_dicom`` (not a readable DICOM File, or no transfer syntax in its
        file meta), ``no_pixel_data``, ``unsupported_transfer_syntax`` (no decoder for it
        here, e.g. MPEG video) or ``undecodable`` (the decoder failed: corrupt or truncated
        pixel data, or Image Pixel attributes that do not describe it).
    """
    return _decode_instance(data, as_rgb=as_rgb, fast=True)


def _decode_instance(data: bytes, *, as_rgb: bool, fast: bool) -> list[Frame]:
    """:func:`decode_instance`; ``fast=False`` always parses with ``pydicom.dcmread``."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            # pydicom warns about what it tolerates (odd values, a photometric interpretation
            # that disagrees with the JPEG codestream); such an instance still decodes.
            warnings.simplefilter("always")
            try:
                instance = _parse_fast(data) if fast else None
            except _Truncated as exc:
                # dcmread may still make sense of it (the walk assumes well-formed data);
                # if not, that the file is cut short is the better explanation.
                try:
                    return _frames(_parse(data), as_rgb=as_rgb)
                except VolumeError as error:
                    raise VolumeError(
                        "undecodable",
                        f"the file is cut short ({len(data)} bytes): {exc}; was the transfer "
                        "interrupted?",
                    ) from error
            if instance is not None:
                frames = _native_frames(instance)
                if frames is not None:
                    return frames
            return _frames(instance or _parse(data), as_rgb=as_rgb)
    finally:
        for warning in caught:
            logger.debug("pydicom warned: %s", warning.message)


def _frames(instance: _Instance, *, as_rgb: bool) -> list[Frame]:
    """Decode the pixel data of a parsed instance into frames."""
    ds = instance.header
    uid = str(ds.get("SOPInstanceUID", "") or "")
    name = uid or "(no SOPInstanceUID)"
    decoder = _decoder(instance.transfer_syntax, name)
    pixels, properties = _decode(decoder, instance, name, as_rgb=as_rgb)
    planes = _planes(ds, len(pixels))
    photometric = str(properties["photometric_interpretation"])
    if photometric == "YBR_FULL_422":
        # Decoded frames are full resolution whichever decoder upsampled the chroma.
        photometric = "YBR_FULL"
    # Float Pixel Data has neither: 0 then.
    bits_stored = _int(properties.get("bits_stored")) or _int(ds.get("BitsStored")) or 0
    representation = _int(properties.get("pixel_representation")) or 0
    instance_number = _int(ds.get("InstanceNumber"))
    return [
        Frame(
            pixels=pixels[index],
            sop_instance_uid=uid,
            frame=index,
            position=plane.position,
            orientation=plane.orientation,
            pixel_spacing=plane.pixel_spacing,
            slice_thickness=plane.slice_thickness,
            rescale_slope=plane.rescale_slope,
            rescale_intercept=plane.rescale_intercept,
            instance_number=instance_number,
            photometric=photometric,
            bits_stored=bits_stored,
            pixel_representation=representation,
        )
        for index, plane in enumerate(planes)
    ]


@dataclass(frozen=True, slots=True)
class _Instance:
    """A parsed instance: its attributes and where its pixel data is."""

    #: The attributes :func:`_planes` and the decoder read (on pydicom's path, all).
    header: Dataset
    transfer_syntax: UID | None
    #: The dataset itself (pydicom's path), or the Pixel Data value (the fast path).
    source: Dataset | bytes | memoryview
    #: For a buffer source: pixel_keyword and pixel_vr (the rest comes from `header`).
    pixel_options: dict[str, str]
    #: The fast path's kept elements, unconverted (what `header` was built from).
    raw: dict[BaseTag, DataElement | RawDataElement] | None = None


def _parse(data: bytes) -> _Instance:
    """Parse `data` with ``pydicom.dcmread``: every transfer syntax and structure."""
    try:
        ds = dcmread(BytesIO(data))
    except InvalidDicomError as exc:
        raise VolumeError("not_dicom", f"not a DICOM File: {exc}") from exc
    except Exception as exc:  # pydicom raises many types on a broken structure
        message = f"pydicom cannot parse it: {type(exc).__name__}: {exc}"
        raise VolumeError("not_dicom", message) from exc
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        sop_class = ds.get("SOPClassUID")
        what = f" ({UID(str(sop_class)).name})" if sop_class else ""
        hint = (
            "; it has Rows (0028,0010), so its pixel data may have been cut off or left out"
            if "Rows" in ds
            else ""
        )
        raise VolumeError(
            "no_pixel_data",
            f"instance {ds.get('SOPInstanceUID') or '(no SOPInstanceUID)'}{what} has no "
            "Pixel Data (7FE0,0010), Float Pixel Data (7FE0,0008) or Double Float Pixel Data "
            f"(7FE0,0009){hint}",
        )
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    return _Instance(ds, UID(str(ts)) if ts else None, ds, {})


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
#: Syntaxes whose codestreams end with FFD9; see _check_end_markers.
_MARKED_SYNTAXES: Final = frozenset(
    [*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes]
)
_END_MARKER: Final = b"\xff\xd9"


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


def _decoder(ts: UID | None, uid: str) -> Decoder:
    if not ts:
        raise VolumeError(
            "not_dicom",
            f"instance {uid}: the file meta has no Transfer Syntax UID (0002,0010) "
            "(PS3.10 7.1), so its pixel data cannot be interpreted",
        )
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        name = ts.name if ts.is_transfer_syntax else "an unknown transfer syntax"
        raise VolumeError(
            "unsupported_transfer_syntax",
            f"instance {uid}: no pixel decoder for {ts} ({name}); transcode it first "
            "(e.g. dcmdjpeg, gdcmconv --raw)",
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise VolumeError(
            "unsupported_transfer_syntax",
            f"instance {uid}: no installed decoder for {ts} ({ts.name}); missing {missing}",
        )
    return decoder


def _decode(
    decoder: Decoder, instance: _Instance, uid: str, *, as_rgb: bool
) -> tuple[NDArray[Any], dict[str, str | int]]:
    """Return all frames as one ``(frames, rows, cols[, samples])`` array and its properties."""
    ds = instance.header
    options: dict[str, Any] = {"raw": not as_rgb}
    if not decoder.UID.is_encapsulated:
        # A read-only view on the Pixel Data bytes, unless pydicom must clear unused bits,
        # which needs a copy anyway (and asking for a view then only logs a warning).
        allocated, stored = ds.get("BitsAllocated"), ds.get("BitsStored")
        options["view_only"] = allocated is not None and allocated == stored
    try:
        if instance.source is not ds:
            options.update(as_pixel_options(ds), **instance.pixel_options)
        pixels, properties = decoder.as_array(instance.source, **options)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # every plugin raises its own types; pyo3 panics (from
        # pylibjpeg-rle on damaged data) derive from BaseException
        text = str(exc).strip().replace("\n", " ")
        raise VolumeError(
            "undecodable",
            f"instance {uid} ({decoder.UID.name}): cannot decode its pixel data: "
            f"{type(exc).__name__}: {text}",
        ) from exc
    if int(properties.get("number_of_frames", 1)) == 1:
        pixels = pixels[np.newaxis]
    if decoder.UID in _MARKED_SYNTAXES:
        _check_end_markers(instance, decoder.UID, uid, len(pixels))
    return pixels, properties


def _check_end_markers(instance: _Instance, ts: UID, uid: str, n_frames: int) -> None:
    """Raise undecodable if a codestream does not end with its EOI/EOC marker.

    OpenJPEG, libjpeg and CharLS decode a codestream whose end is missing or zeroed without
    complaint, into wrong pixels. Every JPEG, JPEG-LS and JPEG 2000 codestream ends with
    FFD9 (ISO/IEC 10918-1 B.2.1, 14495-1 C.2.1, 15444-1 A.4.4), followed at most by the
    padding that makes a fragment even (PS3.5 A.4), 00 or, from some writers, FF.
    """
    buffer: bytes
    if isinstance(instance.source, Dataset):
        buffer = instance.source.PixelData
    elif isinstance(instance.source, bytes):
        buffer = instance.source
    else:
        return  # a view: native data, which has no markers
    try:
        codestreams = list(generate_frames(buffer, number_of_frames=n_frames))
    except Exception:  # noqa: BLE001 - the decoder read it; the check just cannot apply
        return
    for index, codestream in enumerate(codestreams):
        if not codestream.rstrip(b"\x00\xff").endswith(_END_MARKER):
            raise VolumeError(
                "undecodable",
                f"instance {uid} ({ts.name}): the codestream of frame {index} does not end "
                "with its end marker (FFD9): it is cut short or damaged, and would decode "
                "to wrong pixels",
            )


@dataclass(frozen=True, slots=True)
class _Plane:
    position: tuple[float, float, float] | None = None
    orientation: tuple[float, ...] | None = None
    pixel_spacing: tuple[float, float] | None = None
    slice_thickness: float | None = None
    rescale_slope: float | None = None
    rescale_intercept: float | None = None


def _planes(ds: Dataset, n_frames: int) -> list[_Plane]:
    """Return the plane and pixel value attributes of each of the `n_frames` frames."""
    top = _Plane(
        position=_position(ds.get("ImagePositionPatient")),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=_pair(ds.get("PixelSpacing")) or _pair(ds.get("ImagerPixelSpacing")),
        slice_thickness=_float(ds.get("SliceThickness")),
        rescale_slope=_float(ds.get("RescaleSlope")),
        rescale_intercept=_float(ds.get("RescaleIntercept")),
    )
    shared_groups = ds.get("SharedFunctionalGroupsSequence")
    per_frame_groups = ds.get("PerFrameFunctionalGroupsSequence")
    if shared_groups or per_frame_groups:
        # Enhanced objects (PS3.3 C.7.6.16): each frame's macros, else the shared ones,
        # else the top level (where legacy converted objects may keep some).
        shared = _functional_plane(shared_groups[0], top) if shared_groups else top
        per_frame = per_frame_groups or []
        planes = [
            _functional_plane(per_frame[index], shared) if index < len(per_frame) else shared
            for index in range(n_frames)
        ]
        if n_frames > 1 and not any("PlanePositionSequence" in item for item in per_frame):
            # One shared position for every frame: a cine, as below.
            planes = [replace(plane, position=None) for plane in planes]
        return planes
    if n_frames == 1:
        return [top]
    offsets = _floats(ds.get("GridFrameOffsetVector"), n_frames)
    if offsets is not None and top.position is not None and top.orientation is not None:
        # RT Dose (PS3.3 C.8.8.3.2): offsets along the normal from the first position
        # when the first is 0, else z coordinates of an axial dose grid.
        normal = np.cross(top.orientation[:3], top.orientation[3:])
        origin = np.asarray(top.position, dtype=np.float64)
        positions = [
            _triple(origin + offset * normal)
            if offsets[0] == 0
            else (top.position[0], top.position[1], offset)
            for offset in offsets
        ]
        return [replace(top, position=p) for p in positions]
    # A cine or other classic multi-frame instance: one position for every frame says
    # nothing about where each frame is, so the frames form a stack.
    return [replace(top, position=None)] * n_frames


def _functional_plane(groups: Dataset, fallback: _Plane) -> _Plane:
    """Read the Plane Position, Plane Orientation, Pixel Measures and Pixel Value
    Transformation macros of one functional groups item (PS3.3 C.7.6.16.2)."""
    position = _macro(groups, "PlanePositionSequence", "ImagePositionPatient")
    orientation = _macro(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = _macro(groups, "PixelMeasuresSequence", "PixelSpacing")
    thickness = _macro(groups, "PixelMeasuresSequence", "SliceThickness")
    slope = _macro(groups, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _macro(groups, "PixelValueTransformationSequence", "RescaleIntercept")
    return _Plane(
        position=fallback.position if position is _ABSENT else _position(position),
        orientation=fallback.orientation if orientation is _ABSENT else _floats(orientation, 6),
        pixel_spacing=fallback.pixel_spacing if spacing is _ABSENT else _pair(spacing),
        slice_thickness=fallback.slice_thickness if thickness is _ABSENT else _float(thickness),
        rescale_slope=fallback.rescale_slope if slope is _ABSENT else _float(slope),
        rescale_intercept=(
            fallback.rescale_intercept if intercept is _ABSENT else _float(intercept)
        ),
    )


def _macro(groups: Dataset, sequence_keyword: str, keyword: str) -> Any:
    """Return `keyword` of the first item of `sequence_keyword` in `groups`, or _ABSENT."""
    sequence = groups.get(sequence_keyword)
    if not sequence or keyword not in sequence[0]:
        return _ABSENT
    return sequence[0].get(keyword)


def _float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    """Return `value` as `n` finite floats, or None if it is anything else."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(numbers) != n or not all(math.isfinite(v) for v in numbers):
        return None
    return numbers


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


def _position(value: Any) -> tuple[float, float, float] | None:
    numbers = _floats(value, 3)
    return None if numbers is None else (numbers[0], numbers[1], numbers[2])


def _pair(value: Any) -> tuple[float, float] | None:
    numbers = _floats(value, 2)
    return None if numbers is None else (numbers[0], numbers[1])


def _triple(values: NDArray[np.float64]) -> tuple[float, float, float]:
    return (float(values[0]), float(values[1]), float(values[2]))


# -- assembly -----------------------------------------------------------------------------


@dataclass
class _Group:
    size: tuple[int, int]
    pixel_format: tuple[int, np.dtype[Any], str]
    orientation: tuple[float, ...] | None
    frames: list[Frame]


def assemble(
    frames: Sequence[Frame],
    *,
    split: bool = False,
    spacing_tolerance: float = 0.01,
    drift_tolerance: float = 0.5,
) -> list[Volume]:
    """Assemble the decoded frames of one series into volumes.

    The rules (grouping, ordering along the normal, geometry checks) are in the module
    notes.

    Parameters
    ----------
    frames : sequence of Frame
        Every frame of the series, in any order.
    split : bool
        Return one volume per group of frames of one size, pixel format and orientation,
        instead of raising when there are several.
    spacing_tolerance : float
        Largest relative difference between a gap of consecutive slices and the common
        step (also between PixelSpacing values), e.g. ``0.01`` for 1 %.
    drift_tolerance : float
        Largest distance, in pixels (of the smaller PixelSpacing; 1 mm if unknown), of a
        slice position from the line through the first position along the normal.

    Returns
    -------
    list of Volume
        One volume, or with `split` one per group.

    Raises
    ------
    VolumeError
        With reason ``mixed_sizes``, ``mixed_pixel_format`` or ``mixed_orientation``
        (several groups, without `split`), ``duplicate_positions``, ``missing_slices`` or
        ``non_uniform_spacing``.
    ValueError
        If `frames` is empty or a tolerance is out of range.
    """
    if not frames:
        raise ValueError("frames is empty: there is nothing to assemble")
    if not 0 <= spacing_tolerance < 0.5:
        raise ValueError(f"spacing_tolerance must be in [0, 0.5), not {spacing_tolerance}")
    if drift_tolerance < 0:
        raise ValueError(f"drift_tolerance must not be negative, not {drift_tolerance}")
    groups = _group(frames)
    if len(groups) > 1 and not split:
        raise _mixed_error(groups)
    groups.sort(key=lambda g: min(_stack_key(f) for f in g.frames))
    return [_assemble_group(g, spacing_tolerance, drift_tolerance) for g in groups]


def _group(frames: Sequence[Frame]) -> list[_Group]:
    groups: list[_Group] = []
    for frame in frames:
        rows, cols = frame.pixels.shape[:2]
        samples = frame.pixels.shape[2] if frame.pixels.ndim == 3 else 1
        size = (int(rows), int(cols))
        pixel_format = (samples, frame.pixels.dtype.newbyteorder("="), frame.photometric)
        orientation = frame.orientation if frame.position is not None else None
        for group in groups:
            if (
                group.size == size
                and group.pixel_format == pixel_format
                and _same_orientation(group.orientation, orientation)
            ):
                group.frames.append(frame)
                break
        else:
            groups.append(_Group(size, pixel_format, orientation, [frame]))
    return groups


def _same_orientation(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> bool:
    if a is None or b is None:
        return a is b
    return all(abs(x - y) <= ORIENTATION_TOLERANCE for x, y in zip(a, b, strict=True))


def _stack_key(frame: Frame) -> tuple[bool, int, str, int]:
    number = frame.instance_number
    return (number is None, number or 0, frame.sop_instance_uid, frame.frame)


def _mixed_error(groups: list[_Group]) -> VolumeError:
    hint = "; pass split=True to export each group as its own stack"

    def size(group: _Group) -> str:
        return f"{group.size[0]}x{group.size[1]}"

    def pixel_format(group: _Group) -> str:
        samples, dtype, photometric = group.pixel_format
        return f"{photometric} {dtype.name} x{samples}"

    def orientation(group: _Group) -> str:
        if group.orientation is None:
            return "no ImagePositionPatient/ImageOrientationPatient"
        return "[" + ", ".join(f"{v:.4g}" for v in group.orientation) + "]"

    for reason, what, label in (
        ("mixed_sizes", "sizes", size),
        ("mixed_pixel_format", "pixel formats", pixel_format),
        ("mixed_orientation", "orientations", orientation),
    ):
        counts: dict[str, int] = {}
        for group in groups:
            counts[label(group)] = counts.get(label(group), 0) + len(group.frames)
        if len(counts) > 1 or reason == "mixed_orientation":
            listed = ", ".join(
                f"{key} ({n} frame{'s' if n != 1 else ''})" for key, n in counts.items()
            )
            return VolumeError(reason, f"frames of {len(counts)} {what}: {listed}{hint}")
    raise AssertionError("unreachable: groups differ in size, format or orientation")


def _assemble_group(group: _Group, spacing_tolerance: float, drift_tolerance: float) -> Volume:
    frames = group.frames
    if group.orientation is None:
        ordered = sorted(frames, key=_stack_key)
        return _volume(
            group,
            ordered,
            geometry="single" if len(ordered) == 1 else "stack",
            spacing=None,
            origin=None,
            direction=None,
            pixel_spacing=_common_spacing(ordered, spacing_tolerance, strict=False),
        )
    row, column, normal = _axes(group.orientation)
    direction = (_triple(row), _triple(column), _triple(normal))
    if len(frames) == 1:
        frame = frames[0]
        pixel_spacing = frame.pixel_spacing
        thickness = frame.slice_thickness
        spacing = (
            (thickness, pixel_spacing[0], pixel_spacing[1])
            if pixel_spacing is not None and thickness is not None and thickness > 0
            else None
        )
        return _volume(
            group,
            frames,
            geometry="single",
            spacing=spacing,
            origin=frame.position,
            direction=direction,
            pixel_spacing=pixel_spacing,
        )
    positions = np.array([f.position for f in frames], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    ordered = [frames[i] for i in order]
    positions, along = positions[order], along[order]
    _check_duplicates(ordered, along)
    pixel_spacing = _common_spacing(ordered, spacing_tolerance, strict=True)
    _check_drift(ordered, positions, normal, pixel_spacing, drift_tolerance)
    step = _check_gaps(ordered, along, spacing_tolerance)
    return _volume(
        group,
        ordered,
        geometry="volume",
        spacing=None if pixel_spacing is None else (step, *pixel_spacing),
        origin=ordered[0].position,
        direction=direction,
        pixel_spacing=pixel_spacing,
    )


def _axes(
    orientation: tuple[float, ...],
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    row = np.asarray(orientation[:3], dtype=np.float64)
    column = np.asarray(orientation[3:], dtype=np.float64)
    row /= np.linalg.norm(row) or 1.0
    column /= np.linalg.norm(column) or 1.0
    normal = np.cross(row, column)
    normal /= np.linalg.norm(normal) or 1.0
    return row, column, normal


def _describe(frame: Frame) -> str:
    number = "" if frame.instance_number is None else f"InstanceNumber {frame.instance_number}, "
    at = "" if frame.frame == 0 else f" frame {frame.frame}"
    return f"{number}{frame.sop_instance_uid}{at}"


def _check_duplicates(ordered: list[Frame], along: NDArray[np.float64]) -> None:
    gaps = np.diff(along)
    same = np.flatnonzero(gaps < SAME_POSITION_MM)
    if not len(same):
        return
    shown = "; ".join(
        f"{_describe(ordered[i])} and {_describe(ordered[i + 1])} at "
        f"{_position_text(ordered[i].position)}"
        for i in same[:_SHOWN]
    )
    more = f"; and {len(same) - _SHOWN} more" if len(same) > _SHOWN else ""
    raise VolumeError(
        "duplicate_positions",
        f"{len(same)} pair(s) of frames at the same position along the slice normal "
        f"(repeated instances, or several echoes, phases or stacks in one series): "
        f"{shown}{more}",
    )


def _position_text(position: tuple[float, float, float] | None) -> str:
    if position is None:
        return "?"
    return "(" + ", ".join(f"{v:.6g}" for v in position) + ")"


def _common_spacing(
    ordered: list[Frame], tolerance: float, *, strict: bool
) -> tuple[float, float] | None:
    """Return the frames' shared PixelSpacing; None if unknown or (unless strict) differing."""
    spacings = [f.pixel_spacing for f in ordered]
    first = spacings[0]
    if first is None or any(s is None for s in spacings):
        return None
    for frame, spacing in zip(ordered, spacings, strict=True):
        assert spacing is not None  # checked above
        if any(abs(a - b) > tolerance * abs(b) for a, b in zip(spacing, first, strict=True)):
            if not strict:
                return None
            raise VolumeError(
                "non_uniform_spacing",
                f"PixelSpacing (0028,0030) differs between slices: {list(first)} mm for "
                f"{_describe(ordered[0])}, {list(spacing)} mm for {_describe(frame)}",
            )
    return first


def _check_drift(
    ordered: list[Frame],
    positions: NDArray[np.float64],
    normal: NDArray[np.float64],
    pixel_spacing: tuple[float, float] | None,
    tolerance: float,
) -> None:
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(in_plane, axis=1)
    pixel = min(pixel_spacing) if pixel_spacing is not None else 1.0
    worst = int(np.argmax(drift))
    if drift[worst] <= tolerance * pixel:
        return
    length = float(np.linalg.norm(offsets[-1]))
    travel = offsets[-1] / length if length else normal
    angle = math.degrees(math.acos(min(1.0, abs(float(travel @ normal)))))
    raise VolumeError(
        "non_uniform_spacing",
        f"slice positions are not along the slice normal (gantry tilt or shear): "
        f"{_describe(ordered[worst])} is {drift[worst]:.3g} mm ({drift[worst] / pixel:.3g} "
        f"pixels) off the line through the first slice; the stack runs {angle:.3g} degrees "
        f"from the normal. Resample it (e.g. dcm2niix's tilt correction) before export",
    )


def _check_gaps(ordered: list[Frame], along: NDArray[np.float64], tolerance: float) -> float:
    """Return the step between slices, or raise missing_slices or non_uniform_spacing."""
    gaps = np.diff(along)
    mean_step = float((along[-1] - along[0]) / (len(along) - 1))
    median = float(np.median(gaps))
    if np.all(np.abs(gaps - median) <= tolerance * median):
        return mean_step
    # The median gap is the step unless most gaps are irregular; the smallest gap is the
    # step only if that explains the stack with fewer slices missing than present (else
    # one stray slice between regular ones would read as many missing).
    for base, most_missing in ((median, math.inf), (float(gaps.min()), len(ordered))):
        multiples = np.rint(gaps / base)
        if (
            np.all(multiples >= 1)
            and np.all(np.abs(gaps - multiples * base) <= tolerance * base)
            and (missing := int((multiples - 1).sum())) <= most_missing
        ):
            where = np.flatnonzero(multiples > 1)
            shown = "; ".join(
                f"{int(multiples[i]) - 1} between {_describe(ordered[i])} "
                f"({along[i]:.6g} mm) and {_describe(ordered[i + 1])} ({along[i + 1]:.6g} mm)"
                for i in where[:_SHOWN]
            )
            more = f"; and {len(where) - _SHOWN} more gaps" if len(where) > _SHOWN else ""
            raise VolumeError(
                "missing_slices",
                f"{missing} slice(s) missing from a stack of {len(ordered)} with a "
                f"{base:.6g} mm step (positions along the normal): {shown}{more}",
            )
    irregular = np.flatnonzero(np.abs(gaps - median) > tolerance * median)
    i = int(irregular[0])
    raise VolumeError(
        "non_uniform_spacing",
        f"gaps between consecutive slices range from {gaps.min():.6g} to {gaps.max():.6g} mm "
        f"(median {median:.6g} mm, tolerance {tolerance:.3g}); {len(irregular)} irregular, "
        f"the first {gaps[i]:.6g} mm between {_describe(ordered[i])} and "
        f"{_describe(ordered[i + 1])}",
    )


def _rescale(values: list[float | None], default: float) -> float | list[float] | None:
    if all(v is None for v in values):
        return None
    filled = [default if v is None else v for v in values]
    return filled[0] if all(v == filled[0] for v in filled) else filled


def _volume(
    group: _Group,
    ordered: list[Frame],
    *,
    geometry: str,
    spacing: tuple[float, float, float] | None,
    origin: tuple[float, float, float] | None,
    direction: tuple[tuple[float, float, float], ...] | None,
    pixel_spacing: tuple[float, float] | None,
) -> Volume:
    first = ordered[0].pixels
    _, dtype, photometric = group.pixel_format
    pixels = np.empty((len(ordered), *first.shape), dtype=dtype)
    for index, frame in enumerate(ordered):
        # One copy per frame, which also swaps big endian data to native order.
        pixels[index] = frame.pixels
    return Volume(
        pixels=pixels,
        spacing=spacing,
        origin=origin,
        direction=direction,
        rescale_slope=_rescale([f.rescale_slope for f in ordered], 1.0),
        rescale_intercept=_rescale([f.rescale_intercept for f in ordered], 0.0),
        sop_instance_uids=[f.sop_instance_uid for f in ordered],
        frames=[f.frame for f in ordered],
        instances=len({f.sop_instance_uid for f in ordered}),
        geometry=geometry,
        pixel_spacing=pixel_spacing,
        photometric=photometric,
    )
