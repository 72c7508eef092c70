"""The asyncio acceptor: one :class:`Connection` per TCP connection, every limit enforced
before the work it protects is done.

Limits (all from :class:`Limits`, each refusal counted and audited by the service):

* global and per-peer-IP caps on TCP connections, checked at accept (the socket is closed
  at once; it never holds an association slot);
* TLS handshake under its own deadline, on the connection's task, never on the accept path;
* ARTIM: the A-ASSOCIATE-RQ must arrive within ``artim_s`` of the connection (and the peer
  must close within ``artim_s`` after our A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT);
* an association slot is taken only once the request is accepted;
* idle time between messages, the gap between the PDUs of one message, and the time to read
  one PDU's body are each bounded, so a slow sender is dropped;
* a PDU longer than we announced (or than its type allows) is answered with A-ABORT before
  any of its body is read;
* a dataset is hashed as it arrives and kept in memory only while small; larger ones (or any
  once the global in-memory budget is used) go to a spill file, so memory stays bounded
  whatever the instance size; a dataset larger than ``max_dataset_bytes`` aborts.

Operations are answered one at a time (asynchronous operations window 1/1).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import mmap
import os
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pynetdicom.presentation import PresentationContext

from edge_agent.dicom import dimse, pdu
from edge_agent.dicom.fsm import Action, Event, State, transition
from edge_agent.dicom.negotiation import Accepted, Rejected, Request, negotiate
from edge_agent.store.spool import write_all

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
WATCHDOG_S = 0.1  # how often read deadlines are checked (their precision)


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Every bound the acceptor enforces (seconds, bytes, counts)."""

    max_associations: int = 16
    max_connections: int = 512
    max_connections_per_ip: int = 32
    artim_s: float = 10.0
    tls_handshake_s: float = 10.0
    idle_s: float = 60.0
    message_gap_s: float = 60.0
    pdu_read_s: float = 30.0
    max_pdu_bytes: int = 262_144
    max_dataset_bytes: int = 4 * 2**30
    memory_dataset_bytes: int = 8 * 2**20
    max_buffered_bytes: int = 256 * 2**20
    shutdown_grace_s: float = 30.0


@dataclass
class Session:
    """One TCP connection and, once requested, its association: what the audit records."""

    id: str
    peer_host: str
    peer_port: int
    tls: bool
    started_at: float
    calling_ae: str = ""
    called_ae: str = ""
    user_identity: str = ""
    peer_implementation: str = ""
    accepted: bool = False
    audited: bool = False  # the service already wrote this session's row
    outcome: str = "dropped"  # open|released|aborted|rejected|dropped
    reason: str = ""
    received: int = 0
    duplicates: int = 0
    failed: int = 0
    refused: int = 0
    last_seq: int = 0  # the last journaled instance (see Service.settle)


@dataclass
class Payload:
    """A received dataset: ``data[offset:]`` holds its bytes (``bytes`` or a read-only
    ``mmap`` of ``spill``, a file that also holds ``offset`` bytes of header written by
    :meth:`Service.spill_header`); ``sha256`` was computed as the bytes arrived."""

    data: Any
    offset: int
    size: int
    sha256: str
    spill: Path | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def view(self) -> memoryview:
        return memoryview(self.data)[self.offset : self.offset + self.size]

    def close(self) -> None:
        for c in self._closers:
            with contextlib.suppress(Exception):
                c()
        self._closers.clear()


class Service(Protocol):
    """What the acceptor asks of the application (the listener)."""

    contexts: list[PresentationContext]
    spill_dir: Path

    def decide(
        self, session: Session, request: Request, active: int, from_peer: int
    ) -> Rejected | None:
        """Accept (None) or refuse an association request; runs on the event loop.
        ``active``: accepted associations open now; ``from_peer``: of those, from this
        peer's address."""

    def opened(self, session: Session) -> None:
        """The association was accepted or rejected: write its audit row (non-blocking)."""

    def closed(self, session: Session) -> None:
        """The connection ended: finish (or write) its audit row (non-blocking)."""

    def refused(self, limit: str) -> None:
        """A limit refused or dropped something (for the metric)."""

    def spill_header(self, session: Session, sop_class: str, sop_instance: str, ts: str) -> bytes:
        """The bytes to put before a dataset in a spill file (its Part 10 header)."""

    def settle(self, session: Session) -> None:
        """Before the A-RELEASE-RP: wait until what the association stored is indexed (so a
        sender that saw its release complete finds its instances listed). Blocking."""

    def store(
        self,
        session: Session,
        *,
        transfer_syntax: str,
        sop_class: str,
        sop_instance: str,
        payload: Payload,
    ) -> tuple[int, str]:
        """Make the dataset durable; ``(status, error comment)``. Blocking: runs in a
        worker thread. Never raises."""


