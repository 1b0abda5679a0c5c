"""The cohort engine against an independent DuckDB formulation of ``docs/cohorts.md``.

Two layers, so that each can be trusted on its own:

* ``test_reference_*``: the DuckDB reference (``_cohort_world.reference_select``) gives the
  rows worked out by hand on small hand-built worlds, one world per topic (windows,
  occurrences, code sets, criteria, imaging, linking).
* ``test_engine_*``: :func:`imgindex.cohort.select` gives the same selection as the reference:
  the (person_id, SeriesInstanceUID, entry_date, days_from_index) set, the
  ``<name>_count``/``<name>_days`` columns and the attrition counts.

Day numbers in comments are ``event_date - entry_date``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from _cohort_world import (
    AMI,
    ASPIRIN,
    CABG,
    CORONARY,
    DEATH,
    ER_VISIT,
    FEMALE,
    HEART_FAILURE,
    MI,
    OLD_MI,
    OTHER_CONDITION,
    PCI,
    SUB_AMI,
    TROPONIN,
    UNKNOWN_GENDER,
    Reference,
    World,
    day,
    reference_select,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from pathlib import Path

    import pyarrow as pa

# ---------------------------------------------------------------------------------------------
# Code sets and cohorts


CODESETS: dict[str, dict[str, Any]] = {
    "mi": {"concepts": [MI], "descendants": True},
    "cabg": {"concepts": [CABG]},
    "pci": {"concepts": [PCI]},
    "coronary": {"concepts": [CORONARY], "descendants": True},
    "heart_failure": {"concepts": [HEART_FAILURE]},
    "aspirin": {"concepts": [ASPIRIN]},
    "troponin": {"concepts": [TROPONIN]},
    "death": {"concepts": [DEATH]},
    "er_visit": {"concepts": [ER_VISIT]},
}


def _used_codesets(cohort: Mapping[str, Any]) -> list[str]:
    criteria = [cohort["entry"]]
    for kind in ("inclusion", "exclusion", "labels"):
        criteria += cohort.get(kind) or []
    return list(dict.fromkeys(c["codeset"] for c in criteria))


def make_cohort(name: str, **parts: Any) -> dict[str, Any]:
    """A cohort dict: MI entry 2023-10-01..10 unless told otherwise, used code sets inlined."""
    cohort: dict[str, Any] = {
        "name": name,
        "entry": {
            "domain": "condition",
            "codeset": "mi",
            "dates": {"from": day("10-01"), "to": day("10-10")},
        },
    }
    cohort.update({k: v for k, v in parts.items() if v is not None})
    codesets = dict(cohort.pop("codesets", {}))
    for used in _used_codesets(cohort):
        if used not in codesets:
            codesets[used] = CODESETS[used]
    return {"name": name, "codesets": codesets, **{k: v for k, v in cohort.items() if k != "name"}}


def entry(
    occurrence: str = "first", *, start: str | None = "10-01", end: str | None = "10-10"
) -> dict[str, Any]:
    """An MI entry with ``dates: {from: start, to: end}`` (a None end is left out)."""
    bounds = {"from": start, "to": end}
    return {
        "domain": "condition",
        "codeset": "mi",
        "occurrence": occurrence,
        "dates": {k: day(v) for k, v in bounds.items() if v is not None},
    }


# ---------------------------------------------------------------------------------------------
# Worlds, one per topic


def world_windows() -> World:
    """Entry range ends, inclusion window ends, imaging window ends, imaging-date fallbacks."""
    w = World()

    def mi_cabg(pid: int, mi: str, cabg: Iterable[str], concept: int = AMI) -> None:
        w.person(pid)
        w.event("condition", pid, mi, concept)
        for d in cabg:
            w.event("procedure", pid, d, CABG)

    mi_cabg(1, "10-03", ["10-10"])  # CABG day 7
    for uid, d in [("a1.m1", "10-02"), ("a1.0", "10-03"), ("a1.30", "11-02"), ("a1.31", "11-03")]:
        w.series("P1", uid, study_date=d)
    mi_cabg(2, "10-03", ["10-17", "10-12"])  # days 14 and 9
    w.series("P2", "a2.5", study_date="10-08")
    mi_cabg(3, "10-03", ["10-09", "10-18"])  # days 6 and 15: none in [7, 14]
    w.series("P3", "a3.5", study_date="10-08")
    mi_cabg(4, "10-01", ["10-08"], concept=MI)  # entry on the range's first day; CABG day 7
    w.series("P4", "a4.0", study_date="10-01")
    w.series("P4", "a4.sd", series_date="10-02")  # no StudyDate: SeriesDate, day 1
    w.series("P4", "a4.acq", acquisition_date="10-05")  # only an acquisition date: day 4
    w.series("P4", "a4.none")  # no date at all
    w.series("P4", "a4.study", study_date="11-05", series_date="10-05")  # StudyDate wins: day 35
    mi_cabg(5, "10-10", ["10-24"])  # entry on the range's last day; CABG day 14
    w.series("P5", "a5.1", study_date="10-11")
    mi_cabg(6, "09-30", ["10-07"])  # first MI the day before the range
    w.series("P6", "a6.1", study_date="10-01")
    mi_cabg(7, "10-11", ["10-18"])  # first MI the day after the range
    w.series("P7", "a7.1", study_date="10-12")
    mi_cabg(8, "10-05", ["10-12"])  # no imaging at all
    mi_cabg(9, "10-05", ["10-12"])  # only MR
    w.series("P9", "a9.mr", study_date="10-05", modality="MR")
    w.series("ORPHAN", "a.orphan", study_date="10-05")  # an index patient without EMR person
    return w


def world_occurrences() -> World:
    """Several MI events per person, for first / first_in_range / all."""
    w = World()
    w.person(1)
    w.event("condition", 1, "09-28", AMI)  # before the range
    w.event("condition", 1, "10-03", AMI)
    w.series("P1", "b1.5", study_date="10-05")
    w.person(2)
    w.event("condition", 2, "10-02", AMI)
    w.event("condition", 2, "10-02", SUB_AMI)  # same day: one entry event
    w.event("condition", 2, "10-06", MI)
    w.event("procedure", 2, "10-05", PCI)  # day 3 from 10-02, day -1 from 10-06
    w.event("procedure", 2, "10-07", CABG)  # day 5 from 10-02, day 1 from 10-06
    w.series("P2", "b2.a", study_date="10-04")  # day 2 from 10-02, day -2 from 10-06
    w.series("P2", "b2.b", study_date="10-08")  # day 6 from 10-02, day 2 from 10-06
    w.series("P2", "b2.c", study_date="11-03")  # day 32 from 10-02, day 28 from 10-06
    w.person(3)
    w.event("condition", 3, "2019-05-01", AMI)  # recorded years before
    w.event("condition", 3, "10-05", AMI)
    w.series("P3", "b3.0", study_date="10-05")
    w.person(4)
    for d in ("10-04", "10-09", "10-11"):
        w.event("condition", 4, d, AMI)
    w.series("P4", "b4.x", study_date="10-09")  # day 5 from 10-04, day 0 from 10-09
    w.person(5)
    w.event("condition", 5, "10-12", AMI)  # only after the range
    w.series("P5", "b5", study_date="10-12")
    return w


#: world_codesets: person -> (condition_concept_id, condition_source_value), all on 10-05.
CODED = {
    1: (MI, None),
    2: (AMI, None),
    3: (SUB_AMI, None),
    4: (OLD_MI, None),
    5: (0, "I21.4"),
    6: (0, "i214"),
    7: (0, "I2"),
    8: (0, "I21"),
    9: (0, "I22.1"),
    10: (0, "I210"),
    11: (0, "I24.1"),
    12: (OLD_MI, "I21.9"),
    13: (OTHER_CONDITION, None),
    14: (OTHER_CONDITION, "I21.A"),
    15: (0, "I21.40"),
    16: (0, "i.21.4"),
}


def world_codesets() -> World:
    w = World()
    for pid, (concept, source) in CODED.items():
        w.person(pid)
        w.event("condition", pid, "10-05", concept, source)
        w.series(f"P{pid}", f"c{pid}", study_date="10-06")
    return w


def _d(days: int) -> dt.date:
    """A day relative to 2023-10-05, the entry day of world_criteria."""
    return day("10-05") + dt.timedelta(days=days)


def world_criteria() -> World:
    """Everyone enters on 2023-10-05 with one CT on 10-06; criteria and demographics differ."""
    w = World()
    births = {3: 2005, 4: 2006, 5: 1943, 6: 1942}  # ages 18, 17, 80, 81 in 2023
    genders = {2: FEMALE, 3: FEMALE, 6: FEMALE, 7: UNKNOWN_GENDER}
    for pid in range(1, 18):
        w.person(pid, year_of_birth=births.get(pid, 1960), gender=genders.get(pid, 8507))
        w.event("condition", pid, _d(0), AMI)
        w.series(f"P{pid}", f"d{pid}", study_date="10-06")
    for pid, days in {1: [1, 2], 2: [1], 4: [-1]}.items():
        for n in days:
            w.event("procedure", pid, _d(n), PCI)
    for pid, n in {5: -1, 6: 0, 7: -365, 8: -366}.items():
        w.event("condition", pid, _d(n), HEART_FAILURE)
    # 9: two days; 10: two rows on one day (each row is an event: two events)
    for pid, days in {9: [-10, -5], 10: [-3, -3]}.items():
        for n in days:
            w.event("drug", pid, _d(n), ASPIRIN)
    for pid, value in {11: 0.04, 12: 10.0, 13: 0.039, 14: 10.01, 15: None}.items():
        w.event("measurement", pid, _d(0), TROPONIN, value=value)
    w.event("observation", 16, _d(200), DEATH)
    w.event("observation", 17, _d(366), DEATH)
    w.event("visit", 16, _d(0), ER_VISIT)
    w.event("visit", 17, _d(1), ER_VISIT)
    return w


def world_imaging() -> World:
    w = World()
    w.person(1)
    w.event("condition", 1, "10-05", AMI)
    for uid, modality, body, description, n in [
        ("e.chest", "CT", "CHEST", "CT Chest 1.25mm", 30),
        ("e.chest_lower", "CT", "chest", "Axial 5mm", 30),
        ("e.heart", "CT", "HEART", "Cardiac CTA", 30),
        ("e.abdomen", "CT", "ABDOMEN", "CT Abdomen", 30),
        ("e.mr", "MR", "CHEST", "T1 chest", 30),
        ("e.scout", "CT", "CHEST", "Scout", 30),
        ("e.topogram", "CT", "CHEST", "TOPOGRAM SCOUT view", 30),
        ("e.nodesc", "CT", "CHEST", None, 30),
        ("e.i20", "CT", "CHEST", "Thin", 20),
        ("e.i19", "CT", "CHEST", "Thin", 19),
        ("e.nobody", "CT", None, "CT Chest", 30),
        ("e.lowermod", "ct", "CHEST", "CT Chest", 30),
    ]:
        w.series(
            "P1",
            uid,
            study_date="10-05",
            modality=modality,
            body_part=body,
            description=description,
            instances=n,
        )
    return w


def world_crosswalk() -> World:
    """The crosswalk, when present, replaces person_source_value."""
    w = World()
    for pid in range(1, 5):
        w.person(pid, source=f"OLD{pid}" if pid < 4 else "X4")
        w.event("condition", pid, "10-05", AMI)
    w.crosswalk("X1a", 1)
    w.crosswalk("X1b", 1)
    w.crosswalk("X2", 2)
    w.crosswalk("GONE", 3)  # a PatientID the index does not have
    for patient, uid in [
        ("X1a", "f1a"),
        ("X1b", "f1b"),
        ("X2", "f2"),
        ("OLD1", "f.old1"),  # person 1's person_source_value: ignored with a crosswalk
        ("OLD3", "f.old3"),
        ("X4", "f4"),  # person 4's person_source_value, not in the crosswalk
        ("ORPHAN", "f.orphan"),
    ]:
        w.series(patient, uid, study_date="10-06")
    return w


def world_linking() -> World:
    """person_source_value = PatientID, exactly; unlinked persons and orphan patients."""
    w = World()
    w.person(1)
    w.person(2, source=None)
    w.person(3)  # no series
    w.person(4, source="p4")  # the index has "P4"
    for pid in range(1, 5):
        w.event("condition", pid, "10-05", AMI)
    w.series("P1", "g1", study_date="10-06")
    w.series("P4", "g4", study_date="10-06")
    w.series("ORPHAN", "g.orphan", study_date="10-06")
    return w


WORLDS: dict[str, Callable[[], World]] = {
    "windows": world_windows,
    "occurrences": world_occurrences,
    "codesets": world_codesets,
    "criteria": world_criteria,
    "imaging": world_imaging,
    "crosswalk": world_crosswalk,
    "linking": world_linking,
}


@pytest.fixture(scope="module")
def world_root(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``world_root(name)``: the root of world ``name``, written on first use."""
    roots: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in roots:
            roots[name] = WORLDS[name]().write(tmp_path_factory.mktemp(f"world-{name}"))
        return roots[name]

    return get


