"""The cohort model: what a cohort YAML file says, as validated Python objects.

docs/cohorts.md is the user's description of every field and its semantics; this module
checks a definition against it and reports mistakes with the file, line and field. The
engine that runs a cohort is :mod:`imgindex.cohort.engine`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from datetime import date  # noqa: TC003 (pydantic needs it at run time)
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from imgindex.errors import CohortError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "DOMAINS",
    "CodeSet",
    "Cohort",
    "Criterion",
    "DateRange",
    "Demographics",
    "Entry",
    "Imaging",
    "ValueRange",
]

Domain = Literal["condition", "procedure", "drug", "measurement", "observation", "visit"]


class _DomainSpec:
    __slots__ = ("concept", "date", "source", "table")

    def __init__(self, table: str, concept: str, source: str, date_column: str) -> None:
        self.table = table
        self.concept = concept
        self.source = source
        self.date = date_column


#: Per domain: its OMOP table, concept column, source code column and date column.
DOMAINS: dict[str, _DomainSpec] = {
    "condition": _DomainSpec(
        "condition_occurrence",
        "condition_concept_id",
        "condition_source_value",
        "condition_start_date",
    ),
    "procedure": _DomainSpec(
        "procedure_occurrence", "procedure_concept_id", "procedure_source_value", "procedure_date"
    ),
    "drug": _DomainSpec(
        "drug_exposure", "drug_concept_id", "drug_source_value", "drug_exposure_start_date"
    ),
    "measurement": _DomainSpec(
        "measurement", "measurement_concept_id", "measurement_source_value", "measurement_date"
    ),
    "observation": _DomainSpec(
        "observation", "observation_concept_id", "observation_source_value", "observation_date"
    ),
    "visit": _DomainSpec(
        "visit_occurrence", "visit_concept_id", "visit_source_value", "visit_start_date"
    ),
}

#: Gender names a cohort may use, and their OMOP concepts.
GENDERS = {"female": 8532, "male": 8507}

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CODESET_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_RESERVED_LABEL_COLUMNS = {"cohort", "cohort_sha256"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class CodeSet(_Model):
    """Concept ids (with or without descendants) and/or source codes with prefix wildcards."""

    concepts: tuple[int, ...] = ()
    descendants: bool = False
    source_codes: tuple[str, ...] = ()
    exclude: tuple[int, ...] = ()

    @field_validator("source_codes", mode="before")
    @classmethod
    def _numbers_are_codes(cls, codes: Any) -> Any:
        # CPT-4 codes such as 92928 read from YAML as integers.
        if isinstance(codes, (list, tuple)):
            return [str(c) if isinstance(c, int) and not isinstance(c, bool) else c for c in codes]
        return codes

    @field_validator("source_codes")
    @classmethod
    def _codes(cls, codes: tuple[str, ...]) -> tuple[str, ...]:
        for code in codes:
            body = code.removesuffix("*")
            if not body or "*" in body:
                raise ValueError(
                    f"source code {code!r}: use a code, or a code followed by one '*' "
                    "(a prefix, e.g. I21*)"
                )
        return codes

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if not self.concepts and not self.source_codes:
            raise ValueError("a code set needs `concepts` or `source_codes` (or both)")
        return self


def _normal_code(code: str) -> str:
    return code.replace(".", "").upper()


class DateRange(_Model):
    """Inclusive calendar dates; either end may be left out."""

    from_: date | None = Field(default=None, alias="from")
    to: date | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.from_ is not None and self.to is not None and self.from_ > self.to:
            raise ValueError(f"`from` ({self.from_}) is after `to` ({self.to})")
        return self


_Pair = tuple[int | None, int | None]


class _Windowed(_Model):
    """A day window relative to the entry event: one of `after`, `before`, `days`."""

    after: _Pair | None = None
    before: _Pair | None = None
    days: _Pair | None = None

    @field_validator("after", "before", "days")
    @classmethod
    def _pair(cls, pair: _Pair | None, info: ValidationInfo) -> _Pair | None:
        if pair is None:
            return None
        first, last = pair
        if info.field_name in ("after", "before") and any(
            v is not None and v < 0 for v in (first, last)
        ):
            raise ValueError(
                f"`{info.field_name}` counts days away from the entry event and cannot be "
                "negative; use `days: [a, b]` for a window that crosses it"
            )
        if first is not None and last is not None and first > last:
            raise ValueError(f"the window's first day ({first}) is after its last ({last})")
        return pair

    @model_validator(mode="after")
    def _one_window(self) -> Self:
        given = [k for k in ("after", "before", "days") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one window, not {' and '.join(given)}")
        return self

    @property
    def window(self) -> tuple[int | None, int | None] | None:
        """The window as (first day, last day) relative to the entry, or None for none."""
        if self.after is not None:
            return self.after
        if self.before is not None:
            first, last = self.before
            return (None if last is None else -last, None if first is None else -first)
        return self.days


CodeSetRef = Annotated[str, Field(pattern=_CODESET_NAME.pattern)] | CodeSet


class ValueRange(_Model):
    """Inclusive bounds on a measurement's ``value_as_number``."""

    min: float | None = None
    max: float | None = None


