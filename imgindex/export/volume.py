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

from imgindex.export._assemble import assemble
from imgindex.export._decode import decode_instance
from imgindex.export._frames import (
    ORIENTATION_TOLERANCE,
    REASONS,
    SAME_POSITION_MM,
    Frame,
    Volume,
    VolumeError,
)

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
