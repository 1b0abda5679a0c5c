"""Prometheus metrics of crawls, in a registry of their own (several crawls per test process
must not collide in the global one)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

from imgindex._metrics import ServedMetrics

if TYPE_CHECKING:
    from dicomweb.client import RequestEvent

__all__ = ["CrawlMetrics"]


class CrawlMetrics(ServedMetrics):
    """The crawler's counters and gauges; names start with ``imgindex_crawl_``.

    Pass :meth:`on_request` as the client's ``on_event`` to count requests and retries.
    """

    def __init__(self) -> None:
        super().__init__()
        self.requests = Counter(
            "imgindex_crawl_requests",
            "HTTP requests made, by outcome (ok, retry, failed) and status ('none' without a "
            "response)",
            ["outcome", "status"],
            registry=self.registry,
        )
        self.retries = Counter(
            "imgindex_crawl_retries",
            "Requests retried after a transient fault",
            registry=self.registry,
        )
        self.failures = Counter(
            "imgindex_crawl_failures",
            "Requests that failed after their last attempt, by status or error",
            ["reason"],
            registry=self.registry,
        )
        self.instances = Counter(
            "imgindex_crawl_instances_indexed",
            "Instances indexed from server metadata",
            registry=self.registry,
        )
        self.series = Counter(
            "imgindex_crawl_series",
            "Series looked at, by result (done, incomplete, failed, skipped as unchanged)",
            ["result"],
            registry=self.registry,
        )
        self.feed_seq = Gauge(
            "imgindex_crawl_feed_last_seq",
            "Last sequence number of Orthanc's change feed that was indexed",
            registry=self.registry,
        )

    def on_request(self, event: RequestEvent) -> None:
        """Count one request attempt (the client's ``on_event`` hook)."""
        status = "none" if event.status is None else str(event.status)
        self.requests.labels(event.outcome, status).inc()
        if event.outcome == "retry":
            self.retries.inc()
        elif event.outcome == "failed":
            self.failures.labels(
                status if event.status is not None else event.error or "error"
            ).inc()
