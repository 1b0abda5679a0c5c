"""Prometheus metrics of the listener, in a registry of its own (several listeners per test
process must not collide in the global one)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, multiprocess

from imgindex._metrics import ServedMetrics

__all__ = ["ListenerMetrics"]


class ListenerMetrics(ServedMetrics):
    """The listener's counters and gauges; names start with ``imgindex_listener_``."""

    def __init__(self) -> None:
        super().__init__()
        self.instances = Counter(
            "imgindex_listener_instances",
            "Instances received and acknowledged (stored durably)",
            registry=self.registry,
        )
        self.received_bytes = Counter(
            "imgindex_listener_received_bytes",
            "Data set bytes of acknowledged instances",
            registry=self.registry,
        )
        self.failures = Counter(
            "imgindex_listener_failures",
            "C-STORE requests answered with a failure status, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.associations = Counter(
            "imgindex_listener_associations",
            "Associations accepted",
            registry=self.registry,
        )
        self.rejected_associations = Counter(
            "imgindex_listener_rejected_associations",
            "Association requests rejected (unknown calling AE title, too many open, ...)",
            ["reason"],
            registry=self.registry,
        )
        self.associations_open = Gauge(
            "imgindex_listener_associations_open",
            "Associations open now",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.pending_bytes = Gauge(
            "imgindex_listener_pending_bytes",
            "Acknowledged bytes in the write-ahead logs, not yet indexed",
            registry=self.registry,
            multiprocess_mode="livesum",
        )

    def _served_registry(self) -> CollectorRegistry:
        """With ``PROMETHEUS_MULTIPROC_DIR`` set (``imgindex listen`` sets it before its
        receiver processes start), what is served is the sum over all processes."""
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not folder:
            return self.registry
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
        return registry
