"""The operations page's throughput: series by kind and bucket from the catalog root, the
terminal and JSON status, the page's SVG charts and transfer ledger, ``/metrics``, and the
charts in a real browser."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pyarrow as pa
import pytest
from _export_helpers import index_folder, write_selection, write_set
from peers.browser import open_browser, screenshot, serve_app
from playwright.sync_api import expect

from imgindex.export import export
from imgindex.index import Index, IndexWriter
from imgindex.schema import TRANSFER_SCHEMA
from imgindex.status import KINDS, collect_status
from imgindex.web.accounts import Accounts
from imgindex.web.app import create_app
from imgindex.web.operations import axis_top, format_number, operations_context

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.filterwarnings("ignore:Object at manifest.parquet:UserWarning")

IMGINDEX = str(Path(sys.executable).with_name("imgindex"))
PASSWORD = "operator-secret-1"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four series indexed from a folder, two exported and one UID not in the index."""
    base = tmp_path_factory.mktemp("operations")
    root = base / "root"
    written = write_set(base / "in", seed=71)
    index_folder(base / "in", root)
    selection = write_selection(base / "sel.txt", [s.uid for s in written[:2]] + ["1.2.3.404"])
    summary = export(selection, root, base / "out.zarr", workers=1)
    assert (summary.complete, summary.failed) == (2, 1)
    Accounts(root).add_user("ops", "operator", PASSWORD)
    return root


@pytest.fixture(scope="module")
def base_url(root: Path) -> Iterator[str]:
    with serve_app(create_app(root)) as url:
        yield url


def _ledger(root: Path) -> list[dict[str, Any]]:
    return Index(root).transfers.collect().to_dicts()


def _instances(root: Path) -> list[dict[str, Any]]:
    return Index(root).instances.select("indexed_at", "size_bytes").collect().to_dicts()


def _bucket(when: dt.datetime, now: dt.datetime, bucket_s: int, n: int) -> int | None:
    """Which of the ``n`` buckets ending with ``now`` holds ``when`` (closed on the right),
    computed in Python rather than the way the status's SQL does it."""
    start = now - dt.timedelta(seconds=bucket_s * n)
    if not start < when <= now:
        return None
    return math.ceil((when - start) / dt.timedelta(seconds=bucket_s)) - 1


def _expected(
    events: list[tuple[dt.datetime, int, int]], now: dt.datetime, bucket_s: int, n: int
) -> tuple[list[int], list[int]]:
    moved, done = [0] * n, [0] * n
    for when, size, count in events:
        i = _bucket(when, now, bucket_s, n)
        if i is not None:
            moved[i] += size
            done[i] += count
    return moved, done


def test_throughput_puts_the_export_and_the_intake_in_their_buckets(root: Path) -> None:
    ledger = _ledger(root)
    exported = sum(int(r["bytes_in"]) for r in ledger)
    assert exported > 0
    written = sum(int(r["written_instances"]) for r in ledger)
    assert written == 12 + 9  # the two exported series' slices
    instances = _instances(root)
    assert len(instances) == 37
    # Ninety seconds after the last transfer: the events lie a minute or two back.
    now = max(r["finished_at"] for r in ledger) + dt.timedelta(seconds=90)
    status = collect_status(root, now=now)
    transfers = [
        (r["finished_at"], int(r["bytes_in"]), int(r["written_instances"])) for r in ledger
    ]
    indexed = [(r["indexed_at"], int(r["size_bytes"]), 1) for r in instances]
    for window, bucket_s, n in (("60m", 60, 60), ("24h", 3600, 24)):
        series = status.throughput[window]
        assert (series.bucket_s, len(series.starts)) == (bucket_s, n)
        assert dt.datetime.fromisoformat(series.starts[-1]) == (
            now - dt.timedelta(seconds=bucket_s)
        ).replace(microsecond=0)
        assert (series.bytes["export"], series.instances["export"]) == _expected(
            transfers, now, bucket_s, n
        )
        assert (series.bytes["files"], series.instances["files"]) == _expected(
            indexed, now, bucket_s, n
        )
        assert sum(series.bytes["export"]) == exported
        assert sum(series.instances["files"]) == 37
        assert series.bytes["listener"] == series.bytes["crawl"] == [0] * n
        assert series.mb_per_s["export"] == [b / 1e6 / bucket_s for b in series.bytes["export"]]
    minute = status.throughput["60m"]
    assert minute.bytes["export"][-1] == 0  # the last 60 seconds saw nothing
    assert sum(minute.bytes["export"][-3:-1]) == exported  # 60-150 s back
    rates = {(r["kind"], r["window"]): r for r in status.rates}
    assert rates["export", "5m"]["bytes"] == exported
    assert rates["export", "5m"]["mb_per_s"] == pytest.approx(exported / 1e6 / 300)
    assert rates["export", "1h"]["instances_per_s"] == pytest.approx(21 / 3600)
    assert rates["files", "24h"]["instances_per_s"] == pytest.approx(37 / 86400)
    # Two hours on, the minute series is empty and the hour series still holds everything.
    later = collect_status(root, now=now + dt.timedelta(hours=2))
    assert sum(later.throughput["60m"].bytes["export"]) == 0
    assert sum(later.throughput["24h"].bytes["export"]) == exported
    assert later.throughput["24h"].bytes["export"][-3] == exported
    # Before the export, nothing had been exported.
    before = collect_status(
        root, now=min(r["finished_at"] for r in ledger) - dt.timedelta(microseconds=1)
    )
    assert sum(before.throughput["24h"].bytes["export"]) == 0


