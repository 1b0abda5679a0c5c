"""Streaming parser for ``multipart/related`` bodies, as WADO-RS retrieve returns them.

A WADO-RS retrieve answers ``multipart/related; type="application/dicom"; boundary=...``
(PS3.18 8.7.3.3.2), one part per instance. :func:`iter_parts` reads the body from an iterator
of byte chunks (an httpx response's ``iter_bytes()``) and yields each part as soon as its
closing delimiter has arrived, so a study of gigabytes is never held whole: the parser keeps
the part being read and, briefly, the copy it yields.

RFC 2046 5.1.1, as implemented::

    preamble CRLF "--" boundary *LWSP CRLF headers CRLF body
             CRLF "--" boundary *LWSP CRLF headers CRLF body ...
             CRLF "--" boundary "--" epilogue

The first delimiter may start the body without the CRLF (the preamble is then empty). The
search for ``CRLF "--" boundary`` keeps a carry-over of ``len(delimiter) - 1`` bytes, so a
delimiter split across chunks is found, and never rescans bytes already searched.

Why no library: none fits streaming of ``multipart/related`` with arbitrary part headers.

- ``multipart`` (defnull) streams, but its segments must carry ``Content-Disposition``
  (``multipart/form-data``); WADO-RS parts have only ``Content-Type`` (and maybe
  ``Content-Location``), so every part is rejected.
- ``python-multipart``'s low-level ``MultipartParser`` streams with arbitrary headers, but
  fails on a preamble (it expects the first boundary at the start), which RFC 2046 allows.
  It would also be a new dependency for about 150 lines.
- ``requests-toolbelt``'s ``MultipartDecoder`` takes the whole body in memory.
- the standard library's ``email.parser.BytesFeedParser`` accepts chunks but returns the
  message only at ``close()``: every part stays in memory until the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from email.message import Message
from typing import TYPE_CHECKING

from dicomweb.errors import DicomWebError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

__all__ = ["MAX_HEADER_BYTES", "Part", "boundary_of", "iter_parts"]

logger = logging.getLogger(__name__)

#: Most bytes of one part's header block (and of the padding after a delimiter); past this
#: the body is malformed, and memory stays bounded whatever the server sends.
MAX_HEADER_BYTES = 64 * 1024
_CRLF = b"\r\n"
_DASHES = b"--"
_LWSP = b" \t"


@dataclass(frozen=True, slots=True)
class Part:
    """One body part of a multipart message.

    Attributes
    ----------
    headers : dict of str to str
        The part's header fields, names in lower case (``"content-type"``); a field given
        more than once has its values joined by ``", "``.
    body : bytes
        The part's content, exactly the bytes between its header block and the next delimiter.
    """

    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def content_type(self) -> str | None:
        """The part's ``Content-Type`` field, or ``None``."""
        return self.headers.get("content-type")


def boundary_of(content_type: str, *, url: str | None = None) -> str:
    """Return the boundary of a ``multipart/*`` Content-Type header value.

    The boundary may be quoted (``boundary="a:b c"``) or given per RFC 2231.

    Parameters
    ----------
    content_type : str
        The response's Content-Type header value.
    url : str, optional
        The request's URL, for error messages.

    Raises
    ------
    DicomWebError
        ``not_multipart`` if the media type is not ``multipart/*``; ``no_boundary`` if there
        is no non-empty boundary parameter.

    Examples
    --------
    >>> boundary_of('multipart/related; type="application/dicom"; boundary="x y"')
    'x y'
    """
    message = Message()
    message["Content-Type"] = content_type
    media_type = content_type.partition(";")[0].strip().lower()
    if message.get_content_maintype() != "multipart" or "/" not in media_type:
        raise DicomWebError(
            f"expected a multipart/related response (PS3.18 8.7.3.3.2), got Content-Type "
            f"{content_type[:100]!r}",
            reason="not_multipart",
            url=url,
        )
    boundary = message.get_boundary()
    if not boundary or "\r" in boundary or "\n" in boundary:
        raise DicomWebError(
            f"multipart Content-Type without a usable boundary parameter: {content_type[:100]!r}",
            reason="no_boundary",
            url=url,
        )
    return boundary


