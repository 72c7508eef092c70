"""Study data types and the study state machine (an Enum plus a transition table)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from edge_agent.errors import EdgeError


class StudyState(StrEnum):
    """Where a study is in its life.

    RECEIVING: instances are arriving. COMPLETE: quiet period passed or expected count met;
    ready for inference. INFERRING: its inference jobs are queued or running. DONE: every job
    finished (or no model applies). FAILED: at least one job failed (reason in study_events).
    """

    RECEIVING = "RECEIVING"
    COMPLETE = "COMPLETE"
    INFERRING = "INFERRING"
    DONE = "DONE"
    FAILED = "FAILED"


#: Allowed transitions. Any -> RECEIVING is a late arrival re-opening the study (its new
#: results will supersede the old ones).
TRANSITIONS: Mapping[StudyState, frozenset[StudyState]] = {
    StudyState.RECEIVING: frozenset({StudyState.COMPLETE}),
    StudyState.COMPLETE: frozenset({StudyState.RECEIVING, StudyState.INFERRING}),
    StudyState.INFERRING: frozenset({StudyState.RECEIVING, StudyState.DONE, StudyState.FAILED}),
    # DONE/FAILED -> COMPLETE: a person asked for a re-run (a new round, scheduled again)
    StudyState.DONE: frozenset({StudyState.RECEIVING, StudyState.COMPLETE}),
    # FAILED -> INFERRING: its failed series re-run on the previous version of a model that
    # was rolled back automatically
    StudyState.FAILED: frozenset({StudyState.RECEIVING, StudyState.INFERRING, StudyState.COMPLETE}),
}


class InvalidTransition(EdgeError):
    """A state change the table does not allow (a programming error, never input's fault)."""


def check_transition(current: StudyState, new: StudyState) -> None:
    """Raise :class:`InvalidTransition` unless ``current -> new`` is in :data:`TRANSITIONS`."""
    if new not in TRANSITIONS.get(current, frozenset()):
        raise InvalidTransition(f"study cannot go from {current} to {new}")


@dataclass(frozen=True, kw_only=True)
class Study:
    """A study as the store sees it. Times are epoch seconds (UTC)."""

    study_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    accession_number: str
    description: str
    modality: str
    state: StudyState
    first_received_at: float
    last_received_at: float
    completed_at: float | None
    completed_reason: str | None
    expected_instances: int | None
    instance_count: int
    series_count: int
    late_arrivals: int
    reopen_count: int
