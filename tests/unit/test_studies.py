"""Study assembly: the state table, the completeness rules (property tests), recording
instances (duplicates, versions, late arrivals) and the worker on an injected clock."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.clock import FakeClock
from edge_agent.metrics import create_metrics
from edge_agent.store import Store
from edge_agent.studies.models import (
    TRANSITIONS,
    InvalidTransition,
    Study,
    StudyState,
    check_transition,
)
from edge_agent.studies.parse import InstanceInfo
from edge_agent.studies.rules import CompleteReason, completion_reason
from edge_agent.studies.store import (
    RecordOutcome,
    StoredObject,
    get_study,
    list_studies,
    record_instance,
)
from edge_agent.studies.worker import AssemblyWorker
from tests.conftest import make_config

# -- state machine -------------------------------------------------------------------------


def test_transition_table_is_exactly_this() -> None:
    S = StudyState  # noqa: N806 - short alias keeps the table readable
    assert dict(TRANSITIONS) == {
        S.RECEIVING: frozenset({S.COMPLETE}),
        S.COMPLETE: frozenset({S.RECEIVING, S.INFERRING}),
        S.INFERRING: frozenset({S.RECEIVING, S.DONE, S.FAILED}),
        S.DONE: frozenset({S.RECEIVING, S.COMPLETE}),
        S.FAILED: frozenset({S.RECEIVING, S.INFERRING, S.COMPLETE}),
    }


@pytest.mark.parametrize("a", list(StudyState))
@pytest.mark.parametrize("b", list(StudyState))
def test_check_transition_follows_table(a: StudyState, b: StudyState) -> None:
    if b in TRANSITIONS[a]:
        check_transition(a, b)
    else:
        with pytest.raises(InvalidTransition):
            check_transition(a, b)


# -- completeness rules --------------------------------------------------------------------

times = st.floats(min_value=0, max_value=1e10, allow_nan=False)
periods = st.floats(min_value=0.001, max_value=86400, allow_nan=False)


@given(last=times, quiet=periods, gap=st.floats(min_value=0, max_value=1e6), n=st.integers(0, 500))
def test_quiet_period_rule(last: float, quiet: float, gap: float, n: int) -> None:
    reason = completion_reason(
        now=last + gap,
        last_received_at=last,
        quiet_period_s=quiet,
        instance_count=n,
        expected_instances=None,
    )
    now = last + gap
    assert (reason is CompleteReason.QUIET_PERIOD) == (now - last >= quiet)


@given(last=times, quiet=periods, n=st.integers(0, 500), expected=st.integers(1, 500))
def test_expected_count_completes_at_once(last: float, quiet: float, n: int, expected: int) -> None:
    reason = completion_reason(
        now=last,
        last_received_at=last,
        quiet_period_s=quiet,
        instance_count=n,
        expected_instances=expected,
    )
    assert (reason is CompleteReason.EXPECTED_COUNT) == (n >= expected)


@given(last=times, back=st.floats(min_value=0.001, max_value=1e6), quiet=periods)
def test_clock_behind_never_completes_by_quiet_period(
    last: float, back: float, quiet: float
) -> None:
    now = last - back
    if now >= last:  # float rounding at large magnitudes
        return
    assert (
        completion_reason(
            now=now,
            last_received_at=last,
            quiet_period_s=quiet,
            instance_count=3,
            expected_instances=None,
        )
        is None
    )


# -- recording and the worker ------------------------------------------------------------------


def info(
    n: int,
    *,
    study: str = "1.2.3",
    series: str = "1.2.3.1",
    modality: str = "CT",
    expected: int | None = None,
) -> InstanceInfo:
    return InstanceInfo(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=f"1.2.3.1.{n}",
        study_uid=study,
        series_uid=series,
        transfer_syntax="1.2.840.10008.1.2.1",
        modality=modality,
        patient_id="P1",
        expected_study_instances=expected,
    )


def obj(sha: str) -> StoredObject:
    return StoredObject(sha256=sha, size_bytes=10, tier="hot", path=f"objects/{sha[:2]}/{sha}.dcm")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "edge.db")
    yield s  # type: ignore[misc]
    s.close()


def get_study_(store: Store, uid: str) -> Study | None:
    with store.read() as conn:
        return get_study(conn, uid)


def list_studies_(store: Store) -> list[Study]:
    with store.read() as conn:
        return list_studies(conn)


def put(store: Store, i: InstanceInfo, sha: str, now: float) -> RecordOutcome:
    rec = store.writer.call(
        lambda c: record_instance(c, i, obj(sha), now=now, association_id=None, calling_ae="X")
    )
    return rec.outcome


def test_record_duplicate_and_version(store: Store) -> None:
    assert put(store, info(1), "aa" * 32, 100.0) is RecordOutcome.STORED
    assert put(store, info(1), "aa" * 32, 101.0) is RecordOutcome.DUPLICATE
    assert put(store, info(1), "bb" * 32, 102.0) is RecordOutcome.NEW_VERSION
    assert put(store, info(1), "aa" * 32, 103.0) is RecordOutcome.DUPLICATE  # an old version
    assert put(store, info(2), "cc" * 32, 104.0) is RecordOutcome.STORED
    study = get_study_(store, "1.2.3")
    assert study is not None
    assert study.instance_count == 2 and study.series_count == 1
    versions = store.query("SELECT version FROM instances WHERE sop_instance_uid = '1.2.3.1.1'")
    assert [r[0] for r in versions] == [1, 2]


def worker(store: Store, clock: FakeClock, tmp_path: Path, **studies: object) -> AssemblyWorker:
    cfg = make_config(tmp_path, studies=studies).studies
    return AssemblyWorker(cfg, store=store, clock=clock, metrics=create_metrics())


def test_quiet_period_then_late_arrival_reopens(store: Store, tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    w = worker(store, clock, tmp_path, quiet_period_s=10.0)
    for n in range(3):
        put(store, info(n), f"{n:02x}" * 32, clock.now())
        clock.advance(2)
    assert w.tick() == 0  # last arrival 2 s ago
    clock.advance(7.9)
    assert w.tick() == 0
    clock.advance(0.2)
    assert w.tick() == 1
    s = get_study_(store, "1.2.3")
    assert s is not None and s.state is StudyState.COMPLETE and s.completed_reason == "quiet_period"
    # a late instance re-opens it and is recorded as late
    clock.advance(60)
    put(store, info(9), "99" * 32, clock.now())
    s = get_study_(store, "1.2.3")
    assert s is not None
    assert (s.state, s.late_arrivals, s.reopen_count, s.completed_at) == (
        StudyState.RECEIVING,
        1,
        1,
        None,
    )
    assert store.query("SELECT late FROM instances WHERE sop_instance_uid='1.2.3.1.9'")[0][0] == 1
    events = [
        tuple(r) for r in store.query("SELECT from_state, to_state FROM study_events ORDER BY id")
    ]
    assert events == [(None, "RECEIVING"), ("RECEIVING", "COMPLETE"), ("COMPLETE", "RECEIVING")]
    clock.advance(10)
    assert w.tick() == 1


def test_expected_count_and_per_modality_quiet(store: Store, tmp_path: Path) -> None:
    clock = FakeClock(0.0)
    w = worker(store, clock, tmp_path, quiet_period_s=10.0, quiet_period_by_modality={"MR": 30.0})
    for n in range(3):
        put(store, info(n, expected=3), f"{n:02x}" * 32, clock.now())
    for n in range(2):
        put(
            store,
            info(10 + n, study="7.7", series="7.7.1", modality="MR"),
            f"{n:02x}" * 31 + "ff",
            clock.now(),
        )
    assert w.tick() == 1  # the CT study met its expected count at once
    assert get_study_(store, "1.2.3").completed_reason == "expected_count"  # type: ignore[union-attr]
    clock.advance(15)
    assert w.tick() == 0  # MR waits 30 s
    clock.advance(15)
    assert w.tick() == 1


def test_clock_jump_backwards_restarts_quiet_period(store: Store, tmp_path: Path) -> None:
    clock = FakeClock(10_000.0)
    w = worker(store, clock, tmp_path, quiet_period_s=10.0)
    put(store, info(1), "ab" * 32, clock.now())
    clock.advance(-3600)  # NTP step back an hour
    assert w.tick() == 0
    (last,) = store.query("SELECT last_received_at FROM studies")[0]
    assert last == clock.now()  # re-based, not waiting an hour for the clock to catch up
    clock.advance(10)
    assert w.tick() == 1


def test_worker_does_not_complete_a_study_that_just_got_an_instance(
    store: Store, tmp_path: Path
) -> None:
    from edge_agent.studies.store import complete_study

    clock = FakeClock(0.0)
    put(store, info(1), "ab" * 32, 0.0)
    put(store, info(2), "cd" * 32, 5.0)  # arrived after the worker looked at last=0.0
    moved = store.writer.call(
        lambda c: complete_study(
            c, "1.2.3", seen_last_received_at=0.0, now=20.0, reason="quiet_period"
        )
    )
    assert moved is False
    assert get_study_(store, "1.2.3").state is StudyState.RECEIVING  # type: ignore[union-attr]
    del clock


def test_restart_resumes_from_database(tmp_path: Path) -> None:
    db = tmp_path / "edge.db"
    clock = FakeClock(0.0)
    s1 = Store(db)
    put(s1, info(1), "ab" * 32, 0.0)
    s1.close()  # "crash" and restart: everything needed is in the file
    s2 = Store(db)
    try:
        clock.advance(11)
        assert worker(s2, clock, tmp_path, quiet_period_s=10.0).tick() == 1
        assert [s.state for s in list_studies_(s2)] == [StudyState.COMPLETE]
    finally:
        s2.close()


def test_study_model_fields_roundtrip(store: Store) -> None:
    put(store, dataclasses.replace(info(1), patient_name="Müller^Jürgen"), "ab" * 32, 5.0)
    (s,) = list_studies_(store)
    assert s.patient_name == "Müller^Jürgen" and s.first_received_at == 5.0


@settings(max_examples=25, deadline=None)
@given(order=st.permutations(list(range(6))), dup=st.lists(st.integers(0, 5), max_size=6))
def test_counts_independent_of_order_and_duplicates(
    tmp_path_factory: pytest.TempPathFactory, order: list[int], dup: list[int]
) -> None:
    s = Store(tmp_path_factory.mktemp("db") / "edge.db")
    try:
        for t, n in enumerate(order + dup):
            put(s, info(n), f"{n:02x}" * 32, float(t))
        study = get_study_(s, "1.2.3")
        assert study is not None and study.instance_count == 6
        assert s.query("SELECT count(*) FROM instances")[0][0] == 6
    finally:
        s.close()
