"""``imgindex export`` on files: voxel-exact arrays, nothing identifying, completeness proven,
resumable, failures recorded, memory bounded, the same through Dask."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pydicom
import pytest
import zarr
from _export_helpers import (
    WrittenSeries,
    index_folder,
    reference_volume,
    write_selection,
    write_series,
    write_set,
)
from pydicom.uid import JPEG2000Lossless

from imgindex.deid import Deidentifier
from imgindex.export import ExportProgress, array_key, export, read_manifest
from imgindex.index import Index
from imgindex.testing import make_series

if TYPE_CHECKING:
    from numpy.typing import NDArray

IMGINDEX = str(Path(sys.executable).parent / "imgindex")

# zarr-python warns about any file in a group that is not a node, as manifest.parquet is
# (docs/export.md: readers find the arrays through the manifest).
# After a kill, so does the .partial folder of the write that was cut, until a rerun.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Object at manifest.parquet:zarr.errors.ZarrUserWarning"),
    pytest.mark.filterwarnings("ignore:Object at .partial:zarr.errors.ZarrUserWarning"),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[WrittenSeries]]:
    """A set of series in every generated syntax, indexed and exported once (read only)."""
    base = tmp_path_factory.mktemp("export")
    written = write_set(base / "dicom", seed=10)
    root = base / "root"
    index_folder(base / "dicom", root)
    selection = write_selection(base / "selection.txt", [s.uid for s in written])
    out = base / "out.zarr"
    summary = export(selection, root, out, workers=2)
    assert summary.ok, summary.describe()
    assert (summary.complete, summary.failed, summary.arrays) == (len(written), 0, len(written))
    return root, out, written


def voxels(out: Path, key: str) -> NDArray[Any]:
    """An exported array's voxels, read with zarr-python alone."""
    return np.asarray(zarr.open_array(out / key, mode="r")[...])


def ledger(root: Path) -> pl.DataFrame:
    return Index(root).transfers.collect()


def test_every_series_is_voxel_exact(exported: tuple[Path, Path, list[WrittenSeries]]) -> None:
    root, out, written = exported
    deid = Deidentifier.for_root(root)
    group = zarr.open_group(out, mode="r")
    for series in written:
        array = group[array_key(deid, series.uid)]
        assert isinstance(array, zarr.Array)
        expected = reference_volume(series.files)
        got = voxels(out, array_key(deid, series.uid))
        assert got.dtype == expected.dtype, series.transfer_syntax
        np.testing.assert_array_equal(got, expected, err_msg=series.transfer_syntax)
        attrs: dict[str, Any] = dict(array.attrs)
        first = pydicom.dcmread(series.files[0], stop_before_pixels=True)
        assert attrs["Modality"] == first.Modality
        assert attrs["geometry"] == "volume"
        assert attrs["instances"] == len(series.files)
        spacing = attrs["spacing"]
        assert spacing[1:] == pytest.approx([float(v) for v in first.PixelSpacing])
        assert attrs["SeriesInstanceUID"].startswith("2.25.")


def test_ledger_proves_completeness(exported: tuple[Path, Path, list[WrittenSeries]]) -> None:
    root, out, written = exported
    rows = ledger(root).filter(pl.col("export") == str(out.resolve()))
    assert rows.height == len(written)
    for row in rows.iter_rows(named=True):
        assert row["outcome"] == "complete"
        n = row["expected_instances"]
        assert n == row["fetched_instances"] == row["written_instances"] > 0
        assert row["bytes_in"] > 0
        assert row["bytes_out"] > 0
        assert len(row["arrays"]) == 1


def test_manifest_lists_every_array(exported: tuple[Path, Path, list[WrittenSeries]]) -> None:
    _root, out, written = exported
    manifest = read_manifest(out)
    assert manifest.height == len(written)
    group = zarr.open_group(out, mode="r")
    for row in manifest.iter_rows(named=True):
        array = group[row["key"]]
        assert isinstance(array, zarr.Array)
        # The manifest repeats the array's attributes (pseudonyms included) exactly.
        for name, value in array.attrs.items():
            assert row[name] == value, name
        assert list(array.shape) == row["shape"]
        assert str(array.dtype) == row["dtype"]
        assert row["nbytes"] == array.nbytes
        assert row["stored_bytes"] > 0


