"""ML datasets over an export: the arrays ``imgindex export`` wrote, streamed into training.

:class:`SeriesDataset` is a map-style dataset over an export's ``manifest.parquet``: item ``i``
is a dict with the ``image`` (a numpy array in the stored dtype, or rescaled to Hounsfield or
other modality units with ``rescale=True``), the array's ``key`` and ``spacing``, and the
label columns asked for. Three ways to sample:

- ``"volume"``: one item per array, the whole volume ``(z, y, x[, c])``;
- ``"slice"``: one item per slice of every array, ``(y, x[, c])``;
- ``"patch"``: ``patches_per_volume`` items per array, each a ``patch_size`` box at a
  position drawn from ``(seed, epoch, index)``: the same epoch gives the same patches, and
  :meth:`SeriesDataset.set_epoch` moves them.

Slices and patches read only the chunks they cover (:class:`storage.reader.ArrayReader`:
one ranged read per touched shard), so a random patch of a 10 GB volume costs its own bytes.

It needs no PyTorch: iterate it, or index it. Under ``torch.utils.data.DataLoader`` with
workers, each worker opens the store itself (only the store's location and the manifest cross
processes). :class:`EpochSampler` gives reproducible shuffled epochs. The export can be a
local folder or a remote store (``http(s)://`` or ``s3://``, with ``storage_options`` for
obstore, e.g. an S3-compatible endpoint and credentials).

Example::

    from imgindex.datasets import SeriesDataset
    ds = SeriesDataset("exports/mi_cad_ct.zarr", sample="patch", patch_size=(16, 64, 64),
                       rescale=True, labels=["coronary_procedure_days"])
    item = ds[0]  # {"image": float32 (16, 64, 64), "key": ..., "spacing": ..., ...}
"""

from __future__ import annotations

import bisect
import io
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np

from imgindex.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    import numpy.typing as npt
    import polars as pl

    from storage.reader import ArrayReader, StoreLocation, StoreReader

__all__ = ["SAMPLES", "EpochSampler", "SeriesDataset"]

Sample = Literal["volume", "slice", "patch"]
#: The sampling modes of :class:`SeriesDataset`.
SAMPLES: Final = ("volume", "slice", "patch")
_MANIFEST: Final = "manifest.parquet"
#: Manifest columns that are the array's description, not labels.
_DESCRIPTION: Final = frozenset(
    {"key", "shape", "dtype", "nbytes", "stored_bytes", "spacing", "origin", "direction"}
)
#: Readers a worker keeps open (each holds a shard index or two).
_READERS_KEPT: Final = 256
_MASK64: Final = (1 << 64) - 1


