"""imgindex.listener.send (the demo's C-STORE SCU): every file reaches the SCP once answered,
and a file whose response does not come is sent again over a new association.

The SCP is a real pynetdicom Storage SCP on loopback that keeps back its first response
(sleeps past the sender's response timeout), as a lost response looks to the sender.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt

from imgindex.listener import send
from imgindex.testing import iter_series

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


class _Scp:
    """A Storage SCP recording what it received; ``hold`` responses are held back."""

    def __init__(self, hold: int = 0, hold_s: float = 0.0) -> None:
        self.received: list[str] = []
        self.associations = 0
        self.hold = hold
        self.hold_s = hold_s
        self.lock = threading.Lock()
        self.ae = AE(ae_title="IMGINDEX")
        self.ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
        handlers: list[Any] = [(evt.EVT_C_STORE, self._store), (evt.EVT_ACCEPTED, self._accepted)]
        server = self.ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        assert server is not None
        self.server = server
        self.port = int(server.server_address[1])

    def _accepted(self, event: Any) -> None:
        with self.lock:
            self.associations += 1

    def _store(self, event: Any) -> int:
        with self.lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            held = self.hold > 0
            self.hold -= held
        if held:
            time.sleep(self.hold_s)  # past the sender's timeout: its response is lost
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()
        self.ae.shutdown()


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    out = []
    for i, ds in enumerate(iter_series(5, "CT", 6, 16, 16)):
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


@pytest.fixture
def scp_factory() -> Iterator[list[_Scp]]:
    made: list[_Scp] = []
    yield made
    for scp in made:
        scp.close()


def test_every_file_is_sent_and_answered(files: list[Path], scp_factory: list[_Scp]) -> None:
    scp = _Scp()
    scp_factory.append(scp)
    done: list[int] = []
    summary = send.send_files(files, "127.0.0.1", scp.port, associations=2, on_sent=done.append)
    assert summary.sent == len(files)
    assert summary.statuses == {0: len(files)}
    assert summary.unreadable == []
    assert len(done) == len(files)
    assert sorted(scp.received) == sorted(_uids(files))
    assert scp.associations == 2


def test_a_lost_response_is_sent_again_over_a_new_association(
    files: list[Path], scp_factory: list[_Scp], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(send, "RESPONSE_TIMEOUT_S", 1.0)
    scp = _Scp(hold=1, hold_s=2.0)
    scp_factory.append(scp)
    summary = send.send_files(files, "127.0.0.1", scp.port, associations=1)
    assert summary.sent == len(files)  # every file answered in the end
    assert summary.statuses == {0: len(files)}
    first = _uids(files)[0]
    assert scp.received.count(first) == 2  # the held one came twice
    assert sorted(set(scp.received)) == sorted(_uids(files))
    assert scp.associations == 2


def test_an_scp_that_never_answers_is_an_error(
    files: list[Path], scp_factory: list[_Scp], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(send, "RESPONSE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(send, "RESENDS", 2)
    scp = _Scp(hold=100, hold_s=1.0)
    scp_factory.append(scp)
    with pytest.raises(ConnectionError, match=r"no C-STORE response .* after 2 resends"):
        send.send_files(files[:1], "127.0.0.1", scp.port, associations=1)
    assert scp.associations == 3  # the first try and two resends


def _uids(files: list[Path]) -> list[str]:
    from pydicom import dcmread

    return [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
