"""The crawler against faults a real Orthanc will not produce, served by a loopback
HTTP server (tests/peers/faults.py) that speaks just enough QIDO-RS and WADO-RS."""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from _crawl_helpers import crawl_state, duplicates, sop_uids
from peers.faults import FaultServer, Reply, Request
from prometheus_client import generate_latest

from dicomweb.client import DicomWebClient, RetryPolicy
from imgindex.cli import main
from imgindex.crawl.metrics import CrawlMetrics
from imgindex.crawl.web import CrawlSummary, DicomWebCrawl
from imgindex.index import Index
from imgindex.testing import make_series

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

FAST_RETRY = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.05)
JSON = {"Content-Type": "application/dicom+json"}


@dataclass
class FakeSeries:
    study_uid: str
    uid: str
    instances: list[dict[str, Any]]
    reported: int | None = None  # NumberOfSeriesRelatedInstances, if not len(instances)


@dataclass
class FakeArchive:
    """Studies as DICOM JSON, served under /dicom-web; ``cap`` results per query at most,
    and ``offset`` honoured or not."""

    server: FaultServer
    cap: int | None = None
    honour_offset: bool = True
    studies: dict[str, dict[str, Any]] = field(default_factory=dict)
    series: dict[str, FakeSeries] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url + "/dicom-web"

    def add_study(self, seed: int, date: str, n_series: int = 1, n_instances: int = 2) -> None:
        study_uid = f"2.25.9{seed:06d}"
        total = 0
        for k in range(n_series):
            datasets = make_series(
                seed * 10 + k, "CT", n_instances, 8, 8, study_uid=study_uid, study_date=date
            )
            objects = [ds.to_json_dict(bulk_data_threshold=64) for ds in datasets]
            for obj in objects:
                obj.pop("7FE00010", None)
            uid = str(datasets[0].SeriesInstanceUID)
            self.series[uid] = FakeSeries(study_uid, uid, objects)
            total += n_instances
        self.studies[study_uid] = {
            "0020000D": {"vr": "UI", "Value": [study_uid]},
            "00080020": {"vr": "DA", "Value": [date]},
            "00201206": {"vr": "IS", "Value": [n_series]},
            "00201208": {"vr": "IS", "Value": [total]},
        }

    def serve(self) -> None:
        self.server.route_fn("/dicom-web/studies", self._studies)
        self.server.route_fn("/dicom-web/studies/*/series", self._series_list)
        self.server.route_fn("/dicom-web/studies/*/series/*/metadata", self._metadata)

    def metadata_path(self, series_uid: str) -> str:
        s = self.series[series_uid]
        return f"/dicom-web/studies/{s.study_uid}/series/{s.uid}/metadata"

    def _studies(self, request: Request) -> Reply:
        matches = list(self.studies.values())
        if "StudyDate" in request.query:
            lo, _, hi = request.query["StudyDate"][0].partition("-")
            matches = [
                s
                for s in matches
                if (not lo or s["00080020"]["Value"][0] >= lo)
                and (not hi or s["00080020"]["Value"][0] <= hi)
            ]
        matches.sort(key=lambda s: s["0020000D"]["Value"][0])
        offset = int(request.query.get("offset", ["0"])[0]) if self.honour_offset else 0
        limit = int(request.query.get("limit", ["100000"])[0])
        if self.cap is not None:
            limit = min(limit, self.cap)
        return Reply(200, json.dumps(matches[offset : offset + limit]).encode(), JSON)

    def _series_list(self, request: Request) -> Reply:
        study_uid = request.path.split("/")[3]
        found = [
            {
                "0020000D": {"vr": "UI", "Value": [s.study_uid]},
                "0020000E": {"vr": "UI", "Value": [s.uid]},
                "00201209": {
                    "vr": "IS",
                    "Value": [s.reported if s.reported is not None else len(s.instances)],
                },
            }
            for s in self.series.values()
            if s.study_uid == study_uid
        ]
        return Reply(200, json.dumps(found).encode(), JSON)

    def _metadata(self, request: Request) -> Reply:
        series_uid = request.path.split("/")[5]
        return Reply(200, json.dumps(self.series[series_uid].instances).encode(), JSON)


@pytest.fixture
def archive() -> Iterator[FakeArchive]:
    with FaultServer() as server:
        fake = FakeArchive(server)
        yield fake


def crawl(
    archive: FakeArchive, root: Path, metrics: CrawlMetrics | None = None, **kwargs: Any
) -> Any:
    archive.serve()
    hook = None if metrics is None else metrics.on_request
    with DicomWebClient(archive.url, retry=FAST_RETRY, concurrency=2, on_event=hook) as client:
        return DicomWebCrawl(client, root, metrics=metrics, **kwargs).run()


def all_uids(archive: FakeArchive) -> list[str]:
    return sorted(
        obj["00080018"]["Value"][0] for s in archive.series.values() for obj in s.instances
    )


