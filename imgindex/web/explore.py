"""What the explore and operations pages show, computed from the index (no HTTP here)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import polars as pl

if TYPE_CHECKING:
    import datetime as dt
    import os
    from collections.abc import Iterator

    from prometheus_client.core import GaugeMetricFamily

    from imgindex.index import Index

__all__ = ["explore_figures", "metrics_text", "series_detail", "thumbnail_png"]

#: Bars shown per chart (the largest).
_TOP: Final = 12
_MONTHS: Final = 24
_THUMBNAIL: Final = 256
#: What the explore charts count: series, studies, patients, or megabytes of DICOM.
MEASURES: Final = {
    "series": pl.len(),
    "studies": pl.col("StudyInstanceUID").n_unique(),
    "patients": pl.col("PatientID").n_unique(),
    "MB": pl.col("size_bytes").sum() / 1e6,
}


def _measure_text(measure: str, value: float) -> str:
    return f"{value:,.1f} MB" if measure == "MB" else f"{int(value):,}"


def explore_figures(
    index: Index, *, q: str = "", page: int = 0, page_size: int = 50, measure: str = "series"
) -> dict[str, Any]:
    """Totals, charts (label, value, text) of ``measure`` (one of :data:`MEASURES`) by
    modality, body part and month, and one page of the series table matching ``q``
    (case-insensitive, in Modality, BodyPartExamined or SeriesDescription)."""
    series = index.series
    totals = (
        series.select(
            pl.col("PatientID").n_unique().alias("patients"),
            pl.col("StudyInstanceUID").n_unique().alias("studies"),
            pl.len().alias("series"),
            pl.col("instance_count").sum().alias("instances"),
            pl.col("size_bytes").sum().alias("bytes"),
        )
        .collect()
        .row(0, named=True)
    )

    measured = MEASURES.get(measure, MEASURES["series"])

    def counts(
        column: pl.Expr, *, by_label: bool = False, top: int = _TOP
    ) -> list[tuple[str, float, str]]:
        frame = (
            series.group_by(column.alias("label"))
            .agg(measured.alias("n"))
            .filter(pl.col("label").is_not_null())
            .sort("label" if by_label else "n", descending=not by_label)
            .collect()
        )
        rows = [
            (str(label), float(n or 0), _measure_text(measure, n or 0))
            for label, n in frame.iter_rows()
        ]
        return rows[-top:] if by_label else rows[:top]

    matching = series
    if q.strip():
        needle = q.strip().lower()
        matching = series.filter(
            pl.any_horizontal(
                pl.col(c).cast(pl.String).str.to_lowercase().str.contains(needle, literal=True)
                for c in ("Modality", "BodyPartExamined", "SeriesDescription")
            )
        )
    matched = int(matching.select(pl.len()).collect().item())
    rows = (
        matching.sort("imaging_date", descending=True, nulls_last=True)
        .slice(page * page_size, page_size)
        .select(
            "SeriesInstanceUID",
            "imaging_date",
            "Modality",
            "BodyPartExamined",
            "SeriesDescription",
            "instance_count",
            "size_bytes",
        )
        .collect()
        .to_dicts()
    )
    return {
        "measure": measure if measure in MEASURES else "series",
        "measures": list(MEASURES),
        "totals": {k: int(v or 0) for k, v in totals.items()},
        "by_modality": counts(pl.col("Modality")),
        "by_body_part": counts(pl.col("BodyPartExamined")),
        "by_month": counts(pl.col("imaging_date").dt.strftime("%Y-%m"), by_label=True, top=_MONTHS),
        "series": rows,
        "matched": matched,
        "shown": len(rows),
        "more": (page + 1) * page_size < matched,
    }


def series_detail(index: Index, uid: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """A series' row and its instances (by InstanceNumber), or ``None``."""
    found = index.series.filter(pl.col("SeriesInstanceUID") == uid).collect()
    if found.is_empty():
        return None
    instances = (
        index.instances.filter(pl.col("SeriesInstanceUID") == uid)
        .select(
            "SOPInstanceUID",
            "InstanceNumber",
            "Rows",
            "Columns",
            "TransferSyntaxUID",
            "size_bytes",
            "location",
        )
        .sort("InstanceNumber", nulls_last=True)
        .collect()
        .to_dicts()
    )
    return found.row(0, named=True), instances


