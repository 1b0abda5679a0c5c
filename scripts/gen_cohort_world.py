"""Write a seeded synthetic OMOP CDM EMR and the index series that link to it.

Usage::

    python scripts/gen_cohort_world.py ROOT [--persons 2000] [--series-per-person 10]
        [--conditions N] [--procedures N] [--seed 0] [--order date|random|as_is] [--csv DIR]

A thin CLI over :func:`imgindex.testing.omop.generate_world`: the EMR goes to ``ROOT/emr/<table>``
and the series to ``ROOT/tables/series`` as Delta tables (``imgindex.index.Index(ROOT).series``
reads them); with ``--csv DIR`` the EMR also goes to ``DIR`` as OHDSI-named CSV files
(``PERSON.csv``, ``CONDITION_OCCURRENCE.csv``...) for ``imgindex emr import``. The same seed and
sizes give the same rows. A summary goes to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from imgindex.testing.omop import (
    generate_world,
    write_omop_csv,
    write_omop_tables,
    write_series_index,
)

if TYPE_CHECKING:
    from collections.abc import Sequence


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser (a function of its own so tests can call it)."""
    parser = argparse.ArgumentParser(
        prog="gen_cohort_world.py",
        description="Write a synthetic OMOP EMR and matching index series under ROOT.",
    )
    parser.add_argument("root", type=Path, metavar="ROOT", help="catalog root to write into")
    parser.add_argument("--persons", type=_positive_int, default=2000, help="patients")
    parser.add_argument(
        "--series-per-person", type=float, default=10, help="series per patient on average"
    )
    parser.add_argument("--conditions", type=_positive_int, help="condition rows (2 per person)")
    parser.add_argument("--procedures", type=_positive_int, help="procedure rows (2 per person)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument(
        "--order",
        choices=("date", "random", "as_is"),
        default="date",
        help="row order of the series table (default: by imaging date)",
    )
    parser.add_argument(
        "--csv", type=Path, metavar="DIR", help="also write the EMR as OHDSI CSV files to DIR"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        world = generate_world(
            args.persons,
            seed=args.seed,
            series_per_person=args.series_per_person,
            conditions=args.conditions,
            procedures=args.procedures,
        )
    except ValueError as exc:
        print(f"gen_cohort_world.py: error: {exc}", file=sys.stderr)
        return 2
    generated = time.perf_counter()
    write_omop_tables(world.omop, args.root)
    write_series_index(world.series, args.root, order=args.order, seed=args.seed)
    if args.csv is not None:
        write_omop_csv(world.omop, args.csv)
    rows = ", ".join(f"{name} {table.num_rows:,}" for name, table in world.omop.items())
    print(
        f"{args.root}: {world.series.num_rows:,} series; {rows}; "
        f"{world.planted.num_rows:,} persons in the planted MI cluster; generated in "
        f"{generated - started:.1f} s, written in {time.perf_counter() - generated:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
