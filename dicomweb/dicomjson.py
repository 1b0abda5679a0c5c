"""The DICOM JSON model (PS3.18 Annex F), as QIDO-RS and WADO-RS metadata responses carry it.

A response body is a JSON array of objects, one per dataset, keyed by tags written as eight
hex digits (``"0020000D"``), each ``{"vr": ..., "Value": [...]}``, ``{"vr": ...,
"InlineBinary": base64}`` or ``{"vr": ..., "BulkDataURI": uri}`` (PS3.18 F.2).

pydicom does the conversion (:meth:`pydicom.dataset.Dataset.from_json`: person name groups,
sequences, AT, numbers for DS and IS, InlineBinary). This module is the strict layer around it:

- the body must be JSON and an array of objects; an HTML or XML page (an error page sent with
  status 200) is named as such;
- every key, in sequence items too, must be eight hex digits (pydicom also takes keywords and
  ``0x`` prefixes, which the Standard does not allow), every element must have a ``vr``
  of PS3.5, at most one of ``Value``, ``InlineBinary`` and ``BulkDataURI``, and base64 that
  is base64 (pydicom takes any VR text and drops what does not decode);
- anything pydicom rejects, or warns about when warnings are errors, becomes a
  :class:`~dicomweb.errors.DicomWebError` with reason ``malformed_json``;
- a ``BulkDataURI`` is never fetched: its element is left empty (``None``) and the URI is
  reported by :func:`bulk_data_uris`, or returned beside the datasets by
  :func:`parse_datasets_with_bulk_data`.

:func:`parse_datasets` fails the whole response on the first bad dataset;
:func:`parse_datasets_lenient` keeps the good datasets of an array and reports each bad one,
so one malformed study does not hide the others.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, TypeAlias

from pydicom.dataset import Dataset
from pydicom.valuerep import VR

from dicomweb.errors import DicomWebError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "TagPath",
    "bulk_data_uris",
    "dataset_from_json",
    "load_json_array",
    "parse_datasets",
    "parse_datasets_lenient",
    "parse_datasets_with_bulk_data",
]

#: Where an element sits in a dataset: ``(tag,)`` at the top level, ``(sequence_tag,
#: item_index, tag)`` one sequence down, and so on (tags as ints, e.g. ``0x7FE00010``).
TagPath: TypeAlias = tuple[int, ...]

_TAG_KEY = re.compile(r"[0-9A-Fa-f]{8}")
_VR = "vr"
_VALUE = "Value"
_BULK_DATA_URI = "BulkDataURI"
_SQ = "SQ"
_INLINE_BINARY = "InlineBinary"
_VALUE_KEYS = frozenset({_VALUE, _INLINE_BINARY, _BULK_DATA_URI})
#: The VRs of PS3.5 Table 6.2-1 (pydicom's list, without its "US or SS"-style ambiguities).
_VRS = frozenset(vr.value for vr in VR if len(vr.value) == 2)
#: RFC 4648 base64, padded, as PS3.18 F.2.7 requires of InlineBinary.
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
#: How much of a bad body a message quotes.
_EXCERPT = 80
#: Leading bytes that JSON allows before a value, and a UTF-8 byte order mark.
_JSON_SPACE = " \t\r\n"
_BOM = "\ufeff"


def _excerpt(body: bytes | str) -> str:
    head = body[:_EXCERPT]
    text = head.decode("utf-8", "replace") if isinstance(head, bytes) else head
    return repr(text) + ("..." if len(body) > _EXCERPT else "")


def _first_char(body: bytes | str) -> str:
    """The first character of ``body`` that is not JSON white space or a byte order mark."""
    head = body[:1024]
    text = head.decode("utf-8", "replace") if isinstance(head, bytes) else head
    return text.lstrip(_BOM + _JSON_SPACE)[:1]


def load_json_array(
    body: bytes | str, *, url: str | None = None, status: int | None = None
) -> list[Any]:
    """Decode a DICOM JSON response body into its top-level array.

    An empty body (or one of white space only) is an empty array: QIDO-RS answers a search
    without matches with 204 No Content (PS3.18 8.3.4.3), and some servers send 200 with no
    body. The items are not checked here; :func:`dataset_from_json` checks each.

    Parameters
    ----------
    body : bytes or str
        The response body; bytes in UTF-8 (or UTF-16/32, which :func:`json.loads` detects).
    url, status : str or int, optional
        The request's URL and the response's status, for error messages.

    Returns
    -------
    list
        The decoded array.

    Raises
    ------
    DicomWebError
        ``html_error_page`` if the body starts with ``<``; ``malformed_json`` if it is not
        JSON or its top level is not an array.
    """
    first = _first_char(body)
    if not first:
        return []
    if first == "<":
        raise DicomWebError(
            f"expected DICOM JSON, got what looks like an HTML error page: {_excerpt(body)}; "
            "check the server's URL, credentials and logs",
            reason="html_error_page",
            url=url,
            status=status,
        )
    if isinstance(body, str):
        body = body.lstrip(_BOM)
    try:
        decoded = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, depth
        raise DicomWebError(
            f"body is not valid JSON ({exc.__class__.__name__}: {exc}): {_excerpt(body)}",
            reason="malformed_json",
            url=url,
            status=status,
        ) from exc
    if not isinstance(decoded, list):
        raise DicomWebError(
            f"DICOM JSON must be an array of datasets (PS3.18 F.2), got a JSON "
            f"{_json_type(decoded)}: {_excerpt(body)}",
            reason="malformed_json",
            url=url,
            status=status,
        )
    return decoded


def _json_type(value: object) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


class _Malformed(Exception):
    """Internal: a structural fault found by :func:`_walk`, with its path."""


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _path_text(path: TagPath) -> str:
    steps = [_tag_text(step) if i % 2 == 0 else f"[{step}]" for i, step in enumerate(path)]
    return "".join(steps) or "top level"


def _walk(obj: object, path: TagPath, uris: dict[TagPath, str]) -> dict[str, Any]:
    """Check the keys and ``vr`` of every element under ``obj``; move bulk data URIs out.

    Returns ``obj`` with each ``BulkDataURI`` element replaced by one without a value (a new
    dict where something was removed, ``obj`` itself where nothing was), and records each URI
    in ``uris``. pydicom then leaves those elements empty without a handler: a handler would
    cost an :func:`inspect.signature` call per element, half of the conversion time.
    """
    if not isinstance(obj, dict):
        raise _Malformed(
            f"{_path_text(path)}: a dataset must be a JSON object, not a {_json_type(obj)}"
        )
    cleaned: dict[str, Any] | None = None
    for key, element in obj.items():
        if not _TAG_KEY.fullmatch(key):
            raise _Malformed(
                f"{_path_text(path)}: key {key[:20]!r} is not a tag of eight hex digits"
            )
        tag = int(key, 16)
        here = (*path, tag)
        if not isinstance(element, dict):
            raise _Malformed(f"{_path_text(here)}: an element must be a JSON object")
        vr = element.get(_VR)
        if vr not in _VRS:
            raise _Malformed(f"{_path_text(here)}: 'vr' must be a VR of PS3.5, not {vr!r:.20}")
        if len(_VALUE_KEYS.intersection(element)) > 1:
            # PS3.18 F.2.2: one of them; pydicom would pick one at random (set order).
            raise _Malformed(
                f"{_path_text(here)}: an element has at most one of "
                f"{', '.join(sorted(_VALUE_KEYS))}"
            )
        inline = element.get(_INLINE_BINARY)
        if isinstance(inline, list) and len(inline) == 1:
            inline = inline[0]
        # pydicom's b64decode would silently drop what is not base64.
        if isinstance(inline, str) and not _BASE64.fullmatch(inline):
            raise _Malformed(f"{_path_text(here)}: InlineBinary is not base64 (RFC 4648)")
        replacement: dict[str, Any] | None = None
        if _BULK_DATA_URI in element:
            uri = element[_BULK_DATA_URI]
            # PS3.18 F.2.6 says a string; pydicom also takes a one-item list (Annex F.4's example).
            if isinstance(uri, list) and len(uri) == 1:
                uri = uri[0]
            if not isinstance(uri, str):
                raise _Malformed(f"{_path_text(here)}: BulkDataURI must be a string")
            uris[here] = uri
            replacement = {_VR: vr}
        elif vr == _SQ and element.get(_VALUE) is not None:
            items = element[_VALUE]
            if not isinstance(items, list):
                raise _Malformed(f"{_path_text(here)}: a sequence's Value must be an array")
            # pydicom reads a null item as an empty one.
            new_items = [
                item if item is None else _walk(item, (*here, i), uris)
                for i, item in enumerate(items)
            ]
            if any(new is not old for new, old in zip(new_items, items, strict=True)):
                replacement = {**element, _VALUE: new_items}
        if replacement is not None:
            if cleaned is None:
                cleaned = dict(obj)
            cleaned[key] = replacement
    return obj if cleaned is None else cleaned


def _convert(
    obj: object, *, url: str | None, status: int | None, index: int | None
) -> tuple[Dataset, dict[TagPath, str]]:
    uris: dict[TagPath, str] = {}
    try:
        cleaned = _walk(obj, (), uris)
        dataset = Dataset.from_json(cleaned)
    except _Malformed as exc:
        raise DicomWebError(
            f"malformed DICOM JSON dataset: {exc}",
            reason="malformed_json",
            url=url,
            status=status,
            index=index,
        ) from None
    except Exception as exc:  # whatever pydicom rejects, deep nesting included
        raise DicomWebError(
            f"pydicom rejected a DICOM JSON dataset ({exc.__class__.__name__}: {exc})",
            reason="malformed_json",
            url=url,
            status=status,
            index=index,
        ) from exc
    return dataset, uris


def dataset_from_json(
    obj: object, *, url: str | None = None, status: int | None = None, index: int | None = None
) -> Dataset:
    """Convert one DICOM JSON object (an item of a response array) to a Dataset.

    Elements given by ``BulkDataURI`` have the value ``None``; :func:`bulk_data_uris` lists
    their URIs.

    Parameters
    ----------
    obj : object
        One decoded item of the array (it should be a ``dict``).
    url, status : str or int, optional
        The request's URL and the response's status, for error messages.
    index : int, optional
        The item's position in its array, for error messages.

    Returns
    -------
    pydicom.dataset.Dataset

    Raises
    ------
    DicomWebError
        ``malformed_json`` if ``obj`` is not an object, a key is not eight hex digits, an
        element's ``vr`` is not a VR of PS3.5, it has more than one of ``Value``,
        ``InlineBinary`` and ``BulkDataURI``, its InlineBinary is not base64, or pydicom
        rejects it.
    """
    return _convert(obj, url=url, status=status, index=index)[0]


def bulk_data_uris(obj: Mapping[str, Any]) -> dict[TagPath, str]:
    """The ``BulkDataURI`` of every element under one DICOM JSON object, by :data:`TagPath`.

    Examples
    --------
    >>> bulk_data_uris({"7FE00010": {"vr": "OW", "BulkDataURI": "https://pacs/bulk/1"}})
    {(2145386512,): 'https://pacs/bulk/1'}

    Raises
    ------
    DicomWebError
        ``malformed_json`` for the structural faults :func:`dataset_from_json` reports.
    """
    uris: dict[TagPath, str] = {}
    try:
        _walk(obj, (), uris)
    except _Malformed as exc:
        raise DicomWebError(
            f"malformed DICOM JSON dataset: {exc}", reason="malformed_json"
        ) from None
    except RecursionError as exc:
        raise DicomWebError("DICOM JSON nested too deeply", reason="malformed_json") from exc
    return uris


def parse_datasets(
    body: bytes | str, *, url: str | None = None, status: int | None = None
) -> list[Dataset]:
    """Parse a QIDO-RS or WADO-RS metadata response body, failing on any bad dataset.

    Parameters
    ----------
    body : bytes or str
        The response body: a DICOM JSON array (PS3.18 F.2).
    url, status : str or int, optional
        The request's URL and the response's status, for error messages.

    Returns
    -------
    list of pydicom.dataset.Dataset
        One per array item, in order; ``BulkDataURI`` elements have the value ``None``.

    Raises
    ------
    DicomWebError
        ``html_error_page`` or ``malformed_json`` (see :func:`load_json_array` and
        :func:`dataset_from_json`); ``index`` names the first bad item.
    """
    items = load_json_array(body, url=url, status=status)
    return [dataset_from_json(obj, url=url, status=status, index=i) for i, obj in enumerate(items)]


def parse_datasets_with_bulk_data(
    body: bytes | str, *, url: str | None = None, status: int | None = None
) -> list[tuple[Dataset, dict[TagPath, str]]]:
    """Like :func:`parse_datasets`, with each dataset's bulk data URIs beside it.

    Returns
    -------
    list of (Dataset, dict)
        Per array item, the dataset (``BulkDataURI`` elements ``None``) and the URIs by
        :data:`TagPath`, as :func:`bulk_data_uris` gives them.

    Raises
    ------
    DicomWebError
        As :func:`parse_datasets`.
    """
    items = load_json_array(body, url=url, status=status)
    return [_convert(obj, url=url, status=status, index=i) for i, obj in enumerate(items)]


def parse_datasets_lenient(
    body: bytes | str, *, url: str | None = None, status: int | None = None
) -> tuple[list[Dataset], list[DicomWebError]]:
    """Parse a response body, keeping the good datasets and reporting each bad one.

    A body that is not a JSON array at all still raises: there is nothing to keep.

    Returns
    -------
    datasets : list of pydicom.dataset.Dataset
        The items that converted, in order.
    errors : list of DicomWebError
        One per item that did not, with its ``index`` in the array and its ``reason``.

    Raises
    ------
    DicomWebError
        ``html_error_page`` or ``malformed_json`` for the body as a whole
        (see :func:`load_json_array`).
    """
    items = load_json_array(body, url=url, status=status)
    datasets: list[Dataset] = []
    errors: list[DicomWebError] = []
    for i, obj in enumerate(items):
        try:
            datasets.append(dataset_from_json(obj, url=url, status=status, index=i))
        except DicomWebError as exc:
            errors.append(exc)
    return datasets, errors
