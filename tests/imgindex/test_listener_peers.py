"""``imgindex listen`` against real DICOM peers: DCMTK's echoscu/storescu and pynetdicom.

The listener runs as a subprocess on 127.0.0.1, ``--port 0``, one catalog root per test. What
is checked is the contract of the command: what a peer is answered, what lands in the index
and under ``ROOT/objects``, and that an acknowledged instance survives ``kill -9``, a full
disk and shutdown.
"""

from __future__ import annotations

import gc
import os
import re
import shutil
import signal
import ssl
import subprocess
import threading
import time
import uuid
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import httpx
import polars as pl
import pydicom
import pytest
from _listener_helpers import (
    CANNOT_UNDERSTAND,
    HOST,
    LOST_RESPONSE_RETRIES,
    OUT_OF_RESOURCES,
    SUCCESS,
    TIMEOUT,
    Listener,
    Listeners,
    StorescuLog,
    dataset_bytes,
    dataset_offset,
    dcmtk_env,
    duplicated,
    free_port,
    location_path,
    meta_of,
    nodelay,
    quiet_dcmread,
    read_table,
    run_echoscu,
    run_storescu,
    scu,
    send_files,
    shutdown_socket,
    status_of,
    store_each,
    storescu_command,
    storescu_errors,
    uid_of,
    wait_for_rejects,
    wait_for_uids,
)
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import encode
from pynetdicom.transport import AssociationSocket

from imgindex.testing import dataset_to_bytes, iter_series, make_series, write_ct_series

if TYPE_CHECKING:
    from collections.abc import Iterator

    from pydicom.dataset import Dataset

pytestmark = pytest.mark.peers

#: Options of every listener here: index commits five times a second keep the tests short.
FAST = ("--flush-interval", "0.2")
#: A UID the listener may use as a path: digits and dots, at most 64 characters.
SAFE_UID = re.compile(r"^[0-9.]{1,64}$")

#: Files of pydicom's test data that storescu cannot send, sent with pynetdicom instead.
STORESCU_CANNOT_SEND = {
    # The data set is implicit VR although the meta says JPEG Baseline (explicit VR);
    # pydicom notices and reads it; DCMTK reads (0008,0008) with VR "\x18\x00" and stops:
    # "Bad DICOM file ... I/O suspension or premature end of stream".
    "SC_rgb_jpeg.dcm": "implicit VR data set under an explicit VR transfer syntax",
    # Implicit VR data sets under RLE Lossless (explicit VR): DCMTK finds no SOP Class UID.
    "rtdose_rle.dcm": "implicit VR data set under an explicit VR transfer syntax",
    "rtdose_rle_1frame.dcm": "implicit VR data set under an explicit VR transfer syntax",
}
#: Files cut short, which the listener must answer 0xCxxx and record as rejects. DCMTK
#: refuses to send both ("Bad DICOM file"); pynetdicom sends their bytes as they are.
TRUNCATED = {
    # Pixel Data (7FE0,0010) says 8192 bytes; the file holds 8130.
    "MR_truncated.dcm",
    # Beam Sequence (300A,00B0) says 976 bytes; 711 follow.
    "rtplan_truncated.dcm",
}
#: Files storescu sends byte for byte as stored. storescu decodes each file and encodes the
#: data set again (DCMTK drops group lengths, gives sequences explicit lengths, pads odd
#: values), so what it sends equals the file only for files already written that way; these
#: were checked against a capturing pynetdicom SCP with DCMTK 3.6.7, one per transfer syntax.
STORESCU_VERBATIM = {
    "ExplVR_BigEnd.dcm",  # Explicit VR Big Endian
    "GDCMJ2K_TextGBR.dcm",  # JPEG 2000 Lossless
    "SC_rgb_dcmtk_+eb+cy+np.dcm",  # JPEG Baseline
    "test-SR.dcm",  # Explicit VR Little Endian, nested sequences
    "examples_overlay.dcm",  # Explicit VR Little Endian, overlay and pixel data
    "chrH31.dcm",  # Japanese names in ISO 2022
}
#: Seconds for rejects rows to show up (a few flush intervals, with a wide margin).
REJECTS_TIMEOUT = 15.0
#: Status ranges of C-STORE failures (PS3.4 B.2.3).
CANNOT_UNDERSTAND_RANGE = range(0xC000, 0xD000)
#: Reject reasons of data sets that do not decode.
UNDECODABLE = {"truncated", "malformed"}


