"""Extractor.extract_json: rows from DICOM JSON (PS3.18 Annex F) equal to those from files."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st

from imgindex.extract import REJECT_REASONS, Extractor
from imgindex.schema import DEFAULT_ATTRIBUTES, REJECT_SCHEMA, attributes_for, instance_schema
from imgindex.testing import (
    make_multiframe,
    make_patient,
    make_secondary_capture,
    make_series,
    write_dataset,
)

if TYPE_CHECKING:
    from imgindex.extract import Extraction

REPO = Path(__file__).resolve().parents[2]
NOW = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
LOCATION = "http://localhost/dicomweb/studies/1/series/2/instances/3"
BULK_URI = "http://localhost/dicomweb/bulk"

#: Columns that say where, when and how the instance was stored, not what it holds.
PROVENANCE = frozenset({"location", "source", "size_bytes", "indexed_at", "TransferSyntaxUID"})

#: Files pydicom reads but cannot write as DICOM JSON: left out of the comparison.
TO_JSON_FAILS = {
    "badVR.dcm": "NumberOfFrames (IS) is '1A'; to_json_dict calls int() on it and raises",
}

#: Files whose bad_value rejects differ between extract_file and extract_json, and why.
#: None so far: pydicom's to_json_dict keeps the values that do not parse as they are.
REJECTS_DIFFER: dict[str, str] = {}

#: File-level reasons where extract_file read the file and found it no instance.
NOT_INSTANCE = frozenset({"missing_uid", "dicomdir"})

UIDS = {
    "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
    "0020000E": {"vr": "UI", "Value": ["1.2.3.4"]},
    "00080018": {"vr": "UI", "Value": ["1.2.3.4.5"]},
}


def extract(elements: dict[str, Any], **kwargs: Any) -> Extraction:
    extractor = Extractor(attributes_for(("AcquisitionDateTime",)), source="test")
    return extractor.extract_json({**UIDS, **elements}, location=LOCATION, indexed_at=NOW, **kwargs)


def typed(value: Any) -> Any:
    """``value`` with its type, so that ``1 == 1.0`` and ``str`` subclasses count as different."""
    if isinstance(value, list):
        return [typed(v) for v in value]
    return (type(value), value)


def to_json(path: Path) -> dict[str, Any]:
    """The file as a WADO-RS metadata object, through JSON text as a server sends it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about what it tolerates in the files
        ds = pydicom.dcmread(path, force=True)
        obj = ds.to_json_dict(bulk_data_threshold=64, bulk_data_element_handler=lambda _: BULK_URI)
    loaded: dict[str, Any] = json.loads(json.dumps(obj))
    return loaded


class Comparison:
    """extract_file against extract_json over many files, collecting what differs."""

    def __init__(self) -> None:
        self.from_file = Extractor(source="file", force=True)
        self.from_json = Extractor(source="json")
        self.problems: list[str] = []
        self.to_json_fails: set[str] = set()
        self.rows = 0
        self.bad_values = 0

    def check(self, path: Path) -> None:
        expected = self.from_file.extract_file(path, indexed_at=NOW)
        file_rejects = [r for r in expected.rejects if r["level"] == "file"]
        if file_rejects and file_rejects[0]["reason"] not in NOT_INSTANCE:
            return  # unreadable, truncated, not DICOM: there is no instance to send as JSON
        try:
            obj = to_json(path)
        except Exception:  # noqa: BLE001 - named in TO_JSON_FAILS, checked by the caller
            self.to_json_fails.add(path.name)
            return
        got = self.from_json.extract_json(obj, location=LOCATION, indexed_at=NOW)
        if expected.row is None or got.row is None:
            if (expected.row is None) != (got.row is None):
                self.problems.append(f"{path.name}: a row from one path only ({got.rejects})")
            return
        self.rows += 1
        columns = (set(expected.row) | set(got.row)) - PROVENANCE
        for column in sorted(columns):
            want, have = expected.row.get(column, "absent"), got.row.get(column, "absent")
            if typed(want) != typed(have):
                self.problems.append(f"{path.name} {column}: file {want!r}, JSON {have!r}")
        bad = [
            {r["keyword"] for r in e.rejects if r["reason"] == "bad_value"} for e in (expected, got)
        ]
        self.bad_values += len(bad[0])
        if bad[0] != bad[1] and path.name not in REJECTS_DIFFER:
            self.problems.append(f"{path.name}: bad_value for {bad[0]} from file, {bad[1]} JSON")
        assert {r["SOPInstanceUID"] for r in got.rejects} <= {got.row["SOPInstanceUID"]}
        assert got.row["location"] == LOCATION
        assert got.row["indexed_at"] == NOW


