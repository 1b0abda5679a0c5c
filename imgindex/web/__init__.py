"""The web app: QIDO-RS over the index (:func:`qido_app`), more to come.

The names are imported on first use (PEP 562), so importing :mod:`imgindex` does not load
Starlette.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imgindex.web.qido import qido_app

__all__ = ["qido_app"]


def __getattr__(name: str) -> Any:
    if name == "qido_app":
        from imgindex.web.qido import qido_app

        return qido_app
    raise AttributeError(f"module 'imgindex.web' has no attribute {name!r}")
