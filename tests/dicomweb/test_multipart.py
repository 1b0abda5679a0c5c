"""Streaming multipart/related parsing: chunkings, awkward bytes, faults, memory."""

from __future__ import annotations

import base64
import email.policy
import tracemalloc
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from typing import TYPE_CHECKING

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from dicomweb.errors import DicomWebError
from dicomweb.multipart import Part, boundary_of, iter_parts

if TYPE_CHECKING:
    from collections.abc import Iterator

BOUNDARY = "bound4ry"
DELIMITER = b"\r\n--" + BOUNDARY.encode()
DICOM = {"Content-Type": "application/dicom"}


def build(
    parts: list[tuple[dict[str, str], bytes]],
    boundary: str = BOUNDARY,
    *,
    preamble: bytes = b"",
    epilogue: bytes = b"",
) -> bytes:
    """A multipart body written by hand (RFC 2046 5.1.1)."""
    out = bytearray(preamble + b"\r\n" if preamble else b"")
    for headers, body in parts:
        out += b"--" + boundary.encode() + b"\r\n"
        for name, value in headers.items():
            out += f"{name}: {value}\r\n".encode()
        out += b"\r\n" + body + b"\r\n"
    out += b"--" + boundary.encode() + b"--" + epilogue
    return bytes(out)


def chunked(body: bytes, size: int) -> Iterator[bytes]:
    return (body[i : i + size] for i in range(0, len(body), size))


def as_pairs(parts: list[Part]) -> list[tuple[dict[str, str], bytes]]:
    return [(p.headers, p.body) for p in parts]


def lower(parts: list[tuple[dict[str, str], bytes]]) -> list[tuple[dict[str, str], bytes]]:
    return [({k.lower(): v for k, v in h.items()}, b) for h, b in parts]


AWKWARD = [
    ({"Content-Type": "application/dicom", "Content-Location": "/studies/1/instances/2"}, b""),
    (DICOM, b"\r\n"),
    (DICOM, b"--"),
    (DICOM, b"\r\n--" + BOUNDARY.encode()[:-1] + b"\r\n--bound4r"),  # near misses
    (DICOM, b"--" + BOUNDARY.encode() + b"\r\n"),  # the boundary without the leading CRLF
    (DICOM, b"\r\n-" + BOUNDARY.encode() + b"--\r\n\r\n"),
    ({}, bytes(range(256)) * 3),
    (DICOM, b"\r"),
    (DICOM, b"\r\n--bound4rx"[:-1] + b"Y"),
]


def test_every_chunk_size_gives_the_same_parts() -> None:
    body = build(AWKWARD, preamble=b"ignore me\r\n--bound4 not yet", epilogue=b"\r\ntrailing")
    expected = lower(AWKWARD)
    for size in range(1, len(body) + 1):
        assert as_pairs(list(iter_parts(chunked(body, size), BOUNDARY))) == expected, size


def test_empty_chunks_and_one_chunk() -> None:
    body = build(AWKWARD)
    chunks = [b""] + [bytes([b]) for b in body] + [b""]
    assert as_pairs(list(iter_parts(chunks, BOUNDARY))) == lower(AWKWARD)
    assert as_pairs(list(iter_parts([body], BOUNDARY))) == lower(AWKWARD)


PIECES = st.sampled_from(
    [b"\r\n", b"--", b"\r\n--", b"-", b"\r", b"\n", b"bound4r", b"\r\n--bound4r", b"\x00\xff"]
)
BODIES = st.lists(PIECES | st.binary(max_size=20), max_size=12).map(b"".join)
HEADER_NAMES = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True)
HEADER_VALUES = st.from_regex(r"[!-~]([ -~]{0,30}[!-~])?", fullmatch=True)
HEADERS = st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=3).filter(
    lambda h: len({k.lower() for k in h}) == len(h)
)


