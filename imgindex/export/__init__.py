"""Export: selected series to a Zarr v3 store, complete, resumable, de-identified.

:func:`export` is ``imgindex export``; docs/export.md describes the store's layout.
"""

from imgindex.export.convert import array_key
from imgindex.export.run import ExportProgress, ExportSummary, export, read_manifest

__all__ = ["ExportProgress", "ExportSummary", "array_key", "export", "read_manifest"]
