"""The DICOMweb client: retries and faults against a scripted loopback server, and the real
thing against Orthanc.

The fault tests assert on what :class:`~peers.faults.FaultServer` received (how many attempts,
which query parameters, which ``Authorization`` header, from how many connections) as well as
on what the client raised. Back-off is recorded, not waited for: ``dicomweb.client._sleep`` is
replaced where a test checks delays.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final

import httpx
import pydicom
import pytest
from peers.faults import FaultServer, Reply, Request
from peers.orthanc import free_ports, start_orthanc

import dicomweb.client
from dicomweb.client import (
    DicomWebClient,
    RequestEvent,
    RetryPolicy,
    parse_auth,
    read_auth_file,
)
from dicomweb.errors import REASONS, DicomWebError
from imgindex.testing import (
    dataset_to_bytes,
    make_patient,
    make_series,
    make_study_info,
    write_dataset,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from peers.orthanc import Orthanc

ROOT: Final = "/dw"
STUDY_UID_TAG: Final = "0020000D"
SERIES_UID_TAG: Final = "0020000E"
SOP_UID_TAG: Final = "00080018"
BOUNDARY: Final = "b0und4ry-xyz"
MULTIPART_TYPE: Final = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
DICOM_JSON_TYPE: Final = {"Content-Type": "application/dicom+json"}
#: Retries without waiting; tests that check delays record them instead.
FAST: Final = RetryPolicy(attempts=3, backoff=0.0, max_backoff=0.0)
USER: Final = "alice"
PASSWORD: Final = "pa:ss@S3CRET"


# -- helpers ---------------------------------------------------------------------------------


def study(uid: str) -> dict[str, Any]:
    return {STUDY_UID_TAG: {"vr": "UI", "Value": [uid]}}


def json_reply(items: list[dict[str, Any]], status: int = 200) -> Reply:
    return Reply(status, json.dumps(items).encode(), dict(DICOM_JSON_TYPE))


def multipart(bodies: list[bytes], boundary: str = BOUNDARY) -> bytes:
    delimiter = b"--" + boundary.encode()
    out = bytearray()
    for body in bodies:
        out += delimiter + b"\r\nContent-Type: application/dicom\r\n\r\n" + body + b"\r\n"
    out += delimiter + b"--\r\n"
    return bytes(out)


class Events(list[RequestEvent]):
    """An ``on_event`` callback that keeps the events (thread-safe append)."""

    def __call__(self, event: RequestEvent) -> None:
        self.append(event)

    @property
    def outcomes(self) -> list[str]:
        return [event.outcome for event in self]


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as fault_server:
        yield fault_server


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def client(server: FaultServer, events: Events) -> Iterator[DicomWebClient]:
    with DicomWebClient(
        server.url + ROOT + "/", retry=FAST, timeout=5.0, on_event=events
    ) as dicomweb_client:
        yield dicomweb_client


@pytest.fixture
def delays(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The back-off delays the client chose, instead of sleeping them."""
    recorded: list[float] = []
    monkeypatch.setattr(dicomweb.client, "_sleep", recorded.append)
    return recorded


def test_fault_server_routes(server: FaultServer) -> None:
    server.route("/a", Reply(201, b"one"), Reply(202, b"two"), default=Reply(203, b"rest"))
    server.route("/b", Reply(200, b"same"))
    server.route("/c/*/d", Reply(200, b"pattern"))
    server.route("/c/x/d", Reply(200, b"exact"))
    with httpx.Client(base_url=server.url) as http:
        assert [http.get("/a").status_code for _ in range(4)] == [201, 202, 203, 203]
        assert [http.get("/b?q=1").content for _ in range(2)] == [b"same", b"same"]
        assert http.get("/c/1.2/d").content == b"pattern"
        assert http.get("/c/x/d").content == b"exact"
        unrouted = http.get("/nowhere")
        assert unrouted.status_code == 404
        assert unrouted.headers["content-type"] == "text/plain"
        assert http.post("/b", content=b"payload", headers={"X-Case": "v"}).content == b"same"
    assert server.count("/a") == 4
    assert server.count("/c/*/d") == 2
    assert server.count() == 10
    posted = server.requests[-1]
    assert (posted.method, posted.body, posted.query) == ("POST", b"payload", {})
    assert posted.headers["x-case"] == posted.headers["X-CASE"] == "v"
    assert server.requests[4].query == {"q": ["1"]}


def test_new_reasons_are_documented() -> None:
    assert {"http_status", "connection", "timeout"} <= set(REASONS)


# -- retries ---------------------------------------------------------------------------------


def test_503_then_200_is_retried(
    server: FaultServer, client: DicomWebClient, events: Events
) -> None:
    server.route(f"{ROOT}/studies", Reply(503, b"busy"), json_reply([study("1.2.3")]))
    assert client.search("studies") == [study("1.2.3")]
    assert server.count(f"{ROOT}/studies") == 2
    assert events.outcomes == ["retry", "ok"]
    assert [(e.status, e.error, e.attempt) for e in events] == [
        (503, "status 503", 1),
        (200, None, 2),
    ]
    assert all(e.url == f"{server.url}{ROOT}/studies" and e.method == "GET" for e in events)


