"""storage.reader: exports written by ArrayStore read back, locally and over HTTP and S3."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import zarr
from peers.remote import serve_http, serve_s3
from zarr.codecs import BytesCodec, GzipCodec, TransposeCodec
from zarr.storage import LocalStore

from storage.arrays import COMPRESSORS, ArrayStore
from storage.errors import ObjectNotFoundError, StorageError
from storage.reader import ArrayReader, StoreLocation, StoreReader, open_location

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    import numpy.typing as npt

#: (name, shape, dtype, chunks, shard_bytes): several shards with a partial last one, one
#: shard, every chunk its own file, and chunks smaller than a slice with a 3-D shard grid.
CASES: list[tuple[str, tuple[int, ...], str, tuple[int, ...] | None, int]] = [
    ("shards", (23, 17, 19), "int16", None, 4 * 17 * 19 * 2),
    ("one_shard", (9, 17, 19), "int16", None, 2**28),
    ("unsharded", (7, 17, 19), "uint8", None, 1),
    ("rgb", (11, 9, 10, 3), "uint8", None, 3 * 9 * 10 * 3),
    ("tiles", (13, 21, 18), "int16", (2, 8, 8), 2 * 8 * 8 * 2 * 3),
    ("tiles_unsharded", (5, 21, 18), "uint8", (2, 8, 8), 1),
]


def volume(shape: tuple[int, ...], dtype: str, seed: int = 0) -> npt.NDArray[Any]:
    """A ramp plus noise, with zeros, in the range of ``dtype``."""
    rng = np.random.default_rng(seed)
    noisy = np.indices(shape).sum(axis=0) * 3.0 + rng.normal(0, 4, size=shape)
    info = np.iinfo(dtype)
    out: npt.NDArray[Any] = np.clip(noisy, info.min, info.max).astype(dtype)
    out.flat[0] = 0
    return out


def random_selection(rng: np.random.Generator, shape: Sequence[int]) -> tuple[Any, ...]:
    """Ints and step-1 slices (negative, open, empty or past the end), trailing dims omitted."""
    items: list[Any] = []
    for n in shape:
        kind = rng.integers(0, 5)
        if kind == 0:
            items.append(int(rng.integers(-n, n)))
        elif kind == 1:
            items.append(slice(None))
        else:
            a, b = sorted(int(v) for v in rng.integers(-n - 2, n + 3, size=2))
            items.append(slice(a if kind != 2 else None, b))
    return tuple(items[: int(rng.integers(1, len(shape) + 1))])


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, npt.NDArray[Any]]]:
    """One export holding every case in every compressor, and the arrays written."""
    root = tmp_path_factory.mktemp("reader") / "export.zarr"
    store = ArrayStore(root)
    written: dict[str, npt.NDArray[Any]] = {}
    for i, (name, shape, dtype, chunks, shard_bytes) in enumerate(CASES):
        data = volume(shape, dtype, seed=i)
        for compressor in COMPRESSORS:
            key = f"{compressor}/{name}"
            store.write(key, data, chunks=chunks, shard_bytes=shard_bytes, compressor=compressor)
            written[key] = data
    (root / "manifest.bin").write_bytes(bytes(range(256)) * 3)
    return root, written


# -- (1) voxels equal zarr's -------------------------------------------------------------


@pytest.mark.parametrize("compressor", COMPRESSORS)
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_random_selections_equal_zarr(
    export: tuple[Path, dict[str, npt.NDArray[Any]]], compressor: str, case: str
) -> None:
    root, written = export
    key = f"{compressor}/{case}"
    reader = ArrayReader(StoreReader(open_location(root)), key)
    expected = zarr.open_array(LocalStore(root / key, read_only=True), mode="r")
    assert reader.shape == expected.shape
    assert reader.dtype == expected.dtype
    assert reader.dimension_names == getattr(expected.metadata, "dimension_names", None)
    full = np.asarray(expected[...])
    np.testing.assert_array_equal(full, written[key])
    rng = np.random.default_rng(abs(hash(key)) % 2**32)
    for i in range(200):
        selection = random_selection(rng, reader.shape)
        got = reader[selection]
        # zarr itself for the first selections, its full read (equal, above) after that.
        want = np.asarray(expected[selection]) if i < 10 else full[selection]
        assert got.shape == want.shape, selection
        assert got.dtype == want.dtype
        assert got.flags.c_contiguous
        assert got.flags.writeable
        np.testing.assert_array_equal(got, want, err_msg=str(selection))
    np.testing.assert_array_equal(reader[...], full)
    np.testing.assert_array_equal(reader[np.int64(-1)], full[-1])


@pytest.mark.parametrize("local_io", ["mmap", "pread"])
def test_local_io_modes_agree(
    export: tuple[Path, dict[str, npt.NDArray[Any]]], local_io: str
) -> None:
    root, written = export
    store = StoreReader(open_location(root), local_io=local_io, max_open_files=2)
    rng = np.random.default_rng(1)
    for compressor in ("none", "blosc-lz4"):
        for case in ("shards", "tiles", "unsharded"):
            key = f"{compressor}/{case}"
            reader = ArrayReader(store, key, max_cached_indexes=1)
            for _ in range(30):
                selection = random_selection(rng, reader.shape)
                np.testing.assert_array_equal(reader[selection], written[key][selection])


def test_selection_errors(export: tuple[Path, dict[str, npt.NDArray[Any]]]) -> None:
    root, _ = export
    reader = ArrayReader(StoreReader(open_location(root)), "none/shards")
    with pytest.raises(IndexError, match="out of bounds"):
        reader[23]
    with pytest.raises(IndexError, match="step 1"):
        reader[::2]
    with pytest.raises(IndexError, match="too many"):
        reader[0, 0, 0, 0]
    with pytest.raises(IndexError, match="ints and slices"):
        reader[[0, 1]]


# -- (2) one slice, one ranged read --------------------------------------------------------


class CountingStoreReader(StoreReader):
    """Records every read_ranges call and read_suffix call."""

    def __init__(self, location: StoreLocation, **kwargs: Any) -> None:
        super().__init__(location, **kwargs)
        self.calls: list[tuple[str, list[tuple[int, int]]]] = []
        self.suffixes = 0

    def read_ranges(
        self,
        key: str,
        ranges: Sequence[tuple[int, int]],
        *,
        out: Sequence[memoryview | None] | None = None,
    ) -> list[bytes | memoryview]:
        self.calls.append((key, list(ranges)))
        return super().read_ranges(key, ranges, out=out)

    def read_suffix(self, key: str, length: int) -> tuple[bytes | memoryview, int]:
        self.suffixes += 1
        return super().read_suffix(key, length)


@pytest.mark.parametrize("local_io", ["mmap", "pread"])
def test_one_slice_is_one_ranged_read(tmp_path: Path, local_io: str) -> None:
    data = volume((12, 64, 48), "int16")
    ArrayStore(tmp_path).write("ct", data, compressor="none", shard_bytes=5 * 64 * 48 * 2)
    store = CountingStoreReader(open_location(tmp_path), local_io=local_io)
    reader = ArrayReader(store, "ct")
    assert reader.shard_shape == (4, 64, 48)
    assert reader.chunk_shape == (1, 64, 48)
    reader[1]  # caches the index of shard 0
    assert store.suffixes == 1
    store.calls.clear()
    got = reader[2]
    assert store.calls == [("ct/c/0/0/0", [(2 * 64 * 48 * 2, 64 * 48 * 2)])]
    assert store.suffixes == 1
    np.testing.assert_array_equal(got, data[2])
    # A patch of slices 1-3 reads only them (one call), and only the rows it needs.
    store.calls.clear()
    np.testing.assert_array_equal(reader[1:4, 10:20, 5:9], data[1:4, 10:20, 5:9])
    ((key, ranges),) = store.calls
    assert key == "ct/c/0/0/0"
    assert len(ranges) == 3
    assert all(length == (9 * 48 + 4) * 2 for _start, length in ranges)
    # Across two shards: one call for each, and one new index.
    store.calls.clear()
    np.testing.assert_array_equal(reader[3:6], data[3:6])
    assert [key for key, _ in store.calls] == ["ct/c/0/0/0", "ct/c/1/0/0"]
    assert store.suffixes == 2


# -- (3) corrupt, unsupported, missing -----------------------------------------------------


def test_corrupt_shard_index_is_refused(tmp_path: Path) -> None:
    data = volume((6, 8, 8), "int16")
    ArrayStore(tmp_path).write("ct", data, compressor="blosc-lz4", shard_bytes=3 * 8 * 8 * 2)
    shard = tmp_path / "ct" / "c" / "1" / "0" / "0"
    blob = bytearray(shard.read_bytes())
    blob[-10] ^= 0xFF  # inside the index (3 chunks x 16 bytes, then the crc)
    shard.write_bytes(bytes(blob))
    reader = ArrayReader(StoreReader(open_location(tmp_path)), "ct")
    np.testing.assert_array_equal(reader[0:3], data[0:3])  # the other shard is fine
    with pytest.raises(StorageError, match="crc32c"):
        reader[4]


def test_index_pointing_past_the_data_is_refused(tmp_path: Path) -> None:
    import google_crc32c

    data = volume((4, 8, 8), "int16")
    ArrayStore(tmp_path).write("ct", data, compressor="none", shard_bytes=4 * 8 * 8 * 2)
    shard = tmp_path / "ct" / "c" / "0" / "0" / "0"
    blob = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(blob[-68:-4]), dtype="<u8").copy()
    index[2] = 10**9  # offset of chunk 1
    blob[-68:] = index.tobytes() + google_crc32c.value(index.tobytes()).to_bytes(4, "little")
    shard.write_bytes(bytes(blob))
    with pytest.raises(StorageError, match="corrupt index"):
        ArrayReader(StoreReader(open_location(tmp_path)), "ct")[1]


def _zarr_array(root: Path, key: str, **kwargs: Any) -> None:
    array = zarr.create_array(
        LocalStore(root / key),
        shape=(4, 8, 8),
        dtype="int16",
        chunks=(1, 8, 8),
        fill_value=0,
        zarr_format=3,
        **kwargs,
    )
    array[...] = volume((4, 8, 8), "int16")


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"compressors": GzipCodec()}, "gzip"),
        ({"serializer": BytesCodec(endian="big"), "compressors": None}, "big"),
        ({"filters": TransposeCodec(order=(0, 2, 1)), "compressors": None}, "transpose"),
        ({"shards": {"shape": (2, 8, 8), "index_location": "start"}}, "index_location"),
    ],
    ids=["gzip", "big-endian", "transpose", "index-at-start"],
)
def test_unsupported_layouts_are_refused(
    tmp_path: Path, kwargs: dict[str, Any], named: str
) -> None:
    _zarr_array(tmp_path, "other", **kwargs)
    with pytest.raises(StorageError, match=named) as info:
        ArrayReader(StoreReader(open_location(tmp_path)), "other")
    assert "'other'" in str(info.value)
    assert "unsupported" in str(info.value)


def test_missing_keys(tmp_path: Path, export: tuple[Path, dict[str, npt.NDArray[Any]]]) -> None:
    root, _ = export
    store = StoreReader(open_location(root))
    with pytest.raises(StorageError, match="no array 'nope/ct'") as info:
        ArrayReader(store, "nope/ct")
    assert str(root) in str(info.value)
    with pytest.raises(ObjectNotFoundError, match=r"missing\.bin"):
        store.read_bytes("missing.bin")
    with pytest.raises(StorageError, match="invalid key"):
        store.read_bytes("../etc/passwd")
    assert store.read_bytes("manifest.bin") == bytes(range(256)) * 3
    assert store.size("manifest.bin") == 768
    assert store.read_json("zarr.json")["node_type"] == "group"
    # A chunk file gone from an unsharded array is damage, not zeros.
    ArrayStore(tmp_path).write("ct", volume((3, 4, 4), "int16"), shard_bytes=1)
    (tmp_path / "ct" / "c" / "1" / "0" / "0").unlink()
    reader = ArrayReader(StoreReader(open_location(tmp_path)), "ct")
    with pytest.raises(StorageError, match="missing"):
        reader[1]


def test_empty_chunks_read_as_fill_value(tmp_path: Path) -> None:
    # zarr leaves all-fill chunks out of a shard (offset and length 2**64-1).
    array = zarr.create_array(
        LocalStore(tmp_path / "sparse"),
        shape=(6, 8, 8),
        dtype="int16",
        chunks=(1, 8, 8),
        shards=(3, 8, 8),
        fill_value=7,
        zarr_format=3,
        compressors=None,
    )
    data = np.full((6, 8, 8), 7, dtype="int16")
    data[1] = np.arange(64).reshape(8, 8)
    data[4, 2:5] = 3
    array[...] = data
    reader = ArrayReader(StoreReader(open_location(tmp_path)), "sparse")
    np.testing.assert_array_equal(reader[...], data)
    np.testing.assert_array_equal(reader[3], data[3])
    np.testing.assert_array_equal(reader[2:5, 1:6], data[2:5, 1:6])


# -- (4) pickling, processes ---------------------------------------------------------------


def _read_in_child(reader: ArrayReader, selection: Any) -> npt.NDArray[Any]:
    return reader[selection]


def test_pickled_readers_work_in_other_processes(
    export: tuple[Path, dict[str, npt.NDArray[Any]]],
) -> None:
    root, written = export
    store = StoreReader(open_location(root))
    reader = ArrayReader(store, "blosc-lz4/shards")
    reader[0]  # open handles and cache an index in the parent first
    state = pickle.dumps(reader)
    assert len(state) < 4096  # the location and the metadata, no handles nor caches
    copy = pickle.loads(state)
    np.testing.assert_array_equal(copy[5:9, 2], written["blosc-lz4/shards"][5:9, 2])
    selections: list[Any] = [5, (slice(2, 20), 3), (slice(None), slice(1, 5), -1)]
    # Not "fork": this test process runs other libraries' threads (polars', obstore's tokio
    # runtime), and a child forked while one holds a lock can hang (a run outside CI's
    # network namespace hung in Pool.terminate); Python warns of it from 3.12.
    for method in ("spawn", "forkserver"):
        context = multiprocessing.get_context(method)
        with context.Pool(1) as pool:
            results = pool.starmap(_read_in_child, [(reader, s) for s in selections])
        for selection, result in zip(selections, results, strict=True):
            np.testing.assert_array_equal(result, written["blosc-lz4/shards"][selection])


def test_location_repr_hides_secrets(tmp_path: Path) -> None:
    location = open_location("s3://bucket/prefix/", secret_access_key="hunter2", region="x")
    assert location.url == "s3://bucket/prefix"
    assert "hunter2" not in repr(location)
    assert "hunter2" not in repr(StoreReader(location))
    assert pickle.loads(pickle.dumps(location)) == location
    assert hash(location) == hash(
        open_location("s3://bucket/prefix", secret_access_key="hunter2", region="x")
    )
    assert open_location(tmp_path) == StoreLocation(str(tmp_path), {})
    assert open_location(f"file://{tmp_path}").url == str(tmp_path)
    with pytest.raises(StorageError, match="scheme"):
        open_location("ftp://example.org/x")


# -- (5) remote ----------------------------------------------------------------------------

REMOTE_KEYS = ("none/shards", "blosc-zstd/tiles", "zstd/unsharded", "blosc-lz4/rgb")


@pytest.fixture(scope="module")
def remote_root(
    export: tuple[Path, dict[str, npt.NDArray[Any]]], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A copy of the export with only :data:`REMOTE_KEYS` (fewer files to upload)."""
    root, _ = export
    copy = tmp_path_factory.mktemp("remote") / root.name
    for key in REMOTE_KEYS:
        shutil.copytree(root / key, copy / key)
        shutil.copy(root / key.split("/")[0] / "zarr.json", copy / key.split("/")[0])
    for name in ("zarr.json", "manifest.bin"):
        shutil.copy(root / name, copy / name)
    return copy


