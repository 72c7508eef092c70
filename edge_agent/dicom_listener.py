"""The DICOM listener: our asyncio acceptor (:mod:`edge_agent.dicom`) answering C-ECHO and
C-STORE, with the agent's association policy and audit.

The acceptor runs on its own event loop thread, so a busy web UI or inference worker never
delays a response. The C-STORE handler stays tiny: it hands the received dataset to
:class:`~edge_agent.studies.ingest.Ingestor` (check, write, fsync, commit) on a worker
thread and returns its status; it never decodes pixels.

Association policy (audited, one row per TCP connection that reached us):

* calling AE title (and optional source network) not on the allow-list ->
  A-ASSOCIATE-RJ permanent, "calling AE title not recognised";
* called AE title is not ours (when required) -> permanent, "called AE title not recognised";
* ``max_associations`` already open -> transient, "local limit exceeded";
* connections over the global or per-IP cap, without an A-ASSOCIATE-RQ within the ARTIM
  time, failing the TLS handshake or breaking a limit are closed (or aborted) and recorded
  with outcome ``dropped``/``aborted`` and the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sqlite3
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from pathlib import Path

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.presentation import AllStoragePresentationContexts

from edge_agent.clock import Clock
from edge_agent.config import MAX_PDU_BYTES, DicomConfig
from edge_agent.dicom import pdu
from edge_agent.dicom.negotiation import Rejected, Request, supported_contexts
from edge_agent.dicom.server import VERIFICATION, AcceptorServer, Limits, Payload, Session
from edge_agent.metrics import Metrics
from edge_agent.store import Store
from edge_agent.studies.ingest import Ingestor, Origin, Outcome, file_header_for
from edge_agent.studies.store import (
    AssociationClosed,
    AssociationOpened,
    close_association,
    open_association,
)

log = logging.getLogger(__name__)

#: Transfer syntaxes we accept, in our order of preference when a peer proposes several.
#: Compressed syntaxes come first: a peer only proposes them when its data is compressed, and
#: taking them as they are avoids a lossy or costly conversion on the sender.
TRANSFER_SYNTAXES = (
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
)


def limits_from(cfg: DicomConfig) -> Limits:
    """The acceptor's limits from the ``[dicom]`` settings."""
    return Limits(
        max_associations=cfg.max_associations,
        max_connections=cfg.max_connections,
        max_connections_per_ip=cfg.max_connections_per_ip,
        artim_s=cfg.acse_timeout_s,
        tls_handshake_s=cfg.tls_handshake_timeout_s,
        idle_s=cfg.network_timeout_s,
        message_gap_s=cfg.dimse_timeout_s,
        pdu_read_s=cfg.pdu_read_timeout_s,
        max_pdu_bytes=cfg.max_pdu_bytes or MAX_PDU_BYTES,
        max_dataset_bytes=cfg.max_dataset_mb * 2**20,
        memory_dataset_bytes=cfg.memory_dataset_kb * 1024,
        max_buffered_bytes=cfg.max_buffered_mb * 2**20,
        shutdown_grace_s=cfg.shutdown_grace_s,
    )


