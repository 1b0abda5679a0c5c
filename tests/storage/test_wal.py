"""storage.wal: records survive reopening, damage is cut at the first bad record, group
commit covers every waiter, checkpoints never pass an unsettled record."""

from __future__ import annotations

import errno
import os
import threading
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.wal import WriteAheadLog, read_segment

if TYPE_CHECKING:
    from pathlib import Path


def _payloads(log: WriteAheadLog) -> list[bytes]:
    return [r.payload for r in log.replay()]


def test_records_come_back_in_order_after_reopening(tmp_path: Path) -> None:
    log = WriteAheadLog(tmp_path, segment_bytes=64)
    lsns = [log.append([b"record-", str(i).encode()]) for i in range(20)]
    log.wait_durable(lsns[-1])
    log.close()
    assert lsns == list(range(1, 21))
    assert len(log.segments()) > 2, "small segments must rotate"

    again = WriteAheadLog(tmp_path)
    assert _payloads(again) == [f"record-{i}".encode() for i in range(20)]
    assert [r.lsn for r in again.replay()] == lsns
    # Sequence numbers go on after the old ones.
    assert again.append([b"next"]) == 21


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=12), st.integers(0, 4000))
def test_a_torn_tail_loses_only_what_follows_the_damage(
    tmp_path_factory: pytest.TempPathFactory, payloads: list[bytes], cut: int
) -> None:
    folder = tmp_path_factory.mktemp("wal")
    log = WriteAheadLog(folder, segment_bytes=1 << 30)
    for payload in payloads:
        log.append([payload])
    log.close()
    (_number, path), *_ = log.segments()
    data = path.read_bytes()
    cut = min(cut, len(data))
    path.write_bytes(data[:cut])
    intact = [r.payload for r in read_segment(path)]
    # What survives is a prefix of what was written, and every record wholly before the
    # cut survives.
    assert intact == payloads[: len(intact)]
    ends = []
    pos = 0
    for payload in payloads:
        pos += 24 + len(payload)
        ends.append(pos)
    assert len(intact) == sum(1 for end in ends if end <= cut)


def test_a_flipped_byte_stops_the_segment_at_that_record(tmp_path: Path) -> None:
    log = WriteAheadLog(tmp_path, segment_bytes=1 << 30)
    for i in range(5):
        log.append([bytes([i]) * 100])
    log.close()
    (_n, path), *_ = log.segments()
    data = bytearray(path.read_bytes())
    data[2 * 124 + 24 + 50] ^= 0xFF  # inside the third record's payload
    path.write_bytes(bytes(data))
    assert [r.payload[0] for r in read_segment(path)] == [0, 1]


def test_group_commit_covers_concurrent_writers(tmp_path: Path) -> None:
    calls: list[int] = []
    gate = threading.Event()

    def slow_sync(fd: int) -> None:
        calls.append(fd)
        gate.wait(5)
        os.fdatasync(fd)

    log = WriteAheadLog(tmp_path, syncer=slow_sync)
    done: list[int] = []

    def writer(i: int) -> None:
        lsn = log.append([b"x" * i])
        log.wait_durable(lsn)
        done.append(lsn)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    # Let the first sync wait until every writer is queued behind it, then release it.
    for _ in range(200):
        if log._appended_lsn == 8:
            break
        threading.Event().wait(0.01)
    gate.set()
    for t in threads:
        t.join(10)
    assert sorted(done) == list(range(1, 9))
    assert 1 <= len(calls) <= 2, f"8 writers needed {len(calls)} syncs"
    log.close()


def test_checkpoint_deletes_done_segments_but_never_passes_an_unsettled_record(
    tmp_path: Path,
) -> None:
    log = WriteAheadLog(tmp_path, segment_bytes=100)
    first = log.append([b"a" * 200])  # fills segment 1 alone; stays unsettled
    later = [log.append([b"b" * 200]) for _ in range(3)]
    for lsn in later:
        log.settle(lsn)
    assert log.checkpoint(later[-1]) == 0, "segment 1 holds an unsettled record"
    log.settle(first)
    assert log.checkpoint(later[-1]) == 4
    log.close()
    assert _payloads(WriteAheadLog(tmp_path)) == []


def test_sync_none_never_syncs(tmp_path: Path) -> None:
    def boom(fd: int) -> None:
        raise AssertionError("synced")

    log = WriteAheadLog(tmp_path, sync=False, syncer=boom)
    log.wait_durable(log.append([b"x"]))
    log.close()
    assert _payloads(WriteAheadLog(tmp_path, sync=False)) == [b"x"]


def test_a_failed_write_leaves_no_partial_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = WriteAheadLog(tmp_path)
    log.append([b"good"])
    real = os.writev

    def half_then_enospc(fd: int, buffers: list[memoryview]) -> int:
        real(fd, [buffers[0][:10]])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", half_then_enospc)
    with pytest.raises(OSError, match="No space"):
        log.append([b"bad" * 100])
    monkeypatch.setattr(os, "writev", real)
    log.append([b"after"])
    log.close()
    assert _payloads(WriteAheadLog(tmp_path)) == [b"good", b"after"]
