"""imgindex status: the figures operations watch, from a root with every kind of activity."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
from _export_helpers import index_folder, write_selection, write_series

from imgindex.export import export
from imgindex.index import Index
from imgindex.schema import CRAWL_STATE_SCHEMA
from imgindex.status import collect_status
from imgindex.testing import make_series

IMGINDEX = str(Path(sys.executable).with_name("imgindex"))


def _busy_root(tmp_path: Path) -> tuple[Path, int]:
    """A root with two series indexed, a broken file refused, an export with one failure,
    a crawl's state and a listener backlog; returns it and the instances' bytes."""
    root = tmp_path / "root"
    for seed in (1, 2):
        write_series(tmp_path / "in", make_series(8800 + seed, "CT", 3, 16, 16))
    (tmp_path / "in" / "broken.dcm").write_bytes(b"not dicom at all" * 20)
    index_folder(tmp_path / "in", root)
    uids = Index(root).series.select("SeriesInstanceUID").collect().to_series().to_list()
    selection = write_selection(tmp_path / "sel.txt", [*uids, "1.2.3.404"])
    summary = export(selection, root, tmp_path / "out.zarr", workers=1)
    assert (summary.complete, summary.failed) == (2, 1)
    now = dt.datetime.now(dt.UTC)
    Index(root).table("crawl_state").upsert(
        pa.Table.from_pylist(
            [
                {
                    "source": "http://pacs/dicom-web",
                    "kind": "study",
                    "key": "1.2.1",
                    "status": "done",
                    "updated_at": now,
                },
                {
                    "source": "http://pacs/dicom-web",
                    "kind": "study",
                    "key": "1.2.2",
                    "status": "failed",
                    "error": "HTTP 503",
                    "updated_at": now,
                },
                {
                    "source": "http://pacs/dicom-web",
                    "kind": "feed",
                    "key": "changes",
                    "last_seq": 4711,
                    "updated_at": now,
                },
            ],
            schema=CRAWL_STATE_SCHEMA,
        )
    )
    (root / "wal" / "receiver-1").mkdir(parents=True)
    (root / "wal" / "receiver-1" / "00000001.wal").write_bytes(b"x" * 5000)
    (root / "objects" / "_incoming").mkdir(parents=True)
    (root / "objects" / "_incoming" / "staged.dcm").write_bytes(b"y" * 700)
    size = Index(root).sql("SELECT sum(size_bytes)::BIGINT AS n FROM instances")
    return root, int(size.column("n")[0].as_py())


def test_status_counts_every_kind_of_activity(tmp_path: Path) -> None:
    root, size = _busy_root(tmp_path)
    status = collect_status(root)
    assert status.index == {
        "patients": 2,
        "studies": 2,
        "series": 2,
        "instances": 6,
        "bytes": size,
    }
    (intake,) = status.intake
    assert intake["source"].startswith("folder:")
    assert (intake["instances_1h"], intake["instances_24h"]) == (6, 6)
    # An hour later the same instances count for the day only.
    later = collect_status(root, now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=2))
    assert (later.intake[0]["instances_1h"], later.intake[0]["instances_24h"]) == (0, 6)
    assert status.backlog == {
        "wal_segments": 1,
        "wal_bytes": 5000,
        "incoming_files": 1,
        "incoming_bytes": 700,
    }
    (crawl,) = status.crawls
    assert crawl["last_seq"] == 4711
    assert "study done: 1" in crawl["states"]
    assert "study failed: 1" in crawl["states"]
    (ledger,) = status.exports
    assert (ledger["complete"], ledger["failed"], ledger["skipped"]) == (2, 1, 0)
    assert ledger["bytes_in"] == size
    assert status.export_failures == [{"reason": "not_in_index", "series": 1}]
    assert {r["reason"] for r in status.rejects}  # the broken file
    assert all(r["total"] == r["last_24h"] for r in status.rejects)


def test_the_cli_prints_and_answers_json(tmp_path: Path) -> None:
    root, _ = _busy_root(tmp_path)
    text = subprocess.run(
        [IMGINDEX, "status", "--root", str(root)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    for expected in (
        "2 patients, 2 studies, 2 series, 6 instances",
        "1 write-ahead log segments",
        "change feed at 4711",
        "2 complete, 1 failed",
        "not_in_index: 1",
    ):
        assert expected in text, text
    done = subprocess.run(
        [IMGINDEX, "status", "--root", str(root), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data = json.loads(done.stdout)
    assert data["index"]["instances"] == 6


def test_an_empty_root_has_a_status(tmp_path: Path) -> None:
    status = collect_status(tmp_path / "nothing")
    assert status.index["instances"] == 0
    assert status.intake == []
    assert "nothing indexed in the last 24 hours" in status.describe()
