"""Loopback servers for the remote-store tests: a static HTTP server with ranges, and moto S3.

Both listen on ``127.0.0.1`` on a free port chosen by the kernel and stop when their
``with`` block ends.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.server
import logging
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import os
    from collections.abc import Iterator

__all__ = ["S3_OPTIONS", "serve_http", "serve_s3"]

#: Dummy credentials and settings obstore needs for moto's S3 on plain HTTP.
S3_OPTIONS: dict[str, str] = {
    "region": "us-east-1",
    "access_key_id": "testing",
    "secret_access_key": "testing",
    "allow_http": "true",
    "virtual_hosted_style_request": "false",
}

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def _handler(root: Path) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        """GET and HEAD of files under ``root``, with one ``Range`` per request."""

        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            return

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, *, body: bool) -> None:
            path = (root / self.path.split("?", 1)[0].lstrip("/")).resolve()
            if not path.is_relative_to(root) or not path.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = path.read_bytes()
            size = len(data)
            start, end = 0, size  # end exclusive
            match = _RANGE.fullmatch(self.headers.get("Range", "").strip())
            if match and (match[1] or match[2]):
                if match[1]:
                    start = int(match[1])
                    end = min(size, int(match[2]) + 1) if match[2] else size
                else:  # suffix: the last n bytes
                    start = max(0, size - int(match[2]))
                if start >= size or start >= end:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            else:
                self.send_response(200)
            stat = path.stat()
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start))
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("ETag", f'"{stat.st_mtime_ns:x}-{size:x}"')
            self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
            self.end_headers()
            if body:
                self.wfile.write(data[start:end])

    return Handler


@contextlib.contextmanager
def serve_http(folder: str | os.PathLike[str]) -> Iterator[str]:
    """Serve ``folder`` over HTTP on loopback; yields the base URL (no trailing slash)."""
    root = Path(folder).resolve()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(root))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host!s}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def serve_s3(
    folder: str | os.PathLike[str], bucket: str
) -> Iterator[tuple[str, str, dict[str, str]]]:
    """Serve a moto S3 on loopback holding ``bucket`` with every file of ``folder``.

    Yields
    ------
    endpoint, bucket, options
        ``http://127.0.0.1:PORT``, the bucket name, and the obstore options to reach it
        (endpoint, region, dummy keys, plain HTTP, path-style requests).
    """
    import obstore
    from moto.server import ThreadedMotoServer
    from obstore.store import S3Store

    root = Path(folder).resolve()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        options = {"endpoint": endpoint, **S3_OPTIONS}
        s3 = S3Store(
            bucket,
            endpoint=endpoint,
            region="us-east-1",
            access_key_id="testing",
            secret_access_key="testing",
            virtual_hosted_style_request=False,
            client_options={"allow_http": True},
        )
        _create_bucket(endpoint, bucket)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            obstore.put(s3, path.relative_to(root).as_posix(), path.read_bytes())
        yield endpoint, bucket, options
    finally:
        server.stop()


def _create_bucket(endpoint: str, bucket: str) -> None:
    """``PUT /bucket`` (moto accepts it unsigned; obstore has no create-bucket call)."""
    import urllib.request

    request = urllib.request.Request(f"{endpoint}/{bucket}", method="PUT")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()
