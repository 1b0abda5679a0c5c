"""The DICOM JSON model layer: round trips through pydicom's writer, and every bad input."""

from __future__ import annotations

import base64
import json
import pickle
from typing import TYPE_CHECKING, Any

import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomweb.dicomjson import (
    bulk_data_uris,
    dataset_from_json,
    load_json_array,
    parse_datasets,
    parse_datasets_lenient,
    parse_datasets_with_bulk_data,
)
from dicomweb.errors import DicomWebError, redact_url
from imgindex.testing import make_series

if TYPE_CHECKING:
    from pathlib import Path

    from pydicom.dataelem import DataElement
    from pydicom.valuerep import PersonName

PIXEL_DATA = 0x7FE00010


def to_body(datasets: list[Dataset], **kwargs: Any) -> bytes:
    return json.dumps([ds.to_json_dict(**kwargs) for ds in datasets]).encode()


def test_generated_series_round_trip() -> None:
    series = make_series(3, "CT", 3, 16, 16)
    parsed = parse_datasets(to_body(series))  # no handler: PixelData goes as InlineBinary
    assert len(parsed) == 3
    for original, copy in zip(series, parsed, strict=True):
        assert copy == original
        assert copy.PixelData == original.PixelData
        assert copy.PatientName == original.PatientName


def test_person_names_in_many_character_sets(pydicom_charset_files: Path) -> None:
    files = sorted(pydicom_charset_files.glob("*.dcm"))
    assert files
    ideographic = 0
    for path in files:
        original = pydicom.dcmread(path)
        (copy,) = parse_datasets(to_body([original]).decode())
        assert copy == original, path.name
        for name, copied in zip(pns(original), pns(copy), strict=True):
            assert str(copied) == str(name)
            assert copied.components == name.components
            ideographic += bool(name.ideographic)
    assert ideographic >= 5  # chrH31, chrH32, chrI2, chrX1, chrX2, chrSQEncoding*


def pns(ds: Dataset) -> list[PersonName]:
    names: list[PersonName] = []
    for element in ds.iterall():
        if element.VR == "PN" and not element.is_empty:
            names.extend(element.value if element.VM > 1 else [element.value])
    return names


def test_person_name_groups_from_json() -> None:
    body = [
        {
            "00100010": {
                "vr": "PN",
                "Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎"}],
            }
        }
    ]
    (ds,) = parse_datasets(json.dumps(body, ensure_ascii=False).encode("utf-8"))
    assert ds.PatientName.ideographic == "山田^太郎"
    assert ds.PatientName.family_name == "Yamada"


def test_inline_binary() -> None:
    payload = bytes(range(256))
    body = [{"00091010": {"vr": "OB", "InlineBinary": base64.b64encode(payload).decode()}}]
    (ds,) = parse_datasets(json.dumps(body))
    assert ds[0x00091010].value == payload


def test_sequences_and_numbers() -> None:
    item = Dataset()
    item.CodeValue = "T-D3000"
    item.CodingSchemeDesignator = "SRT"
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = "1.2.3.4"
    item.ReferencedSOPSequence = Sequence([inner])
    ds = Dataset()
    ds.AnatomicRegionSequence = Sequence([item, Dataset()])
    ds.PixelSpacing = [0.5, 0.25]
    ds.InstanceNumber = 7
    ds.FrameIncrementPointer = 0x00181063
    (copy,) = parse_datasets(to_body([ds]))
    assert copy == ds
    assert copy.AnatomicRegionSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        "1.2.3.4"
    )
    assert copy.FrameIncrementPointer == 0x00181063


def fake_uri(element: DataElement) -> str:
    return f"https://pacs.example/bulk/{element.tag:08X}"


def test_bulk_data_uris_are_left_unfetched_and_reported() -> None:
    series = make_series(4, "CT", 2, 64, 64)  # 8 KiB of pixels: over the threshold
    item = Dataset()
    item.add_new(0x00091011, "OB", b"\x01" * 4096)
    series[1].add_new(0x00091010, "SQ", Sequence([Dataset(), item]))
    body = to_body(series, bulk_data_threshold=1024, bulk_data_element_handler=fake_uri)
    pairs = parse_datasets_with_bulk_data(body)
    assert [uris for _, uris in pairs] == [
        {(PIXEL_DATA,): "https://pacs.example/bulk/7FE00010"},
        {
            (PIXEL_DATA,): "https://pacs.example/bulk/7FE00010",
            (0x00091010, 1, 0x00091011): "https://pacs.example/bulk/00091011",
        },
    ]
    for ds, _ in pairs:
        assert PIXEL_DATA in ds
        assert ds.PixelData is None
    assert pairs[1][0][0x00091010].value[1][0x00091011].value is None
    objects = load_json_array(body)
    assert [bulk_data_uris(o) for o in objects] == [uris for _, uris in pairs]
    assert [ds.SOPInstanceUID for ds in parse_datasets(body)] == [
        ds.SOPInstanceUID for ds in series
    ]


