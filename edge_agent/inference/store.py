"""SQL for inference jobs and the study states they drive (inside the writer's transaction)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from edge_agent.errors import Conflict, InvalidRequest, NotFound
from edge_agent.inference.models import Job, JobState, Stage
from edge_agent.inference.shadow import Agreement
from edge_agent.studies.models import StudyState
from edge_agent.studies.store import transition


def complete_studies(conn: sqlite3.Connection) -> list[tuple[str, int, str | None]]:
    """(study_uid, reopen_count, rerun_model) of studies waiting in COMPLETE (rerun_model:
    a re-run of that model only was asked for)."""
    return [
        (r[0], int(r[1]), r[2])
        for r in conn.execute(
            "SELECT study_uid, reopen_count, rerun_model FROM studies WHERE state = ? "
            "ORDER BY completed_at",
            (StudyState.COMPLETE.value,),
        )
    ]


def request_rerun(
    conn: sqlite3.Connection, *, study_uid: str, model: str | None, now: float, by: str
) -> int:
    """A person asks for a study to run again (every model that applies, or ``model`` only):
    DONE or FAILED -> COMPLETE in a new round, so the scheduler routes it again with the
    active versions and each new result supersedes the one of its series and model; the
    earlier rounds' jobs stay as they were (history). Returns the new round.

    Raises NotFound (no such study), Conflict ``busy`` (it is receiving or running: its
    results are coming anyway), InvalidRequest (``model`` has no active version)."""
    row = conn.execute(
        "SELECT state, reopen_count FROM studies WHERE study_uid = ?", (study_uid,)
    ).fetchone()
    if row is None:
        raise NotFound(f"no study {study_uid}")
    state = StudyState(row[0])
    if state not in (StudyState.DONE, StudyState.FAILED):
        raise Conflict(
            "busy", f"the study is {state.value}: a re-run can start once it is DONE or FAILED"
        )
    if model is not None and not active_version(conn, model):
        raise InvalidRequest(f"model {model} has no active version here")
    conn.execute(
        "UPDATE studies SET reopen_count = reopen_count + 1, rerun_model = ? WHERE study_uid = ?",
        (model, study_uid),
    )
    what = f"model {model}" if model else "every model that applies"
    transition(
        conn, study_uid, state, StudyState.COMPLETE, now=now, reason=f"re-run of {what} by {by}"
    )
    return int(row[1]) + 1


def active_version(conn: sqlite3.Connection, name: str) -> str | None:
    """The active version of model ``name``, None if it has none."""
    row = conn.execute(
        "SELECT version FROM model_versions WHERE name = ? AND active = 1", (name,)
    ).fetchone()
    return None if row is None else str(row[0])


def schedule_study(
    conn: sqlite3.Connection,
    *,
    study_uid: str,
    round_: int,
    jobs: Sequence[tuple[str, str, str]],
    now: float,
) -> bool:
    """COMPLETE -> INFERRING with ``jobs`` [(series_uid, model, version)], or straight to
    DONE when no model applies. No-op (False) if the study changed meanwhile."""
    row = conn.execute(
        "SELECT state, reopen_count FROM studies WHERE study_uid = ?", (study_uid,)
    ).fetchone()
    if row is None or row[0] != StudyState.COMPLETE.value or int(row[1]) != round_:
        return False
    conn.execute("UPDATE studies SET rerun_model = NULL WHERE study_uid = ?", (study_uid,))
    if not jobs:
        transition(
            conn,
            study_uid,
            StudyState.COMPLETE,
            StudyState.INFERRING,
            now=now,
            reason="no model applies",
        )
        transition(
            conn,
            study_uid,
            StudyState.INFERRING,
            StudyState.DONE,
            now=now,
            reason="no model applies",
        )
        return True
    conn.executemany(
        "INSERT INTO inference_jobs (study_uid, series_uid, model_name, model_version, state,"
        " round, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(study_uid, s, m, v, JobState.PENDING.value, round_, now) for s, m, v in jobs],
    )
    transition(
        conn,
        study_uid,
        StudyState.COMPLETE,
        StudyState.INFERRING,
        now=now,
        reason=f"{len(jobs)} inference job(s)",
    )
    return True


def _job(r: sqlite3.Row) -> Job:
    return Job(
        id=r["id"],
        study_uid=r["study_uid"],
        series_uid=r["series_uid"],
        model_name=r["model_name"],
        model_version=r["model_version"],
        state=JobState(r["state"]),
        round=r["round"],
        attempts=r["attempts"],
    )


def claim_job(conn: sqlite3.Connection, *, now: float) -> Job | None:
    """Take the oldest PENDING job: RUNNING, attempts + 1. A job whose study was re-opened
    (late arrival: a newer round will be scheduled) is CANCELLED instead, and the next one
    is tried."""
    while True:
        r = conn.execute(
            "SELECT j.*, s.state AS study_state, s.reopen_count FROM inference_jobs j "
            "JOIN studies s USING (study_uid) WHERE j.state = ? ORDER BY j.id LIMIT 1",
            (JobState.PENDING.value,),
        ).fetchone()
        if r is None:
            return None
        if r["study_state"] != StudyState.INFERRING.value or r["reopen_count"] != r["round"]:
            conn.execute(
                "UPDATE inference_jobs SET state = ?, finished_at = ?, error = ? WHERE id = ?",
                (JobState.CANCELLED.value, now, "study re-opened by a late arrival", r["id"]),
            )
            continue
        conn.execute(
            "UPDATE inference_jobs SET state = ?, attempts = attempts + 1, "
            "started_at = ? WHERE id = ?",
            (JobState.RUNNING.value, now, r["id"]),
        )
        job = _job(r)
        return Job(**{**job.__dict__, "state": JobState.RUNNING, "attempts": job.attempts + 1})


def _maybe_finish_study(conn: sqlite3.Connection, job: Job, now: float) -> None:
    row = conn.execute(
        "SELECT state, reopen_count FROM studies WHERE study_uid = ?", (job.study_uid,)
    ).fetchone()
    if row is None or row[0] != StudyState.INFERRING.value or int(row[1]) != job.round:
        return
    states = [
        r[0]
        for r in conn.execute(
            "SELECT state FROM inference_jobs WHERE study_uid = ? AND round = ?",
            (job.study_uid, job.round),
        )
    ]
    if any(s in (JobState.PENDING.value, JobState.RUNNING.value) for s in states):
        return
    failed = states.count(JobState.FAILED.value)
    if failed:
        transition(
            conn,
            job.study_uid,
            StudyState.INFERRING,
            StudyState.FAILED,
            now=now,
            reason=f"{failed} of {len(states)} inference job(s) failed",
        )
    else:
        transition(
            conn,
            job.study_uid,
            StudyState.INFERRING,
            StudyState.DONE,
            now=now,
            reason=f"{len(states)} result(s)",
        )


def finish_job(conn: sqlite3.Connection, *, job: Job, result_id: str, now: float) -> None:
    """Close a RUNNING job as DONE with its result (committed by the caller in the same
    transaction), and finish its study when it was the round's last job."""
    conn.execute(
        "UPDATE inference_jobs SET state = ?, finished_at = ?, result_id = ? "
        "WHERE id = ? AND state = ?",
        (JobState.DONE.value, now, result_id, job.id, JobState.RUNNING.value),
    )
    _maybe_finish_study(conn, job, now)


