"""imgindex.listener in-process: the hand-written encodings against pydicom, object keys that
cannot escape, and the storage pipeline's promises (acknowledged means durable, replay adds
no duplicates, bad bytes are answered and recorded). Real DCMTK peers are in
test_listener_peers.py."""

from __future__ import annotations

import copy
import errno
import io
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode as decode_dataset

from imgindex.index import Index
from imgindex.listener import Ingest, Listener, ListenerConfig, Status, object_key
from imgindex.listener.dimse import (
    IMPLEMENTATION_CLASS_UID,
    VERIFICATION,
    command_uid,
    command_us,
    decode_command,
    echo_response,
    file_meta,
    store_response,
)
from imgindex.listener.ingest import INLINE_LIMIT
from imgindex.testing import make_series
from storage.objects import validate_key

CT = "1.2.840.10008.5.1.4.1.1.2"


def _dataset_bytes(ds: pydicom.Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The data set as a C-STORE carries it: no preamble, no file meta."""
    buffer = io.BytesIO()
    clone = pydicom.Dataset(ds)
    clone.file_meta = pydicom.dataset.FileMetaDataset()
    clone.file_meta.TransferSyntaxUID = UID(syntax)
    clone.save_as(buffer, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    return buffer.getvalue()


def _series(n: int = 3, seed: int = 1) -> list[pydicom.Dataset]:
    return make_series(seed, "CT", n, 16, 16)


def _rows(root: Path) -> list[dict[str, Any]]:
    return Index(root).instances.collect().to_dicts()


# -- encodings -------------------------------------------------------------------------------


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_file_meta_plus_received_bytes_is_the_file_pydicom_reads(syntax: str) -> None:
    ds = _series(1)[0]
    data = file_meta(CT, ds.SOPInstanceUID, syntax, "MODALITY1") + _dataset_bytes(ds, syntax)
    read = pydicom.dcmread(io.BytesIO(data))
    meta = read.file_meta
    assert meta.TransferSyntaxUID == syntax
    assert meta.MediaStorageSOPClassUID == CT
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.SourceApplicationEntityTitle == "MODALITY1"
    assert read.SOPInstanceUID == ds.SOPInstanceUID
    assert read.PixelData == ds.PixelData


def test_file_meta_group_length_matches_pydicom() -> None:
    data = file_meta(CT, "1.2.3.4", ExplicitVRLittleEndian, "ODDLEN")
    read = pydicom.dcmread(io.BytesIO(data + _dataset_bytes(_series(1)[0])))
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    pydicom.filewriter.write_file_meta_info(buffer, read.file_meta, enforce_standard=False)
    assert buffer.getvalue() == data[132:], "our meta group must be byte for byte pydicom's"


def test_store_response_decodes_as_pynetdicom_reads_it() -> None:
    raw = store_response(CT, "1.2.3.45", 7, Status.CANNOT_UNDERSTAND, "bad bytes: truncated")
    cmd = decode_dataset(io.BytesIO(raw), is_implicit_vr=True, is_little_endian=True)
    assert cmd is not None
    assert cmd.CommandGroupLength == len(raw) - 12
    assert cmd.CommandField == 0x8001
    assert cmd.MessageIDBeingRespondedTo == 7
    assert cmd.Status == 0xC210
    assert cmd.AffectedSOPClassUID == CT
    assert cmd.AffectedSOPInstanceUID == "1.2.3.45"
    assert cmd.ErrorComment == "bad bytes: truncated"
    assert cmd.CommandDataSetType == 0x0101
    echo = decode_dataset(io.BytesIO(echo_response(3)), is_implicit_vr=True, is_little_endian=True)
    assert echo is not None
    assert (echo.CommandField, echo.MessageIDBeingRespondedTo, echo.Status) == (0x8030, 3, 0)
    assert echo.AffectedSOPClassUID == VERIFICATION


def test_decode_command_reads_pynetdicoms_c_store_rq() -> None:
    primitive = C_STORE()
    primitive.MessageID = 12
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.3.4.5"
    primitive.Priority = 0
    primitive.DataSet = io.BytesIO(b"\0" * 8)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    (p_data,) = list(message.encode_msg(1, 0))[:1]
    command = p_data.presentation_data_value_list[0][1][1:]  # drop the control header byte
    decoded = decode_command(command)
    assert command_us(decoded, 0x0100) == 0x0001
    assert command_us(decoded, 0x0110) == 12
    assert command_uid(decoded, 0x0002) == CT
    assert command_uid(decoded, 0x1000) == "1.2.3.4.5"
    with pytest.raises(ValueError, match="past the end"):
        decode_command(command[:-3])


# -- object keys -----------------------------------------------------------------------------


def test_safe_uids_make_a_readable_key() -> None:
    assert object_key("1.2", "1.2.3", "1.2.3.4") == "1.2/1.2.3/1.2.3.4.dcm"


@given(st.text(max_size=80), st.text(max_size=80), st.text(max_size=80))
def test_no_uid_can_make_a_key_outside_the_store(study: str, series: str, sop: str) -> None:
    key = object_key(study, series, sop)
    assert validate_key(key) == key
    root = Path("/store")
    assert (root / key).resolve().is_relative_to(root)
    if key.startswith("_unsafe/"):
        return
    assert all(c in "0123456789./" for c in key.removesuffix(".dcm"))


@pytest.mark.parametrize(
    "uid", ["../../../../tmp/evil", "1.2/../../3", "." * 10, "1" * 65, "1..2", "1.2.", ""]
)
def test_unsafe_uids_are_hashed(uid: str) -> None:
    assert object_key("1.2", "1.2.3", uid).startswith("_unsafe/")


# -- the pipeline ----------------------------------------------------------------------------


def test_store_acknowledges_indexes_and_keeps_bytes_unchanged(tmp_path: Path) -> None:
    ingest = Ingest(tmp_path, flush_interval=0.05)
    ingest.start()
    series = _series(3)
    for ds in series:
        result = ingest.store(
            "SCANNER", CT, ds.SOPInstanceUID, ExplicitVRLittleEndian, _dataset_bytes(ds)
        )
        assert result.status == Status.SUCCESS
    ingest.close()
    rows = _rows(tmp_path)
    assert sorted(r["SOPInstanceUID"] for r in rows) == sorted(d.SOPInstanceUID for d in series)
    for row in rows:
        assert row["source"] == "SCANNER"
        path = Path(row["location"].removeprefix("file://"))
        assert path.is_relative_to(tmp_path / "objects")
        ds = next(d for d in series if d.SOPInstanceUID == row["SOPInstanceUID"])
        assert path.read_bytes().endswith(_dataset_bytes(ds))
    assert [p.stat().st_size for p in (tmp_path / "wal" / "listener-0").iterdir()] in ([], [0])


def test_bad_bytes_are_answered_cannot_understand_and_recorded(tmp_path: Path) -> None:
    ingest = Ingest(tmp_path, flush_interval=0.05)
    ingest.start()
    good, missing = _series(2)
    truncated = _dataset_bytes(good)[:300]
    del missing.StudyInstanceUID
    r1 = ingest.store("SCU", CT, good.SOPInstanceUID, ExplicitVRLittleEndian, truncated)
    r2 = ingest.store(
        "SCU", CT, missing.SOPInstanceUID, ExplicitVRLittleEndian, _dataset_bytes(missing)
    )
    r3 = ingest.store("SCU", CT, good.SOPInstanceUID, ExplicitVRLittleEndian, _dataset_bytes(good))
    ingest.close()
    assert (r1.status, r1.reason) == (Status.CANNOT_UNDERSTAND, "truncated")
    assert (r2.status, r2.reason) == (Status.CANNOT_UNDERSTAND, "missing_uid")
    assert r3.status == Status.SUCCESS
    rejects = Index(tmp_path).rejects.collect().to_dicts()
    assert {r["reason"] for r in rejects} == {"truncated", "missing_uid"}
    for reject in rejects:
        assert Path(reject["location"].removeprefix("file://")).is_file(), "kept in quarantine"
    assert [r["SOPInstanceUID"] for r in _rows(tmp_path)] == [good.SOPInstanceUID]


@pytest.mark.parametrize("size", [16, 400], ids=["in-the-log", "by-reference"])
def test_a_crash_before_the_flush_loses_nothing_and_replay_adds_no_duplicates(
    tmp_path: Path, size: int
) -> None:
    crashed = Ingest(tmp_path, flush_interval=3600)  # never flushes on its own
    crashed.start()
    series = make_series(2, "CT", 4, size, size)
    assert (len(_dataset_bytes(series[0])) > INLINE_LIMIT) == (size == 400)
    for ds in series:
        result = crashed.store(
            "SCU", CT, ds.SOPInstanceUID, ExplicitVRLittleEndian, _dataset_bytes(ds)
        )
        assert result.status == Status.SUCCESS
    # No close(): as if killed. The next start replays the log.
    restarted = Ingest(tmp_path, flush_interval=0.05)
    assert restarted.start() == 4
    restarted.close()
    again = Ingest(tmp_path, flush_interval=0.05)
    assert again.start() == 0, "a clean close leaves nothing to replay"
    again.close()
    rows = _rows(tmp_path)
    assert sorted(r["SOPInstanceUID"] for r in rows) == sorted(d.SOPInstanceUID for d in series)


@pytest.mark.parametrize("order", ["inline-first", "staged-first"])
def test_one_uid_sent_small_then_large_keeps_object_and_row_from_the_same_receipt(
    tmp_path: Path, order: str
) -> None:
    # The same SOPInstanceUID arrives twice before the indexer runs: once small enough to go
    # into the log, once large enough to be staged as an object. Whatever the order, the
    # stored object and the row both come from the last receipt.
    ingest = Ingest(tmp_path, flush_interval=3600)
    ingest.start()
    large = make_series(3, "CT", 1, 400, 400)[0]
    small = copy.deepcopy(large)
    small.Rows = small.Columns = 16
    small.PixelData = bytes(16 * 16 * 2)
    sends = [(small, ImplicitVRLittleEndian), (large, ExplicitVRLittleEndian)]
    if order == "staged-first":
        sends.reverse()
    assert len(_dataset_bytes(small)) < INLINE_LIMIT < len(_dataset_bytes(large))
    for ds, syntax in sends:
        result = ingest.store("SCU", CT, ds.SOPInstanceUID, syntax, _dataset_bytes(ds, syntax))
        assert result.status == Status.SUCCESS
    ingest.close()
    [row] = _rows(tmp_path)
    last, syntax = sends[-1]
    assert row["TransferSyntaxUID"] == syntax
    assert row["Rows"] == last.Rows
    path = Path(row["location"].removeprefix("file://"))
    assert path.read_bytes().endswith(_dataset_bytes(last, syntax))
    assert not (tmp_path / "objects" / "_incoming").exists(), "nothing left staged"


def test_without_sync_large_instances_go_into_the_log_too(tmp_path: Path) -> None:
    # --sync none: no object file is created before the answer, the indexer writes it.
    ingest = Ingest(tmp_path, sync=False, flush_interval=3600)
    ingest.start()
    large = make_series(4, "CT", 1, 400, 400)[0]
    data = _dataset_bytes(large)
    assert len(data) > INLINE_LIMIT
    result = ingest.store("SCU", CT, large.SOPInstanceUID, ExplicitVRLittleEndian, data)
    assert result.status == Status.SUCCESS
    assert not (tmp_path / "objects" / "_incoming").exists()
    assert sum(p.stat().st_size for p in (tmp_path / "wal").rglob("*") if p.is_file()) > len(data)
    ingest.close()
    [row] = _rows(tmp_path)
    assert Path(row["location"].removeprefix("file://")).read_bytes().endswith(data)


def test_a_staged_object_never_logged_is_deleted_on_the_next_start(tmp_path: Path) -> None:
    # A receiver that died between staging an object and logging it never acknowledged it.
    stray = tmp_path / "objects" / "_incoming" / "listener-0" / "0123.dcm"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"never acknowledged")
    ingest = Ingest(tmp_path, flush_interval=0.05)
    assert ingest.start() == 0
    ingest.close()
    assert not stray.exists()
    assert _rows(tmp_path) == []


def test_a_full_disk_is_answered_out_of_resources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingest = Ingest(tmp_path, flush_interval=0.05)
    ingest.start()
    ok, full = _series(2)
    assert (
        ingest.store(
            "SCU", CT, ok.SOPInstanceUID, ExplicitVRLittleEndian, _dataset_bytes(ok)
        ).status
        == Status.SUCCESS
    )

    def enospc(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    assert ingest._receiver is not None
    monkeypatch.setattr(ingest._receiver.wal, "append", enospc)
    result = ingest.store(
        "SCU", CT, full.SOPInstanceUID, ExplicitVRLittleEndian, _dataset_bytes(full)
    )
    assert (result.status, result.reason) == (Status.OUT_OF_RESOURCES, "out_of_resources")
    monkeypatch.undo()
    ingest.close()
    assert [r["SOPInstanceUID"] for r in _rows(tmp_path)] == [ok.SOPInstanceUID]


# -- the server, with pynetdicom as the client -----------------------------------------------


def test_listener_answers_echo_and_store_over_loopback(tmp_path: Path) -> None:
    config = ListenerConfig(
        root=tmp_path, port=0, flush_interval=0.05, allow_aets=frozenset({"OK"})
    )
    with Listener(config) as listener:
        ae = AE(ae_title="OK")
        ae.add_requested_context(VERIFICATION)
        ae.add_requested_context(CT, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="IMGINDEX")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        ds = _series(1)[0]
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()

        other = AE(ae_title="NOT_ALLOWED")
        other.add_requested_context(VERIFICATION)
        refused = other.associate("127.0.0.1", listener.port)
        assert refused.is_rejected
    assert [r["SOPInstanceUID"] for r in _rows(tmp_path)] == [ds.SOPInstanceUID]