# ---------------------------------------------------------------------------------------------
# Cases: a cohort on a world, with the selection worked out by hand

Row = tuple[int, str, dt.date, int | None]


@dataclasses.dataclass(frozen=True)
class Case:
    """A cohort on a world; ``rows``, ``columns`` and ``attrition`` were worked out by hand.

    ``columns``: SeriesInstanceUID -> the expected ``<name>_count``/``<name>_days`` values.
    ``attrition``: (persons, entry_events) per step, in the doc's order.
    """

    id: str
    world: str
    cohort: dict[str, Any]
    rows: frozenset[Row]
    columns: dict[str, dict[str, Any]]
    attrition: list[tuple[int, int]] | None


def case(
    id: str,
    world: str,
    rows: Iterable[tuple[int, str, str, int | None]],
    *,
    columns: Mapping[str, Mapping[str, Any]] | None = None,
    attrition: list[tuple[int, int]] | None = None,
    **parts: Any,
) -> Case:
    """A :class:`Case`; ``parts`` are the cohort's keys (see :func:`make_cohort`)."""
    return Case(
        id=id,
        world=world,
        cohort=make_cohort(id, **parts),
        rows=frozenset((p, uid, day(d), n) for p, uid, d, n in rows),
        columns={k: dict(v) for k, v in (columns or {}).items()},
        attrition=attrition,
    )


