"""Inference job data types and the job state machine (an Enum plus a transition table)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class JobState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"  # its study re-opened (late arrival) before it ran


#: RUNNING -> PENDING is a retry after the runner crashed (attempts count it).
JOB_TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.FAILED, JobState.PENDING}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class Stage(StrEnum):
    """Where a job failed (recorded with its error)."""

    MODEL = "model"  # the package: not installed, damaged, refused by the runtime
    READ = "read"  # reading the series' instances from their tier
    PREPROCESS = "preprocess"
    INFERENCE = "inference"
    POSTPROCESS = "postprocess"
    ENCODE = "encode"  # building the SEG / SR objects
    STORE = "store"  # committing the result
    RUNNER = "runner"  # the process running it crashed


@dataclass(frozen=True, kw_only=True)
class Job:
    id: int
    study_uid: str
    series_uid: str
    model_name: str
    model_version: str
    state: JobState
    round: int
    attempts: int
