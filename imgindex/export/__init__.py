"""Export: selected series to a Zarr v3 store, complete, resumable, de-identified.

:func:`export` is ``imgindex export``; docs/export.md describes the store's layout. The names
are imported on first use (PEP 562), so the export's worker processes, which import
:mod:`imgindex.export.convert`, do not load the index (polars, Delta Lake, DuckDB).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imgindex.export.convert import array_key
    from imgindex.export.run import ExportProgress, ExportSummary, export, read_manifest

__all__ = ["ExportProgress", "ExportSummary", "array_key", "export", "read_manifest"]


def __getattr__(name: str) -> Any:
    if name == "array_key":
        from imgindex.export.convert import array_key

        return array_key
    if name in __all__:
        from imgindex.export import run

        return getattr(run, name)
    raise AttributeError(f"module 'imgindex.export' has no attribute {name!r}")
