"""A synchronous DICOMweb client (PS3.18): QIDO-RS search, WADO-RS metadata and retrieve.

:class:`DicomWebClient` wraps one :class:`httpx.Client` (keep-alive, a connection pool the size
of ``concurrency``) and is meant to be shared by the threads of a crawler. It returns DICOM JSON
objects as :func:`json.loads` gives them (``dict`` keyed by ``"0020000D"``-style tags), never
pydicom datasets: converting is the caller's choice and :meth:`pydicom.dataset.Dataset.from_json`
is too slow to run on every search result of a crawl.

Faults are translated in one place, :meth:`DicomWebClient.get` (httpx's
``map_httpcore_exceptions`` idea):

- connect errors, timeouts, a peer that closes the connection early, and the statuses of
  :attr:`RetryPolicy.statuses` (408, 429, 500, 502, 503, 504) are retried with capped
  exponential back-off and full jitter; ``Retry-After`` on 429 and 503 is honoured
  (RFC 9110 10.2.3), capped like the back-off;
- every other status (400, 401, 403, 404, ...) raises at once, and so does anything after
  the last attempt: always a :class:`~dicomweb.errors.DicomWebError` whose ``reason`` is
  ``http_status``, ``connection`` or ``timeout``, with the redacted URL and the status.

Credentials never reach a message, a log line or a :class:`RequestEvent`: user names and
passwords in the base URL are moved into :class:`httpx.BasicAuth`, every URL shown goes through
:func:`~dicomweb.errors.redact_url`, headers are never logged, and absolute URLs (a
``BulkDataURI``) are fetched only from the service's own origin, so the ``Authorization``
header goes nowhere else. Redirects are not followed, for the same reason.

Paths are checked before a request is sent: a UID that goes into a path must be a UID (digits
and dots, PS3.5 9.1), and a search path one of the QIDO-RS resources (PS3.18 10.6.1), so that
a UID taken from a server's answer (``"../.."``) cannot change what is fetched.
"""

from __future__ import annotations

import email.utils
import functools
import json
import logging
import random
import re
import stat
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Self, TypeAlias
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

from dicomweb.dicomjson import load_json_array
from dicomweb.errors import DicomWebError, redact_url
from dicomweb.multipart import Part, boundary_of, iter_parts

if TYPE_CHECKING:
    import os
    import ssl
    from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
    from types import TracebackType

__all__ = ["DicomWebClient", "RequestEvent", "RetryPolicy", "parse_auth", "read_auth_file"]

logger = logging.getLogger(__name__)

#: A query parameter's value: one value, or several (sent as repeated parameters).
_ParamValue: TypeAlias = "str | int | float | Sequence[str | int | float]"
#: Query parameters of a request.
_Params: TypeAlias = "Mapping[str, _ParamValue]"

#: Media type of QIDO-RS answers and WADO-RS metadata (PS3.18 8.7.3.5.2).
_DICOM_JSON = "application/dicom+json"
#: Media type of WADO-RS retrieve answers (PS3.18 8.7.3.3.2).
_MULTIPART_DICOM = 'multipart/related; type="application/dicom"'
#: Statuses whose ``Retry-After`` is honoured (RFC 9110 10.2.3 names 503 and 3xx; RFC 6585
#: adds 429).
_RETRY_AFTER_STATUSES = frozenset({429, 503})
#: Transport faults worth another attempt: the request did not reach the server, the server
#: did not answer in time, or it closed the connection before the end of the answer (a
#: restart, a load balancer dropping an idle keep-alive connection). Other transport errors
#: (a proxy's refusal, an unsupported scheme, a bad request of ours) would fail again.
_RETRYABLE_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.TimeoutException,
    httpx.RemoteProtocolError,
    httpx.ReadError,
)
#: A DICOM UID (PS3.5 9.1): components of digits separated by single dots, at most 64
#: characters. Checked before a UID goes into a path, so ``../`` can never get there.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*", re.ASCII)
_UID_MAX = 64
#: The QIDO-RS resources (PS3.18 10.6.1), as paths relative to the base URL.
_SEARCH_FORMS = (
    "studies",
    "series",
    "instances",
    "studies/{study}/series",
    "studies/{study}/instances",
    "studies/{study}/series/{series}/instances",
)
_SEARCH_SHAPES = frozenset(
    tuple("{uid}" if i % 2 else step for i, step in enumerate(form.split("/")))
    for form in _SEARCH_FORMS
)
#: A transfer syntax in a WADO-RS Accept header: a UID, or ``*`` for "as stored" (PS3.18
#: 8.7.3.5.2).
_TRANSFER_SYNTAX = re.compile(r"\*|[0-9]+(?:\.[0-9]+)*", re.ASCII)
#: Most bytes of an error body kept for a message (and read from a stream to quote it).
_EXCERPT = 200
_ERROR_BODY_MAX = 64 * 1024
#: ``scheme://user:password@`` anywhere in a text (an exception's message).
_USERINFO_IN_TEXT = re.compile(r"(//)[^/\s@]*@")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_AUTH_SYNTAX = "'basic:USER:PASSWORD' or 'bearer:TOKEN'"
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Retry delays are computed from attempt numbers; past this the cap applies anyway.
_MAX_EXPONENT = 60


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # httpx builds a context per client by default, and loading the CA bundle is most of the
    # cost of a client (about 60 ms); a context is safe to share between clients and threads
    # (httpcore sets its ALPN protocols at each connection, the same for every client here:
    # HTTP/1.1 only).
    return httpx.create_ssl_context()


