"""Serving a component's Prometheus registry over HTTP (listener, crawler)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server

if TYPE_CHECKING:
    from threading import Thread
    from wsgiref.simple_server import WSGIServer


class ServedMetrics:
    """Metrics in a registry of their own (several per test process must not collide in the
    global one), served on ``/metrics`` on request."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._server: tuple[WSGIServer, Thread] | None = None

    def _served_registry(self) -> CollectorRegistry:
        """The registry :meth:`serve` exposes."""
        return self.registry

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` in a background thread; returns the port."""
        server, thread = start_http_server(port, addr=host, registry=self._served_registry())
        self._server = (server, thread)
        return int(server.server_port)

    def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._server = None
