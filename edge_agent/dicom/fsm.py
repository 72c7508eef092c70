"""The DICOM upper-layer state machine, acceptor side, as the PS3.8 9.2 state/event table.

The agent only ever accepts associations and never asks for a release, so only the states
an acceptor can reach appear: Sta1 (idle), Sta2 (transport open, awaiting A-ASSOCIATE-RQ),
Sta3 (awaiting the local accept/reject decision), Sta6 (established), Sta8 (awaiting the
local A-RELEASE response) and Sta13 (awaiting transport close). Every (state, event) pair
either has its action and next state here or cannot happen to an acceptor (local requestor
events); :data:`TRANSITIONS` is tested row by row against PS3.8 Table 9-10.
"""

from __future__ import annotations

from enum import Enum


class State(Enum):
    STA1 = "Sta1"  # idle
    STA2 = "Sta2"  # transport connection open, awaiting A-ASSOCIATE-RQ PDU
    STA3 = "Sta3"  # awaiting local A-ASSOCIATE response primitive
    STA6 = "Sta6"  # association established, ready for data transfer
    STA8 = "Sta8"  # awaiting local A-RELEASE response primitive
    STA13 = "Sta13"  # awaiting transport connection close


class Event(Enum):
    EVT3 = "Evt3"  # A-ASSOCIATE-AC PDU received
    EVT4 = "Evt4"  # A-ASSOCIATE-RJ PDU received
    EVT5 = "Evt5"  # transport connection indication
    EVT6 = "Evt6"  # A-ASSOCIATE-RQ PDU received
    EVT7 = "Evt7"  # A-ASSOCIATE response primitive (accept)
    EVT8 = "Evt8"  # A-ASSOCIATE response primitive (reject)
    EVT9 = "Evt9"  # P-DATA request primitive
    EVT10 = "Evt10"  # P-DATA-TF PDU received
    EVT12 = "Evt12"  # A-RELEASE-RQ PDU received
    EVT13 = "Evt13"  # A-RELEASE-RP PDU received
    EVT14 = "Evt14"  # A-RELEASE response primitive
    EVT15 = "Evt15"  # A-ABORT request primitive
    EVT16 = "Evt16"  # A-ABORT PDU received
    EVT17 = "Evt17"  # transport connection closed indication
    EVT18 = "Evt18"  # ARTIM timer expired
    EVT19 = "Evt19"  # unrecognized or invalid PDU received


class Action(Enum):
    AE5 = "AE-5"  # connection response; start ARTIM
    AE6 = "AE-6"  # stop ARTIM; A-ASSOCIATE indication (or reject and start ARTIM)
    AE7 = "AE-7"  # send A-ASSOCIATE-AC
    AE8 = "AE-8"  # send A-ASSOCIATE-RJ; start ARTIM
    DT1 = "DT-1"  # send P-DATA-TF
    DT2 = "DT-2"  # P-DATA indication
    AR2 = "AR-2"  # A-RELEASE indication
    AR4 = "AR-4"  # send A-RELEASE-RP; start ARTIM
    AR5 = "AR-5"  # stop ARTIM (transport closed)
    AR7 = "AR-7"  # send P-DATA-TF (while awaiting the local release response)
    AA1 = "AA-1"  # send A-ABORT (service-user source); start ARTIM
    AA2 = "AA-2"  # stop ARTIM; close transport
    AA3 = "AA-3"  # A-ABORT (or A-P-ABORT) indication; close transport
    AA4 = "AA-4"  # A-P-ABORT indication
    AA5 = "AA-5"  # stop ARTIM
    AA6 = "AA-6"  # ignore PDU
    AA7 = "AA-7"  # send A-ABORT
    AA8 = "AA-8"  # send A-ABORT (service-provider source); A-P-ABORT indication; start ARTIM


S, E, A = State, Event, Action

