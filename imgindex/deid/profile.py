"""The DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile, as data.

The profile's table (PS3.15 Table E.1-1: one row per attribute, an action code for the
Basic Profile and one per option) lives in ``ps3_15_e1_1.csv`` beside this module; private
attributes that may stay are in ``safe_private.csv``. This module reads them and resolves
one action per tag for the options in force; :mod:`imgindex.deid.dataset` and
:meth:`imgindex.deid.Deidentifier.attributes` carry the actions out.

The action codes (PS3.15 Table E.1-1 legend):

====  =====================================================================
D     replace with a non-zero-length dummy value consistent with the VR
Z     replace with a zero-length value (or a dummy)
X     remove
K     keep
C     clean: replace with values of similar meaning that identify no one
U     replace the UID with a non-zero-length UID, consistently within the set
====  =====================================================================

A combined code (``X/Z``, ``X/D``, ``Z/D``, ``X/Z/D``, ``X/Z/U*``) depends in the Standard
on the attribute's Type in the IOD; imgindex does not track IOD Types, so it takes the one
that keeps every IOD valid: ``U`` if offered, else ``D``, else ``Z`` (see
:func:`resolve_code`).
"""

from __future__ import annotations

import csv
import functools
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = [
    "OPTION_COLUMNS",
    "PROFILE_CSV",
    "SAFE_PRIVATE_CSV",
    "Identity",
    "Profile",
    "ProfileOptions",
    "Rule",
    "clean_text",
    "fold",
    "resolve_code",
]

PROFILE_CSV: Final = Path(__file__).with_name("ps3_15_e1_1.csv")
SAFE_PRIVATE_CSV: Final = Path(__file__).with_name("safe_private.csv")
#: The CSV columns of the options imgindex implements, by :class:`ProfileOptions` field.
OPTION_COLUMNS: Final = {
    "patient_characteristics": "characteristics",
    "modified_dates": "modified_dates",
    "clean_descriptors": "descriptors",
}
_ACTIONS: Final = frozenset("DZXKCU")


@dataclass(frozen=True)
class ProfileOptions:
    """The profile options in force (PS3.15 E.3); all three are on by default.

    Attributes
    ----------
    modified_dates : bool
        Retain Longitudinal Temporal Information with Modified Dates (E.3.6): dates and
        date-times are shifted by the patient's offset instead of removed.
    patient_characteristics : bool
        Retain Patient Characteristics (E.3.3): age, sex, size, weight and the like stay.
    clean_descriptors : bool
        Clean Descriptors (E.3.5): free-text descriptions stay once cleaned of the names,
        IDs and dates the instance carries.
    """

    modified_dates: bool = True
    patient_characteristics: bool = True
    clean_descriptors: bool = True

    @classmethod
    def parse(cls, text: str) -> ProfileOptions:
        """From ``--deid-options``: a comma-separated subset of ``dates``,
        ``characteristics``, ``descriptors``, or ``none`` (the Basic Profile alone).

        Raises
        ------
        ValueError
            On a name that is not an option.
        """
        names = {n.strip().lower() for n in text.split(",") if n.strip()}
        if names == {"none"}:
            return cls(False, False, False)
        unknown = names - set(_OPTION_NAMES)
        if unknown:
            raise ValueError(
                f"unknown de-identification option {', '.join(sorted(unknown))}; "
                f"the options are {', '.join(_OPTION_NAMES)} (or none)"
            )
        return cls(**{field: name in names for name, field in _OPTION_NAMES.items()})

    def describe(self) -> list[str]:
        """The options in force, as the Standard names them."""
        return [title for field, title in _OPTION_TITLES.items() if getattr(self, field)]


#: ``--deid-options`` names, by :class:`ProfileOptions` field.
_OPTION_NAMES: Final = {
    "dates": "modified_dates",
    "characteristics": "patient_characteristics",
    "descriptors": "clean_descriptors",
}
_OPTION_TITLES: Final = {
    "modified_dates": "Retain Longitudinal Temporal Information Modified Dates Option",
    "patient_characteristics": "Retain Patient Characteristics Option",
    "clean_descriptors": "Clean Descriptors Option",
}


