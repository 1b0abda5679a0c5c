"""What the operations page shows: :func:`imgindex.status.collect_status` and its charts.

The throughput charts are drawn on the server as inline SVG (``templates/lines.html``): this
module computes their geometry (points in SVG user units, axis labels), so the template only
places what it is given and no script runs in the browser.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from imgindex.status import KINDS, collect_status

if TYPE_CHECKING:
    import os

    from imgindex.status import Throughput

__all__ = ["Chart", "Line", "chart", "operations_context"]

#: A chart's size and the margins around its plot (SVG user units).
WIDTH: Final = 560
HEIGHT: Final = 190
_LEFT: Final = 84
_RIGHT: Final = 12
_TOP: Final = 26
_BOTTOM: Final = 22
#: Each kind's colour (:data:`imgindex.status.KINDS`).
COLORS: Final = {
    "listener": "#3b7dd8",
    "crawl": "#2a9d5c",
    "files": "#b8860b",
    "export": "#c0392b",
}
#: Time labels per chart: one every this many buckets (window name -> buckets).
_TICK_EVERY: Final = {"60m": 15, "24h": 6}
#: The charts: (id, the :class:`Throughput` field, unit, window), in page order.
CHARTS: Final = (
    ("chart-mbps-60m", "mb_per_s", "MB/s", "60m"),
    ("chart-ips-60m", "instances_per_s", "instances/s", "60m"),
    ("chart-mbps-24h", "mb_per_s", "MB/s", "24h"),
    ("chart-ips-24h", "instances_per_s", "instances/s", "24h"),
)
_WINDOW_TITLES: Final = {"60m": "last 60 minutes", "24h": "last 24 hours"}
#: Units as the y axis writes them (short: the axis label has little room).
_AXIS_UNITS: Final = {"MB/s": "MB/s", "instances/s": "inst/s"}


@dataclass(frozen=True)
class Line:
    """One kind's series in a chart.

    ``points`` is a ``<polyline>``'s ``points`` (one per bucket, at its middle) and ``area``
    the same closed along the time axis; ``peak`` is the highest bucket, ``mean`` the window's
    average (both in the chart's unit) and ``moved`` the window's total (MB or instances);
    ``legend`` says the last two as people read them.
    """

    kind: str
    color: str
    points: str
    area: str
    peak: float
    mean: float
    moved: float
    legend: str


@dataclass(frozen=True)
class Chart:
    """A time-series chart's geometry, as ``templates/lines.html`` draws it.

    ``top`` is the value at the top of the y axis (a round number at or above every
    bucket), ``ticks`` the time labels as (x, text), and the plot spans ``left`` to
    ``right`` and ``top_y`` to ``bottom_y``.
    """

    id: str
    title: str
    unit: str
    window: str
    buckets: int
    top: float
    top_label: str
    ticks: tuple[tuple[float, str], ...]
    lines: tuple[Line, ...]
    width: int = WIDTH
    height: int = HEIGHT
    left: int = _LEFT
    right: int = WIDTH - _RIGHT
    top_y: int = _TOP
    bottom_y: int = HEIGHT - _BOTTOM


def operations_context(
    root: str | os.PathLike[str], *, now: dt.datetime | None = None
) -> dict[str, Any]:
    """Everything ``operations.html`` shows, for the catalog at ``root``.

    Parameters
    ----------
    root : str or path-like
        The catalog root.
    now : datetime, optional
        The end of the throughput windows (default: now).

    Returns
    -------
    dict
        ``status`` (the :class:`~imgindex.status.Status`), ``intake`` and ``failures`` (bars:
        (label, count) rows), ``charts`` (:class:`Chart`, see :data:`CHARTS`), ``rates``
        (kind -> window -> row of :attr:`Status.rates <imgindex.status.Status.rates>`) and
        ``colors`` (kind -> colour).
    """
    status = collect_status(root, now=now)
    rates: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in KINDS}
    for row in status.rates:
        rates[row["kind"]][row["window"]] = row
    return {
        "status": status,
        "intake": [(r["source"] or "(unknown)", int(r["instances_24h"])) for r in status.intake],
        "failures": [(r["reason"], int(r["series"])) for r in status.export_failures],
        "charts": [
            chart(status.throughput[window], field, unit=unit, chart_id=chart_id)
            for chart_id, field, unit, window in CHARTS
        ],
        "rates": rates,
        "colors": COLORS,
    }


def chart(series: Throughput, field: str, *, unit: str, chart_id: str) -> Chart:
    """The geometry of one field (``mb_per_s`` or ``instances_per_s``) of ``series``, one
    line per kind."""
    values: dict[str, list[float]] = getattr(series, field)
    n = len(series.starts)
    top = axis_top(max((v for kind in KINDS for v in values[kind]), default=0.0))
    left, right = _LEFT, WIDTH - _RIGHT
    top_y, bottom_y = _TOP, HEIGHT - _BOTTOM
    step = (right - left) / n

    def x(i: float) -> float:
        return round(left + i * step, 1)

    def y(value: float) -> float:
        return round(bottom_y - (bottom_y - top_y) * value / top, 1)

    lines = []
    for kind in KINDS:
        points = [(x(i + 0.5), y(v)) for i, v in enumerate(values[kind])]
        polyline = " ".join(f"{px},{py}" for px, py in points)
        area = f"{points[0][0]},{bottom_y} {polyline} {points[-1][0]},{bottom_y}"
        mean = sum(values[kind]) / n
        moved = sum(values[kind]) * series.bucket_s
        lines.append(
            Line(
                kind=kind,
                color=COLORS[kind],
                points=polyline,
                area=area,
                peak=max(values[kind]),
                mean=mean,
                moved=moved,
                legend=f"{format_number(mean)} {unit} on average, "
                f"{format_number(moved)} {unit.removesuffix('/s')} in all",
            )
        )
    first = dt.datetime.fromisoformat(series.starts[0])
    every = _TICK_EVERY[series.window]
    ticks = tuple(
        (x(i), (first + dt.timedelta(seconds=i * series.bucket_s)).strftime("%H:%M"))
        for i in range(0, n + 1, every)
    )
    return Chart(
        id=chart_id,
        title=f"{unit}, {_WINDOW_TITLES[series.window]}",
        unit=unit,
        window=series.window,
        buckets=n,
        top=top,
        top_label=f"{format_number(top)} {_AXIS_UNITS.get(unit, unit)}",
        ticks=ticks,
        lines=tuple(lines),
    )


def axis_top(peak: float) -> float:
    """The round number (1, 2, 2.5 or 5 times a power of ten) at or above ``peak``; 1 for
    an empty chart."""
    if peak <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(peak))
    for factor in (1, 2, 2.5, 5):
        if factor * power >= peak * (1 - 1e-12):
            return factor * power
    return 10 * power


def format_number(value: float) -> str:
    """A figure as people read it: thousands separated, no float noise (``0.0025``,
    ``2.5``, ``1,500``; ``2e-05`` below a thousandth)."""
    if value == 0:
        return "0"
    if value < 1e-3:
        return f"{value:.2g}"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.6f}".rstrip("0").rstrip(".")
