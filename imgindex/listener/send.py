"""Send DICOM files to a Storage SCP with pynetdicom: what the demo uses to feed the listener.

Files are sent as they are on disk (pynetdicom reads the file meta and sends the data set
bytes without decoding them), over a few associations in parallel; a file whose response does
not come is sent again over a new association.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from pynetdicom.association import Association

__all__ = ["SendSummary", "send_files"]

logger = logging.getLogger(__name__)

#: pynetdicom proposes at most 128 presentation contexts per association (PS3.8 9.3.2.2).
_MAX_CONTEXTS = 128
#: Seconds to wait for a C-STORE response, and how many times in all files are sent again
#: after a response that did not come.
RESPONSE_TIMEOUT_S = 10.0
RESENDS = 5


@dataclass
class SendSummary:
    """What :func:`send_files` did."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    unreadable: list[Path] = field(default_factory=list)


def _contexts(paths: Sequence[Path]) -> tuple[dict[tuple[str, str], list[Path]], list[Path]]:
    groups: dict[tuple[str, str], list[Path]] = {}
    unreadable = []
    for path in paths:
        try:
            meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
            key = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        except (InvalidDicomError, AttributeError, OSError, EOFError, ValueError):
            unreadable.append(path)
            continue
        groups.setdefault(key, []).append(path)
    return groups, unreadable


def send_files(
    paths: Sequence[Path],
    host: str,
    port: int,
    *,
    called_aet: str = "IMGINDEX",
    calling_aet: str = "IMGINDEX_SCU",
    associations: int = 2,
    on_sent: Callable[[int], object] | None = None,
) -> SendSummary:
    """Send ``paths`` with C-STORE; files pydicom cannot read are listed, not sent.

    Parameters
    ----------
    paths : sequence of Path
        DICOM Part 10 files.
    host, port : str, int
        The Storage SCP.
    called_aet, calling_aet : str
        AE titles.
    associations : int
        Associations in parallel (each in its own thread).
    on_sent : callable, optional
        Called with 1 after each response (e.g. a progress bar's ``update``).
    """
    groups, unreadable = _contexts(paths)
    summary = SendSummary(unreadable=unreadable)
    if not groups:
        return summary
    # Up to 128 contexts per association; more kinds of file would need several rounds.
    keys = sorted(groups)[:_MAX_CONTEXTS]
    for extra in sorted(groups)[_MAX_CONTEXTS:]:
        summary.unreadable.extend(groups[extra])
    files = [p for key in keys for p in groups[key]]
    lock = threading.Lock()

    def associate() -> tuple[AE, Association]:
        ae = AE(ae_title=calling_aet)
        ae.dimse_timeout = RESPONSE_TIMEOUT_S
        for sop_class, syntax in keys:
            ae.add_requested_context(sop_class, [syntax])
        assoc = ae.associate(host, port, ae_title=called_aet)
        if not assoc.is_established:
            raise ConnectionError(f"association with {called_aet}@{host}:{port} failed")
        return ae, assoc

    def worker(share: list[Path]) -> None:
        pending = list(share)
        resends = 0
        while pending:
            ae, assoc = associate()
            try:
                while pending:
                    status = assoc.send_c_store(pending[0])
                    if "Status" not in status:
                        # No response: the SCP did not answer in time, or pynetdicom's reactor
                        # took the response meant for send_c_store (a race in pausing it,
                        # pynetdicom issue #875; it aborts the association). Like a modality,
                        # send the file again over a new association.
                        resends += 1
                        if resends > RESENDS:
                            raise ConnectionError(
                                f"no C-STORE response from {called_aet}@{host}:{port} for "
                                f"{pending[0]} after {RESENDS} resends"
                            )
                        logger.warning("no C-STORE response for %s: sending it again", pending[0])
                        break
                    code = int(status.Status)
                    with lock:
                        summary.statuses[code] += 1
                        summary.sent += code == 0
                    pending.pop(0)
                    if on_sent is not None:
                        on_sent(1)
            finally:
                if assoc.is_established:
                    assoc.release()
                ae.shutdown()

    n = max(1, min(associations, len(files)))
    shares = [files[i::n] for i in range(n)]
    errors: list[BaseException] = []

    def run(share: list[Path]) -> None:
        try:
            worker(share)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,), name="c-store-scu") for s in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return summary
