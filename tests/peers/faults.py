"""A loopback HTTP/1.1 server that answers with the faults a real PACS won't produce on demand.

:class:`FaultServer` serves scripted :class:`Reply` objects per path: 503 then 200, 429 with
``Retry-After``, an HTML page with 200, a body cut after N bytes, a delay longer than the
client's timeout, a connection closed without an answer. It records every :class:`Request`
so that tests assert on what the server received (how many attempts, which query, which
``Authorization`` header, from how many client ports), not only on what the client returned.

It is the standard library's :class:`~http.server.ThreadingHTTPServer` on ``127.0.0.1`` and a
free port, one thread per connection, with keep-alive (HTTP/1.1)::

    with FaultServer() as server:
        server.route("/dicom-web/studies", Reply(503), Reply(200, body=b"[]"))
        ...  # a client on server.url + "/dicom-web"
        assert len(server.requests) == 2
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import socket
import socketserver
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Final, Self
from urllib.parse import parse_qs, urlsplit

import httpx

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

__all__ = ["FaultServer", "Reply", "Request"]

logger = logging.getLogger(__name__)

#: Seconds :meth:`FaultServer.stop` waits for the connection threads to end.
STOP_TIMEOUT: Final = 5.0
#: Seconds a connection may stay idle before its thread gives up on it.
IDLE_TIMEOUT: Final = 30.0
#: Size of the chunks of a ``Transfer-Encoding: chunked`` reply.
CHUNK_SIZE: Final = 8192


@dataclass
class Reply:
    """One scripted answer.

    Attributes
    ----------
    status : int
        The HTTP status.
    body : bytes
        The body.
    headers : dict of str to str
        Headers to send, e.g. ``Content-Type`` or ``Retry-After``. ``Content-Length`` is
        added unless given or ``Transfer-Encoding: chunked`` is; with chunked, the body is
        sent in chunks of :data:`CHUNK_SIZE`.
    truncate_at : int or None
        Send the headers of the whole body, but only this many bytes of the body, then close
        the connection.
    delay : float
        Seconds to wait before answering (to make a client time out).
    drop : bool
        Close the connection without answering.
    """

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    truncate_at: int | None = None
    delay: float = 0.0
    drop: bool = False


@dataclass(frozen=True)
class Request:
    """A request the server received.

    Attributes
    ----------
    method : str
        ``"GET"``, ``"POST"``...
    path : str
        The URL path, without the query.
    query : dict of str to list of str
        The query parameters, a list of values per name (repeated names keep their order).
    headers : httpx.Headers
        Header fields, looked up case-insensitively (``"Authorization" in headers``); a
        repeated field's values are joined by ``", "`` on lookup.
    body : bytes
        The request body (by ``Content-Length``).
    client_port : int
        The client's TCP port: requests on one keep-alive connection share it.
    """

    method: str
    path: str
    query: dict[str, list[str]]
    headers: httpx.Headers
    body: bytes = b""
    client_port: int = 0


_NOT_FOUND_BODY = b"no route for this path on the fault server\n"


class _Route:
    """The replies of one path, served in order, then the default (or the last) forever."""

    def __init__(
        self,
        replies: tuple[Reply, ...],
        default: Reply | None,
        fn: Callable[[Request], Reply] | None,
    ) -> None:
        self._replies = list(replies)
        self._default = default
        self._fn = fn
        self._served = 0
        self._lock = threading.Lock()

    def next(self, request: Request) -> Reply:
        if self._fn is not None:
            return self._fn(request)
        with self._lock:
            index = self._served
            self._served += 1
        if index < len(self._replies):
            return self._replies[index]
        if self._default is not None:
            return self._default
        return self._replies[-1]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: FaultServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's name (socket.getfqdn): not needed here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", int(self.server_address[1])

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that went away mid-answer is what these tests provoke: no traceback.
        logger.debug("fault server: %r on a connection from %s", sys.exc_info()[1], client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm and
    # the client's delayed ACK add 40 ms to every answer.
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            with contextlib.suppress(OSError):
                super().finish()
        finally:
            self.server.owner._track(self.connection, add=False)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("fault server: %s", format % args)

    def do_GET(self) -> None:
        try:
            self._serve()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True

    do_HEAD = do_GET
    do_POST = do_GET
    do_PUT = do_GET
    do_DELETE = do_GET

    def _serve(self) -> None:
        owner = self.server.owner
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        request = Request(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers=httpx.Headers(list(self.headers.items())),
            body=self.rfile.read(length) if length else b"",
            client_port=int(self.client_address[1]),
        )
        reply = owner._record_and_route(request)
        if reply.delay > 0 and owner._stopping.wait(reply.delay):
            self.close_connection = True
            return
        if reply.drop:
            self.close_connection = True
            return
        self.send_response(reply.status)
        names = {name.lower() for name in reply.headers}
        chunked = any(
            name.lower() == "transfer-encoding" and value.lower() == "chunked"
            for name, value in reply.headers.items()
        )
        if not chunked and "content-length" not in names:
            self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        body = reply.body
        limit = len(body) if reply.truncate_at is None else min(reply.truncate_at, len(body))
        if chunked:
            self._write_chunked(body, limit, complete=reply.truncate_at is None)
        else:
            self.wfile.write(body[:limit])
        self.wfile.flush()
        if reply.truncate_at is not None:
            self.close_connection = True

    def _write_chunked(self, body: bytes, limit: int, *, complete: bool) -> None:
        for start in range(0, len(body), CHUNK_SIZE):
            piece = body[start : start + CHUNK_SIZE]
            self.wfile.write(f"{len(piece):X}\r\n".encode())
            if start + len(piece) > limit:
                self.wfile.write(piece[: limit - start])
                return
            self.wfile.write(piece + b"\r\n")
        if complete:
            self.wfile.write(b"0\r\n\r\n")


class FaultServer:
    """A scripted HTTP/1.1 server on ``127.0.0.1`` and a free port; a context manager.

    Attributes
    ----------
    url : str
        ``http://127.0.0.1:PORT`` once started (empty before).
    requests : list of Request
        Every request received, in order of arrival.
    """

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[Request] = []
        self._routes: dict[str, _Route] = {}
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._idle = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"FaultServer(url={self.url!r}, requests={len(self.requests)})"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Bind ``127.0.0.1:0`` and serve from a daemon thread."""
        if self._server is not None:
            raise RuntimeError("the fault server is already started")
        server = _Server(("127.0.0.1", 0), _Handler)
        server.owner = self
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.name = f"fault-server-{server.server_address[1]}"
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, close every connection and wait for their threads. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            self._idle.wait_for(lambda: not self._connections, timeout=STOP_TIMEOUT)
        server.server_close()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)

    def route(self, path: str, *replies: Reply, default: Reply | None = None) -> None:
        """Answer requests for ``path`` with ``replies`` in order, then ``default``.

        Parameters
        ----------
        path : str
            The URL path, matched exactly (the query is ignored), or a pattern for
            :func:`fnmatch.fnmatchcase` if it holds ``*``. Exact paths win over patterns;
            patterns are tried in the order they were added. A path routed again is
            replaced.
        *replies : Reply
            The answers to the first requests, in order.
        default : Reply, optional
            The answer once ``replies`` are used up; without it the last reply repeats.
        """
        if not replies and default is None:
            raise ValueError("route needs at least one reply or a default")
        with self._lock:
            self._routes.pop(path, None)
            self._routes[path] = _Route(replies, default, None)

    def route_fn(self, path: str, fn: Callable[[Request], Reply]) -> None:
        """Answer requests for ``path`` (as :meth:`route`) with ``fn(request)``.

        ``fn`` runs on the connection's thread, concurrently with other connections.
        """
        with self._lock:
            self._routes.pop(path, None)
            self._routes[path] = _Route((), None, fn)

    def count(self, path: str | None = None) -> int:
        """Number of requests received, for ``path`` (matched as :meth:`route`) or all."""
        with self._lock:
            return sum(1 for r in self.requests if path is None or _matches(path, r.path))

    def _record_and_route(self, request: Request) -> Reply:
        with self._lock:
            self.requests.append(request)
            route = self._routes.get(request.path)
            if route is None:
                route = next(
                    (
                        r
                        for pattern, r in self._routes.items()
                        if "*" in pattern and fnmatch.fnmatchcase(request.path, pattern)
                    ),
                    None,
                )
        if route is None:
            return Reply(404, _NOT_FOUND_BODY, {"Content-Type": "text/plain"})
        return route.next(request)

    def _track(self, connection: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)
                self._idle.notify_all()


def _matches(pattern: str, path: str) -> bool:
    return fnmatch.fnmatchcase(path, pattern) if "*" in pattern else path == pattern