def _same_as_local(store: StoreReader, written: dict[str, npt.NDArray[Any]]) -> None:
    rng = np.random.default_rng(7)
    for key in REMOTE_KEYS:
        reader = ArrayReader(store, key)
        np.testing.assert_array_equal(reader[...], written[key])
        np.testing.assert_array_equal(reader[2], written[key][2])
        for _ in range(10):
            selection = random_selection(rng, reader.shape)
            np.testing.assert_array_equal(reader[selection], written[key][selection])
    assert store.read_bytes("manifest.bin") == bytes(range(256)) * 3
    assert store.size("manifest.bin") == 768
    assert [bytes(b) for b in store.read_ranges("manifest.bin", [(1, 3), (300, 2)])] == [
        b"\x01\x02\x03",
        b"\x2c\x2d",
    ]
    with pytest.raises(ObjectNotFoundError, match=r"nope\.bin"):
        store.read_bytes("nope.bin")
    with pytest.raises(StorageError, match="no array"):
        ArrayReader(store, "none/nope")


def test_http(export: tuple[Path, dict[str, npt.NDArray[Any]]], remote_root: Path) -> None:
    _, written = export
    root = remote_root
    with serve_http(root.parent) as base:
        location = open_location(f"{base}/{root.name}", allow_http=True)
        store = StoreReader(location)
        _same_as_local(store, written)
        copy = pickle.loads(pickle.dumps(ArrayReader(store, "none/shards")))
        np.testing.assert_array_equal(copy[3], written["none/shards"][3])
    # The server is gone: a StorageError carrying the cause, quickly.
    dead = StoreReader(open_location(base, allow_http=True, max_retries=0, timeout="2s"))
    with pytest.raises(StorageError, match="could not read") as info:
        dead.read_bytes("x")
    assert info.value.__cause__ is not None


