"""The acceptor's upper-layer table against PS3.8 Table 9-10 (as pynetdicom transcribes it),
row by row, and the live acceptor's answer to every network event in each state it can be
driven into from the wire (Sta2, Sta6, Sta13)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from pynetdicom.fsm import ACTIONS, TRANSITION_TABLE

from edge_agent.dicom.fsm import TRANSITIONS, Event, InvalidTransition, State, transition
from tests.conftest import make_config
from tests.dicom_client import Client, associate_rq, command, p_data, pdv

ACCEPTOR_STATES = [s.value for s in State]


@pytest.mark.parametrize(
    ("state", "event"),
    [(s, e) for s in ACCEPTOR_STATES for e in (f"Evt{i}" for i in range(1, 20))],
)
def test_table_row_matches_ps38(state: str, event: str) -> None:
    ours = (
        TRANSITIONS.get((State(state), Event(event))) if event in Event._value2member_map_ else None
    )
    ref = TRANSITION_TABLE.get((event, state))
    if ref is None:
        assert ours is None, f"{event} in {state} is not in PS3.8's table"
        return
    if ours is None:
        # only the local requestor events (we never request associations or releases)
        assert event in ("Evt1", "Evt2", "Evt11"), f"{event} in {state} is missing"
        return
    action, nxt = ours
    assert action.value == ref
    ref_next = ACTIONS[ref][2]
    if isinstance(ref_next, tuple):  # AE-6: Sta3, or Sta13 when the request is refused
        assert nxt.value in ref_next
    else:
        assert nxt.value == ref_next


def test_impossible_event_raises() -> None:
    with pytest.raises(InvalidTransition):
        transition(State.STA1, Event.EVT10)


# -- the live acceptor: network events in each reachable state -------------------------------

RQ = associate_rq()
AC = b"\x02\x00\x00\x00\x00\x04" + b"\x00" * 4  # any AC/RJ/RP body: the type is the event
RJ = b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x03"
RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"
ECHO = p_data(
    pdv(
        1,
        0x03,
        command(
            {
                "AffectedSOPClassUID": "1.2.840.10008.1.1",
                "CommandField": 0x0030,
                "MessageID": 1,
                "CommandDataSetType": 0x0101,
            }
        ),
    )
)
INVALID = b"\x44\x00\x00\x00\x00\x00"  # unrecognised PDU type
EVENTS = {
    "Evt3": AC,
    "Evt4": RJ,
    "Evt6": RQ,
    "Evt10": ECHO,
    "Evt12": RELEASE_RQ,
    "Evt13": RELEASE_RP,
    "Evt16": ABORT,
    "Evt19": INVALID,
}


def _answer(c: Client, timeout: float) -> str:
    """What the acceptor did: 'abort', 'ac', 'rj', 'rp', 'data', 'closed' or 'nothing'."""
    c.sock.settimeout(timeout)
    try:
        head = c.sock.recv(6)
    except TimeoutError:
        return "nothing"
    except ConnectionResetError:
        return "closed"
    if not head:
        return "closed"
    return {1: "rq", 2: "ac", 3: "rj", 4: "data", 5: "rq-release", 6: "rp", 7: "abort"}[head[0]]


# what each PS3.8 action looks like from the peer's side
SEEN = {
    "AA-1": "abort",
    "AA-7": "abort",
    "AA-8": "abort",
    "AA-2": "closed",
    "AA-3": "closed",
    "AE-6": "ac",
    "DT-2": "data",
    "AR-2": "rp",
    "AA-6": "nothing",
}


@pytest.fixture(scope="module")
def acceptor(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from edge_agent.app import EdgeApp

    tmp = tmp_path_factory.mktemp("fsm")
    app = EdgeApp(make_config(tmp, dicom={"acse_timeout_s": 1.0, "allow_any_caller": True}))
    app.listener.start()
    yield app
    app.listener.stop(grace_s=1)
    app.close()


def _into(port: int, state: str) -> Client:
    c = Client(port)
    if state == "Sta6":
        assert c.associate().type == 0x02
    elif state == "Sta13":
        assert c.associate().type == 0x02
        c.send(RELEASE_RQ)
        assert c.read_pdu().type == 0x06  # A-RELEASE-RP: now in Sta13
    return c


@pytest.mark.parametrize("state", ["Sta2", "Sta6", "Sta13"])
@pytest.mark.parametrize("event", sorted(EVENTS, key=lambda e: int(e[3:])))
def test_live_acceptor_follows_the_table(acceptor: Any, state: str, event: str) -> None:
    action = TRANSITION_TABLE[(event, state)]
    c = _into(acceptor.listener.port, state)
    try:
        c.send(EVENTS[event])
        got = _answer(c, 0.5)
        assert got == SEEN[action], f"{event} in {state}: {action} should be {SEEN[action]}"
    finally:
        c.close()


@pytest.mark.parametrize("state", ["Sta2", "Sta13"])
def test_artim_expiry_closes(acceptor: Any, state: str) -> None:
    """Evt18 (ARTIM expired) in Sta2 and Sta13: AA-2, the transport is closed."""
    c = _into(acceptor.listener.port, state)
    try:
        t0 = time.monotonic()
        assert _answer(c, 5) == "closed"
        assert time.monotonic() - t0 > 0.5  # it waited for ARTIM (1 s), then closed
    finally:
        c.close()


def test_transport_close_in_sta6_is_audited_as_aborted(acceptor: Any) -> None:
    """Evt17 in Sta6: AA-4 (A-P-ABORT indication)."""
    c = _into(acceptor.listener.port, "Sta6")
    c.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        rows = acceptor.store.query(
            "SELECT outcome FROM associations WHERE reject_reason LIKE 'connection closed by "
            "the peer without A-RELEASE'"
        )
        if rows:
            assert rows[0]["outcome"] == "aborted"
            return
        time.sleep(0.05)
    raise AssertionError("no audit row")
