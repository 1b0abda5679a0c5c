"""What decoding and assembly share: :class:`Frame`, :class:`Volume`, :class:`VolumeError`
and the value helpers; see :mod:`imgindex.export.volume` for the rules."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from imgindex.errors import ImgindexError

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray
    from pydicom.dataelem import DataElement, RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.tag import BaseTag
    from pydicom.uid import UID


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
