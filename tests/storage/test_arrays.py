"""storage.arrays: the Zarr v3 export writer, read back by zarr-python, tensorstore and xarray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import tensorstore as ts
import xarray as xr
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.metadata import ArrayV3Metadata
from zarr.errors import ZarrUserWarning
from zarr.storage import LocalStore

from storage import COMPRESSORS, ArrayInfo, ArrayStore, arrays, default_chunks, default_shards
from storage.arrays import DTYPES

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy.typing as npt
    from zarr.abc.codec import BytesBytesCodec

REPO = Path(__file__).resolve().parents[2]
MiB = 2**20


def volume(shape: tuple[int, ...], dtype: str, seed: int = 0) -> npt.NDArray[Any]:
    """A smooth ramp plus noise (compressible but not trivially), zeros included."""
    rng = np.random.default_rng(seed)
    ramp = np.indices(shape).sum(axis=0) * 3.0
    noisy = ramp + rng.normal(0, 4, size=shape)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is not None:
        noisy = np.clip(noisy, info.min, info.max)
    out: npt.NDArray[Any] = noisy.astype(dtype)
    out.flat[0] = 0
    return out


def same_voxels(read: Any, expected: npt.NDArray[Any]) -> bool:
    """Bit-exact equality (NaN payloads too), whatever the byte order of ``expected``."""
    got = np.asarray(read)
    little = expected.dtype.newbyteorder("<")
    return bool(
        got.shape == expected.shape
        and got.dtype.name == expected.dtype.name
        and got.astype(little).tobytes() == expected.astype(little).tobytes()
    )


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def read_zarr(root: Path, key: str) -> zarr.Array[Any]:
    node = zarr.open_group(root, mode="r")[key]
    assert isinstance(node, zarr.Array)
    return node


def dimension_names(array: zarr.Array[Any]) -> tuple[str | None, ...] | None:
    metadata = array.metadata
    assert isinstance(metadata, ArrayV3Metadata)
    return metadata.dimension_names


def read_tensorstore(root: Path, key: str) -> Any:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / key)}}
    return ts.open(spec, read=True).result()


def read_xarray(root: Path, key: str) -> xr.DataArray:
    """One array with xarray: open its group, dropping siblings whose sizes may conflict."""
    parent, _, name = key.rpartition("/")
    group = zarr.open_group(root / parent if parent else root, mode="r")
    others = [k for k in group.array_keys() if k != name]
    ds = xr.open_zarr(
        root,
        group=parent or None,
        consolidated=False,
        zarr_format=3,
        drop_variables=others,
        chunks=None,
    )
    frame: xr.DataArray = ds[name]
    return frame


@pytest.fixture
def store(tmp_path: Path) -> ArrayStore:
    return ArrayStore(tmp_path / "out.zarr", attributes={"export": "test"})


# -- chunk and shard shapes ----------------------------------------------------------------


def test_default_chunks_are_one_slice() -> None:
    assert default_chunks((300, 512, 512)) == (1, 512, 512)
    assert default_chunks((10, 480, 640, 3)) == (1, 480, 640, 3)


@pytest.mark.parametrize(
    ("shape", "chunks", "itemsize", "shard_bytes", "expected"),
    [
        # A CT of 300 slices of 512 KiB fits one 256 MiB shard.
        ((300, 512, 512), (1, 512, 512), 2, 256 * MiB, (300, 512, 512)),
        # 1,000 slices: two balanced shards of 500, not 512 + 488.
        ((1000, 512, 512), (1, 512, 512), 2, 256 * MiB, (500, 512, 512)),
        # Colour frames shard the same way.
        ((40, 480, 640, 3), (1, 480, 640, 3), 1, 2 * MiB, (2, 480, 640, 3)),
        # Patch chunks: a shard spans y and x (rounded up to whole chunks), stacks along z.
        ((100, 500, 500), (16, 64, 64), 2, 64 * MiB, (112, 512, 512)),
        ((100, 500, 500), (16, 64, 64), 2, 16 * MiB, (32, 512, 512)),
        # One layer of chunks over budget: y is split too.
        ((4, 1024, 1024), (1, 256, 1024), 2, 1 * MiB, (1, 512, 1024)),
        # A single chunk, or a budget under one chunk: no sharding.
        ((1, 512, 512), (1, 512, 512), 2, 256 * MiB, None),
        ((300, 512, 512), (1, 512, 512), 2, 1000, None),
    ],
)
def test_default_shards(
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    itemsize: int,
    shard_bytes: int,
    expected: tuple[int, ...] | None,
) -> None:
    assert default_shards(shape, chunks, itemsize, shard_bytes) == expected


@given(
    shape=st.lists(st.integers(1, 40), min_size=3, max_size=4),
    data=st.data(),
    itemsize=st.sampled_from([1, 2, 4, 8]),
    shard_bytes=st.integers(1, 2**16),
)
@settings(max_examples=200)
def test_default_shards_properties(
    shape: list[int], data: st.DataObject, itemsize: int, shard_bytes: int
) -> None:
    chunks = [data.draw(st.integers(1, n)) for n in shape]
    shards = default_shards(shape, chunks, itemsize, shard_bytes)
    grid = [-(-n // c) for n, c in zip(shape, chunks, strict=True)]
    if shards is None:
        return
    per_shard = [s // c for s, c in zip(shards, chunks, strict=True)]
    assert all(s % c == 0 for s, c in zip(shards, chunks, strict=True))
    assert all(1 <= k <= g for k, g in zip(per_shard, grid, strict=True))
    assert np.prod(per_shard) > 1
    chunk_bytes = int(np.prod(chunks)) * itemsize
    assert np.prod(per_shard) * chunk_bytes <= max(shard_bytes, chunk_bytes)


def test_default_shards_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="one length"):
        default_shards((4, 4, 4), (1, 4), 2, MiB)
    with pytest.raises(ValueError, match="positive"):
        default_shards((4, 0, 4), (1, 1, 4), 2, MiB)
    with pytest.raises(ValueError, match="shard_bytes"):
        default_shards((4, 4, 4), (1, 4, 4), 2, 0)


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("compressor", COMPRESSORS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_dtype_and_compressor(
    store: ArrayStore, dtype: str, compressor: str
) -> None:
    data = volume((5, 12, 10), dtype)
    info = store.write("ct", data, compressor=compressor, shard_bytes=2 * 12 * 10 * 8)
    assert info == ArrayInfo(
        key="ct",
        shape=(5, 12, 10),
        dtype=dtype,
        chunks=(1, 12, 10),
        shards=info.shards,
        nbytes=data.nbytes,
        stored_bytes=sum(p.stat().st_size for p in files_of(store.root / "ct")),
        seconds=info.seconds,
    )
    assert info.shards == default_shards(data.shape, info.chunks, data.itemsize, 2 * 12 * 10 * 8)
    array = read_zarr(store.root, "ct")
    assert same_voxels(array[...], data)
    assert same_voxels(array[3], data[3])  # one slice, as training reads it


@given(
    array=hnp.arrays(
        dtype=st.sampled_from(DTYPES).flatmap(
            lambda name: st.sampled_from([np.dtype(name), np.dtype(name).newbyteorder(">")])
        ),
        shape=hnp.array_shapes(min_dims=3, max_dims=4, min_side=1, max_side=6),
    ),
    data=st.data(),
    compressor=st.sampled_from(COMPRESSORS),
    shard_bytes=st.integers(1, 4096),
)
@settings(max_examples=25)
def test_round_trip_any_shape_chunks_and_shards(
    tmp_path_factory: pytest.TempPathFactory,
    array: npt.NDArray[Any],
    data: st.DataObject,
    compressor: str,
    shard_bytes: int,
) -> None:
    # Edge chunks (shape not a multiple of chunks), edge shards, big-endian input, NaN.
    chunks = tuple(data.draw(st.integers(1, n)) for n in array.shape)
    store = ArrayStore(tmp_path_factory.mktemp("hyp") / "out.zarr")
    info = store.write("a", array, chunks=chunks, compressor=compressor, shard_bytes=shard_bytes)
    assert info.chunks == chunks
    assert info.shards == default_shards(array.shape, chunks, array.itemsize, shard_bytes)
    assert same_voxels(read_zarr(store.root, "a")[...], array)
    assert same_voxels(read_tensorstore(store.root, "a").read().result(), array)


def test_shards_are_byte_identical_to_zarrs_own_write(store: ArrayStore, tmp_path: Path) -> None:
    # The chunk bytes are encoded here, not by zarr: for the default layout they must be
    # exactly what zarr-python itself writes.
    data = volume((6, 16, 20), "int16") + 1000
    cases: list[tuple[str, list[BytesBytesCodec] | None]] = [
        ("blosc-lz4", [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]),
        ("blosc-zstd", [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")]),
        ("zstd", [ZstdCodec(level=1)]),
        ("none", None),
    ]
    for compressor, codecs in cases:
        info = store.write(compressor, data, compressor=compressor)
        assert info.shards == (6, 16, 20)
        reference = zarr.create_array(
            LocalStore(tmp_path / compressor),
            shape=data.shape,
            dtype=data.dtype,
            chunks=info.chunks,
            shards=info.shards,
            compressors=codecs,
            fill_value=0,
        )
        reference[...] = data
        ours = (store.root / compressor / "c/0/0/0").read_bytes()
        assert ours == (tmp_path / compressor / "c/0/0/0").read_bytes()


def test_colour_arrays(store: ArrayStore) -> None:
    rgb = volume((4, 9, 11, 3), "uint8")
    info = store.write("us/1", rgb, attributes={"photometric": "RGB"})
    assert info.chunks == (1, 9, 11, 3)
    assert same_voxels(read_zarr(store.root, "us/1")[...], rgb)
    assert dimension_names(read_zarr(store.root, "us/1")) == ("z", "y", "x", "c")
    frame = xr.open_dataarray(
        store.root, engine="zarr", group="us", consolidated=False, zarr_format=3, chunks=None
    )
    assert frame.dims == ("z", "y", "x", "c")
    assert same_voxels(frame.values, rgb)


def test_three_readers_see_voxels_attributes_and_dimension_names(store: ArrayStore) -> None:
    data = volume((7, 16, 12), "int16")
    attributes = {"spacing": [2.5, 0.7, 0.7], "modality": "CT", "rescale": {"slope": 1.0}}
    store.write("study/series", data, attributes=attributes)
    store.write("study/other", volume((3, 5, 5), "uint8"))  # a sibling of another shape

    array = read_zarr(store.root, "study/series")
    assert same_voxels(array[...], data)
    assert array.attrs.asdict() == attributes
    assert dimension_names(array) == ("z", "y", "x")

    tensor = read_tensorstore(store.root, "study/series")
    assert same_voxels(tensor[2:4, 5:9, :].read().result(), data[2:4, 5:9, :])
    assert tensor.domain.labels == ("z", "y", "x")
    assert tensor.spec().to_json()["metadata"]["attributes"] == attributes

    frame = read_xarray(store.root, "study/series")
    assert frame.dims == ("z", "y", "x")
    assert frame.dtype == np.int16  # no masking of the fill value: 0 stays 0
    assert same_voxels(frame.values, data)
    assert frame.attrs == attributes


# -- keys, groups, attributes --------------------------------------------------------------


def test_nested_keys_make_groups(store: ArrayStore) -> None:
    store.write("a/b/c", volume((2, 3, 4), "int16"))
    store.write("a/d", volume((2, 3, 4), "int16"))
    store.write("top", volume((2, 3, 4), "int16"))
    for group in ("a", "a/b"):
        assert json.loads((store.root / group / "zarr.json").read_text())["node_type"] == "group"
    assert store.keys() == ["a/b/c", "a/d", "top"]
    assert store.exists("a/b/c")
    assert not store.exists("a/b")  # a group, not an array
    assert not store.exists("nothing")
    root = zarr.open_group(store.root, mode="r")
    arrays_seen = {k for k, v in root.members(max_depth=None) if isinstance(v, zarr.Array)}
    assert arrays_seen == {"a/b/c", "a/d", "top"}


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/abs",
        "a//b",
        "a/",
        "..",
        "a/../b",
        "./a",
        ".hidden",
        "a/.partial",
        "__reserved",
        "a/zarr.json",
        "sp ace",
        "a\\b",
        "x" * 2000,
    ],
)
def test_invalid_keys_are_rejected(store: ArrayStore, key: str) -> None:
    with pytest.raises(ValueError, match="invalid array key"):
        store.write(key, volume((1, 2, 2), "int16"))
    with pytest.raises(ValueError, match="invalid array key"):
        store.exists(key)
    assert not (store.root / ".partial").exists()


def test_keys_never_nest_arrays_and_groups(store: ArrayStore) -> None:
    store.write("ct", volume((1, 2, 2), "int16"))
    with pytest.raises(ValueError, match="'ct' is an array"):
        store.write("ct/inner", volume((1, 2, 2), "int16"))
    store.write("g/x", volume((1, 2, 2), "int16"))
    with pytest.raises(ValueError, match=r"cannot write array 'g' .*: it is a group"):
        store.write("g", volume((1, 2, 2), "int16"))
    with pytest.raises(ValueError, match="is a group"):
        store.delete("g")
    assert store.keys() == ["ct", "g/x"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"data": np.zeros((2, 2), np.int16)}, r"\(z, y, x\)"),
        ({"data": np.zeros((1, 2, 2, 2, 2), np.int16)}, r"\(z, y, x\)"),
        ({"data": np.zeros((0, 2, 2), np.int16)}, "no empty axis"),
        ({"data": np.zeros((1, 2, 2), np.int64)}, "int64.*Cast"),
        ({"data": np.zeros((1, 2, 2), bool)}, "bool"),
        ({"data": np.zeros((1, 2, 2), np.complex64)}, "complex64"),
        ({"compressor": "lz4"}, "unknown compressor 'lz4'"),
        ({"chunks": (1, 2)}, "must be 3 positive"),
        ({"chunks": (0, 2, 2)}, "positive"),
        ({"chunks": (1.5, 2, 2)}, "integers"),
        ({"dimension_names": ("z", "y")}, "3 non-empty"),
        ({"dimension_names": ("z", "z", "x")}, "repeat"),
        ({"attributes": {"slope": float("nan")}}, "JSON"),
        ({"attributes": {"n": np.int64(3)}}, "JSON"),
    ],
)
def test_invalid_arguments_are_rejected(
    store: ArrayStore, kwargs: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {"data": np.zeros((1, 2, 2), np.int16), **kwargs}
    with pytest.raises(ValueError, match=message):
        store.write("x", **arguments)
    assert store.keys() == []


def test_data_must_be_an_ndarray(store: ArrayStore) -> None:
    with pytest.raises(TypeError, match="numpy array"):
        store.write("x", [[[1]]])  # type: ignore[arg-type]


def test_group_attributes(tmp_path: Path) -> None:
    root = tmp_path / "out.zarr"
    store = ArrayStore(root, attributes={"cohort": "abc", "version": 1})
    store.update_group_attributes({"version": 2, "arrays": 10})
    assert store.group_attributes() == {"cohort": "abc", "version": 2, "arrays": 10}
    reopened = ArrayStore(root, attributes={"resumed": True})
    assert reopened.group_attributes() == {
        "cohort": "abc",
        "version": 2,
        "arrays": 10,
        "resumed": True,
    }
    assert zarr.open_group(root, mode="r").attrs.asdict() == reopened.group_attributes()
    with pytest.raises(ValueError, match="JSON"):
        store.update_group_attributes({"bad": float("inf")})


def test_root_must_not_be_an_array(tmp_path: Path) -> None:
    zarr.create_array(LocalStore(tmp_path / "a.zarr"), shape=(2,), dtype="int8")
    with pytest.raises(ValueError, match="not a group"):
        ArrayStore(tmp_path / "a.zarr")


# -- replace, delete, concurrency ----------------------------------------------------------


def test_replace_an_existing_key(store: ArrayStore) -> None:
    store.write("s/ct", volume((5, 8, 8), "int16"), attributes={"v": 1})
    new = volume((3, 4, 6), "float32", seed=1)
    store.write("s/ct", new, attributes={"v": 2}, compressor="zstd")
    array = read_zarr(store.root, "s/ct")
    assert same_voxels(array[...], new)
    assert array.attrs.asdict() == {"v": 2}
    assert store.keys() == ["s/ct"]
    assert not (store.root / ".partial").exists()


def test_replace_without_renameat2(store: ArrayStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arrays, "_RENAMEAT2", None)  # as on a system without renameat2
    store.write("ct", volume((2, 4, 4), "int16"))
    new = volume((2, 4, 4), "int16", seed=7)
    store.write("ct", new)
    assert same_voxels(read_zarr(store.root, "ct")[...], new)


def test_delete(store: ArrayStore) -> None:
    store.write("a/ct", volume((2, 4, 4), "int16"))
    store.delete("a/ct")
    store.delete("a/ct")  # no error when absent
    assert store.keys() == []
    assert not (store.root / "a" / "ct").exists()
    assert not (store.root / ".partial").exists()


def test_concurrent_writers(store: ArrayStore) -> None:
    jobs = {
        f"{group}/s{i}": volume((3 + i, 20, 18), dtype, seed=i)
        for i, (group, dtype) in enumerate(
            [(g, d) for g in ("p1", "p2", "p3") for d in ("int16", "uint8", "float32", "int32")]
        )
    }
    with ThreadPoolExecutor(4) as pool:
        infos = list(pool.map(lambda item: store.write(*item, shard_bytes=2000), jobs.items()))
    assert sorted(i.key for i in infos) == store.keys() == sorted(jobs)
    for key, data in jobs.items():
        assert same_voxels(read_zarr(store.root, key)[...], data)
    assert not (store.root / ".partial").exists()


# -- interrupted writes --------------------------------------------------------------------

KILL_SCRIPT = """
import os, signal, sys
import numpy as np
import storage.arrays as arrays

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

