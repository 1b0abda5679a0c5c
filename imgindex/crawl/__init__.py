"""Crawl orchestration: folders of files now; DICOMweb and Orthanc's change feed later."""

from imgindex.crawl.folders import IndexSummary, index_files, iter_files

__all__ = ["IndexSummary", "index_files", "iter_files"]