class Criterion(_Windowed):
    """Events of a domain and code set inside a window, counted against bounds."""

    name: str
    domain: Domain
    codeset: CodeSetRef
    at_least: Annotated[int, Field(ge=0)] | None = None
    at_most: Annotated[int, Field(ge=0)] | None = None
    value: ValueRange | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(
                f"{name!r} is not a usable name: letters, digits and _ (it names label columns)"
            )
        return name

    @property
    def fewest(self) -> int:
        """Events needed: ``at_least``, else 1, or 0 when only ``at_most`` is given."""
        if self.at_least is not None:
            return self.at_least
        return 0 if self.at_most is not None else 1

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.at_most is not None and self.at_most < self.fewest:
            raise ValueError(f"at_most ({self.at_most}) is below at_least ({self.fewest})")
        if self.value is not None and self.domain != "measurement":
            raise ValueError("`value` applies to the measurement domain only")
        return self


class Entry(_Model):
    """The entry event (day 0), from EMR events or from a list file."""

    domain: Domain | None = None
    codeset: CodeSetRef | None = None
    dates: DateRange | None = None
    occurrence: Literal["first", "first_in_range", "all"] = "first"
    list: str | None = None

    @model_validator(mode="after")
    def _kind(self) -> Self:
        if self.list is not None:
            if self.domain is not None or self.codeset is not None:
                raise ValueError("an entry from a `list` takes no `domain` or `codeset`")
        elif self.domain is None or self.codeset is None:
            raise ValueError("the entry needs a `domain` and a `codeset` (or a `list` file)")
        return self


class AgeRange(_Model):
    """Inclusive age bounds in years at the entry event."""

    min: Annotated[int, Field(ge=0)] | None = None
    max: Annotated[int, Field(ge=0)] | None = None


class Demographics(_Model):
    """Age at the entry event and gender."""

    age: AgeRange | None = None
    gender: tuple[Literal["female", "male"] | int, ...] | None = None

    @property
    def gender_concepts(self) -> tuple[int, ...] | None:
        """The gender filter as OMOP concept ids."""
        if self.gender is None:
            return None
        return tuple(GENDERS[g] if isinstance(g, str) else g for g in self.gender)


