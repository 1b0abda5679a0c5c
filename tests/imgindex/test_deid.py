"""imgindex.deid: the attribute gate and keyed pseudonyms export relies on."""

from __future__ import annotations

import datetime as dt
import stat
from typing import TYPE_CHECKING

import pytest

from imgindex.deid import Deidentifier, ProfileOptions

if TYPE_CHECKING:
    from pathlib import Path

KEY = b"k" * 32


def test_gate_keeps_safe_pseudonymizes_ids_and_drops_the_rest() -> None:
    deid = Deidentifier(KEY)
    out = deid.attributes(
        {
            "Modality": "CT",
            "spacing": [1.0, 0.5, 0.5],
            "PatientID": "PAT-001",
            "person_id": 42,
            "SeriesInstanceUID": "1.2.3.4",
            "PatientName": "Müller^Jürgen",
            "StudyDate": "20231001",
            "SeriesDescription": "CHEST Müller",
            "AccessionNumber": "ACC1",
            "coronary_procedure_days": 9,
            "coronary_procedure_count": 1,
            "entry_date": "2023-10-01",
            "note_count": "free text",
        }
    )
    assert set(out) == {
        "Modality",
        "spacing",
        "PatientID",
        "person_id",
        "SeriesInstanceUID",
        "StudyDate",
        "SeriesDescription",
        "coronary_procedure_days",
        "coronary_procedure_count",
    }
    # Retain Longitudinal Temporal Information with Modified Dates: shifted, not removed.
    shifted = dt.date(2023, 10, 1) + dt.timedelta(days=deid.shift_days("PAT-001"))
    assert out["StudyDate"] == shifted.isoformat()
    # Clean Descriptors: kept without the name.
    assert out["SeriesDescription"] == "CHEST"
    # The Basic Profile alone removes both.
    basic = Deidentifier(KEY, ProfileOptions.parse("none")).attributes(
        {"PatientID": "PAT-001", "StudyDate": "20231001", "SeriesDescription": "CHEST"}
    )
    assert set(basic) == {"PatientID"}
    assert out["PatientID"] != "PAT-001"
    assert len(out["PatientID"]) == 24
    assert out["SeriesInstanceUID"].startswith("2.25.")
    assert len(out["SeriesInstanceUID"]) <= 64  # a valid UID length
    assert out["PatientID"] != deid.token("person_id", "PAT-001")  # kinds do not collide


def test_pseudonyms_are_stable_for_a_key_and_differ_across_keys() -> None:
    one, again, other = Deidentifier(KEY), Deidentifier(KEY), Deidentifier(b"x" * 32)
    assert one.uid("1.2.3") == again.uid("1.2.3")
    assert one.token("PatientID", "A") == again.token("PatientID", "A")
    assert one.uid("1.2.3") != other.uid("1.2.3")
    assert one.uid("1.2.3") != one.uid("1.2.4")
    assert "kkkk" not in repr(one)


def test_the_root_key_is_made_once_and_private(tmp_path: Path) -> None:
    first = Deidentifier.for_root(tmp_path)
    path = tmp_path / "secrets" / "deid.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Deidentifier.for_root(tmp_path).key == first.key
    assert not [p for p in path.parent.iterdir() if p.name != "deid.key"]


def test_short_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        Deidentifier(b"short")