def test_retry_after_is_honoured_and_capped(server: FaultServer, delays: list[float]) -> None:
    server.route(
        f"{ROOT}/studies",
        Reply(429, headers={"Retry-After": "1"}),
        Reply(503, headers={"Retry-After": "30"}),
        Reply(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),  # in the past
        json_reply([]),
    )
    policy = RetryPolicy(attempts=4, backoff=0.0, max_backoff=5.0)
    with DicomWebClient(server.url + ROOT, retry=policy) as client:
        assert client.search("studies") == []
    assert delays == [1.0, 5.0, 0.0]
    assert server.count() == 4


def test_retry_after_is_ignored_on_500(server: FaultServer, delays: list[float]) -> None:
    server.route(f"{ROOT}/studies", Reply(500, headers={"Retry-After": "3"}), json_reply([]))
    policy = RetryPolicy(attempts=2, backoff=0.0, max_backoff=5.0)
    with DicomWebClient(server.url + ROOT, retry=policy) as client:
        client.search("studies")
    assert delays == [0.0]


def test_backoff_is_jittered_exponential_and_capped(
    server: FaultServer, delays: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    server.route(f"{ROOT}/studies", Reply(500, b'{"error": "database is down"}'))
    policy = RetryPolicy(attempts=5, backoff=0.1, max_backoff=0.3)
    caplog.set_level(logging.INFO, logger="dicomweb.client")
    with (
        DicomWebClient(server.url + ROOT, retry=policy) as client,
        pytest.raises(DicomWebError) as caught,
    ):
        client.search("studies")
    error = caught.value
    assert (error.reason, error.status) == ("http_status", 500)
    assert "after 5 attempt(s)" in str(error)
    assert "database is down" in str(error)
    assert server.count() == policy.attempts
    assert len(delays) == policy.attempts - 1
    for retry, delay in enumerate(delays):
        assert 0.0 <= delay <= min(0.3, 0.1 * 2**retry)
    retries = [r for r in caplog.records if r.getMessage().startswith("retrying GET")]
    assert len(retries) == 4
    assert all(r.levelno == logging.INFO for r in retries)
    assert "status 500 (attempt 1 of 5)" in retries[0].getMessage()


def test_max_elapsed_bounds_the_retries(server: FaultServer, delays: list[float]) -> None:
    server.route(f"{ROOT}/studies", Reply(503, headers={"Retry-After": "2"}))
    policy = RetryPolicy(attempts=10, backoff=0.0, max_backoff=5.0, max_elapsed=1.0)
    with (
        DicomWebClient(server.url + ROOT, retry=policy) as client,
        pytest.raises(DicomWebError, match="503"),
    ):
        client.search("studies")
    assert server.count() == 1  # a 2 s wait would end past 1 s
    assert delays == []


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 410, 501])
def test_other_errors_raise_at_once(
    server: FaultServer, client: DicomWebClient, events: Events, status: int
) -> None:
    server.route(f"{ROOT}/studies/1.2.3/series", Reply(status, b"no such thing"))
    with pytest.raises(DicomWebError) as caught:
        client.search("/studies/1.2.3/series", params={"Modality": "CT"})
    error = caught.value
    assert (error.reason, error.status) == ("http_status", status)
    assert error.url == f"{server.url}{ROOT}/studies/1.2.3/series?Modality=CT"
    assert error.url in str(error)
    assert f"status={status}" in str(error)
    assert "no such thing" in str(error)
    assert server.count() == 1
    assert events.outcomes == ["failed"]
    if status in (401, 403):
        assert "--auth" in str(error)
    if status == 404:
        assert "base URL" in str(error)


def test_redirects_are_not_followed(server: FaultServer, client: DicomWebClient) -> None:
    server.route(
        f"{ROOT}/studies",
        Reply(302, headers={"Location": "https://bob:hunter2@elsewhere.example/dw/studies"}),
    )
    with pytest.raises(DicomWebError) as caught:
        client.search("studies")
    assert caught.value.status == 302
    assert "https://elsewhere.example/dw/studies" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert server.count() == 1


def test_connection_refused_after_all_attempts(events: Events) -> None:
    (port,) = free_ports(1)
    policy = RetryPolicy(attempts=4, backoff=0.001, max_backoff=0.001)
    with (
        DicomWebClient(f"http://127.0.0.1:{port}/dw", retry=policy, on_event=events) as client,
        pytest.raises(DicomWebError) as caught,
    ):
        client.search("studies")
    error = caught.value
    assert error.reason == "connection"
    assert error.status is None
    assert "after 4 attempt(s)" in str(error)
    assert isinstance(error.__cause__, httpx.ConnectError)
    assert events.outcomes == ["retry", "retry", "retry", "failed"]
    assert {e.error for e in events} == {"ConnectError"}
    assert {e.status for e in events} == {None}


def test_timeout_is_retried_then_raised(server: FaultServer, events: Events) -> None:
    server.route(f"{ROOT}/studies", Reply(200, b"[]", delay=5.0))
    with (
        DicomWebClient(
            server.url + ROOT,
            timeout=0.2,
            retry=RetryPolicy(attempts=2, backoff=0.0),
            on_event=events,
        ) as client,
        pytest.raises(DicomWebError) as caught,
    ):
        client.search("studies")
    assert caught.value.reason == "timeout"
    assert "after 2 attempt(s)" in str(caught.value)
    assert server.count() == 2
    assert [(e.outcome, e.error) for e in events] == [
        ("retry", "ReadTimeout"),
        ("failed", "ReadTimeout"),
    ]