class Imaging(_Windowed):
    """Which series of the kept persons: attributes and a window on the imaging date."""

    modality: tuple[str, ...] | None = None
    body_part: tuple[str, ...] | None = None
    series_description: tuple[str, ...] | None = None
    min_instances: Annotated[int, Field(ge=0)] | None = None

    @field_validator("modality", "body_part", "series_description", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value


class Cohort(_Model):
    """A cohort: entry event, criteria and imaging (see docs/cohorts.md).

    Build one from YAML with :meth:`from_yaml`, from a mapping with :meth:`from_dict`, or
    directly; :func:`imgindex.cohort.select` runs it.
    """

    name: str
    description: str = ""
    codesets: dict[str, CodeSetRef] = Field(default_factory=dict)
    entry: Entry
    demographics: Demographics | None = None
    inclusion: tuple[Criterion, ...] = ()
    exclusion: tuple[Criterion, ...] = ()
    labels: tuple[Criterion, ...] = ()
    imaging: Imaging = Field(default_factory=Imaging)

    _base_dir: Path | None = PrivateAttr(default=None)
    _source: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        seen: set[str] = set()
        for crit in (*self.inclusion, *self.exclusion, *self.labels):
            if crit.name in seen:
                raise ValueError(f"two criteria are named {crit.name!r}; names must differ")
            if crit.name in _RESERVED_LABEL_COLUMNS:
                raise ValueError(f"{crit.name!r} is reserved for a selection column")
            seen.add(crit.name)
        return self

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path) -> Cohort:
        """Read, validate and resolve the cohort in ``path``.

        Code sets named but not defined in the file are read from ``codesets/<name>.yaml``
        beside it; a list entry's file is read relative to it.

        Raises
        ------
        CohortError
            Naming the file, line and field of every mistake.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CohortError(f"{path}: cannot read the cohort file: {exc.strerror}") from exc
        data, lines = _load_yaml(text, str(path))
        return cls._build(data, lines, source=str(path), base_dir=path.parent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str | Path | None = None) -> Cohort:
        """Validate and resolve a cohort given as a mapping (as YAML would load it)."""
        return cls._build(dict(data), {}, source="<cohort>", base_dir=base_dir)

    @classmethod
    def from_yaml_text(cls, text: str, base_dir: str | Path | None = None) -> Cohort:
        """Validate and resolve a cohort given as YAML text (a web form, a test)."""
        data, lines = _load_yaml(text, "<cohort>")
        return cls._build(data, lines, source="<cohort>", base_dir=base_dir)

    @classmethod
    def _build(
        cls,
        data: Any,
        lines: dict[tuple[str | int, ...], int],
        *,
        source: str,
        base_dir: str | Path | None,
    ) -> Cohort:
        if not isinstance(data, dict):
            raise CohortError(f"{source}: a cohort is a mapping of keys (name, entry, ...)")
        try:
            cohort = cls.model_validate(data)
        except ValidationError as exc:
            raise CohortError(_describe(exc, lines, source)) from None
        cohort._base_dir = Path(base_dir) if base_dir is not None else None
        cohort._source = source
        return cohort.resolved(lines)

    # -- resolution ----------------------------------------------------------------------

    @property
    def base_dir(self) -> Path | None:
        """Folder that code set files and list files are relative to."""
        return self._base_dir

    def resolved(self, lines: Mapping[tuple[str | int, ...], int] | None = None) -> Cohort:
        """This cohort with every code set defined inline under ``codesets``.

        Names used by the entry and the criteria that ``codesets`` does not define, and
        ``codesets`` entries that are file names, are read from ``codesets/<name>.yaml``.
        """
        lines = lines or {}
        source = self._source or "<cohort>"
        table: dict[str, CodeSet] = {}
        for name, ref in self.codesets.items():
            table[name] = (
                ref
                if isinstance(ref, CodeSet)
                else self._codeset_file(ref, source, lines, ("codesets", name))
            )

        def use(ref: str | CodeSet | None, where: tuple[str | int, ...]) -> None:
            if isinstance(ref, str) and ref not in table:
                table[ref] = self._codeset_file(ref, source, lines, where)

        use(self.entry.codeset, ("entry", "codeset"))
        for group in ("inclusion", "exclusion", "labels"):
            for i, crit in enumerate(getattr(self, group)):
                use(crit.codeset, (group, i, "codeset"))
        cohort = self.model_copy(update={"codesets": table})
        cohort._base_dir = self._base_dir
        cohort._source = self._source
        return cohort

    def _codeset_file(
        self,
        name: str,
        source: str,
        lines: Mapping[tuple[str | int, ...], int],
        path_in_file: tuple[str | int, ...],
    ) -> CodeSet:
        line = lines.get(path_in_file)
        where = f"{source}, line {line}" if line else source
        where += f" ({_format_path(path_in_file)})"
        if self._base_dir is None:
            raise CohortError(
                f"{where}: code set {name!r} is not defined under `codesets:` (and a cohort "
                "given without a folder cannot read codesets/{name}.yaml)"
            )
        path = self._base_dir / "codesets" / f"{name}.yaml"
        if not path.is_file():
            raise CohortError(
                f"{where}: code set {name!r} is not defined under `codesets:` and "
                f"{path} does not exist"
            )
        data, file_lines = _load_yaml(path.read_text(encoding="utf-8"), str(path))
        try:
            return CodeSet.model_validate(data)
        except ValidationError as exc:
            raise CohortError(_describe(exc, file_lines, str(path))) from None

    def codeset(self, ref: str | CodeSet) -> CodeSet:
        """The code set ``ref`` names (or ``ref`` itself)."""
        if isinstance(ref, CodeSet):
            return ref
        found = self.codesets.get(ref)
        if isinstance(found, CodeSet):
            return found
        return self.resolved().codeset(ref)

    # -- identity ------------------------------------------------------------------------

    def canonical(self) -> dict[str, Any]:
        """The resolved cohort as plain JSON-able data (what its hash covers)."""
        data: dict[str, Any] = self.resolved().model_dump(
            mode="json", by_alias=True, exclude_none=True, exclude_defaults=False
        )
        return data

    def sha256(self, extra: bytes = b"") -> str:
        """SHA-256 of the canonical form (code sets included) and ``extra`` (a list file)."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode() + extra).hexdigest()

    def to_yaml(self) -> str:
        """The cohort as YAML (code sets inline), readable by :meth:`from_yaml`."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_unset=True)
        if not data.get("codesets"):  # resolution sets it, empty when every set is inline
            data.pop("codesets", None)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# -- YAML with line numbers -------------------------------------------------------------------


def _load_yaml(text: str, source: str) -> tuple[Any, dict[tuple[str | int, ...], int]]:
    """The data in ``text`` and the line (1-based) of every key path in it."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise CohortError(f"{where}: not valid YAML: {problem}") from None
    lines: dict[tuple[str | int, ...], int] = {}

    def walk(n: yaml.Node | None, path: tuple[str | int, ...]) -> None:
        if n is None:
            return
        lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                sub = (*path, str(key.value))
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, (*path, i))

    walk(node, ())
    return data, lines


