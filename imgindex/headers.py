"""Fast header reads: the attributes the index needs, without touching pixel data.

:func:`read_header` walks the top-level elements of a DICOM Part 10 file in memory, keeps
the raw bytes of the wanted tags, and hands them to pydicom, which converts values (character
sets, VR parsing) on access. It is several times faster than ``dcmread(stop_before_pixels=
True)`` because it skips unwanted elements without building them. It also checks that the
pixel data the header promises is really in the file, which a header-only read never sees.

Files it does not handle on the fast path (big endian, deflated, no preamble with ``force``,
or a structure it does not recognise) are read by ``pydicom.dcmread`` instead, so pydicom
stays the reference for what a file contains. ``tests/imgindex/test_headers.py`` checks the
two paths agree on pydicom's own test files.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from struct import Struct
from typing import TYPE_CHECKING, BinaryIO

from pydicom import dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag

from imgindex.errors import DicomReadError

if TYPE_CHECKING:
    from collections.abc import Collection

__all__ = ["Header", "read_header", "read_header_bytes"]

#: PS3.10 7.1: 128-byte preamble, then "DICM".
_PREAMBLE = 128
_MAGIC = b"DICM"
#: The first window read; most headers fit in it.
_WINDOW = 64 * 1024
#: Pixel Data (7FE0,0010), Float Pixel Data (7FE0,0008), Double Float Pixel Data (7FE0,0009).
PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_TS_TAG = 0x00020010
_MEDIA_SOP_CLASS_TAG = 0x00020002
_META_TAGS = frozenset({_TS_TAG, _MEDIA_SOP_CLASS_TAG})
_CHARSET_TAG = 0x00080005
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
#: PS3.5 7.1.2: explicit VRs whose length field is 4 bytes after 2 reserved bytes.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_IMPLICIT_LE = "1.2.840.10008.1.2"
#: Transfer syntaxes left to pydicom: explicit big endian and deflated.
_DEFLATED = "1.2.840.10008.1.2.1.99"
_SLOW_SYNTAXES = frozenset({"1.2.840.10008.1.2.2", _DEFLATED})

_TAG = Struct("<HH")
_VR_TEXT = {
    vr.encode(): vr
    for vr in [
        "AE",
        "AS",
        "AT",
        "CS",
        "DA",
        "DS",
        "DT",
        "FD",
        "FL",
        "IS",
        "LO",
        "LT",
        "OB",
        "OD",
        "OF",
        "OL",
        "OV",
        "OW",
        "PN",
        "SH",
        "SL",
        "SQ",
        "SS",
        "ST",
        "SV",
        "TM",
        "UC",
        "UI",
        "UL",
        "UN",
        "UR",
        "US",
        "UT",
        "UV",
    ]
}
_EXPLICIT = Struct("<HH2sH")
_LONG_LENGTH = Struct("<L")
_IMPLICIT = Struct("<HHL")


@dataclass
class Header:
    """What :func:`read_header` found.

    Attributes
    ----------
    elements : dict of int to RawDataElement or DataElement
        The wanted top-level elements, raw (undecoded bytes) where possible.
    transfer_syntax : str or None
        TransferSyntaxUID (0002,0010) from the file meta information.
    size_bytes : int
        Size of the file.
    has_pixel_data : bool
        Whether the file holds a pixel data element.
    little_endian : bool
        Byte order of binary values in ``elements``.
    media_sop_class : str or None
        MediaStorageSOPClassUID (0002,0002), e.g. to recognise a DICOMDIR.
    """

    elements: dict[int, RawDataElement | DataElement]
    transfer_syntax: str | None
    size_bytes: int
    has_pixel_data: bool
    little_endian: bool = True
    media_sop_class: str | None = None


class _Unhandled(Exception):
    """The fast path does not handle this file; pydicom reads it."""


class _Truncated(Exception):
    """The file ends inside an element."""


class _Window:
    """A moving window over a file, so skipped values are never read."""

    def __init__(self, fp: BinaryIO, size: int) -> None:
        self.fp = fp
        self.size = size
        self.base = 0
        self.buf = fp.read(_WINDOW)

    def at(self, pos: int, n: int) -> int:
        """Make bytes [pos, pos+n) readable in ``buf``; return their offset in it."""
        if pos + n > self.size:
            raise _Truncated(pos)
        off = pos - self.base
        if off < 0 or off + n > len(self.buf):
            self.fp.seek(pos)
            self.buf = self.fp.read(max(_WINDOW, n))
            self.base = pos
            off = 0
        return off


def read_header(
    path: str | os.PathLike[str], tags: Collection[int], *, force: bool = False
) -> Header:
    """Read the wanted top-level attributes of the DICOM file at ``path``.

    Parameters
    ----------
    path : path-like
        The file.
    tags : collection of int
        Tags to keep, e.g. ``{0x0020000D}``. (0008,0005) SpecificCharacterSet is always kept
        so that text decodes.
    force : bool
        Read files without the PS3.10 preamble and "DICM" prefix, as pydicom's ``force``.

    Returns
    -------
    Header

    Raises
    ------
    DicomReadError
        With ``reason`` ``unreadable`` (the OS refused), ``empty``, ``no_preamble``,
        ``not_dicom`` or ``truncated`` (the file ends inside the header or the pixel data).
    """
    try:
        fp = open(path, "rb")  # noqa: SIM115 - closed below, after the fallback too
    except OSError as exc:
        raise DicomReadError("unreadable", f"cannot open: {exc.strerror or exc}") from exc
    with fp:
        try:
            size = os.fstat(fp.fileno()).st_size
        except OSError as exc:
            raise DicomReadError("unreadable", f"read failed: {exc}") from exc
        return _read(fp, size, frozenset(tags), force=force)


def read_header_bytes(data: bytes, tags: Collection[int], *, force: bool = False) -> Header:
    """Like :func:`read_header`, for a whole Part 10 file held in memory.

    The listener parses what it received this way before acknowledging it.
    """
    return _read(io.BytesIO(data), len(data), frozenset(tags), force=force)


def _read(fp: BinaryIO, size: int, tags: frozenset[int], *, force: bool) -> Header:
    wanted = tags | {_CHARSET_TAG}
    try:
        if size == 0:
            raise DicomReadError("empty", "the file is empty (0 bytes)")
        window = _Window(fp, size)
        head = window.buf[_PREAMBLE : _PREAMBLE + 4]
        if head != _MAGIC:
            if not force:
                raise DicomReadError(
                    "no_preamble",
                    "not a DICOM Part 10 file: no 'DICM' prefix after the 128-byte preamble "
                    "(PS3.10 7.1); use --force to read files without the preamble",
                )
            return _read_with_pydicom(fp, wanted, size, force=True)
        try:
            return _read_fast(window, wanted)
        except _Unhandled:
            # The file has the 'DICM' prefix, so pydicom needs no force; without force an
            # empty result means none of the wanted tags, not garbage (e.g. a DICOMDIR).
            return _read_with_pydicom(fp, wanted, size, force=False)
    except _Truncated as exc:
        raise DicomReadError(
            "truncated", f"the file ends inside an element at byte {exc.args[0]} of {size}"
        ) from None
    except OSError as exc:
        raise DicomReadError("unreadable", f"read failed: {exc}") from exc


def _read_fast(window: _Window, wanted: frozenset[int]) -> Header:
    meta, pos = _walk(window, _PREAMBLE + 4, implicit=False, wanted=_META_TAGS, meta_only=True)
    ts = _text(meta.get(_TS_TAG))
    if ts is None:
        raise _Unhandled("no transfer syntax")
    if ts in _SLOW_SYNTAXES:
        raise _Unhandled(ts)
    implicit = ts == _IMPLICIT_LE
    elements, pixel_pos = _walk(window, pos, implicit=implicit, wanted=wanted, meta_only=False)
    if pixel_pos >= 0:
        _check_pixel_data(window, pixel_pos, implicit)
    media = _text(meta.get(_MEDIA_SOP_CLASS_TAG))
    return Header(dict(elements), ts, window.size, pixel_pos >= 0, True, media)


def _text(raw: RawDataElement | None) -> str | None:
    if raw is None or not raw.value:
        return None
    return raw.value.decode("ascii", "replace").strip("\x00 ")


def _walk(
    window: _Window, pos: int, *, implicit: bool, wanted: frozenset[int], meta_only: bool
) -> tuple[dict[int, RawDataElement], int]:
    """Walk top-level elements from ``pos``.

    Returns the wanted raw elements and, for the dataset walk, the position of the pixel data
    element (-1 if none); for the meta walk, the position after the meta group.
    """
    found: dict[int, RawDataElement] = {}
    size = window.size
    # Hot loop: locals instead of attribute look-ups; the window moves only when an element
    # header or a wanted value is not inside it.
    buf, base = window.buf, window.base
    unpack_implicit, unpack_explicit = _IMPLICIT.unpack_from, _EXPLICIT.unpack_from
    unpack_long = _LONG_LENGTH.unpack_from
    while pos < size:
        if pos + 8 > size:
            raise _Truncated(pos)
        off = pos - base
        if off < 0 or off + 12 > len(buf):
            off = window.at(pos, min(12, size - pos))
            buf, base = window.buf, window.base
        if implicit:
            group, elem, length = unpack_implicit(buf, off)
            vr_bytes = b""
            header = 8
        else:
            group, elem, vr_bytes, length = unpack_explicit(buf, off)
            if meta_only and group != 0x0002:
                # The data set starts here, perhaps in implicit VR: its bytes are no VR.
                return found, pos
            header = 8
            if vr_bytes in _LONG_VRS:
                if pos + 12 > size:
                    raise _Truncated(pos)
                length = unpack_long(buf, off + 8)[0]
                header = 12
            elif not (vr_bytes.isalpha() and vr_bytes.isupper()):
                raise _Unhandled(f"bad VR {vr_bytes!r} at {pos}")
        tag = group << 16 | elem
        if tag in PIXEL_DATA_TAGS:
            return found, pos
        if length == _UNDEFINED:
            # A sequence (or UN holding one: PS3.5 6.2.2 says its content is implicit VR).
            pos = _skip_sequence(window, pos + header, implicit or vr_bytes == b"UN")
            buf, base = window.buf, window.base
            continue
        if tag in wanted:
            end = off + header + length
            if end > len(buf):
                off = window.at(pos, header + length)
                buf, base = window.buf, window.base
                end = off + header + length
            vr = None if implicit else _VR_TEXT.get(vr_bytes) or vr_bytes.decode("ascii")
            found[tag] = RawDataElement(
                BaseTag(tag), vr, length, buf[off + header : end], pos + header, implicit, True
            )
        pos += header + length
        if pos > size:
            raise _Truncated(size)
    return found, (pos if meta_only else -1)


def _skip_sequence(window: _Window, pos: int, implicit: bool) -> int:
    """Skip an undefined-length sequence starting at its first item; return the end."""
    while True:
        off = window.at(pos, 8)
        group, elem, length = _IMPLICIT.unpack_from(window.buf, off)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise _Unhandled(f"expected an item tag at {pos - 8}, found {tag:08X}")
        pos = _skip_item(window, pos, implicit) if length == _UNDEFINED else pos + length


def _skip_item(window: _Window, pos: int, implicit: bool) -> int:
    """Skip the elements of an undefined-length item up to its delimiter; return the end."""
    while True:
        off = window.at(pos, 8)
        group, elem = _TAG.unpack_from(window.buf, off)
        tag = group << 16 | elem
        if tag == _ITEM_END:
            return pos + 8
        if implicit:
            length = _IMPLICIT.unpack_from(window.buf, off)[2]
            header, vr_bytes = 8, b""
        else:
            vr_bytes = bytes(window.buf[off + 4 : off + 6])
            if vr_bytes in _LONG_VRS:
                off = window.at(pos, 12)
                length, header = _LONG_LENGTH.unpack_from(window.buf, off + 8)[0], 12
            else:
                length, header = _EXPLICIT.unpack_from(window.buf, off)[3], 8
        pos += header
        if length == _UNDEFINED:
            pos = _skip_sequence(window, pos, implicit or vr_bytes == b"UN")
        else:
            pos += length


def _check_pixel_data(window: _Window, pos: int, implicit: bool) -> None:
    """Raise _Truncated unless the whole pixel data element is in the file."""
    off = window.at(pos, 8)
    if implicit:
        length, header = _IMPLICIT.unpack_from(window.buf, off)[2], 8
    else:
        off = window.at(pos, 12)
        length, header = _LONG_LENGTH.unpack_from(window.buf, off + 8)[0], 12
    pos += header
    if length != _UNDEFINED:
        if pos + length > window.size:
            raise _Truncated(window.size)
        return
    # Encapsulated (PS3.5 A.4): items, the first being the Basic Offset Table, then a
    # sequence delimiter. Walk item headers only.
    fp, size = window.fp, window.size
    while True:
        if pos + 8 > size:
            raise _Truncated(pos)
        fp.seek(pos)
        group, elem, length = _IMPLICIT.unpack(fp.read(8))
        tag = group << 16 | elem
        if tag == _SEQ_END:
            return
        if tag != _ITEM or length == _UNDEFINED:
            raise DicomReadError(
                "malformed", f"encapsulated pixel data has tag {tag:08X} at byte {pos}"
            )
        pos += 8 + length
        if pos > size:
            raise _Truncated(size)


def _read_with_pydicom(fp: BinaryIO, wanted: frozenset[int], size: int, *, force: bool) -> Header:
    fp.seek(0)
    try:
        with warnings.catch_warnings():
            # pydicom warns about what it tolerates (unknown character sets, VR mismatches);
            # the index tolerates the same, and records values that do not parse.
            warnings.simplefilter("ignore")
            ds = dcmread(fp, stop_before_pixels=True, force=force, specific_tags=list(wanted))
    except InvalidDicomError as exc:
        raise DicomReadError("not_dicom", f"pydicom cannot read it: {exc}") from exc
    except EOFError as exc:
        raise DicomReadError("truncated", f"the file ends early: {exc}") from exc
    except Exception as exc:
        message = f"pydicom cannot read it: {type(exc).__name__}: {exc}"
        raise DicomReadError("malformed", message) from exc
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None
    media = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    if force and (len(ds) == 0 or (len(ds) == 1 and _CHARSET_TAG in ds)):
        raise DicomReadError("not_dicom", "no DICOM elements could be read")
    if ts == _DEFLATED:
        # pydicom inflates the data set into its own buffer, so where it left fp says nothing
        # about pixel data: read again, keeping only the pixel data elements.
        fp.seek(0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pixels = dcmread(fp, force=force, specific_tags=sorted(PIXEL_DATA_TAGS))
        except EOFError as exc:
            raise DicomReadError("truncated", f"the file ends early: {exc}") from exc
        has_pixels = any(tag in pixels for tag in PIXEL_DATA_TAGS)
    else:
        # After stop_before_pixels pydicom leaves the file at the pixel data element, if any.
        has_pixels = fp.tell() < size
    # keys(), not iteration: iterating a Dataset converts every raw element.
    tags = list(ds.keys())
    elements: dict[int, RawDataElement | DataElement] = {int(t): ds.get_item(t) for t in tags}
    little = ds.original_encoding[1] is not False
    return Header(elements, ts, size, has_pixels, little, str(media) if media else None)