def _mix(value: int) -> int:
    """SplitMix64's finaliser: a well-spread 64-bit hash of ``value`` (cheap in Python)."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


@dataclass(frozen=True)
class _Array:
    """One manifest row: what the dataset needs of an array, picklable and small."""

    key: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None
    labels: dict[str, Any]
    slope: float | None
    intercept: float | None


class SeriesDataset:
    """A map-style dataset over an export (see the module docstring).

    Parameters
    ----------
    export : str or path-like
        The export: a local folder (``out.zarr``), or ``http(s)://...`` / ``s3://bucket/path``.
    sample : {"volume", "slice", "patch"}
        What one item is.
    patch_size : sequence of int, optional
        With ``sample="patch"``: the box ``(z, y, x)``. A dimension larger than a volume is
        padded with ``pad_value`` (in the returned units, clipped to the stored dtype's range).
    patches_per_volume : int
        With ``sample="patch"``: items per array per epoch.
    labels : sequence of str, optional
        Manifest columns to return with each item (default: the selection's labels and the
        patient's pseudonym ``PatientID``, for splitting by patient; not the array's
        description nor its other DICOM attributes).
    where : polars expression, optional
        Keep only the manifest rows it is true for (``pl.col("Modality") == "CT"``).
    rescale : bool
        Return ``image * RescaleSlope + RescaleIntercept`` as float32 (Hounsfield units for CT)
        instead of the stored values.
    pad_value : float
        What pads a patch beyond the volume (in the returned units).
    transform : callable, optional
        Called with each item (a dict), its result returned instead.
    seed : int
        Fixes the patch positions (with the epoch).
    storage_options : mapping, optional
        Options for a remote store (obstore's: ``endpoint``, ``region``,
        ``aws_access_key_id``, ``allow_http``, ...).

    Raises
    ------
    ConfigError
        For an export without a manifest, an unknown sampling mode or label, or a bad patch size.
    """

    def __init__(
        self,
        export: str | os.PathLike[str],
        *,
        sample: Sample = "volume",
        patch_size: Sequence[int] | None = None,
        patches_per_volume: int = 1,
        labels: Sequence[str] | None = None,
        where: pl.Expr | None = None,
        rescale: bool = False,
        pad_value: float = 0.0,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        seed: int = 0,
        storage_options: Mapping[str, str] | None = None,
    ) -> None:
        from storage.reader import StoreReader, open_location

        if sample not in SAMPLES:
            raise ConfigError(f"sample must be one of {', '.join(SAMPLES)}, not {sample!r}")
        if sample == "patch":
            if not patch_size or any(int(n) < 1 for n in patch_size):
                raise ConfigError(f"sample='patch' needs a positive patch_size, not {patch_size}")
            if patches_per_volume < 1:
                raise ConfigError("patches_per_volume must be at least 1")
        self.location: StoreLocation = open_location(export, **dict(storage_options or {}))
        self.sample: Sample = sample
        self.patch_size = tuple(int(n) for n in patch_size) if patch_size else None
        self.patches_per_volume = patches_per_volume
        self.rescale = rescale
        self.pad_value = pad_value
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        manifest = _read_manifest(StoreReader(self.location), export)
        if "shape" not in manifest.columns:
            raise ConfigError(
                f"{export}: not an export of arrays (its manifest has no shape: an "
                "`imgindex export --format dicom` folder?); datasets read Zarr exports"
            )
        if where is not None:
            manifest = manifest.filter(where)
        self.label_columns = _label_columns(manifest, labels, export)
        self.arrays = [_array(row, self.label_columns) for row in manifest.iter_rows(named=True)]
        if self.patch_size is not None:
            ndim = min(len(a.shape) for a in self.arrays) if self.arrays else 3
            if len(self.patch_size) not in (ndim, 3):
                raise ConfigError(f"patch_size {self.patch_size} does not fit (z, y, x) arrays")
        #: Cumulative slices, for slice sampling: item i is in array searchsorted(ends, i).
        self._ends = np.cumsum([a.shape[0] for a in self.arrays], dtype=np.int64)
        self._slice_ends = [int(e) for e in self._ends]  # for bisect: quicker per item
        self._length = self._count()
        self._open: dict[str, ArrayReader] = {}
        self._store: StoreReader | None = None
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return (
            f"SeriesDataset({self.location.url!r}, sample={self.sample!r}, "
            f"{len(self.arrays)} arrays, {len(self)} items)"
        )

    def __len__(self) -> int:
        return self._length

    def _count(self) -> int:
        if self.sample == "slice":
            return int(self._ends[-1]) if len(self._ends) else 0
        if self.sample == "patch":
            return len(self.arrays) * self.patches_per_volume
        return len(self.arrays)

    def __iter__(self) -> Iterator[Any]:
        for index in range(len(self)):
            yield self[index]

    def set_epoch(self, epoch: int) -> None:
        """Patch positions for ``epoch`` (call it at the start of each epoch; with DataLoader
        workers, before the loader's iterator is made, or use persistent_workers=False)."""
        self.epoch = epoch

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"], state["_store"] = {}, None  # each process opens the store itself
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __getitem__(self, index: int) -> Any:
        length = self._length
        if not -length <= index < length:
            raise IndexError(f"index {index} out of range for {length} items")
        index = int(index) % length
        if self.sample == "volume":
            array = self.arrays[index]
            item = self._item(array, self._reader(array)[...], None)
        elif self.sample == "slice":
            ends = self._slice_ends
            number = bisect.bisect_right(ends, index)
            array = self.arrays[number]
            z = index - (ends[number - 1] if number else 0)
            item = self._item(array, self._reader(array)[z], z)
            item["slice"] = z
        else:
            array = self.arrays[index // self.patches_per_volume]
            image, offset = self._patch(array, index)
            item = self._item(array, image, None, offset=offset)
            item["offset"] = offset
        return self.transform(item) if self.transform is not None else item

    # --- reading -------------------------------------------------------------------------

    def _reader(self, array: _Array) -> ArrayReader:
        from storage.reader import ArrayReader, StoreReader

        if self._pid != os.getpid():  # a forked worker: its own handles
            self._open, self._store, self._pid = {}, None, os.getpid()
        reader = self._open.get(array.key)
        if reader is None:
            if self._store is None:
                self._store = StoreReader(self.location)
            if len(self._open) >= _READERS_KEPT:
                self._open.pop(next(iter(self._open)))
            reader = self._open[array.key] = ArrayReader(self._store, array.key)
        return reader

    def _patch(self, array: _Array, index: int) -> tuple[npt.NDArray[Any], tuple[int, ...]]:
        assert self.patch_size is not None
        size = self.patch_size
        shape = array.shape
        if len(size) < len(shape):  # (z, y, x) patches of (z, y, x, c) arrays: all channels
            size = (*size, *shape[len(size) :])
        # A hash of (seed, epoch, index, dimension): as reproducible as a seeded generator
        # and some 30 times cheaper than making one per item (the modulo's bias is < 2**-40).
        key = _mix(_mix(_mix(self.seed & _MASK64) ^ (self.epoch & _MASK64)) ^ index)
        offset = tuple(
            _mix(key + dim) % (n - s + 1) if n > s else 0
            for dim, (n, s) in enumerate(zip(shape, size, strict=True))
        )
        box = tuple(slice(o, min(o + s, n)) for o, s, n in zip(offset, size, shape, strict=True))
        image = self._reader(array)[box]
        if image.shape != size:
            padded = np.full(size, self._pad(array, image.dtype), dtype=image.dtype)
            padded[tuple(slice(0, n) for n in image.shape)] = image
            image = padded
        return image, offset

    def _pad(self, array: _Array, dtype: np.dtype[Any]) -> Any:
        """``pad_value`` in stored units, so that rescaling turns it into ``pad_value``;
        clipped to what the stored dtype holds."""
        stored = self.pad_value
        if self.rescale and array.slope not in (None, 0):
            stored = (self.pad_value - (array.intercept or 0.0)) / (array.slope or 1.0)
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            stored = min(max(round(stored), info.min), info.max)
        return np.asarray(stored).astype(dtype)

    def _item(
        self,
        array: _Array,
        image: npt.NDArray[Any],
        z: int | None,
        *,
        offset: tuple[int, ...] | None = None,
    ) -> dict[str, Any]:
        if self.rescale:
            image = _rescaled(image, array, self._reader(array).attributes, z, offset)
        item: dict[str, Any] = {"image": image, "key": array.key, "spacing": array.spacing}
        item.update(array.labels)
        return item


def _rescaled(
    image: npt.NDArray[Any],
    array: _Array,
    attributes: Mapping[str, Any],
    z: int | None,
    offset: tuple[int, ...] | None,
) -> npt.NDArray[np.float32]:
    """``image`` in modality units: one slope and intercept, or one per slice."""
    slope = attributes.get("RescaleSlope", array.slope)
    intercept = attributes.get("RescaleIntercept", array.intercept)
    out = image.astype(np.float32)
    if isinstance(slope, list) or isinstance(intercept, list):
        n = array.shape[0]
        slopes = np.asarray(slope if isinstance(slope, list) else [slope or 1.0] * n, np.float32)
        inters = np.asarray(
            intercept if isinstance(intercept, list) else [intercept or 0.0] * n, np.float32
        )
        if z is not None:
            return np.asarray(out * slopes[z] + inters[z], dtype=np.float32)
        first = offset[0] if offset is not None else 0
        rows = slice(first, first + image.shape[0])
        shape = (-1,) + (1,) * (image.ndim - 1)
        s, i = slopes[rows], inters[rows]
        if len(s) < image.shape[0]:  # padding beyond the volume: its last slice's values
            s = np.pad(s, (0, image.shape[0] - len(s)), mode="edge")
            i = np.pad(i, (0, image.shape[0] - len(i)), mode="edge")
        return out * s.reshape(shape) + i.reshape(shape)
    if slope not in (None, 1, 1.0):
        out *= np.float32(slope)
    if intercept not in (None, 0, 0.0):
        out += np.float32(intercept)
    return out


def _read_manifest(store: StoreReader, export: object) -> pl.DataFrame:
    import polars as pl

    from storage.errors import StorageError

    try:
        data = store.read_bytes(_MANIFEST)
    except StorageError as exc:
        raise ConfigError(
            f"{export}: no {_MANIFEST} (is it an imgindex export? make one with "
            f"imgindex export SELECTION --root ROOT --out OUT.zarr): {exc}"
        ) from exc
    return pl.read_parquet(io.BytesIO(bytes(data)))


def _label_columns(
    manifest: pl.DataFrame, labels: Sequence[str] | None, export: object
) -> list[str]:
    from pydicom.datadict import keyword_dict

    from imgindex.deid import SAFE_ATTRIBUTES

    if labels is not None:
        missing = [c for c in labels if c not in manifest.columns]
        if missing:
            raise ConfigError(
                f"{export}: no manifest column {', '.join(missing)}; "
                f"the columns are {', '.join(manifest.columns)}"
            )
        return list(labels)
    return [
        c
        for c in manifest.columns
        if c not in _DESCRIPTION
        and c not in SAFE_ATTRIBUTES
        and (c not in keyword_dict or c == "PatientID")  # the pseudonym: split by patient
        and c not in ("person_id", "rescale_per_slice")
    ]


def _array(row: Mapping[str, Any], labels: Sequence[str]) -> _Array:
    spacing = row.get("spacing")
    return _Array(
        key=str(row["key"]),
        shape=tuple(int(n) for n in row["shape"]),
        spacing=tuple(float(v) for v in spacing) if spacing is not None else None,
        labels={c: row.get(c) for c in labels},
        slope=_number(row.get("RescaleSlope")),
        intercept=_number(row.get("RescaleIntercept")),
    )


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, list):
        return None
    number = float(value)
    return None if math.isnan(number) else number


class EpochSampler:
    """Reproducible epochs: a permutation of ``range(len(dataset))`` drawn from
    ``(seed, epoch)`` (or the identity with ``shuffle=False``), for
    ``DataLoader(dataset, sampler=EpochSampler(dataset, seed=7))``. Call :meth:`set_epoch`
    each epoch; it sets the dataset's epoch too, so patch positions follow.
    """

    def __init__(self, dataset: SeriesDataset, *, shuffle: bool = True, seed: int = 0) -> None:
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order (and the dataset's patches for it)."""
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if not self.shuffle:
            return iter(range(n))
        order = np.random.default_rng((self.seed, self.epoch)).permutation(n)
        return iter(int(i) for i in order)
