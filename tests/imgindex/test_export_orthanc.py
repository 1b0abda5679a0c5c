"""``imgindex export`` from a real Orthanc through WADO-RS, on loopback."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import pydicom
import pytest
import zarr
from _export_helpers import reference_volume, write_selection, write_set
from peers.orthanc import Orthanc, start_orthanc

from dicomweb.client import DicomWebClient, RetryPolicy
from imgindex.crawl.web import DicomWebCrawl
from imgindex.deid import Deidentifier
from imgindex.export import array_key, export, read_manifest
from imgindex.index import Index

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.peers


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = start_orthanc(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def test_export_through_wado_rs_is_voxel_exact(tmp_path: Path, orthanc: Orthanc) -> None:
    written = write_set(tmp_path / "dicom", seed=40)
    orthanc.upload([f for s in written for f in s.files])
    root = tmp_path / "root"
    with DicomWebClient(orthanc.dicomweb_url, retry=RetryPolicy(attempts=2)) as client:
        crawled = DicomWebCrawl(client, root).run()
    assert crawled.instances == sum(len(s.files) for s in written)
    locations = Index(root).instances.select("location").collect().get_column("location")
    assert locations.str.starts_with("http://127.0.0.1:").all()

    selection = write_selection(tmp_path / "sel.txt", [s.uid for s in written])
    out = tmp_path / "o.zarr"
    summary = export(selection, root, out, workers=2)
    assert summary.ok, summary.describe()
    assert summary.complete == len(written)
    deid = Deidentifier.for_root(root)
    for series in written:
        got = np.asarray(zarr.open_array(out / array_key(deid, series.uid), mode="r")[...])
        np.testing.assert_array_equal(got, reference_volume(series.files), series.transfer_syntax)
    # As stored: the bytes fetched are the files' bytes, not a transcoded copy.
    rows = Index(root).transfers.collect()
    by_uid = {r["SeriesInstanceUID"]: r for r in rows.iter_rows(named=True)}
    for series in written:
        assert by_uid[series.uid]["bytes_in"] == sum(f.stat().st_size for f in series.files)
    assert read_manifest(out).height == len(written)
    # The same series as de-identified DICOM: the stored bytes from WADO-RS, pixel data and
    # transfer syntax untouched.
    dicom_out = tmp_path / "dicom-out"
    summary = export(selection, root, dicom_out, workers=2, format="dicom")
    assert summary.ok, summary.describe()
    originals = {
        deid.uid(str(ds.SOPInstanceUID)): ds
        for series in written
        for path in series.files
        for ds in [pydicom.dcmread(path)]
    }
    files = sorted(dicom_out.rglob("*.dcm"))
    assert len(files) == len(originals)
    for path in files:
        ds = pydicom.dcmread(path)
        source = originals[ds.SOPInstanceUID]
        assert ds.PixelData == source.PixelData
        assert ds.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
        assert ds.PatientID == deid.token("PatientID", source.PatientID)
        assert ds.PatientIdentityRemoved == "YES"


def test_a_series_gone_from_the_server_fails_and_the_others_complete(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    written = write_set(tmp_path / "dicom", seed=50)[:2]
    orthanc.upload([f for s in written for f in s.files])
    root = tmp_path / "root"
    with DicomWebClient(orthanc.dicomweb_url, retry=RetryPolicy(attempts=2)) as client:
        DicomWebCrawl(client, root).run()
    # One instance is deleted from Orthanc after the crawl.
    gone = written[0]
    with orthanc.client() as http:
        found = http.post(
            "/tools/find",
            json={"Level": "Series", "Query": {"SeriesInstanceUID": gone.uid}},
        ).json()
        (series_id,) = found
        instance = http.get(f"/series/{series_id}/instances").json()[0]["ID"]
        assert http.delete(f"/instances/{instance}").status_code == 200
    selection = write_selection(tmp_path / "sel.txt", [s.uid for s in written])
    summary = export(selection, root, tmp_path / "o.zarr", workers=1)
    assert not summary.ok
    rows = {
        r["SeriesInstanceUID"]: r for r in Index(root).transfers.collect().iter_rows(named=True)
    }
    assert rows[gone.uid]["outcome"] == "failed"
    assert rows[gone.uid]["reason"] == "incomplete_fetch"
    assert rows[gone.uid]["fetched_instances"] == len(gone.files) - 1
    assert "404" in rows[gone.uid]["message"]
    assert rows[written[1].uid]["outcome"] == "complete"
    assert pl.read_parquet(tmp_path / "o.zarr" / "manifest.parquet").height == 1
