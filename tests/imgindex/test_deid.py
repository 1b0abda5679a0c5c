"""imgindex.deid: the attribute gate and keyed pseudonyms export relies on."""

from __future__ import annotations

import copy
import datetime as dt
import stat
from typing import TYPE_CHECKING

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from imgindex.deid import (
    SHIFT_DAYS,
    Deidentifier,
    Identity,
    Profile,
    ProfileOptions,
    clean_text,
    deidentify_dataset,
    read_key_file,
)
from imgindex.deid.profile import resolve_code
from imgindex.errors import ConfigError
from imgindex.testing import make_series

if TYPE_CHECKING:
    from pathlib import Path

KEY = b"k" * 32
#: _dataset() plants a partial date on purpose, which pydicom warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR DA:UserWarning")


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
            "entry_date": dt.date(2023, 10, 1),
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
        "entry_date",
    }
    # Retain Longitudinal Temporal Information with Modified Dates: shifted, not removed.
    shifted = dt.date(2023, 10, 1) + dt.timedelta(days=deid.shift_days("PAT-001"))
    assert out["StudyDate"] == shifted.isoformat()
    assert out["entry_date"] == shifted.isoformat()  # a cohort's date label moves alike
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


# --- the profile ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "action"),
    [("Z", "Z"), ("X/Z", "Z"), ("X/D", "D"), ("Z/D", "D"), ("X/Z/D", "D"), ("X/Z/U*", "U")],
)
def test_combined_codes_resolve_to_the_one_that_keeps_every_iod_valid(
    code: str, action: str
) -> None:
    assert resolve_code(code) == action


def test_a_code_that_is_no_action_is_refused() -> None:
    with pytest.raises(ValueError, match=r"not a PS3\.15 action code"):
        resolve_code("Q")


def test_options_change_the_actions_the_table_gives() -> None:
    full = Profile.default()
    basic = Profile.default(ProfileOptions.parse("none"))
    assert (full.keyword_action("StudyDate"), basic.keyword_action("StudyDate")) == ("C", "Z")
    assert (full.keyword_action("PatientAge"), basic.keyword_action("PatientAge")) == ("K", "X")
    assert full.keyword_action("SeriesDescription") == "C"
    assert basic.keyword_action("SeriesDescription") == "X"
    assert full.keyword_action("StudyInstanceUID") == "U"
    assert full.keyword_action("Manufacturer") is None  # not in the table: kept
    assert full.action(0x50001234) == "X"  # (50xx,xxxx) curve data, a wildcard row
    assert full.action(0x60024000) == "X"  # (60xx,4000) overlay comments
    assert full.private_action("ACME 1.0", 0x0011, 0x1001) == "X"


def test_unknown_option_names_are_refused_with_the_list() -> None:
    with pytest.raises(ValueError, match="dates, characteristics, descriptors"):
        ProfileOptions.parse("dates,faces")


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("CT Thorax Schröder-Løvås Verlauf", "CT Thorax Verlauf"),
        ("SCHRODER, LOVAS (follow-up)", "(follow-up)"),  # case and accents do not hide it
        ("Kontrolle 2023-10-03 PLANT-77310", "Kontrolle"),  # dates and IDs go too
        ("Patient 1234567 scan", "Patient scan"),  # a long number may be an ID
        ("AX T2 FLAIR 5mm", "AX T2 FLAIR 5mm"),  # what identifies no one stays
        ("(Head) Zoë", "(Head)"),
        ("Zoë", ""),
    ],
)
def test_clean_text_removes_names_ids_and_dates(text: str, cleaned: str) -> None:
    identity = Identity.of(["Schröder-Løvås^Zoë Ingrid"], ["PLANT-77310"])
    assert clean_text(text, identity) == cleaned


