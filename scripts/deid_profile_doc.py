"""Write the de-identification profile tables into ``docs/deid.md`` from the data files.

Usage::

    python scripts/deid_profile_doc.py [--check]

Reads ``imgindex/deid/ps3_15_e1_1.csv`` (DICOM PS3.15 Table E.1-1, an action per tag) and
``imgindex/deid/safe_private.csv`` (PS3.15 Table E.3.10-1, the safe private attributes) and
rewrites the text between ``<!-- profile-table:start -->`` and ``<!-- profile-table:end -->``,
and between ``<!-- safe-private:start -->`` and ``<!-- safe-private:end -->``, in
``docs/deid.md``. The rest of the page is left as it is. With ``--check`` nothing is written:
the exit status is 1 when the page differs from what would be written.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

#: Repository root.
REPO: Final = Path(__file__).resolve().parents[1]
PROFILE_CSV: Final = REPO / "imgindex" / "deid" / "ps3_15_e1_1.csv"
SAFE_PRIVATE_CSV: Final = REPO / "imgindex" / "deid" / "safe_private.csv"
DOC: Final = REPO / "docs" / "deid.md"

PROFILE_MARKERS: Final = ("<!-- profile-table:start -->", "<!-- profile-table:end -->")
SAFE_PRIVATE_MARKERS: Final = ("<!-- safe-private:start -->", "<!-- safe-private:end -->")

#: The tag token of the Standard's row "(gggg,eeee) where gggg is odd".
PRIVATE_TOKEN: Final = "ggggeeee"

#: Option columns shown together in the "Other options" cell, with their labels.
OTHER_OPTIONS: Final = (
    ("safe_private", "Safe private"),
    ("uids", "UIDs"),
    ("device", "Device identity"),
    ("institution", "Institution identity"),
    ("full_dates", "Full dates"),
    ("structured", "Structured content"),
    ("graphics", "Graphics"),
)

PROFILE_HEADER: Final = (
    "| Tag | Attribute | Keyword | Basic | Dates (modified) | Patient chars "
    "| Clean descriptors | Other options |"
)


def read_rows(path: Path) -> list[dict[str, str]]:
    """The data rows of a CSV file whose leading lines may be ``#`` comments."""
    with path.open(encoding="utf-8", newline="") as f:
        lines = [line for line in f if not line.startswith("#")]
    return list(csv.DictReader(lines))


def format_tag(tag: str) -> str:
    """``00080050`` as ``(0008,0050)``; wildcard positions stay ``x`` as in the Standard."""
    if tag == PRIVATE_TOKEN:
        return "(gggg,eeee) where gggg is odd"
    return f"({tag[:4]},{tag[4:]})"


def cell(text: str) -> str:
    """Text made safe for a Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")


def profile_table(rows: Iterable[dict[str, str]]) -> list[str]:
    """The Markdown table of Table E.1-1, one line per row."""
    lines = [PROFILE_HEADER, "|" + " --- |" * PROFILE_HEADER.count(" | ") + " --- |"]
    for row in rows:
        others = "; ".join(
            f"{label} {cell(row[column])}" for column, label in OTHER_OPTIONS if row[column]
        )
        keyword = f"`{row['keyword']}`" if row["keyword"] else ""
        cells = (
            format_tag(row["tag"]),
            cell(row["name"]),
            keyword,
            cell(row["basic"]),
            cell(row["modified_dates"]),
            cell(row["characteristics"]),
            cell(row["descriptors"]),
            others,
        )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def safe_private_table(rows: Sequence[dict[str, str]]) -> list[str]:
    """The Markdown table of the safe private attributes, or a sentence when there are none."""
    if not rows:
        return [
            (
                "The list is empty: no safe private attribute is kept yet, so the Retain Safe "
                "Private Option keeps nothing (`imgindex/deid/safe_private.csv`)."
            )
        ]
    lines = [
        "| Private Creator | Tag | VR | Attribute | Source |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        tag = f"({row['group'].upper()},xx{row['element'].upper()})"
        lines.append(
            f"| {cell(row['creator'])} | {tag} | {cell(row['vr'])} | {cell(row['name'])} "
            f"| {cell(row['reason'])} |"
        )
    return lines


def replace_between(text: str, markers: tuple[str, str], body: Sequence[str]) -> str:
    """``text`` with the lines between the two marker lines replaced by ``body``."""
    start, end = markers
    lines = text.split("\n")
    try:
        i = lines.index(start)
        j = lines.index(end, i + 1)
    except ValueError:
        raise SystemExit(
            f"{DOC.relative_to(REPO)}: missing the marker lines {start} / {end}"
        ) from None
    return "\n".join([*lines[: i + 1], "", *body, "", *lines[j:]])


def render(doc: str) -> str:
    """The page with both generated sections rewritten from the data files."""
    doc = replace_between(doc, PROFILE_MARKERS, profile_table(read_rows(PROFILE_CSV)))
    return replace_between(
        doc, SAFE_PRIVATE_MARKERS, safe_private_table(read_rows(SAFE_PRIVATE_CSV))
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if docs/deid.md is not up to date"
    )
    args = parser.parse_args(argv)
    current = DOC.read_text(encoding="utf-8")
    wanted = render(current)
    if args.check:
        if current != wanted:
            print(
                "docs/deid.md is out of date: run python scripts/deid_profile_doc.py",
                file=sys.stderr,
            )
            return 1
        return 0
    if current != wanted:
        DOC.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
