"""The Orthanc fixtures: a real Orthanc with DICOMweb on loopback, as the crawler tests use it.

Besides checking the fixtures, these tests pin what Orthanc 1.10 (Debian bookworm) does where
the DICOMweb crawler depends on it: QIDO-RS and WADO-RS answers, the change feed after a
DIMSE C-STORE, basic authentication and the capped QIDO of ``LimitFindResults``. They print
timings (start, upload, QIDO, metadata, change feed): run with ``-rP`` to see them.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import TYPE_CHECKING, Any, Final

import httpx
import pydicom
import pytest

from imgindex.testing import write_ct_series, write_hospital

if TYPE_CHECKING:
    from pathlib import Path

    from peers.orthanc import Orthanc, OrthancFactory

pytestmark = pytest.mark.peers

DICOM_JSON: Final = {"Accept": "application/dicom+json"}
STUDY_UID_TAG: Final = "0020000D"
SERIES_UID_TAG: Final = "0020000E"
SOP_UID_TAG: Final = "00080018"
#: DCMTK's storescu (``.venv/bin`` holds pynetdicom's, with other options).
STORESCU: Final = "/usr/bin/storescu"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _uids(paths: list[Path], keyword: str) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).get(keyword)) for p in paths}


def _tag_value(item: dict[str, Any], tag: str) -> str:
    return str(item[tag]["Value"][0])


def _all_changes(server: Orthanc, http: httpx.Client) -> list[dict[str, Any]]:
    """Page through ``/changes`` from the start, 100 at a time."""
    changes: list[dict[str, Any]] = []
    since = 0
    while True:
        response = http.get("/changes", params={"since": since, "limit": 100})
        response.raise_for_status()
        page = response.json()
        changes.extend(page["Changes"])
        since = page["Last"]
        if page["Done"]:
            return changes


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The files of a small generated hospital (about 2 MB: CT, MR, SC, some compressed)."""
    summary = write_hospital(
        tmp_path_factory.mktemp("peers") / "hospital", seed=7, target_bytes=2_000_000, ct_size=64
    )
    files = _files(summary.out_dir)
    assert len(files) == summary.instances
    return files