def test_timeout_then_answer(server: FaultServer, client: DicomWebClient) -> None:
    server.route(f"{ROOT}/studies", Reply(200, b"[]", delay=5.0), json_reply([study("1.2")]))
    with DicomWebClient(server.url + ROOT, timeout=0.2, retry=FAST) as fast:
        assert fast.search("studies") == [study("1.2")]
    assert server.count() == 2


def test_dropped_connection_is_retried(
    server: FaultServer, client: DicomWebClient, events: Events
) -> None:
    server.route(f"{ROOT}/studies", Reply(drop=True), json_reply([study("1.2")]))
    assert client.search("studies") == [study("1.2")]
    assert server.count() == 2
    assert [e.error for e in events] == ["RemoteProtocolError", None]


def test_truncated_body_of_a_plain_get_is_retried(
    server: FaultServer, client: DicomWebClient
) -> None:
    body = json.dumps([study("1.2.3")]).encode()
    server.route(
        f"{ROOT}/studies", Reply(200, body, dict(DICOM_JSON_TYPE), truncate_at=10), json_reply([])
    )
    assert client.search("studies") == []
    assert server.count() == 2


# -- bodies ----------------------------------------------------------------------------------


def test_html_page_with_200(server: FaultServer, client: DicomWebClient) -> None:
    page = b"<!DOCTYPE html><html><body>Please log in</body></html>"
    server.route(f"{ROOT}/*", Reply(200, page, {"Content-Type": "text/html"}))
    for call in (lambda: client.search("studies"), lambda: client.get_json("changes")):
        with pytest.raises(DicomWebError) as caught:
            call()
        assert caught.value.reason == "html_error_page"
        assert caught.value.status == 200
        assert "Please log in" in str(caught.value)
    assert server.count() == 2  # a 200 is not retried, whatever its body


@pytest.mark.parametrize(
    ("body", "index"),
    [(b"{not json", None), (b'{"0020000D": {}}', None), (b'[{"0020000D": {}}, 3]', 1)],
)
def test_malformed_json(
    server: FaultServer, client: DicomWebClient, body: bytes, index: int | None
) -> None:
    server.route(f"{ROOT}/studies", Reply(200, body, dict(DICOM_JSON_TYPE)))
    with pytest.raises(DicomWebError) as caught:
        client.search("studies")
    assert caught.value.reason == "malformed_json"
    assert caught.value.index == index


def test_get_json_of_an_empty_body(server: FaultServer, client: DicomWebClient) -> None:
    server.route(f"{ROOT}/changes", Reply(200, b""))
    with pytest.raises(DicomWebError) as caught:
        client.get_json("changes")
    assert caught.value.reason == "malformed_json"


def test_get_json_any_top_level(server: FaultServer, client: DicomWebClient) -> None:
    server.route(f"{ROOT}/changes", Reply(200, b'{"Changes": [], "Done": true, "Last": 0}'))
    server.route(f"{ROOT}/count", Reply(200, b"42"))
    assert client.get_json("changes", params={"since": 0, "limit": 10}) == {
        "Changes": [],
        "Done": True,
        "Last": 0,
    }
    assert client.get_json("count") == 42
    first = server.requests[0]
    assert first.query == {"since": ["0"], "limit": ["10"]}
    assert first.headers["accept"] == "application/json"


@pytest.mark.parametrize("reply", [Reply(204), Reply(200, b""), Reply(200, b" \r\n")])
def test_no_matches(server: FaultServer, client: DicomWebClient, reply: Reply) -> None:
    server.route(f"{ROOT}/studies", reply)
    assert client.search("studies") == []


def test_qido_warning_header_is_logged(
    server: FaultServer, client: DicomWebClient, caplog: pytest.LogCaptureFixture
) -> None:
    warning = '299 pacs: "The number of results exceeded the maximum supported by the server"'
    server.route(f"{ROOT}/studies", Reply(200, b"[]", {**DICOM_JSON_TYPE, "Warning": warning}))
    with caplog.at_level(logging.WARNING, logger="dicomweb.client"):
        client.search("studies")
    assert any("exceeded the maximum" in r.getMessage() for r in caplog.records)


# -- QIDO parameters and paging --------------------------------------------------------------


def test_search_parameters(server: FaultServer, client: DicomWebClient) -> None:
    server.route(f"{ROOT}/studies", json_reply([]))
    client.search(
        "studies",
        params={"ModalitiesInStudy": "CT", "StudyDate": ["20240101-", "-20241231"], "fuzzy": 1},
        includefield=["00081030", "PatientAge"],
        limit=10,
        offset=20,
    )
    client.search("studies")
    with_params, without = server.requests
    assert with_params.query == {
        "ModalitiesInStudy": ["CT"],
        "StudyDate": ["20240101-", "-20241231"],
        "fuzzy": ["1"],
        "includefield": ["00081030", "PatientAge"],
        "limit": ["10"],
        "offset": ["20"],
    }
    assert with_params.headers["accept"] == "application/dicom+json"
    assert without.query == {}