def _dataset() -> Dataset:
    ds = make_series(77, "CT", 1, 8, 8)[0]
    ds.PatientName = "Schröder^Zoë"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.InstitutionName = "Sankt Wendelinus"
    ds.SeriesDescription = "Thorax Schröder"
    ds.AcquisitionDateTime = "20231003101500.25"
    ds.InstanceCreationDate = "20231003"  # not in the table's edition: shifted anyway
    ds.ContentDate = "2023"  # a partial date cannot be shifted: removed
    item = Dataset()
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.ReferencedSOPClassUID = ds.SOPClassUID
    ds.ReferencedImageSequence = DicomSequence([item])
    person = Dataset()
    person.PersonName = "Kovačević^Anđela"
    ds.ReferringPhysicianIdentificationSequence = DicomSequence([person])
    block = ds.private_block(0x0011, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", "Schröder^Zoë")
    return ds


def test_a_dataset_goes_through_the_profile_in_sequences_and_private_blocks() -> None:
    deid = Deidentifier(KEY)
    ds = _dataset()
    original = copy.deepcopy(ds)
    pixels = ds.PixelData
    deidentify_dataset(ds, deid)
    shift = dt.timedelta(days=deid.shift_days(original.PatientID))
    token = deid.token("PatientID", original.PatientID)
    assert (ds.PatientID, str(ds.PatientName)) == (token, token)
    assert ds.InstitutionName == "ANONYMIZED"  # D: a dummy, so a Type 1 use stays valid
    assert ds.SeriesDescription == "Thorax"
    day = dt.datetime.strptime(original.StudyDate, "%Y%m%d").date() + shift
    assert ds.StudyDate == day.strftime("%Y%m%d")
    assert ds.AcquisitionDateTime == "20231003101500.25".replace(
        "20231003", (dt.date(2023, 10, 3) + shift).strftime("%Y%m%d")
    )
    assert ds.InstanceCreationDate == (dt.date(2023, 10, 3) + shift).strftime("%Y%m%d")
    assert "ContentDate" not in ds
    assert ds.SOPInstanceUID == deid.uid(original.SOPInstanceUID)
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert ds.ReferencedImageSequence[0].ReferencedSOPClassUID == original.SOPClassUID
    assert "ReferringPhysicianIdentificationSequence" not in ds
    assert not [elem for elem in ds if elem.tag.group == 0x0011]  # creator gone too
    assert ds.PixelData == pixels
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_the_basic_profile_alone_removes_dates_and_descriptions() -> None:
    ds = _dataset()
    deidentify_dataset(ds, Deidentifier(KEY, ProfileOptions.parse("none")))
    assert ds.StudyDate == ""  # Z
    assert "SeriesDescription" not in ds  # X
    assert "InstanceCreationDate" not in ds
    assert "PatientAge" not in ds
    codes = {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
    assert codes == {"113100"}


def test_a_disabled_deidentifier_changes_nothing() -> None:
    ds = _dataset()
    before = ds.to_json_dict()
    deidentify_dataset(ds, Deidentifier(KEY, enabled=False))
    assert ds.to_json_dict() == before
    attrs = {"PatientName": "A^B", "StudyDate": dt.date(2023, 1, 2)}
    assert Deidentifier(KEY, enabled=False).attributes(attrs) == {
        "PatientName": "A^B",
        "StudyDate": "2023-01-02",
    }


def test_date_shifts_are_per_patient_never_zero_and_within_range() -> None:
    deid = Deidentifier(KEY)
    shifts = {deid.shift_days(f"P{i}") for i in range(500)}
    low, high = SHIFT_DAYS
    assert all(low <= s <= high < 0 for s in shifts)
    assert len(shifts) > 400  # spread out, not a handful of values
    assert deid.shift_days(" P1 ") == deid.shift_days("P1")  # as EMR links strip it
    assert Deidentifier(b"x" * 32).shift_days("P1") != deid.shift_days("P1")


def test_key_files_take_hex_or_raw_bytes_and_refuse_short_ones(tmp_path: Path) -> None:
    hex_file = tmp_path / "hex.key"
    hex_file.write_text("ab" * 32 + "\n")
    assert read_key_file(hex_file) == bytes.fromhex("ab" * 32)
    raw = tmp_path / "raw.key"
    raw.write_bytes(b"\x00\xff" * 16)
    assert read_key_file(raw) == b"\x00\xff" * 16
    short = tmp_path / "short.key"
    short.write_text("abcd")
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        read_key_file(short)
    with pytest.raises(ConfigError, match="cannot read"):
        read_key_file(tmp_path / "missing.key")