@pytest.fixture(scope="module")
def long_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One uncompressed CT series of 200 slices of 64 x 64."""
    return write_ct_series(tmp_path_factory.mktemp("long"), seed=21, n_slices=200, size=64)


def test_upload_and_qido_studies(orthanc: Orthanc, hospital: list[Path]) -> None:
    print(f"Orthanc start: {orthanc.start_seconds * 1000:.0f} ms")
    began = time.perf_counter()
    assert orthanc.upload(hospital) == len(hospital)
    seconds = time.perf_counter() - began
    print(f"upload: {len(hospital)} instances in {seconds:.2f} s = {len(hospital) / seconds:.0f}/s")

    statistics = orthanc.statistics()
    assert statistics["CountInstances"] == len(hospital) == orthanc.instance_count()
    assert statistics["CountSeries"] == len(_uids(hospital, "SeriesInstanceUID"))
    assert statistics["CountPatients"] == len(_uids(hospital, "PatientID"))
    study_uids = _uids(hospital, "StudyInstanceUID")
    assert statistics["CountStudies"] == len(study_uids)
    assert orthanc.study_uids() == study_uids

    with httpx.Client(timeout=30) as http:
        began = time.perf_counter()
        response = http.get(f"{orthanc.dicomweb_url}/studies", headers=DICOM_JSON)
        latency = time.perf_counter() - began
        response.raise_for_status()
        assert response.headers["content-type"].startswith("application/dicom+json")
        answer = response.json()
        assert sorted(_tag_value(item, STUDY_UID_TAG) for item in answer) == sorted(study_uids)
        print(f"QIDO /studies: {len(answer)} studies in {latency * 1000:.1f} ms")

    with orthanc.client() as http:
        began = time.perf_counter()
        changes = _all_changes(orthanc, http)
        seconds = time.perf_counter() - began
    new_instances = [c for c in changes if c["ChangeType"] == "NewInstance"]
    assert len(new_instances) == len(hospital)
    print(f"/changes: {len(changes)} changes in {seconds * 1000:.0f} ms")
    print(f"/changes: {len(changes) / seconds:.0f} changes/s (pages of 100)")


def test_series_metadata_one_object_per_instance(orthanc: Orthanc, long_series: list[Path]) -> None:
    assert orthanc.upload(long_series) == 200
    first = pydicom.dcmread(long_series[0], stop_before_pixels=True)
    url = (
        f"{orthanc.dicomweb_url}/studies/{first.StudyInstanceUID}"
        f"/series/{first.SeriesInstanceUID}/metadata"
    )
    with httpx.Client(timeout=30) as http:
        began = time.perf_counter()
        response = http.get(url, headers=DICOM_JSON)
        seconds = time.perf_counter() - began
        response.raise_for_status()
    metadata = response.json()
    assert isinstance(metadata, list)
    assert len(metadata) == 200
    assert {_tag_value(item, SOP_UID_TAG) for item in metadata} == _uids(
        long_series, "SOPInstanceUID"
    )
    assert {_tag_value(item, SERIES_UID_TAG) for item in metadata} == {first.SeriesInstanceUID}
    print(f"series metadata: 200 instances in {seconds * 1000:.0f} ms = {200 / seconds:.0f}/s")


def test_storescu_then_change_feed(orthanc: Orthanc, tmp_path: Path) -> None:
    version = subprocess.run(
        [STORESCU, "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    assert "dcmtk" in version.lower(), version
    files = write_ct_series(tmp_path / "series", seed=33, n_slices=20, size=64)
    began = time.perf_counter()
    subprocess.run(
        [STORESCU, "-aet", "STORESCU", "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port)]
        + [str(p) for p in files],
        capture_output=True,
        check=True,
        timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    print(f"storescu: 20 instances in {(time.perf_counter() - began) * 1000:.0f} ms")

    with orthanc.client() as http:
        response = http.get("/changes", params={"since": 0, "limit": 100})
        response.raise_for_status()
        page = response.json()
        new_instances = [c for c in page["Changes"] if c["ChangeType"] == "NewInstance"]
        assert len(new_instances) == len(files)
        assert {c["ResourceType"] for c in new_instances} == {"Instance"}
        stored = {
            http.get(f"/instances/{c['ID']}").json()["MainDicomTags"]["SOPInstanceUID"]
            for c in new_instances
        }
        assert stored == _uids(files, "SOPInstanceUID")
        # StableAge is 1 s: the series soon becomes stable, which the crawler waits for.
        deadline = time.monotonic() + 15
        kinds: set[str] = set()
        while "StableSeries" not in kinds and time.monotonic() < deadline:
            time.sleep(0.2)
            kinds = {c["ChangeType"] for c in _all_changes(orthanc, http)}
        assert {"NewPatient", "NewStudy", "NewSeries", "StableSeries"} <= kinds


def test_basic_authentication(orthanc_factory: OrthancFactory) -> None:
    server = orthanc_factory(users={"alice": "secret"})
    assert server.config["AuthenticationEnabled"] is True
    with httpx.Client(timeout=10) as http:
        for url in (f"{server.url}/system", f"{server.dicomweb_url}/studies"):
            assert http.get(url).status_code == 401
            assert http.get(url, auth=("alice", "wrong")).status_code == 401
            assert http.get(url, auth=("alice", "secret")).status_code == 200
        challenge = http.get(f"{server.url}/system").headers.get("www-authenticate", "")
        assert challenge.lower().startswith("basic")


def test_capped_qido(orthanc_factory: OrthancFactory, tmp_path: Path) -> None:
    cap = 2
    server = orthanc_factory(overrides={"LimitFindResults": cap})
    files = [
        path
        for seed in range(40, 45)
        for path in write_ct_series(tmp_path / f"s{seed}", seed=seed, n_slices=2, size=64)
    ]
    assert server.upload(files) == 10
    assert len(server.study_uids()) == 5  # the REST listing is not capped
    with httpx.Client(timeout=30) as http:
        response = http.get(f"{server.dicomweb_url}/studies", headers=DICOM_JSON)
        response.raise_for_status()
        studies = response.json()
        print(
            f"capped QIDO (LimitFindResults={cap}, 5 studies): status {response.status_code}, "
            f"{len(studies)} studies, Warning header {response.headers.get('warning')!r}"
        )
        # Orthanc 1.10.1 truncates silently: 200, no Warning header (PS3.18's "299" is not
        # sent) and, off by one, cap + 1 answers rather than cap.
        assert len(studies) < 5
        assert cap <= len(studies) <= cap + 1
        assert "warning" not in response.headers
        # The instance level is capped by LimitFindInstances (0 here), not LimitFindResults.
        instances = http.get(f"{server.dicomweb_url}/instances", headers=DICOM_JSON).json()
        assert len(instances) == 10
        # QIDO's own limit is honoured.
        limited = http.get(
            f"{server.dicomweb_url}/studies", params={"limit": 1}, headers=DICOM_JSON
        )
        assert len(limited.json()) == 1
