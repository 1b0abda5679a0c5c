"""Crawl orchestration: three sources, one entry point.

- folders of files (:func:`index_files`),
- DICOMweb servers (:class:`imgindex.crawl.web.DicomWebCrawl`),
- Orthanc's change feed (:class:`imgindex.crawl.orthanc.OrthancFeed`).

:func:`crawl` picks the first two by the look of ``source``. Server crawls are imported on
use, so indexing folders does not load the HTTP stack.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from imgindex.crawl.folders import IndexSummary, index_files, iter_files
from imgindex.schema import DEFAULT_ATTRIBUTES

if TYPE_CHECKING:
    from collections.abc import Sequence

    import httpx

    from imgindex.crawl.web import CrawlSummary
    from imgindex.schema import Attribute

__all__ = ["IndexSummary", "crawl", "index_files", "iter_files"]


def crawl(
    source: str | os.PathLike[str],
    root: str | os.PathLike[str],
    *,
    attributes: Sequence[Attribute] = DEFAULT_ATTRIBUTES,
    auth: httpx.Auth | None = None,
    concurrency: int = 8,
    progress: bool = False,
    **options: Any,
) -> CrawlSummary | IndexSummary:
    """Index ``source`` into the index at ``root``: a DICOMweb base URL (``http://`` or
    ``https://``) or a folder.

    ``options`` go to :class:`~imgindex.crawl.web.DicomWebCrawl` for a server (``since``,
    ``until``, ``max_results``, ``full``, ...) or to :func:`index_files` for a folder
    (``workers``, ``force``, ...).

    Examples
    --------
    >>> crawl("http://127.0.0.1:8042/dicom-web", "data", since=date(2023, 10, 1))  # doctest: +SKIP
    >>> crawl("/mnt/archive", "data", workers=4)  # doctest: +SKIP
    """
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        from dicomweb.client import DicomWebClient
        from imgindex.crawl.web import DicomWebCrawl

        with DicomWebClient(text, auth=auth, concurrency=concurrency) as client:
            return DicomWebCrawl(
                client, root, attributes=attributes, progress=progress, **options
            ).run()
    return index_files([text], root, attributes=attributes, progress=progress, **options)
