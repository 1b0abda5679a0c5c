"""The few DICOM encodings the listener needs on every instance, without building Datasets.

A C-STORE costs the listener one command set to read, one to write and one file meta group
to write. pydicom does each in 0.1-0.5 ms (it builds and validates a ``Dataset``), which is
more than the whole budget of a small instance at DCMTK speed, so they are encoded here
directly: command sets are Implicit VR Little Endian group 0000 elements (PS3.7 6.3.1), file
meta is Explicit VR Little Endian group 0002 (PS3.10 7.1). ``tests/imgindex/test_listener.py``
checks both against pydicom's reading of the same bytes.
"""

from __future__ import annotations

from enum import IntEnum
from struct import Struct

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "VERIFICATION",
    "CommandField",
    "Status",
    "decode_command",
    "echo_response",
    "file_meta",
    "store_response",
]

#: imgindex's Implementation Class UID (under pydicom's root for implementations).
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1.20261"
IMPLEMENTATION_VERSION_NAME = "IMGINDEX_1"
#: Verification SOP Class (C-ECHO).
VERIFICATION = "1.2.840.10008.1.1"


class CommandField(IntEnum):
    """(0000,0100) CommandField values the listener uses (PS3.7 E.1)."""

    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030


class Status(IntEnum):
    """DIMSE status codes the listener answers with (PS3.4 B.2.3, PS3.7 C)."""

    #: Stored, and durable.
    SUCCESS = 0x0000
    #: Refused: out of resources (disk full or unwritable).
    OUT_OF_RESOURCES = 0xA700
    #: Error: the data set does not match the SOP class.
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Error: cannot understand (the bytes do not decode, or required UIDs are missing).
    CANNOT_UNDERSTAND = 0xC210
    #: Failure: processing failure (an unexpected error of the listener itself).
    PROCESSING_FAILURE = 0x0110


_ELEMENT = Struct("<HHL")
_US = Struct("<H")
_UL = Struct("<L")
_NO_DATASET = 0x0101


def decode_command(data: bytes) -> dict[int, bytes]:
    """The elements of an Implicit VR Little Endian command set, as ``{element: raw value}``.

    Only group 0000 is allowed in a command set; raises ``ValueError`` on anything else or on
    a value that runs past the end.
    """
    out: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise ValueError(f"command set ends inside an element header at byte {pos}")
        group, element, length = _ELEMENT.unpack_from(data, pos)
        if group != 0x0000:
            raise ValueError(f"element ({group:04X},{element:04X}) in a command set")
        pos += 8
        if pos + length > end:
            raise ValueError(f"command element (0000,{element:04X}) runs past the end")
        out[element] = data[pos : pos + length]
        pos += length
    return out


def command_us(command: dict[int, bytes], element: int) -> int | None:
    """A US value of a decoded command set, or None if absent."""
    raw = command.get(element)
    return _US.unpack(raw[:2])[0] if raw is not None and len(raw) >= 2 else None


def command_uid(command: dict[int, bytes], element: int) -> str | None:
    """A UI value of a decoded command set (padding stripped), or None if absent."""
    raw = command.get(element)
    return raw.rstrip(b"\0 ").decode("ascii", "replace") if raw is not None else None


def _pad(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _implicit(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def _response(
    field: CommandField,
    sop_class: str,
    message_id: int,
    status: int,
    sop_instance: str | None,
    comment: str | None,
) -> bytes:
    body = [
        _implicit(0x0002, _pad(sop_class.encode("ascii"), b"\0")),
        _implicit(0x0100, _US.pack(field)),
        _implicit(0x0120, _US.pack(message_id)),
        _implicit(0x0800, _US.pack(_NO_DATASET)),
        _implicit(0x0900, _US.pack(status)),
    ]
    if comment:
        # (0000,0902) ErrorComment, LO: at most 64 characters.
        text = comment.encode("ascii", "replace")[:64]
        body.append(_implicit(0x0902, _pad(text, b" ")))
    if sop_instance is not None:
        body.append(_implicit(0x1000, _pad(sop_instance.encode("ascii"), b"\0")))
    payload = b"".join(body)
    return _implicit(0x0000, _UL.pack(len(payload))) + payload


def store_response(
    sop_class: str, sop_instance: str, message_id: int, status: int, comment: str | None = None
) -> bytes:
    """The encoded C-STORE-RSP command set (PS3.7 9.3.1.2)."""
    return _response(CommandField.C_STORE_RSP, sop_class, message_id, status, sop_instance, comment)


def echo_response(message_id: int) -> bytes:
    """The encoded C-ECHO-RSP command set with Success (PS3.7 9.3.5.2)."""
    return _response(CommandField.C_ECHO_RSP, VERIFICATION, message_id, Status.SUCCESS, None, None)


_EXPLICIT_SHORT = Struct("<HH2sH")
_EXPLICIT_LONG = Struct("<HH2sHL")


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return _EXPLICIT_LONG.pack(0x0002, element, vr, 0, len(value)) + value
    return _EXPLICIT_SHORT.pack(0x0002, element, vr, len(value)) + value


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_aet: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group of a received instance.

    Followed by the data set bytes exactly as received, this is a PS3.10 file.
    """
    elements = b"".join(
        [
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", _pad(sop_class.encode("ascii"), b"\0")),
            _meta_element(0x0003, b"UI", _pad(sop_instance.encode("ascii"), b"\0")),
            _meta_element(0x0010, b"UI", _pad(transfer_syntax.encode("ascii"), b"\0")),
            _meta_element(0x0012, b"UI", _pad(IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\0")),
            _meta_element(0x0013, b"SH", _pad(IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" ")),
            _meta_element(0x0016, b"AE", _pad(source_aet.encode("ascii", "replace")[:16], b" ")),
        ]
    )
    group_length = _meta_element(0x0000, b"UL", _UL.pack(len(elements)))
    return b"\0" * 128 + b"DICM" + group_length + elements