def _parse_headers(block: bytes, *, url: str | None, index: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    if not block:
        return headers
    lines: list[str] = []
    for line in block.decode("latin-1").split("\r\n"):
        if line[:1] in (" ", "\t") and lines:  # obsolete line folding (RFC 5322 3.2.2)
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    for line in lines:
        name, colon, value = line.partition(":")
        name = name.strip().lower()
        if not colon or not name:
            raise DicomWebError(
                f"part {index}: header line {line[:80]!r} is not 'Name: value'",
                reason="malformed_multipart",
                url=url,
            )
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def iter_parts(chunks: Iterable[bytes], boundary: str, *, url: str | None = None) -> Iterator[Part]:
    """Yield the parts of a multipart body as they complete.

    Parameters
    ----------
    chunks : iterable of bytes
        The body in pieces of any size (empty pieces are fine).
    boundary : str
        The boundary, as :func:`boundary_of` returns it.
    url : str, optional
        The request's URL, for error messages.

    Yields
    ------
    Part
        Each body part, in order.

    Raises
    ------
    DicomWebError
        ``truncated`` if the chunks end before the closing delimiter;
        ``malformed_multipart`` if a delimiter line or a part's header block is malformed.
    ValueError
        If ``boundary`` is empty or holds CR or LF.
    """
    if not boundary or "\r" in boundary or "\n" in boundary:
        raise ValueError(f"boundary must be non-empty, without CR or LF, got {boundary!r}")
    delimiter = _CRLF + _DASHES + boundary.encode("latin-1")
    keep = len(delimiter) - 1
    # A CRLF in front lets the first delimiter open the body, as RFC 2046 allows.
    buf = bytearray(_CRLF)
    state = "preamble"
    searched = 0  # bytes of buf at the front known not to start a delimiter
    index = 0  # number of parts yielded
    headers: dict[str, str] = {}
    received = 0

    def fail(reason: str, what: str) -> DicomWebError:
        return DicomWebError(
            f"{what} (after {index} complete part(s), {received} bytes)", reason=reason, url=url
        )

    for chunk in chunks:
        received += len(chunk)
        buf += chunk
        while True:  # consume as much of buf as the state allows
            if state in ("preamble", "body"):
                at = buf.find(delimiter, searched)
                if at < 0:
                    searched = max(searched, len(buf) - keep)
                    if state == "preamble" and searched > 0:
                        del buf[:searched]  # the preamble is not kept
                        searched = 0
                    break
                if state == "body":
                    with memoryview(buf) as view:
                        body = bytes(view[:at])
                    yield Part(headers, body)
                    index += 1
                    del body
                del buf[: at + len(delimiter)]
                searched = 0
                state = "delimiter"
            elif state == "delimiter":
                if len(buf) < 2:
                    break
                if buf.startswith(_DASHES):
                    state = "epilogue"
                    break
                pad = 0
                while pad < len(buf) and buf[pad] in _LWSP:
                    pad += 1
                if pad > MAX_HEADER_BYTES:
                    raise fail("malformed_multipart", "endless padding after a delimiter")
                if len(buf) - pad < 2:
                    break
                if buf[pad : pad + 2] != _CRLF:
                    raise fail(
                        "malformed_multipart",
                        f"delimiter followed by {bytes(buf[pad : pad + 8])!r}, "
                        "not CRLF or '--' (RFC 2046 5.1.1)",
                    )
                del buf[: pad + 2]
                state = "headers"
            elif state == "headers":
                if buf.startswith(_CRLF):  # a part without header fields
                    block_end, skip = 0, 2
                else:
                    block_end, skip = buf.find(b"\r\n\r\n"), 4
                if block_end < 0:
                    if len(buf) > MAX_HEADER_BYTES:
                        raise fail(
                            "malformed_multipart",
                            f"part header block longer than {MAX_HEADER_BYTES} bytes",
                        )
                    break
                headers = _parse_headers(bytes(buf[:block_end]), url=url, index=index)
                del buf[: block_end + skip]
                searched = 0
                state = "body"
            else:  # epilogue: ignored (RFC 2046), but read so the connection can be reused
                buf.clear()
                break
    if state != "epilogue":
        raise fail(
            "truncated", f"multipart body ended in its {state}, before the closing delimiter"
        )
    if received:
        logger.debug("multipart body of %d bytes: %d part(s)", received, index)