def _paged(items: list[dict[str, Any]]) -> Any:
    def serve(request: Request) -> Reply:
        offset = int(request.query.get("offset", ["0"])[0])
        limit = int(request.query.get("limit", [str(len(items))])[0])
        return json_reply(items[offset : offset + limit])

    return serve


@pytest.mark.parametrize(("total", "offsets"), [(5, [0, 2, 4]), (4, [0, 2, 4]), (0, [0])])
def test_iter_search_pages(
    server: FaultServer, client: DicomWebClient, total: int, offsets: list[int]
) -> None:
    items = [study(f"1.2.{i}") for i in range(total)]
    server.route_fn(f"{ROOT}/studies", _paged(items))
    found = list(client.iter_search("studies", params={"PatientID": "p1"}, page_size=2))
    assert found == items
    assert [int(r.query["offset"][0]) for r in server.requests] == offsets
    assert {r.query["limit"][0] for r in server.requests} == {"2"}
    assert {r.query["PatientID"][0] for r in server.requests} == {"p1"}


def test_iter_search_is_lazy(server: FaultServer, client: DicomWebClient) -> None:
    server.route_fn(f"{ROOT}/studies", _paged([study(f"1.2.{i}") for i in range(10)]))
    pages = client.iter_search("studies", page_size=3)
    assert server.count() == 0
    assert [next(pages) for _ in range(4)] == [study(f"1.2.{i}") for i in range(4)]
    assert server.count() == 2


def test_iter_search_stops_when_offset_is_ignored(
    server: FaultServer, client: DicomWebClient
) -> None:
    server.route(f"{ROOT}/studies", json_reply([study("1.1"), study("1.2")]))
    with pytest.raises(DicomWebError, match="ignores QIDO-RS offset") as caught:
        list(client.iter_search("studies", page_size=2))
    assert caught.value.reason == "malformed_json"
    assert server.count() == 2


def test_search_rejects_bad_paging(server: FaultServer, client: DicomWebClient) -> None:
    with pytest.raises(ValueError, match="limit"):
        client.search("studies", limit=0)
    with pytest.raises(ValueError, match="offset"):
        client.search("studies", offset=-1)
    assert server.count() == 0


def test_iter_search_rejects_bad_page_size(client: DicomWebClient) -> None:
    with pytest.raises(ValueError, match="page_size"):
        next(client.iter_search("studies", page_size=0))


# -- paths and UIDs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uid", ["../x", "..", "1.2/../3", "1..2", ".1.2", "1.2.", "", "1.2 ", "1" * 65, "1.2\n"]
)
def test_uids_are_validated(server: FaultServer, client: DicomWebClient, uid: str) -> None:
    with pytest.raises(ValueError, match="DICOM UID"):
        client.series_metadata(uid, "1.2")
    with pytest.raises(ValueError, match="series_uid"):
        client.instance_metadata("1.2", uid, "1.3")
    with pytest.raises(ValueError, match="sop_uid"):
        client.retrieve_instance("1.2", "1.3", uid)
    with pytest.raises(ValueError, match="study_uid"):
        client.retrieve_series(uid, "1.2")  # at the call, not at the first next()
    assert server.count() == 0


@pytest.mark.parametrize(
    "path",
    [
        "studies/../x/series",
        "studies/1.2/series/../instances",
        "studies/1.2",
        "studies/1.2/series/1.3",
        "series/1.2/instances",
        "studies?limit=1",
        "patients",
        "",
    ],
)
def test_search_paths_are_validated(server: FaultServer, client: DicomWebClient, path: str) -> None:
    with pytest.raises(ValueError, match="QIDO-RS search path"):
        client.search(path)
    with pytest.raises(ValueError, match="QIDO-RS search path"):
        next(client.iter_search(path))
    assert server.count() == 0


def test_every_search_path(server: FaultServer, client: DicomWebClient) -> None:
    server.route(f"{ROOT}/*", json_reply([]))
    paths = [
        "studies",
        "/series",
        "instances/",
        "studies/1.2/series",
        "studies/1.2/instances",
        "/studies/1.2/series/1.3/instances",
    ]
    for path in paths:
        assert client.search(path) == []
    assert [r.path for r in server.requests] == [f"{ROOT}/{p.strip('/')}" for p in paths]


def test_a_64_character_uid_is_accepted(server: FaultServer, client: DicomWebClient) -> None:
    uid = "1." + "2" * 62
    server.route(f"{ROOT}/studies/{uid}/series/1.3/metadata", json_reply([study(uid)]))
    assert client.series_metadata(uid, "1.3") == [study(uid)]


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "*"])
def test_transfer_syntax_in_accept(
    server: FaultServer, client: DicomWebClient, syntax: str
) -> None:
    server.route(
        f"{ROOT}/studies/1.2/series/1.3/instances/1.4",
        Reply(200, multipart([b"DICM"]), {"Content-Type": MULTIPART_TYPE}),
    )
    assert client.retrieve_instance("1.2", "1.3", "1.4", transfer_syntax=syntax) == b"DICM"
    accept = server.requests[0].headers["accept"]
    assert accept == f'multipart/related; type="application/dicom"; transfer-syntax={syntax}'


def test_transfer_syntax_is_validated(client: DicomWebClient) -> None:
    with pytest.raises(ValueError, match="transfer_syntax"):
        client.retrieve_series("1.2", "1.3", transfer_syntax='*"; boundary=x')