@pytest.fixture(autouse=True)
def _pynetdicom_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's sockets with TCP_NODELAY (as DCMTK's with ``TCP_NODELAY=1``), and closed
    even when the peer is gone (see :func:`shutdown_socket`)."""
    monkeypatch.setattr(
        AssociationSocket, "_create_socket", nodelay(AssociationSocket._create_socket)
    )
    monkeypatch.setattr(AssociationSocket, "_shutdown_socket", shutdown_socket)


@pytest.fixture
def listeners() -> Iterator[Listeners]:
    """Start listeners; those still running at the end of the test are killed."""
    pool = Listeners()
    yield pool
    pool.close()
    # Sockets and files a test leaks warn now, in the test that leaked them.
    gc.collect()


def tiny_series(seed: int, n: int, size: int = 16) -> list[Dataset]:
    """`n` small CT slices of one series (about 3 KB each)."""
    return list(iter_series(seed, "CT", n, size, size))


#: The senders' wait for a C-STORE response.
SENDER_DIMSE_TIMEOUT = 5.0


def send_datasets(
    port: int, datasets: list[Dataset], *, aet: str = "PYNETDICOM"
) -> dict[str, int | None]:
    """C-STORE `datasets` (:func:`store_each`); SOPInstanceUID to status."""
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    statuses = store_each(port, datasets, contexts, aet=aet, dimse_timeout=SENDER_DIMSE_TIMEOUT)
    return {str(ds.SOPInstanceUID): s for ds, s in zip(datasets, statuses, strict=True)}


class Sender:
    """Send datasets over an association from a thread, recording what was acknowledged.

    The test can watch :attr:`acked` grow and kill or stop the listener at any moment; the
    thread stops at the first C-STORE without a response (the association is gone), but sends
    again over a new association after a response pynetdicom lost (see `_associate_and_send`).
    """

    def __init__(self, port: int, datasets: list[Dataset], *, aet: str = "PYNETDICOM") -> None:
        self.port = port
        self.datasets = datasets
        self.aet = aet
        self.acked: list[str] = []
        self.statuses: dict[str, int | None] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"sender-{aet}", daemon=True)

    def _run(self) -> None:
        pending = list(self.datasets)
        retries = 0
        while pending:
            if not self._associate_and_send(pending):
                return
            retries += 1
            if retries > LOST_RESPONSE_RETRIES:
                return

    def _associate_and_send(self, pending: list[Dataset]) -> bool:
        """Send ``pending`` (sent ones are taken off it) over one association; whether to
        send the rest again over a new one: a response that pynetdicom lost (below)."""
        contexts = {(str(ds.SOPClassUID), ExplicitVRLittleEndian) for ds in self.datasets}
        ae = scu(contexts, aet=self.aet)
        ae.dimse_timeout = SENDER_DIMSE_TIMEOUT
        try:
            assoc = ae.associate(HOST, self.port)
            if not assoc.is_established:
                return False
            while pending:
                ds = pending[0]
                uid = str(ds.SOPInstanceUID)
                started = time.monotonic()
                status = status_of(assoc.send_c_store(ds))
                self.statuses[uid] = status
                if status is None and time.monotonic() - started >= 0.9 * SENDER_DIMSE_TIMEOUT:
                    # pynetdicom's requestor can hand a response to its reactor thread instead
                    # of the waiting send_c_store (a race in pausing the reactor, under load:
                    # "Received unexpected C-STORE service message", pynetdicom issue #875):
                    # the listener answered, the client lost it. A modality sends the
                    # instance again on a new association; so does this one.
                    return True
                pending.pop(0)
                if status == SUCCESS:
                    self.acked.append(uid)
                if status is None or not assoc.is_established:
                    return False  # the listener is gone (killed or stopped): stop
            if assoc.is_established:
                assoc.release()
        except (RuntimeError, OSError) as exc:  # the association died under us: expected
            self.error = exc
        finally:
            ae.shutdown()
        return False

    def start(self) -> Sender:
        """Start sending."""
        self.thread.start()
        return self

    def wait_acked(self, n: int, timeout: float = TIMEOUT) -> None:
        """Wait until `n` instances are acknowledged."""
        for _ in range(int(timeout / 0.01)):
            if len(self.acked) >= n or not self.thread.is_alive():
                break
            time.sleep(0.01)
        assert len(self.acked) >= n, f"only {len(self.acked)} acknowledged: {self.statuses}"

    def join(self, timeout: float = TIMEOUT) -> None:
        """Wait for the thread to finish."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the sender did not finish"


