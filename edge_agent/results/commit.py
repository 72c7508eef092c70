"""The result commit: a result, its DICOM objects and their queued sends, and its outbox
record for the hub, written together inside the caller's (the writer's) transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from edge_agent.config import Destination
from edge_agent.results.forward import ResultObject, record_objects
from edge_agent.results.models import Result, result_payload
from edge_agent.results.store import insert_result
from edge_agent.studies.store import get_study
from edge_agent.sync.outbox import enqueue
from edge_agent.sync.phi import Pseudonymiser
from hub_protocol import HLC, Lane, RecordType


def commit_result(
    conn: sqlite3.Connection,
    *,
    result: Result,
    now: float,
    objects: Sequence[ResultObject] = (),
    destinations: Sequence[Destination] = (),
    hlc: HLC | None = None,
    max_outbox_bytes: int | None = None,
    phi: Pseudonymiser | None = None,
) -> None:
    """Store the result (superseding the previous one), its DICOM objects and their queued
    sends, and its outbox record for the hub (when ``hlc`` is given; critical results go in
    the urgent lane). Raises OutOfResources (the caller's transaction rolls back) when the
    outbox is full."""
    insert_result(conn, result)
    record_objects(
        conn, result_id=result.result_id, objects=objects, destinations=destinations, now=now
    )
    if hlc is not None:
        enqueue(
            conn,
            key=f"result/{result.result_id}",
            type=RecordType.RESULT,
            lane=Lane.URGENT if result.critical else Lane.NORMAL,
            payload=_hub_payload(conn, result, phi),
            hlc=hlc,
            now=now,
            max_pending_bytes=max_outbox_bytes,
        )


def _hub_payload(
    conn: sqlite3.Connection, result: Result, phi: Pseudonymiser | None
) -> dict[str, object]:
    """The result plus its study's patient context, pseudonymised when configured."""
    payload: dict[str, object] = result_payload(result)
    study = get_study(conn, result.study_uid)
    if study is not None:
        payload["study"] = {
            "patient_id": study.patient_id,
            "patient_name": study.patient_name,
            "accession_number": study.accession_number,
            "modality": study.modality,
            "study_date": study.study_date,
        }
    return phi.apply(payload) if phi is not None else payload