def test_the_ledger_lists_the_latest_transfers(root: Path) -> None:
    status = collect_status(root)
    assert status.ledger_total == 3
    by_series = {row["SeriesInstanceUID"]: row for row in status.ledger}
    for row in _ledger(root):
        shown = by_series[row["SeriesInstanceUID"]]
        assert shown["outcome"] == row["outcome"]
        assert shown["bytes_in"] == row["bytes_in"]
        assert shown["written_instances"] == row["written_instances"]
        assert shown["finished_at"] == row["finished_at"].isoformat(timespec="seconds")
    assert by_series["1.2.3.404"]["reason"] == "not_in_index"
    finished = [row["finished_at"] for row in status.ledger]
    assert finished == sorted(finished, reverse=True)


def test_kinds_come_from_where_instances_are(tmp_path: Path, root: Path) -> None:
    """Rows as a crawl (WADO-RS URLs) and the listener (``ROOT/objects``) write them, and
    a ledger of 70 rows: each counts for its kind, and the ledger shows the latest 50."""
    other = tmp_path / "root"
    now = dt.datetime(2030, 5, 6, 12, 0, tzinfo=dt.UTC)
    rows = Index(root).instances.collect().head(5).to_arrow()
    objects = (other / "objects").absolute().as_uri()
    locations = [
        "https://pacs.example/dicom-web/studies/1/series/2/instances/3",
        "http://orthanc:8042/dicom-web/studies/1/series/2/instances/4",
        f"{objects}/ab/cd/1.dcm",
        f"{objects}/ab/cd/2.dcm",
        "file:///mnt/archive/IM0001",
    ]
    times = [now - dt.timedelta(seconds=s) for s in (30, 30, 61, 3 * 3600, 0)]
    sizes = [1_000_000, 2_000_000, 500_000, 700_000, 40]
    for name, values in (("location", locations), ("indexed_at", times), ("size_bytes", sizes)):
        column = rows.schema.get_field_index(name)
        rows = rows.set_column(column, rows.schema.field(column), pa.array(values, rows[name].type))
    IndexWriter(other).write(rows, [])
    ledger = [
        {
            "export": "s3://bucket/out.zarr",
            "SeriesInstanceUID": f"1.2.3.{i}",
            "outcome": "complete" if i % 7 else "failed",
            "reason": None if i % 7 else "fetch_error",
            "expected_instances": 10,
            "written_instances": 10 if i % 7 else 0,
            "bytes_in": 3_000_000,
            "seconds": 2.0,
            "finished_at": now - dt.timedelta(minutes=i),
        }
        for i in range(70)
    ]
    Index(other).table("transfers").upsert(pa.Table.from_pylist(ledger, TRANSFER_SCHEMA))
    status = collect_status(other, now=now)
    minute = status.throughput["60m"]
    assert minute.bytes["crawl"][-1] == 3_000_000
    assert minute.instances["crawl"][-1] == 2
    assert minute.bytes["listener"][-2] == 500_000  # 61 s back: the minute before
    assert minute.bytes["files"][-1] == 40  # at ``now`` exactly: the last bucket
    assert status.throughput["24h"].bytes["listener"][-4] == 700_000  # 3 hours back
    # One series finished per minute: 60 in the last hour, whose very start (the 61st) is
    # the hour before's; 9 of the 60 failed (every 7th) and wrote nothing.
    assert minute.bytes["export"] == [3_000_000] * 60
    assert sum(minute.instances["export"]) == 10 * (60 - 9)
    assert status.throughput["24h"].bytes["export"][-1] == 60 * 3_000_000
    assert status.throughput["24h"].bytes["export"][-2] == 10 * 3_000_000
    rates = {(r["kind"], r["window"]): r for r in status.rates}
    assert rates["export", "5m"]["mb_per_s"] == pytest.approx(5 * 3.0 / 300)
    assert rates["crawl", "1h"]["instances_per_s"] == pytest.approx(2 / 3600)
    assert rates["listener", "24h"]["bytes"] == 1_200_000
    assert status.ledger_total == 70
    assert [r["SeriesInstanceUID"] for r in status.ledger] == [f"1.2.3.{i}" for i in range(50)]
    text = status.describe()
    assert "transfer ledger (latest 10 of 70):" in text
    assert "1.2.3.7: failed (fetch_error), 0/10 instances, 3.0 MB in 2.0 s" in text
    assert "  export:    5m   0.050 MB/s   0.133 inst/s" in text
    # The page's charts: the hour chart's export line is flat at 0.05 MB/s.
    charts = {c.id: c for c in operations_context(other, now=now)["charts"]}
    mbps = charts["chart-mbps-60m"]
    assert (mbps.top, mbps.top_label) == (0.05, "0.05 MB/s")
    export_line = next(line for line in mbps.lines if line.kind == "export")
    ys = {float(point.split(",")[1]) for point in export_line.points.split()}
    assert ys == {float(mbps.top_y)}  # every bucket at the top of the axis
    assert export_line.moved == pytest.approx(180.0)  # MB in the hour
    assert [label for _, label in mbps.ticks] == ["11:00", "11:15", "11:30", "11:45", "12:00"]
    assert [x for x, _ in mbps.ticks] == [84.0, 200.0, 316.0, 432.0, 548.0]
    assert (mbps.left, mbps.right) == (84, 548)
    ips = charts["chart-ips-24h"]
    assert [label for _, label in ips.ticks] == ["12:00", "18:00", "00:00", "06:00", "12:00"]
    # The last hour's peak: 510 instances exported, so 0.14/s under an axis up to 0.2/s.
    peaks = {line.kind: line.peak for line in ips.lines}
    assert peaks["export"] == pytest.approx(510 / 3600)
    assert (ips.top, ips.top_label) == (pytest.approx(0.2), "0.2 inst/s")


