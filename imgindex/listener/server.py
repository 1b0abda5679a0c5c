"""The listener's network side: the DICOM upper layer as an association acceptor.

pynetdicom provides the codecs used here (A-ASSOCIATE-RQ/AC/RJ PDUs, the storage SOP class
and transfer syntax lists). The per-association loop is our own: pynetdicom's acceptor
runs two polling threads per association that sleep 1 ms per turn and deep-copies every
supported context (all storage classes x all transfer syntaxes) per association, which
measured 0.2-0.3x of DCMTK's storescp here. This loop is a blocking read of one PDU at a time
on the association's thread, which the GIL releases while it waits; one thread per
association, so group commit in the write-ahead log batches concurrent associations.

Only what a Storage SCP needs is implemented (PS3.8 9): association negotiation,
P-DATA-TF with C-STORE and C-ECHO, release and abort. Asynchronous operations, role
selection and extended negotiation are not negotiated (default answers).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from struct import Struct
from typing import TYPE_CHECKING, Self

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from imgindex.listener.dimse import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    VERIFICATION,
    CommandField,
    Status,
    command_uid,
    command_us,
    decode_command,
    echo_response,
    store_response,
)
from imgindex.listener.ingest import Ingest, Receiver, StoreResult
from imgindex.listener.metrics import ListenerMetrics
from imgindex.schema import DEFAULT_ATTRIBUTES

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from imgindex.schema import Attribute

__all__ = ["Listener", "ListenerConfig"]

logger = logging.getLogger("imgindex.listener")

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
STORAGE_SOP_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
TRANSFER_SYNTAXES = frozenset(str(ts) for ts in AllTransferSyntaxes)

_PDU_HEADER = Struct(">BBL")
_PDV_HEADER = Struct(">LBB")
_A_ASSOCIATE_RQ, _A_ASSOCIATE_AC, _A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
_P_DATA_TF, _A_RELEASE_RQ, _A_RELEASE_RP, _A_ABORT = 0x04, 0x05, 0x06, 0x07
#: Largest A-ASSOCIATE-RQ accepted (they are a few kB even with hundreds of contexts).
_MAX_ASSOCIATE_RQ = 1 << 20
#: Presentation context results (PS3.8 9.3.3.2).
_ACCEPTANCE, _ABSTRACT_NOT_SUPPORTED, _TRANSFER_NOT_SUPPORTED = 0, 3, 4
#: CommandDataSetType 0x0101: no data set follows the command.
_NO_DATASET = 0x0101


class _Abort(Exception):
    """End the association with an A-ABORT."""


class _Closed(Exception):
    """The peer closed the connection."""


@dataclass
class ListenerConfig:
    """Settings of :class:`Listener`; the CLI's flags map onto these one to one."""

    root: Path
    port: int = 11112
    bind: str = "127.0.0.1"
    ae_title: str = "IMGINDEX"
    allow_aets: frozenset[str] | None = None
    sync: bool = True
    flush_interval: float = 1.0
    #: Largest P-DATA PDU we accept; senders split data sets into PDUs of at most this.
    max_pdu: int = 4 << 20
    max_associations: int = 64
    idle_timeout: float = 60.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    metrics_port: int | None = None
    attributes: Sequence[Attribute] = field(default_factory=lambda: DEFAULT_ATTRIBUTES)
    reuse_port: bool = False
    wal_name: str = "listener-0"
    #: Index on a thread of this process (True), or leave the log to a :class:`LogIndexer`
    #: in another process (``imgindex listen`` does that).
    index_in_process: bool = True