def fail_job(
    conn: sqlite3.Connection,
    *,
    job: Job,
    error: str,
    retry: bool,
    now: float,
    refund_attempt: bool = False,
    stage: str | None = None,
) -> None:
    """FAILED with ``error``, or back to PENDING when ``retry`` (a transient failure).
    ``refund_attempt``: the failure was not the job's doing (e.g. the outbox is full).
    ``stage``: where it failed (a :class:`~edge_agent.inference.models.Stage`)."""
    if refund_attempt:
        conn.execute(
            "UPDATE inference_jobs SET attempts = max(attempts - 1, 0) WHERE id = ?", (job.id,)
        )
    state = JobState.PENDING if retry else JobState.FAILED
    conn.execute(
        "UPDATE inference_jobs SET state = ?, finished_at = ?, error = ?, error_stage = ?, "
        "error_at = ? WHERE id = ?",
        (state.value, None if retry else now, error[:2000], stage, now, job.id),
    )
    if not retry:
        _maybe_finish_study(conn, job, now)


def recover_jobs(conn: sqlite3.Connection, *, max_attempts: int, now: float) -> tuple[int, int]:
    """After a crash: RUNNING jobs go back to PENDING, or FAILED once they have crashed the
    runner ``max_attempts`` times. Returns (requeued, failed)."""
    requeued = failed = 0
    rows = conn.execute(
        "SELECT * FROM inference_jobs WHERE state = ?", (JobState.RUNNING.value,)
    ).fetchall()
    for r in rows:
        job = _job(r)
        if job.attempts >= max_attempts:
            fail_job(
                conn,
                job=job,
                retry=False,
                now=now,
                error=f"the runner crashed {job.attempts} times on this job",
                stage=Stage.RUNNER,
            )
            failed += 1
        else:
            conn.execute(
                "UPDATE inference_jobs SET state = ? WHERE id = ?", (JobState.PENDING.value, job.id)
            )
            requeued += 1
    return requeued, failed


def job_outcomes(
    conn: sqlite3.Connection, *, name: str, version: str, since: float, last: int
) -> tuple[int, int]:
    """(finished, failed) among the ``last`` jobs of ``name`` ``version`` that finished (DONE
    or FAILED) at or after ``since``."""
    rows = conn.execute(
        "SELECT state FROM inference_jobs WHERE model_name = ? AND model_version = ? "
        "AND state IN (?, ?) AND finished_at >= ? ORDER BY finished_at DESC, id DESC LIMIT ?",
        (name, version, JobState.DONE.value, JobState.FAILED.value, since, last),
    ).fetchall()
    return len(rows), sum(1 for r in rows if r[0] == JobState.FAILED.value)


