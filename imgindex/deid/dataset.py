"""The profile carried out on a whole DICOM dataset, for ``imgindex export --format dicom``.

Every element, in sequences too, gets its action from :class:`~imgindex.deid.profile.Profile`;
a date or date-time the table does not list is shifted too (removed without the dates
option); private elements go unless on the safe list. Then PatientID and PatientName become the
patient's pseudonym, the de-identification is recorded (PatientIdentityRemoved,
DeidentificationMethod and its code sequence, LongitudinalTemporalInformationModified) and the
file meta follows the new SOP Instance UID. Pixel data is never touched.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any, Final

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

from imgindex.deid.profile import Identity, clean_text

if TYPE_CHECKING:
    from pydicom.dataelem import DataElement

    from imgindex.deid.keys import Deidentifier

__all__ = [
    "DEIDENTIFICATION_METHOD",
    "ID_KEYWORDS",
    "NAME_KEYWORDS",
    "dataset_identity",
    "deidentify_dataset",
]

#: DeidentificationMethod's text (LO, at most 64 characters).
DEIDENTIFICATION_METHOD: Final = "imgindex PS3.15 E.1-1 keyed pseudonyms"
#: CID 7050 codes (DCM) of the profile and its options, by ProfileOptions field.
_CODES: Final = {
    None: ("113100", "Basic Application Confidentiality Profile"),
    "modified_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
}
#: Dummy values for action D, by VR (UIDs get a pseudonym instead).
_DUMMY: Final = {
    "AE": "ANONYMIZED",
    "AS": "000Y",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DS": "0",
    "DT": "19000101000000",
    "IS": "0",
    "LO": "ANONYMIZED",
    "LT": "ANONYMIZED",
    "PN": "ANONYMIZED",
    "SH": "ANONYMIZED",
    "ST": "ANONYMIZED",
    "TM": "000000",
    "UC": "ANONYMIZED",
    "UT": "ANONYMIZED",
}
_TEXT_VRS: Final = frozenset({"LO", "LT", "SH", "ST", "UC", "UT", "PN", "CS", "AE"})
#: Elements whose values name or identify the patient, their carers and the institution:
#: what Clean Descriptors removes from free text.
NAME_KEYWORDS: Final = (
    "PatientName",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "PatientAddress",
)
ID_KEYWORDS: Final = (
    "PatientID",
    "OtherPatientIDs",
    "AccessionNumber",
    "StudyID",
    "AdmissionID",
    "MedicalRecordLocator",
    "PatientTelephoneNumbers",
    "DeviceSerialNumber",
)


def dataset_identity(ds: Dataset, extra: Identity | None = None) -> Identity:
    """The names and IDs ``ds`` carries at its top level (and ``extra``'s), for cleaning."""

    def values(keywords: tuple[str, ...]) -> list[object]:
        found: list[object] = []
        for keyword in keywords:
            value = ds.get(keyword)
            if value is None or value == "":
                continue
            found.extend(value if isinstance(value, MultiValue | list) else [value])
        return found

    identity = Identity.of(values(NAME_KEYWORDS), values(ID_KEYWORDS))
    if extra is None:
        return identity
    return Identity(identity.words | extra.words, tuple({*identity.ids, *extra.ids}))


def deidentify_dataset(
    ds: Dataset, deid: Deidentifier, *, identity: Identity | None = None
) -> Dataset:
    """De-identify ``ds`` in place (and return it); see the module docstring.

    Parameters
    ----------
    ds : pydicom.Dataset
        A whole instance, read with its file meta. Pixel data stays as it is.
    deid : Deidentifier
        The key and the profile options. Disabled (``--no-deid``), nothing changes.
    identity : Identity, optional
        More names and IDs to clean out of descriptions (those of the instance are always
        used).
    """
    if not deid.enabled:
        return ds
    patient_id = str(ds.get("PatientID", "") or "")
    walk = _Walk(deid, patient_id, dataset_identity(ds, identity))
    walk.dataset(ds)
    options = deid.options
    pseudonym = deid.token("PatientID", patient_id)
    ds.PatientID = pseudonym
    ds.PatientName = pseudonym
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
    codes = DicomSequence()
    for field, (value, meaning) in _CODES.items():
        if field is None or getattr(options, field):
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            codes.append(item)
    ds.DeidentificationMethodCodeSequence = codes
    if options.modified_dates:
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
    elif "LongitudinalTemporalInformationModified" in ds:
        ds.LongitudinalTemporalInformationModified = "REMOVED"
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if "SOPClassUID" in ds:
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return ds


class _Walk:
    """One dataset's elements through the profile, recursing into sequences."""

    def __init__(self, deid: Deidentifier, patient_id: str, identity: Identity) -> None:
        self.deid = deid
        self.profile = deid.profile
        self.shift = dt.timedelta(days=deid.shift_days(patient_id))
        self.identity = identity

    def dataset(self, ds: Dataset) -> None:
        creators: dict[tuple[int, int], str] = {}
        kept_private: set[tuple[int, int]] = set()
        for elem in list(ds):
            tag = elem.tag
            if tag.group in (0x0000, 0x0002) or tag == 0x7FE00010:
                continue  # command, file meta, pixel data
            if tag.is_private:
                if tag.is_private_creator:
                    creators[(tag.group, tag.element)] = str(elem.value or "")
                    continue
                block = (tag.group, tag.element >> 8)
                creator = creators.get(block) or _creator(ds, block)
                if self.profile.private_action(creator, tag.group, tag.element) == "K":
                    kept_private.add(block)
                    continue
                del ds[tag]
                continue
            action = self.profile.action(int(tag))
            if action is None and elem.VR in ("DA", "DT"):
                # A date the table does not list (newer editions list more of them) is
                # still a date of this patient: shifted, or removed without the option.
                action = "C" if self.deid.options.modified_dates else "X"
            self.element(ds, elem, action)
        for group, element in creators:
            if (group, element) not in kept_private:
                del ds[(group << 16) | element]

    def element(self, ds: Dataset, elem: DataElement, action: str | None) -> None:
        vr = elem.VR
        if vr == "SQ":
            if action in ("X",):
                del ds[elem.tag]
            elif action == "Z":
                elem.value = DicomSequence()
            else:
                for item in elem.value or ():
                    self.dataset(item)
            return
        if action is None or action == "K":
            return
        if action == "X":
            del ds[elem.tag]
        elif action == "Z":
            elem.value = None if vr not in _TEXT_VRS and vr not in ("DA", "DT", "TM", "UI") else ""
        elif action == "U":
            elem.value = self._map(elem.value, lambda v: self.deid.uid(str(v)) if v else v)
        elif action == "D":
            if vr == "UI":
                elem.value = self._map(elem.value, lambda v: self.deid.uid(str(v)) if v else v)
            elif vr in ("DA", "DT") and self.deid.options.modified_dates:
                self._clean(ds, elem)
            else:
                elem.value = _DUMMY.get(vr)
                if elem.value is None:
                    del ds[elem.tag]
        else:  # C
            self._clean(ds, elem)

    def _clean(self, ds: Dataset, elem: DataElement) -> None:
        vr = elem.VR
        if vr == "DA":
            value = self._map(elem.value, self._shift_da)
        elif vr == "DT":
            value = self._map(elem.value, self._shift_dt)
        elif vr == "TM":
            return  # whole-day shifts keep the time of day
        elif vr in _TEXT_VRS and vr != "PN":
            value = self._map(elem.value, lambda v: clean_text(str(v), self.identity) or None)
        else:
            del ds[elem.tag]  # nothing imgindex knows how to clean: removed
            return
        if value is None or (isinstance(value, list) and not any(value)):
            del ds[elem.tag]
        else:
            elem.value = value

    def _shift_da(self, value: Any) -> str | None:
        text = str(value or "").strip()
        try:
            day = dt.datetime.strptime(text[:8], "%Y%m%d").date()
        except ValueError:
            return None  # a partial or malformed date cannot be shifted: removed
        if len(text) != 8:
            return None
        return (day + self.shift).strftime("%Y%m%d")

    def _shift_dt(self, value: Any) -> str | None:
        text = str(value or "").strip()
        try:
            day = dt.datetime.strptime(text[:8], "%Y%m%d").date()
        except ValueError:
            return None
        return (day + self.shift).strftime("%Y%m%d") + text[8:]

    @staticmethod
    def _map(value: Any, function: Any) -> Any:
        if isinstance(value, MultiValue | list):
            mapped = [function(v) for v in value]
            return [v for v in mapped if v is not None] or None
        return function(value)


def _creator(ds: Dataset, block: tuple[int, int]) -> str | None:
    group, element = block
    found: Any = ds.get((group << 16) | element)
    return None if found is None else str(found.value or "")