def test_paths_and_absolute_urls(server: FaultServer, client: DicomWebClient) -> None:
    server.route(f"{ROOT}/*", Reply(200, b"bulk", {"Content-Type": "application/octet-stream"}))
    assert client.get("/studies/1.2/bulk/7FE00010", accept="application/octet-stream").content
    assert client.get(f"{server.url}{ROOT}/studies/1.2/bulk/1").content == b"bulk"
    assert [r.path for r in server.requests] == [
        f"{ROOT}/studies/1.2/bulk/7FE00010",
        f"{ROOT}/studies/1.2/bulk/1",
    ]
    port = server.url.rsplit(":", 1)[1]
    for elsewhere in (
        f"http://127.0.0.2:{port}{ROOT}/bulk",
        f"https://127.0.0.1:{port}{ROOT}/bulk",
        "http://127.0.0.1:1/bulk",
        f"ftp://127.0.0.1:{port}/bulk",
    ):
        with pytest.raises(ValueError, match="origin"):
            client.get(elsewhere)
    assert server.count() == 2


def test_base_url_forms(server: FaultServer) -> None:
    for base in (server.url + ROOT, server.url + ROOT + "/", server.url + ROOT + "//"):
        with DicomWebClient(base) as client:
            assert client.url == server.url + ROOT
            assert repr(client) == f"DicomWebClient(url={server.url + ROOT!r}, concurrency=8)"
    with DicomWebClient(server.url) as client:
        assert client.url == server.url


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/dw",
        "127.0.0.1:8042/dw",
        "http:///dw",
        "http://h/dw?key=1",
        "http://h/dw#top",
        "http://h:x/",
        "http://alice:S3CRET@h:99999/dw",
    ],
)
def test_bad_base_urls(url: str) -> None:
    with pytest.raises(ValueError, match="URL") as caught:
        DicomWebClient(url)
    assert "S3CRET" not in str(caught.value)


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        DicomWebClient("http://127.0.0.1/dw", concurrency=0)
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="backoff"):
        RetryPolicy(backoff=-1)
    with pytest.raises(ValueError, match="max_elapsed"):
        RetryPolicy(max_elapsed=-1)


# -- WADO-RS retrieve ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instances() -> list[bytes]:
    return [dataset_to_bytes(ds) for ds in make_series(5, "CT", 3, 8, 8)]


def test_retrieve_series(
    server: FaultServer, client: DicomWebClient, events: Events, instances: list[bytes]
) -> None:
    server.route(
        f"{ROOT}/studies/1.2/series/1.3",
        Reply(503),
        Reply(200, multipart(instances), {"Content-Type": MULTIPART_TYPE}),
    )
    parts = list(client.retrieve_series("1.2", "1.3"))
    assert [part.body for part in parts] == instances
    assert {part.content_type for part in parts} == {"application/dicom"}
    uids = [pydicom.dcmread(io.BytesIO(part.body)).SOPInstanceUID for part in parts]
    assert uids == [pydicom.dcmread(io.BytesIO(raw)).SOPInstanceUID for raw in instances]
    assert server.count() == 2  # the 503 came before the body: retried
    assert [(e.outcome, e.status) for e in events] == [("retry", 503), ("ok", 200)]


def test_retrieve_series_chunked(
    server: FaultServer, client: DicomWebClient, instances: list[bytes]
) -> None:
    server.route(
        f"{ROOT}/studies/1.2/series/1.3",
        Reply(
            200,
            multipart(instances),
            {"Content-Type": MULTIPART_TYPE, "Transfer-Encoding": "chunked"},
        ),
    )
    assert [part.body for part in client.retrieve_series("1.2", "1.3")] == instances


def test_retrieve_series_is_lazy_and_frees_its_slot(
    server: FaultServer, instances: list[bytes]
) -> None:
    server.route(f"{ROOT}/*", Reply(200, multipart(instances), {"Content-Type": MULTIPART_TYPE}))
    with DicomWebClient(server.url + ROOT, concurrency=1) as client:
        parts = client.retrieve_series("1.2", "1.3")
        assert server.count() == 0
        first = next(parts)
        assert first.body == instances[0]
        parts.close()  # stop after one part: the only slot must come back
        done = threading.Event()

        def again() -> None:
            client.get("studies/1.2/series/1.3")
            done.set()

        worker = threading.Thread(target=again, daemon=True)
        worker.start()
        assert done.wait(10), "the slot of a closed retrieve was not released"
    assert server.count() == 2


@pytest.mark.parametrize("chunked", [False, True])
def test_truncated_multipart(
    server: FaultServer,
    client: DicomWebClient,
    events: Events,
    instances: list[bytes],
    chunked: bool,
) -> None:
    body = multipart(instances)
    headers = {"Content-Type": MULTIPART_TYPE}
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
    cut = len(instances[0]) + len(instances[1]) // 2 + 100
    server.route(f"{ROOT}/studies/1.2/series/1.3", Reply(200, body, headers, truncate_at=cut))
    received: list[bytes] = []

    def read_all() -> None:
        received.extend(part.body for part in client.retrieve_series("1.2", "1.3"))

    with pytest.raises(DicomWebError) as caught:
        read_all()
    assert caught.value.reason == "truncated"
    assert caught.value.status == 200
    assert received == instances[:1]  # whole parts before the cut were yielded
    assert server.count() == 1  # the body had begun: not retried
    assert [(e.outcome, e.error) for e in events] == [("failed", "truncated")]