def test_bulk_data_uri_as_one_item_list() -> None:
    # PS3.18 Annex F.4's example puts the URI in a list; pydicom accepts both.
    body = [{"7FE00010": {"vr": "OW", "BulkDataURI": ["https://pacs/b/1"]}}]
    ((ds, uris),) = parse_datasets_with_bulk_data(json.dumps(body))
    assert ds.PixelData is None
    assert uris == {(PIXEL_DATA,): "https://pacs/b/1"}


def test_empty_body_is_no_match() -> None:
    assert parse_datasets(b"") == []
    assert parse_datasets(" \r\n") == []
    assert parse_datasets(b"[]") == []


GOOD = {"00100020": {"vr": "LO", "Value": ["P1"]}}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<!DOCTYPE html><html><body>500 Internal Server Error</body></html>", "html_error_page"),
        (b"\xef\xbb\xbf  \n<html><head><title>Login</title></head></html>", "html_error_page"),
        ("<?xml version='1.0'?><NativeDicomModel/>", "html_error_page"),
        (b"[{", "malformed_json"),
        (b"\xff\xfe\x00garbage", "malformed_json"),
        (b"not json", "malformed_json"),
        (b"1" * 5000, "malformed_json"),  # int() digit limit
        (b"[" * 100_000 + b"]" * 100_000, "malformed_json"),  # nesting depth
        (b'{"00100020": {"vr": "LO"}}', "malformed_json"),  # a lone object, not an array
        (b'"text"', "malformed_json"),
        (b"[1]", "malformed_json"),
        (b"[[]]", "malformed_json"),
        (b"[null]", "malformed_json"),
        (b'[{"PatientID": {"vr": "LO", "Value": ["P"]}}]', "malformed_json"),  # keyword
        (b'[{"0x100020": {"vr": "LO", "Value": ["P"]}}]', "malformed_json"),
        (b'[{"0010002": {"vr": "LO", "Value": ["P"]}}]', "malformed_json"),  # seven digits
        (b'[{"00100020": {"Value": ["P"]}}]', "malformed_json"),  # no vr
        (b'[{"00100020": {"vr": 5}}]', "malformed_json"),
        (b'[{"00100020": ["P"]}]', "malformed_json"),
        (b'[{"00100020": {"vr": "XX", "Value": ["P"]}}]', "malformed_json"),  # unknown VR
        (b'[{"00100020": {"vr": "LO", "Value": "P"}}]', "malformed_json"),  # Value not a list
        (b'[{"00200013": {"vr": "IS", "Value": ["seven"]}}]', "malformed_json"),
        (b'[{"00280030": {"vr": "DS", "Value": [{"a": 1}]}}]', "malformed_json"),
        (b'[{"00091010": {"vr": "OB", "InlineBinary": "!!!"}}]', "malformed_json"),
        (b'[{"00091010": {"vr": "OB", "InlineBinary": 5}}]', "malformed_json"),
        (b'[{"00091010": {"vr": "OB", "InlineBinary": "AAA"}}]', "malformed_json"),
        (b'[{"00100020": {"vr": "US or SS", "Value": [1]}}]', "malformed_json"),
        (b'[{"7FE00010": {"vr": "OW", "BulkDataURI": 5}}]', "malformed_json"),
        (
            b'[{"7FE00010": {"vr": "OW", "BulkDataURI": "http://x", "InlineBinary": "AAAA"}}]',
            "malformed_json",
        ),
        (b'[{"00081115": {"vr": "SQ", "Value": [{"Bad": {"vr": "LO"}}]}}]', "malformed_json"),
        (b'[{"00081115": {"vr": "SQ", "Value": [5]}}]', "malformed_json"),
        (b'[{"00081115": {"vr": "SQ", "Value": {}}}]', "malformed_json"),
    ],
)
def test_bad_input(body: bytes | str, reason: str) -> None:
    with pytest.raises(DicomWebError) as info:
        parse_datasets(body, url="https://bob:hunter2@pacs.example/studies", status=200)
    error = info.value
    assert error.reason == reason
    assert error.status == 200
    assert error.url == "https://pacs.example/studies"
    assert "hunter2" not in str(error)
    assert "bob" not in str(error)


