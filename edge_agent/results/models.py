"""Result data types and UUIDv7 result ids (time-ordered, so ids sort by creation)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def uuid7(now: float | None = None) -> str:
    """A UUID version 7 (RFC 9562): 48-bit Unix milliseconds, then random bits."""
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((rand >> 68) & 0xFFF) << 64
    value |= (0b10 << 62) | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


@dataclass(frozen=True, kw_only=True)
class Result:
    """One model's findings on one series. Never updated, only superseded."""

    result_id: str
    job_id: int
    study_uid: str
    series_uid: str
    model_name: str
    model_version: str
    model_sha256: str
    provider: str
    task: str
    findings: Mapping[str, Any]
    critical: bool
    instances: int
    preprocess_ms: float
    inference_ms: float
    created_at: float
    supersedes: str | None = None
    superseded_by: str | None = None


def result_payload(r: Result) -> dict[str, Any]:
    """What goes to the hub for a result (no patient identifiers are part of a result)."""
    return {
        "result_id": r.result_id,
        "study_uid": r.study_uid,
        "series_uid": r.series_uid,
        "model_name": r.model_name,
        "model_version": r.model_version,
        "model_sha256": r.model_sha256,
        "provider": r.provider,
        "task": r.task,
        "findings": dict(r.findings),
        "critical": r.critical,
        "instances": r.instances,
        "created_at": r.created_at,
        "supersedes": r.supersedes,
    }
