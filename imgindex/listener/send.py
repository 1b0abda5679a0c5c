"""Send DICOM files to a Storage SCP with pynetdicom: what the demo uses to feed the listener.

Files are sent as they are on disk (pynetdicom reads the file meta and sends the data set
bytes without decoding them), over a few associations in parallel.
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

__all__ = ["SendSummary", "send_files"]

logger = logging.getLogger(__name__)

#: pynetdicom proposes at most 128 presentation contexts per association (PS3.8 9.3.2.2).
_MAX_CONTEXTS = 128


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

    def worker(share: list[Path]) -> None:
        ae = AE(ae_title=calling_aet)
        for sop_class, syntax in keys:
            ae.add_requested_context(sop_class, [syntax])
        assoc = ae.associate(host, port, ae_title=called_aet)
        if not assoc.is_established:
            raise ConnectionError(f"association with {called_aet}@{host}:{port} failed")
        try:
            for path in share:
                status = assoc.send_c_store(path)
                code = int(status.Status) if "Status" in status else -1
                with lock:
                    summary.statuses[code] += 1
                    summary.sent += code == 0
                if on_sent is not None:
                    on_sent(1)
        finally:
            assoc.release()

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