def assert_stored_once(root: Path, uids: list[str] | set[str], listener: Listener) -> None:
    """Each of `uids` is one ``instances`` row whose object file is a readable DICOM file."""
    frame = read_table(root, "instances")
    assert duplicated(frame) == [], f"SOPInstanceUIDs indexed twice\n{listener.stderr()}"
    rows = {row["SOPInstanceUID"]: row for row in frame.to_dicts()}
    missing = sorted(set(uids) - set(rows))
    assert not missing, (
        f"{len(missing)} acknowledged instances not indexed: {missing[:5]}\n{listener.stderr()}"
    )
    for uid in uids:
        path = location_path(rows[uid]["location"])
        assert path.is_file(), f"{uid}: no object at {path}"
        ds = quiet_dcmread(path)
        assert str(ds.SOPInstanceUID) == uid
        expected = expected_object(
            root, rows[uid]["StudyInstanceUID"], rows[uid]["SeriesInstanceUID"], uid
        )
        if expected is not None:
            assert path == expected


def expected_object(root: Path, study: str, series: str, sop: str) -> Path | None:
    """Where the contract puts the object of these UIDs (None: under ``_unsafe``)."""
    if all(SAFE_UID.match(uid) for uid in (study, series, sop)):
        return root / "objects" / study / series / f"{sop}.dcm"
    return None


# --- 1. C-ECHO and --allow-aet -------------------------------------------------------------


def test_echo_and_allowed_calling_aets(tmp_path: Path, listeners: Listeners) -> None:
    listener = listeners.start(tmp_path / "open")
    assert run_echoscu(listener.port) is None, listener.stderr()

    guarded = listeners.start(tmp_path / "guarded", "--allow-aet", "MODALITY1,MODALITY2")
    assert run_echoscu(guarded.port, aet="MODALITY2") is None, guarded.stderr()
    assert run_echoscu(guarded.port, aet="MODALITY1") is None, guarded.stderr()
    refused = run_echoscu(guarded.port, aet="OTHER")
    assert refused is not None, "an association from OTHER was accepted"
    assert "Association Rejected" in refused, refused
    # Still serving after the rejection.
    assert run_echoscu(guarded.port, aet="MODALITY1") is None, guarded.stderr()


# --- 2. pydicom's test files ---------------------------------------------------------------


class CorpusFile(NamedTuple):
    """A file of the corpus that pydicom reads, as the test expects the listener to see it."""

    path: Path
    sop_uid: str
    syntax: str
    complete: bool  # has StudyInstanceUID and SeriesInstanceUID, and is not cut short


def native_pixels_complete(ds: Dataset) -> bool:
    """False if uncompressed Pixel Data holds fewer bytes than its attributes say."""
    if "PixelData" not in ds or ds.file_meta.TransferSyntaxUID.is_compressed:
        return True
    frames = int(ds.get("NumberOfFrames") or 1)
    bits = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1)
    expected = (bits * frames * int(ds.BitsAllocated) + 7) // 8
    return len(ds.PixelData) >= expected


def readable_files(folders: list[Path]) -> list[CorpusFile]:
    """Files pydicom reads with file meta (TransferSyntaxUID), SOPClassUID and SOPInstanceUID.

    Files whose uncompressed Pixel Data is cut short are left out unless in :data:`TRUNCATED`.
    """
    found: list[CorpusFile] = []
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            with warnings.catch_warnings():
                # pydicom converts values when they are read, warning about odd ones.
                warnings.simplefilter("ignore")
                try:
                    ds = pydicom.dcmread(path)
                    syntax = str(ds.file_meta.get("TransferSyntaxUID") or "")
                    sop_uid = str(ds.get("SOPInstanceUID") or "")
                    ok = bool(syntax and ds.get("SOPClassUID") and sop_uid)
                    pixels = native_pixels_complete(ds) if ok else False
                    has_uids = bool(ds.get("StudyInstanceUID") and ds.get("SeriesInstanceUID"))
                except Exception:  # noqa: BLE001, S112 - the oracle is "pydicom reads it"
                    continue
            if not ok or (not pixels and path.name not in TRUNCATED):
                continue
            found.append(CorpusFile(path, sop_uid, syntax, has_uids and path.name not in TRUNCATED))
    return found