def test_multipart_without_closing_delimiter(
    server: FaultServer, client: DicomWebClient, instances: list[bytes]
) -> None:
    body = multipart(instances).rsplit(b"--" + BOUNDARY.encode(), 1)[0]
    server.route(f"{ROOT}/*", Reply(200, body, {"Content-Type": MULTIPART_TYPE}))
    with pytest.raises(DicomWebError) as caught:
        client.retrieve_instance("1.2", "1.3", "1.4")
    assert caught.value.reason == "truncated"


@pytest.mark.parametrize(
    ("content_type", "reason"),
    [
        ('multipart/related; type="application/dicom"', "no_boundary"),
        ("application/dicom+json", "not_multipart"),
        ("", "not_multipart"),
    ],
)
def test_bad_multipart_content_type(
    server: FaultServer,
    client: DicomWebClient,
    instances: list[bytes],
    content_type: str,
    reason: str,
) -> None:
    server.route(f"{ROOT}/*", Reply(200, multipart(instances), {"Content-Type": content_type}))
    with pytest.raises(DicomWebError) as caught:
        list(client.retrieve_series("1.2", "1.3"))
    assert caught.value.reason == reason
    assert caught.value.status == 200
    assert caught.value.url == f"{server.url}{ROOT}/studies/1.2/series/1.3"
    assert server.count() == 1


def test_retrieve_error_status(server: FaultServer, client: DicomWebClient) -> None:
    server.route(f"{ROOT}/*", Reply(404, b'{"Message": "Accessing an inexistent item"}'))
    with pytest.raises(DicomWebError) as caught:
        list(client.retrieve_series("1.2", "1.3"))
    assert (caught.value.reason, caught.value.status) == ("http_status", 404)
    assert "inexistent item" in str(caught.value)


def test_retrieve_instance_needs_one_part(
    server: FaultServer, client: DicomWebClient, instances: list[bytes]
) -> None:
    server.route(
        f"{ROOT}/*", Reply(200, multipart(instances[:2]), {"Content-Type": MULTIPART_TYPE})
    )
    with pytest.raises(DicomWebError, match="one part") as caught:
        client.retrieve_instance("1.2", "1.3", "1.4")
    assert caught.value.reason == "malformed_multipart"


# -- credentials -----------------------------------------------------------------------------


def _secrets() -> list[str]:
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    return [PASSWORD, "S3CRET", "pa%3Ass%40S3CRET", token]


def test_credentials_never_leak(
    server: FaultServer, caplog: pytest.LogCaptureFixture, events: Events
) -> None:
    caplog.set_level(logging.DEBUG)
    server.route(f"{ROOT}/studies", Reply(503), json_reply([]))
    server.route(f"{ROOT}/missing", Reply(401, b"Unauthorized"))
    server.route(f"{ROOT}/slow", Reply(200, b"[]", delay=5.0))
    (closed_port,) = free_ports(1)
    texts: list[str] = []
    auth_url = f"http://{USER}:pa%3Ass%40S3CRET@127.0.0.1:"
    clients = [
        DicomWebClient(
            server.url + ROOT, auth=parse_auth(f"basic:{USER}:{PASSWORD}"), retry=FAST,
            timeout=0.1, on_event=events,
        ),
        DicomWebClient(
            auth_url + server.url.rsplit(":", 1)[1] + ROOT, retry=FAST, timeout=0.1,
            on_event=events,
        ),
        DicomWebClient(auth_url + f"{closed_port}{ROOT}", retry=FAST, on_event=events),
    ]  # fmt: skip
    for client in clients:
        with client:
            texts += [client.url, repr(client)]
            for path in ("studies", "missing", "slow", f"{server.url}{ROOT}/missing"):
                try:
                    client.get(path)
                except (DicomWebError, ValueError) as exc:
                    texts += [str(exc), repr(exc)]
                    cause = exc.__cause__
                    while cause is not None:
                        texts.append(str(cause))
                        cause = cause.__cause__
    # str and repr of 3 failures for each client on the server, 3 on the closed port (whose
    # client refuses the absolute URL of another origin with a ValueError).
    assert len([t for t in texts if "reason=" in t]) == 2 * (3 + 3 + 3)
    # studies (503 then 200; the second client gets the 200 at once), missing, slow, missing.
    assert server.count() == (2 + 1 + FAST.attempts + 1) + (1 + 1 + FAST.attempts + 1)
    texts += [event.url for event in events]
    texts += [record.getMessage() for record in caplog.records]
    texts += [str(record.args) for record in caplog.records]
    for secret in _secrets():
        leaks = [text for text in texts if secret in text]
        assert not leaks, f"{secret!r} leaked in {leaks}"
    # The server did get the credentials, from both clients, in the header only.
    expected = "Basic " + _secrets()[-1]
    assert server.requests
    assert {r.headers.get("authorization") for r in server.requests} == {expected}
    assert all(USER not in r.path and "S3CRET" not in r.path for r in server.requests)


