"""The cohort builder: a form over the cohort model of ``imgindex select`` (docs/cohorts.md).

The form and a cohort YAML file say the same thing: :func:`cohort_to_form` fills the form
from a :class:`~imgindex.cohort.Cohort` (read from YAML), :func:`form_to_cohort` makes the
cohort back from the submitted fields, and the page shows the cohort's YAML as it is edited,
so what a researcher builds here runs unchanged with ``imgindex select`` and back.

Two modes of the same form:

- **simple**: one event (a diagnosis, procedure, drug or pathology/lab code set) in a date
  range, and which imaging of those persons (modality, days from the event);
- **advanced**: the whole model: the entry event with its occurrence rule, age and gender,
  inclusion and exclusion criteria and labels with day windows, counts and measurement
  values, and the imaging criteria.

The field names are flat (``entry.domain``, ``c0.window``, ``img.modality``), one string
each, as an HTML form posts them. :func:`preview` runs the cohort and gathers what the page
shows: the attrition, the selected series by modality and by days from the entry event;
:func:`shown` masks counts under the disclosure threshold.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import polars as pl
import pyarrow as pa

from imgindex.cohort import CodeSet, Cohort, select
from imgindex.cohort.model import DOMAINS
from imgindex.errors import CohortError

if TYPE_CHECKING:
    import os
    from collections.abc import Mapping

    from imgindex.cohort import Selection
    from imgindex.deid import Deidentifier

__all__ = [
    "DOMAIN_LABELS",
    "GROUPS",
    "CodeSuggestion",
    "Preview",
    "code_suggestions",
    "cohort_to_form",
    "criteria_rows",
    "deidentified_selection",
    "form_to_cohort",
    "preview",
    "shown",
]

#: The event domains, as the form names them.
DOMAIN_LABELS: Final = {
    "condition": "diagnosis (condition)",
    "procedure": "procedure",
    "drug": "drug",
    "measurement": "pathology or lab result (measurement)",
    "observation": "observation",
    "visit": "visit",
}
#: Criteria groups: the cohort's lists, as the form names them.
GROUPS: Final = {"inclusion": "must have", "exclusion": "must not have", "labels": "label only"}
_WINDOWS: Final = ("after", "before", "days")
_CRITERION: Final = re.compile(r"c(\d+)\.")
_IDENT: Final = re.compile(r"[^A-Za-z0-9_]+")


# -- cohort -> form --------------------------------------------------------------------------


def cohort_to_form(cohort: Cohort) -> dict[str, str]:
    """The form's fields for ``cohort`` (code sets inline, named as the cohort names them).

    Raises
    ------
    CohortError
        For a cohort the form cannot show: an entry read from a list file.
    """
    cohort = cohort.resolved()
    entry = cohort.entry
    if entry.list is not None or entry.domain is None or entry.codeset is None:
        raise CohortError(
            "this cohort's entry is a list file (entry.list): the form builds cohorts from "
            "EMR events; run it with imgindex select"
        )
    values: dict[str, str] = {"name": cohort.name, "description": cohort.description}
    values.update(
        {
            "entry.domain": entry.domain,
            "entry.occurrence": entry.occurrence,
            "entry.from": _text(entry.dates.from_ if entry.dates else None),
            "entry.to": _text(entry.dates.to if entry.dates else None),
        }
    )
    values.update(_codeset_fields("entry", cohort, entry.codeset))
    demographics = cohort.demographics
    if demographics is not None:
        if demographics.age is not None:
            values["age.min"] = _text(demographics.age.min)
            values["age.max"] = _text(demographics.age.max)
        for gender in demographics.gender or ():
            if isinstance(gender, int):
                values["gender.other"] = _join([*_split(values.get("gender.other", "")), gender])
            else:
                values[f"gender.{gender}"] = "on"
    i = 0
    for group in GROUPS:
        for crit in getattr(cohort, group):
            prefix = f"c{i}"
            values.update(
                {
                    f"{prefix}.group": group,
                    f"{prefix}.name": crit.name,
                    f"{prefix}.domain": crit.domain,
                    f"{prefix}.at_least": _text(crit.at_least),
                    f"{prefix}.at_most": _text(crit.at_most),
                    f"{prefix}.value_min": _text(crit.value.min if crit.value else None),
                    f"{prefix}.value_max": _text(crit.value.max if crit.value else None),
                }
            )
            values.update(_window_fields(prefix, crit))
            values.update(_codeset_fields(prefix, cohort, crit.codeset))
            i += 1
    imaging = cohort.imaging
    values.update(
        {
            "img.modality": _join(imaging.modality or ()),
            "img.body_part": _join(imaging.body_part or ()),
            "img.series_description": _join(imaging.series_description or ()),
            "img.min_instances": _text(imaging.min_instances),
        }
    )
    values.update(_window_fields("img", imaging))
    advanced = (
        i > 0
        or demographics is not None
        or entry.occurrence != "first"
        or any(values.get(k) for k in ("img.body_part", "img.series_description"))
        or values.get("img.min_instances")
        or values.get("entry.exclude")
    )
    values["mode"] = "advanced" if advanced else "simple"
    return values


def _codeset_fields(prefix: str, cohort: Cohort, ref: str | CodeSet) -> dict[str, str]:
    codes = cohort.codeset(ref)
    return {
        f"{prefix}.codeset_name": ref if isinstance(ref, str) else "",
        f"{prefix}.concepts": _join(codes.concepts),
        f"{prefix}.descendants": "on" if codes.descendants else "",
        f"{prefix}.source_codes": _join(codes.source_codes),
        f"{prefix}.exclude": _join(codes.exclude),
    }


def _window_fields(prefix: str, item: Any) -> dict[str, str]:
    for kind in _WINDOWS:
        pair = getattr(item, kind)
        if pair is not None:
            return {
                f"{prefix}.window": kind,
                f"{prefix}.first": _text(pair[0]),
                f"{prefix}.last": _text(pair[1]),
            }
    return {f"{prefix}.window": "", f"{prefix}.first": "", f"{prefix}.last": ""}


def criteria_rows(values: Mapping[str, str]) -> list[int]:
    """The criterion row numbers present in ``values``, in order."""
    return sorted({int(m.group(1)) for key in values if (m := _CRITERION.match(key))})


# -- form -> cohort --------------------------------------------------------------------------


class _Errors:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def integer(self, values: Mapping[str, str], key: str, what: str) -> int | None:
        text = values.get(key, "").strip()
        if not text:
            return None
        try:
            return int(text)
        except ValueError:
            self.messages.append(f"{what}: {text!r} is not a whole number")
            return None

    def number(self, values: Mapping[str, str], key: str, what: str) -> float | None:
        text = values.get(key, "").strip()
        if not text:
            return None
        try:
            return float(text)
        except ValueError:
            self.messages.append(f"{what}: {text!r} is not a number")
            return None

    def integers(self, values: Mapping[str, str], key: str, what: str) -> list[int]:
        out: list[int] = []
        for part in _split(values.get(key, "")):
            try:
                out.append(int(part))
            except ValueError:
                self.messages.append(f"{what}: {part!r} is not a concept id (a whole number)")
        return out

    def day(self, values: Mapping[str, str], key: str, what: str) -> str | None:
        text = values.get(key, "").strip()
        if not text:
            return None
        try:
            return dt.date.fromisoformat(text).isoformat()
        except ValueError:
            self.messages.append(f"{what}: {text!r} is not a date (YYYY-MM-DD)")
            return None


def form_to_cohort(values: Mapping[str, str]) -> Cohort:
    """The cohort the form's fields describe (see the module docstring).

    Raises
    ------
    CohortError
        Listing every field that is wrong, then what the cohort model says.
    """
    errors = _Errors()
    simple = values.get("mode", "advanced") == "simple"
    name = values.get("name", "").strip() or "untitled"
    codesets: dict[str, dict[str, Any]] = {}

    def codes(prefix: str, what: str) -> str | dict[str, Any] | None:
        concepts = errors.integers(values, f"{prefix}.concepts", f"{what}: concept ids")
        sources = _split(values.get(f"{prefix}.source_codes", ""))
        if not concepts and not sources:
            errors.messages.append(f"{what}: give at least one concept id or source code")
            return None
        codeset: dict[str, Any] = {}
        if concepts:
            codeset["concepts"] = concepts
            codeset["descendants"] = values.get(f"{prefix}.descendants") == "on"
        if sources:
            codeset["source_codes"] = sources
        excluded = errors.integers(values, f"{prefix}.exclude", f"{what}: excluded concept ids")
        if excluded:
            codeset["exclude"] = excluded
        wanted = _identifier(values.get(f"{prefix}.codeset_name", ""))
        if not wanted:
            return codeset  # inline, as a new row's codes are
        label, n = wanted, 1
        while label in codesets and codesets[label] != codeset:
            n += 1
            label = f"{wanted}_{n}"
        codesets[label] = codeset
        return label

    def window(prefix: str, what: str) -> dict[str, list[int | None]]:
        kind = values.get(f"{prefix}.window", "")
        first = errors.integer(values, f"{prefix}.first", f"{what}: first day")
        last = errors.integer(values, f"{prefix}.last", f"{what}: last day")
        if kind not in _WINDOWS:
            return {}
        return {kind: [first, last]}

    entry: dict[str, Any] = {"domain": values.get("entry.domain", "condition")}
    entry["codeset"] = codes("entry", "entry event")
    dates = {
        key: day
        for key, field_name in (("from", "entry.from"), ("to", "entry.to"))
        if (day := errors.day(values, field_name, f"entry event: {key}")) is not None
    }
    if dates:
        entry["dates"] = dates
    if not simple and values.get("entry.occurrence"):
        entry["occurrence"] = values["entry.occurrence"]

    data: dict[str, Any] = {"name": name}
    description = values.get("description", "").replace("\r\n", "\n")
    if description.strip():
        data["description"] = description
    data["entry"] = entry
    if not simple:
        demographics: dict[str, Any] = {}
        age = {
            bound: n
            for bound in ("min", "max")
            if (n := errors.integer(values, f"age.{bound}", f"age: {bound}")) is not None
        }
        if age:
            demographics["age"] = age
        genders: list[str | int] = [g for g in ("female", "male") if values.get(f"gender.{g}")]
        genders += errors.integers(values, "gender.other", "gender: concept ids")
        if genders:
            demographics["gender"] = genders
        if demographics:
            data["demographics"] = demographics
        groups: dict[str, list[dict[str, Any]]] = {group: [] for group in GROUPS}
        for i in criteria_rows(values):
            prefix = f"c{i}"
            if not any(
                values.get(f"{prefix}.{k}", "").strip()
                for k in ("name", "concepts", "source_codes")
            ):
                continue  # a blank row
            group = values.get(f"{prefix}.group", "inclusion")
            crit_name = _identifier(values.get(f"{prefix}.name", "")) or f"criterion_{i + 1}"
            what = f"criterion {crit_name}"
            crit: dict[str, Any] = {
                "name": crit_name,
                "domain": values.get(f"{prefix}.domain", "condition"),
                "codeset": codes(prefix, what),
            }
            crit.update(window(prefix, what))
            for bound in ("at_least", "at_most"):
                count = errors.integer(values, f"{prefix}.{bound}", f"{what}: {bound}")
                if count is not None:
                    crit[bound] = count
            value = {
                bound: v
                for bound in ("min", "max")
                if (v := errors.number(values, f"{prefix}.value_{bound}", f"{what}: value"))
                is not None
            }
            if value:
                crit["value"] = value
            groups.setdefault(group, []).append(crit)
        data.update({group: rows for group, rows in groups.items() if rows})
    imaging: dict[str, Any] = {}
    keys = ("modality", "body_part") if simple else ("modality", "body_part", "series_description")
    for key in keys:
        items = _split(values.get(f"img.{key}", ""), spaces=key != "series_description")
        if items:
            imaging[key] = items
    if not simple:
        n = errors.integer(values, "img.min_instances", "imaging: at least instances")
        if n is not None:
            imaging["min_instances"] = n
    imaging.update(window("img", "imaging"))
    if imaging:
        data["imaging"] = imaging
    if errors.messages:
        raise CohortError("\n".join(errors.messages))
    if codesets:  # before the entry, as people write them
        data = (
            {k: data[k] for k in ("name", "description") if k in data}
            | {"codesets": codesets}
            | {k: v for k, v in data.items() if k not in ("name", "description")}
        )
    return Cohort.from_dict(data)


# -- what the page shows ---------------------------------------------------------------------


@dataclass
class Preview:
    """A cohort run for the builder: attrition and charts (exact counts; see :func:`shown`)."""

    selection: Selection
    attrition: list[tuple[str, int, int]] = field(default_factory=list)
    persons: int = 0
    series: int = 0
    by_modality: list[tuple[str, int]] = field(default_factory=list)
    by_days: list[tuple[str, int]] = field(default_factory=list)

    @property
    def cohort(self) -> Cohort:
        """The cohort run (resolved)."""
        return self.selection.cohort


def preview(
    cohort: Cohort, root: str | os.PathLike[str], versions: Mapping[str, int] | None = None
) -> Preview:
    """Run ``cohort`` over the catalog at ``root`` (at the table ``versions`` given, e.g. a
    request's) and gather what the builder shows."""
    selection = select(cohort, Path(root), versions=versions)
    table = pl.from_arrow(selection.table)
    assert isinstance(table, pl.DataFrame)
    attrition = [
        (str(r["step"]), int(r["persons"]), int(r["entry_events"]))
        for r in selection.attrition.to_pylist()
    ]
    by_modality = [
        (str(m), int(n))
        for m, n in table.group_by(pl.col("Modality").fill_null("(none)"))
        .len()
        .sort(["len", "Modality"], descending=[True, False])
        .iter_rows()
    ]
    return Preview(
        selection=selection,
        attrition=attrition,
        persons=table.get_column("person_id").n_unique() if table.height else 0,
        series=table.height,
        by_modality=by_modality,
        by_days=_days_histogram(table.get_column("days_from_index").drop_nulls().to_list()),
    )


def _days_histogram(days: list[int]) -> list[tuple[str, int]]:
    """Series by days from the entry event, in bins of 1, 7 or 30 days (up to ~30 bars)."""
    if not days:
        return []
    low, high = min(days), max(days)
    width = next((w for w in (1, 7, 30, 365) if (high - low) // w < 30), 365)
    start = low - low % width if width > 1 else low
    counts: dict[int, int] = {}
    for d in days:
        counts[(d - start) // width] = counts.get((d - start) // width, 0) + 1
    out: list[tuple[str, int]] = []
    for b in range(max(counts) + 1):
        first = start + b * width
        label = f"day {first}" if width == 1 else f"days {first}..{first + width - 1}"
        out.append((label, counts.get(b, 0)))
    return out


@dataclass(frozen=True)
class CodeSuggestion:
    """A code the form can add to a code set: a concept (``concept_id``) or a source code
    (``source_code``), what it is called, and how many persons have an event of it (a
    concept: of it or any of its descendants)."""

    label: str
    persons: int
    concept_id: int | None = None
    source_code: str | None = None
    vocabulary: str = ""


#: OMOP ``domain_id`` values of each cohort domain's concepts.
_CONCEPT_DOMAINS: Final = {
    "condition": "Condition",
    "procedure": "Procedure",
    "drug": "Drug",
    "measurement": "Measurement",
    "observation": "Observation",
    "visit": "Visit",
}


def code_suggestions(
    root: str | os.PathLike[str], domain: str, query: str, *, limit: int = 15
) -> list[CodeSuggestion]:
    """Codes of ``domain`` matching ``query`` (a name, concept id or source code, case
    insensitive; a concept's name, id or code, or a source code, starting with or holding it),
    most persons first.

    Concepts come from the imported ``concept`` table (of the domain, or used by its events)
    with the persons of their events and their descendants' (``concept_ancestor``); source
    codes from the events themselves. Without EMR tables, nothing.
    """
    from imgindex.emr import Emr

    spec = DOMAINS.get(domain)
    needle = query.strip().lower()
    emr = Emr(root)
    if spec is None or not needle or not emr.has(spec.table):
        return []
    events = emr.scan(spec.table).select(
        "person_id", pl.col(spec.concept).alias("concept_id"), pl.col(spec.source).alias("code")
    )
    found: list[CodeSuggestion] = []
    if emr.has("concept"):
        concepts = (
            emr.scan("concept")
            .select("concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_code")
            .filter(
                pl.col("concept_name").str.to_lowercase().str.contains(needle, literal=True)
                | pl.col("concept_id").cast(pl.String).str.starts_with(needle)
                | pl.col("concept_code").str.to_lowercase().str.starts_with(needle)
            )
            .filter(
                (pl.col("domain_id") == _CONCEPT_DOMAINS[domain])
                | pl.col("concept_id").is_in(
                    events.select("concept_id").unique().collect()["concept_id"].implode()
                )
            )
            .collect()
        )
        used = events.select("person_id", "concept_id").unique()
        pairs = used.select(
            pl.col("concept_id").alias("ancestor_concept_id"),
            pl.col("concept_id").alias("descendant_concept_id"),
        )
        if emr.has("concept_ancestor"):
            pairs = pl.concat(
                [
                    pairs,
                    emr.scan("concept_ancestor").select(
                        "ancestor_concept_id", "descendant_concept_id"
                    ),
                ]
            ).unique()
        persons = dict(
            used.join(pairs, left_on="concept_id", right_on="descendant_concept_id")
            .filter(pl.col("ancestor_concept_id").is_in(concepts["concept_id"].implode()))
            .group_by("ancestor_concept_id")
            .agg(pl.col("person_id").n_unique())
            .collect()
            .iter_rows()
        )
        found += [
            CodeSuggestion(
                label=str(row["concept_name"]),
                persons=int(persons.get(row["concept_id"], 0)),
                concept_id=int(row["concept_id"]),
                vocabulary=f"{row['vocabulary_id']} {row['concept_code']}",
            )
            for row in concepts.iter_rows(named=True)
        ]
    codes = (
        events.filter(pl.col("code").str.to_lowercase().str.starts_with(needle))
        .group_by("code")
        .agg(pl.col("person_id").n_unique().alias("persons"))
        .collect()
    )
    found += [
        CodeSuggestion(label=str(code), persons=int(n), source_code=str(code), vocabulary="source")
        for code, n in codes.iter_rows()
    ]
    found.sort(key=lambda c: (-c.persons, c.label))
    return found[:limit]


def shown(n: int, threshold: int, *, exact: bool) -> str:
    """``n`` as a researcher may see it: ``<threshold`` for 1 to threshold - 1 (unless
    ``exact``); 0 and larger counts as they are."""
    if not exact and 0 < n < threshold:
        return f"<{threshold}"
    return f"{n:,}"


def deidentified_selection(table: pa.Table, deid: Deidentifier) -> pa.Table:
    """A selection's rows as they may leave: every value through ``deid`` (the export's
    pseudonyms and date shifts, so the file lines up with an export made with the same key),
    plus the cohort's name and hash."""
    rows = []
    for row in table.to_pylist():
        out = deid.attributes(row)
        out["cohort"] = row.get("cohort")
        out["cohort_sha256"] = row.get("cohort_sha256")
        rows.append(out)
    return pa.Table.from_pylist(rows)


def _split(text: str, *, spaces: bool = True) -> list[str]:
    """The items of a list field: separated by commas (and by spaces unless ``spaces`` is
    false, for values that hold spaces)."""
    return [part.strip() for part in re.split(r"[,\s]+" if spaces else ",", text) if part.strip()]


def _join(items: Any) -> str:
    return ", ".join(str(i) for i in items)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _identifier(text: str) -> str:
    """``text`` as a name the cohort model takes (letters, digits, ``_``)."""
    cleaned = _IDENT.sub("_", text.strip()).strip("_")
    if cleaned and cleaned[0].isdigit():
        cleaned = "_" + cleaned
    return cleaned