def test_nothing_identifying_is_written(exported: tuple[Path, Path, list[WrittenSeries]]) -> None:
    _root, out, written = exported
    needles: set[bytes] = set()
    for series in written:
        ds = pydicom.dcmread(series.files[0], stop_before_pixels=True)
        for keyword in ("InstitutionName", "ReferringPhysicianName", "StationName"):
            value = str(ds.get(keyword, "") or "")
            if len(value) >= 4:
                needles.add(value.encode())
        needles.update(v.encode() for v in series.identifiers.values() if len(v) >= 4)
        needles.add(str(ds.PatientName).split("^")[0].encode())
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.parquet" for p in files)
    for path in files:
        data = path.read_bytes()
        found = sorted(n.decode() for n in needles if n in data)
        assert not found, f"{path.relative_to(out)} holds {found}"
    # Names are gone; dates are there, shifted by the patient's offset.
    deid = Deidentifier.for_root(_root)
    for series in written:
        ds = pydicom.dcmread(series.files[0], stop_before_pixels=True)
        attrs = zarr.open_array(out / array_key(deid, series.uid), mode="r").attrs
        assert "PatientName" not in attrs
        study_date = dt.datetime.strptime(ds.StudyDate, "%Y%m%d").date()
        assert attrs["StudyDate"] == deid.shift_date(study_date, ds.PatientID).isoformat()


def test_standard_readers_open_the_store(
    exported: tuple[Path, Path, list[WrittenSeries]],
) -> None:
    import tensorstore as ts
    import xarray as xr

    root, out, written = exported
    key = array_key(Deidentifier.for_root(root), written[0].uid)
    expected = reference_volume(written[0].files)
    store = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out / key)}}
    ).result()
    np.testing.assert_array_equal(store.read().result(), expected)
    others = [k for k in zarr.open_group(out, mode="r").array_keys() if k != key]
    data = xr.open_zarr(out, consolidated=False, zarr_format=3, drop_variables=others)
    np.testing.assert_array_equal(data[key].values, expected)
    assert data[key].dims == ("z", "y", "x")
    assert data[key].attrs["spacing"] == zarr.open_array(out / key, mode="r").attrs["spacing"]


