"""Errors raised by :mod:`dicomweb`, and the URL redaction every message goes through.

::

    DicomWebError (Exception)   a response that breaks PS3.18, with url, status and reason

A :class:`DicomWebError` carries a short machine-readable :attr:`~DicomWebError.reason`
(one of :data:`REASONS`) so that a crawler can count and route failures without parsing
messages. Its :attr:`~DicomWebError.url` is always redacted by :func:`redact_url`: user names,
passwords and token-like query parameters never reach a message, a log line or a rejects table.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["REASONS", "DicomWebError", "redact_url"]

#: The reasons this package raises, and what each means.
REASONS: dict[str, str] = {
    "malformed_json": "the body is not a DICOM JSON array of datasets (PS3.18 Annex F)",
    "html_error_page": "the server sent an HTML (or XML) page where DICOM JSON was expected",
    "not_multipart": "the Content-Type is not multipart/* (PS3.18 8.7.3.3.2)",
    "no_boundary": "the multipart Content-Type has no boundary parameter (RFC 2046 5.1.1)",
    "malformed_multipart": "a multipart body breaks RFC 2046 (delimiter line or part headers)",
    "truncated": "the body ended before the closing multipart delimiter",
    "http_status": "the server answered with an error status (at once, or after the last retry)",
    "connection": "no connection, or the connection failed, after the last retry",
    "timeout": "the server did not answer in time, after the last retry",
}

_REDACTED = "***"
#: Query parameters whose values are secrets (OAuth, API keys, pre-signed URLs).
_SECRET_PARAMS = re.compile(
    r"(?i)(^|[&;])("
    r"access_token|id_token|refresh_token|token|api_key|apikey|key|password|passwd|pwd|"
    r"secret|client_secret|code|sig|signature|x-amz-signature|x-amz-credential|"
    r"x-amz-security-token|x-goog-signature|x-goog-credential"
    r")=([^&;#]*)"
)
#: ``scheme://userinfo@``: the fallback for URLs that urlsplit rejects.
_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)[^/?#]*@")


def redact_url(url: str) -> str:
    """Return ``url`` without credentials, fit for messages and logs.

    The userinfo (``user:password@``) is removed and the values of token-like query
    parameters (``access_token``, ``api_key``, ``X-Amz-Signature``, ...) become ``***``.
    A URL that does not parse is still stripped of anything before an ``@`` in its authority.

    Examples
    --------
    >>> redact_url("https://alice:s3cret@pacs.example/dicom-web/studies?access_token=abc&limit=5")
    'https://pacs.example/dicom-web/studies?access_token=***&limit=5'
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return _SECRET_PARAMS.sub(rf"\1\2={_REDACTED}", _USERINFO.sub(r"\1", url))
    netloc = parts.netloc.rpartition("@")[2]
    query = _SECRET_PARAMS.sub(rf"\1\2={_REDACTED}", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class DicomWebError(Exception):
    """A DICOMweb response that could not be used.

    Parameters
    ----------
    message : str
        What went wrong and what to do next. It must not hold credentials; the URL is added
        (redacted) by this class, so leave it out of ``message``.
    reason : str
        A short machine-readable reason, one of :data:`REASONS` (others are allowed for
        callers that extend the set).
    url : str or None
        The URL of the request; stored redacted (see :func:`redact_url`).
    status : int or None
        The HTTP status of the response, if known.
    index : int or None
        Where in a JSON array the bad dataset was, for errors about one dataset of many.

    Attributes
    ----------
    message, reason, url, status, index
        As given, ``url`` redacted.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        url: str | None = None,
        status: int | None = None,
        index: int | None = None,
    ) -> None:
        self.message = message
        self.reason = reason
        self.url = None if url is None else redact_url(url)
        self.status = status
        self.index = index
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = [f"reason={self.reason}"]
        if self.index is not None:
            where.append(f"index={self.index}")
        if self.status is not None:
            where.append(f"status={self.status}")
        if self.url is not None:
            where.append(f"url={self.url}")
        return f"{self.message} ({', '.join(where)})"

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only arguments do not survive Exception's default pickling, and these errors
        # cross process boundaries (transfer engine workers, Dask).
        return (
            _rebuild,
            (self.message, self.reason, self.url, self.status, self.index),
        )


def _rebuild(
    message: str, reason: str, url: str | None, status: int | None, index: int | None
) -> DicomWebError:
    return DicomWebError(message, reason=reason, url=url, status=status, index=index)