class Listener:
    """A Storage SCP that stores and indexes what it receives.

    ``start()`` replays the write-ahead log, binds and accepts in a background thread;
    ``stop()`` stops accepting, lets associations finish the message in flight, flushes and
    returns. Usable as a context manager.
    """

    def __init__(self, config: ListenerConfig, metrics: ListenerMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or ListenerMetrics()
        self.ingest: Ingest | None = None
        self.receiver: Receiver | None = None
        if config.index_in_process:
            self.ingest = Ingest(
                config.root,
                attributes=config.attributes,
                sync=config.sync,
                flush_interval=config.flush_interval,
                wal_name=config.wal_name,
                metrics=self.metrics,
            )
        self.port = 0
        self.metrics_port: int | None = None
        self._ssl = _ssl_context(config)
        self._sock: socket.socket | None = None
        self._stopping = threading.Event()
        self._acceptor: threading.Thread | None = None
        self._associations: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> int:
        """Recover, bind and start accepting; returns the port (useful with port 0)."""
        if self.ingest is not None:
            self.ingest.start()
        else:
            self.receiver = Receiver(
                self.config.root,
                attributes=self.config.attributes,
                sync=self.config.sync,
                wal_name=self.config.wal_name,
            )
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.config.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self.config.bind, self.config.port))
        sock.listen(128)
        sock.settimeout(0.2)
        self._sock = sock
        self.port = sock.getsockname()[1]
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.bind)
        self._acceptor = threading.Thread(target=self._accept_loop, name="acceptor", daemon=True)
        self._acceptor.start()
        return self.port

    def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, finish in-flight messages (up to ``grace`` seconds), flush."""
        self._stopping.set()
        if self._acceptor is not None:
            self._acceptor.join()
        deadline = time.monotonic() + grace
        for thread in list(self._associations):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self.ingest is not None:
            self.ingest.close()
        if self.receiver is not None:
            self.receiver.close()
        self.metrics.close()

    def store(
        self,
        calling_aet: str,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str,
        dataset: bytes | Sequence[bytes | memoryview],
    ) -> StoreResult:
        """Store one received instance (see :meth:`Receiver.store`)."""
        sink = self.ingest or self.receiver
        if sink is None:
            raise RuntimeError("Listener.start() first")
        return sink.store(calling_aet, sop_class, sop_instance, transfer_syntax, dataset)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        with self._sock:
            while not self._stopping.is_set():
                try:
                    conn, peer = self._sock.accept()
                except TimeoutError:
                    continue
                except OSError as exc:
                    logger.warning("accept failed: %s", exc)
                    time.sleep(0.1)
                    continue
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                thread = threading.Thread(
                    target=self._serve, args=(conn, peer), name=f"assoc-{peer[0]}:{peer[1]}"
                )
                with self._lock:
                    self._associations.add(thread)
                thread.start()

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            with self._lock:
                too_many = len(self._associations) > self.config.max_associations
            if self._ssl is not None:
                conn.settimeout(self.config.idle_timeout)
                try:
                    conn = self._ssl.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    logger.warning("TLS handshake with %s:%d failed: %s", *peer, exc)
                    conn.close()
                    return
            _Association(self, conn, peer, too_many=too_many).run()
        except Exception:
            logger.exception("association with %s:%d failed", *peer)
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            with self._lock:
                self._associations.discard(threading.current_thread())


def _ssl_context(config: ListenerConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None and config.tls_key is None:
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(config.tls_ca)
    return context


class _Association:
    """One association, served on the calling thread."""

    def __init__(
        self, listener: Listener, sock: socket.socket, peer: tuple[str, int], *, too_many: bool
    ) -> None:
        self.listener = listener
        self.config = listener.config
        self.metrics = listener.metrics
        self.sock = sock
        self.peer = peer
        self.too_many = too_many
        self.calling = "?"
        self.peer_max_pdu = 0
        self.contexts: dict[int, tuple[str, str]] = {}
        self.instances = 0
        self.failures = 0
        self.bytes = 0
        # The message being received: its context, command fragments, data set fragments.
        self._context = 0
        self._command: list[memoryview] = []
        self._dataset: list[memoryview] = []
        self._parsed: dict[int, bytes] | None = None

    # -- reading -----------------------------------------------------------------------------

    def _recv_exact(self, n: int, *, between_messages: bool) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        idle_since = time.monotonic()
        while got < n:
            try:
                k = self.sock.recv_into(view[got:])
            except TimeoutError:
                now = time.monotonic()
                if between_messages and got == 0 and self.listener._stopping.is_set():
                    raise _Abort("the listener is stopping") from None
                if now - idle_since > self.config.idle_timeout:
                    raise _Abort(f"nothing received for {self.config.idle_timeout:.0f} s") from None
                continue
            if k == 0:
                raise _Closed
            got += k
            idle_since = time.monotonic()
        return buf

    def _read_pdu(self, *, between_messages: bool) -> tuple[int, bytearray, bytearray]:
        """The next PDU: its type, its 6-byte header and its body (separate: no copy)."""
        header = self._recv_exact(6, between_messages=between_messages)
        pdu_type, _reserved, length = _PDU_HEADER.unpack(header)
        limit = self.config.max_pdu + 6 if pdu_type == _P_DATA_TF else _MAX_ASSOCIATE_RQ
        if self.config.max_pdu and length > limit:
            raise _Abort(f"PDU of {length} bytes is over the negotiated maximum")
        return pdu_type, header, self._recv_exact(length, between_messages=False)

    # -- the association ---------------------------------------------------------------------

    def run(self) -> None:
        self.sock.settimeout(1.0)
        started = time.monotonic()
        try:
            if not self._associate():
                return
        except (_Closed, _Abort, OSError) as exc:
            logger.info(
                "association request from %s:%d failed: %s", *self.peer, str(exc) or "closed"
            )
            return
        self.metrics.associations.inc()
        self.metrics.associations_open.inc()
        how = "closed"
        try:
            how = self._loop()
        except _Closed:
            how = "connection closed by peer"
        except _Abort as exc:
            how = f"aborted: {exc}"
            self._send_abort()
        except OSError as exc:
            how = f"connection error: {exc}"
        finally:
            self.metrics.associations_open.dec()
            seconds = max(time.monotonic() - started, 1e-6)
            logger.info(
                "association %s@%s:%d %s: %d instances, %.1f MB in %.2f s "
                "(%.1f MB/s, %.0f instances/s), %d failed",
                self.calling,
                *self.peer,
                how,
                self.instances,
                self.bytes / 1e6,
                seconds,
                self.bytes / 1e6 / seconds,
                self.instances / seconds,
                self.failures,
            )

    def _associate(self) -> bool:
        """Read the A-ASSOCIATE-RQ and answer it; whether the association is established."""
        self.sock.settimeout(min(30.0, self.config.idle_timeout))
        pdu_type, header, body = self._read_pdu(between_messages=False)
        self.sock.settimeout(1.0)
        if pdu_type != _A_ASSOCIATE_RQ:
            raise _Abort(f"expected an A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        rq = A_ASSOCIATE_RQ()
        rq.decode(bytes(header + body))
        request = rq.to_primitive()
        self.calling = str(request.calling_ae_title).strip()
        for item in request.user_information:
            if isinstance(item, MaximumLengthNotification):
                self.peer_max_pdu = int(item.maximum_length_received or 0)
        allow = self.config.allow_aets
        if str(request.application_context_name) != APPLICATION_CONTEXT:
            return self._reject(request, 1, 1, 2, "application context not supported")
        if allow is not None and self.calling not in allow:
            return self._reject(request, 1, 1, 3, "calling AE title not allowed")
        if self.too_many:
            # Transient, by the presentation provider: local limit exceeded (PS3.8 9.3.4).
            return self._reject(request, 2, 3, 2, "too many associations")
        if self.listener._stopping.is_set():
            return self._reject(request, 2, 3, 1, "the listener is stopping")

        results = []
        for proposed in request.presentation_context_definition_list:
            result = PresentationContext()
            result.context_id = proposed.context_id
            abstract = str(proposed.abstract_syntax)
            result.abstract_syntax = proposed.abstract_syntax
            offered = [str(ts) for ts in proposed.transfer_syntax]
            if abstract != VERIFICATION and abstract not in STORAGE_SOP_CLASSES:
                result.result = _ABSTRACT_NOT_SUPPORTED
                result.transfer_syntax = [offered[0] if offered else "1.2.840.10008.1.2"]
            else:
                # Store what the sender prefers; we accept every syntax pydicom knows.
                chosen = next((ts for ts in offered if ts in TRANSFER_SYNTAXES), None)
                if chosen is None:
                    result.result = _TRANSFER_NOT_SUPPORTED
                    result.transfer_syntax = [offered[0] if offered else "1.2.840.10008.1.2"]
                else:
                    result.result = _ACCEPTANCE
                    result.transfer_syntax = [chosen]
                    self.contexts[int(proposed.context_id or 0)] = (abstract, chosen)
            results.append(result)

        accept = A_ASSOCIATE()
        accept.application_context_name = APPLICATION_CONTEXT
        accept.calling_ae_title = request.calling_ae_title
        accept.called_ae_title = request.called_ae_title
        accept.result = 0x00
        accept.result_source = 0x01
        accept.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.config.max_pdu
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        accept.user_information = [max_length, class_uid, version]
        ac = A_ASSOCIATE_AC()
        ac.from_primitive(accept)
        self.sock.sendall(ac.encode())
        logger.debug(
            "association from %s@%s:%d: %d of %d contexts accepted",
            self.calling,
            *self.peer,
            len(self.contexts),
            len(results),
        )
        return True

    def _reject(
        self, request: A_ASSOCIATE, result: int, source: int, reason: int, why: str
    ) -> bool:
        reject = A_ASSOCIATE()
        reject.result = result
        reject.result_source = source
        reject.diagnostic = reason
        rj = A_ASSOCIATE_RJ()
        rj.from_primitive(reject)
        with contextlib.suppress(OSError):
            self.sock.sendall(rj.encode())
            self._await_peer_close()
        self.metrics.rejected_associations.labels(why).inc()
        logger.warning("rejected association from %s@%s:%d: %s", self.calling, *self.peer, why)
        return False

    def _await_peer_close(self, timeout: float = 5.0) -> None:
        """After an A-ASSOCIATE-RJ the requestor closes the connection (PS3.8 9.2, Sta13
        with the ARTIM timer): closing first can reach the peer before it read the reject."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(4096):
                    return
            except TimeoutError:
                continue

    def _loop(self) -> str:
        while True:
            idle = not (self._command or self._dataset or self._parsed)
            pdu_type, _header, body = self._read_pdu(between_messages=idle)
            if pdu_type == _P_DATA_TF:
                self._p_data(body)
            elif pdu_type == _A_RELEASE_RQ:
                if not idle:
                    raise _Abort("A-RELEASE-RQ in the middle of a message")
                self.sock.sendall(_PDU_HEADER.pack(_A_RELEASE_RP, 0, 4) + b"\0\0\0\0")
                return "released"
            elif pdu_type == _A_ABORT:
                return "aborted by peer"
            else:
                raise _Abort(f"unexpected PDU type 0x{pdu_type:02X}")

    def _send_abort(self) -> None:
        # Source 0x00: service user (this application); reason 0x00 not specified.
        with contextlib.suppress(OSError):
            self.sock.sendall(_PDU_HEADER.pack(_A_ABORT, 0, 4) + b"\0\0\0\0")

    def _p_data(self, pdu: bytearray) -> None:
        """The PDV items of a P-DATA-TF body; fragments stay views of it until joined."""
        view = memoryview(pdu)
        pos, end = 0, len(pdu)
        while pos < end:
            if pos + 6 > end:
                raise _Abort("P-DATA-TF ends inside a PDV item header")
            item_length, context_id, control = _PDV_HEADER.unpack_from(pdu, pos)
            start, stop = pos + 6, pos + 4 + item_length
            if item_length < 2 or stop > end:
                raise _Abort("PDV item length runs past the PDU")
            if context_id not in self.contexts:
                raise _Abort(f"PDV on presentation context {context_id}, which is not accepted")
            if (self._command or self._dataset or self._parsed) and context_id != self._context:
                raise _Abort("a message switched presentation context mid-way")
            self._context = context_id
            fragment = view[start:stop]
            if control & 0x01:  # command fragment
                if self._parsed is not None:
                    raise _Abort("command fragment after the command set was complete")
                self._command.append(fragment)
                if control & 0x02:
                    self._on_command()
            else:
                if self._parsed is None:
                    raise _Abort("data set fragment before the command set")
                self._dataset.append(fragment)
                if control & 0x02:
                    self._on_dataset()
            pos = stop

    def _on_command(self) -> None:
        try:
            command = decode_command(b"".join(self._command))
        except ValueError as exc:
            raise _Abort(f"undecodable command set: {exc}") from exc
        self._command = []
        self._parsed = command
        if command_us(command, 0x0800) == _NO_DATASET:
            self._on_message(command, None)

    def _on_dataset(self) -> None:
        assert self._parsed is not None
        fragments, self._dataset = self._dataset, []
        self._on_message(self._parsed, fragments)

    def _on_message(self, command: dict[int, bytes], dataset: list[memoryview] | None) -> None:
        self._parsed = None
        field_ = command_us(command, 0x0100)
        message_id = command_us(command, 0x0110) or 0
        abstract, transfer_syntax = self.contexts[self._context]
        if field_ == CommandField.C_ECHO_RQ:
            self._send_command(echo_response(message_id))
            return
        if field_ != CommandField.C_STORE_RQ or dataset is None:
            raise _Abort(f"unsupported DIMSE command 0x{field_ or 0:04X} on a storage context")
        sop_class = command_uid(command, 0x0002) or abstract
        sop_instance = command_uid(command, 0x1000) or ""
        result = self.listener.store(
            self.calling, sop_class, sop_instance, transfer_syntax, dataset
        )
        if result.status == Status.SUCCESS:
            nbytes = sum(len(f) for f in dataset)
            self.instances += 1
            self.bytes += nbytes
            self.metrics.instances.inc()
            self.metrics.received_bytes.inc(nbytes)
        else:
            self.failures += 1
            self.metrics.failures.labels(result.reason or "unknown").inc()
        self._send_command(
            store_response(sop_class, sop_instance, message_id, result.status, result.message)
        )

    def _send_command(self, command: bytes) -> None:
        # One PDV, command, last fragment (control 0x03); responses are far below any max PDU.
        pdv = _PDV_HEADER.pack(len(command) + 2, self._context, 0x03) + command
        self.sock.sendall(_PDU_HEADER.pack(_P_DATA_TF, 0, len(pdv)) + pdv)