class _Closed(Exception):
    """The transport closed."""


class _Abort(Exception):
    """Send A-ABORT (service provider) with ``reason`` and go to Sta13."""

    def __init__(self, why: str, *, limit: str = "", reason: int = pdu.ABORT_INVALID_PARAMETER):
        super().__init__(why)
        self.limit = limit
        self.reason = reason


class _Sink:
    """Reassembles one dataset: hashed as it comes, in memory while small, then spilled."""

    def __init__(self, server: AcceptorServer, header: Callable[[], bytes]) -> None:
        self._server = server
        self._header = header
        self._chunks: list[memoryview] = []
        self._hash = hashlib.sha256()
        self.size = 0
        self._buffered = 0
        self._fd = -1
        self._path: Path | None = None
        self._offset = 0

    def add(self, data: memoryview) -> None:
        n = len(data)
        lim = self._server.limits
        if self.size + n > lim.max_dataset_bytes:
            raise _Abort(
                f"dataset larger than the limit ({lim.max_dataset_bytes} bytes)",
                limit="dataset_size",
            )
        self._hash.update(data)
        self.size += n
        if self._fd < 0 and (
            self.size > lim.memory_dataset_bytes
            or self._server.buffered + n > lim.max_buffered_bytes
        ):
            self._spill()
        if self._fd >= 0:
            write_all(self._fd, data)
        else:
            self._chunks.append(data)
            self._buffered += n
            self._server.buffered += n

    def _spill(self) -> None:
        spill_dir = self._server.service.spill_dir
        self._path = spill_dir / f"{uuid.uuid4().hex}.partial"
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        header = self._header()
        self._offset = len(header)
        write_all(self._fd, header)
        for c in self._chunks:
            write_all(self._fd, c)
        self._release_memory()

    def _release_memory(self) -> None:
        self._chunks = []
        self._server.buffered -= self._buffered
        self._buffered = 0

    def payload(self) -> Payload:
        sha = self._hash.hexdigest()
        if self._fd < 0:
            data = b"".join(self._chunks)
            self._release_memory()
            return Payload(data=data, offset=0, size=len(data), sha256=sha)
        fd, path = self._fd, self._path
        self._fd = -1
        assert path is not None
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        p = Payload(data=mm, offset=self._offset, size=self.size, sha256=sha, spill=path)

        def close() -> None:
            mm.close()
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # still there unless the store renamed it into place

        p._closers.append(close)
        return p

    def discard(self) -> None:
        self._release_memory()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if self._path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self._path.unlink()


