"""The data files of the de-identification profile: DICOM PS3.15 Table E.1-1 and Table E.3.10-1.

``imgindex/deid/ps3_15_e1_1.csv`` is a transcription of the Standard's table; these tests check
its shape, its codes, and its tags and names against pydicom's data dictionary, which catches
transcription slips, and that ``docs/deid.md`` shows what the files hold.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.datadict import dictionary_description, dictionary_has_tag, keyword_for_tag

REPO = Path(__file__).resolve().parents[2]
PROFILE_CSV = REPO / "imgindex" / "deid" / "ps3_15_e1_1.csv"
SAFE_PRIVATE_CSV = REPO / "imgindex" / "deid" / "safe_private.csv"
DOC_SCRIPT = REPO / "scripts" / "deid_profile_doc.py"

HEADER = [
    "tag",
    "keyword",
    "name",
    "basic",
    "safe_private",
    "uids",
    "device",
    "institution",
    "characteristics",
    "full_dates",
    "modified_dates",
    "descriptors",
    "structured",
    "graphics",
]
OPTION_COLUMNS = HEADER[4:]

#: The number of entries (objects with an "id" key) in
#: innolitics/dicom-standard standard/confidentiality_profile_attributes.json at commit
#: 0d01bf11dfc1d0b73b6df85bbf6e1764d3c558a3 (85,354 characters), the source of the CSV.
ENTRY_COUNT = 460

#: The Standard's token for the row "(gggg,eeee) where gggg is odd".
PRIVATE_TOKEN = "ggggeeee"

#: An action code: D, Z, X, K, C, U or a slash combination, with the Standard's footnote "*".
CODE = re.compile(r"[DZXKCU](?:/[DZXKCU])*\*?")

#: The codes the source has in each column: a code outside these is a transcription slip.
BASIC_CODES = {"D", "U", "X", "Z", "X/D", "X/Z", "Z/D", "X/Z/D", "X/Z/U*"}
OPTION_CODES = {
    "safe_private": {"C"},
    # Referenced Patient Sequence (0008,1120) is X under the Retain UIDs Option.
    "uids": {"K", "X"},
    "device": {"K"},
    "institution": {"K"},
    "characteristics": {"K", "C"},
    "full_dates": {"K"},
    "modified_dates": {"C"},
    "descriptors": {"C"},
    "structured": {"C"},
    "graphics": {"C"},
}

#: Rows whose Standard name differs from pydicom's after normalisation, and why.
NAME_EXCEPTIONS = {
    # The table appends a note reference to the name: "Icon Image Sequence (see Note 12)".
    "00880200": "Icon Image Sequence",
}


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(line for line in f if not line.startswith("#"))
        rows = list(reader)
        return list(reader.fieldnames or []), rows


HEADER_READ, ROWS = _rows(PROFILE_CSV)
BY_TAG = {row["tag"]: row for row in ROWS}


def _is_wildcard(tag: str) -> bool:
    return tag == PRIVATE_TOKEN or "x" in tag


def _norm(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def test_header_and_row_count() -> None:
    assert HEADER_READ == HEADER
    assert len(ROWS) == ENTRY_COUNT


def test_tags_well_formed_unique_and_sorted() -> None:
    tags = [row["tag"] for row in ROWS]
    bad = [t for t in tags if t != PRIVATE_TOKEN and not re.fullmatch(r"[0-9A-Fx]{8}", t)]
    assert bad == []
    assert len(set(tags)) == len(tags)
    assert tags == sorted(tags)


def test_codes() -> None:
    basic = {row["basic"] for row in ROWS}
    assert all(CODE.fullmatch(code) for code in basic), basic
    assert basic == BASIC_CODES
    for column in OPTION_COLUMNS:
        codes = {row[column] for row in ROWS} - {""}
        assert all(CODE.fullmatch(code) for code in codes), (column, codes)
        assert codes == OPTION_CODES[column], column


def test_both_date_options_together() -> None:
    """Every row with a Retain Longitudinal option has both: K with full dates, C modified."""
    for row in ROWS:
        assert bool(row["full_dates"]) == bool(row["modified_dates"]), row["tag"]


def test_wildcard_rows() -> None:
    wildcards = {row["tag"]: row for row in ROWS if _is_wildcard(row["tag"])}
    assert set(wildcards) == {"50xxxxxx", "60xx3000", "60xx4000", PRIVATE_TOKEN}
    assert all(row["keyword"] == "" for row in wildcards.values())
    assert wildcards[PRIVATE_TOKEN]["safe_private"] == "C"


def test_tags_keywords_and_names_match_pydicom() -> None:
    unknown, keywords, names = [], [], []
    for row in ROWS:
        tag = row["tag"]
        if _is_wildcard(tag):
            continue
        number = int(tag, 16)
        if not dictionary_has_tag(number):
            unknown.append(tag)
            continue
        if row["keyword"] != keyword_for_tag(number):
            keywords.append((tag, row["keyword"], keyword_for_tag(number)))
        expected = NAME_EXCEPTIONS.get(tag, row["name"])
        if _norm(expected) != _norm(dictionary_description(number)):
            names.append((tag, row["name"], dictionary_description(number)))
    assert unknown == []
    assert keywords == []
    assert names == []
    # An exception that no longer differs should be removed from the list.
    for tag, pydicom_name in NAME_EXCEPTIONS.items():
        assert _norm(BY_TAG[tag]["name"]) != _norm(pydicom_name)
        assert dictionary_description(int(tag, 16)) == pydicom_name


@pytest.mark.parametrize(
    ("tag", "name", "expected"),
    [
        ("00100010", "Patient's Name", {"basic": "Z"}),
        ("00100020", "Patient ID", {"basic": "Z"}),
        ("00080050", "Accession Number", {"basic": "Z"}),
        (
            "00080020",
            "Study Date",
            {"basic": "Z", "full_dates": "K", "modified_dates": "C"},
        ),
        ("0008103E", "Series Description", {"basic": "X", "descriptors": "C"}),
        ("00101010", "Patient's Age", {"basic": "X", "characteristics": "K"}),
        ("0020000D", "Study Instance UID", {"basic": "U", "uids": "K"}),
        ("00081140", "Referenced Image Sequence", {"basic": "X/Z/U*", "uids": "K"}),
        ("00181002", "Device UID", {"basic": "U", "uids": "K", "device": "K"}),
        ("00400555", "Acquisition Context Sequence", {"basic": "X/Z", "structured": "C"}),
        ("60xx3000", "Overlay Data", {"basic": "X", "graphics": "C"}),
    ],
)
def test_spot_checks(tag: str, name: str, expected: dict[str, str]) -> None:
    row = BY_TAG[tag]
    assert row["name"] == name
    # Columns not named are blank.
    assert {c: row[c] for c in ["basic", *OPTION_COLUMNS] if row[c]} == expected


def test_safe_private_file() -> None:
    header, rows = _rows(SAFE_PRIVATE_CSV)
    assert header == ["creator", "group", "element", "vr", "name", "reason"]
    for row in rows:
        assert row["creator"]
        assert re.fullmatch(r"[0-9A-F]{3}[13579BDF]", row["group"]), row
        assert re.fullmatch(r"[0-9A-F]{2}", row["element"]), row
        assert row["reason"] == "PS3.15 Table E.3.10-1", row


def test_doc_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(DOC_SCRIPT), "--check"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