@dataclass(frozen=True)
class Rule:
    """One row of PS3.15 Table E.1-1."""

    tag: str
    keyword: str
    name: str
    basic: str
    options: Mapping[str, str]


def resolve_code(code: str) -> str:
    """One action for a table code: a single code as it is; of a combined code, ``U`` if
    offered, else ``D``, else ``Z``, else ``X`` (a footnote ``*`` is ignored).

    Raises
    ------
    ValueError
        If the code holds no known action.
    """
    parts = {p.strip().rstrip("*") for p in code.split("/") if p.strip()}
    if not parts or not parts <= _ACTIONS:
        raise ValueError(f"not a PS3.15 action code: {code!r}")
    for action in ("U", "D", "Z", "X", "C", "K"):
        if action in parts:
            return action
    raise AssertionError(code)  # pragma: no cover (parts is a non-empty subset of _ACTIONS)


class Profile:
    """PS3.15 Table E.1-1 with the options in force, resolved to one action per tag.

    Use :meth:`default` for the table shipped with imgindex.
    """

    def __init__(
        self,
        rules: Iterable[Rule],
        safe_private: Iterable[tuple[str, int, int]] = (),
        options: ProfileOptions | None = None,
    ) -> None:
        self.options = options or ProfileOptions()
        self.rules = tuple(rules)
        self._exact: dict[int, str] = {}
        self._patterns: list[tuple[int, int, str]] = []  # (mask, value, action)
        self._private_rule: str | None = None
        for rule in self.rules:
            action = self._resolve(rule)
            if rule.tag == "ggggeeee":
                self._private_rule = action
            elif "x" in rule.tag.lower():
                mask = int("".join("0" if c in "xX" else "F" for c in rule.tag), 16)
                value = int("".join("0" if c in "xX" else c for c in rule.tag), 16)
                self._patterns.append((mask, value, action))
            else:
                self._exact[int(rule.tag, 16)] = action
        self._by_keyword = {
            rule.keyword: self._exact[int(rule.tag, 16)]
            for rule in self.rules
            if rule.keyword and "x" not in rule.tag.lower() and rule.tag != "ggggeeee"
        }
        self.safe_private = frozenset((c.strip().upper(), g, e) for c, g, e in safe_private)

    def __repr__(self) -> str:
        return f"Profile({len(self.rules)} rules, {self.options})"

    @classmethod
    def default(cls, options: ProfileOptions | None = None) -> Profile:
        """The shipped table (:data:`PROFILE_CSV`, :data:`SAFE_PRIVATE_CSV`) with ``options``."""
        return _default(options or ProfileOptions())

    def _resolve(self, rule: Rule) -> str:
        codes = [
            rule.options.get(column, "")
            for field, column in OPTION_COLUMNS.items()
            if getattr(self.options, field)
        ]
        chosen = [resolve_code(c) for c in codes if c]
        if "K" in chosen:
            return "K"
        if "C" in chosen:
            return "C"
        return resolve_code(rule.basic)

    def action(self, tag: int) -> str | None:
        """The action for ``tag`` (a standard attribute); ``None`` when the table does not
        list it, which the Basic Profile keeps. Private tags: see :meth:`private_action`."""
        found = self._exact.get(tag)
        if found is not None:
            return found
        for mask, value, action in self._patterns:
            if tag & mask == value:
                return action
        return None

    def keyword_action(self, keyword: str) -> str | None:
        """The action for a DICOM keyword; ``None`` when the table does not list it."""
        return self._by_keyword.get(keyword)

    def private_action(self, creator: str | None, group: int, element: int) -> str:
        """``K`` for a private element on the safe list (its creator, group and element
        byte), else the table's rule for private attributes (``X``)."""
        if creator is not None and (creator.strip().upper(), group, element & 0xFF) in (
            self.safe_private
        ):
            return "K"
        return self._private_rule or "X"


@functools.cache
def _default(options: ProfileOptions) -> Profile:
    return Profile(_read_rules(PROFILE_CSV), _read_safe_private(SAFE_PRIVATE_CSV), options)