def test_s3(export: tuple[Path, dict[str, npt.NDArray[Any]]], remote_root: Path) -> None:
    _, written = export
    root = remote_root
    with serve_s3(root.parent, "exports") as (_endpoint, bucket, options):
        location = open_location(f"s3://{bucket}/{root.name}", **options)
        assert location.options["secret_access_key"] == "testing"
        store = StoreReader(location)
        _same_as_local(store, written)
        bad = StoreReader(
            open_location(
                f"s3://other-bucket/{root.name}", **{**options, "secret_access_key": "sekrit"}
            )
        )
        with pytest.raises(StorageError) as info:
            bad.read_bytes("zarr.json")
        assert "sekrit" not in str(info.value)


def test_json_errors(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text(json.dumps([1]), encoding="utf-8")
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    store = StoreReader(open_location(os.fspath(tmp_path)))
    with pytest.raises(StorageError, match="not a JSON object"):
        store.read_json("list.json")
    with pytest.raises(StorageError, match="not JSON"):
        store.read_json("bad.json")


@pytest.mark.parametrize(
    ("shape", "chunks", "shard_bytes"),
    [
        ((37, 20, 24), None, 8 * 20 * 24 * 2),  # one-slice chunks: plain shards, a short last
        ((13, 21, 18), (2, 8, 8), 2 * 8 * 8 * 2 * 6),  # tiles: runs of chunks per dimension
        ((9, 16, 16), (3, 5, 7), 3 * 5 * 7 * 2 * 8),  # chunks overhanging every edge
    ],
)
def test_raw_shards_are_copied_from_the_mapping(
    tmp_path: Path, shape: tuple[int, ...], chunks: tuple[int, ...] | None, shard_bytes: int
) -> None:
    data = volume(shape, "int16", seed=3)
    ArrayStore(tmp_path).write(
        "ct", data, chunks=chunks, shard_bytes=shard_bytes, compressor="none"
    )
    mapped = ArrayReader(StoreReader(open_location(tmp_path)), "ct")
    chunked = ArrayReader(StoreReader(open_location(tmp_path), local_io="pread"), "ct")
    assert mapped._mapped
    assert not chunked._mapped
    rng = np.random.default_rng(11)
    for _ in range(300):
        box = tuple(
            slice(int(a), int(a) + int(rng.integers(1, n - a + 1)))
            for a, n in ((int(rng.integers(0, n)), n) for n in shape)
        )
        np.testing.assert_array_equal(mapped[box], data[box])
        np.testing.assert_array_equal(chunked[box], data[box])
    selections: list[Any] = [(), 0, (slice(None), 3), (-1, slice(2, 9), -2)]
    for selection in selections:
        np.testing.assert_array_equal(mapped[selection], data[selection])
    assert all(entry.view is not None for entry in mapped._indexes.values())