def test_503_then_200_is_retried_and_nothing_is_lost(tmp_path: Path, archive: FakeArchive) -> None:
    for seed in range(3):
        archive.add_study(seed, "20231002")
    flaky = next(iter(archive.series))
    path = archive.metadata_path(flaky)
    body = json.dumps(archive.series[flaky].instances).encode()
    archive.server.route(
        path, Reply(503, b"busy", {"Retry-After": "0"}), Reply(503), Reply(200, body, JSON)
    )
    metrics = CrawlMetrics()
    summary = crawl(archive, tmp_path, metrics)
    assert archive.server.count(path) == 3
    text = generate_latest(metrics.registry).decode()
    assert "imgindex_crawl_retries_total 2.0" in text
    assert 'imgindex_crawl_requests_total{outcome="retry",status="503"} 2.0' in text
    assert "imgindex_crawl_instances_indexed_total 6.0" in text
    assert 'imgindex_crawl_series_total{result="done"} 3.0' in text
    port = metrics.serve(0)
    try:
        served = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        metrics.close()
    assert "imgindex_crawl_retries_total 2.0" in served
    assert summary.failures == []
    assert summary.series_fetched == 3
    assert sop_uids(tmp_path) == all_uids(archive)


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (
            Reply(
                200, b"<html><body>Gateway says hello</body></html>", {"Content-Type": "text/html"}
            ),
            "html_error_page",
        ),
        (Reply(200, b'[{"0020000D": {"vr": "UI", "Val', JSON), "malformed_json"),
        (Reply(200, b'{"not": "an array"}', JSON), "malformed_json"),
        (Reply(404, b"no such series"), "http_status"),
        (
            Reply(
                200, b"[" + b" " * 5000 + b"]", {**JSON, "Content-Length": "5002"}, truncate_at=100
            ),
            None,
        ),
    ],
    ids=["html-200", "cut-json", "object", "404", "truncated-body"],
)
def test_a_bad_series_is_a_reject_and_the_crawl_goes_on(
    tmp_path: Path, archive: FakeArchive, reply: Reply, reason: str | None
) -> None:
    for seed in range(3):
        archive.add_study(10 + seed, "20231003")
    bad = list(archive.series)[1]
    archive.server.route(archive.metadata_path(bad), reply)
    summary = crawl(archive, tmp_path)
    assert summary.series_fetched == 2
    assert summary.series_failed == 1
    good = sorted(
        obj["00080018"]["Value"][0]
        for uid, s in archive.series.items()
        if uid != bad
        for obj in s.instances
    )
    assert sop_uids(tmp_path) == good
    [reject] = Index(tmp_path).rejects.collect().to_dicts()
    assert reject["level"] == "series"
    assert reject["location"].startswith(archive.url)
    assert bad in reject["location"]
    if reason is not None:
        assert reject["reason"] == reason
    state = {r["key"]: r for r in crawl_state(tmp_path)}
    assert state[bad]["status"] == "failed"
    assert state[bad]["error"]
    assert state[archive.series[bad].study_uid]["status"] == "failed"

    # Fixed on the server: the next crawl fetches that series only.
    archive.server.route(
        archive.metadata_path(bad),
        Reply(200, json.dumps(archive.series[bad].instances).encode(), JSON),
    )
    again = crawl(archive, tmp_path)
    assert (again.series_fetched, again.studies_skipped) == (1, 2)
    assert sop_uids(tmp_path) == all_uids(archive)


def test_an_instance_without_uids_is_a_reject(tmp_path: Path, archive: FakeArchive) -> None:
    archive.add_study(20, "20231004", n_instances=3)
    series = next(iter(archive.series.values()))
    del series.instances[1]["0020000E"]
    series.reported = 3
    summary = crawl(archive, tmp_path)
    assert summary.instances == 2
    rejects = Index(tmp_path).rejects.collect().to_dicts()
    assert [r["reason"] for r in rejects] == ["missing_uid"]
    assert [(s.expected, s.indexed) for s in summary.shortfalls] == [(3, 2)]