def _data_lines(path: Path) -> list[str]:
    return [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]


@functools.cache
def _read_rules(path: Path) -> tuple[Rule, ...]:
    rules = []
    for row in csv.DictReader(_data_lines(path)):
        tag = row.pop("tag").strip()
        keyword = row.pop("keyword").strip()
        name = row.pop("name").strip()
        basic = row.pop("basic").strip()
        options = {k: v.strip() for k, v in row.items() if v and v.strip()}
        rules.append(Rule(tag, keyword, name, basic, options))
    return tuple(rules)


def _read_safe_private(path: Path) -> tuple[tuple[str, int, int], ...]:
    if not path.is_file():
        return ()
    return tuple(
        (row["creator"], int(row["group"], 16), int(row["element"], 16))
        for row in csv.DictReader(_data_lines(path))
    )


# --- cleaning free text ---------------------------------------------------------------------

_FOLD_LETTERS: Final = str.maketrans(
    {"ø": "o", "Ø": "o", "ł": "l", "Ł": "l", "đ": "d", "Đ": "d", "ð": "d", "Ð": "d",
     "ß": "ss", "æ": "ae", "Æ": "ae", "œ": "oe", "Œ": "oe", "þ": "th", "Þ": "th", "\u0131": "i",
     "ħ": "h", "Ħ": "h"}
)  # fmt: skip
_WORD: Final = re.compile(r"(\w+)")
_NAME_SPLIT: Final = re.compile(r"[\^=,\s\-']+")
#: Dates written in descriptions: 2023-10-03, 20231003, 03.10.2023, 3/10/23.
_DATE_TEXT: Final = re.compile(
    r"\b(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}|(?:19|20)\d{6})\b"
)
#: A run of five or more digits in a description is taken to be an identifier.
_LONG_NUMBER: Final = re.compile(r"^\d{5,}$")


def fold(text: str) -> str:
    """``text`` compared loosely: NFKD without accents, special letters spelt out
    (``ø`` as ``o``, ``ß`` as ``ss``), case-folded."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_FOLD_LETTERS))
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


@dataclass(frozen=True)
class Identity:
    """What cleaning removes from free text: the words of names (folded) and whole IDs."""

    words: frozenset[str]
    ids: tuple[str, ...]

    @classmethod
    def of(cls, names: Iterable[object] = (), ids: Iterable[object] = ()) -> Identity:
        """From person and institution names (split into components) and identifiers."""
        words = set()
        for name in names:
            if name is None:
                continue
            for part in _NAME_SPLIT.split(str(name)):
                for word in _WORD.findall(part):
                    if len(word) >= 2 and not word.isdigit():
                        words.add(fold(word))
        whole = sorted(
            {str(i).strip() for i in ids if i is not None and len(str(i).strip()) >= 3},
            key=len,
            reverse=True,
        )
        return cls(frozenset(words), tuple(whole))


def clean_text(text: str, identity: Identity) -> str:
    """``text`` without the names, IDs and dates of ``identity``, nor long numbers
    (PS3.15 E.3.5 Clean Descriptors). What is left is returned with single spaces; an empty
    string means nothing was worth keeping."""
    for identifier in identity.ids:
        text = re.sub(re.escape(identifier), " ", text, flags=re.IGNORECASE)
    text = _DATE_TEXT.sub(" ", text)
    parts = _WORD.split(text)
    out: list[str] = []
    separator = ""
    dropped = False
    for position, part in enumerate(parts):
        if position % 2 == 0:  # the text between words; after a dropped word, dropped too
            separator += part if not dropped else "".join(c for c in part if c in "([")
            continue
        if fold(part) in identity.words or _LONG_NUMBER.match(part):
            if out:  # a bracket the kept text opened still closes
                out.append("".join(c for c in separator if c in ")]"))
            separator, dropped = " ", True
            continue
        if out:
            out.append(separator if separator.strip() else " ")
        else:
            out.append("".join(c for c in separator if c in "(["))
        out.append(part)
        separator, dropped = "", False
    if out and not dropped and separator.strip() in (")", "]", ".", "?", "!"):
        out.append(separator.strip())
    return "".join(out).strip()
