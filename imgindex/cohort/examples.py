"""The example cohorts shipped with imgindex (``cohorts/`` in a checkout, a copy in a wheel)."""

from __future__ import annotations

from pathlib import Path

from imgindex.errors import ImgindexError

__all__ = ["example_cohorts", "examples_folder"]


def examples_folder() -> Path:
    """The folder of the example cohorts (with their ``codesets/``).

    Raises
    ------
    ImgindexError
        If the examples are not installed.
    """
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "cohorts", here.parents[1] / "_examples" / "cohorts"):
        if (candidate / "mi_cad_ct.yaml").is_file():
            return candidate
    raise ImgindexError("the example cohorts (cohorts/mi_cad_ct.yaml) are not installed")


def example_cohorts() -> dict[str, Path]:
    """The example cohort files by name (file name without ``.yaml``), sorted."""
    return {path.stem: path for path in sorted(examples_folder().glob("*.yaml"))}
