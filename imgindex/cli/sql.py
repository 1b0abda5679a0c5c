"""``imgindex sql "SELECT ..." --root ROOT``: DuckDB SQL over the index tables."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv

from imgindex.cli._common import add_root, settings_from
from imgindex.errors import ImgindexError
from imgindex.index import TABLE_NAMES, Index

if TYPE_CHECKING:
    import argparse


def add_parser(sub: Any) -> None:
    """Register the subcommand."""
    parser = sub.add_parser(
        "sql",
        help="run DuckDB SQL over the index",
        description="Run a DuckDB SQL query over the tables "
        + ", ".join(TABLE_NAMES)
        + ". Columns holding DICOM attributes use the Standard's keywords (StudyDate, "
        "Modality, ...).",
    )
    parser.add_argument("query", help='e.g. "SELECT Modality, count(*) FROM series GROUP BY 1"')
    add_root(parser)
    parser.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="output format (default table; json is one object per line)",
    )
    parser.add_argument(
        "--max-rows", type=int, default=40, help="rows shown by --format table (default 40)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the query and print the result."""
    settings = settings_from(args)
    index = Index(settings.root, settings.attributes)
    try:
        result = index.sql(args.query)
    except duckdb.Error as exc:
        raise ImgindexError(f"query failed: {exc}") from exc
    write_result(result, args.format, args.max_rows)
    return 0


def write_result(result: pa.Table, fmt: str, max_rows: int) -> None:
    """Print ``result`` to stdout in ``fmt``."""
    out = sys.stdout
    if fmt == "csv":
        sink = pa.BufferOutputStream()
        pacsv.write_csv(_stringify_nested(result), sink)
        out.write(sink.getvalue().to_pybytes().decode("utf-8"))
    elif fmt == "json":
        for row in result.to_pylist():
            out.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")
    else:
        con = duckdb.connect()
        try:
            con.register("result", result)
            out.write(str(con.sql(f"SELECT * FROM result LIMIT {int(max_rows)}")))
        finally:
            con.close()
        if result.num_rows > max_rows:
            out.write(f"({result.num_rows:,} rows; {max_rows} shown, use --format csv for all)\n")


def _stringify_nested(table: pa.Table) -> pa.Table:
    """CSV has no lists: write list columns as DICOM-style backslash-joined text."""
    columns = []
    for column in table.columns:
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            values = [
                None if v is None else "\\".join(str(x) for x in v) for v in column.to_pylist()
            ]
            columns.append(pa.array(values, pa.string()))
        else:
            columns.append(column)
    return pa.table(columns, names=table.column_names)