class DicomListener:
    """Owns the acceptor; :meth:`start` listens, :meth:`stop` drains and closes."""

    def __init__(
        self,
        cfg: DicomConfig,
        *,
        ingestor: Ingestor,
        store: Store,
        clock: Clock,
        metrics: Metrics,
        spill_dir: Path,
    ) -> None:
        self._cfg = cfg
        self._ingestor = ingestor
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self.spill_dir = spill_dir
        abstract = [VERIFICATION] + [
            str(cx.abstract_syntax)
            for cx in AllStoragePresentationContexts
            if cx.abstract_syntax is not None
        ]
        self.contexts = supported_contexts(abstract, [str(t) for t in TRANSFER_SYNTAXES])
        self._server: AcceptorServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port actually bound (useful when configured as 0 in tests)."""
        if self._server is None:
            raise RuntimeError("listener not started")
        return self._port

    @property
    def accepting(self) -> bool:
        """True while new associations are accepted."""
        return self._server is not None and self._server.accepting

    @property
    def active_associations(self) -> int:
        """Accepted associations open now."""
        return self._server.active if self._server is not None else 0

    def start(self) -> None:
        """Bind and serve on a background event loop. Raises ``OSError`` if the port is
        taken (nothing is left running)."""
        cfg = self._cfg
        family = socket.AF_INET6 if ":" in cfg.bind_address else socket.AF_INET
        sock = socket.create_server((cfg.bind_address, cfg.port), family=family, backlog=512)
        sock.setblocking(False)
        self._port = int(sock.getsockname()[1])
        self._loop = asyncio.new_event_loop()
        self._server = AcceptorServer(
            self, limits_from(cfg), ssl_context=self._ssl_context(), now=self._clock.now
        )
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="dicom-acceptor", daemon=True
        )
        self._thread.start()
        started: Future[None] = asyncio.run_coroutine_threadsafe(
            self._server.start(sock), self._loop
        )
        started.result(timeout=10)
        log.info(
            "DICOM listener started",
            extra={
                "ae_title": cfg.ae_title,
                "bind_address": cfg.bind_address,
                "port": self._port,
                "tls": cfg.tls.enabled,
            },
        )

    def stop(self, grace_s: float | None = None) -> int:
        """Stop accepting (the listening socket closes, new connections are refused), let
        in-flight associations finish for up to ``grace_s`` seconds, then abort the rest.
        Returns how many associations had to be aborted."""
        grace = self._cfg.shutdown_grace_s if grace_s is None else grace_s
        server, loop, thread = self._server, self._loop, self._thread
        if server is None or loop is None or thread is None:
            return 0
        left = asyncio.run_coroutine_threadsafe(server.shutdown(grace), loop).result(grace + 30)
        if left:
            log.warning(
                "aborted associations still open after the grace period", extra={"count": left}
            )
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        with contextlib.suppress(RuntimeError):
            loop.close()
        self._server = self._loop = self._thread = None
        log.info("DICOM listener stopped")
        return left

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self._cfg.tls
        if not tls.enabled:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
        if tls.ca_file:
            ctx.load_verify_locations(tls.ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    # -- the acceptor's service (event loop thread, except store) -------------------------

    def decide(
        self, session: Session, request: Request, active: int, from_peer: int
    ) -> Rejected | None:
        cfg = self._cfg
        calling, called, host = request.calling_ae, request.called_ae, session.peer_host
        if self._server is None or not self._server.accepting:
            return Rejected(pdu.REJECT_LOCAL_LIMIT, "shutting down")
        if not cfg.allow_any_caller and not any(
            c.matches(calling, host) for c in cfg.allowed_callers
        ):
            return Rejected(pdu.REJECT_CALLING_AE, "calling AE title not recognised")
        if cfg.require_called_ae_title and called != cfg.ae_title.strip():
            return Rejected(pdu.REJECT_CALLED_AE, "called AE title not recognised")
        if active >= cfg.max_associations:
            self._metrics.limit_refusals.labels("associations").inc()
            return Rejected(pdu.REJECT_LOCAL_LIMIT, "local limit exceeded")
        if from_peer >= cfg.associations_per_ip:
            # one address may not take every slot (a slow sender would lock everyone out)
            self._metrics.limit_refusals.labels("associations_per_ip").inc()
            return Rejected(
                pdu.REJECT_LOCAL_LIMIT,
                f"local limit exceeded: {from_peer} associations from {session.peer_host} "
                f"(dicom.max_associations_per_ip)",
            )
        return None

    def opened(self, session: Session) -> None:
        s = session
        if s.outcome == "rejected":
            log.warning(
                "association rejected",
                extra={
                    "reason": s.reason,
                    "calling_ae": s.calling_ae,
                    "called_ae": s.called_ae,
                    "peer": f"{s.peer_host}:{s.peer_port}",
                },
            )
            self._metrics.associations.labels("rejected").inc()
        else:
            self._metrics.associations.labels("accepted").inc()
            self._metrics.active_associations.inc()
            log.info(
                "association accepted",
                extra={
                    "calling_ae": s.calling_ae,
                    "peer": f"{s.peer_host}:{s.peer_port}",
                    "association_id": s.id,
                    "user_identity": s.user_identity,
                },
            )
        s.audited = True
        self._insert_audit(s, ended_at=self._clock.now() if s.outcome == "rejected" else None)

    def closed(self, session: Session) -> None:
        s = session
        now = self._clock.now()
        if s.accepted:
            self._metrics.active_associations.dec()
        self._metrics.connections.labels(s.outcome).inc()
        if not s.audited:
            log.warning(
                "connection dropped",
                extra={"peer": f"{s.peer_host}:{s.peer_port}", "reason": s.reason},
            )
            self._insert_audit(s, ended_at=now)
            return
        if s.outcome == "rejected":
            return
        closed = AssociationClosed(
            id=s.id,
            ended_at=now,
            outcome=s.outcome,
            reject_reason=s.reason or None,
            received=s.received,
            duplicates=s.duplicates,
            failed=s.failed,
            refused=s.refused,
        )
        self._submit_audit(partial(close_association, a=closed), closed)
        log.info(
            "association closed",
            extra={
                "association_id": s.id,
                "outcome": s.outcome,
                "reason": s.reason,
                "received": s.received,
                "duplicates": s.duplicates,
                "failed": s.failed,
                "refused": s.refused,
            },
        )

    def _insert_audit(self, s: Session, *, ended_at: float | None) -> None:
        opened = AssociationOpened(
            id=s.id,
            calling_ae=s.calling_ae,
            called_ae=s.called_ae,
            peer_host=s.peer_host,
            peer_port=s.peer_port,
            tls=s.tls,
            started_at=s.started_at,
            ended_at=ended_at,
            outcome=s.outcome,
            reject_reason=s.reason or None,
            user_identity=s.user_identity,
            peer_implementation=s.peer_implementation,
        )
        self._submit_audit(partial(open_association, a=opened), opened)

    def _submit_audit(
        self,
        write: Callable[[sqlite3.Connection], None],
        row: AssociationOpened | AssociationClosed,
    ) -> None:
        try:
            self._store.writer.submit(write)
        except Exception:  # the store is closing: the log line above is the record
            log.exception("association audit row not written", extra={"row": str(row)[:200]})

    def refused(self, limit: str) -> None:
        self._metrics.limit_refusals.labels(limit).inc()

    def settle(self, session: Session) -> None:
        if not self._ingestor.wait_indexed(session.last_seq, timeout=self._cfg.dimse_timeout_s):
            log.warning(
                "association released before its instances were indexed",
                extra={"association_id": session.id},
            )

    def spill_header(self, session: Session, sop_class: str, sop_instance: str, ts: str) -> bytes:
        return file_header_for(sop_class, sop_instance, ts, session.calling_ae)

    def store(
        self,
        session: Session,
        *,
        transfer_syntax: str,
        sop_class: str,
        sop_instance: str,
        payload: Payload,
    ) -> tuple[int, str]:
        result = self._ingestor.receive(
            payload,
            transfer_syntax=transfer_syntax,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            origin=Origin(
                association_id=session.id,
                calling_ae=session.calling_ae,
                peer_host=session.peer_host,
            ),
            indexed=False,  # durable in the journal is enough to answer; see settle()
        )
        if result.seq:
            session.last_seq = result.seq
        if result.outcome is Outcome.DUPLICATE:
            session.duplicates += 1
        elif result.outcome is Outcome.QUARANTINED:
            session.failed += 1
        elif result.outcome is Outcome.REFUSED:
            session.refused += 1
        else:
            session.received += 1
        return result.status, result.comment  # dimse.response keeps LO's 64 characters