def test_strict_names_the_first_bad_item() -> None:
    body = json.dumps([GOOD, GOOD, {"nope": {}}, 5])
    with pytest.raises(DicomWebError, match=r"index=2") as info:
        parse_datasets(body)
    assert info.value.index == 2


def test_lenient_keeps_the_good_datasets() -> None:
    bad_vr = {"00100020": {"vr": "XX", "Value": ["P"]}}
    body = json.dumps([GOOD, {"PatientID": {"vr": "LO"}}, GOOD, 7, bad_vr, GOOD])
    datasets, errors = parse_datasets_lenient(body, url="http://pacs/q")
    assert [ds.PatientID for ds in datasets] == ["P1"] * 3
    assert [(e.index, e.reason) for e in errors] == [
        (1, "malformed_json"),
        (3, "malformed_json"),
        (4, "malformed_json"),
    ]
    assert all(e.url == "http://pacs/q" for e in errors)


@pytest.mark.parametrize("body", [b"<html></html>", b"{}", b"[,]"])
def test_lenient_still_fails_a_body_that_is_not_an_array(body: bytes) -> None:
    with pytest.raises(DicomWebError):
        parse_datasets_lenient(body)


def test_dataset_from_json_and_bulk_data_uris_check_their_argument() -> None:
    assert dataset_from_json(GOOD).PatientID == "P1"
    with pytest.raises(DicomWebError, match="must be a JSON object") as info:
        dataset_from_json([GOOD], index=4)
    assert info.value.index == 4
    with pytest.raises(DicomWebError, match="eight hex digits"):
        bulk_data_uris({"x": {"vr": "LO"}})


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
TAGS = st.sampled_from(["00100010", "00100020", "00200013", "00280030", "00081115", "7FE00010"])
VRS = st.sampled_from(["PN", "LO", "IS", "DS", "SQ", "OB", "OW", "AT", "US", "FD", "UN", "XX"])
VALUE_KEYS = st.sampled_from(["Value", "InlineBinary", "BulkDataURI"])
ELEMENTS = st.builds(
    lambda vr, key, value: {"vr": vr, key: value},
    VRS,
    VALUE_KEYS,
    JSON | st.lists(JSON, max_size=3),
)
DICOM_LIKE = st.lists(st.dictionaries(TAGS, ELEMENTS, max_size=4), max_size=3)


def outcome(body: bytes | str) -> str | None:
    """The reason :func:`parse_datasets` fails with, or ``None`` if it returns datasets."""
    try:
        datasets = parse_datasets(body)
    except DicomWebError as exc:
        return exc.reason
    assert all(isinstance(ds, Dataset) for ds in datasets)
    return None


@given(st.one_of(JSON, DICOM_LIKE))
def test_arbitrary_json_raises_only_dicomweb_errors(value: object) -> None:
    body = json.dumps(value)
    assert outcome(body) in {None, "malformed_json"}
    datasets, errors = parse_datasets_lenient(body) if isinstance(value, list) else ([], [])
    assert len(datasets) + len(errors) == (len(value) if isinstance(value, list) else 0)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_dicomweb_errors(body: bytes) -> None:
    assert outcome(body) in {None, "malformed_json", "html_error_page"}


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("https://user:pw@pacs.example:8443/dicom-web", "https://pacs.example:8443/dicom-web"),
        (
            "http://pacs/studies?access_token=abc&limit=5",
            "http://pacs/studies?access_token=***&limit=5",
        ),
        ("http://pacs/x?a=1&X-Amz-Signature=ff", "http://pacs/x?a=1&X-Amz-Signature=***"),
        ("http://u:p@[::1/bad", "http://[::1/bad"),  # urlsplit rejects it; still stripped
        ("http://pacs/plain", "http://pacs/plain"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_error_pickles_and_says_where() -> None:
    error = DicomWebError(
        "bad", reason="malformed_json", url="http://a:b@pacs/q", status=200, index=3
    )
    assert str(error) == "bad (reason=malformed_json, index=3, status=200, url=http://pacs/q)"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.message, copy.reason, copy.url, copy.status, copy.index) == (
        "bad",
        "malformed_json",
        "http://pacs/q",
        200,
        3,
    )


def test_a_500_instance_series_keeps_pixel_data_out_of_memory() -> None:
    # Speed belongs in a benchmark (scripts/bench_crawl.py, to come); here only the result.
    series = make_series(5, "CT", 500, 64, 64)
    body = to_body(series, bulk_data_threshold=1024, bulk_data_element_handler=fake_uri)
    parsed = parse_datasets(body)
    assert len(parsed) == 500
    assert all(ds.PixelData is None for ds in parsed)
