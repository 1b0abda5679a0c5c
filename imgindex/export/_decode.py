"""Decoding one instance into frames: :func:`decode_instance`; see
:mod:`imgindex.export.volume` for the rules."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace
from io import BytesIO
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import (
    UID,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from imgindex.export._frames import (
    Frame,
    VolumeError,
    _float,
    _floats,
    _Instance,
    _int,
    _pair,
    _position,
    _triple,
)
from imgindex.export._rawheader import _native_frames, _parse_fast, _Truncated

if TYPE_CHECKING:
    from numpy.typing import NDArray
    from pydicom.pixels.decoders.base import Decoder

# The public module's name, as before the split, so logging configuration still applies.
logger = logging.getLogger("imgindex.export.volume")


#: Pixel Data (7FE0,0010), Float Pixel Data (7FE0,0008), Double Float Pixel Data (7FE0,0009).
_PIXEL_KEYWORDS: Final = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


#: Marks an attribute missing from a functional group (rather than present but empty).
_ABSENT: Final = object()


#: Syntaxes whose codestreams end with FFD9; see _check_end_markers.
_MARKED_SYNTAXES: Final = frozenset(
    [*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes]
)
_END_MARKER: Final = b"\xff\xd9"


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