def counted(name: str, by_series: Mapping[str, tuple[int, int | None]]) -> dict[str, Any]:
    """Expected ``<name>_count`` and ``<name>_days`` per series."""
    return {
        uid: {f"{name}_count": n, f"{name}_days": first} for uid, (n, first) in by_series.items()
    }


def merged(*parts: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for part in parts:
        for uid, values in part.items():
            out.setdefault(uid, {}).update(values)
    return out


CABG_7_14 = {"name": "cabg", "domain": "procedure", "codeset": "cabg", "after": [7, 14]}
PCI_0_30 = {"name": "pci", "domain": "procedure", "codeset": "pci", "after": [0, 30]}
DEATH_0_365 = {"name": "death", "domain": "observation", "codeset": "death", "after": [0, 365]}
HF_PRIOR = {"name": "hf", "domain": "condition", "codeset": "heart_failure", "before": [1, 365]}
ASPIRIN_2 = {
    "name": "aspirin",
    "domain": "drug",
    "codeset": "aspirin",
    "before": [0, 30],
    "at_least": 2,
}
CT = {"modality": ["CT"]}
CT_0_30 = {"modality": ["CT"], "after": [0, 30]}

WINDOW_ROWS = [
    (1, "a1.0", "10-03", 0),
    (1, "a1.30", "10-03", 30),
    (2, "a2.5", "10-03", 5),
    (4, "a4.0", "10-01", 0),
    (4, "a4.sd", "10-01", 1),
    (4, "a4.acq", "10-01", 4),
    (5, "a5.1", "10-10", 1),
]
WINDOW_CABG = counted(
    "cabg",
    {
        "a1.0": (1, 7),
        "a1.30": (1, 7),
        "a2.5": (2, 9),
        "a4.0": (1, 7),
        "a4.sd": (1, 7),
        "a4.acq": (1, 7),
        "a5.1": (1, 14),
    },
)


def coded(id: str, codeset: dict[str, Any], persons: Iterable[int]) -> Case:
    """A world_codesets case: who enters with entry code set ``codeset``."""
    return case(
        id,
        "codesets",
        [(p, f"c{p}", "10-05", 1) for p in persons],
        codesets={"x": codeset},
        entry={"domain": "condition", "codeset": "x", "dates": {"from": day("10-01")}},
        imaging=CT,
    )


def criteria(id: str, persons: Iterable[int], **parts: Any) -> Case:
    """A world_criteria case: everyone enters on 10-05 and has one CT on 10-06 (day 1)."""
    return case(
        id, "criteria", [(p, f"d{p}", "10-05", 1) for p in persons], **{"imaging": CT, **parts}
    )


def imaged(id: str, uids: Iterable[str], imaging: dict[str, Any]) -> Case:
    """A world_imaging case: which of person 1's series (all taken on the entry day)."""
    return case(id, "imaging", [(1, uid, "10-05", 0) for uid in uids], imaging=imaging)


EVERYONE = range(1, 18)  # world_criteria's persons

CASES = [
    # -- windows ----------------------------------------------------------------------------------
    case(
        "mi_cad_ct",
        "windows",
        WINDOW_ROWS,
        inclusion=[CABG_7_14],
        imaging=CT_0_30,
        columns=WINDOW_CABG,
        # entry: 1-5, 8, 9; CABG in [7, 14]: not 3; linked (has a PatientID): all six, 8
        # included though the index has no series of it; CT in window: not 8, not 9.
        attrition=[(7, 7), (7, 7), (6, 6), (6, 6), (4, 4), (4, 4)],
    ),
    case(
        "imaging_without_window",
        "windows",
        [
            (1, "a1.m1", "10-03", -1),
            (1, "a1.0", "10-03", 0),
            (1, "a1.30", "10-03", 30),
            (1, "a1.31", "10-03", 31),
            (2, "a2.5", "10-03", 5),
            (4, "a4.0", "10-01", 0),
            (4, "a4.sd", "10-01", 1),
            (4, "a4.acq", "10-01", 4),
            (4, "a4.none", "10-01", None),  # no imaging date: selected when there is no window
            (4, "a4.study", "10-01", 35),
            (5, "a5.1", "10-10", 1),
        ],
        inclusion=[CABG_7_14],
        imaging=CT,
    ),
    *[
        case(
            f"imaging_{key}_window",
            "windows",
            [(1, "a1.m1", "10-03", -1), (1, "a1.0", "10-03", 0), (4, "a4.0", "10-01", 0)],
            inclusion=[CABG_7_14],
            imaging={"modality": ["CT"], key: window},
        )
        for key, window in [("before", [0, 1]), ("days", [-1, 0])]
    ],
    case(
        "inclusion_open_end",
        "windows",
        [*WINDOW_ROWS, (3, "a3.5", "10-03", 5)],
        inclusion=[{**CABG_7_14, "after": [7, None]}],
        imaging=CT_0_30,
        columns=merged(WINDOW_CABG, counted("cabg", {"a3.5": (1, 15)})),
    ),
    case(
        "inclusion_open_start",
        "windows",
        [(3, "a3.5", "10-03", 5)],
        inclusion=[{"name": "cabg", "domain": "procedure", "codeset": "cabg", "days": [None, 6]}],
        imaging=CT_0_30,
        columns=counted("cabg", {"a3.5": (1, 6)}),
    ),
    case(
        "entry_from_only",
        "windows",
        [(5, "a5.1", "10-10", 1), (7, "a7.1", "10-11", 1)],
        entry=entry(start="10-05", end=None),
        inclusion=[CABG_7_14],
        imaging=CT_0_30,
        # entry: 5, 7, 8, 9; all have CABG on day 7-14; all have a PatientID; CT: not 8, 9.
        attrition=[(4, 4), (4, 4), (4, 4), (4, 4), (2, 2), (2, 2)],
    ),
    # -- occurrences ------------------------------------------------------------------------------
    case(
        "occurrence_first",
        "occurrences",
        [(2, "b2.a", "10-02", 2), (2, "b2.b", "10-02", 6), (4, "b4.x", "10-04", 5)],
        entry=entry("first"),
        labels=[PCI_0_30],
        imaging=CT_0_30,
        columns=counted("pci", {"b2.a": (1, 3), "b2.b": (1, 3), "b4.x": (0, None)}),
        attrition=[(2, 2)] * 5,
    ),
    case(
        "occurrence_first_in_range",
        "occurrences",
        [
            (1, "b1.5", "10-03", 2),
            (2, "b2.a", "10-02", 2),
            (2, "b2.b", "10-02", 6),
            (3, "b3.0", "10-05", 0),
            (4, "b4.x", "10-04", 5),
        ],
        entry=entry("first_in_range"),
        labels=[PCI_0_30],
        imaging=CT_0_30,
        columns=counted(
            "pci",
            {"b1.5": (0, None), "b2.a": (1, 3), "b2.b": (1, 3), "b3.0": (0, None)},
        ),
        attrition=[(4, 4)] * 5,
    ),
    case(
        "occurrence_first_in_range_to_only",
        "occurrences",
        [(1, "b1.5", "09-28", 7), (2, "b2.a", "10-02", 2), (2, "b2.b", "10-02", 6)],
        entry=entry("first_in_range", start=None, end="10-03"),
        imaging=CT_0_30,
        # entry: 1 (09-28), 2 (10-02), 3 (2019-05-01); person 3 has no CT 0-30 days after.
        attrition=[(3, 3), (3, 3), (3, 3), (2, 2), (2, 2)],
    ),
    case(
        "occurrence_all",
        "occurrences",
        [
            (1, "b1.5", "10-03", 2),
            (2, "b2.a", "10-02", 2),
            (2, "b2.b", "10-02", 6),  # in both entries' windows: the earlier one
            (2, "b2.c", "10-06", 28),  # only in the second entry's window
            (3, "b3.0", "10-05", 0),
            (4, "b4.x", "10-04", 5),
        ],
        entry=entry("all"),
        labels=[PCI_0_30],
        imaging=CT_0_30,
        # the PCI on 10-05 is day 3 from 10-02 and day -1 from 10-06
        columns=counted("pci", {"b2.a": (1, 3), "b2.b": (1, 3), "b2.c": (0, None)}),
        # entry events: 1x1, 2x2 (10-02 twice is one), 3x1, 4x2
        attrition=[(4, 6), (4, 6), (4, 6), (4, 6), (4, 5)],
    ),
    case(
        "occurrence_all_criteria_per_event",
        "occurrences",
        # CABG on 10-07: day 5 from 10-02 (fails [0, 3]), day 1 from 10-06 (holds)
        [(2, "b2.b", "10-06", 2), (2, "b2.c", "10-06", 28)],
        entry=entry("all"),
        inclusion=[{"name": "cabg", "domain": "procedure", "codeset": "cabg", "after": [0, 3]}],
        labels=[PCI_0_30],
        imaging=CT_0_30,
        columns=merged(
            counted("cabg", {"b2.b": (1, 1), "b2.c": (1, 1)}),
            counted("pci", {"b2.b": (0, None), "b2.c": (0, None)}),
        ),
        attrition=[(4, 6), (4, 6), (1, 1), (1, 1), (1, 1), (1, 1)],
    ),
    case(
        "occurrence_first_criteria_fail",
        "occurrences",
        [],
        entry=entry("first"),
        inclusion=[{"name": "cabg", "domain": "procedure", "codeset": "cabg", "after": [0, 3]}],
        imaging=CT_0_30,
        attrition=[(2, 2), (2, 2), (0, 0), (0, 0), (0, 0), (0, 0)],
    ),
    # -- code sets --------------------------------------------------------------------------------
    coded("codeset_descendants", {"concepts": [MI], "descendants": True}, [1, 2, 3, 4, 12]),
    coded("codeset_no_descendants", {"concepts": [MI]}, [1]),
    coded("codeset_child_only", {"concepts": [AMI], "descendants": False}, [2]),
    coded(
        "codeset_exclude",
        {"concepts": [MI], "descendants": True, "exclude": [OLD_MI]},
        [1, 2, 3],
    ),
    coded(
        "codeset_exclude_descendants",
        {"concepts": [MI], "descendants": True, "exclude": [AMI]},
        [1, 4, 12],
    ),
    coded("codeset_source_prefix", {"source_codes": ["I21*"]}, [5, 6, 8, 10, 12, 14, 15, 16]),
    coded("codeset_source_exact", {"source_codes": ["I21.4"]}, [5, 6, 16]),
    coded("codeset_source_lowercase", {"source_codes": ["i22*"]}, [9]),
    coded(
        "codeset_concepts_or_sources",
        {"concepts": [AMI], "descendants": True, "source_codes": ["I22*", "I24.1"]},
        [2, 3, 9, 11],
    ),
    # Literal reading: `exclude` removes concepts from `concepts`, not rows matched by source
    # code, so person 12 (OLD_MI coded I21.9) is in.
    coded(
        "codeset_exclude_keeps_source_matches",
        {"concepts": [MI], "descendants": True, "exclude": [OLD_MI], "source_codes": ["I21*"]},
        [1, 2, 3, 5, 6, 8, 10, 12, 14, 15, 16],
    ),
    # -- inclusion, exclusion, labels, measurement values, demographics ---------------------------
    criteria(
        "at_least_2",
        [1],
        inclusion=[{**PCI_0_30, "at_least": 2}],
        columns=counted("pci", {"d1": (2, 1)}),
    ),
    criteria(
        "at_most_0",
        range(3, 18),
        inclusion=[{**PCI_0_30, "at_most": 0}],
        columns=counted("pci", {f"d{p}": (0, None) for p in range(3, 18)}),
    ),
    criteria(
        "at_least_0_at_most_0",
        range(3, 18),
        inclusion=[{**PCI_0_30, "at_least": 0, "at_most": 0}],
        columns=counted("pci", {f"d{p}": (0, None) for p in range(3, 18)}),
    ),
    criteria(
        "at_least_1_at_most_1",
        [2],
        inclusion=[{**PCI_0_30, "at_least": 1, "at_most": 1}],
        columns=counted("pci", {"d2": (1, 1)}),
    ),
    # heart failure on days -1 (5), 0 (6), -365 (7), -366 (8); before: [1, 365] is -365..-1
    criteria("exclusion_before", [p for p in EVERYONE if p not in (5, 7)], exclusion=[HF_PRIOR]),
    criteria(
        "exclusion_at_least_2", [p for p in EVERYONE if p not in (9, 10)], exclusion=[ASPIRIN_2]
    ),
    criteria(
        "measurement_value",
        [11, 12],  # 0.04 and 10.0 are in [0.04, 10]; 0.039, 10.01 and null are not
        inclusion=[
            {
                "name": "troponin",
                "domain": "measurement",
                "codeset": "troponin",
                "days": [0, 0],
                "value": {"min": 0.04, "max": 10},
            }
        ],
        columns=counted("troponin", {"d11": (1, 0), "d12": (1, 0)}),
    ),
    criteria(
        "measurement_value_min_only",
        [12, 14],  # 10.0 and 10.01
        inclusion=[
            {
                "name": "troponin",
                "domain": "measurement",
                "codeset": "troponin",
                "after": [0, 0],
                "value": {"min": 10},
            }
        ],
        columns=counted("troponin", {"d12": (1, 0), "d14": (1, 0)}),
    ),
    criteria(
        "visit_and_label",
        [16],
        inclusion=[{"name": "er", "domain": "visit", "codeset": "er_visit", "days": [0, 0]}],
        labels=[DEATH_0_365],
        columns=merged(counted("er", {"d16": (1, 0)}), counted("death", {"d16": (1, 200)})),
    ),
    criteria(
        "labels_only_no_imaging",
        EVERYONE,
        imaging=None,
        labels=[DEATH_0_365, PCI_0_30],
        columns=merged(
            counted("death", {f"d{p}": (0, None) for p in EVERYONE if p != 16}),
            counted("death", {"d16": (1, 200)}),  # day 366 (person 17) is outside [0, 365]
            counted("pci", {f"d{p}": (0, None) for p in EVERYONE if p not in (1, 2)}),
            counted("pci", {"d1": (2, 1), "d2": (1, 1)}),
        ),
    ),
    # born 2005 (18), 2006 (17: 4), 1943 (80), 1942 (81: 6)
    criteria(
        "age",
        [p for p in EVERYONE if p not in (4, 6)],
        demographics={"age": {"min": 18, "max": 80}},
    ),
    criteria("gender_by_name", [2, 3, 6], demographics={"gender": ["female"]}),
    criteria("gender_by_id", [2, 3, 6], demographics={"gender": [FEMALE]}),
    criteria(
        "gender_mixed",
        [p for p in EVERYONE if p not in (2, 3, 6)],
        demographics={"gender": ["male", UNKNOWN_GENDER]},
    ),
    criteria(
        "everything_attrition",
        [3, 6, 8, 11, 12, 13, 14, 15, 16, 17],
        demographics={"age": {"min": 18}, "gender": ["female", "male"]},
        inclusion=[{**PCI_0_30, "at_most": 0}],
        exclusion=[HF_PRIOR, ASPIRIN_2],
        labels=[DEATH_0_365],
        columns=merged(counted("death", {"d16": (1, 200), "d17": (0, None)})),
        # demographics: not 4 (17), 7 (unknown gender); pci: not 1, 2; hf: not 5; aspirin: not 9, 10
        attrition=[(17, 17), (15, 15), (13, 13), (12, 12), (10, 10), (10, 10), (10, 10), (10, 10)],
    ),
    # -- imaging criteria -------------------------------------------------------------------------
    imaged(
        "imaging_all_criteria",
        ["e.chest", "e.chest_lower", "e.heart", "e.i20"],
        {
            "modality": ["CT"],
            "body_part": ["CHEST", "HEART"],
            "series_description": ["*", "!*scout*"],
            "min_instances": 20,
        },
    ),
    imaged(
        "imaging_description_globs",
        ["e.chest_lower", "e.heart"],
        {"series_description": ["ax?al*", "*CARDIAC*"]},
    ),
    imaged(
        "imaging_body_part_any_case",
        [
            "e.chest",
            "e.chest_lower",
            "e.mr",
            "e.scout",
            "e.topogram",
            "e.nodesc",
            "e.i20",
            "e.i19",
            "e.lowermod",
        ],
        {"body_part": ["chest"]},
    ),
    imaged(
        "imaging_modality_exact",
        [
            "e.chest",
            "e.chest_lower",
            "e.heart",
            "e.abdomen",
            "e.scout",
            "e.topogram",
            "e.nodesc",
            "e.i20",
            "e.i19",
            "e.nobody",
        ],
        {"modality": ["CT"]},
    ),
    imaged(
        "imaging_min_instances",
        [
            "e.chest",
            "e.chest_lower",
            "e.heart",
            "e.abdomen",
            "e.mr",
            "e.scout",
            "e.topogram",
            "e.nodesc",
            "e.i20",
            "e.nobody",
            "e.lowermod",
        ],
        {"min_instances": 20},
    ),
    # -- linking ----------------------------------------------------------------------------------
    case(
        "crosswalk",
        "crosswalk",
        [(1, "f1a", "10-05", 1), (1, "f1b", "10-05", 1), (2, "f2", "10-05", 1)],
        imaging=CT,
        # linked: 1, 2 and 3 (3's crosswalk PatientID is not in the index, but it has one;
        # 4 is not in the crosswalk); imaging: 1 and 2.
        attrition=[(4, 4), (4, 4), (3, 3), (2, 2), (2, 2)],
    ),
    case(
        "person_source_value",
        "linking",
        [(1, "g1", "10-05", 1)],
        imaging=CT,
        # linked: 1, 3 and 4 (2 has no source value; 3 has no series and 4 is "p4" while the
        # index has "P4", but both have a PatientID); imaging: only 1.
        attrition=[(4, 4), (4, 4), (3, 3), (1, 1), (1, 1)],
    ),
]


# ---------------------------------------------------------------------------------------------
# Comparing the engine with the reference

#: Columns of the selection (docs/cohorts.md, "The selection"), besides the label columns.
SELECTION_COLUMNS = [
    "person_id",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "AccessionNumber",
    "Modality",
    "BodyPartExamined",
    "SeriesDescription",
    "instance_count",
    "imaging_date",
    "entry_date",
    "days_from_index",
    "cohort",
    "cohort_sha256",
]


def engine_select(cohort: Mapping[str, Any], root: Path, base_dir: Path | None = None) -> Any:
    """The engine's selection (imported here: the engine may not exist yet)."""
    from imgindex.cohort import Cohort, select

    return select(Cohort.from_dict(cohort, base_dir=base_dir), root)


def disagreements(ref: Reference, selection: Any) -> list[str]:
    """Every way the engine's selection differs from the reference, for people."""
    table: pa.Table = selection.table
    problems: list[str] = []
    missing = [c for c in [*SELECTION_COLUMNS, *ref.label_columns] if c not in table.column_names]
    if missing:
        problems.append(f"selection lacks columns {missing}")
    got_rows = table.to_pylist()
    uids = [r.get("SeriesInstanceUID") for r in got_rows]
    if len(uids) != len(set(uids)):
        twice = sorted(u for u in set(uids) if uids.count(u) > 1)
        problems.append(f"series selected more than once: {twice}")
    if missing:
        return problems
    got = {
        (r["person_id"], r["SeriesInstanceUID"], r["entry_date"], r["days_from_index"])
        for r in got_rows
    }
    want = ref.keys()
    if got != want:
        problems.append(
            "(person_id, series, entry_date, days_from_index):\n"
            f"  expected, not got: {sorted(want - got, key=repr)}\n"
            f"  got, not expected: {sorted(got - want, key=repr)}"
        )
    for r in got_rows:
        if r["imaging_date"] is not None and r["entry_date"] is not None:
            days = (r["imaging_date"] - r["entry_date"]).days
            if r["days_from_index"] != days:
                problems.append(f"{r['SeriesInstanceUID']}: days_from_index != imaging - entry")
    by_series = {r["SeriesInstanceUID"]: r for r in got_rows}
    for uid, expected in ref.by_series().items():
        if uid not in by_series:
            continue
        for column in ref.label_columns:
            if by_series[uid][column] != expected[column]:
                problems.append(
                    f"{uid}.{column}: expected {expected[column]!r}, got {by_series[uid][column]!r}"
                )
    problems += attrition_disagreements(ref, selection.attrition.to_pylist())
    return problems


#: Steps the engine may leave out: "demographics" when the cohort has none, and "series
#: selected" (the doc lists it after the steps; whether it is a row of the table is open).
OPTIONAL_STEPS = {"demographics", "series selected"}


def attrition_disagreements(ref: Reference, steps: list[dict[str, Any]]) -> list[str]:
    """The engine's attrition rows against the reference's, matched by step name.

    Names follow the engine's spelling ("inclusion: <name>"); the doc gives only the order.
    """
    problems = []
    got = {s["step"]: (s["persons"], s["entry_events"]) for s in steps}
    want = {name: (persons, events) for name, persons, events in ref.attrition}
    order = [s["step"] for s in steps if s["step"] in want]
    if order != [name for name in want if name in got]:
        problems.append(f"attrition steps out of order: {[s['step'] for s in steps]}")
    for name, (persons, events) in want.items():
        if name not in got:
            if name not in OPTIONAL_STEPS or (name == "demographics" and ref.demographics):
                problems.append(f"attrition lacks the step {name!r}")
            continue
        accepted = {events}
        if name == "series selected":  # entry events of this step: not defined by the doc
            accepted.add(got[name][1])
        if name == "with matching imaging":
            # Open in the doc: an entry event with a matching series in its window, or one
            # that a series was selected for (a series goes to the earliest only).
            accepted.add(want["series selected"][1])
        if got[name][0] != persons or got[name][1] not in accepted:
            problems.append(
                f"attrition {name!r}: expected {persons} persons / {events} entry events, "
                f"got {got[name][0]} / {got[name][1]}"
            )
    problems += [f"attrition has an unknown step {name!r}" for name in got if name not in want]
    return problems


def assert_agrees(ref: Reference, selection: Any) -> None:
    problems = disagreements(ref, selection)
    assert not problems, "engine and reference disagree:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# Tests


_REFERENCES: dict[tuple[Path, str], Reference] = {}


def reference_of(c: Case, root: Path) -> Reference:
    """The reference's selection for case ``c`` (computed once per world root)."""
    if (root, c.id) not in _REFERENCES:
        _REFERENCES[root, c.id] = reference_select(c.cohort, root)
    return _REFERENCES[root, c.id]


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_reference_gives_the_hand_worked_selection(
    c: Case, world_root: Callable[[str], Path]
) -> None:
    ref = reference_of(c, world_root(c.world))
    assert ref.keys() == set(c.rows)
    by_series = ref.by_series()
    for uid, values in c.columns.items():
        assert {k: by_series[uid][k] for k in values} == values, uid
    if c.attrition is not None:
        assert [(p, e) for _, p, e in ref.attrition] == c.attrition


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_engine_agrees_with_reference(c: Case, world_root: Callable[[str], Path]) -> None:
    root = world_root(c.world)
    assert_agrees(reference_of(c, root), engine_select(c.cohort, root))


def test_engine_selection_columns(world_root: Callable[[str], Path]) -> None:
    c = CASES[0]
    table = engine_select(c.cohort, world_root(c.world)).table
    rows = {r["SeriesInstanceUID"]: r for r in table.to_pylist()}
    assert rows["a4.sd"]["PatientID"] == "P4"
    assert rows["a4.sd"]["imaging_date"] == day("10-02")
    assert rows["a4.sd"]["AccessionNumber"] == "ACC.study.a4.sd"
    assert rows["a4.sd"]["StudyInstanceUID"] == "study.a4.sd"
    assert {r["cohort"] for r in rows.values()} == {c.cohort["name"]}
    (digest,) = {r["cohort_sha256"] for r in rows.values()}
    assert re.fullmatch(r"[0-9a-f]{64}", digest)


# -- cohort files: code sets from codesets/, validation errors -------------------------------------

COHORT_FILE = f"""\
name: mi-cad-ct-files
codesets:
  mi:
    concepts: [{MI}]
    descendants: true
  coronary: coronary_procedures
entry:
  domain: condition
  codeset: mi
  dates: {{from: 2023-10-01, to: 2023-10-10}}
  occurrence: first
inclusion:
  - name: cabg
    domain: procedure
    codeset: cabg
    after: [7, 14]
labels:
  - name: coronary
    domain: procedure
    codeset: coronary
    after: [0, 30]
imaging:
  modality: [CT]
  after: [0, 30]
"""


def write_cohort_folder(folder: Path) -> Path:
    """A cohort file whose code sets ``cabg`` and ``coronary`` live in ``codesets/``."""
    (folder / "codesets").mkdir(parents=True)
    (folder / "codesets" / "cabg.yaml").write_text(f"concepts: [{CABG}]\n", "utf-8")
    (folder / "codesets" / "coronary_procedures.yaml").write_text(
        f"concepts: [{CORONARY}]\ndescendants: true\n", "utf-8"
    )
    path = folder / "mi_cad_ct.yaml"
    path.write_text(COHORT_FILE, "utf-8")
    return path


def test_reference_reads_codesets_folder(tmp_path: Path, world_root: Callable[[str], Path]) -> None:
    path = write_cohort_folder(tmp_path / "cohorts")
    ref = reference_select(yaml.safe_load(path.read_text()), world_root("windows"), path.parent)
    assert ref.keys() == {(p, uid, day(d), n) for p, uid, d, n in WINDOW_ROWS}
    for uid, values in WINDOW_CABG.items():
        n, first = values["cabg_count"], values["cabg_days"]
        assert ref.by_series()[uid]["coronary_count"] == n  # the coronary procedures are CABGs
        assert ref.by_series()[uid]["coronary_days"] == first


def test_engine_reads_codesets_folder(tmp_path: Path, world_root: Callable[[str], Path]) -> None:
    from imgindex.cohort import Cohort, select

    path = write_cohort_folder(tmp_path / "cohorts")
    root = world_root("windows")
    ref = reference_select(yaml.safe_load(path.read_text()), root, path.parent)
    assert_agrees(ref, select(Cohort.from_yaml(path), root))
    as_dict = Cohort.from_dict(yaml.safe_load(path.read_text()), base_dir=path.parent)
    assert_agrees(ref, select(as_dict, root))


VALID_FILE = f"""\
name: bad
codesets:
  mi: {{concepts: [{MI}], descendants: true}}
  cabg: {{concepts: [{CABG}]}}
entry:
  domain: condition
  codeset: mi
  dates: {{from: 2023-10-01, to: 2023-10-10}}
inclusion:
  - name: cabg
    domain: procedure
    codeset: cabg
    after: [7, 14]
exclusion:
  - name: prior_mi
    domain: condition
    codeset: mi
    before: [1, 365]
imaging:
  modality: [CT]
  after: [0, 30]
"""


@pytest.mark.parametrize(
    ("line", "bad_line", "field"),
    [
        ("    after: [7, 14]", "    after: [14, 7]", "inclusion[0].after"),
        ("exclusion:", "exlusion:", "exlusion"),
        ("    domain: procedure", "    domain: surgery", "inclusion[0].domain"),
        (
            "    codeset: mi\n    before",
            "    codeset: prior_mi\n    before",
            "exclusion[0].codeset",
        ),
    ],
    ids=["window_backwards", "unknown_key", "unknown_domain", "undefined_codeset"],
)
def test_engine_rejects_bad_cohort_file(
    tmp_path: Path, line: str, bad_line: str, field: str
) -> None:
    from imgindex.cohort import Cohort
    from imgindex.errors import CohortError

    good = tmp_path / "good.yaml"
    good.write_text(VALID_FILE, "utf-8")
    Cohort.from_yaml(good)  # the file is fine before the one change
    assert VALID_FILE.count(line) == 1
    text = VALID_FILE.replace(line, bad_line)
    number = text.splitlines().index(bad_line.split("\n")[0]) + 1
    path = tmp_path / "mi_bad.yaml"
    path.write_text(text, "utf-8")
    with pytest.raises(CohortError) as info:
        Cohort.from_yaml(path)
    message = str(info.value)
    assert "mi_bad.yaml" in message
    assert re.search(rf"\bline {number}\b", message), message
    assert field in message


# -- generated worlds (imgindex.testing.omop) ---------------------------------------------------

SEEDS = [11, 12]


def generated_cohorts() -> dict[str, dict[str, Any]]:
    """The MI/CAD question of issue 5 and variants that use the rest of the rules."""
    from imgindex.testing import omop

    mi_cad = yaml.safe_load(omop.MI_CAD_CT.to_yaml())
    mi_codes = {"concepts": [omop.MYOCARDIAL_INFARCTION], "descendants": True}
    drugs = {"aspirin": {"concepts": [ASPIRIN]}}
    return {
        "mi_cad_ct": mi_cad,
        "mi_every_event": {
            **mi_cad,
            "name": "mi-every-event",
            "codesets": {
                **mi_cad["codesets"],
                **drugs,
                "mi_sources": {"source_codes": ["I21*", "i22*"]},
                "hypertension": {"concepts": [omop.HYPERTENSIVE_DISORDER], "descendants": True},
                "creatinine": {"concepts": [3016723]},
            },
            "entry": {
                "domain": "condition",
                "codeset": "mi_sources",
                "dates": {"from": dt.date(2023, 9, 20), "to": dt.date(2023, 10, 20)},
                "occurrence": "all",
            },
            "exclusion": [
                {
                    "name": "hypertension",
                    "domain": "condition",
                    "codeset": "hypertension",
                    "before": [1, None],
                }
            ],
            "labels": [
                {"name": "aspirin", "domain": "drug", "codeset": "aspirin", "after": [0, 30]},
                {
                    "name": "creatinine",
                    "domain": "measurement",
                    "codeset": "creatinine",
                    "value": {"min": 0.5, "max": 1.2},
                },
            ],
            "imaging": {
                "modality": ["CT"],
                "body_part": ["chest", "Heart"],
                "series_description": ["*", "!*topogram*", "!dose*"],
                "min_instances": 20,
                "days": [-1, 30],
            },
        },
        "mi_first_in_range": {
            "name": "mi-first-in-range",
            "codesets": {"mi": mi_codes, "coronary": mi_cad["codesets"]["procedure_codes"]},
            "entry": {
                "domain": "condition",
                "codeset": "mi",
                "dates": {"from": dt.date(2023, 10, 1), "to": dt.date(2023, 10, 10)},
                "occurrence": "first_in_range",
            },
            "demographics": {"age": {"min": 40, "max": 85}, "gender": ["male"]},
            "inclusion": [
                {
                    "name": "coronary",
                    "domain": "procedure",
                    "codeset": "coronary",
                    "after": [0, 30],
                    "at_least": 1,
                    "at_most": 1,
                }
            ],
            "imaging": {"modality": ["CT", "XA"], "before": [0, 30]},
        },
        "hypertension_every_event": {
            "name": "hypertension-every-event",
            "codesets": {
                "hypertension": {"source_codes": ["I10"]},
                **drugs,
                "any_visit": {
                    "concepts": [omop.VISIT_INPATIENT, omop.VISIT_OUTPATIENT, omop.VISIT_EMERGENCY]
                },
                "outpatient": {"concepts": [omop.VISIT_OUTPATIENT]},
            },
            "entry": {
                "domain": "condition",
                "codeset": "hypertension",
                "dates": {"from": dt.date(2020, 1, 1), "to": dt.date(2022, 12, 31)},
                "occurrence": "all",
            },
            "demographics": {"age": {"min": 50, "max": 80}, "gender": ["female", 8507]},
            "inclusion": [
                {"name": "aspirin", "domain": "drug", "codeset": "aspirin"}  # whole record
            ],
            "exclusion": [
                {
                    "name": "visits",
                    "domain": "visit",
                    "codeset": "any_visit",
                    "before": [0, None],
                    "at_least": 2,
                }
            ],
            "labels": [{"name": "outpatient", "domain": "visit", "codeset": "outpatient"}],
            "imaging": {"modality": ["CT", "MR"], "after": [0, 730]},
        },
    }


@pytest.fixture(scope="module", params=SEEDS, ids=[f"seed{s}" for s in SEEDS])
def generated_root(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A generated world of 3000 patients (imgindex.testing.omop), written once per seed."""
    from imgindex.testing.omop import generate_world, write_world

    root = tmp_path_factory.mktemp(f"generated-{request.param}")
    write_world(generate_world(3000, seed=request.param), root)
    return root


def test_reference_agrees_with_the_generators_mi_cad_answer(generated_root: Path) -> None:
    # Two independent hand-written answers to the MI/CAD question over the same files.
    from imgindex.testing.omop import reference_duckdb

    ref = reference_select(generated_cohorts()["mi_cad_ct"], generated_root)
    theirs = reference_duckdb(generated_root).to_pylist()
    assert len(ref.rows) > 20
    assert ref.keys() == {
        (r["person_id"], r["SeriesInstanceUID"], r["entry_date"], r["days_from_index"])
        for r in theirs
    }


@pytest.mark.parametrize("name", list(generated_cohorts()))
def test_engine_agrees_with_reference_on_generated_world(generated_root: Path, name: str) -> None:
    cohort = generated_cohorts()[name]
    ref = reference_select(cohort, generated_root)
    assert ref.rows, f"{name} selects nothing on this world: not a useful check"
    assert_agrees(ref, engine_select(cohort, generated_root))
