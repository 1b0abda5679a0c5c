"""QIDO-RS over the index: imgindex.web.qido served by uvicorn on loopback, searched with
dicomweb-client (a client other than ours) and httpx for the error cases."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
import polars as pl
import pytest
import uvicorn
from _export_helpers import index_folder, write_series
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset

from imgindex.index import Index
from imgindex.testing import make_patient, make_series, make_study_info
from imgindex.web.qido import (
    Column,
    QueryError,
    Resource,
    dicom_columns,
    level_frame,
    parse_query,
    qido_app,
    search,
    to_dicom_json,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

#: (patient seed, PatientName, StudyDate, [(modality, instances), ...]) per study.
STUDIES = (
    (101, "Quidoe^Alpha", "20230105", [("CT", 4), ("CT", 3)]),
    (102, "Quidoe^Beta", "20231005", [("MR", 3)]),
    (103, "Other^Gamma", "20231008", [("CT", 2)]),
)


@dataclasses.dataclass(frozen=True)
class World:
    root: Path
    url: str
    #: StudyInstanceUID -> PatientID, StudyDate, {SeriesInstanceUID: [SOPInstanceUID, ...]}
    studies: dict[str, tuple[str, str, dict[str, list[str]]]]


def _build(folder: Path) -> dict[str, tuple[str, str, dict[str, list[str]]]]:
    studies: dict[str, tuple[str, str, dict[str, list[str]]]] = {}
    seed = 0
    for patient_seed, name, date, series_kinds in STUDIES:
        patient = dataclasses.replace(
            make_patient(patient_seed), PatientName=name, SpecificCharacterSet=None
        )
        study = make_study_info(patient_seed, patient, study_date=date)
        series: dict[str, list[str]] = {}
        for number, (modality, n) in enumerate(series_kinds, start=1):
            seed += 1
            datasets = make_series(
                1000 + seed, modality, n, 8, 8, patient=patient, study=study, series_number=number
            )
            written = write_series(folder, datasets)
            series[written.uid] = [str(ds.SOPInstanceUID) for ds in datasets]
        studies[study.StudyInstanceUID] = (patient.PatientID, date, series)
    return studies


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("qido")
    studies = _build(base / "files")
    root = base / "index"
    index_folder(base / "files", root)
    config = uvicorn.Config(qido_app(root), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped before it started"
        assert time.monotonic() < deadline, "uvicorn did not start in 10 s"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield World(root, f"http://127.0.0.1:{port}", studies)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(world: World) -> DICOMwebClient:
    return DICOMwebClient(url=world.url)


def _uids(results: list[dict[str, Any]], keyword: str) -> list[str]:
    return [str(Dataset.from_json(r).get(keyword)) for r in results]


def test_every_study_with_its_uids_and_counts(world: World, client: DICOMwebClient) -> None:
    results = client.search_for_studies()
    datasets = [Dataset.from_json(r) for r in results]
    assert sorted(str(ds.StudyInstanceUID) for ds in datasets) == sorted(world.studies)
    for ds in datasets:
        patient_id, date, series = world.studies[str(ds.StudyInstanceUID)]
        assert ds.PatientID == patient_id
        assert ds.StudyDate == date
        assert ds.NumberOfStudyRelatedSeries == len(series)
        assert ds.NumberOfStudyRelatedInstances == sum(len(s) for s in series.values())
        assert "PatientName" in ds
        assert "ModalitiesInStudy" in ds


def test_patient_id_filter(world: World, client: DICOMwebClient) -> None:
    study_uid, (patient_id, _, _) = next(iter(world.studies.items()))
    results = client.search_for_studies(search_filters={"PatientID": patient_id})
    assert _uids(results, "StudyInstanceUID") == [study_uid]
    by_tag = client.search_for_studies(search_filters={"00100020": patient_id})
    assert _uids(by_tag, "StudyInstanceUID") == [study_uid]


def test_study_date_range(world: World, client: DICOMwebClient) -> None:
    expected = sorted(u for u, (_, d, _) in world.studies.items() if "20231001" <= d <= "20231010")
    assert len(expected) == 2
    results = client.search_for_studies(search_filters={"StudyDate": "20231001-20231010"})
    assert sorted(_uids(results, "StudyInstanceUID")) == expected
    open_ended = client.search_for_studies(search_filters={"StudyDate": "-20230201"})
    assert len(open_ended) == 1


def test_patient_name_wildcard(client: DICOMwebClient) -> None:
    results = client.search_for_studies(search_filters={"PatientName": "quidoe*"})
    names = sorted(str(Dataset.from_json(r).PatientName) for r in results)
    assert names == ["Quidoe^Alpha", "Quidoe^Beta"]
    one = client.search_for_studies(search_filters={"PatientName": "Quidoe^?eta"})
    assert [str(Dataset.from_json(r).PatientName) for r in one] == ["Quidoe^Beta"]


def test_paging_covers_everything_once(world: World, client: DICOMwebClient) -> None:
    everything = _uids(client.search_for_series(), "SeriesInstanceUID")
    expected = sorted(s for _, _, series in world.studies.values() for s in series)
    assert sorted(everything) == expected
    pages = [
        _uids(client.search_for_series(limit=3, offset=offset), "SeriesInstanceUID")
        for offset in range(0, len(expected) + 3, 3)
    ]
    assert [len(p) for p in pages] == [3, 1, 0]
    assert [u for p in pages for u in p] == everything
    assert client.search_for_series(limit=3, get_remaining=True) == client.search_for_series()


def test_series_of_a_study(world: World, client: DICOMwebClient) -> None:
    study_uid, (_, _, series) = next(iter(world.studies.items()))
    results = client.search_for_series(study_instance_uid=study_uid)
    datasets = [Dataset.from_json(r) for r in results]
    assert sorted(str(ds.SeriesInstanceUID) for ds in datasets) == sorted(series)
    for ds in datasets:
        assert ds.StudyInstanceUID == study_uid
        assert ds.NumberOfSeriesRelatedInstances == len(series[str(ds.SeriesInstanceUID)])
        assert ds.Modality == "CT"
    mr = client.search_for_series(search_filters={"Modality": "MR"})
    assert len(mr) == 1


def test_instances_of_a_series_equal_the_index(world: World, client: DICOMwebClient) -> None:
    study_uid, (_, _, series) = next(iter(world.studies.items()))
    series_uid, sops = next(iter(series.items()))
    results = client.search_for_instances(
        study_instance_uid=study_uid, series_instance_uid=series_uid
    )
    indexed = (
        Index(world.root)
        .instances.filter(pl.col("SeriesInstanceUID") == series_uid)
        .select("SOPInstanceUID")
        .collect()
        .to_series()
        .to_list()
    )
    assert sorted(_uids(results, "SOPInstanceUID")) == sorted(indexed) == sorted(sops)
    datasets = [Dataset.from_json(r) for r in results]
    assert all(ds.Rows == 8 and ds.Columns == 8 for ds in datasets)
    assert all("SOPClassUID" in ds and "InstanceNumber" in ds for ds in datasets)


def test_instances_of_a_study_and_all_instances(world: World, client: DICOMwebClient) -> None:
    study_uid, (_, _, series) = next(iter(world.studies.items()))
    in_study = client.search_for_instances(study_instance_uid=study_uid)
    assert sorted(_uids(in_study, "SOPInstanceUID")) == sorted(
        sop for sops in series.values() for sop in sops
    )
    total = sum(len(s) for _, _, ss in world.studies.values() for s in ss.values())
    assert len(client.search_for_instances()) == total


def test_uid_list_and_includefield(world: World, client: DICOMwebClient) -> None:
    first, second, _ = world.studies
    results = client.search_for_studies(
        search_filters={"StudyInstanceUID": f"{first},{second}"},
        fields=["InstitutionName", "00081030"],
    )
    datasets = [Dataset.from_json(r) for r in results]
    assert sorted(str(ds.StudyInstanceUID) for ds in datasets) == sorted([first, second])
    assert all("InstitutionName" in ds and "StudyDescription" in ds for ds in datasets)
    everything = Dataset.from_json(client.search_for_studies(fields=["all"], limit=1)[0])
    assert "StudyDescription" in everything
    assert "InstitutionName" in everything


def test_no_match_is_204_and_client_sees_nothing(world: World, client: DICOMwebClient) -> None:
    response = httpx.get(f"{world.url}/studies", params={"PatientID": "NOBODY"})
    assert response.status_code == 204
    assert client.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"PatientIdentifier": "x"}, "PatientIdentifier"),
        ({"FFFF0001": "x"}, "FFFF0001"),
        ({"PatientComments": "x"}, "PatientComments"),
        ({"StudyDate": "2023-10-01"}, "date"),
        ({"limit": "0"}, "limit"),
        ({"fuzzymatching": "true"}, "fuzzymatching"),
    ],
)
def test_bad_queries_are_400_naming_why(world: World, params: dict[str, str], named: str) -> None:
    response = httpx.get(f"{world.url}/studies", params=params)
    assert response.status_code == 400
    assert named in response.json()["error"]


def test_content_type_and_warnings(world: World) -> None:
    params: list[tuple[str, str | int | float | bool | None]] = [
        ("limit", "1"),
        ("fuzzymatching", "false"),
        ("includefield", "RetrieveURL"),
        ("includefield", "00100010"),
    ]
    response = httpx.get(f"{world.url}/series", params=params)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom+json"
    assert "more results" in response.headers["warning"]
    assert "does not hold RetrieveURL" in response.headers["warning"]
    assert len(response.json()) == 1
    assert "00100010" in response.json()[0]
    last = httpx.get(f"{world.url}/series", params={"offset": "3"})
    assert len(last.json()) == 1
    assert "warning" not in last.headers


def test_other_media_types_are_406(world: World) -> None:
    headers = {"Accept": "application/dicom+xml"}
    assert httpx.get(f"{world.url}/studies", headers=headers).status_code == 406


# -- the matching, without HTTP -------------------------------------------------------------


def test_parse_query_without_http(world: World) -> None:
    columns = dicom_columns(level_frame(Index(world.root), "study"))
    query = parse_query(
        [("00100020", "P1"), ("limit", "20000"), ("includefield", "StudyDescription,PatientAge")],
        columns,
    )
    assert [(c.keyword, v) for c, v in query.filters] == [("PatientID", "P1")]
    assert query.limit == 10_000
    assert [c.keyword for c in query.include] == ["StudyDescription", "PatientAge"]
    assert isinstance(columns["ModalitiesInStudy"], Column)
    assert columns["ModalitiesInStudy"].multi
    with pytest.raises(QueryError, match="more than once"):
        parse_query([("PatientID", "a"), ("PatientID", "b")], columns)


def test_search_without_http(world: World) -> None:
    index = Index(world.root)
    page = search(index, Resource("study"), [("ModalitiesInStudy", "MR")])
    assert page.frame.height == 1
    assert not page.more
    assert search(index, Resource("series"), [("StudyDate", "20231001-")]).frame.height == 2
    page = search(index, Resource("instance"), [("Modality", "CT,MR"), ("limit", "5")])
    assert page.frame.height == 5
    assert page.more
    images = search(index, Resource("instance"), [("ImageType", "*PRIMARY*")])
    assert images.frame.height == 12
    study_times = [t for t in index.studies.select("StudyTime").collect().to_series() if t]
    earliest = min(study_times).replace(":", "")
    page = search(index, Resource("study"), [("StudyTime", f"-{earliest}")])
    assert page.frame.height == study_times.count(min(study_times))


def test_search_an_empty_index(tmp_path: Path) -> None:
    page = search(Index(tmp_path), Resource("instance"), [("PatientID", "P1")])
    assert page.frame.height == 0
    assert to_dicom_json(page.frame, page.columns) == []
