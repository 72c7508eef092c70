"""hub_protocol (HLC, records, receipts) and the edge outbox and conflict rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import OutOfResources
from edge_agent.store import Store
from edge_agent.sync import outbox
from hub_protocol import (
    HLC,
    Change,
    ChangePage,
    ChangeType,
    HLCError,
    HybridClock,
    Lane,
    ProtocolError,
    PushBatch,
    PushReceipt,
    Receipt,
    ReceiptStatus,
    Record,
    RecordType,
    negotiate_version,
)
from hub_protocol.conflicts import DEFAULT_RULES, Outcome, Rule, Version, is_conflict, resolve

# -- HLC ----------------------------------------------------------------------------------------


class Wall:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.floats(-3600, 3600, allow_nan=False), st.booleans(), st.integers(0, 5)),
        max_size=60,
    )
)
def test_hlc_strictly_increases_whatever_the_wall_clock_does(
    steps: list[tuple[float, bool, int]],
) -> None:
    wall = Wall(1_800_000_000.0)
    clock = HybridClock("edge-a", wall=wall, max_drift_s=10**6)
    seen = [clock.now()]
    for jump, receive, counter in steps:
        wall.t += jump  # including big jumps backwards
        if receive:
            remote = HLC(int((wall.t + jump / 2) * 1000), counter, "hub")
            ts = clock.observe(remote)
            assert ts > remote
        else:
            ts = clock.now()
        assert ts > seen[-1]
        seen.append(ts)
    assert [HLC.decode(t.encode()) for t in seen] == seen
    assert sorted(t.encode() for t in seen) == [t.encode() for t in seen]  # sorts as strings


def test_hlc_refuses_a_remote_far_in_the_future() -> None:
    clock = HybridClock("edge-a", wall=Wall(1000.0), max_drift_s=60)
    with pytest.raises(HLCError, match="ahead"):
        clock.observe(HLC(1000_000 + 61_000, 0, "hub"))
    assert clock.last == HLC(0, 0, "edge-a")  # untouched


def test_hlc_decode_rejects_garbage() -> None:
    for bad in ("", "123", "000000000000001-000000-", "x" * 30):
        with pytest.raises(HLCError):
            HLC.decode(bad)


# -- records and receipts --------------------------------------------------------------


def _record(**kw: Any) -> dict[str, Any]:
    base = {
        "key": "result/abc",
        "seq": 1,
        "type": "result",
        "lane": "urgent",
        "hlc": HLC(5, 0, "e").encode(),
        "base_version": 0,
        "payload": {"a": 1},
    }
    base.update(kw)
    return base


def test_batch_round_trip() -> None:
    rec = Record.from_json(_record())
    batch = PushBatch(protocol=1, site_id="site-1", records=(rec,))
    again = PushBatch.from_json(json.loads(batch.encode()))
    assert again == batch
    receipt = PushReceipt(
        receipts=(Receipt(key="result/abc", seq=1, status=ReceiptStatus.APPLIED, version=3),),
        high_water={Lane.URGENT: 1},
    )
    assert PushReceipt.from_json(json.loads(json.dumps(receipt.to_json()))) == receipt


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"seq": 0}, "seq"),
        ({"seq": True}, "wrong type"),
        ({"lane": "vip"}, "vip"),
        ({"type": "gossip"}, "gossip"),
        ({"hlc": "yesterday"}, "HLC"),
        ({"key": "../etc"}, "key"),
        ({"payload": []}, "wrong type"),
        ({"base_version": -1}, "base_version"),
    ],
)
def test_bad_records_are_protocol_errors(change: dict[str, Any], words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        Record.from_json(_record(**change))


def test_version_negotiation() -> None:
    assert negotiate_version([1, 2, 3], [1]) == 1
    with pytest.raises(ProtocolError, match="no common"):
        negotiate_version([2], [1])
    with pytest.raises(ProtocolError, match="duplicate"):
        PushBatch.from_json({"protocol": 1, "site_id": "s", "records": [_record(), _record()]})


def test_change_page_round_trip_and_unknown_change_types() -> None:
    change = Change(
        cursor=7,
        type=ChangeType.RECORD,
        key="system_config/c",
        version=3,
        payload={"value": {"a": 3}, "reason": "cloud edit"},
        site_id="site-1",
        created_at=1.5,
    )
    page = ChangePage(changes=(change,), next_cursor=7)
    assert ChangePage.from_json(json.loads(json.dumps(page.to_json()))) == page
    assert change.value == {"a": 3}
    rollback = {"name": "m", "from_version": "2.0.0", "to_version": "1.0.0"}
    assert (
        Change.from_json(
            {
                "cursor": 8,
                "type": "model_rollback",
                "key": "model/m",
                "version": 1,
                "payload": rollback,
            }
        ).value
        == rollback
    )
    with pytest.raises(ProtocolError, match="gossip"):
        Change.from_json({"cursor": 9, "type": "gossip", "key": "k", "version": 1, "payload": {}})
    with pytest.raises(ProtocolError, match="next_cursor"):
        ChangePage.from_json({"changes": []})


# -- outbox ------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store(tmp_path / "edge.db")
    yield s
    s.close()


def _put(store: Store, lane: Lane, n: int, *, size: int = 10, limit: int | None = None) -> int:
    clock = HybridClock("edge", wall=Wall(1000.0))
    return int(
        store.writer.call(
            lambda c: outbox.enqueue(
                c,
                key=f"result/{lane.value}-{n}",
                type=RecordType.RESULT,
                lane=lane,
                payload={"n": n, "pad": "x" * size},
                hlc=clock.now(),
                now=1000.0,
                max_pending_bytes=limit,
            )
        )
    )


@settings(max_examples=40, deadline=None)
@given(
    lanes=st.lists(st.sampled_from(list(Lane)), min_size=1, max_size=40), batch=st.integers(1, 10)
)
def test_outbox_drains_by_lane_then_seq_without_gaps(
    tmp_path_factory: pytest.TempPathFactory, lanes: list[Lane], batch: int
) -> None:
    s = Store(tmp_path_factory.mktemp("ob") / "edge.db")
    try:
        for i, lane in enumerate(lanes):
            _put(s, lane, i)
        sent: list[Record] = []
        while True:
            with s.read() as conn:
                recs = outbox.next_batch(conn, max_records=batch)
            if not recs:
                break
            assert len(recs) <= batch
            sent.extend(recs)
            receipt = PushReceipt(
                receipts=tuple(
                    Receipt(key=r.key, seq=r.seq, status=ReceiptStatus.APPLIED) for r in recs
                )
            )
            s.writer.call(lambda c, rc=receipt: outbox.apply_receipt(c, rc, now=1.0))
        assert [r.lane.rank for r in sent] == sorted(r.lane.rank for r in sent)
        for lane in Lane:
            seqs = [r.seq for r in sent if r.lane is lane]
            assert seqs == list(range(1, len(seqs) + 1))  # per lane: 1..n, no gaps
        assert len(sent) == len(lanes)
        with s.read() as conn:
            assert sum(outbox.stats(conn).depth.values()) == 0
    finally:
        s.close()


def test_outbox_high_water_acks_and_rejections_dead_letter(store: Store) -> None:
    for i in range(5):
        _put(store, Lane.NORMAL, i)
    receipt = PushReceipt(
        receipts=(
            Receipt(
                key="result/normal-4", seq=5, status=ReceiptStatus.REJECTED, error="payload too old"
            ),
        ),
        high_water={Lane.NORMAL: 3},  # "I hold 1..3" (e.g. asked after a lost response)
    )
    acked, dead = store.writer.call(lambda c: outbox.apply_receipt(c, receipt, now=2.0))
    assert (acked, dead) == (3, 1)
    with store.read() as conn:
        (left,) = outbox.next_batch(conn)
        st_ = outbox.stats(conn)
    assert (left.seq, left.key) == (4, "result/normal-3")
    assert st_.dead == 1 and st_.depth[Lane.NORMAL] == 1
    (err,) = store.query("SELECT error FROM outbox WHERE state = 'DEAD'")[0]
    assert err == "payload too old"


def test_outbox_full_refuses_instead_of_dropping(store: Store) -> None:
    _put(store, Lane.BATCH, 1, size=500, limit=2000)
    _put(store, Lane.BATCH, 2, size=500, limit=2000)
    with pytest.raises(OutOfResources, match="outbox full"):
        _put(store, Lane.BATCH, 3, size=1500, limit=2000)
    assert store.query("SELECT count(*) FROM outbox")[0][0] == 2


def test_outbox_batch_respects_bytes_but_never_stalls(store: Store) -> None:
    _put(store, Lane.NORMAL, 1, size=5000)
    _put(store, Lane.NORMAL, 2, size=10)
    with store.read() as conn:
        assert len(outbox.next_batch(conn, max_bytes=100)) == 1  # one oversized still goes
        assert len(outbox.next_batch(conn, max_bytes=100_000)) == 2


# -- conflict rules ------------------------------------------------------------------------------

hlcs = st.builds(HLC, st.integers(0, 10**12), st.integers(0, 999), st.sampled_from(["e", "c"]))
values = st.dictionaries(st.sampled_from(list("abcdef")), st.integers(0, 3), max_size=6)


def _pair(
    e_hlc: HLC, c_hlc: HLC, ev: dict[str, int], cv: dict[str, int]
) -> tuple[Version, Version]:
    return (
        Version(origin="edge", hlc=HLC(e_hlc.ms, e_hlc.counter, "edge"), fields=ev),
        Version(origin="cloud", hlc=HLC(c_hlc.ms, c_hlc.counter, "cloud"), fields=cv),
    )


@given(e=hlcs, c=hlcs, ev=values, cv=values)
def test_every_default_rule(e: HLC, c: HLC, ev: dict[str, int], cv: dict[str, int]) -> None:
    edge, cloud = _pair(e, c, ev, cv)
    for data_type, rule in DEFAULT_RULES.items():
        r = resolve(data_type, edge, cloud)
        if rule is Rule.CLOUD_WINS:
            assert (r.outcome, r.value) == (Outcome.CLOUD, cv)
        elif rule is Rule.EDGE_WINS:
            assert (r.outcome, r.value) == (Outcome.EDGE, ev)
        elif rule is Rule.TIMESTAMP_WINS:
            later = edge if edge.hlc > cloud.hlc else cloud
            assert r.value == later.fields and r.outcome.value == later.origin
        elif rule is Rule.MERGE_FIELDS:
            assert r.value is not None and set(r.value) == set(ev) | set(cv)
            for k, v in r.value.items():
                assert v in (ev.get(k), cv.get(k))
                if k in ev and k in cv and ev[k] != cv[k]:
                    assert v == (ev[k] if edge.hlc > cloud.hlc else cv[k])
        else:
            assert r.outcome is Outcome.MANUAL and r.value is None
            assert r.kept == (edge, cloud)  # nothing silently dropped


@given(e=hlcs, c=hlcs, ev=values, cv=values)
def test_timestamp_and_merge_do_not_depend_on_argument_roles(
    e: HLC, c: HLC, ev: dict[str, int], cv: dict[str, int]
) -> None:
    """Swap which side is 'edge' and which 'cloud': the winning value is the same."""
    a_edge, a_cloud = _pair(e, c, ev, cv)
    b_edge = Version(origin="edge", hlc=a_cloud.hlc, fields=cv)
    b_cloud = Version(origin="cloud", hlc=a_edge.hlc, fields=ev)
    for data_type in ("study_metadata", "system_config"):
        assert (
            resolve(data_type, a_edge, a_cloud).value == resolve(data_type, b_edge, b_cloud).value
        )


def test_merge_uses_per_field_change_times() -> None:
    edge = Version(
        origin="edge",
        hlc=HLC(10, 0, "edge"),
        fields={"a": 1, "b": 1},
        field_hlc={"a": HLC(1, 0, "edge")},
    )
    cloud = Version(origin="cloud", hlc=HLC(5, 0, "cloud"), fields={"a": 2, "b": 2})
    assert resolve("system_config", edge, cloud).value == {"a": 2, "b": 1}


def test_conflict_detection_and_unknown_type() -> None:
    assert is_conflict(3, 4) and not is_conflict(4, 4) and is_conflict(0, 1)
    edge, cloud = _pair(HLC(1, 0, "e"), HLC(2, 0, "c"), {}, {})
    with pytest.raises(KeyError):
        resolve("weather", edge, cloud)


def test_pseudonymiser(tmp_path: Path) -> None:
    import stat

    from edge_agent.sync.phi import Pseudonymiser, load_or_create_key

    key_path = tmp_path / "site-secret.key"
    key = load_or_create_key(key_path)
    assert load_or_create_key(key_path) == key and len(key) == 32
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    p = Pseudonymiser(key)
    other = Pseudonymiser(b"k" * 32)
    payload = {
        "study": {"patient_id": "MRN-1", "patient_name": "", "modality": "CT"},
        "items": [{"accession_number": "A1"}],
        "patient_id": "MRN-1",
    }
    out = p.apply(payload)
    assert out["study"]["patient_id"] == out["patient_id"] == p.pseudonym("MRN-1")
    assert out["study"]["patient_name"] == ""  # empty stays empty
    assert out["study"]["modality"] == "CT"
    assert out["items"][0]["accession_number"].startswith("pseudo:")
    assert other.pseudonym("MRN-1") != p.pseudonym("MRN-1")  # per-site keys
    assert payload["patient_id"] == "MRN-1"  # the input is not modified
