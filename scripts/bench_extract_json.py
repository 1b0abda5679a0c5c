"""Benchmark DICOM JSON to ``instances`` rows: ``Extractor.extract_json`` against pydicom.

Usage::

    python scripts/bench_extract_json.py [--series 4] [--slices 100] [--repeat 5]

Generates ``--series`` CT series of ``--slices`` instances (:func:`imgindex.testing.make_series`,
series ``i`` with seed ``i``), turns each into DICOM JSON (PS3.18 Annex F) with
``Dataset.to_json_dict`` (Pixel Data as a BulkDataURI, as WADO-RS metadata sends it), and parses
one JSON array body back with :func:`json.loads`, as a crawler does. Then, on the same objects:

* ``extract_json``: ``Extractor().extract_json(obj, ...)``, the default attributes;
* ``Dataset.from_json``: pydicom's conversion to a Dataset (the reference), on the first
  ``--reference`` objects only, as it is two orders of magnitude slower;
* ``json.loads``: parsing the body itself, for scale.

Each contender runs ``--repeat`` times, interleaved, and its best time counts. The table goes
to stdout as Markdown.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom import Dataset

from imgindex.extract import Extractor
from imgindex.testing import make_series

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

_BULK_URI = "http://localhost/dicomweb/bulk"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser (a function of its own so tests can call it)."""
    parser = argparse.ArgumentParser(
        prog="bench_extract_json.py",
        description="Time DICOM JSON to rows: extract_json vs pydicom's Dataset.from_json.",
    )
    parser.add_argument("--series", type=_positive_int, default=4, help="CT series (default 4)")
    parser.add_argument(
        "--slices", type=_positive_int, default=100, help="instances per series (default 100)"
    )
    parser.add_argument(
        "--reference",
        type=_positive_int,
        default=100,
        help="objects Dataset.from_json converts per run (default 100)",
    )
    parser.add_argument(
        "--repeat", type=_positive_int, default=5, help="runs per contender (default 5)"
    )
    return parser


def make_body(n_series: int, n_slices: int) -> str:
    """A WADO-RS metadata body: the JSON array of the generated instances."""
    objects = [
        ds.to_json_dict(bulk_data_threshold=64, bulk_data_element_handler=lambda _e: _BULK_URI)
        for seed in range(n_series)
        for ds in make_series(seed, n_instances=n_slices)
    ]
    return json.dumps(objects)


def best_seconds(run: Callable[[], object], repeat: int) -> list[float]:
    """Times of ``repeat`` runs of ``run``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    args = build_parser().parse_args(argv)
    body = make_body(args.series, args.slices)
    objects: list[dict[str, Any]] = json.loads(body)
    reference = objects[: args.reference]
    extractor = Extractor(source="bench")
    now = dt.datetime.now(dt.UTC)

    def run_extract_json() -> None:
        for obj in objects:
            result = extractor.extract_json(obj, location="bench", indexed_at=now)
            assert result.row is not None
            assert not result.rejects

    def run_from_json() -> None:
        for obj in reference:
            Dataset.from_json(obj, bulk_data_uri_handler=lambda _tag, _vr, _uri: b"")

    contenders: dict[str, tuple[Callable[[], object], int]] = {
        "extract_json": (run_extract_json, len(objects)),
        "Dataset.from_json": (run_from_json, len(reference)),
        "json.loads (the body)": (lambda: json.loads(body), len(objects)),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeat):  # interleaved, so a busy moment hits every contender
        for name, (run, _count) in contenders.items():
            times[name] += best_seconds(run, 1)
    rate = {name: count / min(times[name]) for name, (_run, count) in contenders.items()}

    print(
        f"# {dt.date.today().isoformat()}, {platform.node()}, Python "
        f"{platform.python_version()}, pydicom {pydicom.__version__}; {len(objects)} CT "
        f"instances, {len(extractor.attributes)} attributes, best of {args.repeat}"
    )
    print("| contender | instances/s | µs/instance |")
    print("|---|---:|---:|")
    for name, per_s in rate.items():
        print(f"| {name} | {per_s:,.0f} | {1e6 / per_s:,.1f} |")
    ratio = rate["extract_json"] / rate["Dataset.from_json"]
    print(f"\nextract_json / Dataset.from_json: {ratio:,.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