#: (state, event) -> (action, next state). PS3.8 Table 9-10, acceptor states.
TRANSITIONS: dict[tuple[State, Event], tuple[Action, State]] = {
    (S.STA1, E.EVT5): (A.AE5, S.STA2),
    # Sta2: transport open, nothing received yet
    (S.STA2, E.EVT3): (A.AA1, S.STA13),
    (S.STA2, E.EVT4): (A.AA1, S.STA13),
    (S.STA2, E.EVT6): (A.AE6, S.STA3),  # AE-6 goes to Sta13 instead when it rejects
    (S.STA2, E.EVT10): (A.AA1, S.STA13),
    (S.STA2, E.EVT12): (A.AA1, S.STA13),
    (S.STA2, E.EVT13): (A.AA1, S.STA13),
    (S.STA2, E.EVT16): (A.AA2, S.STA1),
    (S.STA2, E.EVT17): (A.AA5, S.STA1),
    (S.STA2, E.EVT18): (A.AA2, S.STA1),
    (S.STA2, E.EVT19): (A.AA1, S.STA13),
    # Sta3: the A-ASSOCIATE-RQ is being decided
    (S.STA3, E.EVT3): (A.AA8, S.STA13),
    (S.STA3, E.EVT4): (A.AA8, S.STA13),
    (S.STA3, E.EVT6): (A.AA8, S.STA13),
    (S.STA3, E.EVT7): (A.AE7, S.STA6),
    (S.STA3, E.EVT8): (A.AE8, S.STA13),
    (S.STA3, E.EVT10): (A.AA8, S.STA13),
    (S.STA3, E.EVT12): (A.AA8, S.STA13),
    (S.STA3, E.EVT13): (A.AA8, S.STA13),
    (S.STA3, E.EVT15): (A.AA1, S.STA13),
    (S.STA3, E.EVT16): (A.AA3, S.STA1),
    (S.STA3, E.EVT17): (A.AA4, S.STA1),
    (S.STA3, E.EVT19): (A.AA8, S.STA13),
    # Sta6: established
    (S.STA6, E.EVT3): (A.AA8, S.STA13),
    (S.STA6, E.EVT4): (A.AA8, S.STA13),
    (S.STA6, E.EVT6): (A.AA8, S.STA13),
    (S.STA6, E.EVT9): (A.DT1, S.STA6),
    (S.STA6, E.EVT10): (A.DT2, S.STA6),
    (S.STA6, E.EVT12): (A.AR2, S.STA8),
    (S.STA6, E.EVT13): (A.AA8, S.STA13),
    (S.STA6, E.EVT15): (A.AA1, S.STA13),
    (S.STA6, E.EVT16): (A.AA3, S.STA1),
    (S.STA6, E.EVT17): (A.AA4, S.STA1),
    (S.STA6, E.EVT19): (A.AA8, S.STA13),
    # Sta8: the peer asked for release; we answer once our last response is out
    (S.STA8, E.EVT3): (A.AA8, S.STA13),
    (S.STA8, E.EVT4): (A.AA8, S.STA13),
    (S.STA8, E.EVT6): (A.AA8, S.STA13),
    (S.STA8, E.EVT9): (A.AR7, S.STA8),
    (S.STA8, E.EVT10): (A.AA8, S.STA13),
    (S.STA8, E.EVT12): (A.AA8, S.STA13),
    (S.STA8, E.EVT13): (A.AA8, S.STA13),
    (S.STA8, E.EVT14): (A.AR4, S.STA13),
    (S.STA8, E.EVT15): (A.AA1, S.STA13),
    (S.STA8, E.EVT16): (A.AA3, S.STA1),
    (S.STA8, E.EVT17): (A.AA4, S.STA1),
    (S.STA8, E.EVT19): (A.AA8, S.STA13),
    # Sta13: we sent RJ / RP / A-ABORT and wait for the peer to close
    (S.STA13, E.EVT3): (A.AA6, S.STA13),
    (S.STA13, E.EVT4): (A.AA6, S.STA13),
    (S.STA13, E.EVT6): (A.AA7, S.STA13),
    (S.STA13, E.EVT10): (A.AA6, S.STA13),
    (S.STA13, E.EVT12): (A.AA6, S.STA13),
    (S.STA13, E.EVT13): (A.AA6, S.STA13),
    (S.STA13, E.EVT16): (A.AA2, S.STA1),
    (S.STA13, E.EVT17): (A.AR5, S.STA1),
    (S.STA13, E.EVT18): (A.AA2, S.STA1),
    (S.STA13, E.EVT19): (A.AA7, S.STA13),
}


class InvalidTransition(Exception):
    """An event that cannot happen in this state to an acceptor (a bug, not peer input)."""


def transition(state: State, event: Event) -> tuple[Action, State]:
    """The action to take and the next state. Raises :class:`InvalidTransition`."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(f"{event.value} cannot happen in {state.value}") from None