def test_pydicom_test_files_arrive(
    tmp_path: Path,
    listeners: Listeners,
    pydicom_test_files: Path,
    pydicom_charset_files: Path,
) -> None:
    root = tmp_path / "root"
    listener = listeners.start(root, *FAST)
    files = readable_files([pydicom_test_files, pydicom_charset_files])
    by_name = {f.path.name: f for f in files}
    assert set(STORESCU_CANNOT_SEND) | TRUNCATED | STORESCU_VERBATIM <= set(by_name)
    raw = [f for f in files if f.path.name in STORESCU_CANNOT_SEND or f.path.name in TRUNCATED]
    dcmtk = [f for f in files if f not in raw]

    # storescu: one association, every file in its own transfer syntax.
    result = run_storescu(listener.port, [f.path for f in dcmtk], workdir=tmp_path / "scu")
    assert result.returncode == 0, storescu_errors(result)
    sent = {str(f.path) for f in dcmtk}
    assert set(result.statuses) == sent, (
        f"no response for {sorted(sent - set(result.statuses))}\n{storescu_errors(result)}"
    )
    conversions = re.findall(r"Converting transfer syntax: (.+) -> (.+)", result.log)
    assert conversions
    assert [(a, b) for a, b in conversions if a != b] == []
    # pynetdicom: the bytes of the data set as they are in the file.
    pynetdicom_statuses = send_files(listener.port, [f.path for f in raw])

    statuses = {
        **{f: result.statuses[str(f.path)] for f in dcmtk},
        **{f: pynetdicom_statuses[f.path] for f in raw},
    }
    wrong = {
        f.path.name: hex(s) if s is not None else None
        for f, s in statuses.items()
        if (s != SUCCESS if f.complete else s not in CANNOT_UNDERSTAND_RANGE)
    }
    assert wrong == {}, listener.stderr()
    assert all(
        statuses[f] == CANNOT_UNDERSTAND
        for f in files
        if not f.complete and f.path.name not in TRUNCATED
    )

    # The index: one row per distinct SOPInstanceUID of the files answered 0x0000.
    accepted = [f for f in files if f.complete]
    senders: dict[str, set[str]] = defaultdict(set)
    syntaxes: dict[str, set[str]] = defaultdict(set)
    for f in accepted:
        senders[f.sop_uid].add("PYNETDICOM" if f in raw else "STORESCU")
        syntaxes[f.sop_uid].add(f.syntax)
    frame = wait_for_uids(root, senders, listener=listener)
    assert duplicated(frame) == []
    assert sorted(frame["SOPInstanceUID"].to_list()) == sorted(senders)
    uid_count: dict[str, int] = defaultdict(int)
    for f in files:
        uid_count[f.sop_uid] += 1

    for row in frame.to_dicts():
        uid = row["SOPInstanceUID"]
        assert row["source"] in senders[uid], row
        assert row["TransferSyntaxUID"] in syntaxes[uid], row
        path = location_path(row["location"])
        assert path.is_file(), row
        expected = expected_object(root, row["StudyInstanceUID"], row["SeriesInstanceUID"], uid)
        assert expected is None or path == expected
        assert expected is not None or path.parent == root / "objects" / "_unsafe"
        assert row["size_bytes"] > 0
        quiet_dcmread(path)  # a whole Part 10 file
        # Stored unconverted: in the syntax it was sent in, which is the file's.
        assert meta_of(path)[2] == row["TransferSyntaxUID"]
        assert uid_of(path) == uid

    # Byte for byte, where what was sent is known.
    verbatim = [by_name[name] for name in sorted(STORESCU_VERBATIM)]
    verbatim += [f for f in raw if f.complete and uid_count[f.sop_uid] == 1]
    rows = {row["SOPInstanceUID"]: row for row in frame.to_dicts()}
    for f in verbatim:
        assert uid_count[f.sop_uid] == 1, f"{f.path.name} shares its SOPInstanceUID"
        received = dataset_bytes(location_path(rows[f.sop_uid]["location"]))
        assert received == dataset_bytes(f.path), f"{f.path.name}: stored bytes differ"

    # Files without Study or Series UID, and files cut short: one rejects row each.
    missing = [f for f in files if not f.complete and f.path.name not in TRUNCATED]
    cut = [f for f in files if f.path.name in TRUNCATED]
    rejects = wait_for_rejects(
        root,
        [({"missing_uid"}, len(missing)), (UNDECODABLE, len(cut))],
        listener=listener,
        timeout=REJECTS_TIMEOUT,
    )
    missing_rows = rejects.filter(pl.col("reason") == "missing_uid")
    assert sorted(missing_rows["SOPInstanceUID"].to_list()) == sorted(f.sop_uid for f in missing)
    assert set(missing_rows["source"].to_list()) == {"STORESCU"}
    cut_rows = rejects.filter(pl.col("reason").is_in(sorted(UNDECODABLE)))
    assert cut_rows.height == len(cut), cut_rows
    assert set(cut_rows["source"].to_list()) == {"PYNETDICOM"}


# --- 3. Concurrent associations ------------------------------------------------------------