target, attribute = sys.argv[2].split(".") if "." in sys.argv[2] else (None, sys.argv[2])
setattr(getattr(arrays, target) if target else arrays, attribute, die)
arrays.ArrayStore(sys.argv[1]).write("s/ct", np.ones((40, 64, 64), np.int16), shard_bytes=2**16)
"""


@pytest.mark.parametrize("hook", ["_FileWriter.add", "_swap_in"])
def test_killed_write_leaves_nothing_visible(store: ArrayStore, hook: str) -> None:
    # SIGKILL mid-chunks, and with every byte written but the rename not yet made.
    old = volume((2, 4, 4), "int16")
    store.write("s/ct", old)
    done = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(store.root), hook],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    leftovers = list((store.root / ".partial").iterdir())
    assert len(leftovers) == 1

    assert store.keys() == ["s/ct"]
    assert same_voxels(read_zarr(store.root, "s/ct")[...], old)  # the old array, whole
    with pytest.warns(ZarrUserWarning, match=r"\.partial"):
        members = dict(zarr.open_group(store.root, mode="r").members(max_depth=None))
    assert {k for k, v in members.items() if isinstance(v, zarr.Array)} == {"s/ct"}

    assert store.clean_partial() == 1
    assert not (store.root / ".partial").exists()
    assert store.clean_partial() == 0
    assert same_voxels(read_zarr(store.root, "s/ct")[...], old)


def test_failed_write_cleans_up_and_keeps_the_old_array(
    store: ArrayStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = volume((2, 4, 4), "int16")
    store.write("ct", old)

    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(arrays, "_swap_in", fail)
    with pytest.raises(OSError, match="No space"):
        store.write("ct", volume((9, 4, 4), "int16"))
    with pytest.raises(OSError, match="No space"):
        store.write("new", volume((9, 4, 4), "int16"))
    assert store.keys() == ["ct"]
    assert same_voxels(read_zarr(store.root, "ct")[...], old)
    assert not (store.root / ".partial").exists()


def test_clean_partial_spares_writes_in_progress(
    store: ArrayStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, release = threading.Event(), threading.Event()
    original: Callable[..., int] = arrays._write_chunks

    def slow_write_chunks(*args: Any) -> int:
        started.set()
        assert release.wait(30)
        return original(*args)

    monkeypatch.setattr(arrays, "_write_chunks", slow_write_chunks)
    data = volume((3, 4, 4), "int16")
    with ThreadPoolExecutor(1) as pool:
        writing = pool.submit(store.write, "ct", data)
        assert started.wait(30)
        assert store.clean_partial() == 0
        assert not store.exists("ct")
        release.set()
        writing.result(timeout=30)
    assert same_voxels(read_zarr(store.root, "ct")[...], data)


def test_clean_partial_restores_an_array_moved_aside(store: ArrayStore) -> None:
    # Without renameat2 a replace is two renames; killed between them, the old array sits
    # in the scratch folder, which names its key. clean_partial puts it back.
    data = volume((2, 4, 4), "int16")
    store.write("s/ct", data)
    scratch = store.root / ".partial" / "0123abcd"
    scratch.mkdir(parents=True)
    (scratch / "key").write_text("s/ct")
    os.rename(store.root / "s" / "ct", scratch / "old")
    assert store.keys() == []
    assert store.clean_partial() == 1
    assert store.keys() == ["s/ct"]
    assert same_voxels(read_zarr(store.root, "s/ct")[...], data)
