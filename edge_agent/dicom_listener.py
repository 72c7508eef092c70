"""The DICOM listener: a pynetdicom AE answering C-ECHO and C-STORE.

pynetdicom runs each association on its own thread. The handlers here stay tiny: the C-STORE
handler hands the encoded dataset to :class:`~edge_agent.studies.ingest.Ingestor` (write,
fsync, commit) and returns its status; it never decodes pixels.

Association policy is decided in ``EVT_REQUESTED`` (before negotiation) so every request,
accepted or not, gets an audit row with who, from where and why it was rejected:

* calling AE title (and optional source network) not on the allow-list ->
  A-ASSOCIATE-RJ permanent, "calling AE title not recognised";
* called AE title is not ours (when required) -> permanent, "called AE title not recognised";
* more than ``max_associations`` open -> transient, "local limit exceeded".
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
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
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from edge_agent.clock import Clock
from edge_agent.config import DicomConfig
from edge_agent.metrics import Metrics
from edge_agent.store import Store
from edge_agent.studies.ingest import Ingestor, Origin, Outcome

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

ERROR_COMMENT_MAX = 64  # Error Comment (0000,0902) is LO: 64 characters

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)


@dataclass
class _AssocRecord:
    id: str
    calling_ae: str
    peer_host: str
    rejected: str | None = None
    received: int = 0
    duplicates: int = 0
    failed: int = 0
    refused: int = 0


class DicomListener:
    """Owns the AE and its server; :meth:`start` listens, :meth:`stop` drains and closes."""

    def __init__(
        self,
        cfg: DicomConfig,
        *,
        ingestor: Ingestor,
        store: Store,
        clock: Clock,
        metrics: Metrics,
    ) -> None:
        self._cfg = cfg
        self._ingestor = ingestor
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._records: dict[int, _AssocRecord] = {}
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self._accepting = threading.Event()
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        cfg = self._cfg
        # pynetdicom's "standard" handlers decode and format every DIMSE message for its
        # debug log even when nothing is logged (~5% of a small C-STORE); keep them only when
        # its logger is at DEBUG. (A pynetdicom module setting: this process has one AE.)
        debug = logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG)
        pynetdicom_config.LOG_HANDLER_LEVEL = "standard" if debug else "none"
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_associations = cfg.max_associations
        ae.acse_timeout = cfg.acse_timeout_s
        ae.dimse_timeout = cfg.dimse_timeout_s
        ae.network_timeout = cfg.network_timeout_s
        ae.maximum_pdu_size = cfg.max_pdu_bytes
        # Policy is enforced in EVT_REQUESTED (with audit); pynetdicom's own called-AE check
        # stays on as a second line.
        ae.require_called_aet = cfg.require_called_ae_title
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, list(TRANSFER_SYNTAXES))
        return ae

    @property
    def port(self) -> int:
        """The port actually bound (useful when configured as 0 in tests)."""
        if self._server is None:
            raise RuntimeError("listener not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve in background threads. Raises ``OSError`` if the port is taken."""
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        self._accepting.set()
        self._server = self.ae.start_server(
            (self._cfg.bind_address, self._cfg.port),
            block=False,
            ssl_context=self._ssl_context(),
            evt_handlers=handlers,
        )
        log.info(
            "DICOM listener started",
            extra={
                "ae_title": self._cfg.ae_title,
                "bind_address": self._cfg.bind_address,
                "port": self.port,
                "tls": self._cfg.tls.enabled,
            },
        )

    def stop(self, grace_s: float | None = None) -> int:
        """Stop accepting (the listening socket closes, new connections are refused), let
        in-flight associations finish for up to ``grace_s`` seconds, then abort the rest.
        Returns how many associations had to be aborted."""
        grace = self._cfg.shutdown_grace_s if grace_s is None else grace_s
        self._accepting.clear()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
        deadline = time.monotonic() + grace
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        left = len(self.ae.active_associations)
        if left:
            log.warning(
                "aborting associations still open after the grace period", extra={"count": left}
            )
        self.ae.shutdown()
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

    # -- handlers (run on association threads) -------------------------------------------

    def _on_conn_open(self, event: evt.Event) -> None:
        # pynetdicom's DUL thread sleeps this long whenever it finds nothing to do, so every
        # response waits up to one interval before it is sent (default 1 ms). A shorter
        # interval raises C-STORE throughput ~35% for small instances at the cost of more
        # wake-ups while an association sits idle (README: dicom.poll_interval_ms).
        dul = event.assoc.dul
        if hasattr(dul, "_run_loop_delay"):
            dul._run_loop_delay = self._cfg.poll_interval_ms / 1000.0

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        assert rq is not None  # EVT_REQUESTED fires only after the A-ASSOCIATE-RQ arrived
        calling = str(rq.calling_ae_title).strip()
        called = str(rq.called_ae_title).strip()
        host, port = str(assoc.requestor.address), int(assoc.requestor.port)
        rec = _AssocRecord(id=str(uuid.uuid4()), calling_ae=calling, peer_host=host)
        reject: tuple[int, int, int] | None = None
        cfg = self._cfg
        if not self._accepting.is_set():
            rec.rejected, reject = "shutting down", REJECT_LOCAL_LIMIT
        elif not cfg.allow_any_caller and not any(
            c.matches(calling, host) for c in cfg.allowed_callers
        ):
            rec.rejected, reject = "calling AE title not recognised", REJECT_CALLING_AE
        elif cfg.require_called_ae_title and called != cfg.ae_title.strip():
            rec.rejected, reject = "called AE title not recognised", REJECT_CALLED_AE
        else:
            active = sum(1 for a in self.ae.active_associations if a.is_acceptor)
            if active > cfg.max_associations:
                rec.rejected, reject = "local limit exceeded", REJECT_LOCAL_LIMIT
        now = self._clock.now()
        with self._lock:
            self._records[id(assoc)] = rec
        self._store.writer.submit(
            lambda conn: conn.execute(
                """INSERT INTO associations (id, calling_ae, called_ae, peer_host, peer_port,
                       tls, started_at, ended_at, outcome, reject_reason)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    rec.id,
                    calling,
                    called,
                    host,
                    port,
                    int(self._cfg.tls.enabled),
                    now,
                    now if reject else None,
                    "rejected" if reject else "open",
                    rec.rejected,
                ),
            )
        )
        if reject is not None:
            log.warning(
                "association rejected",
                extra={
                    "reason": rec.rejected,
                    "calling_ae": calling,
                    "called_ae": called,
                    "peer": f"{host}:{port}",
                },
            )
            self._metrics.associations.labels("rejected").inc()
            assoc.acse.send_reject(*reject)
            # As pynetdicom does after its own rejections: wait until the A-ASSOCIATE-RJ is
            # on the wire and the peer closed, before the server closes the socket.
            assoc.kill()
            return
        self._metrics.associations.labels("accepted").inc()
        self._metrics.active_associations.inc()
        log.info(
            "association requested",
            extra={"calling_ae": calling, "peer": f"{host}:{port}", "association_id": rec.id},
        )

    def _record(self, event: evt.Event) -> _AssocRecord:
        with self._lock:
            rec = self._records.get(id(event.assoc))
        if rec is None:  # pragma: no cover - EVT_REQUESTED always runs first
            rec = _AssocRecord(id="", calling_ae="", peer_host="")
        return rec

    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_store(self, event: evt.Event) -> int | Dataset:
        rec = self._record(event)
        req = event.request
        assert isinstance(req, C_STORE)
        result = self._ingestor.receive(
            event.encoded_dataset(include_meta=False),
            transfer_syntax=str(event.context.transfer_syntax),
            sop_class_uid=str(req.AffectedSOPClassUID),
            sop_instance_uid=str(req.AffectedSOPInstanceUID),
            origin=Origin(
                association_id=rec.id or None, calling_ae=rec.calling_ae, peer_host=rec.peer_host
            ),
        )
        if result.outcome is Outcome.DUPLICATE:
            rec.duplicates += 1
        elif result.outcome is Outcome.QUARANTINED:
            rec.failed += 1
        elif result.outcome is Outcome.REFUSED:
            rec.refused += 1
        else:
            rec.received += 1
        if not result.comment:
            return result.status
        rsp = Dataset()
        rsp.Status = result.status
        rsp.ErrorComment = result.comment[:ERROR_COMMENT_MAX]
        return rsp

    def _on_close(self, event: evt.Event) -> None:
        assoc = event.assoc
        with self._lock:
            rec = self._records.pop(id(assoc), None)
        if rec is None or rec.rejected is not None:
            return
        self._metrics.active_associations.dec()
        outcome = "released" if assoc.is_released else "aborted"
        now = self._clock.now()
        self._store.writer.submit(
            lambda conn: conn.execute(
                """UPDATE associations SET ended_at = ?, outcome = ?, received = ?,
                       duplicates = ?, failed = ?, refused = ? WHERE id = ?""",
                (now, outcome, rec.received, rec.duplicates, rec.failed, rec.refused, rec.id),
            )
        )
        log.info(
            "association closed",
            extra={
                "association_id": rec.id,
                "outcome": outcome,
                "received": rec.received,
                "duplicates": rec.duplicates,
                "failed": rec.failed,
                "refused": rec.refused,
            },
        )