def test_credentials_only_once(server: FaultServer) -> None:
    with pytest.raises(ValueError, match="twice") as caught:
        DicomWebClient(f"http://{USER}:S3CRET@127.0.0.1/dw", auth=parse_auth("bearer:S3CRET-TOKEN"))
    assert "S3CRET" not in str(caught.value)


def test_bearer_token_and_extra_headers(server: FaultServer) -> None:
    server.route(f"{ROOT}/studies", json_reply([]))
    with DicomWebClient(
        server.url + ROOT, auth=parse_auth("Bearer:abc.DEF-123"), headers={"X-Tenant": "radiology"}
    ) as client:
        client.search("studies")
    (request,) = server.requests
    assert request.headers["Authorization"] == "Bearer abc.DEF-123"
    assert request.headers["x-tenant"] == "radiology"


def _authorization(auth: httpx.Auth) -> str:
    request = next(auth.sync_auth_flow(httpx.Request("GET", "http://127.0.0.1/")))
    return request.headers["Authorization"]


@pytest.mark.parametrize(
    ("text", "header"),
    [
        ("basic:alice:S3CRET", "Basic " + base64.b64encode(b"alice:S3CRET").decode()),
        ("  BASIC:alice:p:w:  \n", "Basic " + base64.b64encode(b"alice:p:w:").decode()),
        ("basic:alice:p w", "Basic " + base64.b64encode(b"alice:p w").decode()),
        ("bearer:S3CRET:en", "Bearer S3CRET:en"),
    ],
)
def test_parse_auth(text: str, header: str) -> None:
    auth = parse_auth(text)
    assert _authorization(auth) == header
    assert "S3CRET" not in repr(auth)


@pytest.mark.parametrize(
    "text",
    [
        "alice:S3CRET",
        "S3CRET",
        "basic:S3CRET",
        "basic::S3CRET",
        "basic:alice:",
        "bearer:",
        "bearer:S3CRET S3CRET",
        "token:S3CRET",
        "basic:alice:S3CRET\nmore",
        "bearer:S3CRET\x00",
        "",
    ],
)
def test_parse_auth_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"basic:USER:PASSWORD|bearer:TOKEN") as caught:
        parse_auth(text)
    assert "S3CRET" not in str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None


def test_read_auth_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "auth"
    path.write_text("\n  \nbasic:alice:pw:S3CRET\nignored\n")
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="dicomweb.client"):
        auth = read_auth_file(path)
    assert _authorization(auth) == "Basic " + base64.b64encode(b"alice:pw:S3CRET").decode()
    assert not caplog.records
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="dicomweb.client"):
        read_auth_file(str(path))
    assert any("chmod 600" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, FileNotFoundError),
        (b"", ValueError),
        (b"\n \n\t\n", ValueError),
        (b"alice:S3CRET\n", ValueError),
        (b"basic:alice:S3CRET\xff\n", ValueError),
    ],
)
def test_read_auth_file_rejects(tmp_path: Path, content: bytes | None, error: type) -> None:
    path = tmp_path / "auth"
    if content is not None:
        path.write_bytes(content)
        path.chmod(0o600)
    with pytest.raises(error) as caught:
        read_auth_file(path)
    assert str(path) in str(caught.value)
    assert "S3CRET" not in str(caught.value)
    assert caught.value.__cause__ is None


# -- concurrency -----------------------------------------------------------------------------


def test_concurrency_bounds_requests_in_flight_and_reuses_connections(
    server: FaultServer,
) -> None:
    lock = threading.Lock()
    in_flight = 0
    most = 0
    ports: set[int] = set()
    release = threading.Event()

    def slow(request: Request) -> Reply:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
            ports.add(request.client_port)
        release.wait(0.2)
        with lock:
            in_flight -= 1
        return json_reply([study("1.2")])

    server.route_fn(f"{ROOT}/studies", slow)
    with (
        DicomWebClient(server.url + ROOT, concurrency=3) as client,
        ThreadPoolExecutor(12) as pool,
    ):
        assert client.concurrency == 3
        results = list(pool.map(lambda _: client.search("studies"), range(12)))
    assert results == [[study("1.2")]] * 12
    assert server.count() == 12
    assert 2 <= most <= 3
    assert len(ports) <= 3  # keep-alive: at most one connection per slot


# -- a real Orthanc --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, list[Any]]]:
    """An Orthanc holding 5 studies (one with two series) of 2 instances each."""
    folder = tmp_path_factory.mktemp("client-orthanc")
    patient = make_patient(300)
    shared = make_study_info(300, patient, modality="CT")
    datasets = [
        make_series(300, "CT", 2, 8, 8, patient=patient, study=shared, series_number=1),
        make_series(301, "CT", 2, 8, 8, patient=patient, study=shared, series_number=2),
        *(make_series(seed, "CT", 2, 8, 8) for seed in range(310, 314)),
    ]
    flat = [ds for series in datasets for ds in series]
    paths = []
    for number, ds in enumerate(flat):
        path = folder / f"{number}.dcm"
        write_dataset(ds, path)
        paths.append(path)
    server = start_orthanc(folder)
    try:
        assert server.upload(paths) == len(paths)
        yield server, flat
    finally:
        # A graceful stop takes Orthanc 1.10 about 3 s (its HTTP and DICOM servers poll);
        # nothing of this throw-away instance needs saving, so it is killed first.
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGKILL)
        server.stop()


