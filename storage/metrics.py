"""Prometheus metrics of a :class:`storage.transfer.Pipeline` or a
:func:`storage.transfer.run_on_dask` run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from collections.abc import Sequence

    from storage.transfer import Outcome, Stage

__all__ = ["TransferMetrics"]

#: Buckets of the per-stage seconds histogram: a small series is fetched in milliseconds,
#: a large one decoded in minutes.
_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class TransferMetrics:
    """Prometheus metrics of one pipeline, in a registry you pass (or a new CollectorRegistry).

    Names start with ``{namespace}_``: ``stage_items_total`` {stage, outcome=ok|failed|retried},
    ``stage_seconds`` {stage} (histogram), ``stage_bytes_total`` {stage} (declared bytes
    through each stage), ``queue_depth`` {stage}, ``inflight_bytes``, ``inflight_items``,
    ``items_total`` {outcome=ok|failed}, ``bytes_total`` {outcome}, ``retries_total`` {stage}
    and ``budget_bytes``.

    Parameters
    ----------
    namespace : str
        Prefix of every metric name.
    registry : CollectorRegistry, optional
        Where to register; a new registry by default (several pipelines in one process must
        not collide in the global one).
    """

    def __init__(
        self, namespace: str = "transfer", registry: CollectorRegistry | None = None
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        ns = namespace
        self.stage_items = Counter(
            f"{ns}_stage_items_total",
            "Items through each stage, by outcome (ok, failed, retried: one per retry)",
            ["stage", "outcome"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            f"{ns}_stage_seconds",
            "Wall seconds of one item in one stage, retries and back-off included",
            ["stage"],
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.stage_bytes = Counter(
            f"{ns}_stage_bytes_total",
            "Declared bytes of the items through each stage",
            ["stage"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            f"{ns}_queue_depth",
            "Items waiting before each stage",
            ["stage"],
            registry=self.registry,
        )
        self.inflight_bytes = Gauge(
            f"{ns}_inflight_bytes",
            "Declared bytes of the items admitted and not yet delivered",
            registry=self.registry,
        )
        self.inflight_items = Gauge(
            f"{ns}_inflight_items",
            "Items admitted and not yet delivered",
            registry=self.registry,
        )
        self.items = Counter(
            f"{ns}_items_total",
            "Items delivered, by outcome (ok, failed)",
            ["outcome"],
            registry=self.registry,
        )
        self.bytes = Counter(
            f"{ns}_bytes_total",
            "Declared bytes of the items delivered, by outcome (ok, failed)",
            ["outcome"],
            registry=self.registry,
        )
        self.retries = Counter(
            f"{ns}_retries_total",
            "Retries after a transient error, by stage",
            ["stage"],
            registry=self.registry,
        )
        self.budget_bytes = Gauge(
            f"{ns}_budget_bytes",
            "The pipeline's budget of declared bytes in flight",
            registry=self.registry,
        )
        for outcome in ("ok", "failed"):
            self.items.labels(outcome)
            self.bytes.labels(outcome)

    def _declare(self, stages: Sequence[Stage], budget: int) -> None:
        """Create the series of these stages at zero, so dashboards see them from the start."""
        self.budget_bytes.set(budget)
        for stage in stages:
            for outcome in ("ok", "failed", "retried"):
                self.stage_items.labels(stage.name, outcome)
            self.stage_seconds.labels(stage.name)
            self.stage_bytes.labels(stage.name)
            self.queue_depth.labels(stage.name)
            self.retries.labels(stage.name)

    def _retried(self, stage: str, count: int = 1) -> None:
        self.stage_items.labels(stage, "retried").inc(count)
        self.retries.labels(stage).inc(count)

    def _stage_done(self, stage: str, *, ok: bool, seconds: float, nbytes: int) -> None:
        self.stage_items.labels(stage, "ok" if ok else "failed").inc()
        self.stage_seconds.labels(stage).observe(seconds)
        self.stage_bytes.labels(stage).inc(nbytes)

    def _delivered(self, outcome: Outcome) -> None:
        label = "ok" if outcome.ok else "failed"
        self.items.labels(label).inc()
        self.bytes.labels(label).inc(outcome.nbytes)

    def _inflight(self, items: int, nbytes: int) -> None:
        self.inflight_items.set(items)
        self.inflight_bytes.set(nbytes)