def _sleep(seconds: float) -> None:
    # A module function, so that tests can record the back-off instead of waiting for it.
    time.sleep(seconds)


@dataclass(frozen=True)
class RetryPolicy:
    """When and how often :class:`DicomWebClient` tries a request again.

    Attributes
    ----------
    attempts : int
        Tries per request, the first included (1 means no retry).
    backoff : float
        Upper bound of the first delay, in seconds; it doubles with each retry.
    max_backoff : float
        Cap of the delay, in seconds; also caps a server's ``Retry-After``.
    statuses : frozenset of int
        HTTP statuses that are retried. Other 4xx statuses never are: the same request
        would get the same answer.
    max_elapsed : float or None
        If set, no retry starts later than this many seconds after the first attempt began
        (the bound on elapsed time beside the bound on attempts).

    Notes
    -----
    The delay before retry ``n`` (``n = 0`` for the first retry) is drawn uniformly from
    ``[0, min(max_backoff, backoff * 2**n)]`` ("full jitter"), so that the threads of a
    crawler that failed together do not come back together. A ``Retry-After`` header in
    seconds (or as an HTTP date) on a 429 or 503 replaces the drawn delay, capped at
    ``max_backoff``. Only connect errors, timeouts, connections closed by the peer
    (:class:`httpx.RemoteProtocolError`, :class:`httpx.ReadError`) and :attr:`statuses`
    are retried.
    """

    attempts: int = 5
    backoff: float = 0.25
    max_backoff: float = 10.0
    statuses: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504})
    max_elapsed: float | None = None

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError(
                f"backoff and max_backoff must not be negative, got {self.backoff} and "
                f"{self.max_backoff}"
            )
        if self.max_elapsed is not None and self.max_elapsed < 0:
            raise ValueError(f"max_elapsed must not be negative, got {self.max_elapsed}")

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Return the seconds to wait before retry number ``retry`` (0 for the first).

        Parameters
        ----------
        retry : int
            How many retries came before this one.
        retry_after : float or None
            The server's ``Retry-After`` in seconds, if it sent one that applies.

        Returns
        -------
        float
            ``min(retry_after, max_backoff)`` if ``retry_after`` is given, else a uniform
            draw from ``[0, min(max_backoff, backoff * 2**retry)]``.
        """
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_backoff))
        ceiling = min(self.max_backoff, self.backoff * 2.0 ** min(retry, _MAX_EXPONENT))
        return random.uniform(0.0, ceiling)


@dataclass(frozen=True, slots=True)
class RequestEvent:
    """What one attempt of one request did; passed to ``on_event`` for metrics.

    Attributes
    ----------
    method : str
        The HTTP method (``"GET"``).
    url : str
        The request's URL with its query, redacted (:func:`~dicomweb.errors.redact_url`).
    status : int or None
        The response's status, or ``None`` if there was no response.
    seconds : float
        Duration of the attempt: until the body was read, or the fault. For a streamed
        retrieve, until the last part was read.
    attempt : int
        1 for the first try, 2 for the first retry, ...
    outcome : str
        ``"ok"``, ``"retry"`` (a retry follows) or ``"failed"`` (the request raises).
    error : str or None
        A short reason when the attempt did not succeed: the exception's class
        (``"ConnectError"``, ``"ReadTimeout"``), ``"status 503"``, or a
        :class:`~dicomweb.errors.DicomWebError` reason (``"truncated"``).
    """

    method: str
    url: str
    status: int | None
    seconds: float
    attempt: int
    outcome: str
    error: str | None


class _BearerAuth(httpx.Auth):
    """``Authorization: Bearer TOKEN`` (RFC 6750 2.1) on every request."""

    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request

    def __repr__(self) -> str:
        return "BearerAuth(token=***)"


def parse_auth(text: str) -> httpx.Auth:
    """Build the authentication of a ``--auth`` value.

    Parameters
    ----------
    text : str
        ``"basic:USER:PASSWORD"`` (the password may hold ``:``) or ``"bearer:TOKEN"``; the
        scheme is case-insensitive and white space around the whole value is ignored.

    Returns
    -------
    httpx.Auth
        :class:`httpx.BasicAuth`, or a bearer-token authentication.

    Raises
    ------
    ValueError
        If the value does not follow either form, or holds control characters. The message
        never repeats the value.

    Examples
    --------
    >>> parse_auth("basic:alice:pa:ss")  # doctest: +ELLIPSIS
    <httpx.BasicAuth object at ...>
    """
    value = text.strip()
    if _CONTROL.search(value):
        raise ValueError(
            f"the credentials hold control characters (a line break?); write them as "
            f"{_AUTH_SYNTAX} on one line"
        )
    scheme, colon, rest = value.partition(":")
    scheme = scheme.lower()
    if scheme == "basic" and colon:
        user, colon, password = rest.partition(":")
        if not user or not colon or not password:
            raise ValueError(
                f"basic credentials need a user name and a password: write {_AUTH_SYNTAX}"
            )
        return httpx.BasicAuth(user, password)
    if scheme == "bearer" and colon:
        if not rest or any(c.isspace() for c in rest):
            raise ValueError(
                "a bearer token must be non-empty and without spaces: write 'bearer:TOKEN'"
            )
        return _BearerAuth(rest)
    raise ValueError(
        f"credentials must be {_AUTH_SYNTAX}; the value given ({len(value)} characters) "
        "starts with neither 'basic:' nor 'bearer:'"
    )


def read_auth_file(path: str | os.PathLike[str]) -> httpx.Auth:
    """Read credentials from the first non-empty line of a file (as :func:`parse_auth`).

    A file is better than a command-line argument, which other users may see in the process
    list. A file readable by group or others is used, with a warning.

    Parameters
    ----------
    path : str or os.PathLike
        The file, e.g. ``~/.config/imgindex/auth`` (``~`` is expanded).

    Returns
    -------
    httpx.Auth
        As :func:`parse_auth`.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If it is not UTF-8 text, has no non-empty line, or the line is not valid for
        :func:`parse_auth`. No message repeats the file's contents.
    OSError
        If the file cannot be read for another reason.
    """
    file = Path(path).expanduser()
    try:
        raw = file.read_bytes()
        mode = file.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(
            f"auth file {file} does not exist: create it with one line {_AUTH_SYNTAX}"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "auth file %s can be read by other users; restrict it with: chmod 600 %s", file, file
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"auth file {file} is not UTF-8 text") from None
    line = next((line.strip() for line in text.splitlines() if line.strip()), None)
    if line is None:
        raise ValueError(f"auth file {file} is empty: write one line {_AUTH_SYNTAX} in it")
    try:
        return parse_auth(line)
    except ValueError as exc:
        raise ValueError(f"auth file {file}: {exc}") from None


def _check_uid(value: str, name: str) -> str:
    if len(value) > _UID_MAX or not _UID.fullmatch(value):
        raise ValueError(
            f"{name} must be a DICOM UID (digits in groups separated by dots, at most "
            f"{_UID_MAX} characters, PS3.5 9.1), got {str(value)[:80]!r}"
        )
    return value


def _check_search_path(path: str) -> str:
    """``path`` without outer slashes, if it is a QIDO-RS resource of PS3.18 10.6.1."""
    steps = path.strip("/").split("/")
    uids = steps[1::2] if steps[0] == "studies" else []
    shape = tuple("{uid}" if i % 2 else step for i, step in enumerate(steps))
    if shape not in _SEARCH_SHAPES or not all(
        len(uid) <= _UID_MAX and _UID.fullmatch(uid) for uid in uids
    ):
        raise ValueError(
            f"a QIDO-RS search path is one of {', '.join(_SEARCH_FORMS)} with UIDs of digits "
            f"and dots (PS3.18 10.6.1), got {path[:120]!r}"
        )
    return "/".join(steps)


def _query(params: _Params | None) -> list[tuple[str, str]]:
    """Flatten ``params`` into pairs; a sequence becomes a repeated parameter."""
    pairs: list[tuple[str, str]] = []
    for key, value in (params or {}).items():
        if isinstance(value, str | int | float):
            pairs.append((key, str(value)))
        else:
            pairs.extend((key, str(item)) for item in value)
    return pairs


def _excerpt(body: bytes) -> str:
    if not body.strip():
        return "(empty body)"
    # White space collapsed: error pages are often indented JSON or HTML.
    text = " ".join(body[:_EXCERPT].decode("utf-8", "replace").split())
    return repr(text) + ("..." if len(body) > _EXCERPT else "")


def _safe_text(exc: BaseException) -> str:
    """An exception's class and message, without any ``user:password@``."""
    text = _USERINFO_IN_TEXT.sub(r"\1", str(exc))[:200]
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delay-seconds or HTTP-date, RFC 9110 10.2.3), if any."""
    if response.status_code not in _RETRY_AFTER_STATUSES:
        return None
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme)


def _read_error_body(response: httpx.Response) -> bytes:
    """Up to :data:`_ERROR_BODY_MAX` bytes of a streamed error answer, for its message."""
    body = bytearray()
    try:
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) >= _ERROR_BODY_MAX:
                break
    except httpx.RequestError:
        pass  # the status says enough; the body was only for the message
    return bytes(body)


class _Failure(NamedTuple):
    """Why one attempt did not succeed."""

    status: int | None
    error: str  # RequestEvent.error
    exc: httpx.RequestError | None
    body: bytes
    headers: httpx.Headers | None
    retryable: bool
    retry_after: float | None


class _Sent(NamedTuple):
    response: httpx.Response
    attempt: int
    began: float


_DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
_DEFAULT_RETRY = RetryPolicy()


class DicomWebClient:
    """A thread-safe DICOMweb client for QIDO-RS and WADO-RS (PS3.18 10.6, 10.4).

    Parameters
    ----------
    url : str
        Base URL of the DICOMweb service, e.g. ``http://127.0.0.1:8042/dicom-web`` (a
        trailing slash is optional). A ``user:password@`` in it is moved into HTTP basic
        authentication and removed from the URL.
    auth : httpx.Auth, optional
        Authentication (see :func:`parse_auth`); not together with credentials in ``url``.
    concurrency : int
        Most requests in flight at once, and the size of the connection pool. Requests
        beyond it wait for a slot. A streamed :meth:`retrieve_series` holds its slot until
        its iterator is exhausted or closed.
    timeout : float or httpx.Timeout
        Seconds to connect, and between two reads of a response (not for the whole
        response); a float applies to all phases.
    retry : RetryPolicy
        Which faults are retried, how often and after how long.
    headers : mapping of str to str, optional
        Extra headers sent with every request (never logged).
    on_event : callable, optional
        Called with a :class:`RequestEvent` after every attempt, from the calling thread;
        it must be thread-safe and should not raise (an exception propagates to the caller).
    transport : httpx.BaseTransport, optional
        Replaces the network, e.g. :class:`httpx.MockTransport`; ``concurrency`` then only
        bounds requests in flight.

    Raises
    ------
    ValueError
        If ``url`` is not an ``http(s)://host/...`` URL without query or fragment,
        ``concurrency`` is below 1, or credentials are given both in ``url`` and ``auth``.

    Examples
    --------
    >>> with DicomWebClient("http://127.0.0.1:8042/dicom-web") as client:  # doctest: +SKIP
    ...     for study in client.iter_search("studies", includefield=["00081030"]):
    ...         print(study["0020000D"]["Value"][0])
    """

    def __init__(
        self,
        url: str,
        *,
        auth: httpx.Auth | None = None,
        concurrency: int = 8,
        timeout: float | httpx.Timeout = _DEFAULT_TIMEOUT,
        retry: RetryPolicy = _DEFAULT_RETRY,
        headers: Mapping[str, str] | None = None,
        on_event: Callable[[RequestEvent], None] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        base, url_auth = self._split_url(url)
        if url_auth is not None and auth is not None:
            raise ValueError(
                "credentials are given twice, in the URL and as auth: remove them from the URL"
            )
        self._base = base
        try:
            self._origin = _origin(httpx.URL(base))
        except httpx.InvalidURL:
            raise ValueError(f"the DICOMweb URL is not valid: {redact_url(base)!r}") from None
        self._concurrency = concurrency
        self._retry = retry
        self._on_event = on_event
        self._slots = threading.BoundedSemaphore(concurrency)
        self._http = httpx.Client(
            auth=auth if auth is not None else url_auth,
            headers={
                "User-Agent": f"imgindex-dicomweb httpx/{httpx.__version__}",
                **(headers or {}),
            },
            timeout=timeout,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            transport=transport,
            verify=_ssl_context(),
        )

    @staticmethod
    def _split_url(url: str) -> tuple[str, httpx.BasicAuth | None]:
        """The base URL without userinfo or trailing slash, and the userinfo as auth."""
        try:
            parts = urlsplit(url.strip())
            hostname = parts.hostname
            _ = parts.port  # raises ValueError for a port that is not a number
        except ValueError:
            raise ValueError(
                f"the DICOMweb URL does not parse: {redact_url(url)!r}; give "
                "http(s)://host[:port]/path"
            ) from None
        if parts.scheme not in _DEFAULT_PORTS or not hostname:
            raise ValueError(
                f"the DICOMweb URL must start with http:// or https:// and name a host, got "
                f"{redact_url(url)!r}"
            )
        if parts.query or parts.fragment:
            raise ValueError(
                f"the DICOMweb base URL must not have a query or fragment, got "
                f"{redact_url(url)!r}; give credentials with auth"
            )
        auth = None
        if parts.username is not None or parts.password is not None:
            auth = httpx.BasicAuth(unquote(parts.username or ""), unquote(parts.password or ""))
        netloc = parts.netloc.rpartition("@")[2]
        base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        return base, auth

    def __repr__(self) -> str:
        return f"DicomWebClient(url={self.url!r}, concurrency={self._concurrency})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections. The client cannot be used afterwards."""
        self._http.close()

    @property
    def url(self) -> str:
        """The base URL, redacted, without a trailing slash."""
        return redact_url(self._base)

    @property
    def concurrency(self) -> int:
        """Most requests in flight at once."""
        return self._concurrency

    # -- requests --------------------------------------------------------------------------

    def _resolve(self, path: str) -> str:
        """The URL of ``path``: relative to the base, or absolute on the same origin."""
        if "://" not in path:
            return f"{self._base}/{path.lstrip('/')}"
        try:
            target = httpx.URL(path)
        except httpx.InvalidURL:
            raise ValueError(f"not a valid URL: {redact_url(path)!r}") from None
        if target.scheme not in _DEFAULT_PORTS or _origin(target) != self._origin:
            raise ValueError(
                f"{redact_url(path)!r} is not on the DICOMweb service's origin "
                f"({redact_url(self._base)}); fetching it would send the credentials elsewhere"
            )
        return str(target.copy_with(username=None, password=None))

    def _emit(self, event: RequestEvent) -> None:
        logger.debug(
            "%s %s: %s, attempt %d, %s in %.3f s",
            event.method,
            event.url,
            event.status if event.status is not None else event.error,
            event.attempt,
            event.outcome,
            event.seconds,
        )
        if self._on_event is not None:
            self._on_event(event)

    def _send(self, url: str, *, params: list[tuple[str, str]], accept: str, stream: bool) -> _Sent:
        """Send ``GET url`` with retries until a 2xx answer; raise DicomWebError otherwise.

        With ``stream``, the returned response's body is not read and the caller holds a
        slot of the semaphore: it must close the response, release the slot and emit the
        attempt's event.
        """
        policy = self._retry
        first = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            request = self._http.build_request(
                "GET", url, params=tuple(params) or None, headers={"Accept": accept}
            )
            shown = redact_url(str(request.url))
            began = time.perf_counter()
            failure: _Failure | None = None
            hold = False  # a streamed 2xx keeps its slot until the caller has read the body
            self._slots.acquire()
            try:
                try:
                    response = self._http.send(request, stream=stream)
                except httpx.RequestError as exc:
                    retryable = isinstance(exc, _RETRYABLE_ERRORS)
                    failure = _Failure(
                        None, exc.__class__.__name__, exc, b"", None, retryable, None
                    )
                else:
                    status = response.status_code
                    hold = stream and 200 <= status < 300
                    if not 200 <= status < 300:
                        if stream:
                            body = _read_error_body(response)
                            response.close()
                        else:
                            body = response.content
                        failure = _Failure(
                            status,
                            f"status {status}",
                            None,
                            body,
                            response.headers,
                            status in policy.statuses,
                            _retry_after(response),
                        )
            finally:
                if not hold:
                    self._slots.release()
            seconds = time.perf_counter() - began
            if failure is None:
                if not stream:
                    self._emit(
                        RequestEvent(
                            method="GET",
                            url=shown,
                            status=status,
                            seconds=seconds,
                            attempt=attempt,
                            outcome="ok",
                            error=None,
                        )
                    )
                return _Sent(response, attempt, began)
            delay = policy.delay(attempt - 1, failure.retry_after)
            last = (
                not failure.retryable
                or attempt >= policy.attempts
                or (
                    policy.max_elapsed is not None
                    and time.monotonic() - first + delay > policy.max_elapsed
                )
            )
            self._emit(
                RequestEvent(
                    method="GET",
                    url=shown,
                    status=failure.status,
                    seconds=seconds,
                    attempt=attempt,
                    outcome="failed" if last else "retry",
                    error=failure.error,
                )
            )
            if last:
                raise self._error(failure, url=str(request.url), attempt=attempt) from failure.exc
            logger.info(
                "retrying GET %s after %s (attempt %d of %d) in %.2f s",
                shown,
                failure.error,
                attempt,
                policy.attempts,
                delay,
            )
            _sleep(delay)

    def _error(self, failure: _Failure, *, url: str, attempt: int) -> DicomWebError:
        tries = f"after {attempt} attempt(s)" if attempt > 1 else "at the first attempt"
        if failure.exc is not None:
            if isinstance(failure.exc, httpx.TimeoutException):
                return DicomWebError(
                    f"no answer in time {tries} ({failure.exc.__class__.__name__}); the server "
                    "is slow or overloaded: raise the timeout or lower the concurrency",
                    reason="timeout",
                    url=url,
                )
            return DicomWebError(
                f"request failed {tries} ({_safe_text(failure.exc)}); check that the server "
                "is up and that the URL's host and port are right",
                reason="connection",
                url=url,
            )
        status = failure.status
        assert status is not None
        phrase = httpx.codes.get_reason_phrase(status) or "HTTP error"
        what = f"{status} {phrase}: {_excerpt(failure.body)}"
        if status in (401, 403):
            advice = (
                "check --auth (basic:USER:PASSWORD or bearer:TOKEN) and that this account "
                "may read the resource"
            )
        elif status == 404:
            advice = (
                "check that the base URL is the DICOMweb root (e.g. http://host:8042/dicom-web) "
                "and that the UIDs exist"
            )
        elif 300 <= status < 400:
            location = failure.headers.get("location", "") if failure.headers else ""
            advice = (
                f"the server redirects to {redact_url(location)!r}: use that as the base URL "
                "(redirects are not followed, so that credentials go to one host only)"
            )
        elif failure.retryable:
            advice = (
                f"gave up {tries}; the server is failing or overloaded: try again later or "
                "lower the concurrency"
            )
        else:
            advice = "the server refused the request"
        return DicomWebError(f"{what}; {advice}", reason="http_status", url=url, status=status)

    def get(
        self, path: str, *, params: _Params | None = None, accept: str = _DICOM_JSON
    ) -> httpx.Response:
        """``GET`` a resource, with retries; the body is read.

        Parameters
        ----------
        path : str
            A path relative to the base URL (``"studies"``, ``"/studies/1.2/series"``), or an
            absolute ``http(s)`` URL on the same origin (a ``BulkDataURI``).
        params : mapping, optional
            Query parameters; a sequence value is sent as a repeated parameter.
        accept : str
            The ``Accept`` header.

        Returns
        -------
        httpx.Response
            A 2xx response, body read.

        Raises
        ------
        DicomWebError
            ``http_status`` for a status other than 2xx (at once if it is not retryable,
            else after the last attempt); ``connection`` or ``timeout`` for a transport
            fault after the last attempt.
        ValueError
            If ``path`` is an absolute URL on another origin.
        """
        url = self._resolve(path)
        return self._send(url, params=_query(params), accept=accept, stream=False).response

    def get_json(self, path: str, *, params: _Params | None = None) -> Any:
        """``GET`` a plain JSON resource (any top level), e.g. Orthanc's ``/changes``.

        Parameters
        ----------
        path, params
            As :meth:`get`.

        Returns
        -------
        Any
            The decoded JSON.

        Raises
        ------
        DicomWebError
            As :meth:`get`; ``html_error_page`` if the body is an HTML page;
            ``malformed_json`` if it is empty or not JSON.
        """
        response = self.get(path, params=params, accept="application/json")
        url = str(response.request.url)
        body = response.content
        head = body[:1024].decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
        if head.startswith("<"):
            raise DicomWebError(
                f"expected JSON, got what looks like an HTML page: {_excerpt(body)}; check "
                "the URL, the credentials and the server's logs",
                reason="html_error_page",
                url=url,
                status=response.status_code,
            )
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise DicomWebError(
                f"body is not JSON ({exc.__class__.__name__}): {_excerpt(body)}",
                reason="malformed_json",
                url=url,
                status=response.status_code,
            ) from exc

    def _objects(self, response: httpx.Response) -> list[dict[str, Any]]:
        """The DICOM JSON array of ``response``, each item checked to be an object."""
        url = str(response.request.url)
        status = response.status_code
        items = load_json_array(response.content, url=url, status=status)
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise DicomWebError(
                    f"a DICOM JSON dataset must be a JSON object (PS3.18 F.2), got "
                    f"{type(item).__name__} {str(item)[:40]!r}",
                    reason="malformed_json",
                    url=url,
                    status=status,
                    index=index,
                )
        return items

    def search(
        self,
        path: str,
        *,
        params: _Params | None = None,
        includefield: Sequence[str] = (),
        limit: int | None = None,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """One QIDO-RS search (PS3.18 10.6).

        Parameters
        ----------
        path : str
            ``"studies"``, ``"series"``, ``"instances"``, ``"studies/{study}/series"``,
            ``"studies/{study}/instances"`` or ``"studies/{study}/series/{series}/instances"``
            (a leading or trailing ``/`` is allowed).
        params : mapping, optional
            Matching keys, e.g. ``{"StudyDate": "20240101-20240131", "ModalitiesInStudy":
            "CT"}``; a sequence value is sent as a repeated parameter.
        includefield : sequence of str
            Attributes to return beyond the defaults (tags or keywords, or ``"all"``),
            sent as repeated ``includefield`` parameters.
        limit : int, optional
            Most results (``limit``); ``None`` sends none.
        offset : int
            Results to skip (``offset``); sent when non-zero or when ``limit`` is given.

        Returns
        -------
        list of dict
            The matches as DICOM JSON objects; empty for 204 No Content or an empty body.

        Raises
        ------
        DicomWebError
            As :meth:`get`; ``html_error_page`` or ``malformed_json`` (with ``index`` for
            an item that is not an object) for a bad body.
        ValueError
            If ``path`` is not one of the forms above (a UID in it not a DICOM UID, so that
            a UID taken from an answer cannot climb out of the path), ``limit`` is below 1
            or ``offset`` below 0.
        """
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if offset < 0:
            raise ValueError(f"offset must not be negative, got {offset}")
        query = _query(params)
        query.extend(("includefield", name) for name in includefield)
        if limit is not None:
            query.append(("limit", str(limit)))
        if offset or limit is not None:
            query.append(("offset", str(offset)))
        url = self._resolve(_check_search_path(path))
        response = self._send(url, params=query, accept=_DICOM_JSON, stream=False).response
        warning = response.headers.get("warning")
        if warning:
            # PS3.18 8.3.4.3: e.g. "299 ...: The number of results exceeded the maximum".
            logger.warning(
                "QIDO-RS %s: server warning %r", redact_url(str(response.request.url)), warning
            )
        return self._objects(response)

    def iter_search(
        self,
        path: str,
        *,
        params: _Params | None = None,
        includefield: Sequence[str] = (),
        page_size: int = 1000,
    ) -> Iterator[dict[str, Any]]:
        """Page through a QIDO-RS search with ``limit`` and ``offset``.

        Pages are fetched one at a time as the iterator is consumed, until a page shorter
        than ``page_size`` (or an empty one).

        Parameters
        ----------
        path, params, includefield
            As :meth:`search`.
        page_size : int
            Results per request (``limit``).

        Yields
        ------
        dict
            Each match, as a DICOM JSON object.

        Raises
        ------
        DicomWebError
            As :meth:`search`; ``malformed_json`` if the server sends the same full page
            twice (it ignores ``offset``: paging would never end).
        ValueError
            If ``page_size`` is below 1.
        """
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        offset = 0
        previous: list[dict[str, Any]] | None = None
        while True:
            page = self.search(
                path, params=params, includefield=includefield, limit=page_size, offset=offset
            )
            if page and page == previous:
                raise DicomWebError(
                    f"the server sent the same page for offsets {offset - len(page)} and "
                    f"{offset}: it ignores QIDO-RS offset (PS3.18 8.3.4.4); search without "
                    "paging or with narrower matching keys",
                    reason="malformed_json",
                    url=self._resolve(path),
                )
            yield from page
            if len(page) < page_size:
                return
            offset += len(page)
            previous = page

    def series_metadata(self, study_uid: str, series_uid: str) -> list[dict[str, Any]]:
        """WADO-RS metadata of a series: one DICOM JSON object per instance (PS3.18 10.4).

        Raises
        ------
        DicomWebError
            As :meth:`search`.
        ValueError
            If a UID is not a DICOM UID.
        """
        path = (
            f"studies/{_check_uid(study_uid, 'study_uid')}"
            f"/series/{_check_uid(series_uid, 'series_uid')}/metadata"
        )
        return self._objects(self.get(path))

    def instance_metadata(
        self, study_uid: str, series_uid: str, sop_uid: str
    ) -> list[dict[str, Any]]:
        """WADO-RS metadata of one instance: a list of one DICOM JSON object.

        Raises
        ------
        DicomWebError
            As :meth:`search`.
        ValueError
            If a UID is not a DICOM UID.
        """
        path = (
            f"studies/{_check_uid(study_uid, 'study_uid')}"
            f"/series/{_check_uid(series_uid, 'series_uid')}"
            f"/instances/{_check_uid(sop_uid, 'sop_uid')}/metadata"
        )
        return self._objects(self.get(path))

    def retrieve_series(
        self, study_uid: str, series_uid: str, *, transfer_syntax: str = "*"
    ) -> Generator[Part, None, None]:
        """WADO-RS retrieve of a series, streamed: one Part 10 file per part.

        The UIDs are checked at once; the request is sent when the iterator is first
        advanced. Faults before the first byte of the body are retried as in :meth:`get`;
        once parts flow, a fault raises (the parts already yielded were whole).

        Parameters
        ----------
        study_uid, series_uid : str
            The series.
        transfer_syntax : str
            The ``transfer-syntax`` of the Accept header: ``"*"`` (the default) asks for the
            instances as stored, without transcoding; a UID asks for that syntax.

        Returns
        -------
        generator of dicomweb.multipart.Part
            Each part's ``body`` is a DICOM Part 10 file. Exhaust the generator, or
            :meth:`~collections.abc.Generator.close` it, to free the connection and its slot.

        Raises
        ------
        DicomWebError
            As :meth:`get`; ``not_multipart`` or ``no_boundary`` for a bad Content-Type;
            ``truncated`` if the body or the connection ends early; ``malformed_multipart``
            for a bad body; ``timeout`` if the server stalls mid-body.
        ValueError
            If a UID is not a DICOM UID or ``transfer_syntax`` is neither ``"*"`` nor a UID.
        """
        path = (
            f"studies/{_check_uid(study_uid, 'study_uid')}"
            f"/series/{_check_uid(series_uid, 'series_uid')}"
        )
        return self._iter_parts(self._resolve(path), self._multipart_accept(transfer_syntax))

    def retrieve_instance(
        self, study_uid: str, series_uid: str, sop_uid: str, *, transfer_syntax: str = "*"
    ) -> bytes:
        """WADO-RS retrieve of one instance.

        Parameters
        ----------
        study_uid, series_uid, sop_uid : str
            The instance.
        transfer_syntax : str
            As :meth:`retrieve_series`.

        Returns
        -------
        bytes
            The DICOM Part 10 file.

        Raises
        ------
        DicomWebError
            As :meth:`retrieve_series`; ``malformed_multipart`` if the answer does not hold
            exactly one part.
        ValueError
            As :meth:`retrieve_series`.
        """
        path = (
            f"studies/{_check_uid(study_uid, 'study_uid')}"
            f"/series/{_check_uid(series_uid, 'series_uid')}"
            f"/instances/{_check_uid(sop_uid, 'sop_uid')}"
        )
        url = self._resolve(path)
        parts = list(self._iter_parts(url, self._multipart_accept(transfer_syntax)))
        if len(parts) != 1:
            raise DicomWebError(
                f"expected one part (one instance) in the retrieve answer, got {len(parts)}",
                reason="malformed_multipart",
                url=url,
            )
        return parts[0].body

    @staticmethod
    def _multipart_accept(transfer_syntax: str) -> str:
        if not _TRANSFER_SYNTAX.fullmatch(transfer_syntax) or len(transfer_syntax) > _UID_MAX:
            raise ValueError(
                f"transfer_syntax must be '*' or a transfer syntax UID, got "
                f"{transfer_syntax[:80]!r}"
            )
        return f"{_MULTIPART_DICOM}; transfer-syntax={transfer_syntax}"

    def _iter_parts(self, url: str, accept: str) -> Generator[Part, None, None]:
        sent = self._send(url, params=[], accept=accept, stream=True)
        response = sent.response
        status = response.status_code
        shown = str(response.request.url)
        outcome = "failed"
        error: str | None = "aborted"
        received = 0

        def chunks() -> Iterable[bytes]:
            nonlocal received
            for chunk in response.iter_bytes():
                received += len(chunk)
                yield chunk

        try:
            try:
                boundary = boundary_of(response.headers.get("content-type", ""), url=shown)
                yield from iter_parts(chunks(), boundary, url=shown)
            except DicomWebError as exc:
                error = exc.reason
                raise DicomWebError(
                    exc.message, reason=exc.reason, url=shown, status=status, index=exc.index
                ) from None
            except httpx.TimeoutException as exc:
                error = exc.__class__.__name__
                raise DicomWebError(
                    f"the server stopped sending after {received} bytes of the body "
                    f"({error}); retry the series, or raise the timeout",
                    reason="timeout",
                    url=shown,
                    status=status,
                ) from exc
            except httpx.RequestError as exc:
                error = "truncated"
                raise DicomWebError(
                    f"the connection broke after {received} bytes of the body "
                    f"({_safe_text(exc)}); the server may have restarted: retry the series",
                    reason="truncated",
                    url=shown,
                    status=status,
                ) from exc
            outcome, error = "ok", None
        except GeneratorExit:
            outcome, error = "ok", None  # the caller stopped reading: not a fault
            raise
        finally:
            response.close()
            self._slots.release()
            self._emit(
                RequestEvent(
                    method="GET",
                    url=redact_url(shown),
                    status=status,
                    seconds=time.perf_counter() - sent.began,
                    attempt=sent.attempt,
                    outcome=outcome,
                    error=error,
                )
            )
