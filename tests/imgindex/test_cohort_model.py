"""Cohort files: validation with file, line and field; code sets by name; the hash."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from imgindex import Cohort
from imgindex.cohort import CodeSet, Criterion, Entry, Imaging
from imgindex.errors import CohortError

GOOD = """\
name: mi-cad-ct
codesets:
  mi:
    concepts: [4329847]
    descendants: true
    source_codes: [I21*, I22*]
entry:
  domain: condition
  codeset: mi
  dates: {from: 2023-10-01, to: 2023-10-10}
inclusion:
  - name: coronary_procedure
    domain: procedure
    codeset: coronary
    after: [7, 14]
exclusion:
  - name: prior_mi
    domain: condition
    codeset: mi
    before: [1, 365]
imaging:
  modality: CT
  after: [0, 30]
"""


def _write(folder: Path, text: str, name: str = "cohort.yaml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def cohort_dir(tmp_path: Path) -> Path:
    _write(tmp_path, "concepts: [4336464, 4020653]\ndescendants: true\n", "codesets/coronary.yaml")
    return tmp_path


def test_a_good_file_resolves_code_sets_from_the_codesets_folder(cohort_dir: Path) -> None:
    cohort = Cohort.from_yaml(_write(cohort_dir, GOOD))
    assert set(cohort.codesets) == {"mi", "coronary"}
    assert cohort.codeset("coronary") == CodeSet(concepts=(4336464, 4020653), descendants=True)
    assert cohort.inclusion[0].window == (7, 14)
    assert cohort.exclusion[0].window == (-365, -1)
    assert cohort.imaging.modality == ("CT",)
    assert cohort.imaging.window == (0, 30)


def test_the_hash_covers_code_set_files(cohort_dir: Path) -> None:
    path = _write(cohort_dir, GOOD)
    first = Cohort.from_yaml(path).sha256()
    assert Cohort.from_yaml(path).sha256() == first
    _write(cohort_dir, "concepts: [4336464]\ndescendants: true\n", "codesets/coronary.yaml")
    assert Cohort.from_yaml(path).sha256() != first


def test_the_same_cohort_in_python_has_the_same_hash(cohort_dir: Path) -> None:
    from_file = Cohort.from_yaml(_write(cohort_dir, GOOD))
    built = Cohort(
        name="mi-cad-ct",
        codesets={
            "mi": CodeSet(concepts=(4329847,), descendants=True, source_codes=("I21*", "I22*")),
            "coronary": CodeSet(concepts=(4336464, 4020653), descendants=True),
        },
        entry=Entry.model_validate(
            {
                "domain": "condition",
                "codeset": "mi",
                "dates": {"from": "2023-10-01", "to": "2023-10-10"},
            }
        ),
        inclusion=(
            Criterion(
                name="coronary_procedure", domain="procedure", codeset="coronary", after=(7, 14)
            ),
        ),
        exclusion=(Criterion(name="prior_mi", domain="condition", codeset="mi", before=(1, 365)),),
        imaging=Imaging(modality=("CT",), after=(0, 30)),
    )
    assert built.sha256() == from_file.sha256()


def test_to_yaml_reads_back_as_the_same_cohort(cohort_dir: Path) -> None:
    cohort = Cohort.from_yaml(_write(cohort_dir, GOOD))
    again = Cohort.from_yaml_text(cohort.to_yaml())
    assert again.sha256() == cohort.sha256()


@pytest.mark.parametrize(
    ("change", "line", "field", "words"),
    [
        (("after: [7, 14]", "after: [14, 7]"), 15, "inclusion[0].after", "first day (14) is after"),
        (("exclusion:", "exlusion:"), 16, "exlusion", "did you mean 'exclusion'"),
        (("domain: procedure", "domain: surgery"), 13, "inclusion[0].domain", "'procedure'"),
        (("before: [1, 365]", "before: [-1, 365]"), 20, "exclusion[0].before", "negative"),
        (
            ("  modality: CT", "  modality: CT\n  min_instances: -3"),
            23,
            "imaging.min_instances",
            "0",
        ),
        (
            (
                "    codeset: mi\n    before",
                "    codeset: mi\n    at_most: 0\n    at_least: 2\n    before",
            ),
            17,
            "exclusion[0]",
            "at_most (0) is below",
        ),
        (
            (
                "  dates: {from: 2023-10-01, to: 2023-10-10}",
                "  dates: {from: 2023-10-11, to: 2023-10-10}",
            ),
            10,
            "entry.dates",
            "`from`",
        ),
        (
            ("source_codes: [I21*, I22*]", "source_codes: [I*21]"),
            6,
            "codesets.mi.source_codes",
            "prefix",
        ),
    ],
)
def test_mistakes_name_the_file_line_and_field(
    cohort_dir: Path, change: tuple[str, str], line: int, field: str, words: str
) -> None:
    assert change[0] in GOOD
    path = _write(cohort_dir, GOOD.replace(change[0], change[1], 1))
    with pytest.raises(CohortError) as caught:
        Cohort.from_yaml(path)
    message = str(caught.value)
    assert f"{path}, line {line} ({field}):" in message
    assert words in message


def test_an_undefined_code_set_names_the_missing_file(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)  # no codesets/coronary.yaml here
    with pytest.raises(
        CohortError,
        match=r"line 14 \(inclusion\[0\]\.codeset\): code set 'coronary' is not defined",
    ) as caught:
        Cohort.from_yaml(path)
    assert str(tmp_path / "codesets" / "coronary.yaml") in str(caught.value)


def test_a_broken_code_set_file_is_reported_with_its_own_line(cohort_dir: Path) -> None:
    _write(cohort_dir, "concepts: [1]\ndescendents: true\n", "codesets/coronary.yaml")
    with pytest.raises(CohortError, match=r"coronary.yaml, line 2 \(descendents\): unknown key"):
        Cohort.from_yaml(_write(cohort_dir, GOOD))


def test_yaml_syntax_errors_have_a_line(tmp_path: Path) -> None:
    text = "name: x\nentry:\n  domain: condition\n   codeset: mi\n"
    with pytest.raises(CohortError, match=r"line 4: not valid YAML: mapping values"):
        Cohort.from_yaml(_write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("- a\n- b\n", "a cohort is a mapping"),
        ("name: x\n", "(entry): required, but missing"),
        ("name: x\nentry: {domain: condition}\n", "needs a `domain` and a `codeset`"),
        (
            (
                "name: x\nentry: {list: l.csv}\ninclusion:\n"
                "  - {name: a, domain: drug, codeset: {concepts: [1]}}\n"
                "  - {name: a, domain: drug, codeset: {concepts: [2]}}\n"
            ),
            "two criteria are named 'a'",
        ),
        (
            (
                "name: x\nentry: {list: l.csv}\nlabels:\n"
                "  - {name: v, domain: drug, codeset: {concepts: [1]}, value: {min: 1}}\n"
            ),
            "measurement domain only",
        ),
        (
            "name: x\nentry: {list: l.csv}\nimaging: {after: [0, 3], days: [0, 3]}\n",
            "give one window, not after and days",
        ),
        ("name: x\nentry: {list: l.csv}\ncodesets: {e: {descendants: true}}\n", "needs `concepts`"),
    ],
)
def test_structural_mistakes(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(CohortError) as caught:
        Cohort.from_yaml(_write(tmp_path, text))
    assert words in str(caught.value)


def test_the_example_cohorts_are_valid() -> None:
    folder = Path(__file__).parents[2] / "cohorts"
    files = sorted(folder.glob("*.yaml"))
    assert len(files) >= 3
    for path in files:
        cohort = Cohort.from_yaml(path)
        assert cohort.imaging.window is not None, path
        for codeset in cohort.codesets.values():
            assert isinstance(codeset, CodeSet)
    mi = Cohort.from_yaml(folder / "mi_cad_ct.yaml")
    assert "92928" in mi.codeset("coronary_procedure").source_codes