class Connection:
    """The upper-layer state machine for one TCP connection (see :mod:`.fsm`)."""

    def __init__(
        self,
        server: AcceptorServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: Session,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.session = session
        self.state = State.STA1
        self.holds_slot = False  # an accepted association's slot, until it ends
        self.assoc: Accepted | None = None
        self._sink: _Sink | None = None
        self.deadline = 0.0  # monotonic time the current read must finish by (0: none)
        self.expired = False
        self.task: asyncio.Task[Any] | None = None

    # -- transport ----------------------------------------------------------------------

    async def _read_pdu(self, header_timeout: float, limits: dict[int, int]) -> tuple[int, bytes]:
        """One PDU: (type, body). Unknown types and bodies longer than ``limits[type]``
        raise before the body is read. The header must arrive within ``header_timeout``
        (``TimeoutError``), the body within ``pdu_read_s`` (A-ABORT); both deadlines are
        kept by the server's watchdog rather than a timer per read."""
        self._arm(header_timeout)
        try:
            head = await self.reader.readexactly(6)
        except asyncio.CancelledError:
            if self._expired():
                raise TimeoutError from None
            raise
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            raise _Closed() from exc
        finally:
            self.deadline = 0.0
        ptype, _, length = pdu.HEADER.unpack(head)
        if ptype not in pdu.KNOWN_TYPES:
            raise pdu.PduError(f"unrecognised PDU type 0x{ptype:02X}", pdu.ABORT_UNRECOGNIZED_PDU)
        cap = limits.get(ptype, 4)
        if length > cap:
            raise _Abort(
                f"PDU type 0x{ptype:02X} of {length} bytes exceeds the maximum of {cap}",
                limit="pdu_size",
            )
        if not length:
            return ptype, head if ptype == pdu.A_ASSOCIATE_RQ else b""
        self._arm(self.server.limits.pdu_read_s)
        try:
            body = await self.reader.readexactly(length)
        except asyncio.CancelledError:
            if self._expired():
                raise _Abort(
                    f"PDU body not received within {self.server.limits.pdu_read_s} s",
                    limit="pdu_read_timeout",
                ) from None
            raise
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            raise _Closed() from exc
        finally:
            self.deadline = 0.0
        return ptype, head + body if ptype == pdu.A_ASSOCIATE_RQ else body

    def _arm(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def _expired(self) -> bool:
        """True if the cancellation being handled is the watchdog's (and clear it)."""
        if not self.expired:
            return False
        self.expired = False
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return True

    def expire(self) -> None:
        """Called by the watchdog: the read in progress is past its deadline."""
        if self.task is not None and self.deadline and not self.expired:
            self.expired = True
            self.task.cancel()

    def _send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def _flush(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.drain()

    # -- the state machine --------------------------------------------------------------

    def _step(self, event: Event) -> Action:
        action, nxt = transition(self.state, event)
        self.state = nxt
        return action

    async def run(self) -> None:
        s = self.session
        self.task = asyncio.current_task()
        try:
            self._step(Event.EVT5)  # AE-5: start ARTIM
            await self._await_request()
            if self.state is State.STA6:
                await self._established()
        except _Abort as exc:
            await self._provider_abort(str(exc), exc.limit, exc.reason)
        except pdu.PduError as exc:
            await self._provider_abort(str(exc), "", exc.reason)
        except _Closed:
            self._transport_closed()
        except Exception:  # a bug must cost one connection, never the server
            log.exception("DICOM connection failed", extra={"association_id": s.id})
            s.reason = s.reason or "internal error"
            await self._provider_abort("internal error", "", pdu.ABORT_REASON_NOT_SPECIFIED)
        finally:
            if self._sink is not None:
                self._sink.discard()
            await self._await_close()

    def _transport_closed(self) -> None:
        s = self.session
        if self.state in (State.STA2,):
            s.reason = s.reason or "connection closed before an A-ASSOCIATE-RQ"
        elif self.state in (State.STA6, State.STA8, State.STA3):
            s.outcome = "aborted"
            s.reason = s.reason or "connection closed by the peer without A-RELEASE"
        if self.state is not State.STA13:
            with contextlib.suppress(Exception):
                self._step(Event.EVT17)

    async def _provider_abort(self, why: str, limit: str, reason: int) -> None:
        s = self.session
        if limit:
            self.server.service.refused(limit)
        if s.outcome in ("open", "dropped") and s.accepted:
            s.outcome = "aborted"
        s.reason = s.reason or why
        log.warning(
            "association aborted",
            extra={"association_id": s.id, "peer": f"{s.peer_host}:{s.peer_port}", "why": why},
        )
        if self.state in (State.STA1, State.STA13):
            return
        action = self._step(Event.EVT19)  # AA-1 in Sta2, AA-8 after: A-ABORT, then Sta13
        if action in (Action.AA1, Action.AA8, Action.AA7):
            src = pdu.ABORT_SOURCE_PROVIDER if action is not Action.AA1 else pdu.ABORT_SOURCE_USER
            self._send(pdu.abort(src, reason if src == pdu.ABORT_SOURCE_PROVIDER else 0))
            await self._flush()

    async def _await_close(self) -> None:
        """Sta13: wait (ARTIM) for the peer to close, answering per PS3.8 (A-ABORT for an
        A-ASSOCIATE-RQ or an invalid PDU, other PDUs ignored), then close."""
        s = self.session
        self.server.release_slot(self)  # the association is over: its slot is free now
        if self.state is State.STA13:
            await self._sta13()
        self.state = State.STA1
        with contextlib.suppress(Exception):
            self.writer.close()
        if s.outcome == "open":
            s.outcome = "aborted"
        self.server.connection_done(self)

    async def _sta13(self) -> None:
        artim = self.server.limits.artim_s
        caps = dict.fromkeys(pdu.KNOWN_TYPES, self.server.limits.max_pdu_bytes)
        events = {
            pdu.A_ASSOCIATE_RQ: Event.EVT6,
            pdu.A_ASSOCIATE_AC: Event.EVT3,
            pdu.A_ASSOCIATE_RJ: Event.EVT4,
            pdu.P_DATA_TF: Event.EVT10,
            pdu.A_RELEASE_RQ: Event.EVT12,
            pdu.A_RELEASE_RP: Event.EVT13,
            pdu.A_ABORT: Event.EVT16,
        }
        try:
            async with asyncio.timeout(artim):
                while True:
                    try:
                        ptype, _ = await self._read_pdu(artim, caps)
                        event = events[ptype]
                    except (pdu.PduError, _Abort):
                        event = Event.EVT19
                    except _Closed:
                        event = Event.EVT17
                    action = self._step(event)
                    if action is Action.AA7:
                        self._send(pdu.abort(pdu.ABORT_SOURCE_PROVIDER, 0))
                        await self._flush()
                        if event is Event.EVT19:  # the stream cannot be followed any more
                            while await self.reader.read(65536):
                                pass
                            self._step(Event.EVT17)
                    if self.state is State.STA1:
                        return
        except TimeoutError:
            self._step(Event.EVT18)  # AA-2: close
        except (ConnectionError, OSError):
            self.state = State.STA1

    async def _await_request(self) -> None:
        s, srv = self.session, self.server
        try:
            ptype, raw = await self._read_pdu(
                srv.limits.artim_s, {pdu.A_ASSOCIATE_RQ: srv.max_rq_bytes}
            )
        except TimeoutError:
            self._step(Event.EVT18)  # AA-2: close
            s.reason = f"no A-ASSOCIATE-RQ within {srv.limits.artim_s} s (ARTIM)"
            srv.service.refused("artim_timeout")
            return
        if ptype == pdu.A_ABORT:
            self._step(Event.EVT16)
            s.reason = "A-ABORT before the association was requested"
            return
        if ptype != pdu.A_ASSOCIATE_RQ:
            raise pdu.PduError(
                f"PDU type 0x{ptype:02X} before A-ASSOCIATE-RQ", pdu.ABORT_UNEXPECTED_PDU
            )
        self._step(Event.EVT6)  # AE-6 -> Sta3
        decision = negotiate(
            raw,
            our_max_pdu=srv.limits.max_pdu_bytes,
            contexts=srv.service.contexts,
            policy=lambda rq: srv.service.decide(
                s, rq, srv.active, srv.assoc_per_ip.get(s.peer_host, 0)
            ),
        )
        if isinstance(decision, Rejected):
            s.calling_ae, s.called_ae = decision.calling_ae, decision.called_ae
            s.user_identity, s.peer_implementation = (
                decision.user_identity,
                decision.peer_implementation,
            )
            s.outcome, s.reason = "rejected", decision.reason
            srv.service.opened(s)  # audited before the peer hears the answer
            self._step(Event.EVT8)  # AE-8: send RJ, start ARTIM
            self._send(pdu.associate_rj(*decision.rj))
            await self._flush()
            return
        self.assoc = decision
        s.calling_ae, s.called_ae = decision.calling_ae, decision.called_ae
        s.user_identity, s.peer_implementation = (
            decision.user_identity,
            decision.peer_implementation,
        )
        s.accepted, s.outcome = True, "open"
        srv.active += 1
        srv.assoc_per_ip[s.peer_host] = srv.assoc_per_ip.get(s.peer_host, 0) + 1
        self.holds_slot = True
        srv.service.opened(s)
        self._step(Event.EVT7)  # AE-7: send AC
        self._send(decision.ac_pdu)
        await self._flush()

    async def _established(self) -> None:
        srv = self.server
        lim = srv.limits
        caps = {
            pdu.P_DATA_TF: lim.max_pdu_bytes,
            pdu.A_RELEASE_RQ: 4,
            pdu.A_ABORT: 4,
            pdu.A_ASSOCIATE_RQ: srv.max_rq_bytes,
            pdu.A_ASSOCIATE_AC: srv.max_rq_bytes,
            pdu.A_ASSOCIATE_RJ: 4,
            pdu.A_RELEASE_RP: 4,
        }
        command = bytearray()
        cmd: dimse.Command | None = None
        cmd_cx = 0
        while True:
            mid = bool(command) or cmd is not None
            try:
                ptype, body = await self._read_pdu(lim.message_gap_s if mid else lim.idle_s, caps)
            except TimeoutError:
                which = "message_gap_timeout" if mid else "idle_timeout"
                raise _Abort(
                    f"no PDU for {lim.message_gap_s if mid else lim.idle_s} s", limit=which
                ) from None
            if ptype == pdu.P_DATA_TF:
                self._step(Event.EVT10)  # DT-2
                for cx, mch, data in pdu.pdvs(body):
                    assert self.assoc is not None
                    if cx not in self.assoc.contexts:
                        raise _Abort(f"PDV on presentation context {cx}, which was not accepted")
                    if mch & pdu.MCH_COMMAND:
                        if cmd is not None:
                            raise _Abort(
                                "command PDV while the previous message's data set "
                                "was still expected"
                            )
                        if command and cx != cmd_cx:
                            raise _Abort("command fragments on two presentation contexts")
                        cmd_cx = cx
                        if len(command) + len(data) > dimse.MAX_COMMAND_BYTES:
                            raise _Abort("command set too large", limit="command_size")
                        command += data
                        if mch & pdu.MCH_LAST:
                            try:
                                cmd = dimse.decode(bytes(command))
                            except dimse.CommandError as exc:
                                raise _Abort(f"unreadable command set: {exc}") from None
                            command.clear()
                            if not cmd.has_dataset:
                                await self._dispatch(cmd, cmd_cx, None)
                                cmd = None
                            else:
                                self._sink = self._new_sink(cmd, cmd_cx)
                    else:
                        if cmd is None or self._sink is None:
                            raise _Abort("data set PDV without its command")
                        if cx != cmd_cx:
                            raise _Abort(
                                "data set on another presentation context than its command"
                            )
                        self._sink.add(data)
                        if mch & pdu.MCH_LAST:
                            sink, self._sink = self._sink, None
                            await self._dispatch(cmd, cmd_cx, sink)
                            cmd = None
            elif ptype == pdu.A_RELEASE_RQ:
                if mid:
                    raise _Abort(
                        "A-RELEASE-RQ in the middle of a message", reason=pdu.ABORT_UNEXPECTED_PDU
                    )
                self._step(Event.EVT12)  # AR-2 -> Sta8; nothing outstanding (1/1 window)
                if self.session.last_seq:
                    await asyncio.get_running_loop().run_in_executor(
                        srv.executor, srv.service.settle, self.session
                    )
                self._step(Event.EVT14)  # AR-4: send RP, start ARTIM -> Sta13
                self._send(pdu.release_rp())
                await self._flush()
                self.session.outcome = "released"
                return
            elif ptype == pdu.A_ABORT:
                self._step(Event.EVT16)  # AA-3: close
                self.session.outcome = "aborted"
                self.session.reason = self.session.reason or "A-ABORT from the peer"
                return
            else:
                raise pdu.PduError(
                    f"unexpected PDU type 0x{ptype:02X} on an established association",
                    pdu.ABORT_UNEXPECTED_PDU,
                )

    def _new_sink(self, cmd: dimse.Command, cx: int) -> _Sink:
        assert self.assoc is not None
        ts = self.assoc.contexts[cx][1]
        sop_class = cmd.uid(dimse.AFFECTED_SOP_CLASS)
        sop_instance = cmd.uid(dimse.AFFECTED_SOP_INSTANCE)
        svc, s = self.server.service, self.session
        return _Sink(self.server, lambda: svc.spill_header(s, sop_class, sop_instance, ts))

    async def _respond(self, cx: int, rsp: bytes) -> None:
        action = self._step(Event.EVT9)  # DT-1
        assert action is Action.DT1
        assert self.assoc is not None
        for part in pdu.fragments(cx, rsp, command=True, max_pdu=self.assoc.peer_max_pdu):
            self._send(part)
        await self._flush()

    async def _dispatch(self, cmd: dimse.Command, cx: int, sink: _Sink | None) -> None:
        assert self.assoc is not None
        field_ = cmd.command_field
        msg_id = cmd.message_id
        if field_ is None or msg_id is None:
            if sink is not None:
                sink.discard()
            raise _Abort("command set without Command Field or Message ID")
        abstract, ts = self.assoc.contexts[cx]
        if field_ == dimse.C_ECHO_RQ and sink is None:
            await self._respond(
                cx,
                dimse.response(dimse.C_ECHO_RSP, message_id=msg_id, status=0, sop_class=abstract),
            )
            return
        if field_ == dimse.C_STORE_RQ and sink is not None:
            await self._store(cmd, cx, msg_id, abstract, ts, sink)
            return
        if sink is not None:
            sink.discard()
        if field_ == dimse.C_CANCEL_RQ:
            return  # nothing of ours is pending: a C-CANCEL has nothing to cancel
        if field_ & 0x8000:
            raise _Abort(
                f"a response (0x{field_:04X}) sent to an acceptor",
                reason=pdu.ABORT_UNEXPECTED_PARAMETER,
            )
        await self._respond(
            cx,
            dimse.response(
                field_ | 0x8000,
                message_id=msg_id,
                status=dimse.STATUS_UNRECOGNIZED_OPERATION,
                sop_class=cmd.uid(dimse.AFFECTED_SOP_CLASS) or abstract,
                comment="operation not supported by this SCP",
            ),
        )

    async def _store(
        self, cmd: dimse.Command, cx: int, msg_id: int, abstract: str, ts: str, sink: _Sink
    ) -> None:
        sop_class = cmd.uid(dimse.AFFECTED_SOP_CLASS)
        sop_instance = cmd.uid(dimse.AFFECTED_SOP_INSTANCE)
        if not sop_class or not sop_instance:
            sink.discard()
            missing = "Affected SOP Class UID" if not sop_class else "Affected SOP Instance UID"
            self.session.failed += 1
            await self._respond(
                cx,
                dimse.response(
                    dimse.C_STORE_RSP,
                    message_id=msg_id,
                    status=dimse.STATUS_MISSING_ATTRIBUTE,
                    sop_class=sop_class or abstract,
                    sop_instance=sop_instance,
                    comment=f"C-STORE-RQ without {missing}",
                ),
            )
            return
        payload = sink.payload()
        srv = self.server
        try:
            status, comment = await asyncio.get_running_loop().run_in_executor(
                srv.executor,
                lambda: srv.service.store(
                    self.session,
                    transfer_syntax=ts,
                    sop_class=sop_class,
                    sop_instance=sop_instance,
                    payload=payload,
                ),
            )
        finally:
            payload.close()
        await self._respond(
            cx,
            dimse.response(
                dimse.C_STORE_RSP,
                message_id=msg_id,
                status=status,
                sop_class=sop_class,
                sop_instance=sop_instance,
                comment=comment,
            ),
        )

    async def abort_now(self) -> None:
        """Local abort (shutdown after the grace period): A-ABORT and close."""
        if self.state in (State.STA3, State.STA6, State.STA8):
            self._step(Event.EVT15)
            self._send(pdu.abort(pdu.ABORT_SOURCE_USER, 0))
            await self._flush()
            self.session.outcome = "aborted"
            self.session.reason = self.session.reason or "aborted at shutdown"
        with contextlib.suppress(Exception):
            self.writer.close()


class AcceptorServer:
    """Listens, applies the connection caps and runs one :class:`Connection` per socket."""

    def __init__(
        self,
        service: Service,
        limits: Limits,
        *,
        ssl_context: ssl.SSLContext | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.limits = limits
        self.ssl_context = ssl_context
        self.now = now
        self.active = 0  # accepted associations
        self.assoc_per_ip: dict[str, int] = {}  # of those, by peer address
        self.buffered = 0  # dataset bytes held in memory, all connections
        self.max_rq_bytes = 65_536
        self.connections: set[Connection] = set()
        self._per_ip: dict[str, int] = {}
        self._open = 0
        self._server: asyncio.base_events.Server | None = None
        self.executor = ThreadPoolExecutor(
            max_workers=max(4, limits.max_associations), thread_name_prefix="dicom-store"
        )
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(
            self._on_connect, sock=sock, limit=2**16, backlog=512
        )
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Every ``WATCHDOG_S``: expire reads past their deadline (one timer for all
        connections instead of one per read)."""
        while True:
            await asyncio.sleep(WATCHDOG_S)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.deadline and now > conn.deadline:
                    conn.expire()

    @property
    def accepting(self) -> bool:
        return self._server is not None and self._server.is_serving()

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("", 0)
        host, port = str(peer[0]), int(peer[1])
        session = Session(
            id=str(uuid.uuid4()),
            peer_host=host,
            peer_port=port,
            tls=self.ssl_context is not None,
            started_at=self.now(),
        )
        lim = self.limits
        refusal = ""
        if not self.accepting:
            refusal, limit = "shutting down", "shutdown"
        elif self._open >= lim.max_connections:
            refusal = f"too many connections (dicom.max_connections={lim.max_connections})"
            limit = "connections"
        elif self._per_ip.get(host, 0) >= lim.max_connections_per_ip:
            refusal = (
                f"too many connections from {host} "
                f"(dicom.max_connections_per_ip={lim.max_connections_per_ip})"
            )
            limit = "connections_per_ip"
        if refusal:
            session.reason = refusal
            self.service.refused(limit)
            with contextlib.suppress(Exception):
                writer.transport.abort()
            self.service.closed(session)
            return
        self._open += 1
        self._per_ip[host] = self._per_ip.get(host, 0) + 1
        conn = Connection(self, reader, writer, session)
        self.connections.add(conn)
        try:
            if self.ssl_context is not None:
                try:
                    await writer.start_tls(
                        self.ssl_context, ssl_handshake_timeout=lim.tls_handshake_s
                    )
                except (TimeoutError, ssl.SSLError, ConnectionError, OSError) as exc:
                    kind = "timed out" if isinstance(exc, TimeoutError) else "failed"
                    session.reason = f"TLS handshake {kind}: {exc}"[:200]
                    self.service.refused("tls_handshake")
                    with contextlib.suppress(Exception):
                        writer.transport.abort()
                    self.connection_done(conn)
                    return
            await conn.run()
        finally:
            if conn in self.connections:
                self.connection_done(conn)

    def connection_done(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        s = conn.session
        self._open -= 1
        left = self._per_ip.get(s.peer_host, 1) - 1
        if left <= 0:
            self._per_ip.pop(s.peer_host, None)
        else:
            self._per_ip[s.peer_host] = left
        self.release_slot(conn)
        self.service.closed(s)

    def release_slot(self, conn: Connection) -> None:
        if conn.holds_slot:
            conn.holds_slot = False
            self.active -= 1
            host = conn.session.peer_host
            left = self.assoc_per_ip.get(host, 1) - 1
            if left <= 0:
                self.assoc_per_ip.pop(host, None)
            else:
                self.assoc_per_ip[host] = left

    async def shutdown(self, grace_s: float) -> int:
        """Stop accepting, let associations finish for ``grace_s``, abort the rest.
        Returns how many had to be aborted."""
        self.stop_accepting()
        deadline = time.monotonic() + grace_s
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = [c for c in self.connections if c.holds_slot]
        for c in list(self.connections):
            await c.abort_now()
        for _ in range(100):
            if not self.connections:
                break
            await asyncio.sleep(0.02)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.executor.shutdown(wait=True)
        return len(left)