def thumbnail_png(index: Index, uid: str) -> bytes | None:
    """The middle instance's first frame as a PNG of at most 256 pixels a side, windowed to
    its 1st-99th percentiles; ``None`` when the series has no decodable image."""
    from imgindex.export.fetch import FetchOptions, fetch_series
    from imgindex.export.plan import Instance, SeriesJob
    from imgindex.export.volume import VolumeError, decode_instance

    found = series_detail(index, uid)
    if found is None or not found[1]:
        return None
    series, instances = found
    middle = instances[len(instances) // 2]
    job = SeriesJob(
        series_uid=uid,
        study_uid=series.get("StudyInstanceUID"),
        patient_id=series.get("PatientID"),
        instances=(
            Instance(
                middle["SOPInstanceUID"],
                middle["location"] or "",
                int(middle["size_bytes"] or 0),
                middle["TransferSyntaxUID"],
            ),
        ),
    )
    fetched = fetch_series(job, FetchOptions(concurrency=1))
    if not fetched.sources:
        return None
    _, source = fetched.sources[0]
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        frames = decode_instance(data, as_rgb=True)
    except (OSError, VolumeError):
        return None
    if not frames:
        return None
    return _png(_display(frames[0].pixels))


def _display(pixels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Stored values as 8-bit for a screen: windowed, and shrunk to fit 256 pixels."""
    image = pixels.astype(np.float32)
    low, high = np.percentile(image, (1, 99))
    scaled = np.clip((image - low) / max(float(high - low), 1e-6), 0, 1) * 255
    step = max(1, int(np.ceil(max(image.shape[:2]) / _THUMBNAIL)))
    return np.ascontiguousarray(scaled[::step, ::step].astype(np.uint8))


def _png(data: np.ndarray[Any, Any]) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(data).save(out, format="PNG")
    return out.getvalue()


def metrics_text(root: str | os.PathLike[str], *, now: dt.datetime | None = None) -> bytes:
    """:func:`imgindex.status.collect_status` in the Prometheus text format (``imgindex_*``).

    Throughput is averaged over the windows of :data:`imgindex.status.AVERAGES` (label
    ``window``: ``5m``, ``1h``, ``24h``): ``imgindex_intake_bytes_per_second`` and
    ``imgindex_intake_instances_per_second`` by ``kind`` (``listener``, ``crawl``, ``files``),
    ``imgindex_export_bytes_per_second`` and ``imgindex_export_instances_per_second``.
    """
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

    from imgindex.status import collect_status

    status = collect_status(root, now=now)

    class _Status(Collector):
        def collect(self) -> Iterator[GaugeMetricFamily]:
            for name, value in status.index.items():
                yield GaugeMetricFamily(f"imgindex_index_{name}", f"Index {name}", value=value)
            intake = GaugeMetricFamily(
                "imgindex_intake_instances",
                "Instances indexed in the window, by source",
                labels=["source", "window"],
            )
            for row in status.intake:
                intake.add_metric([row["source"] or "", "1h"], row["instances_1h"])
                intake.add_metric([row["source"] or "", "24h"], row["instances_24h"])
            yield intake
            for name, value in status.backlog.items():
                yield GaugeMetricFamily(f"imgindex_backlog_{name}", f"Backlog {name}", value=value)
            exports = GaugeMetricFamily(
                "imgindex_export_series",
                "Series in the ledger, by export and outcome",
                labels=["export", "outcome"],
            )
            for row in status.exports:
                for outcome in ("complete", "failed", "skipped"):
                    exports.add_metric([row["export"], outcome], row[outcome])
            yield exports
            rejects = GaugeMetricFamily(
                "imgindex_rejects", "Files and values refused, by reason", labels=["reason"]
            )
            for row in status.rejects:
                rejects.add_metric([row["reason"]], row["total"])
            yield rejects
            failures = GaugeMetricFamily(
                "imgindex_export_failures",
                "Series the exports failed, by reason",
                labels=["reason"],
            )
            for row in status.export_failures:
                failures.add_metric([row["reason"]], row["series"])
            yield failures
            yield from _throughput_metrics(status.rates)

    registry = CollectorRegistry()
    registry.register(_Status())
    return generate_latest(registry)


def _throughput_metrics(rates: list[dict[str, Any]]) -> Iterator[GaugeMetricFamily]:
    """The averages of :attr:`imgindex.status.Status.rates` as gauges (see
    :func:`metrics_text`)."""
    from prometheus_client.core import GaugeMetricFamily

    for prefix, labels, what in (
        ("imgindex_intake", ["kind", "window"], "indexed"),
        ("imgindex_export", ["window"], "exported (DICOM bytes read, instances written)"),
    ):
        moved = GaugeMetricFamily(
            f"{prefix}_bytes_per_second",
            f"Bytes {what} per second, averaged over the window",
            labels=labels,
        )
        done = GaugeMetricFamily(
            f"{prefix}_instances_per_second",
            f"Instances {what} per second, averaged over the window",
            labels=labels,
        )
        for row in rates:
            if (row["kind"] == "export") != (prefix == "imgindex_export"):
                continue
            values = [row["kind"], row["window"]] if len(labels) == 2 else [row["window"]]
            moved.add_metric(values, row["bytes"] / row["seconds"])
            done.add_metric(values, row["instances"] / row["seconds"])
        yield moved
        yield done
