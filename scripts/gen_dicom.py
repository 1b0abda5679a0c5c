"""Write a seeded, hospital-export-like tree of DICOM files of a given size.

Usage::

    python scripts/gen_dicom.py OUT --size 200MB [--seed 0] [--workers N] [--ct-size 512]

A thin CLI over :func:`imgindex.testing.write_hospital`; the same seed and options
give byte-identical files. The summary goes to stdout, the progress bar to stderr.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import TYPE_CHECKING, Final

from pydicom.uid import UID

from imgindex.testing import write_hospital

if TYPE_CHECKING:
    from collections.abc import Sequence

    from imgindex.testing import HospitalSummary

#: Size suffixes: decimal (KB = 1000 bytes) and binary (KiB = 1024 bytes).
SIZE_UNITS: Final = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}
_SIZE_PATTERN: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """Return the number of bytes `text` names, such as ``"200MB"`` or ``"1.5GiB"``.

    Parameters
    ----------
    text : str
        A number with an optional suffix from :data:`SIZE_UNITS` (any case).

    Returns
    -------
    int
        Bytes, at least 1.

    Raises
    ------
    argparse.ArgumentTypeError
        If `text` is not a size.
    """
    match = _SIZE_PATTERN.match(text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: use a number with KB, MB, GB or TB (or KiB...), e.g. 200MB"
        )
    size = int(float(match.group(1)) * SIZE_UNITS[unit])
    if size < 1:
        raise argparse.ArgumentTypeError(f"size must be at least 1 byte, not {text!r}")
    return size


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser (a function of its own so tests can call it)."""
    parser = argparse.ArgumentParser(
        prog="gen_dicom.py",
        description="Write a seeded, hospital-export-like tree of DICOM files.",
    )
    parser.add_argument("out", help="output directory (created; must be empty)")
    parser.add_argument(
        "--size", required=True, type=parse_size, help="total size to write, e.g. 200MB or 2GB"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the tree (default 0)")
    parser.add_argument(
        "--workers", type=_positive_int, default=1, help="parallel writer processes (default 1)"
    )
    parser.add_argument(
        "--ct-size",
        type=_positive_int,
        default=512,
        help="rows and columns of CT/MR slices (default 512)",
    )
    parser.add_argument(
        "--compressed-fraction",
        type=float,
        default=0.1,
        help="share of series written RLE or JPEG 2000 Lossless (default 0.1)",
    )
    parser.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    return parser


def format_summary(summary: HospitalSummary, seconds: float) -> str:
    """Return the summary as the lines the CLI prints."""
    lines = [
        f"out_dir: {summary.out_dir}",
        f"files: {summary.files}",
        f"bytes: {summary.bytes} ({summary.bytes / 1e6:.1f} MB)",
        f"patients: {summary.patients}",
        f"studies: {summary.studies}",
        f"series: {summary.series}",
        f"instances: {summary.instances}",
        "instances per modality: "
        + ", ".join(f"{k}={v}" for k, v in summary.instances_per_modality.items()),
        "instances per transfer syntax: "
        + ", ".join(f"{UID(k).name}={v}" for k, v in summary.instances_per_transfer_syntax.items()),
        f"seconds: {seconds:.1f} ({summary.bytes / 1e6 / max(seconds, 1e-9):.0f} MB/s)",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        summary = write_hospital(
            args.out,
            seed=args.seed,
            target_bytes=args.size,
            ct_size=args.ct_size,
            workers=args.workers,
            progress=args.progress,
            compressed_fraction=args.compressed_fraction,
        )
    except (ValueError, FileExistsError) as exc:
        print(f"gen_dicom.py: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
