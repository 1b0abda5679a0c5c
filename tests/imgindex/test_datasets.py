"""imgindex.datasets: every sampling mode reads exactly what export wrote, with labels, seeded
epochs, filters, rescaling, under PyTorch's DataLoader with workers, and from a remote store."""

from __future__ import annotations

import datetime as dt
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import zarr
from _export_helpers import index_folder, write_series
from peers.remote import serve_http, serve_s3

from imgindex.datasets import EpochSampler, SeriesDataset
from imgindex.errors import ConfigError
from imgindex.export import export, read_manifest
from imgindex.testing import make_series

pytestmark = pytest.mark.filterwarnings("ignore:Object at manifest.parquet:UserWarning")

#: (slices, rows) of the exported series: different sizes, so items are told apart.
SIZES = ((6, 24), (9, 32), (4, 16))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("datasets")
    uids = []
    for number, (slices, size) in enumerate(SIZES):
        datasets = make_series(7100 + number, "CT", slices, size, size)
        write_series(base / "in", datasets)
        uids.append(str(datasets[0].SeriesInstanceUID))
    index_folder(base / "in", base / "root")
    selection = base / "selection.parquet"
    pl.DataFrame(
        {
            "SeriesInstanceUID": uids,
            "days_from_index": [3, 7, 11],
            "coronary_procedure_count": [1, 0, 2],
            "entry_date": [dt.date(2023, 10, 1)] * 3,
        }
    ).write_parquet(selection)
    out = base / "out.zarr"
    summary = export(selection, base / "root", out, workers=1)
    assert summary.ok, summary.describe()
    return out


def _arrays(out: Path) -> dict[str, np.ndarray[Any, Any]]:
    group = zarr.open_group(out, mode="r")
    arrays = {}
    for key in read_manifest(out)["key"]:
        array = group[key]
        assert isinstance(array, zarr.Array)
        arrays[key] = np.asarray(array[...])
    return arrays


def test_volumes_are_the_arrays_with_their_labels(exported: Path) -> None:
    arrays = _arrays(exported)
    ds = SeriesDataset(exported)
    assert len(ds) == len(SIZES)
    seen = set()
    for item in ds:
        np.testing.assert_array_equal(item["image"], arrays[item["key"]])
        assert item["image"].dtype == arrays[item["key"]].dtype  # the stored dtype
        assert len(item["spacing"]) == 3
        assert item["days_from_index"] in (3, 7, 11)
        assert {"coronary_procedure_count", "entry_date", "PatientID"} <= set(item)
        assert "SeriesDescription" not in item  # DICOM attributes are not labels
        seen.add(item["key"])
    assert seen == set(arrays)


def test_slices_cover_every_slice_once(exported: Path) -> None:
    arrays = _arrays(exported)
    ds = SeriesDataset(exported, sample="slice", labels=["days_from_index"])
    assert len(ds) == sum(slices for slices, _ in SIZES)
    seen = []
    for index in range(len(ds)):
        item = ds[index]
        np.testing.assert_array_equal(item["image"], arrays[item["key"]][item["slice"]])
        assert set(item) == {"image", "key", "spacing", "slice", "days_from_index"}
        seen.append((item["key"], item["slice"]))
    assert len(set(seen)) == len(seen) == len(ds)
    np.testing.assert_array_equal(ds[-1]["image"], ds[len(ds) - 1]["image"])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_patches_are_seeded_per_epoch_and_read_what_they_say(exported: Path) -> None:
    arrays = _arrays(exported)
    ds = SeriesDataset(exported, sample="patch", patch_size=(3, 8, 8), patches_per_volume=4)
    assert len(ds) == 4 * len(SIZES)
    first = [ds[i] for i in range(len(ds))]
    for item in first:
        z, y, x = item["offset"]
        assert item["image"].shape == (3, 8, 8)
        np.testing.assert_array_equal(
            item["image"], arrays[item["key"]][z : z + 3, y : y + 8, x : x + 8]
        )
    again = SeriesDataset(exported, sample="patch", patch_size=(3, 8, 8), patches_per_volume=4)
    assert [i["offset"] for i in first] == [again[i]["offset"] for i in range(len(again))]
    ds.set_epoch(1)
    moved = [ds[i]["offset"] for i in range(len(ds))]
    assert moved != [i["offset"] for i in first]
    other_seed = SeriesDataset(exported, sample="patch", patch_size=(3, 8, 8), seed=5)
    assert [other_seed[i]["offset"] for i in range(3)] != [first[4 * i]["offset"] for i in range(3)]


def test_a_patch_larger_than_the_volume_is_padded(exported: Path) -> None:
    arrays = _arrays(exported)
    ds = SeriesDataset(exported, sample="patch", patch_size=(8, 20, 20), pad_value=7)
    small = next(i for i in ds if arrays[i["key"]].shape == (4, 16, 16))
    assert small["image"].shape == (8, 20, 20)
    np.testing.assert_array_equal(small["image"][:4, :16, :16], arrays[small["key"]])
    assert (small["image"][4:] == 7).all()