def test_a_shortfall_is_listed_and_recorded(
    tmp_path: Path, archive: FakeArchive, capsys: pytest.CaptureFixture[str]
) -> None:
    archive.add_study(30, "20231005", n_series=2, n_instances=2)
    short = next(iter(archive.series.values()))
    short.reported = 5
    archive.serve()
    status = main(
        ["crawl", archive.url, "--root", str(tmp_path), "--no-progress", "--retries", "1"]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "INCOMPLETE: 1 series hold 3 fewer instances" in out
    assert f"series {short.uid}: 2 of 5 indexed" in out
    state = {r["key"]: r for r in crawl_state(tmp_path)}
    assert (state[short.uid]["status"], state[short.uid]["missing"]) == ("incomplete", 3)
    assert state[short.study_uid]["status"] == "incomplete"


def test_a_silently_capped_server_is_split_into_date_windows(
    tmp_path: Path, archive: FakeArchive
) -> None:
    dates = ["20230101", "20230415", "20230415", "20230702", "20231001", "20231002", "20231231"]
    for seed, date in enumerate(dates * 2):
        archive.add_study(40 + seed, date)
    archive.cap = 3  # ignores larger limits; never says so
    archive.honour_offset = False
    summary = crawl(archive, tmp_path, max_results=3, since=None)
    # 20230415 holds 4 studies: more than one query returns, and offset is ignored.
    assert summary.capped_windows == ["2023-04-15"]
    found = {r["StudyInstanceUID"] for r in Index(tmp_path).instances.collect().to_dicts()}
    assert len(found) == 14 - 1
    state = {(r["kind"], r["key"]): r for r in crawl_state(tmp_path)}
    assert state[("window", "2023-04-15")]["status"] == "capped"
    assert duplicates(sop_uids(tmp_path)) == []


def test_a_capped_day_is_paged_when_offset_is_honoured(
    tmp_path: Path, archive: FakeArchive
) -> None:
    for seed in range(7):
        archive.add_study(60 + seed, "20231009")
    archive.cap = 2
    summary = crawl(archive, tmp_path, max_results=2)
    assert summary.studies == 7
    assert summary.capped_windows == []
    assert sop_uids(tmp_path) == all_uids(archive)


def test_credentials_in_the_url_never_reach_tables_or_logs(
    tmp_path: Path, archive: FakeArchive, caplog: pytest.LogCaptureFixture
) -> None:
    archive.add_study(70, "20231010")
    archive.serve()
    bad = next(iter(archive.series))
    archive.server.route(archive.metadata_path(bad), Reply(500, b"oops"))
    url = archive.url.replace("http://", "http://alice:hunter2-secret@")
    caplog.set_level(logging.DEBUG)
    with DicomWebClient(url, retry=FAST_RETRY) as client:
        summary = DicomWebCrawl(client, tmp_path).run()
    assert summary.series_failed == 1
    assert "hunter2" not in caplog.text
    assert all("hunter2" not in f for f in summary.failures)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"hunter2" not in path.read_bytes(), path
    assert all(
        any(k.lower() == "authorization" for k in r.headers) for r in archive.server.requests
    )


def test_a_folder_is_a_crawl_source_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from _crawl_helpers import write_studies

    files = write_studies(tmp_path / "in", seed=80, studies=1)
    root = tmp_path / "root"
    assert main(["crawl", str(tmp_path / "in"), "--root", str(root), "--no-progress"]) == 0
    assert f"instances        {len(files):>10,}" in capsys.readouterr().out
    assert len(sop_uids(root)) == len(files)
    assert main(["crawl", str(tmp_path / "nowhere"), "--root", str(root)]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_one_crawl_function_takes_a_server_or_a_folder(
    tmp_path: Path, archive: FakeArchive
) -> None:
    from _crawl_helpers import write_studies

    from imgindex.crawl import IndexSummary, crawl

    archive.add_study(90, "20231011")
    archive.serve()
    web = crawl(archive.url, tmp_path / "web", concurrency=2, since=dt.date(2023, 10, 11))
    assert isinstance(web, CrawlSummary)
    assert web.instances == 2
    files = write_studies(tmp_path / "in", seed=91, studies=1)
    folder = crawl(tmp_path / "in", tmp_path / "folder", workers=1)
    assert isinstance(folder, IndexSummary)
    assert folder.instances == len(files)


def test_splitting_at_the_median_date_takes_few_queries(
    tmp_path: Path, archive: FakeArchive
) -> None:
    # 120 studies, at most 2 a day, spread over a century (one before 1900): a server that
    # caps at 10 and ignores offset is still listed whole, in few queries.
    rng = random.Random(5)
    days = rng.sample(range(36_500), 60)
    dates = [dt.date(1899, 6, 1) + dt.timedelta(days=d) for d in days]
    for seed, day in enumerate(dates * 2):
        archive.add_study(100 + seed, day.strftime("%Y%m%d"), n_instances=1)
    archive.cap = 10
    archive.honour_offset = False
    summary = crawl(archive, tmp_path, max_results=10)
    assert summary.studies == 120
    assert summary.capped_windows == []
    queries = archive.server.count("/dicom-web/studies")
    assert queries <= 60, f"{queries} study queries for 120 studies at 10 per query"


@pytest.mark.parametrize("honour_offset", [True, False], ids=["offset", "no-offset"])
def test_a_full_page_is_paged_or_else_split(
    tmp_path: Path, archive: FakeArchive, honour_offset: bool
) -> None:
    # Without a known silent cap, a full page is paged with offset (fewest queries); a
    # server that ignores offset is noticed and the crawl splits by StudyDate instead.
    dates = ["20220101", "20220301", "20220302", "20230505", "20240606"]
    for seed, date in enumerate(dates * 2):
        archive.add_study(200 + seed, date, n_instances=1)
    archive.honour_offset = honour_offset
    summary = crawl(archive, tmp_path, page_size=3)
    assert summary.studies == 10
    assert summary.capped_windows == []
    queries = archive.server.count("/dicom-web/studies")
    if honour_offset:
        assert queries == 4  # 3 + 3 + 3 + 1
    else:
        assert queries > 4
    assert duplicates(sop_uids(tmp_path)) == []
