"""Sending result objects (SEG, SR, KOS) to PACS: a persisted queue with retries and dead letters.

Each (object, destination) is one ``forwards`` row, written in the transaction that stores
the result. The forwarder sends due rows (one association per destination per pass); a
failure schedules the next attempt with capped exponential backoff and jitter, and after
``max_attempts`` the row is DEAD with its last error: visible, never retried silently, and
never in the way of other rows (they are picked by due time, not by order of creation).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComprehensiveSRStorage,
    KeyObjectSelectionDocumentStorage,
    SegmentationStorage,
)

from edge_agent.clock import Clock
from edge_agent.config import Destination, ResultsConfig
from edge_agent.store import Store

log = logging.getLogger(__name__)

PENDING, SENT, DEAD = "PENDING", "SENT", "DEAD"
_TRANSFER = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


@dataclass(frozen=True, kw_only=True)
class ResultObject:
    kind: str  # SEG | SR | KO
    sop_class_uid: str
    sop_instance_uid: str
    path: str  # relative to data_dir


def write_object(data_dir: Path, result_id: str, kind: str, ds: pydicom.Dataset) -> ResultObject:
    """Write ``ds`` durably to ``results/<result_id>/<kind>.dcm`` (temp, fsync, rename)."""
    folder = data_dir / "results" / result_id
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{kind.lower()}.dcm"
    tmp = folder / f".{kind.lower()}.partial"
    ds.save_as(tmp, enforce_file_format=True)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(final)
    return ResultObject(
        kind=kind,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        path=final.relative_to(data_dir).as_posix(),
    )


def record_objects(
    conn: sqlite3.Connection,
    *,
    result_id: str,
    objects: Sequence[ResultObject],
    destinations: Sequence[Destination],
    now: float,
) -> None:
    """Rows for the objects and one queued send per (object, destination)."""
    for o in objects:
        conn.execute(
            "INSERT INTO result_objects (result_id, kind, sop_class_uid, sop_instance_uid, path)"
            " VALUES (?, ?, ?, ?, ?)",
            (result_id, o.kind, o.sop_class_uid, o.sop_instance_uid, o.path),
        )
        for d in destinations:
            conn.execute(
                "INSERT INTO forwards (result_id, kind, destination, state, next_attempt_at,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (result_id, o.kind, str(d), PENDING, now, now),
            )


def _due(conn: sqlite3.Connection, now: float, limit: int) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT f.id, f.destination, f.attempts, o.path, o.sop_instance_uid FROM forwards f "
        "JOIN result_objects o USING (result_id, kind) "
        "WHERE f.state = ? AND f.next_attempt_at <= ? ORDER BY f.next_attempt_at, f.id LIMIT ?",
        (PENDING, now, limit),
    ).fetchall()


def _sent(conn: sqlite3.Connection, *, ids: Sequence[int], now: float) -> None:
    conn.executemany(
        "UPDATE forwards SET state = ?, sent_at = ?, attempts = attempts + 1, "
        "last_error = NULL WHERE id = ?",
        [(SENT, now, i) for i in ids],
    )


def _failed(
    conn: sqlite3.Connection, *, failures: Sequence[tuple[int, int, str, float | None]], now: float
) -> None:
    for fid, attempts, error, next_at in failures:
        if next_at is None:
            conn.execute(
                "UPDATE forwards SET state = ?, attempts = ?, last_error = ? WHERE id = ?",
                (DEAD, attempts, error[:1000], fid),
            )
        else:
            conn.execute(
                "UPDATE forwards SET attempts = ?, last_error = ?, next_attempt_at = ? "
                "WHERE id = ?",
                (attempts, error[:1000], next_at, fid),
            )


def _established(assoc: Any) -> bool:
    """Whether the association is still up (it may have dropped since the last look)."""
    return bool(assoc.is_established)


class Forwarder:
    def __init__(
        self,
        cfg: ResultsConfig,
        *,
        calling_ae: str,
        store: Store,
        data_dir: Path,
        clock: Clock,
        rng: random.Random | None = None,
    ) -> None:
        self._cfg = cfg
        self._calling_ae = calling_ae
        self._store = store
        self._data_dir = data_dir
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._destinations = {str(d): d for d in cfg.destinations}

    def backoff(self, attempts: int) -> float:
        """Seconds before attempt ``attempts + 1``: capped exponential, +-25 % jitter."""
        base = min(self._cfg.retry_max_s, self._cfg.retry_initial_s * 2 ** max(attempts - 1, 0))
        return float(base * self._rng.uniform(0.75, 1.25))

    def tick(self, limit: int = 100) -> tuple[int, int]:
        """Send what is due; returns (sent, failed attempts)."""
        now = self._clock.now()
        with self._store.read() as conn:
            due = _due(conn, now, limit)
        by_dest: dict[str, list[sqlite3.Row]] = {}
        for row in due:
            by_dest.setdefault(row["destination"], []).append(row)
        sent_ids: list[int] = []
        failures: list[tuple[int, int, str, float | None]] = []
        for dest_name, rows in by_dest.items():
            ok, errors = self._send(dest_name, rows)
            sent_ids.extend(ok)
            for row in rows:
                if row["id"] in errors:
                    attempts = int(row["attempts"]) + 1
                    nxt = (
                        None if attempts >= self._cfg.max_attempts else now + self.backoff(attempts)
                    )
                    failures.append((row["id"], attempts, errors[row["id"]], nxt))
                    about = {
                        "destination": dest_name,
                        "forward_id": row["id"],
                        "attempts": attempts,
                        "error": errors[row["id"]],
                    }
                    if nxt is None:
                        log.error("result send dead-lettered", extra=about)
                    else:
                        log.warning("result send failed; will retry", extra=about)
        if sent_ids:
            self._store.writer.call(partial(_sent, ids=sent_ids, now=self._clock.now()))
        if failures:
            self._store.writer.call(partial(_failed, failures=failures, now=self._clock.now()))
        return len(sent_ids), len(failures)

    def _send(
        self, dest_name: str, rows: Sequence[sqlite3.Row]
    ) -> tuple[list[int], dict[int, str]]:
        dest = self._destinations.get(dest_name)
        if dest is None:
            return [], {r["id"]: f"destination {dest_name} is no longer configured" for r in rows}
        # Probe TCP first: pynetdicom drops (rather than closes) the socket of a refused
        # connection, and a plain connect gives the clearer error.
        try:
            with socket.create_connection((dest.host, dest.port), timeout=10):
                pass
        except OSError as exc:
            return [], {r["id"]: f"cannot connect to {dest}: {exc.strerror or exc}" for r in rows}
        ae = AE(ae_title=self._calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for sop_class in (
            SegmentationStorage,
            ComprehensiveSRStorage,
            KeyObjectSelectionDocumentStorage,
        ):
            ae.add_requested_context(sop_class, _TRANSFER)
        rejected: list[str] = []  # the A-ASSOCIATE-RJ as it arrives (the flags can race)

        def on_acse(event: Any) -> None:
            p = event.primitive
            if getattr(p, "result", None) not in (None, 0x00):
                rejected.append(f"{p.result_str}, {p.source_str}: {p.reason_str}")

        try:
            assoc = ae.associate(
                dest.host,
                dest.port,
                ae_title=dest.ae_title,
                evt_handlers=[(evt.EVT_ACSE_RECV, on_acse)],
            )
        except OSError as exc:
            return [], {r["id"]: f"cannot connect: {exc}" for r in rows}
        if not assoc.is_established:
            if assoc.dul.socket and assoc.dul.socket.socket:  # pynetdicom leaves it open
                assoc.dul.socket.socket.close()
            why = "cannot connect/associate"
            if rejected:
                why = f"association rejected by {dest} as {self._calling_ae}: {rejected[0]}"
            elif assoc.is_aborted:
                why = f"association aborted by {dest} (calling AE {self._calling_ae})"
            return [], {r["id"]: why for r in rows}
        ok: list[int] = []
        errors: dict[int, str] = {}
        dropped = f"{dest} ended the association"
        try:
            for r in rows:
                if not _established(assoc):  # the peer went away: the rest were not tried
                    errors[r["id"]] = dropped
                    continue
                try:
                    ds = pydicom.dcmread(self._data_dir / r["path"])
                    status = assoc.send_c_store(ds)
                except (OSError, ValueError, RuntimeError) as exc:
                    errors[r["id"]] = f"{type(exc).__name__}: {exc}"
                    continue
                if "Status" not in status:  # no answer at all (pynetdicom's empty Dataset)
                    what = "aborted" if assoc.is_aborted else "dropped"
                    dropped = f"{dest} {what} the association: no C-STORE response"
                    errors[r["id"]] = dropped
                    continue
                code = int(status.Status)
                if code in (0x0000, 0xB000, 0xB007, 0xB006):
                    ok.append(r["id"])
                else:
                    comment = str(status.get("ErrorComment", ""))
                    errors[r["id"]] = f"refused by {dest}: C-STORE status 0x{code:04X} {comment}"
                    errors[r["id"]] = errors[r["id"]].strip()
        finally:
            if assoc.is_established:
                assoc.release()
        return ok, errors

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.tick)
            except Exception:
                log.exception("forwarding pass failed; retrying next interval")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._cfg.check_interval_s)