@given(
    parts=st.lists(st.tuples(HEADERS, BODIES), max_size=5),
    preamble=st.binary(max_size=30),
    epilogue=st.binary(max_size=30),
    cuts=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30),
)
def test_random_chunkings_give_the_same_parts(
    parts: list[tuple[dict[str, str], bytes]], preamble: bytes, epilogue: bytes, cuts: list[int]
) -> None:
    # RFC 2046: the delimiter must not occur in a body or in the preamble.
    assume(all(DELIMITER not in b"\r\n" + body + b"\r\n" for _, body in parts))
    assume(DELIMITER not in b"\r\n" + preamble + b"\r\n")
    assume(not preamble.startswith(b"--" + BOUNDARY.encode()))
    body = build(parts, preamble=preamble, epilogue=epilogue)
    chunks, at, i = [], 0, 0
    while at < len(body):
        size = cuts[i % len(cuts)]
        chunks.append(body[at : at + size])
        at, i = at + size, i + 1
    assert as_pairs(list(iter_parts(chunks, BOUNDARY))) == lower(parts)


def test_no_parts() -> None:
    assert list(iter_parts([b"--bound4ry--"], BOUNDARY)) == []
    assert list(iter_parts([b"preamble\r\n--bound4ry--\r\n"], BOUNDARY)) == []


def test_transport_padding_and_folded_and_repeated_headers() -> None:
    body = (
        b"--bound4ry \t\r\nContent-Type: application/dicom;\r\n transfer-syntax=1.2.840.10008.1.2.1"
        b"\r\nX-A: 1\r\nx-a: 2\r\n\r\nDATA\r\n--bound4ry--"
    )
    (part,) = iter_parts([body], BOUNDARY)
    assert part.content_type == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
    assert part.headers["x-a"] == "1, 2"
    assert part.body == b"DATA"


def test_parts_built_by_the_email_package() -> None:
    message = MIMEMultipart("related", type="application/dicom")
    payloads = [b"\x00\x01DICM" * 100, b"\r\n--" * 50, b""]
    for payload in payloads:
        message.attach(MIMEApplication(payload, "dicom"))
    raw = message.as_bytes(policy=email.policy.HTTP)
    head, _, body = raw.partition(b"\r\n\r\n")
    content_type = next(
        line.split(b":", 1)[1].decode() for line in head.split(b"\r\n") if b"Content-Type" in line
    )
    boundary = boundary_of(content_type)
    assert boundary == message.get_boundary()
    parts = list(iter_parts(chunked(body, 7), boundary))
    assert [p.content_type for p in parts] == ["application/dicom"] * 3
    assert [p.headers["content-transfer-encoding"] for p in parts] == ["base64"] * 3
    assert [base64.b64decode(p.body) for p in parts] == payloads


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        ('multipart/related; type="application/dicom"; boundary=abc', "abc"),
        ('multipart/related; type="application/dicom"; boundary="a:b c/d?"', "a:b c/d?"),
        ("Multipart/Related;Boundary=XyZ", "XyZ"),
        ("multipart/related; boundary*=us-ascii''x%20y", "x y"),
    ],
)
def test_boundary_of(content_type: str, boundary: str) -> None:
    assert boundary_of(content_type) == boundary


@pytest.mark.parametrize(
    ("content_type", "reason"),
    [
        ("application/dicom+json", "not_multipart"),
        ("text/html; charset=utf-8", "not_multipart"),
        ("", "not_multipart"),
        ("multipart", "not_multipart"),
        ('multipart/related; type="application/dicom"', "no_boundary"),
        ('multipart/related; boundary=""', "no_boundary"),
    ],
)
def test_boundary_of_rejects(content_type: str, reason: str) -> None:
    with pytest.raises(DicomWebError) as info:
        boundary_of(content_type, url="https://u:p@pacs/studies/1")
    assert info.value.reason == reason
    assert info.value.url == "https://pacs/studies/1"
    assert "u:p" not in str(info.value)