def test_rows_equal_extract_file_on_pydicom_corpora(corpus: list[Path]) -> None:
    # pydicom's test_files and charset_files, and the pydicom-data files: every file that
    # extract_file reads (with force, so files without a preamble count too).
    comparison = Comparison()
    for path in corpus:
        comparison.check(path)
    assert not comparison.problems, "\n".join(comparison.problems)
    assert comparison.to_json_fails == set(TO_JSON_FAILS)
    assert comparison.rows > 200


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Generated instances of each kind the factory makes, written as Part 10 files."""
    folder = tmp_path_factory.mktemp("generated")
    non_ascii = [s for s in range(200) if not make_patient(s).PatientName.isascii()][:6]
    datasets = [
        *(ds for seed in range(4) for ds in make_series(seed, "CT", n_instances=2)),
        *(ds for seed in range(4, 8) for ds in make_series(seed, "MR", n_instances=2)),
        *(make_series(seed, n_instances=1, patient=make_patient(seed))[0] for seed in non_ascii),
        make_series(9, n_instances=1, ContentTime="101010.5", PatientAge="")[0],
        # Several values where the dictionary says one (VM 1): extract_file keeps a text
        # whole and takes the first of others; JSON carries them as an array.
        make_series(
            12,
            n_instances=1,
            StudyDescription="A\\B",
            Modality="CT\\MR",
            PatientName="Doe^A\\Roe^B",
            StudyDate="20200101\\20210101",
        )[0],
        make_multiframe(10),
        make_secondary_capture(11),
    ]
    paths = []
    for number, ds in enumerate(datasets):
        paths.append(folder / f"{number}.dcm")
        write_dataset(ds, paths[-1])
    return paths


def test_rows_equal_extract_file_on_generated_files(
    generated: list[Path], malformed: dict[str, Path]
) -> None:
    comparison = Comparison()
    for path in [*generated, *malformed.values()]:
        comparison.check(path)
    assert not comparison.problems, "\n".join(comparison.problems)
    assert not comparison.to_json_fails
    assert comparison.rows >= len(generated)
    assert comparison.bad_values > 0  # the malformed files' bad date is rejected by both


def test_json_from_pydicom_objects_without_a_round_trip(generated: list[Path]) -> None:
    # to_json_dict's values are pydicom's str subclasses (UID): the row holds plain str.
    extractor = Extractor(source="json")
    for path in generated[:3]:
        ds = pydicom.dcmread(path)
        direct = extractor.extract_json(ds.to_json_dict(), location=LOCATION, indexed_at=NOW)
        loaded = extractor.extract_json(to_json(path), location=LOCATION, indexed_at=NOW)
        assert direct.row is not None
        assert typed(direct.row) == typed(loaded.row)


# -- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "element", "keyword", "expected"),
    [
        # Numbers as JSON numbers (PS3.18 F.2.3) and as strings, as servers also send them.
        ("00200013", {"vr": "IS", "Value": [5]}, "InstanceNumber", 5),
        ("00200013", {"vr": "IS", "Value": ["5"]}, "InstanceNumber", 5),
        ("00200013", {"vr": "IS", "Value": [" 12 "]}, "InstanceNumber", 12),
        ("00200013", {"vr": "IS", "Value": [2.0]}, "InstanceNumber", 2),
        ("00280010", {"vr": "US", "Value": [512]}, "Rows", 512),
        ("00280010", {"vr": "US", "Value": ["512"]}, "Rows", 512),
        ("00180050", {"vr": "DS", "Value": [1e-05]}, "SliceThickness", 1e-05),
        ("00180050", {"vr": "DS", "Value": ["1e-05"]}, "SliceThickness", 1e-05),
        ("00180050", {"vr": "DS", "Value": ["  3.5 "]}, "SliceThickness", 3.5),
        ("00180050", {"vr": "DS", "Value": [3]}, "SliceThickness", 3.0),
        ("00280030", {"vr": "DS", "Value": ["0.5", 0.25]}, "PixelSpacing", [0.5, 0.25]),
        # Person names: groups joined by '=', trailing empty groups dropped (PS3.5 6.2.1).
        (
            "00100010",
            {
                "vr": "PN",
                "Value": [
                    {
                        "Alphabetic": "Yamada^Tarou",
                        "Ideographic": "山田^太郎",
                        "Phonetic": "やまだ^たろう",
                    }
                ],
            },
            "PatientName",
            "Yamada^Tarou=山田^太郎=やまだ^たろう",
        ),
        (
            "00100010",
            {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]},
            "PatientName",
            "Doe^John",
        ),
        (
            "00100010",
            {"vr": "PN", "Value": [{"Alphabetic": "Doe", "Ideographic": "", "Phonetic": ""}]},
            "PatientName",
            "Doe",
        ),
        (
            "00100010",
            {"vr": "PN", "Value": [{"Alphabetic": "Doe", "Phonetic": "Dough"}]},
            "PatientName",
            "Doe==Dough",
        ),
        ("00100010", {"vr": "PN", "Value": [{"Ideographic": "山田"}]}, "PatientName", "=山田"),
        ("00100010", {"vr": "PN", "Value": ["Doe^John"]}, "PatientName", "Doe^John"),
        ("00100010", {"vr": "PN", "Value": [{}]}, "PatientName", None),
        # Empty values: no Value, an empty array, null (PS3.18 F.2.5).
        ("00081030", {"vr": "LO"}, "StudyDescription", None),
        ("00081030", {"vr": "LO", "Value": []}, "StudyDescription", None),
        ("00081030", {"vr": "LO", "Value": [None]}, "StudyDescription", None),
        ("00081030", {"vr": "LO", "Value": ["  "]}, "StudyDescription", None),
        (
            "00080008",
            {"vr": "CS", "Value": ["ORIGINAL", None, "AXIAL"]},
            "ImageType",
            ["ORIGINAL", "AXIAL"],
        ),
        (
            "00080008",
            {"vr": "CS", "Value": ["ORIGINAL", "", " AXIAL "]},
            "ImageType",
            ["ORIGINAL", "AXIAL"],
        ),
        ("00080008", {"vr": "CS", "Value": [None]}, "ImageType", None),
        ("00080008", {"vr": "CS", "Value": []}, "ImageType", None),
        ("00281050", {"vr": "DS", "Value": [40.0, None]}, "WindowCenter", [40.0]),
        # A single-valued attribute with several values: the first (a text keeps them all,
        # as extract_file keeps 'A\B' whole).
        ("00280010", {"vr": "US", "Value": [512, 256]}, "Rows", 512),
        (
            "00080020",
            {"vr": "DA", "Value": ["20200101", "20210101"]},
            "StudyDate",
            dt.date(2020, 1, 1),
        ),
        ("00081030", {"vr": "LO", "Value": ["A", "B"]}, "StudyDescription", "A\\B"),
        (
            "00100010",
            {
                "vr": "PN",
                "Value": [{"Alphabetic": "Doe"}, {"Alphabetic": "Roe", "Ideographic": ""}],
            },
            "PatientName",
            "Doe\\Roe",
        ),
        # Dates and times as extract_file types them.
        ("00080020", {"vr": "DA", "Value": ["20200102"]}, "StudyDate", dt.date(2020, 1, 2)),
        ("00080020", {"vr": "DA", "Value": ["2020.01.02"]}, "StudyDate", dt.date(2020, 1, 2)),
        ("00080030", {"vr": "TM", "Value": ["101010.5"]}, "StudyTime", "10:10:10.500000"),
        ("00080030", {"vr": "TM", "Value": ["1010"]}, "StudyTime", "10:10:00"),
        (
            "0008002A",
            {"vr": "DT", "Value": ["20200102030405.123456+0100"]},
            "AcquisitionDateTime",
            dt.datetime(2020, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC),
        ),
        # The element's vr is not the dictionary's: a plain value is read as the dictionary VR.
        ("00080020", {"vr": "UN", "Value": ["20200102"]}, "StudyDate", dt.date(2020, 1, 2)),
        ("00280010", {"vr": "SS", "Value": [512]}, "Rows", 512),
        ("00280010", {"Value": [512]}, "Rows", 512),
        (
            "00080005",
            {"vr": "CS", "Value": ["", "ISO 2022 IR 87"]},
            "SpecificCharacterSet",
            ["ISO 2022 IR 87"],
        ),
    ],
)
def test_values(key: str, element: dict[str, Any], keyword: str, expected: Any) -> None:
    result = extract({key: element})
    assert result.rejects == []
    assert result.row is not None
    assert keyword in result.row  # present in the JSON: a column value, null or not
    assert typed(result.row[keyword]) == typed(expected)
    pa.Table.from_pylist([result.row], instance_schema(attributes_for(("AcquisitionDateTime",))))


@pytest.mark.parametrize(
    ("key", "element", "keyword", "value", "message"),
    [
        ("00200013", {"vr": "IS", "Value": ["1A"]}, "InstanceNumber", "1A", "'1A' is not a number"),
        ("00200013", {"vr": "IS", "Value": [2.5]}, "InstanceNumber", "2.5", "not an integer"),
        ("00200013", {"vr": "IS", "Value": [True]}, "InstanceNumber", "[True]", "boolean"),
        ("00200013", {"vr": "IS", "Value": [10**30]}, "InstanceNumber", str(10**30), "int64"),
        ("00180050", {"vr": "DS", "Value": ["abc"]}, "SliceThickness", "abc", "not a number"),
        ("00080020", {"vr": "DA", "Value": ["20231301"]}, "StudyDate", "20231301", "not a date"),
        ("00080030", {"vr": "TM", "Value": ["25"]}, "StudyTime", "25", "not a time"),
        (
            "00280010",
            {"vr": "OB", "InlineBinary": "AAE="},
            "Rows",
            "AAE=",
            "bulk data (InlineBinary)",
        ),
        (
            "00081030",
            {"vr": "UN", "BulkDataURI": BULK_URI},
            "StudyDescription",
            BULK_URI,
            "bulk data (BulkDataURI)",
        ),
        ("00081030", "abc", "StudyDescription", "'abc'", "the element is a JSON string"),
        ("00081030", None, "StudyDescription", "None", "the element is a JSON null"),
        ("00081030", [1, 2], "StudyDescription", "[1, 2]", "the element is a JSON array"),
        (
            "00081030",
            {"vr": "LO", "Value": "abc"},
            "StudyDescription",
            "'abc'",
            "'Value' is a JSON string, not an array",
        ),
        ("00081030", {"vr": "LO", "Value": [{"a": 1}]}, "StudyDescription", "[{'a': 1}]", "object"),
        ("00081030", {"vr": "LO", "Value": [False]}, "StudyDescription", "[False]", "boolean"),
        ("00100010", {"vr": "PN", "Value": [5]}, "PatientName", "5", "not a person name"),
        ("00100010", {"vr": "PN", "Value": [["Doe"]]}, "PatientName", "[['Doe']]", "person name"),
        (
            "00100010",
            {"vr": "PN", "Value": [{"Alphabetic": 5}]},
            "PatientName",
            "[{'Alphabetic': 5}]",
            "group",
        ),
        (
            "00081030",
            {"vr": "LO", "Value": ["a\ud800"]},
            "StudyDescription",
            "a\\ud800",
            "surrogate",
        ),
        ("00080008", {"vr": "CS", "Value": ["A", 7, [1]]}, "ImageType", "['A', 7, [1]]", "array"),
    ],
)
def test_bad_values_are_null_and_one_reject(
    key: str, element: Any, keyword: str, value: str, message: str
) -> None:
    result = extract({key: element}, size_bytes=1234)
    assert result.row is not None
    assert result.row[keyword] is None
    [reject] = result.rejects
    assert (reject["level"], reject["reason"]) == ("value", "bad_value")
    assert reject["keyword"] == keyword
    attr = next(a for a in DEFAULT_ATTRIBUTES if a.keyword == keyword)
    assert reject["tag"] == attr.tag_text
    assert reject["value"] == value
    assert reject["message"].startswith(f"{keyword} {attr.tag_text} ({attr.vr}): ")
    assert message in reject["message"]
    assert reject["SOPInstanceUID"] == "1.2.3.4.5"
    assert (reject["location"], reject["indexed_at"], reject["size_bytes"]) == (LOCATION, NOW, 1234)
    assert pa.Table.from_pylist(result.rejects, REJECT_SCHEMA).num_rows == 1


def test_other_columns_survive_a_bad_one() -> None:
    result = extract(
        {
            "00200013": {"vr": "IS", "Value": ["1A"]},
            "00280010": {"vr": "US", "Value": [512]},
            "00081030": {"vr": "LO", "Value": ["CT HEAD"]},
        }
    )
    assert result.row is not None
    assert (result.row["InstanceNumber"], result.row["Rows"]) == (None, 512)
    assert result.row["StudyDescription"] == "CT HEAD"
    assert [r["keyword"] for r in result.rejects] == ["InstanceNumber"]


# -- datasets --------------------------------------------------------------------------------


@pytest.mark.parametrize("obj", [[UIDS], "abc", None, 5, b"{}"])
def test_a_dataset_that_is_no_object_is_malformed_json(obj: Any) -> None:
    result = Extractor(source="test").extract_json(
        obj, location=LOCATION, indexed_at=NOW, size_bytes=10
    )
    assert result.row is None
    [reject] = result.rejects
    assert (reject["level"], reject["reason"]) == ("file", "malformed_json")
    assert "malformed_json" in REJECT_REASONS
    assert "not an object (PS3.18 F.2)" in reject["message"]
    assert (reject["location"], reject["size_bytes"], result.size_bytes) == (LOCATION, 10, 10)
    assert pa.Table.from_pylist(result.rejects, REJECT_SCHEMA).num_rows == 1


@pytest.mark.parametrize(
    ("elements", "missing"),
    [
        ({"0020000D": None}, "StudyInstanceUID"),
        ({"0020000D": {"vr": "UI"}}, "StudyInstanceUID"),
        ({"0020000D": {"vr": "UI", "Value": [""]}}, "StudyInstanceUID"),
        ({"00080018": {"vr": "UI", "Value": [None]}}, "SOPInstanceUID"),
        ({"0020000E": {"vr": "UI", "BulkDataURI": BULK_URI}}, "SeriesInstanceUID"),
    ],
)
def test_missing_uid_rejects_the_dataset(elements: dict[str, Any], missing: str) -> None:
    obj = {k: v for k, v in {**UIDS, **elements}.items() if v is not None}
    result = Extractor(source="test").extract_json(obj, location=LOCATION, indexed_at=NOW)
    assert result.row is None
    [reject] = result.rejects
    assert (reject["level"], reject["reason"]) == ("file", "missing_uid")
    assert reject["message"] == f"missing or empty: {missing}"
    expected_sop = None if missing == "SOPInstanceUID" else "1.2.3.4.5"
    assert reject["SOPInstanceUID"] == expected_sop


@pytest.mark.parametrize(
    ("elements", "argument", "expected"),
    [
        (
            {
                "00020010": {"vr": "UI", "Value": ["1.2.840.10008.1.2.1"]},
                "00083002": {"vr": "UI", "Value": ["1.2.840.10008.1.2.4.50"]},
            },
            "1.2.840.10008.1.2",
            "1.2.840.10008.1.2.1",
        ),
        (
            {"00083002": {"vr": "UI", "Value": ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2"]}},
            "1.2.840.10008.1.2",
            "1.2.840.10008.1.2.4.50",
        ),
        (
            {"00020010": {"vr": "UI"}, "00083002": {"vr": "UI", "Value": [None]}},
            "1.2.840.10008.1.2",
            "1.2.840.10008.1.2",
        ),
        ({}, None, None),
        ({"00020010": "broken"}, None, None),
    ],
)
def test_transfer_syntax_precedence(
    elements: dict[str, Any], argument: str | None, expected: str | None
) -> None:
    # (0002,0010) TransferSyntaxUID, then QIDO-RS's (0008,3002) AvailableTransferSyntaxUID,
    # then what the caller knows.
    result = extract(elements, transfer_syntax=argument)
    assert result.row is not None
    assert result.row["TransferSyntaxUID"] == expected
    assert result.rejects == []


def test_provenance_columns() -> None:
    result = extract({}, size_bytes=4321)
    assert result.row is not None
    assert result.size_bytes == 4321
    assert {k: result.row[k] for k in PROVENANCE - {"TransferSyntaxUID"}} == {
        "location": LOCATION,
        "source": "test",
        "size_bytes": 4321,
        "indexed_at": NOW,
    }
    # Absent attributes are absent from the row (null in the table), as with extract_file.
    assert "StudyDate" not in result.row
    default = extract({}).row
    assert default is not None
    assert default["size_bytes"] is None
    assert default["indexed_at"].tzinfo is dt.UTC


def test_extractor_pickles_for_worker_processes() -> None:
    # Folder crawls send the Extractor to worker processes: its JSON plan must pickle too.
    extractor = pickle.loads(pickle.dumps(Extractor(source="test")))
    result = extractor.extract_json(
        {**UIDS, "00080020": {"vr": "DA", "Value": ["20200102"]}}, location=LOCATION
    )
    assert result.row is not None
    assert result.row["StudyDate"] == dt.date(2020, 1, 2)


# -- never raises ----------------------------------------------------------------------------

_KEYS = [f"{a.tag:08X}" for a in DEFAULT_ATTRIBUTES]
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["\ud800", "20200101", "101010.5", " 1e3 ", "1.0", "0x10", "nan", "=="])
)
_JSON = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["vr", "Value", "InlineBinary", "BulkDataURI", "Alphabetic", "Phonetic"]
            )
            | st.text(max_size=4),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)
_ELEMENTS = _JSON | st.fixed_dictionaries(
    {"vr": st.sampled_from(["UI", "IS", "DS", "PN", "UN", "OB"]) | _SCALARS},
    optional={
        "Value": st.lists(_JSON, max_size=4) | _JSON,
        "InlineBinary": _JSON,
        "BulkDataURI": _JSON,
    },
)


@given(
    st.dictionaries(st.sampled_from(_KEYS), _ELEMENTS, max_size=12),
    st.booleans(),
)
def test_garbage_never_raises(elements: dict[str, Any], with_uids: bool) -> None:
    obj = {**UIDS, **elements} if with_uids else elements
    result = Extractor(source="test").extract_json(obj, location=LOCATION, indexed_at=NOW)
    # Whatever came in, what goes out fits the tables.
    pa.Table.from_pylist(result.rejects, REJECT_SCHEMA)
    if result.row is not None:
        pa.Table.from_pylist([result.row], instance_schema())
        assert all(r["reason"] == "bad_value" for r in result.rejects)
    else:
        [reject] = result.rejects
        assert reject["reason"] == "missing_uid"


# -- the benchmark ---------------------------------------------------------------------------


def test_benchmark_script_runs(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location(
        "bench_extract_json", REPO / "scripts" / "bench_extract_json.py"
    )
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--series", "1", "--slices", "3", "--reference", "2", "--repeat", "1"]
    assert bench.main(args) == 0
    printed = capsys.readouterr().out
    assert "| extract_json |" in printed
    assert "| Dataset.from_json |" in printed
    assert "extract_json / Dataset.from_json:" in printed