def test_eight_concurrent_storescu(tmp_path: Path, listeners: Listeners) -> None:
    root = tmp_path / "root"
    listener = listeners.start(root, *FAST)
    batches = {
        f"SCU{n}": write_ct_series(tmp_path / f"in{n}", seed=700 + n, n_slices=12, size=64)
        for n in range(8)
    }
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {
            aet: pool.submit(run_storescu, listener.port, files, workdir=tmp_path / "scu", aet=aet)
            for aet, files in batches.items()
        }
        results = {aet: future.result(timeout=120) for aet, future in futures.items()}
    for aet, result in results.items():
        assert result.returncode == 0, storescu_errors(result)
        assert len(result.statuses) == len(batches[aet]), storescu_errors(result)
        assert result.failures() == {}, listener.stderr()

    expected: dict[str, tuple[str, str, str]] = {}
    for aet, files in batches.items():
        for file in files:
            ds = quiet_dcmread(file, stop_before_pixels=True)
            expected[str(ds.SOPInstanceUID)] = (aet, ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert len(expected) == 8 * 12
    frame = wait_for_uids(root, expected, listener=listener)
    assert frame.height == len(expected)
    assert duplicated(frame) == []
    got = {
        row["SOPInstanceUID"]: (row["source"], row["StudyInstanceUID"], row["SeriesInstanceUID"])
        for row in frame.to_dicts()
    }
    assert got == expected
    assert_stored_once(root, list(expected), listener)


# --- 4. kill -9 in the middle of a transfer --------------------------------------------------


def test_kill_9_loses_nothing_acknowledged(tmp_path: Path, listeners: Listeners) -> None:
    root = tmp_path / "root"
    listener = listeners.start(root, *FAST)
    datasets = tiny_series(seed=41, n=300)
    sender = Sender(listener.port, datasets).start()
    sender.wait_acked(100)
    os.kill(listener.pid, signal.SIGKILL)
    assert listener.wait() == -signal.SIGKILL
    sender.join()
    acked = list(sender.acked)
    assert 100 <= len(acked) < len(datasets), "the kill did not land during the transfer"

    restarted = listeners.start(root, *FAST)
    wait_for_uids(root, acked, listener=restarted)
    assert_stored_once(root, acked, restarted)
    sent = {str(ds.SOPInstanceUID) for ds in datasets}
    frame = read_table(root, "instances")
    assert set(frame["SOPInstanceUID"].to_list()) <= sent
    # Each acknowledged object holds the very bytes sent (pynetdicom's explicit VR LE encoding).
    locations = dict(zip(frame["SOPInstanceUID"], frame["location"], strict=True))
    for ds in datasets:
        if (uid := str(ds.SOPInstanceUID)) in acked:
            stored = dataset_bytes(location_path(locations[uid]))
            assert stored == encode(ds, is_implicit_vr=False, is_little_endian=True), uid
    # The restarted listener works.
    more = tiny_series(seed=42, n=5)
    assert set(send_datasets(restarted.port, more).values()) == {SUCCESS}
    wait_for_uids(root, [str(ds.SOPInstanceUID) for ds in more], listener=restarted)
    assert duplicated(read_table(root, "instances")) == []


def test_kill_9_during_storescu(tmp_path: Path, listeners: Listeners) -> None:
    root = tmp_path / "root"
    listener = listeners.start(root, *FAST)
    files = write_ct_series(tmp_path / "in", seed=43, n_slices=150, size=32)
    log = StorescuLog()
    proc = subprocess.Popen(
        storescu_command(listener.port, files, workdir=tmp_path / "scu"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=dcmtk_env(),
    )

    def read() -> None:
        assert proc.stderr is not None
        with proc.stderr:
            for line in proc.stderr:
                log.feed(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for _ in range(int(TIMEOUT / 0.002)):
            if len(log.acked) >= 50 or proc.poll() is not None:
                break
            time.sleep(0.002)
        os.kill(listener.pid, signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
        reader.join(TIMEOUT)
    listener.kill()
    acked = [meta_of(Path(name))[1] for name in log.acked]
    assert 50 <= len(acked) < len(files), "the kill did not land during the transfer"

    restarted = listeners.start(root, *FAST)
    wait_for_uids(root, acked, listener=restarted)
    assert_stored_once(root, acked, restarted)


# --- 5. Bad data sets ----------------------------------------------------------------------


def cut_inside(data: bytes, tag: int) -> bytes:
    """`data` (a Part 10 file, explicit VR little endian) cut in the middle of `tag`'s value."""
    group, element = tag >> 16, tag & 0xFFFF
    marker = group.to_bytes(2, "little") + element.to_bytes(2, "little")
    start = data.index(marker, dataset_offset(data))
    assert data[start + 4 : start + 6].isalpha(), "not an element header"
    length = int.from_bytes(data[start + 6 : start + 8], "little")
    assert length > 2
    return data[: start + 8 + length // 2]


def test_bad_data_sets_are_rejected_and_the_association_goes_on(
    tmp_path: Path, listeners: Listeners, malformed: dict[str, Path]
) -> None:
    root = tmp_path / "root"
    listener = listeners.start(root, *FAST)
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = make_series(51, "CT", 7, 16, 16)
    good_files = []
    for number, ds in enumerate(good):
        path = inputs / f"good{number}.dcm"
        path.write_bytes(dataset_to_bytes(ds))
        good_files.append(path)
    # A good slice cut in the middle of PatientName's value.
    cut_name = inputs / "cut_name.dcm"
    cut_name.write_bytes(
        cut_inside(dataset_to_bytes(make_series(52, "CT", 1, 16, 16)[0]), 0x00100010)
    )
    bad = {
        "cut_name": (cut_name, UNDECODABLE),
        "truncated_header": (malformed["truncated_header"], UNDECODABLE),
        "truncated_pixels": (malformed["truncated_pixels"], UNDECODABLE),
        "truncated_encapsulated": (malformed["truncated_encapsulated"], UNDECODABLE),
        "missing_study_uid": (malformed["missing_study_uid"], {"missing_uid"}),
        "missing_sop_uid": (malformed["missing_sop_uid"], {"missing_uid"}),
    }
    order: list[Path] = [good_files[0]]
    for (path, _), good_file in zip(bad.values(), good_files[1:], strict=True):
        order += [path, good_file]
    statuses = send_files(listener.port, order)

    report = {p.name: hex(s) if s is not None else None for p, s in statuses.items()}
    for name, (path, _) in bad.items():
        status = statuses[path]
        assert status in CANNOT_UNDERSTAND_RANGE, f"{name}: {report}\n{listener.stderr()}"
    assert all(statuses[p] == SUCCESS for p in good_files), report
    for name in ("missing_study_uid", "missing_sop_uid"):
        assert statuses[bad[name][0]] == CANNOT_UNDERSTAND, report

    wait_for_uids(root, [meta_of(p)[1] for p in good_files], listener=listener)
    frame = read_table(root, "instances")
    assert frame.height == len(good_files), frame
    # Stored as received.
    rows = {row["SOPInstanceUID"]: row for row in frame.to_dicts()}
    for path in good_files:
        stored = location_path(rows[meta_of(path)[1]]["location"])
        assert dataset_bytes(stored) == dataset_bytes(path), path.name

    needs = [
        (reasons, sum(1 for _, r in bad.values() if r == reasons))
        for reasons in (UNDECODABLE, {"missing_uid"})
    ]
    rejects = wait_for_rejects(root, needs, listener=listener, timeout=REJECTS_TIMEOUT)
    for reasons, n in needs:
        mine = rejects.filter(pl.col("reason").is_in(sorted(reasons)))
        assert mine.height == n, f"{n} rejects of reason {reasons} expected\n{rejects}"
        assert set(mine["source"].to_list()) == {"PYNETDICOM"}, mine
    # The data set of missing_study_uid names itself.
    uid = meta_of(bad["missing_study_uid"][0])[1]
    assert uid in rejects.filter(pl.col("reason") == "missing_uid")["SOPInstanceUID"].to_list()


def unsafe_instance(path: Path, seed: int, **uids: str) -> Path:
    """A good CT slice with UIDs overridden.

    The file meta keeps the slice's own SOP Instance UID if the new one is longer than 64
    characters (the C-STORE request could not carry it), else takes the new one.
    """
    ds = make_series(seed, "CT", 1, 16, 16)[0]
    original = dataset_to_bytes(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the UIDs are invalid on purpose
        for keyword, value in uids.items():
            setattr(ds, keyword, value)
        changed = dataset_to_bytes(ds)
    if len(uids.get("SOPInstanceUID", "")) > 64:
        changed = original[: dataset_offset(original)] + changed[dataset_offset(changed) :]
    path.write_bytes(changed)
    return path


def test_unsafe_uids_stay_inside_objects(tmp_path: Path, listeners: Listeners) -> None:
    root = tmp_path / "work" / "root"
    listener = listeners.start(root, *FAST)
    inputs = tmp_path / "in"
    inputs.mkdir()
    token = uuid.uuid4().hex[:12]
    escape = "../" * 12 + f"tmp/evil-{token}"
    escape_target = Path("/tmp") / f"evil-{token}.dcm"
    files = {
        "sop_escape": unsafe_instance(inputs / "a.dcm", 61, SOPInstanceUID=escape),
        "sop_80": unsafe_instance(inputs / "b.dcm", 62, SOPInstanceUID="1." + "2" * 78),
        "study_escape": unsafe_instance(
            inputs / "c.dcm", 63, StudyInstanceUID=f"../../evil-{token}"
        ),
        "series_slash": unsafe_instance(
            inputs / "d.dcm", 64, SeriesInstanceUID=f"/tmp/evil-{token}"
        ),
    }
    good = unsafe_instance(inputs / "good.dcm", 65)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        statuses = send_files(listener.port, [*files.values(), good])
    assert statuses[good] == SUCCESS

    accepted = {name: p for name, p in files.items() if statuses[p] == SUCCESS}
    refused = {name: p for name, p in files.items() if statuses[p] != SUCCESS}
    for name, path in refused.items():
        assert statuses[path] is not None, f"{name}: no response\n{listener.stderr()}"
    uids = {name: uid_of(p) for name, p in files.items()}
    frame = wait_for_uids(root, [uids[n] for n in accepted] + [meta_of(good)[1]], listener=listener)
    if refused:
        reasons = {"missing_uid", "malformed", "invalid_uid", "unsafe_uid", *UNDECODABLE}
        wait_for_rejects(root, [(reasons, len(refused))], listener=listener)
    rows = {row["SOPInstanceUID"]: row for row in frame.to_dicts()}
    unsafe = root / "objects" / "_unsafe"
    for name in accepted:
        path = location_path(rows[uids[name]]["location"])
        assert path.parent == unsafe, f"{name}: stored at {path}"
        assert re.fullmatch(r"[0-9a-f]+\.dcm", path.name), path
        assert uid_of(path) == uids[name]
    if accepted:
        assert len(list(unsafe.glob("*.dcm"))) == len(accepted)

    assert not escape_target.exists()
    assert list(tmp_path.rglob("*evil*")) == []
    stored = list(root.rglob("*.dcm"))
    outside = [
        p
        for p in stored
        if not p.resolve().is_relative_to((root / "objects").resolve())
        and not p.resolve().is_relative_to((root / "quarantine").resolve())
    ]
    assert outside == []


# --- 6. Disk full ----------------------------------------------------------------------------


def test_disk_full_answers_out_of_resources(tmp_path: Path, listeners: Listeners) -> None:
    # RLIMIT_FSIZE makes the listener's writes past `limit` bytes of any one file fail with
    # EFBIG, as on a full disk. More than `limit` is sent in all; and each large instance is
    # bigger than `limit` alone, so it cannot be stored wherever the listener puts it.
    root = tmp_path / "root"
    limit = 1 << 20
    listener = listeners.start(root, *FAST, file_size_limit=limit)
    inputs = tmp_path / "in"
    small = write_ct_series(inputs / "small", seed=81, n_slices=40, size=128)  # ~36 KB each
    large = write_ct_series(inputs / "large", seed=82, n_slices=2, size=768)  # ~1.2 MB each
    assert sum(f.stat().st_size for f in small) > limit
    assert all(f.stat().st_size > limit for f in large)
    order = [*small[:5], large[0], *small[5:20], large[1], *small[20:]]
    statuses = send_files(listener.port, order)
    report = {f"{p.parent.name}/{p.name}": s and hex(s) for p, s in statuses.items()}
    log = f"{report}\n{listener.stderr()}"
    # Every C-STORE is answered (the association goes on), success or out of resources.
    assert set(statuses.values()) <= {SUCCESS, OUT_OF_RESOURCES}, log
    assert all(statuses[f] == OUT_OF_RESOURCES for f in large), log
    assert statuses[small[0]] == SUCCESS, log
    acked = [meta_of(f)[1] for f in small if statuses[f] == SUCCESS]

    listener.kill()
    restarted = listeners.start(root, *FAST)
    wait_for_uids(root, acked, listener=restarted)
    assert_stored_once(root, acked, restarted)
    # What was refused is not in the index, or is there whole.
    rows = {row["SOPInstanceUID"]: row for row in read_table(root, "instances").to_dicts()}
    for f in order:
        row = rows.get(meta_of(f)[1])
        if statuses[f] != SUCCESS and row is not None:
            assert dataset_bytes(location_path(row["location"])) == dataset_bytes(f), f.name


# --- 7. SIGTERM and SIGINT -------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_flushes_and_exits_0(tmp_path: Path, listeners: Listeners, sig: int) -> None:
    root = tmp_path / "root"
    # A long flush interval: only the shutdown flush can put the rows in the index in time.
    listener = listeners.start(root, "--flush-interval", "60")
    datasets = tiny_series(seed=91, n=200)
    sender = Sender(listener.port, datasets).start()
    sender.wait_acked(30)
    status = listener.stop(sig)
    sender.join()
    assert status == 0, listener.stderr()
    acked = list(sender.acked)
    assert len(acked) >= 30
    # No waiting: everything acknowledged is in the index when the process has exited.
    assert_stored_once(root, acked, listener)


# --- 8. Metrics ------------------------------------------------------------------------------


def metric(text: str, name: str) -> dict[str, float]:
    """Samples of metric `name` in Prometheus text: label text to value."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)", line)
        if match:
            samples[match.group(1) or ""] = float(match.group(2))
    return samples


def fetch_metrics(port: int) -> str:
    """The text of http://127.0.0.1:PORT/metrics."""
    response = httpx.get(f"http://{HOST}:{port}/metrics", timeout=10)
    response.raise_for_status()
    return response.text


def test_metrics(tmp_path: Path, listeners: Listeners, malformed: dict[str, Path]) -> None:
    root = tmp_path / "root"
    metrics_port = free_port()
    listener = listeners.start(root, *FAST, "--metrics-port", str(metrics_port))
    files = write_ct_series(tmp_path / "in", seed=111, n_slices=7, size=32)
    result = run_storescu(listener.port, files, workdir=tmp_path / "scu")
    assert result.failures() == {}, storescu_errors(result)
    assert len(result.statuses) == 7, storescu_errors(result)

    text = ""
    for _ in range(int(TIMEOUT / 0.1)):
        text = fetch_metrics(metrics_port)
        if sum(metric(text, "imgindex_listener_instances_total").values()) >= 7:
            break
        time.sleep(0.1)
    assert sum(metric(text, "imgindex_listener_instances_total").values()) == 7, text
    sent_bytes = sum(len(dataset_bytes(f)) for f in files)
    assert sum(metric(text, "imgindex_listener_received_bytes_total").values()) >= sent_bytes
    assert metric(text, "imgindex_listener_pending_bytes"), text
    for _ in range(int(TIMEOUT / 0.1)):
        if sum(metric(text, "imgindex_listener_associations_open").values()) == 0:
            break
        time.sleep(0.1)
        text = fetch_metrics(metrics_port)
    assert sum(metric(text, "imgindex_listener_associations_open").values()) == 0, text

    statuses = send_files(listener.port, [malformed["missing_study_uid"]])
    assert set(statuses.values()) == {CANNOT_UNDERSTAND}
    failures: dict[str, float] = {}
    for _ in range(int(TIMEOUT / 0.1)):
        failures = metric(fetch_metrics(metrics_port), "imgindex_listener_failures_total")
        if sum(failures.values()) >= 1:
            break
        time.sleep(0.1)
    assert sum(failures.values()) == 1, failures
    assert all('reason="' in labels for labels, value in failures.items() if value), failures


# --- 9. TLS ----------------------------------------------------------------------------------


def test_tls_round_trip(tmp_path: Path, listeners: Listeners) -> None:
    openssl = shutil.which("openssl")
    assert openssl, "the openssl command is needed to make a certificate"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        capture_output=True,
        check=True,
        timeout=TIMEOUT,
    )
    root = tmp_path / "root"
    listener = listeners.start(root, *FAST, "--tls-cert", str(cert), "--tls-key", str(key))

    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    datasets = tiny_series(seed=121, n=3)
    ae = scu({(str(datasets[0].SOPClassUID), ExplicitVRLittleEndian)}, aet="TLSCLIENT")
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    assoc = ae.associate(HOST, listener.port, tls_args=(context, "localhost"))
    try:
        assert assoc.is_established, listener.stderr()
        assert status_of(assoc.send_c_echo()) == SUCCESS
        statuses = [status_of(assoc.send_c_store(ds)) for ds in datasets]
        assert statuses == [SUCCESS] * 3, listener.stderr()
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    frame = wait_for_uids(root, [str(ds.SOPInstanceUID) for ds in datasets], listener=listener)
    assert set(frame["source"].to_list()) == {"TLSCLIENT"}

    # Without TLS the listener does not talk.
    plain = scu({(str(datasets[0].SOPClassUID), ExplicitVRLittleEndian)}, acse_timeout=5)
    try:
        assert not plain.associate(HOST, listener.port).is_established
    finally:
        plain.shutdown()
    assert pydicom.dcmread(location_path(frame["location"][0])).SOPInstanceUID in {
        str(ds.SOPInstanceUID) for ds in datasets
    }
