"""Assembling the frames of a series into volumes: :func:`assemble`; see
:mod:`imgindex.export.volume` for the rules."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from imgindex.export._frames import (
    ORIENTATION_TOLERANCE,
    SAME_POSITION_MM,
    Frame,
    Volume,
    VolumeError,
    _triple,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from numpy.typing import NDArray


#: Listed in messages before "...".
_SHOWN: Final = 5


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