def _describe(exc: ValidationError, lines: Mapping[tuple[str | int, ...], int], source: str) -> str:
    """One line per mistake: file, line, field path, and what is wrong."""
    out: list[str] = []
    seen: set[str] = set()
    for err in exc.errors():
        path = _yaml_path(err["loc"], lines)
        field = _format_path(path)
        line = _nearest_line(path, lines)
        where = f"{source}, line {line}" if line else source
        message = _message(err, path)
        text = f"{where} ({field}): {message}" if field else f"{where}: {message}"
        # A value failing both branches of `name | mapping` reports once.
        if text not in seen:
            seen.add(text)
            out.append(text)
    return "\n".join(out)


def _yaml_path(
    loc: Sequence[str | int], lines: Mapping[tuple[str | int, ...], int]
) -> tuple[str | int, ...]:
    """``loc`` without pydantic's union-branch names (which are not keys of the file)."""
    path: tuple[str | int, ...] = ()
    for i, part in enumerate(loc):
        candidate = (*path, part)
        is_last = i == len(loc) - 1
        if candidate in lines or not lines or is_last or isinstance(part, int):
            path = candidate
        elif "[" in part or part[:1].isupper() or part in _BRANCHES:
            continue  # e.g. 'CodeSet', 'str', 'constrained-str', 'tuple[int, ...]'
        else:
            path = candidate
    return tuple(p for p in path if not (isinstance(p, str) and p in _BRANCHES))


_BRANCHES = {"str", "int", "float", "bool", "constrained-str", "literal['female','male']"}


def _nearest_line(
    path: tuple[str | int, ...], lines: Mapping[tuple[str | int, ...], int]
) -> int | None:
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


def _format_path(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_FIELDS: dict[str, type[BaseModel]] = {
    "": Cohort,
    "entry": Entry,
    "imaging": Imaging,
    "demographics": Demographics,
    "inclusion": Criterion,
    "exclusion": Criterion,
    "labels": Criterion,
}


def _message(err: Any, path: tuple[str | int, ...]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(path[-1]) if path else "?"
        parent = next((str(p) for p in reversed(path[:-1]) if isinstance(p, str)), "")
        model = _FIELDS.get(parent if len(path) > 1 else "")
        hint = ""
        if model is not None:
            close = difflib.get_close_matches(key, _aliases(model), n=1)
            if close:
                hint = f"; did you mean {close[0]!r}?"
        return f"unknown key {key!r}{hint}"
    if kind == "missing":
        return "required, but missing"
    message = str(err["msg"])
    return message.removeprefix("Value error, ")


def _aliases(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]
