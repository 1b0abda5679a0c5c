"""The public surface of each package, pinned (httpx's ``test_exported_members``).

Adding or removing a public name is a decision: change the expected set here with it.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

EXPECTED: dict[str, set[str]] = {
    "storage": {
        "COMPRESSORS",
        "ArrayInfo",
        "ArrayReader",
        "ArrayStore",
        "ConflictError",
        "LocalObjectStore",
        "ObjectNotFoundError",
        "ObjectStore",
        "Outcome",
        "Pipeline",
        "Progress",
        "Retry",
        "RunSummary",
        "Stage",
        "StorageError",
        "StoreLocation",
        "StoreReader",
        "Table",
        "TableNotFoundError",
        "TransferMetrics",
        "Work",
        "WriteAheadLog",
        "default_chunks",
        "default_shards",
        "open_location",
        "run_on_dask",
        "validate_key",
    },
    "storage.errors": {
        "ConflictError",
        "ObjectNotFoundError",
        "StorageError",
        "TableNotFoundError",
    },
    "storage.objects": {"LocalObjectStore", "ObjectStore", "validate_key"},
    "storage.arrays": {
        "COMPRESSORS",
        "DEFAULT_COMPRESSOR",
        "DTYPES",
        "ArrayInfo",
        "ArrayStore",
        "default_chunks",
        "default_shards",
    },
    "storage.wal": {"Record", "WriteAheadLog", "list_segments", "read_segment", "scan_segment"},
    "imgindex.listener": {
        "Ingest",
        "Listener",
        "ListenerConfig",
        "LogIndexer",
        "Receiver",
        "Status",
        "StoreResult",
        "object_key",
    },
    "dicomweb.errors": {"DicomWebError", "REASONS", "redact_url"},
    "dicomweb.dicomjson": {
        "TagPath",
        "bulk_data_uris",
        "dataset_from_json",
        "load_json_array",
        "parse_datasets",
        "parse_datasets_lenient",
        "parse_datasets_with_bulk_data",
    },
    "dicomweb.multipart": {"MAX_HEADER_BYTES", "Part", "boundary_of", "iter_parts"},
    "dicomweb.client": {
        "DicomWebClient",
        "RequestEvent",
        "RetryPolicy",
        "parse_auth",
        "read_auth_file",
    },
    "imgindex": {
        "CohortError",
        "Cohort",
        "ConfigError",
        "DicomReadError",
        "EmrError",
        "ImgindexError",
        "Index",
    },
    "imgindex.errors": {
        "CohortError",
        "ConfigError",
        "DicomReadError",
        "EmrError",
        "ImgindexError",
    },
    "imgindex.emr": {
        "CDM_TABLES",
        "EMR_TABLES",
        "EVENT_DATE_COLUMNS",
        "TABLE_SPECS",
        "Emr",
        "EmrImportSummary",
        "LinkReport",
        "import_emr",
        "link_report",
    },
    "imgindex.cohort": {
        "CodeSet",
        "Cohort",
        "Criterion",
        "DateRange",
        "Demographics",
        "Entry",
        "Imaging",
        "Selection",
        "ValueRange",
        "read_selection",
        "select",
    },
    "imgindex.config": {"SETTINGS_HELP", "Settings", "load_settings"},
    "imgindex.schema": {
        "CRAWL_STATE_SCHEMA",
        "DEFAULT_ATTRIBUTES",
        "REJECT_SCHEMA",
        "TRANSFER_SCHEMA",
        "UID_KEYWORDS",
        "Attribute",
        "Level",
        "attributes_for",
        "instance_schema",
    },
    "imgindex.headers": {"Header", "read_header", "read_header_bytes"},
    "imgindex.extract": {
        "REJECT_REASONS",
        "ExtractedBatch",
        "Extraction",
        "Extractor",
        "extract_files",
        "reject_id",
        "reject_row",
    },
    "imgindex.index": {"TABLE_NAMES", "Index", "IndexWriter"},
    "imgindex.datasets": {"SAMPLES", "EpochSampler", "SeriesDataset"},
    "imgindex.web": {"qido_app"},
    "imgindex.web.app": {"ACCESS", "MIN_COUNT", "create_app", "roles_for"},
    "imgindex.web.accounts": {"ROLES", "Accounts", "AuditEntry", "User", "transaction"},
    "imgindex.web.cohorts": {
        "CodeSuggestion",
        "DOMAIN_LABELS",
        "GROUPS",
        "Preview",
        "code_suggestions",
        "cohort_to_form",
        "criteria_rows",
        "deidentified_selection",
        "form_to_cohort",
        "preview",
        "shown",
    },
    "imgindex.web.requests": {
        "STATUSES",
        "ExportRequest",
        "ExportRunner",
        "RequestError",
        "Requests",
    },
    "imgindex.web.operations": {"Chart", "Line", "chart", "operations_context"},
    "imgindex.cohort.examples": {"example_cohorts", "examples_folder"},
    "storage.reader": {
        "ArrayReader",
        "StoreLocation",
        "StoreReader",
        "open_location",
    },
    "imgindex.deid": {
        "PSEUDONYMIZED",
        "SAFE_ATTRIBUTES",
        "SHIFT_DAYS",
        "Deidentifier",
        "Identity",
        "Profile",
        "ProfileOptions",
        "clean_text",
        "deidentify_dataset",
        "read_key_file",
    },
    "imgindex.export": {"ExportProgress", "ExportSummary", "array_key", "export", "read_manifest"},
    "imgindex.export.volume": {
        "ORIENTATION_TOLERANCE",
        "REASONS",
        "SAME_POSITION_MM",
        "Frame",
        "Volume",
        "VolumeError",
        "assemble",
        "decode_instance",
    },
    "imgindex.crawl": {"IndexSummary", "crawl", "index_files", "iter_files"},
    "imgindex.crawl.web": {"CrawlSummary", "DicomWebCrawl", "Shortfall"},
    "imgindex.crawl.orthanc": {"FeedSummary", "OrthancFeed"},
    "imgindex.crawl.metrics": {"CrawlMetrics"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exported_members(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert len(exported) == len(set(exported)), f"{name}.__all__ repeats a name"
    for member in exported:
        assert hasattr(module, member), f"{name}.__all__ names {member!r}, which is missing"
    assert set(exported) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exported_classes_and_functions_are_ours(name: str) -> None:
    # A re-export must not leak a third-party object into our surface.
    module = importlib.import_module(name)
    package = name.split(".")[0]
    for member in module.__all__:
        value = getattr(module, member)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__.split(".")[0] == package, f"{name}.{member}"