def test_bad_series_fail_with_reasons_and_the_others_complete(tmp_path: Path) -> None:
    dicom = tmp_path / "dicom"
    good = write_series(dicom, make_series(1, "CT", 6, 32, 32))
    gap = write_series(dicom, make_series(2, "CT", 8, 32, 32))
    mixed = make_series(3, "CT", 5, 32, 32)
    mixed[-1] = make_series(3, "CT", 5, 24, 24, study_uid=str(mixed[0].StudyInstanceUID))[-1]
    mixed[-1].SeriesInstanceUID = mixed[0].SeriesInstanceUID
    mixed_sizes = write_series(dicom, mixed)
    broken = write_series(dicom, make_series(4, "MR", 4, 64, 64, transfer_syntax=JPEG2000Lossless))
    vanished = write_series(dicom, make_series(5, "CT", 4, 32, 32))
    # A slice never arrived: the middle one, so the series has a gap.
    by_position = sorted(
        gap.files,
        key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    by_position[len(by_position) // 2].unlink()
    root = tmp_path / "root"
    index_folder(dicom, root)
    # After indexing: a file disappears, and a JPEG 2000 codestream is cut.
    vanished.files[0].unlink()
    data = bytearray(broken.files[0].read_bytes())
    data[-400:-8] = bytes(392)
    broken.files[0].write_bytes(bytes(data))
    selection = write_selection(
        tmp_path / "sel.txt",
        [good.uid, gap.uid, mixed_sizes.uid, broken.uid, vanished.uid, "1.2.3.999"],
    )
    proc = subprocess.run(
        [
            IMGINDEX,
            "export",
            str(selection),
            "--root",
            str(root),
            "--out",
            str(tmp_path / "o.zarr"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    rows = {r["SeriesInstanceUID"]: r for r in ledger(root).iter_rows(named=True)}
    assert rows[good.uid]["outcome"] == "complete"
    reasons = {uid: rows[uid]["reason"] for uid in rows if uid != good.uid}
    assert reasons == {
        gap.uid: "missing_slices",
        mixed_sizes.uid: "mixed_sizes",
        broken.uid: "undecodable",
        vanished.uid: "incomplete_fetch",
        "1.2.3.999": "not_in_index",
    }
    assert rows[vanished.uid]["fetched_instances"] == rows[vanished.uid]["expected_instances"] - 1
    for uid in reasons:
        assert rows[uid]["outcome"] == "failed"
        assert rows[uid]["message"]
        assert uid in proc.stdout  # every shortfall is listed
    assert "5 failed" in proc.stdout
    assert read_manifest(tmp_path / "o.zarr").height == 1


def test_split_stacks_writes_each_stack(tmp_path: Path) -> None:
    dicom = tmp_path / "dicom"
    mixed = make_series(3, "CT", 6, 32, 32)
    other = make_series(3, "CT", 6, 24, 24, study_uid=str(mixed[0].StudyInstanceUID))[3:]
    for ds in other:
        ds.SeriesInstanceUID = mixed[0].SeriesInstanceUID
    written = write_series(dicom, [*mixed[:3], *other])
    root = tmp_path / "root"
    index_folder(dicom, root)
    selection = write_selection(tmp_path / "sel.txt", [written.uid])
    summary = export(selection, root, tmp_path / "o.zarr", workers=1, split_stacks=True)
    assert summary.ok, summary.describe()
    (row,) = ledger(root).iter_rows(named=True)
    assert len(row["arrays"]) == 2
    assert row["written_instances"] == 6
    shapes = sorted(tuple(s) for s in read_manifest(tmp_path / "o.zarr")["shape"].to_list())
    assert shapes == [(3, 24, 24), (3, 32, 32)]


@pytest.fixture
def many(tmp_path: Path) -> tuple[Path, Path, list[WrittenSeries]]:
    dicom = tmp_path / "dicom"
    written = [write_series(dicom, make_series(100 + i, "CT", 24, 64, 64)) for i in range(12)]
    root = tmp_path / "root"
    index_folder(dicom, root)
    return root, write_selection(tmp_path / "sel.txt", [s.uid for s in written]), written


def test_a_stopped_export_resumes_where_it_stopped(
    tmp_path: Path, many: tuple[Path, Path, list[WrittenSeries]]
) -> None:
    root, selection, written = many
    out = tmp_path / "o.zarr"
    stop = threading.Event()
    seen: list[ExportProgress] = []

    def stop_after_four(progress: ExportProgress) -> None:
        seen.append(progress)
        if progress.done >= 4:
            stop.set()

    first = export(
        selection,
        root,
        out,
        workers=1,
        fetch_threads=1,
        stop=stop,
        on_progress=stop_after_four,
        progress_interval_s=0.005,
    )
    assert first.cancelled
    assert 4 <= first.complete < len(written)
    # Progress is in series and DICOM bytes in, as the summary counts them.
    dicom_bytes = sum(f.stat().st_size for s in written for f in s.files)
    assert {p.total for p in seen} == {len(written)}
    assert {p.bytes_total for p in seen} == {dicom_bytes}
    assert seen[-1].bytes_in == first.bytes_in
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    second = export(selection, root, out, workers=2)
    assert second.ok, second.describe()
    assert second.already == first.complete
    assert second.complete == len(written) - first.complete
    assert read_manifest(out).height == len(written)
    deid = Deidentifier.for_root(root)
    for series in written:
        np.testing.assert_array_equal(
            voxels(out, array_key(deid, series.uid)), reference_volume(series.files)
        )


def test_a_killed_export_leaves_nothing_that_looks_complete(
    tmp_path: Path, many: tuple[Path, Path, list[WrittenSeries]]
) -> None:
    root, selection, written = many
    out = tmp_path / "o.zarr"
    command = [IMGINDEX, "export", str(selection), "--root", str(root), "--out", str(out)]
    proc = subprocess.Popen(
        [*command, "--workers", "1", "--fetch-threads", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            arrays = list(out.glob("*/zarr.json")) if out.is_dir() else []
            if len(arrays) >= 3:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the export ended before it could be killed"
    # Whatever a complete-looking array holds is whole.
    deid = Deidentifier.for_root(root)
    keys = {array_key(deid, s.uid): s for s in written}
    group = zarr.open_group(out, mode="r")
    for key in group.array_keys():
        np.testing.assert_array_equal(voxels(out, key), reference_volume(keys[key].files))
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert read_manifest(out).height == len(written)
    assert not [p for p in out.rglob("*") if ".partial" in p.name]
    rows = ledger(root)
    assert rows.filter(pl.col("outcome") == "complete").height == len(written)


def test_memory_stays_under_the_budget(tmp_path: Path) -> None:
    import psutil

    dicom = tmp_path / "dicom"
    # Ten series of 48 slices of 256 x 256 x 2 bytes: 6.3 MB each, about 19 MB in flight
    # (fetched, decoded, assembled): a 32 MB budget lets one through at a time.
    written = [write_series(dicom, make_series(200 + i, "CT", 48, 256, 256)) for i in range(10)]
    root = tmp_path / "root"
    index_folder(dicom, root)
    budget_mb = 32

    def high_water(pid: int) -> int:
        """A process's peak resident memory so far (VmHWM): it never decreases, so the last
        reading before the export ends holds the peak whenever it happened."""
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def peak_rss(uids: list[str], name: str) -> int:
        sel = write_selection(tmp_path / f"{name}.txt", uids)
        command = [
            IMGINDEX, "export", str(sel), "--root", str(root), "--out", str(tmp_path / name),
            "--max-inflight-mb", str(budget_mb), "--workers", "1",
        ]  # fmt: skip
        proc = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        own = proc.cmdline()
        peaks: dict[int, int] = {}
        while proc.poll() is None:
            try:
                for process in proc.children(recursive=True):
                    # A child caught between fork and exec (the export starting its forkserver
                    # or resource tracker) is still a copy of the export, and its high-water
                    # mark the export's: counting it counts the export twice.
                    if process.cmdline() != own:
                        peaks[process.pid] = max(peaks.get(process.pid, 0), high_water(process.pid))
                peaks[proc.pid] = max(peaks.get(proc.pid, 0), high_water(proc.pid))
            except (psutil.Error, OSError):
                pass
            time.sleep(0.005)
        assert proc.returncode == 0
        return sum(peaks.values())

    # Memory does not grow with the export: ten series (twice the budget) peak within the
    # budget of where three do (whose allocators have seen a series already).
    three = peak_rss([s.uid for s in written[:3]], "three")
    everything = peak_rss([s.uid for s in written], "all")
    print(f"peak RSS: three series {three / 2**20:.0f} MiB, ten {everything / 2**20:.0f} MiB")
    assert everything - three < budget_mb * 2**20


def test_dask_runs_the_same_export(
    tmp_path: Path, exported: tuple[Path, Path, list[WrittenSeries]]
) -> None:
    from distributed import LocalCluster

    root, out, written = exported
    selection = write_selection(tmp_path / "sel.txt", [s.uid for s in written])
    with LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        scheduler_port=0,
        # The scheduler serves HTTP (health, metrics) even without its dashboard: on
        # loopback and a free port, not on every interface at 8787 (where two of these
        # clusters at once collide).
        dashboard_address="127.0.0.1:0",
        scheduler_kwargs={"dashboard": False},
        local_directory=str(tmp_path / "dask"),
    ) as cluster:
        summary = export(
            selection, root, tmp_path / "dask.zarr", scheduler=cluster.scheduler_address
        )
    assert summary.ok, summary.describe()
    group = zarr.open_group(tmp_path / "dask.zarr", mode="r")
    reference = zarr.open_group(out, mode="r")
    assert sorted(group.array_keys()) == sorted(reference.array_keys())
    for key in reference.array_keys():
        np.testing.assert_array_equal(voxels(tmp_path / "dask.zarr", key), voxels(out, key))


def test_cli_rejects_a_selection_without_series_uids(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("PatientID\nX\n")
    proc = subprocess.run(
        [IMGINDEX, "export", str(bad), "--root", str(tmp_path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "SeriesInstanceUID column" in proc.stderr


def test_metrics_count_every_series(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    dicom = tmp_path / "dicom"
    written = [write_series(dicom, make_series(300 + i, "CT", 4, 32, 32)) for i in range(3)]
    root = tmp_path / "root"
    index_folder(dicom, root)
    selection = write_selection(tmp_path / "sel.txt", [s.uid for s in written])
    registry = CollectorRegistry()
    summary = export(selection, root, tmp_path / "o.zarr", workers=1, registry=registry)
    assert summary.ok, summary.describe()
    sample = registry.get_sample_value
    assert sample("imgindex_export_items_total", {"outcome": "ok"}) == 3
    assert sample("imgindex_export_stage_seconds_count", {"stage": "convert"}) == 3
    assert sample("imgindex_export_inflight_bytes") == 0
    assert (sample("imgindex_export_bytes_total", {"outcome": "ok"}) or 0) > 0


def test_a_text_selection_may_quote_and_comment(tmp_path: Path) -> None:
    from imgindex.export.plan import read_selection_file

    path = tmp_path / "sel.txt"
    path.write_text("SeriesInstanceUID\n\"1.2.3\"\n# a comment\n\n 1.2.4 \n'1.2.5'\n1.2.3\n")
    assert read_selection_file(path).series == ["1.2.3", "1.2.4", "1.2.5"]