def _uid(item: dict[str, Any], tag: str) -> str:
    return str(item[tag]["Value"][0])


@pytest.mark.peers
def test_orthanc_search(pacs: tuple[Orthanc, list[Any]]) -> None:
    orthanc, datasets = pacs
    with DicomWebClient(orthanc.dicomweb_url) as client:
        studies = client.search("studies", includefield=["00081030"])
        assert {_uid(s, STUDY_UID_TAG) for s in studies} == {ds.StudyInstanceUID for ds in datasets}
        assert len(studies) == 5
        shared = datasets[0].StudyInstanceUID
        series = client.search(f"studies/{shared}/series")
        assert {_uid(s, SERIES_UID_TAG) for s in series} == {
            ds.SeriesInstanceUID for ds in datasets if ds.StudyInstanceUID == shared
        }
        assert len(series) == 2
        assert len(client.search("series")) == 6
        one = datasets[0]
        instances = client.search(
            f"studies/{one.StudyInstanceUID}/series/{one.SeriesInstanceUID}/instances"
        )
        assert {_uid(i, SOP_UID_TAG) for i in instances} == {
            ds.SOPInstanceUID for ds in datasets if ds.SeriesInstanceUID == one.SeriesInstanceUID
        }
        everything = client.search("instances")
        assert {_uid(i, SOP_UID_TAG) for i in everything} == {ds.SOPInstanceUID for ds in datasets}
        assert client.search("studies", params={"StudyInstanceUID": "1.2.3.4"}) == []


@pytest.mark.peers
def test_orthanc_iter_search_pages(pacs: tuple[Orthanc, list[Any]]) -> None:
    orthanc, datasets = pacs
    events = Events()
    with DicomWebClient(orthanc.dicomweb_url, on_event=events) as client:
        found = [_uid(s, STUDY_UID_TAG) for s in client.iter_search("studies", page_size=2)]
        assert sorted(found) == sorted({ds.StudyInstanceUID for ds in datasets})
        assert len(events) == 3  # 2 + 2 + 1
        sops = [_uid(i, SOP_UID_TAG) for i in client.iter_search("instances", page_size=4)]
        assert sorted(sops) == sorted(ds.SOPInstanceUID for ds in datasets)


@pytest.mark.peers
def test_orthanc_metadata(pacs: tuple[Orthanc, list[Any]]) -> None:
    orthanc, datasets = pacs
    one = datasets[2]
    in_series = [ds for ds in datasets if ds.SeriesInstanceUID == one.SeriesInstanceUID]
    with DicomWebClient(orthanc.dicomweb_url) as client:
        metadata = client.series_metadata(one.StudyInstanceUID, one.SeriesInstanceUID)
        assert len(metadata) == len(in_series) == 2
        assert {_uid(m, STUDY_UID_TAG) for m in metadata} == {one.StudyInstanceUID}
        assert {_uid(m, SERIES_UID_TAG) for m in metadata} == {one.SeriesInstanceUID}
        assert {_uid(m, SOP_UID_TAG) for m in metadata} == {ds.SOPInstanceUID for ds in in_series}
        (single,) = client.instance_metadata(
            one.StudyInstanceUID, one.SeriesInstanceUID, one.SOPInstanceUID
        )
        assert _uid(single, SOP_UID_TAG) == one.SOPInstanceUID
        with pytest.raises(DicomWebError) as caught:
            client.series_metadata(one.StudyInstanceUID, "1.2.3.4.5")
        assert (caught.value.reason, caught.value.status) == ("http_status", 404)


@pytest.mark.peers
def test_orthanc_retrieve(pacs: tuple[Orthanc, list[Any]]) -> None:
    orthanc, datasets = pacs
    one = datasets[0]
    in_series = {
        ds.SOPInstanceUID for ds in datasets if ds.SeriesInstanceUID == one.SeriesInstanceUID
    }
    with DicomWebClient(orthanc.dicomweb_url) as client:
        parts = list(client.retrieve_series(one.StudyInstanceUID, one.SeriesInstanceUID))
        read = [pydicom.dcmread(io.BytesIO(part.body)) for part in parts]
        assert {ds.SOPInstanceUID for ds in read} == in_series
        assert {ds.SeriesInstanceUID for ds in read} == {one.SeriesInstanceUID}
        raw = client.retrieve_instance(
            one.StudyInstanceUID, one.SeriesInstanceUID, one.SOPInstanceUID
        )
        copy = pydicom.dcmread(io.BytesIO(raw))
        assert copy.SOPInstanceUID == one.SOPInstanceUID
        assert copy.PixelData == one.PixelData  # "*": as stored, not transcoded


@pytest.mark.peers
def test_orthanc_rest_changes(pacs: tuple[Orthanc, list[Any]]) -> None:
    orthanc, _ = pacs
    with DicomWebClient(orthanc.url) as rest:
        page = rest.get_json("changes", params={"since": 0, "limit": 10})
    assert isinstance(page, dict)
    assert {"Changes", "Done", "Last"} <= set(page)
    assert len(page["Changes"]) == 10
    assert {change["ChangeType"] for change in page["Changes"]} & {"NewInstance", "NewSeries"}
