"""The ``imgindex`` command: one module per subcommand, a parser tests can build."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from imgindex.cli import (
    cohort,
    crawl,
    deid_check,
    demo,
    emr,
    export,
    index_files,
    listen,
    optimize,
    serve,
    sql,
    status,
)
from imgindex.errors import ImgindexError
from storage.errors import StorageError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["build_parser", "main"]

logger = logging.getLogger("imgindex")

_COMMANDS = (
    index_files,
    listen,
    crawl,
    sql,
    optimize,
    status,
    emr,
    cohort,
    export,
    deid_check,
    serve,
    demo,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``imgindex`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="imgindex",
        description="Index DICOM metadata into tables you can query, join and export.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``imgindex``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        status: int = args.run(args)
    except (ImgindexError, StorageError, OSError) as exc:
        if args.debug:
            raise
        print(f"imgindex {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"imgindex {args.command}: interrupted", file=sys.stderr)
        return 130
    return status