def rerun_on(
    conn: sqlite3.Connection, *, name: str, bad: str, good: str, since: float, now: float
) -> int:
    """After ``bad`` was rolled back to ``good``: its PENDING jobs move to ``good``, and each
    series it FAILED since ``since`` gets a new job on ``good`` in the same round (the failed
    job is CANCELLED with the reason kept; its FAILED study goes back to INFERRING). A study
    re-opened since then is left alone: its new round runs on the active version anyway.
    Returns how many series re-run."""
    conn.execute(
        "UPDATE inference_jobs SET model_version = ? WHERE model_name = ? AND model_version = ? "
        "AND state = ?",
        (good, name, bad, JobState.PENDING.value),
    )
    rows = conn.execute(
        "SELECT j.id, j.study_uid, j.series_uid, j.round, s.state AS study_state, s.reopen_count "
        "FROM inference_jobs j JOIN studies s USING (study_uid) WHERE j.model_name = ? "
        "AND j.model_version = ? AND j.state = ? AND j.finished_at >= ? ORDER BY j.id",
        (name, bad, JobState.FAILED.value, since),
    ).fetchall()
    n = 0
    for r in rows:
        if int(r["reopen_count"]) != int(r["round"]) or r["study_state"] not in (
            StudyState.FAILED.value,
            StudyState.INFERRING.value,
        ):
            continue
        conn.execute(
            "UPDATE inference_jobs SET state = ?, error = ? || coalesce(error, '') WHERE id = ?",
            (JobState.CANCELLED.value, f"re-run on {good} after {bad} was rolled back; ", r["id"]),
        )
        conn.execute(
            "INSERT INTO inference_jobs (study_uid, series_uid, model_name, model_version, state,"
            " round, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (r["study_uid"], r["series_uid"], name, good, JobState.PENDING.value, r["round"], now),
        )
        state = conn.execute(
            "SELECT state FROM studies WHERE study_uid = ?", (r["study_uid"],)
        ).fetchone()[0]
        if state == StudyState.FAILED.value:
            transition(
                conn,
                r["study_uid"],
                StudyState.FAILED,
                StudyState.INFERRING,
                now=now,
                reason=f"re-run on {name} {good} after {bad} was rolled back",
            )
        n += 1
    return n


def series_instances(conn: sqlite3.Connection, series_uid: str) -> list[tuple[str, str, str]]:
    """(sop_instance_uid, tier, path) of the latest version of each instance of a series."""
    return [
        (r[0], r[1], r[2])
        for r in conn.execute(
            "SELECT i.sop_instance_uid, i.tier, i.path FROM instances i WHERE i.series_uid = ? "
            "AND i.version = (SELECT max(version) FROM instances j "
            "WHERE j.sop_instance_uid = i.sop_instance_uid)",
            (series_uid,),
        )
    ]


# -- shadow comparisons ----------------------------------------------------------------------


def agreement(conn: sqlite3.Connection, name: str, version: str) -> Agreement:
    """Totals of every comparison of shadow ``version`` of ``name`` so far."""
    n, agreeing, errors, mean = conn.execute(
        "SELECT count(*), coalesce(sum(agree), 0), count(error), coalesce(avg(score), 0) "
        "FROM shadow_runs WHERE name = ? AND shadow_version = ?",
        (name, version),
    ).fetchone()
    return Agreement(name, version, int(n), int(agreeing), int(errors), float(mean))


def record_run(
    conn: sqlite3.Connection,
    *,
    job_id: int,
    name: str,
    active_version: str,
    shadow_version: str,
    score_: float,
    agree: bool,
    error: str | None,
    now: float,
) -> None:
    conn.execute(
        "INSERT INTO shadow_runs (job_id, name, active_version, shadow_version, agree, score,"
        " error, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (job_id, name, active_version, shadow_version, int(agree), score_, error, now),
    )


# -- why jobs failed ------------------------------------------------------------------------


def study_jobs(conn: sqlite3.Connection, study_uid: str) -> list[dict[str, object]]:
    """Every inference job of a study, newest round first: id, series_uid, model_name,
    model_version, state, round, attempts, created_at, started_at, finished_at, error,
    error_stage, error_at (times in epoch seconds)."""
    return [
        dict(r)
        for r in conn.execute(
            "SELECT id, series_uid, model_name, model_version, state, round, attempts, "
            "created_at, started_at, finished_at, error, error_stage, error_at "
            "FROM inference_jobs WHERE study_uid = ? ORDER BY round DESC, id",
            (study_uid,),
        )
    ]
