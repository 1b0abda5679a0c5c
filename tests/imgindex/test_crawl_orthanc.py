"""The crawler against a real Orthanc with its DICOMweb plugin, on loopback.

Each test starts its own Orthanc (tests/peers/orthanc.py) loaded with generated studies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
import pytest
from _crawl_helpers import (
    HOW_INDEXED,
    crawl_state,
    duplicates,
    instance_rows,
    sop_uids,
    write_studies,
)
from peers.orthanc import Orthanc, start_orthanc

from dicomweb.client import DicomWebClient, RetryPolicy, parse_auth
from imgindex.crawl.metrics import CrawlMetrics
from imgindex.crawl.orthanc import OrthancFeed
from imgindex.crawl.web import DicomWebCrawl
from imgindex.extract import Extractor
from imgindex.index import Index
from storage.errors import TableNotFoundError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

#: The command as installed in the interpreter's environment (PATH may not hold it).
IMGINDEX = str(Path(sys.executable).parent / "imgindex")
FAST_RETRY = RetryPolicy(attempts=2, backoff=0.01, max_backoff=0.05)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = start_orthanc(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def web(server: Orthanc, **kwargs: object) -> DicomWebClient:
    return DicomWebClient(server.dicomweb_url, retry=FAST_RETRY, **kwargs)  # type: ignore[arg-type]


def uids_of(paths: list[Path]) -> list[str]:
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths)


def test_crawl_indexes_what_orthanc_holds_with_wado_locations(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    files = write_studies(tmp_path / "in", seed=1, studies=4)
    orthanc.upload(files)
    root = tmp_path / "root"
    metrics = CrawlMetrics()
    with web(orthanc, on_event=metrics.on_request) as client:
        summary = DicomWebCrawl(client, root, metrics=metrics).run()
        assert (summary.studies, summary.series, summary.series_fetched) == (4, 8, 8)
        assert summary.instances == len(files)
        assert summary.shortfalls == []
        assert summary.failures == []
        assert sop_uids(root) == uids_of(files)

        # Rows hold what the files hold: the same as indexing the files themselves.
        extractor = Extractor(source="files")
        by_uid = {r["SOPInstanceUID"]: r for r in instance_rows(root)}
        for path in files:
            expected = extractor.extract_file(path).row
            assert expected is not None
            row = by_uid[expected["SOPInstanceUID"]]
            for column in HOW_INDEXED:
                expected.pop(column)
            assert {k: row[k] for k in expected} == expected
            assert row["source"] == orthanc.dicomweb_url.rstrip("/")

        # The location is the instance's WADO-RS URL: it gives the instance back.
        row = next(iter(by_uid.values()))
        response = client.get(row["location"], accept='multipart/related; type="application/dicom"')
        assert response.status_code == 200
        assert row["SOPInstanceUID"].encode() in response.content

    state = {(r["kind"], r["key"]): r for r in crawl_state(root)}
    series_rows = [r for r in state.values() if r["kind"] == "series"]
    assert len(series_rows) == 8
    assert {r["status"] for r in state.values()} == {"done"}
    assert all(r["expected_instances"] == r["indexed_instances"] == 3 for r in series_rows)
    assert metrics.instances._value.get() == len(files)
    text = Index(root).sql("SELECT count(*) AS n FROM series").to_pylist()
    assert text == [{"n": 8}]


def test_a_second_crawl_fetches_only_what_changed(tmp_path: Path, orthanc: Orthanc) -> None:
    first = write_studies(tmp_path / "a", seed=2, studies=3)
    orthanc.upload(first)
    root = tmp_path / "root"
    with web(orthanc) as client:
        assert DicomWebCrawl(client, root).run().series_fetched == 6
        unchanged = DicomWebCrawl(client, root).run()
        assert (unchanged.studies_skipped, unchanged.series_fetched) == (3, 0)

        # Two new studies, and one more instance in an existing series.
        added = write_studies(tmp_path / "b", seed=3, studies=2)
        grown = write_studies(tmp_path / "c", seed=2, studies=1, instances_per_series=4)
        extra = [p for p in grown if p.name == "im003.dcm" and p.parent.name == "se0"]
        orthanc.upload(added + extra)
        again = DicomWebCrawl(client, root).run()
    assert again.studies == 5
    assert again.studies_skipped == 2
    assert again.series_fetched == 4 + 1
    assert again.series_skipped == 1
    assert sop_uids(root) == uids_of(first + added + extra)
    assert duplicates(sop_uids(root)) == []


def test_a_capped_orthanc_is_crawled_by_splitting_date_windows(tmp_path: Path) -> None:
    server = start_orthanc(tmp_path, overrides={"LimitFindResults": 3})
    try:
        dates = ["20231001", "20231001", "20231003", "20231005", "20231008", "20231009"]
        files = write_studies(
            tmp_path / "in",
            seed=4,
            studies=12,
            series_per_study=1,
            instances_per_series=1,
            dates=dates,
        )
        server.upload(files)
        root = tmp_path / "root"
        with web(server) as client:
            # The cap is silent: told nothing, a crawl sees only part of the studies.
            naive = DicomWebCrawl(client, tmp_path / "naive").run()
            assert naive.studies < 12
            summary = DicomWebCrawl(client, root, max_results=3).run()
        assert summary.studies == 12
        assert sop_uids(root) == uids_of(files)
        assert summary.capped_windows == []
    finally:
        server.stop()


def _imgindex(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [IMGINDEX, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_a_crawl_killed_midway_resumes_without_duplicates(tmp_path: Path, orthanc: Orthanc) -> None:
    files = write_studies(
        tmp_path / "in", seed=5, studies=30, series_per_study=2, instances_per_series=2
    )
    orthanc.upload(files)
    root = tmp_path / "root"
    url = orthanc.dicomweb_url
    args = [url, "--root", str(root), "--concurrency", "1", "--batch-rows", "4"]
    process = _imgindex("crawl", *args, "--no-progress")
    state = Index(root).table("crawl_state")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if state.exists and state.scan().collect().height >= 4:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the crawl ended before it could be killed"
    done_before = sum(1 for r in crawl_state(root) if r["kind"] == "series")
    assert 0 < done_before < 60

    resumed = subprocess.run(  # noqa: PLW1510 (the status is asserted)
        [IMGINDEX, "crawl", *args, "--no-progress"], capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    assert sop_uids(root) == uids_of(files)
    assert duplicates(sop_uids(root)) == []
    fetched = int(resumed.stdout.split("fetched")[0].rsplit("(", 1)[1].replace(",", ""))
    assert fetched <= 60 - done_before + 2, resumed.stdout  # at most the series in flight again


def test_following_the_change_feed_while_storescu_sends(tmp_path: Path, orthanc: Orthanc) -> None:
    before = write_studies(tmp_path / "before", seed=6, studies=1)
    orthanc.upload(before)
    root = tmp_path / "root"
    stop = threading.Event()
    rest = DicomWebClient(orthanc.url, retry=FAST_RETRY)
    client = web(orthanc)
    feed = OrthancFeed(rest, client, root, poll_interval=0.2, stop=stop)
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(feed.run(follow=True)))
    thread.start()
    try:
        # The first run crawls what Orthanc held.
        _wait_for(lambda: len(sop_uids(root)) == len(before), "the first full crawl")
        sent = write_studies(tmp_path / "sent", seed=7, studies=2, instances_per_series=5)
        storescu = _dcmtk("storescu")
        run = subprocess.run(  # noqa: PLW1510 (the status is asserted)
            [storescu, "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port), *map(str, sent)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        assert run.returncode == 0, run.stderr
        started = time.monotonic()
        _wait_for(lambda: sop_uids(root) == uids_of(before + sent), "the sent instances")
        assert time.monotonic() - started < 15
    finally:
        stop.set()
        thread.join(timeout=30)
        rest.close()
        client.close()
    assert duplicates(sop_uids(root)) == []
    last = feed.last_seq()
    assert last is not None
    assert last > 0
    # A later run reads only what came after.
    with DicomWebClient(orthanc.url) as rest2, web(orthanc) as web2:
        again = OrthancFeed(rest2, web2, root).run(follow=False)
    assert again.baseline is None
    # It starts from the number saved: only changes logged after it are read (the last
    # instances' changes, if the stop came between fetching their series and reading
    # them, and stable-series events), and nothing is indexed twice.
    assert again.changes == again.last_seq - last
    assert sop_uids(root) == uids_of(before + sent)


def test_credentials_work_and_never_show(tmp_path: Path) -> None:
    secret = "s3cr3t-pass-word"
    server = start_orthanc(tmp_path, users={"alice": secret})
    try:
        files = write_studies(tmp_path / "in", seed=8, studies=1)
        server.upload(files)
        root = tmp_path / "root"
        auth_file = tmp_path / "auth.txt"
        auth_file.write_text(f"basic:alice:{secret}\n")
        ok = subprocess.run(  # noqa: PLW1510 (the status is asserted)
            [
                IMGINDEX,
                "-v",
                "crawl",
                server.dicomweb_url,
                "--root",
                str(root),
                "--auth-file",
                str(auth_file),
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ok.returncode == 0, ok.stderr
        assert len(sop_uids(root)) == len(files)
        wrong = subprocess.run(  # noqa: PLW1510 (the status is asserted)
            [
                IMGINDEX,
                "crawl",
                server.dicomweb_url,
                "--root",
                str(tmp_path / "r2"),
                "--auth",
                "basic:alice:wrong-" + secret,
                "--no-progress",
                "--retries",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert wrong.returncode == 1
        assert "401" in wrong.stderr
        assert "--auth" in wrong.stderr
        for output in (ok.stdout, ok.stderr, wrong.stdout, wrong.stderr):
            assert secret not in output
        for path in root.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
    finally:
        server.stop()
    assert parse_auth(f"basic:alice:{secret}") is not None


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(TableNotFoundError, FileNotFoundError):
            if check():
                return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _dcmtk(tool: str) -> str:
    from _listener_helpers import dcmtk

    return str(dcmtk(tool))


def test_follow_from_the_command_line_stops_cleanly_on_sigterm(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    first = write_studies(tmp_path / "a", seed=9, studies=1)
    orthanc.upload(first)
    root = tmp_path / "root"
    process = _imgindex(
        "crawl", "--orthanc", orthanc.url, "--root", str(root), "--follow",
        "--poll-interval", "0.2", "--no-progress",
    )  # fmt: skip
    try:
        _wait_for(lambda: sop_uids(root) == uids_of(first), "the first full crawl")
        later = write_studies(tmp_path / "b", seed=10, studies=1)
        orthanc.upload(later)
        _wait_for(lambda: sop_uids(root) == uids_of(first + later), "the uploaded study")
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "first run: crawled everything through DICOMweb" in out
    assert "changes read" in out
    assert "SIGTERM, stopping" in err