@pytest.mark.parametrize(
    "cut",
    [
        b"",
        b"preamble only",
        b"--bound4ry",
        b"--bound4ry\r\nContent-Type: app",
        b"--bound4ry\r\nContent-Type: application/dicom\r\n\r\nhalf a bo",
        b"--bound4ry\r\n\r\nbody\r\n--bound4ry",
        b"--bound4ry\r\n\r\nbody\r\n--bound4ry-",
    ],
)
def test_truncated_body(cut: bytes) -> None:
    with pytest.raises(DicomWebError) as info:
        list(iter_parts(chunked(cut, 3), BOUNDARY, url="http://pacs/x"))
    assert info.value.reason == "truncated"
    assert info.value.url == "http://pacs/x"


def test_truncated_after_complete_parts_yields_them_first() -> None:
    body = build([(DICOM, b"one"), (DICOM, b"two")])[:-20]
    seen: list[bytes] = []
    with pytest.raises(DicomWebError, match=r"after 1 complete part") as info:
        seen.extend(p.body for p in iter_parts(chunked(body, 4), BOUNDARY))
    assert info.value.reason == "truncated"
    assert seen == [b"one"]


@pytest.mark.parametrize(
    "body",
    [
        b"--bound4ry\r\nno colon here\r\n\r\nx\r\n--bound4ry--",
        b"--bound4ry\r\n: empty name\r\n\r\nx\r\n--bound4ry--",
        b"--bound4ry\r\n\r\nx\r\n--bound4ryX\r\n\r\n\r\n--bound4ry--",
        b"--bound4ry\r\n" + b"A" * 70_000,
    ],
)
def test_malformed(body: bytes) -> None:
    with pytest.raises(DicomWebError) as info:
        list(iter_parts(chunked(body, 1000), BOUNDARY))
    assert info.value.reason == "malformed_multipart"


@pytest.mark.parametrize("boundary", ["", "a\r\nb"])
def test_bad_boundary_argument(boundary: str) -> None:
    with pytest.raises(ValueError, match="boundary"):
        list(iter_parts([b""], boundary))


MB = 1024 * 1024
CHUNK = 64 * 1024


def stream_parts(n_parts: int, part_size: int) -> Iterator[bytes]:
    """A body generated on the fly in 64 KiB chunks (the test holds none of it)."""
    block = (bytes(range(256)) * (CHUNK // 256))[: CHUNK - 3] + b"\r\n-"
    for _ in range(n_parts):
        yield b"--bound4ry\r\nContent-Type: application/dicom\r\n\r\n"
        for _ in range(part_size // CHUNK):
            yield block
        yield b"\r\n"
    yield b"--bound4ry--"


def test_a_50_mb_part_streams_with_at_most_two_copies() -> None:
    size = 50 * MB
    tracemalloc.start()
    try:
        lengths = [len(p.body) for p in iter_parts(stream_parts(1, size), BOUNDARY)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lengths == [size]
    # The part being read plus the bytes yielded, and the bytearray's growth slack.
    assert peak < 2.3 * size, f"peak {peak / MB:.1f} MiB for a {size / MB:.0f} MiB part"


def test_many_parts_do_not_accumulate() -> None:
    size = 1 * MB
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_parts(stream_parts(64, size), BOUNDARY))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 64
    # The part the consumer still holds, the one being read and its copy: not 64 of them.
    assert peak < 4 * size, f"peak {peak / MB:.1f} MiB over 64 parts of 1 MiB"


def test_a_long_preamble_is_not_kept() -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(200):
            yield b"x" * CHUNK
        yield b"\r\n--bound4ry\r\n\r\nbody\r\n--bound4ry--"

    tracemalloc.start()
    try:
        parts = list(iter_parts(chunks(), BOUNDARY))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert as_pairs(parts) == [({}, b"body")]
    assert peak < 4 * CHUNK