def test_chart_axes_use_round_numbers() -> None:
    assert [axis_top(v) for v in (0, 0.0007, 0.001, 0.0011, 0.3, 2.2, 4.9, 7, 100)] == [
        1.0,
        pytest.approx(0.001),
        0.001,
        0.002,
        pytest.approx(0.5),
        2.5,
        5,
        10,
        100,
    ]
    assert [format_number(v) for v in (0, 2e-5, 0.0025, 2.5, 20, 1500)] == [
        "0",
        "2e-05",
        "0.0025",
        "2.5",
        "20",
        "1,500",
    ]


def test_the_cli_prints_the_throughput_and_the_ledger(root: Path) -> None:
    ledger = _ledger(root)
    exported = sum(int(r["bytes_in"]) for r in ledger)
    text = subprocess.run(
        [IMGINDEX, "status", "--root", str(root)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "throughput (MB/s and instances/s, averaged over the last 5 min, hour, 24 h):" in text
    export_line = next(line for line in text.splitlines() if line.startswith("  export:"))
    # The export finished within the hour: its bytes over 3600 s.
    assert f"1h {exported / 1e6 / 3600:7,.3f} MB/s {21 / 3600:7,.3f} inst/s" in export_line
    assert "  listener:" in text
    assert "transfer ledger (latest 3 of 3):" in text
    assert "1.2.3.404: failed (not_in_index), 0/0 instances" in text
    data = json.loads(
        subprocess.run(
            [IMGINDEX, "status", "--root", str(root), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )
    hour = data["throughput"]["60m"]
    assert set(hour["bytes"]) == set(KINDS)
    assert sum(hour["bytes"]["export"]) == exported
    assert sum(hour["instances"]["files"]) == 37
    assert len(hour["mb_per_s"]["export"]) == 60
    assert len(data["throughput"]["24h"]["starts"]) == 24
    assert {r["SeriesInstanceUID"] for r in data["ledger"]} == {
        r["SeriesInstanceUID"] for r in ledger
    }
    rates = {(r["kind"], r["window"]): r for r in data["rates"]}
    assert rates["export", "24h"]["bytes"] == exported


@pytest.fixture
def operator(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, follow_redirects=False, timeout=30) as client:
        done = client.post("/login", data={"user": "ops", "password": PASSWORD})
        assert done.status_code == 303, done.text
        yield client


def test_the_page_draws_the_charts_and_the_ledger(operator: httpx.Client, root: Path) -> None:
    page = operator.get("/operations")
    assert page.status_code == 200
    html = page.text
    assert '<meta http-equiv="refresh" content="10">' in html
    ledger = _ledger(root)
    exported_mb = sum(int(r["bytes_in"]) for r in ledger) / 1e6
    charts = dict(re.findall(r'<svg id="(chart-[a-z0-9-]+)"(.*?)</svg>', html, re.DOTALL))
    assert set(charts) == {"chart-mbps-60m", "chart-ips-60m", "chart-mbps-24h", "chart-ips-24h"}
    for chart_id, svg in charts.items():
        lines = dict(re.findall(r'data-kind="(\w+)"[^>]*data-moved="([^"]+)"', svg))
        assert set(lines) == set(KINDS), chart_id
        # The export line moved the ledger's bytes (MB) or its instances written.
        expected = exported_mb if "mbps" in chart_id else 21
        assert float(lines["export"]) == pytest.approx(expected), chart_id
        assert float(lines["files"]) > 0
        assert float(lines["listener"]) == 0
        assert re.search(r'class="y-max">[0-9.e-]+ (MB/s|inst/s)<', svg), chart_id
        assert "UTC</text>" in svg
    table = html.split('<table id="ledger"', 1)[1].split("</table>", 1)[0]
    for row in ledger:
        assert f"<code>{row['SeriesInstanceUID']}</code>" in table
    assert table.count('data-outcome="complete"') == 2
    assert "not_in_index" in table
    assert 'id="exports"' in html
    assert 'id="backlog"' in html
    assert "write-ahead log segments not yet checkpointed" in html


def test_metrics_carry_the_throughput(operator: httpx.Client, root: Path) -> None:
    exported = sum(int(r["bytes_in"]) for r in _ledger(root))
    text = operator.get("/metrics").text
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("imgindex_")
    }
    assert values['imgindex_export_bytes_per_second{window="1h"}'] == pytest.approx(exported / 3600)
    assert values['imgindex_export_instances_per_second{window="24h"}'] == pytest.approx(21 / 86400)
    assert values['imgindex_intake_instances_per_second{kind="files",window="24h"}'] == (
        pytest.approx(37 / 86400)
    )
    assert values['imgindex_intake_bytes_per_second{kind="listener",window="5m"}'] == 0
    assert values['imgindex_export_failures{reason="not_in_index"}'] == 1
    assert values["imgindex_index_instances"] == 37  # the names that were there stay
    folder = f"folder:{root.parent / 'in'}"
    assert values[f'imgindex_intake_instances{{source="{folder}",window="24h"}}'] == 37


@pytest.mark.peers
def test_the_charts_in_a_browser(base_url: str) -> None:
    with open_browser() as browser:
        context = browser.new_context(viewport={"width": 1250, "height": 1000})
        try:
            page = context.new_page()
            page.set_default_timeout(10_000)
            page.goto(f"{base_url}/operations")
            page.fill("input[name=user]", "ops")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            expect(page).to_have_url(f"{base_url}/operations")
            for chart_id in ("chart-mbps-60m", "chart-ips-60m", "chart-mbps-24h", "chart-ips-24h"):
                chart = page.locator(f"svg#{chart_id}")
                expect(chart).to_be_visible()
                expect(chart.locator("polyline")).to_have_count(len(KINDS))
                box = chart.bounding_box()
                assert box is not None
                assert (box["width"], box["height"]) == (560, 190)
            expect(page.locator("#ledger tr")).to_have_count(4)  # a header and 3 series
            expect(page.locator("#ledger")).to_contain_text("not_in_index")
            screenshot(page, "operations-throughput")
        finally:
            context.close()
