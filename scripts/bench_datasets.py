"""Benchmark :class:`imgindex.datasets.SeriesDataset` against a raw memmap and pydicom.

Usage::

    python scripts/bench_datasets.py [--quick] [--repeat 3] [--slices 2000] [--patches 500]
        [--workers 2] [--data /tmp/bench-datasets-data] [--json PATH]

The data (generated once, cached under ``--data`` keyed by its parameters): uncompressed CT
series of 512x512 int16 slices (:func:`imgindex.testing.write_ct_series`: the generator's
phantom, not zeros), 100 to 200 slices a series, indexed with ``imgindex index-files`` and
exported twice with :func:`imgindex.export.export`: ``compressor="none"`` (the goal's
uncompressed export) and the default (blosc-lz4). For reference (a), each array's voxels are
written to a raw file in the same order (C order, little-endian int16), read through
``numpy.memmap``; for reference (b), each array slice's original DICOM file (matched by
sorting the series along its slice normal and checked voxel for voxel) is read with
``pydicom.dcmread(path).pixel_array``.

Workloads, the same seeded sequence for every contender:

* ``slice``: random slices of random arrays (``SeriesDataset(sample="slice")`` indices drawn
  with replacement);
* ``patch 32x128x128`` and ``patch 64x64x64``: ``SeriesDataset(sample="patch")`` items in an
  :class:`~imgindex.datasets.EpochSampler` order; the boxes the dataset draws are the boxes
  every other contender reads.

Contenders: ``SeriesDataset`` over each export, a dataset of ``numpy.array(memmap[box])``
(the same bytes, materialised), and a dataset of ``pydicom.dcmread(file).pixel_array`` (a
patch reads its slices' files and crops them; only the first ``--pydicom-patches`` patches,
it is slow). Each runs with 0 workers (a plain loop over the indices in this process) and
with ``--workers`` workers (``torch.utils.data.DataLoader(batch_size=8,
persistent_workers=True)`` over the same indices, the batch's images stacked by
``default_collate`` in the worker, in shared memory). The page cache is warm: every file is read
once first, and each contender makes one untimed pass before ``--repeat`` timed ones, whose
median counts. Items/s and MB/s (10^6 bytes of voxels delivered) go to stdout as Markdown,
with the ratios and the goals: SeriesDataset over the uncompressed export at least 0.8x the
memmap (same workers) and at least 10x pydicom.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from _bench import available_cpus, git_revision

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    import numpy.typing as npt

#: The repository.
ROOT: Final = Path(__file__).resolve().parent.parent
#: Rows and columns of every slice.
SIZE: Final = 512
#: Patch shapes of the patch workloads.
PATCHES: Final = ((32, 128, 128), (64, 64, 64))
#: Goals: SeriesDataset (uncompressed export) / memmap, and / pydicom.
GOAL_MEMMAP: Final = 0.8
GOAL_PYDICOM: Final = 10.0
#: Bumped when the generated data changes; a cache of another version is made again.
VERSION: Final = 1
MARKER: Final = "bench_datasets.json"
_READ_CHUNK: Final = 1 << 22


class BenchError(RuntimeError):
    """A setup step failed."""


# --- arguments ---------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser."""
    parser = argparse.ArgumentParser(
        prog="bench_datasets.py",
        description="Slices/s and patches/s through SeriesDataset beside a raw numpy.memmap "
        "of the same voxels and pydicom reading the original files.",
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--series", type=_positive_int, help="series to generate (default 8)")
    parser.add_argument("--repeat", type=_positive_int, default=3, help="timed passes (median)")
    parser.add_argument("--slices", type=_positive_int, help="slices per pass (default 2000)")
    parser.add_argument("--patches", type=_positive_int, help="patches per pass (default 500)")
    parser.add_argument(
        "--pydicom-slices", type=_positive_int, help="slices per pydicom pass (default --slices)"
    )
    parser.add_argument(
        "--pydicom-patches", type=_positive_int, help="patches per pydicom pass (default 25)"
    )
    parser.add_argument("--workers", type=_positive_int, default=2, help="DataLoader workers")
    parser.add_argument("--seed", type=int, default=7, help="seed of the sequences")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("/tmp/bench-datasets-data"),
        metavar="DIR",
        help="cache of the generated data (default /tmp/bench-datasets-data)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    return parser


# --- data --------------------------------------------------------------------------------------


def slices_of(number: int, quick: bool) -> int:
    """Slices of series ``number``: 100 to 200, all different (64 to 84 with --quick)."""
    return 64 + (number * 7) % 21 if quick else 100 + (number * 37) % 101


@dataclass
class Volume:
    """One exported array and its references."""

    key: str
    shape: tuple[int, ...]
    raw: Path  # the voxels in C order, for numpy.memmap
    files: list[Path]  # the DICOM file of each slice, in the array's order


@dataclass
class Data:
    """The generated, indexed and exported data."""

    directory: Path
    series: int
    slices: int
    dicom_bytes: int
    exports: dict[str, Path]  # compressor -> export folder
    volumes: list[Volume]  # in the manifest's order


def _run(command: Sequence[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(
            f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )


def _sorted_files(folder: Path) -> list[Path]:
    """The series' files sorted along its slice normal."""
    import pydicom

    keyed = []
    for path in folder.iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        row, col = np.asarray(ds.ImageOrientationPatient[:3]), ds.ImageOrientationPatient[3:]
        normal = np.cross(row, np.asarray(col))
        keyed.append((float(np.dot(normal, np.asarray(ds.ImagePositionPatient))), path))
    return [p for _pos, p in sorted(keyed)]


def _match(volumes: dict[str, npt.NDArray[Any]], series: list[list[Path]]) -> dict[str, list[Path]]:
    """Each array's files in its order, checked voxel for voxel on three slices."""
    import pydicom

    found: dict[str, list[Path]] = {}
    for files in series:
        for key, volume in volumes.items():
            if key in found or volume.shape[0] != len(files):
                continue
            for order in (files, files[::-1]):
                probe = (0, len(order) // 2, len(order) - 1)
                if all(
                    np.array_equal(pydicom.dcmread(order[z]).pixel_array, volume[z]) for z in probe
                ):
                    found[key] = order
                    break
            if key in found:
                break
        else:
            continue
    if len(found) != len(volumes):
        raise BenchError(f"matched {len(found)} of {len(volumes)} arrays to their DICOM files")
    return found


def prepare(args: argparse.Namespace) -> Data:
    """Generate, index, export and write the raw files (or reuse the cache)."""
    from imgindex.datasets import SeriesDataset
    from imgindex.testing.hospital import write_ct_series

    n_series = args.series or (2 if args.quick else 8)
    params = {"version": VERSION, "size": SIZE, "series": n_series, "quick": bool(args.quick)}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    directory = args.data / f"ct-{n_series}-{'quick' if args.quick else 'full'}-{digest}"
    marker = directory / MARKER
    if not marker.exists():
        if directory.exists():
            shutil.rmtree(directory)
        started = time.perf_counter()
        print(f"generating {n_series} series in {directory}...", file=sys.stderr)
        for number in range(n_series):
            write_ct_series(
                directory / "dicom" / f"s{number:02d}",
                seed=1000 + number,
                n_slices=slices_of(number, args.quick),
                size=SIZE,
            )
        root = directory / "root"
        _run(
            [
                str(ROOT / ".venv/bin/imgindex"),
                "index-files",
                str(directory / "dicom"),
                *("--root", str(root), "--no-progress"),
            ]
        )
        from imgindex.export import export
        from imgindex.index import Index

        uids = Index(root).series.select("SeriesInstanceUID").collect()["SeriesInstanceUID"]
        selection = directory / "selection.txt"
        selection.write_text("".join(f"{u}\n" for u in sorted(uids)))
        for name, compressor in (("none", "none"), ("blosc-lz4", "blosc-lz4")):
            summary = export(
                selection, root, directory / f"export-{name}.zarr", compressor=compressor
            )
            if not summary.ok or summary.arrays != n_series:
                raise BenchError(f"export {name}: {summary.describe()}")
        reference = SeriesDataset(directory / "export-none.zarr")
        volumes: dict[str, npt.NDArray[Any]] = {}
        (directory / "raw").mkdir()
        entries = []
        for number in range(len(reference.arrays)):
            item = reference[number]
            volumes[item["key"]] = item["image"]
            raw = directory / "raw" / f"{number:02d}.raw"
            np.ascontiguousarray(item["image"]).astype("<i2", copy=False).tofile(raw)
            entries.append(
                {"key": item["key"], "shape": list(item["image"].shape), "raw": raw.name}
            )
        folders = sorted((directory / "dicom").iterdir())
        matched = _match(volumes, [_sorted_files(f) for f in folders])
        for entry in entries:
            entry["files"] = [str(p.relative_to(directory)) for p in matched[str(entry["key"])]]
        marker.write_text(
            json.dumps(
                {**params, "seconds": round(time.perf_counter() - started, 1), "arrays": entries},
                indent=1,
            )
        )
        print(f"  done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    meta = json.loads(marker.read_text())
    volumes_list = [
        Volume(
            e["key"],
            tuple(e["shape"]),
            directory / "raw" / e["raw"],
            [directory / f for f in e["files"]],
        )
        for e in meta["arrays"]
    ]
    dicom_bytes = sum(p.stat().st_size for v in volumes_list for p in v.files)
    return Data(
        directory,
        len(volumes_list),
        sum(v.shape[0] for v in volumes_list),
        dicom_bytes,
        {c: directory / f"export-{c}.zarr" for c in ("none", "blosc-lz4")},
        volumes_list,
    )


def warm(paths: Iterable[Path]) -> int:
    """Read every file once (into the page cache); return the bytes read."""
    total = 0
    buffer = bytearray(_READ_CHUNK)
    for path in paths:
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total


def _files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()]


# --- contenders --------------------------------------------------------------------------------

#: What an item of the reference datasets reads: (array number, box of slices) or a slice z.
Box = tuple[int, tuple[int | slice, ...]]


class MemmapDataset:
    """``numpy.array(memmap[box])`` for each item: the same bytes as SeriesDataset delivers."""

    def __init__(self, volumes: Sequence[Volume], items: Sequence[Box]) -> None:
        self.volumes = list(volumes)
        self.items = list(items)
        self._maps: dict[int, np.memmap[Any, np.dtype[np.int16]]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict[str, Any]:
        return {"volumes": self.volumes, "items": self.items, "_maps": {}}

    def __getitem__(self, index: int) -> npt.NDArray[Any]:
        number, box = self.items[index]
        mm = self._maps.get(number)
        if mm is None:
            volume = self.volumes[number]
            mm = self._maps[number] = np.memmap(
                volume.raw, dtype="<i2", mode="r", shape=volume.shape
            )
        return np.array(mm[box])


class DicomDataset:
    """``pydicom.dcmread(file).pixel_array`` of each slice of an item's box, cropped."""

    def __init__(self, volumes: Sequence[Volume], items: Sequence[Box]) -> None:
        self.volumes = list(volumes)
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> npt.NDArray[Any]:
        import pydicom

        number, box = self.items[index]
        files = self.volumes[number].files
        zs, rest = box[0], box[1:]
        if isinstance(zs, int):  # a slice
            return np.asarray(pydicom.dcmread(files[zs]).pixel_array)
        planes = [pydicom.dcmread(files[z]).pixel_array[rest] for z in range(zs.start, zs.stop)]
        return np.stack(planes)


def _image(item: Any) -> Any:
    return item["image"] if isinstance(item, dict) else item


def _nbytes(image: Any) -> int:
    return (
        int(image.nbytes) if hasattr(image, "nbytes") else int(image.numel() * image.element_size())
    )


@dataclass
class Case:
    """One contender on one workload with some workers: its timed passes."""

    workload: str
    contender: str
    workers: int
    items: int
    seconds: list[float] = field(default_factory=list)
    nbytes: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def per_s(self) -> float:
        return self.items / self.median

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / 1e6 / self.median


def _passes(
    case: Case,
    make_iter: Callable[[], Iterable[Any]],
    repeat: int,
    check: int,
    *,
    batched: bool = False,
) -> list[float]:
    """One untimed pass then ``repeat`` timed ones; each must deliver ``check`` bytes."""
    for number in range(repeat + 1):
        started = time.perf_counter()
        total = count = 0
        for item in make_iter():
            image = _image(item)
            total += _nbytes(image)
            count += len(image) if batched else 1
        seconds = time.perf_counter() - started
        if count != case.items or total != check:
            raise BenchError(
                f"{case.contender} on {case.workload}: {count} items of {total:,} bytes, "
                f"expected {case.items} of {check:,}"
            )
        if number:
            case.seconds.append(seconds)
    case.nbytes = check
    print(
        f"  {case.workload:<18} {case.contender:<26} {case.workers} workers: "
        f"{case.per_s:,.0f} items/s, {case.mb_per_s:,.0f} MB/s",
        file=sys.stderr,
    )
    return case.seconds


def collate_images(batch: list[Any]) -> Any:
    """The batch's images stacked in one tensor (in shared memory, made in the worker)."""
    from torch.utils.data import default_collate

    return default_collate([_image(item) for item in batch])


def measure(
    case: Case,
    dataset: Any,
    indices: Sequence[int],
    repeat: int,
    check: int,
    batch_size: int = 8,
) -> None:
    """Time ``dataset[i] for i in indices``, in this process or through a DataLoader."""
    if case.workers == 0:
        _passes(case, lambda: (dataset[i] for i in indices), repeat, check)
        return
    from torch.utils.data import DataLoader

    loader: DataLoader[Any] = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=list(indices),
        num_workers=case.workers,
        persistent_workers=True,
        collate_fn=collate_images,
        drop_last=False,
    )
    # The loader's workers end with it, on return.
    _passes(case, lambda: iter(loader), repeat, check, batched=True)


# --- the run -----------------------------------------------------------------------------------


def _workloads(
    args: argparse.Namespace, data: Data
) -> list[tuple[str, dict[str, Any], list[int], list[Box]]]:
    """Each workload: its name, SeriesDataset options, indices and the boxes they read."""
    from imgindex.datasets import EpochSampler, SeriesDataset

    rng = np.random.default_rng(args.seed)
    n_slices = args.slices or (300 if args.quick else 2000)
    n_patches = args.patches or (100 if args.quick else 500)
    ends = np.cumsum([v.shape[0] for v in data.volumes])
    indices = [int(i) for i in rng.integers(0, int(ends[-1]), n_slices)]
    boxes: list[Box] = []
    for i in indices:
        number = int(np.searchsorted(ends, i, side="right"))
        z = i - (int(ends[number - 1]) if number else 0)
        boxes.append((number, (z,)))
    result = [("slice", {"sample": "slice"}, indices, boxes)]
    keys = {v.key: n for n, v in enumerate(data.volumes)}
    for size in PATCHES:
        options = {
            "sample": "patch",
            "patch_size": size,
            "patches_per_volume": -(-n_patches // len(data.volumes)),
            "seed": args.seed,
        }
        ds = SeriesDataset(data.exports["none"], labels=[], **options)
        order = list(EpochSampler(ds, seed=args.seed))[:n_patches]
        boxes = []
        for i in order:
            item = ds[i]
            box = tuple(slice(o, o + s) for o, s in zip(item["offset"], size, strict=True))
            boxes.append((keys[item["key"]], box))
        result.append(("patch " + "x".join(map(str, size)), options, order, boxes))
    return result


def _box_bytes(data: Data, box: Box) -> int:
    """Bytes of voxels the box reads (int16)."""
    number, selection = box
    shape = data.volumes[number].shape
    count = 1
    for dim, n in enumerate(shape):
        item = selection[dim] if dim < len(selection) else slice(None)
        count *= len(range(*item.indices(n))) if isinstance(item, slice) else 1
    return 2 * count


def run(args: argparse.Namespace) -> tuple[Data, list[Case], dict[str, Any]]:
    """Prepare the data and time every contender."""
    import pydicom
    import torch

    from imgindex.datasets import SeriesDataset

    data = prepare(args)
    print(
        f"data: {data.series} arrays, {data.slices:,} slices, {data.dicom_bytes / 1e6:,.0f} MB "
        f"of DICOM in {data.directory}",
        file=sys.stderr,
    )
    workloads = _workloads(args, data)
    started = time.perf_counter()
    warmed = warm(
        [v.raw for v in data.volumes]
        + [p for v in data.volumes for p in v.files]
        + [p for e in data.exports.values() for p in _files(e)]
    )
    print(
        f"page cache warmed: {warmed / 1e6:,.0f} MB in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    torch.set_num_threads(1)
    cases: list[Case] = []
    for workload, options, indices, boxes in workloads:
        check = sum(_box_bytes(data, box) for box in boxes)
        if workload == "slice":
            n_dicom = args.pydicom_slices or len(boxes)
        else:
            n_dicom = args.pydicom_patches or (10 if args.quick else 25)
        n_dicom = min(n_dicom, len(boxes))
        dicom_check = sum(_box_bytes(data, box) for box in boxes[:n_dicom])
        for workers in (0, args.workers):
            for compressor in ("none", "blosc-lz4"):
                ds = SeriesDataset(data.exports[compressor], labels=[], **options)
                case = Case(workload, f"SeriesDataset ({compressor})", workers, len(indices))
                measure(case, ds, indices, args.repeat, check)
                cases.append(case)
            case = Case(workload, "numpy.memmap", workers, len(boxes))
            measure(case, MemmapDataset(data.volumes, boxes), range(len(boxes)), args.repeat, check)
            cases.append(case)
            case = Case(workload, "pydicom", workers, n_dicom)
            measure(
                case,
                DicomDataset(data.volumes, boxes[:n_dicom]),
                range(n_dicom),
                args.repeat,
                dicom_check,
            )
            cases.append(case)
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": available_cpus(),
        "git": git_revision(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "pydicom": pydicom.__version__,
        "command": " ".join(["python", *sys.argv]),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return data, cases, meta


# --- the report --------------------------------------------------------------------------------


def _find(cases: Sequence[Case], workload: str, contender: str, workers: int) -> Case | None:
    for case in cases:
        if (case.workload, case.contender, case.workers) == (workload, contender, workers):
            return case
    return None


def ratios(cases: Sequence[Case], workers: int) -> list[dict[str, Any]]:
    """SeriesDataset / memmap and / pydicom, by workload and workers."""
    rows: list[dict[str, Any]] = []
    for workload in dict.fromkeys(c.workload for c in cases):
        for compressor in ("none", "blosc-lz4"):
            for reference, goal in (("numpy.memmap", GOAL_MEMMAP), ("pydicom", GOAL_PYDICOM)):
                for n in (0, workers):
                    ours = _find(cases, workload, f"SeriesDataset ({compressor})", n)
                    theirs = _find(cases, workload, reference, n)
                    if ours is None or theirs is None:
                        continue
                    value = ours.per_s / theirs.per_s
                    has_goal = compressor == "none"
                    rows.append(
                        {
                            "workload": workload,
                            "ours": ours.contender,
                            "reference": reference,
                            "workers": n,
                            "ratio": value,
                            "goal": goal if has_goal else None,
                            "met": value >= goal if has_goal else None,
                        }
                    )
    return rows


def format_report(
    data: Data,
    cases: Sequence[Case],
    rows: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    repeat: int,
) -> str:
    """The Markdown report."""
    lines = [
        f"# SeriesDataset read rates ({meta['date']})",
        "",
        (
            f"Command: `{meta['command']}` (git {meta['git']}); {meta['cpus']} CPUs, "
            f"Python {meta['python']}, numpy {meta['numpy']}, torch {meta['torch']}, "
            f"pydicom {meta['pydicom']}."
        ),
        (
            f"Data: {data.series} CT arrays of 512x512 int16, {data.slices:,} slices "
            f"({data.slices * SIZE * SIZE * 2 / 1e6:,.0f} MB of voxels, "
            f"{data.dicom_bytes / 1e6:,.0f} MB of DICOM), exported uncompressed and "
            f"blosc-lz4. Warm page cache; median of {repeat} passes after one untimed pass."
        ),
        "",
        "| workload | contender | workers | items | items/s | MB/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for case in cases:
        lines.append(
            f"| {case.workload} | {case.contender} | {case.workers} | {case.items:,} | "
            f"{case.per_s:,.0f} | {case.mb_per_s:,.0f} |"
        )
    lines += [
        "",
        "| workload | ratio | workers | value | goal | met |",
        "|---|---|---:|---:|---|---|",
    ]
    for row in rows:
        goal = f">= {row['goal']:g}" if row["goal"] is not None else ""
        met = "" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append(
            f"| {row['workload']} | {row['ours']} / {row['reference']} | {row['workers']} | "
            f"{row['ratio']:,.2f} | {goal} | {met} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status (1 if a goal is not met or it failed)."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        args.data.mkdir(parents=True, exist_ok=True)
        data, cases, meta = run(args)
    except (BenchError, OSError) as exc:
        print(f"bench_datasets.py: error: {exc}", file=sys.stderr)
        return 1
    rows = ratios(cases, args.workers)
    print(format_report(data, cases, rows, meta, args.repeat))
    if args.json is not None:
        figures = {
            "meta": meta,
            "cases": [
                {**c.__dict__, "median": c.median, "per_s": c.per_s, "mb_per_s": c.mb_per_s}
                for c in cases
            ],
            "ratios": rows,
        }
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if all(r["met"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