def test_rescale_gives_modality_units(exported: Path) -> None:
    manifest = read_manifest(exported)
    arrays = _arrays(exported)

    def arrays_of(item: dict[str, Any]) -> np.ndarray[Any, Any]:
        return arrays[item["key"]]

    plain = SeriesDataset(exported, sample="slice")
    hu = SeriesDataset(exported, sample="slice", rescale=True)
    rows = {r["key"]: r for r in manifest.iter_rows(named=True)}
    for index in (0, 7, len(plain) - 1):
        stored, rescaled = plain[index], hu[index]
        row = rows[stored["key"]]
        assert rescaled["image"].dtype == np.float32
        expected = stored["image"] * row["RescaleSlope"] + row["RescaleIntercept"]
        np.testing.assert_allclose(rescaled["image"], expected)
    patches = SeriesDataset(
        exported, sample="patch", patch_size=(8, 40, 40), rescale=True, pad_value=-1000
    )
    short = next(item for item in patches if item["image"].shape and len(arrays_of(item)) < 8)
    assert (short["image"][-1] == -1000).all()  # the pad is in Hounsfield units too


def test_where_labels_and_transform(exported: Path) -> None:
    ds = SeriesDataset(
        exported,
        where=pl.col("days_from_index") > 5,
        labels=["days_from_index"],
        transform=lambda item: (item["image"].shape, item["days_from_index"]),
    )
    assert sorted(ds) == [((4, 16, 16), 11), ((9, 32, 32), 7)]
    with pytest.raises(ConfigError, match="no manifest column nope"):
        SeriesDataset(exported, labels=["nope"])
    with pytest.raises(ConfigError, match="patch_size"):
        SeriesDataset(exported, sample="patch")
    with pytest.raises(ConfigError, match="sample must be one of"):
        SeriesDataset(exported, sample="voxel")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"manifest\.parquet"):
        SeriesDataset(exported / "nothing-here")
    dicom_export = exported.parent / "as-dicom"
    dicom_export.mkdir(exist_ok=True)
    pl.DataFrame({"key": ["a/b/c"], "instances": [3]}).write_parquet(
        dicom_export / "manifest.parquet"
    )
    with pytest.raises(ConfigError, match="not an export of arrays"):
        SeriesDataset(dicom_export)


def test_the_dataset_pickles_without_open_handles(exported: Path) -> None:
    ds = SeriesDataset(exported, sample="slice")
    first = ds[0]["image"]
    copy = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(copy[0]["image"], first)


def test_epoch_sampler_is_reproducible(exported: Path) -> None:
    ds = SeriesDataset(exported, sample="slice")
    sampler = EpochSampler(ds, seed=3)
    one, again = list(sampler), list(EpochSampler(ds, seed=3))
    assert one == again
    assert sorted(one) == list(range(len(ds)))
    sampler.set_epoch(1)
    assert list(sampler) != one
    assert ds.epoch == 1
    assert list(EpochSampler(ds, shuffle=False)) == list(range(len(ds)))


def test_dataloader_with_two_workers_gives_every_item(exported: Path) -> None:
    import torch  # in the test group (a missing torch fails here, it does not skip)
    from torch.utils.data import DataLoader

    ds = SeriesDataset(exported, sample="patch", patch_size=(2, 8, 8), patches_per_volume=6)
    expected = {
        (item["key"], item["offset"]): item["image"] for item in (ds[i] for i in range(len(ds)))
    }
    loader: DataLoader[dict[str, Any]] = DataLoader(
        ds,  # type: ignore[arg-type]  # a map-style dataset by protocol, not by inheritance
        batch_size=4,
        num_workers=2,
        sampler=EpochSampler(ds, seed=1),
        multiprocessing_context="spawn",
    )
    got = {}
    for batch in loader:
        assert isinstance(batch["image"], torch.Tensor)
        assert tuple(batch["image"].shape[1:]) == (2, 8, 8)
        offsets = torch.stack(list(batch["offset"]), dim=1).tolist()
        for key, offset, image in zip(batch["key"], offsets, batch["image"], strict=True):
            got[(key, tuple(offset))] = image.numpy()
    assert set(got) == set(expected)
    for where, image in got.items():
        np.testing.assert_array_equal(image, expected[where])


def test_the_docs_training_example_runs(exported: Path) -> None:
    example = Path(__file__).parents[2] / "docs" / "examples" / "train_tiny.py"
    done = subprocess.run(
        [sys.executable, str(example), str(exported), "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    losses = [float(line.rsplit(" ", 1)[1]) for line in done.stdout.splitlines()]
    assert len(losses) == 3
    assert all(np.isfinite(losses))


def _same_items(remote: SeriesDataset, local: SeriesDataset) -> None:
    assert len(remote) == len(local)
    for index in range(len(local)):
        got, want = remote[index], local[index]
        assert got["key"] == want["key"]
        np.testing.assert_array_equal(got["image"], want["image"])


def test_an_export_served_over_http_reads_the_same(exported: Path) -> None:
    local = SeriesDataset(exported, sample="patch", patch_size=(2, 8, 8), patches_per_volume=3)
    with serve_http(exported.parent) as base:
        remote = SeriesDataset(
            f"{base}/{exported.name}",
            sample="patch",
            patch_size=(2, 8, 8),
            patches_per_volume=3,
            storage_options={"allow_http": "true"},
        )
        _same_items(remote, local)


def test_an_export_in_an_s3_bucket_reads_the_same(exported: Path) -> None:
    local = SeriesDataset(exported, sample="slice")
    with serve_s3(exported.parent, "exports") as (_endpoint, bucket, options):
        remote = SeriesDataset(
            f"s3://{bucket}/{exported.name}", sample="slice", storage_options=options
        )
        _same_items(remote, local)
        # A remote dataset pickles to DataLoader workers like a local one.
        again = pickle.loads(pickle.dumps(remote))
        np.testing.assert_array_equal(again[5]["image"], local[5]["image"])
