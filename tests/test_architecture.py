"""The dependency direction between the three packages, as a test (style guide section 2).

::

    imgindex --> dicomweb        dicomweb -/-> storage, imgindex
    imgindex --> storage         storage  -/-> dicomweb, imgindex, pydicom, pynetdicom
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import storage

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "storage": {"imgindex", "dicomweb", "pydicom", "pynetdicom"},
    "dicomweb": {"imgindex", "storage"},
}


def imported_modules(path: Path) -> Iterator[str]:
    """Absolute module names imported anywhere in ``path`` (also inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules in {package}/"
    bad = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in files
        for name in imported_modules(path)
        if name.split(".")[0] in FORBIDDEN[package]
    ]
    assert not bad, "imports against the dependency direction:\n" + "\n".join(bad)


def test_imported_modules_sees_every_form(tmp_path: Path) -> None:
    # The check above is only as good as this walk: lazy, aliased, dotted and type-only
    # imports all count; relative imports stay inside the package.
    module = tmp_path / "m.py"
    module.write_text(
        "from __future__ import annotations\n"
        "import os, pydicom.uid as uid\n"
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "if TYPE_CHECKING:\n"
        "    from imgindex.schema import Attribute\n"
        "def f():\n"
        "    import pynetdicom\n"
        "    from dicomweb import qido\n",
        encoding="utf-8",
    )
    assert sorted(imported_modules(module)) == [
        "__future__",
        "dicomweb",
        "imgindex.schema",
        "os",
        "pydicom.uid",
        "pynetdicom",
        "typing",
    ]


def test_storage_is_ours() -> None:
    # "storage" is also the name of a PyPI distribution; make sure we test this one.
    assert Path(storage.__file__).resolve().is_relative_to(ROOT / "storage")
